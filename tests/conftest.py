"""Fixtures shared by every test package: a real Redis per test and a free loopback port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.core import net
from services.core.embedded_redis import EmbeddedRedis


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A fresh ``redis-server`` on a free port, without persistence, stopped after the test."""
    with EmbeddedRedis(dir=tmp_path / "redis") as server:
        yield server


@pytest.fixture
def redis_server_aof(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A fresh ``redis-server`` with AOF persistence (``appendfsync everysec``), stopped after the test."""
    with EmbeddedRedis(dir=tmp_path / "redis-aof", appendonly=True) as server:
        yield server


@pytest.fixture(name="free_port")
def free_port_fixture() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (see ``services.core.net.free_port``)."""
    return net.free_port()
