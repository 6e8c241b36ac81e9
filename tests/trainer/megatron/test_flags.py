"""The Megatron backend's flag checks, on CPU without megatron-core: activation recomputation mapped onto
megatron-core's ``TransformerConfig`` fields (and the combinations it or Megatron-LM would reject named by flag),
and the parallel layouts ``check_parallelism`` accepts."""

from __future__ import annotations

import pytest

from tests.trainer.helpers import trainer_args
from trainer.backends.megatron_backend.config import recompute_config_kwargs
from trainer.backends.megatron_backend.trainer import check_parallelism


def _args(*flags: str):
    return trainer_args("/unused", "--train-backend", "megatron", *flags)


FULL = ("--recompute-granularity", "full", "--recompute-method")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ((), {}),
        (
            ("--recompute-granularity", "selective"),
            {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
        ),
        (
            ("--recompute-activations",),
            {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
        ),
        (
            ("--recompute-granularity", "selective", "--recompute-modules", "core_attn"),
            {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
        ),
        (
            (*FULL, "uniform", "--recompute-num-layers", "1"),
            {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
        ),
        (
            (*FULL, "block", "--recompute-num-layers", "2"),
            {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 2},
        ),
    ],
)
def test_recompute_flags_map_onto_transformer_config(flags, expected):
    assert recompute_config_kwargs(_args(*flags), layers_per_stage=2) == expected


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--recompute-granularity", "full"), "needs --recompute-method: uniform"),
        (
            (*FULL, "uniform"),
            r"--recompute-num-layers between 1 and 2 \(the layers of a pipeline stage\); it is missing",
        ),
        ((*FULL, "block", "--recompute-num-layers", "0"), "--recompute-num-layers.*it is 0"),
        (
            (*FULL, "block", "--recompute-num-layers", "3"),
            r"between 1 and 2 \(the layers of a pipeline stage\); it is 3",
        ),
        (
            ("--recompute-granularity", "selective", "--recompute-method", "uniform"),
            "--recompute-method applies",
        ),
        (
            ("--recompute-granularity", "selective", "--recompute-num-layers", "1"),
            "--recompute-num-layers applies",
        ),
        (
            ("--recompute-activations", "--recompute-granularity", "full"),
            "--recompute-activations is Megatron's",
        ),
        (("--recompute-method", "uniform"), "--recompute-method given without --recompute-granularity"),
        (
            ("--recompute-granularity", "selective", "--recompute-modules", "core_attn", "mlp"),
            "--recompute-modules core_attn mlp: .*core attention only",
        ),
        (
            (*FULL, "uniform", "--recompute-num-layers", "1", "--recompute-modules", "mlp"),
            "applies to .*selective",
        ),
    ],
)
def test_recompute_combinations_megatron_rejects_name_the_flag(flags, message):
    with pytest.raises(ValueError, match=message):
        recompute_config_kwargs(_args(*flags), layers_per_stage=2)


def test_parallel_layouts():
    check_parallelism(_args("--actor-num-gpus-per-node", "4", "--pipeline-model-parallel-size", "2"))
    check_parallelism(
        _args(
            "--actor-num-gpus-per-node", "8", "--pipeline-model-parallel-size", "2",
            "--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2",
        )
    )  # fmt: skip
    with pytest.raises(ValueError, match="--actor-num-gpus-per-node 2 must be a multiple of .*pipeline.*2"):
        check_parallelism(
            _args(
                "--actor-num-gpus-per-node", "2", "--pipeline-model-parallel-size", "2",
                "--tensor-model-parallel-size", "2",
            )
        )  # fmt: skip
    check_parallelism(_args("--actor-num-gpus-per-node", "2", "--context-parallel-size", "2"))
    check_parallelism(
        _args(
            "--actor-num-gpus-per-node", "8", "--context-parallel-size", "2",
            "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
        )
    )  # fmt: skip
    with pytest.raises(
        ValueError, match="--actor-num-gpus-per-node 6 must be a multiple of .*--context-parallel-size 4"
    ):
        check_parallelism(_args("--actor-num-gpus-per-node", "6", "--context-parallel-size", "4"))
    with pytest.raises(ValueError, match="--loss-type custom_loss with --context-parallel-size 2"):
        check_parallelism(
            _args(
                "--actor-num-gpus-per-node", "2", "--context-parallel-size", "2", "--loss-type", "custom_loss",
                "--custom-loss-function-path", "x.y",
            )
        )  # fmt: skip
    with pytest.raises(ValueError, match="--recompute-granularity full needs --recompute-method"):
        check_parallelism(_args("--recompute-granularity", "full"))
    check_parallelism(
        _args(
            "--actor-num-gpus-per-node", "2", "--pipeline-model-parallel-size", "2",
            "--decoder-first-pipeline-num-layers", "1",
        )
    )  # fmt: skip
    with pytest.raises(
        ValueError, match="--decoder-last-pipeline-num-layers needs --pipeline-model-parallel-size"
    ):
        check_parallelism(_args("--decoder-last-pipeline-num-layers", "1"))
    with pytest.raises(ValueError, match="--num-layers-per-virtual-pipeline-stage is not supported.*evenly"):
        check_parallelism(
            _args(
                "--actor-num-gpus-per-node", "2", "--pipeline-model-parallel-size", "2",
                "--num-layers-per-virtual-pipeline-stage", "1",
            )
        )  # fmt: skip
    with pytest.raises(ValueError, match="--account-for-loss-in-pipeline-split is not supported"):
        check_parallelism(_args("--account-for-loss-in-pipeline-split"))
