"""Fixtures of the rollout-buffer tests: a store on a real Redis, and the buffer app served by a real uvicorn."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from rollout_buffer.server import BufferConfig
from rollout_buffer.store import BufferStore, StoreLimits
from services.core.embedded_redis import EmbeddedRedis
from services.core.redis_util import redis_from_url
from tests.rollout_buffer.helpers import ServedBuffer, serve


@pytest.fixture
async def redis_client(redis_server: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    client = redis_from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
async def make_store(redis_client: aioredis.Redis) -> AsyncIterator[Callable[..., BufferStore]]:
    stores: list[BufferStore] = []

    def make(**limits: Any) -> BufferStore:
        stores.append(BufferStore(redis_client, StoreLimits(**limits)))
        return stores[-1]

    yield make
    for store in stores:
        await store.aclose()


@pytest.fixture
def buffer_config(redis_server: EmbeddedRedis) -> BufferConfig:
    """Group size 2, small capacity and body limits, so that tests reach them with a few items."""
    return BufferConfig(
        redis_url=redis_server.url,
        limits=StoreLimits(group_size=2, max_items=50, lease_timeout_s=30),
        max_body_bytes=64 << 10,
        housekeeping_interval_s=0.1,
    )


@pytest.fixture
def buffer(buffer_config: BufferConfig) -> Iterator[ServedBuffer]:
    with serve(buffer_config) as served:
        yield served
