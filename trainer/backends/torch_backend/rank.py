"""Entry point of one training rank process: build the ``TrainWorker`` the trainer describes, then serve its calls.

Started by ``WorkerGroup`` as ``python -m trainer.backends.torch_backend.rank FD`` where FD is its end of a socket
pair with the trainer; exits when told to or when the trainer's end closes.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection

from trainer.backends.torch_backend.group import SHUTDOWN


def serve(argv: list[str], worker_class: Callable[[], type], service: str) -> int:
    """Receive the worker's settings on socket FD ``argv[0]``, build ``worker_class()(...)`` (imported only here,
    in the rank process), then answer the trainer's calls until told to stop or until its end closes."""
    conn = Connection(int(argv[0]))
    args, role, rank, world_size, dist_init, log_level = conn.recv()

    from services.core.logging_setup import setup_logging

    setup_logging(log_level, service=f"{service.format(role=role)}{rank}")
    try:
        worker = worker_class()(args, role=role, rank=rank, world_size=world_size, dist_init=dist_init)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return 1
    conn.send(("ok", None))
    while True:
        try:
            method, call_args, call_kwargs = conn.recv()
        except EOFError:
            # The trainer is gone; nobody will send another call.
            worker.shutdown()
            return 0
        if method == SHUTDOWN:
            worker.shutdown()
            conn.send(("ok", None))
            logging.shutdown()
            # Everything this rank owns is released; skip the interpreter teardown, which waits seconds on
            # library thread pools.
            os._exit(0)
        try:
            result = getattr(worker, method)(*call_args, **call_kwargs)
        except BaseException:
            conn.send(("error", traceback.format_exc()))
        else:
            conn.send(("ok", result))


def _train_worker() -> type:
    from trainer.backends.torch_backend.worker import TrainWorker

    return TrainWorker


def main(argv: list[str]) -> int:
    return serve(argv, _train_worker, service="trainer-{role}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
