"""Entry point of one Megatron rank process: ``python -m trainer.backends.megatron_backend.rank FD``, serving
``MegatronTrainWorker`` calls over its end of a socket pair with the torch backend's rank loop."""

from __future__ import annotations

import sys

from trainer.backends.torch_backend.rank import serve


def _megatron_worker() -> type:
    from trainer.backends.megatron_backend.worker import MegatronTrainWorker

    return MegatronTrainWorker


def main(argv: list[str]) -> int:
    return serve(argv, _megatron_worker, service="trainer-megatron")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
