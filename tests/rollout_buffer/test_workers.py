"""Rollout workers against a real engine (tiny model) and the real reward service: a worker killed with SIGKILL
mid-task has its tasks finished by another worker, each group stored once; partial samples are continued."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rollout_buffer import metrics
from rollout_buffer.arguments import parse_args
from rollout_buffer.store import BufferStore, StoreLimits
from rollout_buffer.tasks import BadTask, RolloutTask, submit_tasks, task_queue
from rollout_buffer.workers import RolloutWorker
from services.core.embedded_redis import EmbeddedRedis
from services.core.net import free_port
from services.core.redis_util import key
from services.core.sample import Sample
from services.core.supervisor import ServiceProcess

# Starts a model server and a reward server: tens of seconds on a busy machine.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A tiny model served by the built-in engine, and the reward service (f1) with gRPC."""
    root = tmp_path_factory.mktemp("stack")
    model = root / "model"
    engine_port, reward_port, reward_grpc = free_port(), free_port(), free_port()
    # Built in a child so that torch loads there, while the reward service starts beside it.
    builder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from services.core.tiny_model import build_tiny_model; build_tiny_model({str(model)!r})",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    engine = ServiceProcess(
        "engine",
        [
            sys.executable,
            "-m",
            "services.rollout_engine.server",
            "--hf-checkpoint",
            str(model),
            "--port",
            str(engine_port),
        ],
        health_url=f"http://127.0.0.1:{engine_port}/health",
        log_path=root / "engine.log",
    )
    reward = ServiceProcess(
        "reward",
        [
            sys.executable,
            "-m",
            "services.reward_model.server",
            "--rm-type",
            "f1",
            "--num-workers",
            "1",
            "--port",
            str(reward_port),
            "--grpc-port",
            str(reward_grpc),
        ],
        health_url=f"http://127.0.0.1:{reward_port}/health",
        log_path=root / "reward.log",
    )
    reward.start()
    try:
        assert builder.wait(180) == 0, "building the tiny model failed"
        engine.start()
        engine.wait_healthy(120)
        reward.wait_healthy(60)
        yield {
            "model": str(model),
            "engine_url": f"http://127.0.0.1:{engine_port}",
            "reward_grpc": f"127.0.0.1:{reward_grpc}",
        }
    finally:
        engine.stop()
        reward.stop()


def _worker_argv(stack: dict[str, str], redis_url: str, *extra: str) -> list[str]:
    return [
        "--redis-url",
        redis_url,
        "--hf-checkpoint",
        stack["model"],
        "--router-url",
        stack["engine_url"],
        "--reward-grpc-addr",
        stack["reward_grpc"],
        "--worker-reclaim-idle",
        "1",
        "--log-level",
        "WARNING",
        *extra,
    ]


def _task(group: int, max_new_tokens: int, samples: list[Sample] | None = None) -> RolloutTask:
    samples = samples or [
        Sample(group_index=group, index=group * 2 + i, prompt="2+2=", label="4", uid=f"g{group}-s{i}")
        for i in range(2)
    ]
    return RolloutTask(
        group_id=f"g{group}",
        rollout_id=0,
        samples=samples,
        sampling_params={"max_new_tokens": max_new_tokens, "temperature": 1.0, "ignore_eos": True},
        weight_version=0,
        task_type="math",
    )


async def _run_in_process(args, store: BufferStore, until) -> RolloutWorker:
    worker = RolloutWorker(args, store, run_id="default", concurrency=16, reclaim_idle_s=1.0)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    deadline = time.monotonic() + 60
    while not await until():
        assert time.monotonic() < deadline and not running.done(), "the worker did not finish the tasks"
        await asyncio.sleep(0.1)
    stop.set()
    await running
    return worker


async def _roll_out(args, store: BufferStore, redis_client, task: RolloutTask) -> list[Sample]:
    """Submit one task, let an in-process worker finish it, then lease and acknowledge its stored group."""
    await submit_tasks(redis_client, "default", [task])
    queue = task_queue(redis_client, "default")

    async def drained() -> bool:
        return (await store.stats("default")).complete_groups >= 1 and await queue.pending_count() == 0

    await _run_in_process(args, store, drained)
    [group] = (await store.lease("default", 5)).groups
    await store.ack("default", [group.lease_id])
    return [Sample.from_dict(item) for item in group.items]


async def test_a_worker_killed_mid_task_is_replaced_and_every_group_is_stored_once(
    stack: dict[str, str], redis_server: EmbeddedRedis, redis_client, tmp_path: Path
) -> None:
    tasks = [_task(g, max_new_tokens=96) for g in range(6)]
    await submit_tasks(redis_client, "default", tasks)
    queue = task_queue(redis_client, "default")
    doomed = ServiceProcess(
        "worker-a",
        [sys.executable, "-m", "rollout_buffer.workers", *_worker_argv(stack, redis_server.url)],
        log_path=tmp_path / "worker-a.log",
    ).start()
    try:
        deadline = time.monotonic() + 60
        while await queue.pending_count() < len(tasks):
            assert doomed.alive() and time.monotonic() < deadline, "worker A never took the tasks"
            await asyncio.sleep(0.05)
        doomed.kill()
    finally:
        doomed.stop()
    store = BufferStore(redis_client, StoreLimits())
    held_by_dead = await queue.pending_count()
    assert held_by_dead > 0, "worker A finished everything before it was killed"
    reclaimed_before = metrics.WORKER_RECLAIMED._value.get()

    async def all_done() -> bool:
        return await queue.pending_count() == 0

    args = parse_args(_worker_argv(stack, redis_server.url))
    await _run_in_process(args, store, all_done)
    assert metrics.WORKER_RECLAIMED._value.get() - reclaimed_before == held_by_dead

    groups = (await store.lease("default", 100)).groups
    assert sorted(g.instance_id for g in groups) == [f"g{i}" for i in range(6)]
    uids = [item["uid"] for g in groups for item in g.items]
    assert sorted(uids) == sorted(s.uid for t in tasks for s in t.samples)
    for group in groups:
        for sample in map(Sample.from_dict, group.items):
            assert sample.status == Sample.Status.TRUNCATED and sample.response_length == 96
            assert len(sample.rollout_log_probs) == 96 and len(sample.tokens) > 96
            assert sample.weight_versions == ["default"]
            assert isinstance(sample.reward, float) and 0.0 <= sample.reward <= 1.0
    assert await redis_client.xlen("slime:default:tasks:dead") == 0


async def test_partial_samples_are_continued_and_group_rm_scores_the_group(
    stack: dict[str, str], redis_server: EmbeddedRedis, redis_client
) -> None:
    args = parse_args(_worker_argv(stack, redis_server.url, "--group-rm"))
    store = BufferStore(redis_client, StoreLimits())
    fresh = Sample(prompt="1+1=", label="2", uid="fresh")
    first = RolloutTask(
        group_id="seed",
        rollout_id=0,
        samples=[fresh],
        sampling_params={"max_new_tokens": 3, "ignore_eos": True},
    )
    [partial] = await _roll_out(args, store, redis_client, first)
    assert partial.response_length == 3
    # Continue it as an aborted sample in a later rollout, beside a sample that is already finished.
    partial.status = Sample.Status.ABORTED
    done = Sample(
        prompt="x",
        response="y",
        response_length=1,
        tokens=[1, 2],
        reward=0.25,
        status="completed",
        uid="done",
    )
    later = RolloutTask(
        group_id="seed",
        rollout_id=1,
        samples=[partial, done],
        sampling_params={"max_new_tokens": 8, "ignore_eos": True},
    )
    continued, untouched = await _roll_out(args, store, redis_client, later)
    assert continued.uid == "fresh" and continued.response_length == 8
    assert continued.tokens[: len(partial.tokens)] == partial.tokens
    assert continued.rollout_log_probs[:3] == partial.rollout_log_probs
    assert continued.response.startswith(partial.response)
    assert untouched.tokens == [1, 2] and untouched.status == Sample.Status.COMPLETED
    # --group-rm: the reward service scored the whole group, the finished sample included.
    assert isinstance(continued.reward, float) and isinstance(untouched.reward, float)


def _engine_counts(engine_url: str) -> tuple[float, float]:
    """(HTTP POST /generate requests answered 200, generation requests finished) from the engine's /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    http_posts = finished = 0.0
    text = httpx.get(f"{engine_url}/metrics", timeout=10, trust_env=False).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == "slime_http_requests_total"
                and labels.get("route") == "/generate"
                and labels.get("status") == "200"
            ):
                http_posts += sample.value
            elif sample.name == "slime_rollout_engine_requests_total":
                finished += sample.value
    return http_posts, finished


async def test_fresh_samples_of_a_group_go_as_one_batch_and_keep_their_order(
    stack: dict[str, str], redis_server: EmbeddedRedis, redis_client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rollout_buffer import generate

    tokenized: list[str] = []
    tokenize = generate._tokenize_prompt

    def counting(args, sample):  # noqa: ANN001, ANN202 - the wrapped function's signature
        tokenized.append(sample.prompt)
        return tokenize(args, sample)

    monkeypatch.setattr(generate, "_tokenize_prompt", counting)
    args = parse_args(_worker_argv(stack, redis_server.url))
    store = BufferStore(redis_client, StoreLimits())
    # A partial sample (continued on its own) first, then four fresh ones (one batched request).
    seed = RolloutTask(
        group_id="batch",
        rollout_id=0,
        samples=[Sample(prompt="3+3=", label="6", uid="partial")],
        sampling_params={"max_new_tokens": 2, "ignore_eos": True},
    )
    [partial] = await _roll_out(args, store, redis_client, seed)
    partial.status = Sample.Status.ABORTED
    fresh = [Sample(prompt="1+2=", label="3", uid=f"fresh-{i}", index=i + 1) for i in range(4)]
    task = RolloutTask(
        group_id="batch",
        rollout_id=1,
        samples=[partial, *fresh],
        sampling_params={"max_new_tokens": 6, "temperature": 1.0, "ignore_eos": True},
    )
    posts_before, finished_before = _engine_counts(stack["engine_url"])
    samples = await _roll_out(args, store, redis_client, task)
    posts_after, finished_after = _engine_counts(stack["engine_url"])
    assert posts_after - posts_before == 2  # the continuation, and one batch for the four fresh samples
    assert finished_after - finished_before == 5

    assert [s.uid for s in samples] == ["partial", "fresh-0", "fresh-1", "fresh-2", "fresh-3"]
    assert samples[0].response_length == 6 and samples[0].tokens[: len(partial.tokens)] == partial.tokens
    for sample in samples[1:]:
        assert sample.response_length == 6 and len(sample.rollout_log_probs) == 6
        assert sample.status == Sample.Status.TRUNCATED and isinstance(sample.reward, float)
    # Sampled independently: the four answers to one prompt are not all the same.
    assert len({tuple(s.tokens) for s in samples[1:]}) > 1
    # The shared prompt was tokenized once for the batch, and every sample starts with its tokens.
    assert tokenized.count("1+2=") == 1
    prompt_tokens = samples[1].tokens[: len(samples[1].tokens) - 6]
    assert all(s.tokens[: len(prompt_tokens)] == prompt_tokens for s in samples[1:])


async def test_a_seeded_group_gives_each_sample_its_own_seed(
    stack: dict[str, str], redis_server: EmbeddedRedis, redis_client
) -> None:
    """Evaluation seeds its tasks (the same answers at every evaluation); the n samples of a prompt still differ."""
    args = parse_args(_worker_argv(stack, redis_server.url))
    store = BufferStore(redis_client, StoreLimits())

    async def answers(group_id: str) -> list[tuple[int, ...]]:
        task = RolloutTask(
            group_id=group_id,
            rollout_id=0,
            samples=[Sample(prompt="5+5=", label="10", uid=f"{group_id}-{i}", index=i) for i in range(4)],
            sampling_params={
                "max_new_tokens": 8,
                "temperature": 1.0,
                "ignore_eos": True,
                "sampling_seed": 11,
            },
        )
        return [tuple(sample.tokens) for sample in await _roll_out(args, store, redis_client, task)]

    first, again = await answers("seeded-a"), await answers("seeded-b")
    assert len(set(first)) > 1  # not one answer four times
    assert first == again  # and the same four answers for the same seed


async def test_a_restarted_driver_generates_again_what_its_predecessor_trained_on(
    stack: dict[str, str], redis_server: EmbeddedRedis, redis_client
) -> None:
    """A group written and acknowledged (trained on) by a driver that then died before its checkpoint: the same task
    retried is already done, but the resuming driver's (the next attempt) is generated and stored anew."""
    args = parse_args(_worker_argv(stack, redis_server.url))
    store = BufferStore(redis_client, StoreLimits())
    first = await _roll_out(args, store, redis_client, _task(7, max_new_tokens=4))
    assert (
        len(first) == 2
        and await redis_client.exists(*(key("default", "buf", "uid", f"g7-s{i}@0") for i in range(2))) == 2
    )
    retried = _task(7, max_new_tokens=4)
    assert await store.group_done("default", retried.token)

    resumed = _task(7, max_new_tokens=4)
    resumed.attempt = 1
    assert resumed.token == "g7@0.1" and not await store.group_done("default", resumed.token)
    again = await _roll_out(args, store, redis_client, resumed)
    assert len(again) == 2
    assert await redis_client.exists(*(key("default", "buf", "uid", f"g7-s{i}@0.1") for i in range(2))) == 2
    assert RolloutTask.from_fields(resumed.to_fields()).attempt == 1
    with pytest.raises(BadTask, match="task.attempt: must be a non-negative integer"):
        RolloutTask.from_fields({"task": '{"group_id": "g", "samples": [{}], "attempt": -1}'})
