"""Fixtures for the trainer tests: one tiny Hugging Face model per session, single-threaded torch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from services.core.tiny_model import build_tiny_model, default_corpus


@pytest.fixture(scope="session", autouse=True)
def single_threaded_torch() -> Iterator[None]:
    # Tiny matrices gain nothing from intra-op threads, and on a shared two-core host the thread pool's
    # synchronisation makes every op wait for busy cores (10x slower under load).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny",
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        corpus=default_corpus(lines=200),
    )
