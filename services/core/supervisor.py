"""Child service processes that cannot outlive their parent: started, health-checked, stopped, restarted.

Used by the embedded stack (the driver starts every service on loopback) and by the SGLang supervisor. Each child
gets ``PR_SET_PDEATHSIG`` (through ``services.core.child``) so that even a parent killed with SIGKILL leaves no
orphan, and an ``atexit`` stop for the ordinary exits.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

import httpx

from services.core.child import wrap

logger = logging.getLogger(__name__)


def usable_cpus() -> int:
    """The CPUs this process (and the children it starts) may run on: its affinity mask, which containers and
    ``taskset`` narrow, else every core."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


_LIVE: weakref.WeakSet[ServiceProcess] = weakref.WeakSet()


def _stop_all() -> None:
    for proc in list(_LIVE):
        with contextlib.suppress(Exception):
            proc.stop(timeout=5)


atexit.register(_stop_all)


class ServiceProcess:
    """One child process running a service, with its output in ``log_path`` and a health URL to wait on."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        health_url: str | None = None,
        log_path: str | Path | None = None,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
    ):
        self.name = name
        self.argv = list(argv)
        self.health_url = health_url
        self.log_path = Path(log_path) if log_path else None
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.popen: subprocess.Popen | None = None
        self._log_file = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> ServiceProcess:
        with self._lock:
            if self.alive():
                return self
            if self.log_path:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                self._log_file = self.log_path.open("ab")
            out = self._log_file if self._log_file else subprocess.DEVNULL
            self.popen = subprocess.Popen(
                wrap(self.argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
            _LIVE.add(self)
            logger.debug("started %s (pid %d): %s", self.name, self.popen.pid, " ".join(self.argv))
            return self

    def wait_healthy(self, timeout: float) -> None:
        """Block until ``health_url`` answers 200; fail early, with the log's tail, if the child exits."""
        if self.health_url is None:
            return
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while True:
                if not self.alive():
                    raise RuntimeError(f"{self.name} exited with code {self.popen.returncode}{self._tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.health_url).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self.name} not healthy at {self.health_url} after {timeout:.0f}s{self._tail()}"
                    )
                time.sleep(0.1)

    def _tail(self, lines: int = 20) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"; last log lines of {self.log_path}:\n" + "\n".join(text)

    def kill(self) -> None:
        """SIGKILL the child (its whole process group), as a crash would."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        if self.popen is None:
            return
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._log_file:
            self._log_file.close()
            self._log_file = None
        _LIVE.discard(self)

    def restart(self, health_timeout: float = 120.0) -> None:
        self.stop()
        self.start()
        self.wait_healthy(health_timeout)
