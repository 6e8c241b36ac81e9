"""Entry point of one Megatron rank process: ``python -m trainer.backends.megatron_backend.rank FD``, serving
``MegatronTrainWorker`` calls over its end of a socket pair, as the torch backend's ranks do."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from multiprocessing.connection import Connection

from trainer.backends.torch_backend.group import SHUTDOWN


def main(argv: list[str]) -> int:
    conn = Connection(int(argv[0]))
    args, role, rank, world_size, dist_init, log_level = conn.recv()

    from services.core.logging_setup import setup_logging
    from trainer.backends.megatron_backend.worker import MegatronTrainWorker

    setup_logging(log_level, service=f"trainer-megatron{rank}")
    try:
        worker = MegatronTrainWorker(args, role=role, rank=rank, world_size=world_size, dist_init=dist_init)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return 1
    conn.send(("ok", None))
    while True:
        try:
            method, call_args, call_kwargs = conn.recv()
        except EOFError:
            worker.shutdown()
            return 0
        if method == SHUTDOWN:
            worker.shutdown()
            conn.send(("ok", None))
            logging.shutdown()
            os._exit(0)
        try:
            result = getattr(worker, method)(*call_args, **call_kwargs)
        except BaseException:
            conn.send(("error", traceback.format_exc()))
        else:
            conn.send(("ok", result))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
