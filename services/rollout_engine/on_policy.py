"""True on-policy log-probs (``--sglang-rl-on-policy-target fsdp``, set for the engines by the trainer's
``--true-on-policy-mode``): the log-probs the engine returns for a request's output tokens are recomputed, once the
request finishes, by the Hugging Face forward of that sequence alone — the computation the torch trainer runs in
that mode — so that engine and trainer agree bit for bit instead of to float rounding.

The batched decode path, whose kernels and shapes depend on what else is running, still picks the tokens; only
the reported log-probs come from the batch-invariant pass. Its model is a Hugging Face skeleton on the meta device
whose parameters are bound, per call, to views of the engine's own (fused) weights: it costs no weight memory and
always sees the current weights.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from services.core.logprobs import token_log_probs
from services.rollout_engine.model import CausalLM

ON_POLICY_TARGETS = ("fsdp",)


def _real_buffers(skeleton: nn.Module, device: torch.device) -> None:
    """Rebuild the modules whose buffers a meta-device construction left without data (the rotary embedding's
    inverse frequencies), on ``device``, with Hugging Face's own initialisation."""
    owners = {name.rpartition(".")[0] for name, buffer in skeleton.named_buffers() if buffer.is_meta}
    for owner in sorted(owners):
        parent_name, _, attr = owner.rpartition(".")
        parent = skeleton.get_submodule(parent_name)
        module = getattr(parent, attr)
        with torch.device(device):
            setattr(parent, attr, type(module)(config=skeleton.config))


class OnPolicyScorer:
    """Per-sequence, unpadded Hugging Face forward over the engine's weights, and the trainer's log-prob math."""

    def __init__(self, model: CausalLM, model_path: str):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model = model
        config = AutoConfig.from_pretrained(model_path)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=model.dtype)
        skeleton.config.use_cache = False
        skeleton.eval()
        _real_buffers(skeleton, model.device)
        self.skeleton = skeleton
        missing = {name for name, _ in skeleton.named_parameters()} - set(model.param_targets())
        if missing:
            raise ValueError(
                f"{model_path}: the engine has no weights for {sorted(missing)[:5]}, so it cannot run the "
                "Hugging Face forward of --sglang-rl-on-policy-target"
            )

    def output_log_probs(self, ids: list[int], num_outputs: int, temperature: float) -> list[float]:
        """Log-probs of the last ``num_outputs`` tokens of ``ids`` under ``log_softmax(logits / temperature)``
        (``temperature`` 0, greedy, scores the plain logits as the sampler does).

        On CPU the forward runs on one thread: PyTorch's CPU kernels may split a reduction differently with the
        number of threads, and a two-threaded scorer was seen to differ from the trainer in the last bit of a
        log-prob (AMD EPYC, torch 2.13), while the single-threaded one matched trainers on one and two threads."""
        if self.model.device.type != "cpu":
            return self._output_log_probs(ids, num_outputs, temperature)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._output_log_probs(ids, num_outputs, temperature)
        finally:
            torch.set_num_threads(threads)

    @torch.inference_mode()
    def _output_log_probs(self, ids: list[int], num_outputs: int, temperature: float) -> list[float]:
        device = self.model.device
        input_ids = torch.tensor(ids, dtype=torch.long, device=device).unsqueeze(0)
        position_ids = torch.arange(len(ids), dtype=torch.long, device=device).unsqueeze(0)
        params = {name: target.view() for name, target in self.model.param_targets().items()}
        out = functional_call(
            self.skeleton,
            params,
            (),
            {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False},
            strict=False,
        )
        # Exactly the trainer's slice: logits at j predict token j + 1.
        length = len(ids)
        logits = out.logits[0][length - num_outputs - 1 : length - 1]
        log_probs, _ = token_log_probs(
            logits, input_ids[0, length - num_outputs :], temperature=temperature or 1.0
        )
        return log_probs.tolist()
