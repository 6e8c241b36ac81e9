"""``--use-distributed-post``: how many rollout workers post, and what a real Redis says consumed the task stream."""

from __future__ import annotations

import logging

import pytest

from rollout_buffer.tasks import RolloutTask, submit_tasks, task_queue
from services.core.arguments import parse_args
from services.core.embedded_redis import EmbeddedRedis
from services.core.redis_util import redis_from_url
from services.core.sample import Sample
from trainer.rollout import distributed_post
from trainer.rollout.distributed_post import live_posters, poster_count, warn_if_single_poster

BASE = ["--train-backend", "fsdp", "--rollout-batch-size", "2", "--num-rollout", "1"]


def test_poster_count_follows_num_gpus_per_node_and_rejects_zero() -> None:
    assert poster_count(parse_args(BASE)) == 1
    assert poster_count(parse_args([*BASE, "--use-distributed-post"])) == 8  # slime's default per node
    assert poster_count(parse_args([*BASE, "--use-distributed-post", "--num-gpus-per-node", "3"])) == 3
    with pytest.raises(ValueError, match="--num-gpus-per-node"):
        poster_count(parse_args([*BASE, "--use-distributed-post", "--num-gpus-per-node", "0"]))


async def test_live_posters_are_the_workers_that_took_tasks(
    redis_server: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    redis = redis_from_url(redis_server.url)
    try:
        tasks = [
            RolloutTask(group_id=f"r0-g{i}", rollout_id=0, samples=[Sample(uid=f"s{i}")], sampling_params={})
            for i in range(3)
        ]
        await submit_tasks(redis, "run", tasks)
        queue = task_queue(redis, "run")
        await queue.read("hosta-101-aaaaaa", count=1)
        args = parse_args([*BASE, "--use-distributed-post", "--run-id", "run"])
        one = await live_posters(redis, "run")
        assert one.consumers == ("hosta-101-aaaaaa",)
        with caplog.at_level(logging.WARNING, logger=distributed_post.__name__):
            warn_if_single_poster(args, one, tasks=3)
            warn_if_single_poster(args, one, tasks=3)
        assert caplog.text.count("--use-distributed-post: one rollout worker") == 1

        await queue.read("hostb-202-bbbbbb", count=1)
        await queue.read("hostb-203-cccccc", count=1)
        three = await live_posters(redis, "run")
        assert len(three) == 3 and three.hosts == ("hosta", "hostb")
    finally:
        await redis.aclose()
