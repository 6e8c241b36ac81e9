"""Child service processes: health waiting, early-exit errors, and no orphans when the parent is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from services.core.supervisor import ServiceProcess


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_waits_for_health_then_stops(tmp_path: Path) -> None:
    port = _port()
    proc = ServiceProcess(
        "http",
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        health_url=f"http://127.0.0.1:{port}/",
        log_path=tmp_path / "http.log",
        cwd=tmp_path,
    ).start()
    proc.wait_healthy(timeout=20)
    pid = proc.pid
    assert _pid_alive(pid)
    proc.stop(timeout=5)
    assert not _pid_alive(pid)


def test_child_that_exits_fails_fast_with_its_log(tmp_path: Path) -> None:
    proc = ServiceProcess(
        "broken",
        [sys.executable, "-c", "import sys; print('bad flag --x'); sys.exit(3)"],
        health_url="http://127.0.0.1:9/health",
        log_path=tmp_path / "broken.log",
    ).start()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with code 3") as info:
        proc.wait_healthy(timeout=30)
    assert "bad flag --x" in str(info.value)
    assert time.monotonic() - start < 10


def test_no_orphan_when_parent_is_sigkilled(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    parent_code = textwrap.dedent(
        f"""
        import sys, time
        from services.core.supervisor import ServiceProcess
        p = ServiceProcess("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"]).start()
        open({str(pid_file)!r}, "w").write(str(p.pid))
        time.sleep(600)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=Path(__file__).resolve().parents[2])
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "parent never started its child"
        time.sleep(0.05)
    child = int(pid_file.read_text())
    assert _pid_alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while _pid_alive(child):
        assert time.monotonic() < deadline, "child outlived its SIGKILLed parent"
        time.sleep(0.05)
