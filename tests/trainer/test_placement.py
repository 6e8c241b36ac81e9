"""GPU placement of the trainer and its embedded engines on one host (pure logic: the GPU count is given)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from trainer.backends.placement import (
    actor_gpu_offset,
    critic_gpu_offset,
    engine_cuda_visible_devices,
    engines_share_trainer_gpus,
)


def layout(**overrides: object) -> SimpleNamespace:
    values = {
        "colocate": False,
        "rollout_external": False,
        "rollout_num_gpus": 2,
        "rollout_num_gpus_per_engine": 1,
        "actor_num_gpus_per_node": 2,
        "critic_num_gpus_per_node": 2,
    }
    values.update(overrides)
    return SimpleNamespace(**values)


def test_engines_first_then_actor_then_critic_when_the_host_has_gpus_for_all(monkeypatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    args = layout()
    assert actor_gpu_offset(args, 6) == 2
    assert critic_gpu_offset(args, 6) == 4
    assert [engine_cuda_visible_devices(args, i, 6) for i in range(2)] == ["0", "1"]
    assert not engines_share_trainer_gpus(args, 6)


def test_an_engine_of_several_gpus_gets_its_own_range_through_the_parents_visible_devices(
    monkeypatch,
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7,2,3")
    args = layout(rollout_num_gpus=4, rollout_num_gpus_per_engine=2)
    assert actor_gpu_offset(args, 6) == 4
    assert [engine_cuda_visible_devices(args, i, 6) for i in range(2)] == ["4,5", "6,7"]
    # No room for a critic of its own: it shares the actor's GPUs.
    assert critic_gpu_offset(args, 6) == 4


@pytest.mark.parametrize("gpus", [1, 3])
def test_too_few_gpus_share_gpu_0_and_the_engines_keep_the_trainers_view(gpus: int) -> None:
    args = layout()
    assert actor_gpu_offset(args, gpus) == 0
    assert engine_cuda_visible_devices(args, 0, gpus) is None
    assert engines_share_trainer_gpus(args, gpus)


def test_colocated_external_or_cpu_engines_take_no_gpus_of_their_own() -> None:
    for args, gpus in (
        (layout(colocate=True), 8),
        (layout(rollout_external=True), 8),
        (layout(rollout_num_gpus=None), 8),
        (layout(), 0),
    ):
        assert actor_gpu_offset(args, gpus) == 0
        assert engine_cuda_visible_devices(args, 0, gpus) is None
        assert not engines_share_trainer_gpus(args, gpus)
