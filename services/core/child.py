"""Exec wrapper that ties a child process to its parent: ``python -m services.core.child PARENT_PID -- CMD ...``.

It sets ``PR_SET_PDEATHSIG(SIGKILL)``, exits if the parent is already gone, then ``exec``s the command, which keeps
the death signal. Doing this after ``exec`` instead of in a ``preexec_fn`` means no Python code runs between fork
and exec in the parent's image: a parent that already runs gRPC threads (the trainer) would otherwise abort its
children in gRPC's fork handlers.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def wrap(argv: list[str]) -> list[str]:
    """The command line that runs ``argv`` as a child that dies with this process."""
    return [sys.executable, "-m", "services.core.child", str(os.getpid()), "--", *argv]


def main() -> None:
    parent = int(sys.argv[1])
    if sys.argv[2] != "--" or len(sys.argv) < 4:
        raise SystemExit("usage: python -m services.core.child PARENT_PID -- COMMAND [ARGS...]")
    command = sys.argv[3:]
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        raise SystemExit(f"parent {parent} exited before {command[0]} started")
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
