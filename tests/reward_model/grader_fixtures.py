"""Module-level functions the grader pool tests run in worker processes (workers import them by reference)."""

from __future__ import annotations

import math
import os
import time


def add(a: int, b: int) -> int:
    return a + b


def worker_pid() -> int:
    return os.getpid()


def sleep_then(seconds: float, value: object) -> object:
    time.sleep(seconds)
    return value


def hang() -> None:
    while True:
        time.sleep(0.05)


def spin_in_c() -> int:
    # A huge factorial runs inside C without releasing the GIL: no Python thread of the worker can run meanwhile.
    return math.factorial(10**9)


def fail(message: str) -> None:
    raise ValueError(message)


def die(code: int) -> None:
    os._exit(code)
