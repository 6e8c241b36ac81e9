"""``--offload`` (and ``--colocate``, which implies it): slime's sleep and wake of the trainer and the engines, so
that the engines hold the GPUs while they generate and the trainer while it trains.

The synchronous driver runs, as slime's ``train.py`` does:

- at start-up, before the trainer is built: every engine releases its memory;
- after each rollout: every engine releases its memory; the trainer is back on its devices for training
  (``TorchTrainer`` onloads itself before any pass that needs the model);
- each weight push: the trainer offloads → engines resume ``weights`` → the push → engines resume
  ``cuda_graph``, then ``kv_cache`` → generation.

``train-async`` keeps engines and trainer resident (slime's ``train_async.py`` has no offload calls).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from trainer.weight_sync.engine_client import EngineClient

logger = logging.getLogger(__name__)

T = TypeVar("T")

# slime's onload order after the weights: captured graphs first, then the KV cache.
RESUME_AFTER_PUSH = (["cuda_graph"], ["kv_cache"])


class EngineMemory:
    """Release and resume the engines' memory (``/release_memory_occupation``, ``/resume_memory_occupation``) around
    the trainer's offload and weight push."""

    def __init__(self, *, auth_token: str | None = None) -> None:
        self.auth_token = auth_token
        self.asleep = False

    def _on_all(self, urls: Sequence[str], action: Callable[[EngineClient], None]) -> list[BaseException]:
        def run(url: str) -> None:
            with EngineClient(url, auth_token=self.auth_token) as client:
                action(client)

        with ThreadPoolExecutor(max_workers=max(1, len(urls))) as pool:
            futures = [pool.submit(run, url) for url in urls]
        return [f.exception() for f in futures if f.exception() is not None]

    def release(self, urls: Sequence[str]) -> None:
        """Every engine frees weights, KV cache and CUDA graphs. An engine that cannot be reached holds nothing;
        it is logged and skipped (fault tolerance restarts it before the next push)."""
        for error in self._on_all(urls, lambda client: client.release_memory_occupation(None)):
            logger.warning("--offload: releasing engine memory: %s", error)
        self.asleep = True

    def resume(self, urls: Sequence[str], tags: list[str]) -> None:
        errors = self._on_all(urls, lambda client: client.resume_memory_occupation(tags))
        if errors:
            raise errors[0]

    def push_weights(self, urls: Sequence[str], trainer: Any, push: Callable[[], T]) -> T:
        """The trainer offloads; sleeping engines get their weights back, then ``push()``, then the rest."""
        offload = getattr(trainer, "offload", None)
        if offload is not None:
            offload()
        else:
            logger.debug("--offload: %s keeps its memory during rollouts", type(trainer).__name__)
        if not self.asleep:
            return push()
        self.resume(urls, ["weights"])
        result = push()
        for tags in RESUME_AFTER_PUSH:
            self.resume(urls, tags)
        self.asleep = False
        return result
