"""The training arithmetic of one quick-start RL step, apart from generation and the services: slime's torch
backend against the same passes laid out as TRL's ``GRPOTrainer`` lays them out, same model, same samples, same
threads, in one invocation.

    python bench/bench_step_floor.py [--rounds 3] [--steps 8]

The batch is the demo's: the first 16 prompts of ``examples/quickstart/train.jsonl`` through the chat template,
8 answers each (the boxed answer and the end-of-turn token, half of them off by one), rewards 1 for a right answer
and 0 for a wrong one.

- slime: ``TorchTrainer.train_step`` with the demo's flags (``trainer.demo.demo_flags``): a group's prompt packed
  once with its 8 answers attending to it, the reference model's pass, the GRPO loss with the ``low_var_kl`` loss,
  AdamW, gradient clipping at 1.0.
- padded (TRL's layout): every sequence left-padded to the batch's longest prompt and right-padded to its longest
  answer, a no-grad forward of the reference model and a forward and backward of the policy over all of them
  (logits kept for the answer positions only, as TRL's ``logits_to_keep`` does), the GRPO token loss with TRL's
  k3 KL term (``beta`` 0.05), gradient clipping at 1.0, AdamW.

Each round times ``--steps`` steps of each (after two warm-up steps each), alternating; the medians of each round
are printed with the ratio. What it bounds: ``bench/bench_trl.py``'s seconds per step for ``slime train`` are at
least this training step plus the rollout and the weight push.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainer.quickstart.task import boxed  # noqa: E402

PROMPTS = 16
GROUP = 8
KL_COEF = 0.05


def demo_samples(tokenizer, rows: list[dict]) -> tuple[list[list[int]], list[int], list[float]]:
    """(tokens, response lengths, rewards) of 8 answers to each prompt row (``{"prompt", "label"}`` of
    ``train.jsonl``), through the chat template as the demo's engines see them, half of the answers off by one."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokens, lengths, rewards = [], [], []
    for row in rows:
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        prompt = tokenizer(chat, add_special_tokens=False)["input_ids"]
        for k in range(GROUP):
            right = k % 2 == 0
            text = boxed(int(row["label"]) + (0 if right else 1))
            response = [*tokenizer(text, add_special_tokens=False)["input_ids"], eos]
            tokens.append([*prompt, *response])
            lengths.append(len(response))
            rewards.append(1.0 if right else 0.0)
    return tokens, lengths, rewards


class PaddedStep:
    """One GRPO step in TRL's layout: left-padded prompts, right-padded answers, a reference forward, the policy's
    forward and backward, the k3 KL term, AdamW."""

    def __init__(self, model_dir: Path, tokens, lengths, rewards, pad_id: int):
        from transformers import AutoModelForCausalLM

        self.policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.reference = copy.deepcopy(self.policy).eval()
        self.policy.train()
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=1e-3, weight_decay=0.0)
        prompts = [seq[: len(seq) - n] for seq, n in zip(tokens, lengths, strict=True)]
        answers = [seq[len(seq) - n :] for seq, n in zip(tokens, lengths, strict=True)]
        p_len, a_len = max(map(len, prompts)), max(map(len, answers))
        rows, mask, answer_mask = [], [], []
        for p, a in zip(prompts, answers, strict=True):
            rows.append([pad_id] * (p_len - len(p)) + p + a + [pad_id] * (a_len - len(a)))
            mask.append([0] * (p_len - len(p)) + [1] * (len(p) + len(a)) + [0] * (a_len - len(a)))
            answer_mask.append([1] * len(a) + [0] * (a_len - len(a)))
        self.input_ids = torch.tensor(rows)
        self.attention_mask = torch.tensor(mask)
        self.answer_ids = self.input_ids[:, p_len:]
        self.answer_mask = torch.tensor(answer_mask, dtype=torch.float32)
        self.keep = a_len + 1
        grouped = torch.tensor(rewards).view(-1, GROUP)
        std = grouped.std(dim=1, keepdim=True)
        self.advantages = ((grouped - grouped.mean(dim=1, keepdim=True)) / (std + 1e-4)).view(-1, 1)

    def _log_probs(self, model) -> torch.Tensor:
        logits = model(
            input_ids=self.input_ids, attention_mask=self.attention_mask, logits_to_keep=self.keep
        ).logits[:, :-1]
        return torch.log_softmax(logits, dim=-1).gather(-1, self.answer_ids.unsqueeze(-1)).squeeze(-1)

    def __call__(self) -> None:
        with torch.no_grad():
            ref = self._log_probs(self.reference)
        logp = self._log_probs(self.policy)
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        per_token = -torch.exp(logp - logp.detach()) * self.advantages + KL_COEF * kl
        loss = ((per_token * self.answer_mask).sum(dim=1) / self.answer_mask.sum(dim=1)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def timed(fn, n: int) -> float:
    """Median seconds of ``n`` calls of ``fn``."""
    seconds = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed steps of each per round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--quickstart-dir", type=Path, default=ROOT / "examples" / "quickstart")
    opts = parser.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    from transformers import AutoTokenizer

    from services.core.arguments import parse_args
    from trainer.backends.batch import RolloutBatch
    from trainer.backends.torch_backend import TorchTrainer
    from trainer.demo import demo_flags

    model_dir = opts.quickstart_dir / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lines = (opts.quickstart_dir / "train.jsonl").read_text(encoding="utf-8").splitlines()
    tokens, lengths, rewards = demo_samples(tokenizer, [json.loads(line) for line in lines[:PROMPTS]])
    batch = RolloutBatch(
        tokens=tokens, response_lengths=lengths, rewards=rewards, loss_masks=[[1] * n for n in lengths]
    )
    padded = PaddedStep(model_dir, tokens, lengths, rewards, tokenizer.pad_token_id or 0)
    slime_args = parse_args([*demo_flags(opts.quickstart_dir), "--num-rollout", "1000"])
    step_id = 0
    with TorchTrainer(slime_args) as trainer:

        def slime_step() -> None:
            nonlocal step_id
            trainer.train_step(batch, rollout_id=step_id)
            step_id += 1

        for fn in (slime_step, padded):
            timed(fn, 2)
        rounds = [(timed(slime_step, opts.steps), timed(padded, opts.steps)) for _ in range(opts.rounds)]

    real = sum(map(len, tokens))
    grid = padded.input_ids.numel()
    prompts = sum(len(seq) - n for seq, n in zip(tokens[::GROUP], lengths[::GROUP], strict=True))
    packed = prompts + sum(lengths)
    print(
        f"\none RL step's training arithmetic, {PROMPTS} prompts x {GROUP} answers, "
        f"{torch.get_num_threads()} torch threads"
    )
    print(f"tokens: {real} in the samples, {packed} packed by slime, {grid} in the padded grid")
    print("| round | slime train_step s | padded (TRL's layout) s | padded / slime |")
    print("|---|---|---|---|")
    for i, (ours, theirs) in enumerate(rounds, 1):
        print(f"| {i} | {ours:.3f} | {theirs:.3f} | {theirs / ours:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
