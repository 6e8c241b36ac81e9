"""Loopback networking helpers: pick a free TCP port, wait for a port or an HTTP endpoint to come up, and a shared
TLS context for short-lived HTTP clients."""

from __future__ import annotations

import functools
import socket
import ssl
import time

import httpx


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One default TLS context per process, for ``httpx.Client(verify=...)``: httpx otherwise builds (and loads
    the CA bundle into) a new one for every client, about 0.1 s of CPU each, even for plain-HTTP loopback calls."""
    return ssl.create_default_context()


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that nothing listens on right now (the kernel's choice for an ephemeral bind).

    Another process may take the port before the caller binds it; callers that start servers retry on a
    bind failure rather than trusting the port blindly.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_port(host: str, port: int, timeout: float, interval: float = 0.05) -> None:
    """Block until a TCP connection to ``host:port`` succeeds; raise ``TimeoutError`` naming it otherwise."""
    deadline = time.monotonic() + timeout
    last_error: OSError | None = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(interval, 0.5)):
                return
        except OSError as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{host}:{port} did not accept connections within {timeout:g}s (last error: {last_error})"
            )
        time.sleep(interval)


def wait_http_ok(url: str, timeout: float, interval: float = 0.1) -> None:
    """Block until ``GET url`` answers 2xx; raise ``TimeoutError`` naming the URL and the last answer otherwise."""
    deadline = time.monotonic() + timeout
    last: str = "no answer"
    with httpx.Client(timeout=max(interval, 1.0), trust_env=False) as client:
        while True:
            try:
                response = client.get(url)
                if response.is_success:
                    return
                last = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{url} did not answer 2xx within {timeout:g}s (last: {last})")
            time.sleep(interval)
