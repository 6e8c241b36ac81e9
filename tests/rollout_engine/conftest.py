"""Fixtures for the rollout-engine tests: a tiny model on disk, its Hugging Face reference, and real engine
server processes on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from services.core.tiny_model import build_tiny_model
from tests.engine_servers import EngineProcess, engine_process


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", seed=0)


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture and tokenizer, other weights: the target of weight updates."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2-seed1", seed=1)


@pytest.fixture(scope="session")
def reference(tiny_model_dir: Path):
    """The Hugging Face model the engine must agree with (fp32, CPU)."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def engine(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    """One built-in engine server shared by the generation tests. Its small prefill chunk makes longer prompts
    (and bursts of requests) take several scheduler iterations, so chunked prefill is exercised too."""
    logs = tmp_path_factory.mktemp("engine-logs")
    with engine_process(tiny_model_dir, logs, "--sglang-chunked-prefill-size", "64") as proc:
        yield proc


@pytest.fixture(scope="session")
def start_engine(tmp_path_factory: pytest.TempPathFactory):
    """``start_engine(model_dir, *flags)``: a context manager running one more engine server."""
    log_dir = tmp_path_factory.mktemp("more-engine-logs")

    def start(model_dir: Path, *extra: str, ready_path: str = "/health", env: dict[str, str] | None = None):
        return engine_process(model_dir, log_dir, *extra, ready_path=ready_path, env=env)

    return start


@pytest.fixture(scope="session")
def teacher_forced():
    return teacher_forced_logprobs


@pytest.fixture(scope="session")
def greedy_reference():
    return hf_greedy


def teacher_forced_logprobs(model, prompt: list[int], output: list[int], temperature: float) -> torch.Tensor:
    """log p(output[i] | prompt + output[:i]) of ``model`` on the temperature-scaled distribution."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0, len(prompt) - 1 : -1].float()
    scaled = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
    return scaled.gather(1, torch.tensor(output).unsqueeze(1)).squeeze(1)


def hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()
