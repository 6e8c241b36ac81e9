"""Weight sync against a real rollout-engine server and router on loopback: after each transport the engine's
log-probs for a sampled sequence equal the trainer's, and the router holds the published version."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from services.core.net import free_port, wait_http_ok
from tests.engine_servers import engine_process
from tests.trainer.helpers import random_batch, trainer_args
from trainer.backends.batch import RolloutBatch
from trainer.backends.torch_backend import TorchTrainer
from trainer.weight_sync.engine_client import EngineClient
from trainer.weight_sync.transports import plan_buckets

# The trainer and the engine compared here to float rounding (and bit for bit in true on-policy mode) both run on
# CPU; on a CUDA host both would take GPU 0, where NCCL refuses two ranks on one device. The GPU weight sync (NCCL,
# trainer and engines on their own GPUs) is tests/trainer/test_gpu.py.
pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="CPU trainer against a CPU engine; GPU sync is in tests/trainer/test_gpu.py",
)

PROMPTS = ([5, 17, 33, 2, 9], [100, 4, 8, 61])


def _serve(argv: list[str], health_url: str) -> subprocess.Popen:
    proc = subprocess.Popen(argv)
    try:
        wait_http_ok(health_url, timeout=180)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def engine_url(tiny_model_dir, tmp_path_factory) -> Iterator[str]:
    with engine_process(
        tiny_model_dir, tmp_path_factory.mktemp("engine"), "--engine-backend", "builtin"
    ) as engine:
        yield engine.url


@pytest.fixture(scope="module")
def router_url(engine_url) -> Iterator[str]:
    port = free_port()
    code = "import sys; from router.server import main; sys.exit(main(sys.argv[1:]))"
    proc = _serve([sys.executable, "-c", code, "--port", str(port)], f"http://127.0.0.1:{port}/health")
    httpx.post(
        f"http://127.0.0.1:{port}/add_worker", params={"url": engine_url}, timeout=30
    ).raise_for_status()
    yield f"http://127.0.0.1:{port}"
    _stop(proc)


@pytest.fixture(scope="module")
def trainer(tiny_model_dir) -> Iterator[TorchTrainer]:
    args = trainer_args(
        tiny_model_dir, "--lr", "5e-2", "--lr-decay-style", "constant", "--update-weight-buffer-size", "20000"
    )
    with TorchTrainer(args) as t:
        yield t


def engine_rollout(url: str) -> RolloutBatch:
    """Sample a continuation of each prompt and keep the engine's log-probs of the sampled tokens."""
    tokens, lengths, log_probs = [], [], []
    for prompt in PROMPTS:
        body = {
            "input_ids": prompt,
            "sampling_params": {"temperature": 1.0, "max_new_tokens": 6, "ignore_eos": True},
            "return_logprob": True,
        }
        out = httpx.post(f"{url}/generate", json=body, timeout=60).json()["meta_info"][
            "output_token_logprobs"
        ]
        tokens.append(prompt + [tok for _, tok, *_ in out])
        lengths.append(len(out))
        log_probs.append([lp for lp, *_ in out])
    return RolloutBatch(
        tokens=tokens,
        response_lengths=lengths,
        rewards=[0.0] * len(tokens),
        loss_masks=[[1] * n for n in lengths],
        rollout_log_probs=log_probs,
    )


def max_gap(trainer: TorchTrainer, batch: RolloutBatch) -> float:
    return max_gap_of(trainer.compute_log_probs(batch), batch)


def max_gap_of(ours: list[list[float]], batch: RolloutBatch) -> float:
    return max(
        abs(a - b)
        for mine, theirs in zip(ours, batch.rollout_log_probs, strict=True)
        for a, b in zip(mine, theirs, strict=True)
    )


@pytest.mark.parametrize("transport", ["distributed", "tensor", "disk", "distributed"])
def test_engine_serves_the_trainer_weights_after_each_transport(
    trainer, engine_url, router_url, transport, tmp_path
):
    trainer.train_step(random_batch(8, seed=len(transport)), rollout_id=trainer.weight_version)
    assert max_gap(trainer, engine_rollout(engine_url)) > 1e-3, "training should have moved the policy"

    report = trainer.update_weights(
        [engine_url], transport=transport, disk_dir=str(tmp_path), router_url=router_url
    )

    assert max_gap(trainer, engine_rollout(engine_url)) < 1e-5
    with EngineClient(engine_url) as engine:
        assert engine.get_weight_version() == report.version == str(trainer.weight_version)
    assert httpx.get(f"{router_url}/workers", timeout=10).json()["weight_version"] == report.version
    assert report.bytes == 4 * sum(p.numel() for p in _parameters(trainer))
    assert report.buckets > 1 and report.push_seconds > 0


def _parameters(trainer: TorchTrainer) -> list[torch.Tensor]:
    return list(trainer.actor._local.model.parameters())


def test_buckets_respect_the_buffer_size():
    assert plan_buckets([("a", 6), ("b", 6), ("c", 20), ("d", 1)], 12) == [["a", "b"], ["c"], ["d"]]
    with pytest.raises(ValueError, match="--update-weight-buffer-size"):
        plan_buckets([("a", 1)], 0)


def test_an_unreachable_engine_fails_with_its_url_and_takes_no_version(trainer):
    dead = f"http://127.0.0.1:{free_port()}"
    before = trainer.weight_version
    with pytest.raises(RuntimeError, match=dead):
        trainer.update_weights([dead], transport="tensor")
    # The push that retries it (after the engine is relaunched) publishes the next version, not the one after.
    assert trainer.weight_version == before


def _reset_engine(engine_url: str, model_dir) -> None:
    """Load the initial weights back into the engine (earlier tests pushed trained ones)."""
    httpx.post(
        f"{engine_url}/update_weights_from_disk", json={"model_path": str(model_dir)}, timeout=60
    ).raise_for_status()


def test_first_step_on_engine_rollouts_is_exactly_on_policy(tiny_model_dir, engine_url):
    _reset_engine(engine_url, tiny_model_dir)
    batch = engine_rollout(engine_url)
    args = trainer_args(
        tiny_model_dir, "--use-kl-loss", "--kl-loss-coef", "0.1", "--use-tis", rollout_batch_size=1
    )
    with TorchTrainer(args) as fresh:
        result = fresh.train_step(batch, rollout_id=0)
    first = result.steps[0]
    assert first["ppo_kl"] == 0.0 and first["pg_clipfrac"] == 0.0 and first["kl_loss"] == 0.0
    assert result.rollout["kl"] == 0.0
    # The engine's own kernels agree with the trainer to float rounding, so the TIS weights are ~1.
    assert result.rollout["train_rollout_logprob_abs_diff"] < 1e-6
    assert abs(first["tis"] - 1.0) < 1e-5 and first["tis_clipfrac"] == 0.0


@pytest.fixture(scope="module")
def on_policy_engine_url(tiny_model_dir, tmp_path_factory) -> Iterator[str]:
    """An engine in true on-policy mode (what ``--true-on-policy-mode`` starts), on two threads (the trainer: one)."""
    with engine_process(
        tiny_model_dir,
        tmp_path_factory.mktemp("on_policy_engine"),
        "--num-threads", "2", "--engine-backend", "builtin", "--sglang-rl-on-policy-target", "fsdp",
    ) as engine:  # fmt: skip
        yield engine.url


PROBE = [7, 3, 250, 12, 40, 41]
# Batch compositions the probe request runs in: alone, with a few others, and inside a busy batch where GRPO-style
# copies prefill together and requests leave at different steps.
COMPOSITIONS = [
    [(PROBE, 7)],
    [(PROBE, 7), (PROMPTS[0], 3), (PROMPTS[1], 9)],
    [
        (PROBE, 7),
        *[(PROMPTS[0], 2 + i) for i in range(4)],
        (list(range(30, 52)), 5),
        (PROMPTS[1], 11),
        ([9], 4),
    ],
]


def concurrent_rollout(url: str, requests: list[tuple[list[int], int]], temperature: float) -> RolloutBatch:
    """Send every ``(prompt, max_new_tokens)`` at once (request i seeded with i) and keep the engine's log-probs."""

    def one(i: int, prompt: list[int], max_new: int) -> list:
        params = {
            "temperature": temperature,
            "max_new_tokens": max_new,
            "ignore_eos": True,
            "sampling_seed": i,
        }
        body = {"input_ids": prompt, "sampling_params": params, "return_logprob": True}
        return httpx.post(f"{url}/generate", json=body, timeout=60).json()["meta_info"][
            "output_token_logprobs"
        ]

    with ThreadPoolExecutor(len(requests)) as pool:
        outs = list(pool.map(lambda item: one(item[0], *item[1]), enumerate(requests)))
    return RolloutBatch(
        tokens=[
            prompt + [tok for _, tok, *_ in out] for (prompt, _), out in zip(requests, outs, strict=True)
        ],
        response_lengths=[len(out) for out in outs],
        rewards=[0.0] * len(requests),
        loss_masks=[[1] * len(out) for out in outs],
        rollout_log_probs=[[lp for lp, *_ in out] for out in outs],
    )


def test_true_on_policy_engine_and_trainer_log_probs_are_bitwise_equal(tiny_model_dir, on_policy_engine_url):
    args = trainer_args(
        tiny_model_dir, "--true-on-policy-mode", "--rollout-temperature", "0.7", "--lr", "5e-2", "--lr-decay-style",
        "constant",
    )  # fmt: skip
    assert args.sglang_passthrough["rl_on_policy_target"] == "fsdp"
    with TorchTrainer(args) as exact:
        # Trained weights, pushed over the distributed transport: the engine no longer serves the checkpoint.
        exact.train_step(random_batch(8, seed=3), rollout_id=0)
        exact.update_weights([on_policy_engine_url], transport="distributed")
        probes = []
        for requests in COMPOSITIONS:
            batch = concurrent_rollout(on_policy_engine_url, requests, temperature=0.7)
            ours = exact.compute_log_probs(batch)
            for mine, theirs in zip(ours, batch.rollout_log_probs, strict=True):
                assert torch.equal(torch.tensor(mine), torch.tensor(theirs))
            probes.append((batch.tokens[0], batch.rollout_log_probs[0]))
    # The seeded probe came out the same in every batch it shared.
    assert all(probe == probes[0] for probe in probes)
