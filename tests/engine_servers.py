"""Built-in rollout engine servers for tests: ``python -m services.rollout_engine.server`` on a free loopback port,
its output in a log file, stopped (with its whole session) when the block ends."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from services.core.net import free_port, wait_http_ok

REPO = Path(__file__).resolve().parents[1]


@dataclass
class EngineProcess:
    url: str
    popen: subprocess.Popen
    log: Path

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout, trust_env=False)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def engine_process(
    model_dir: Path,
    log_dir: Path,
    *extra: str,
    ready_path: str = "/health",
    env: dict[str, str] | None = None,
) -> Iterator[EngineProcess]:
    """Run ``python -m services.rollout_engine.server`` on a free port until the block ends."""
    port = free_port()
    log = log_dir / f"engine-{port}.log"
    argv = [
        sys.executable,
        "-m",
        "services.rollout_engine.server",
        "--hf-checkpoint",
        str(model_dir),
        "--port",
        str(port),
        "--num-threads",
        "1",
        *extra,
    ]
    with log.open("wb") as out:
        popen = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    proc = EngineProcess(url=f"http://127.0.0.1:{port}", popen=popen, log=log)
    try:
        try:
            wait_http_ok(proc.url + ready_path, timeout=120)
        except TimeoutError as exc:
            raise RuntimeError(f"engine did not start:\n{proc.log_tail()}") from exc
        yield proc
    finally:
        if popen.poll() is None:
            # The whole session: a supervisor takes its child with it.
            os.killpg(popen.pid, signal.SIGTERM)
            try:
                popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(popen.pid, signal.SIGKILL)
                popen.wait()
