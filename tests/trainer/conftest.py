"""Fixtures for the trainer tests: one tiny Hugging Face model per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.core.tiny_model import build_tiny_model, default_corpus


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
