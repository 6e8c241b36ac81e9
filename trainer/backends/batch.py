"""The training input of one rollout: slime's ``train_data`` dict as a typed, validated dataclass.

``RolloutBatch.from_samples`` is slime's ``_convert_samples_to_train_data``: it post-processes rewards (group
normalisation or ``--custom-reward-post-process-path``), defaults missing loss masks to all ones and checks every
per-sample field against the response length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from trainer.algorithms.rewards import normalize_group_rewards


def normalized_rewards(args: Any, raw_rewards: Sequence[float]) -> list[float]:
    """The rewards the advantage estimator uses: group-normalised as the flags say (slime's default post-processing)."""
    return normalize_group_rewards(
        raw_rewards,
        n_samples_per_prompt=args.n_samples_per_prompt,
        advantage_estimator=args.advantage_estimator,
        rewards_normalization=args.rewards_normalization,
        grpo_std_normalization=args.grpo_std_normalization,
    )


@dataclass
class RolloutBatch:
    """Per-sample lists, all of the same length; a prompt's samples are adjacent (``n_samples_per_prompt`` each)."""

    tokens: list[list[int]]
    response_lengths: list[int]
    rewards: list[float]
    loss_masks: list[list[int]]
    raw_reward: list[float] = field(default_factory=list)
    truncated: list[int] = field(default_factory=list)
    sample_indices: list[int] = field(default_factory=list)
    rollout_log_probs: list[list[float]] | None = None
    round_number: list[int] | None = None

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if not self.raw_reward:
            self.raw_reward = list(self.rewards)
        if not self.truncated:
            self.truncated = [0] * n
        if not self.sample_indices:
            self.sample_indices = list(range(n))
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and len(value) != n:
                raise ValueError(f"rollout batch field {f.name!r} has {len(value)} entries for {n} samples")
        for i, (toks, length, mask) in enumerate(
            zip(self.tokens, self.response_lengths, self.loss_masks, strict=True)
        ):
            if not 0 < length < len(toks):
                raise ValueError(
                    f"sample {i}: response_length {length} must be in [1, {len(toks) - 1}] for {len(toks)} tokens "
                    "(at least one prompt token is needed to predict the first response token)"
                )
            if len(mask) != length:
                raise ValueError(
                    f"sample {i}: loss_mask has {len(mask)} entries, response_length is {length}"
                )
            if self.rollout_log_probs is not None and len(self.rollout_log_probs[i]) != length:
                raise ValueError(
                    f"sample {i}: rollout_log_probs has {len(self.rollout_log_probs[i])} entries, "
                    f"response_length is {length}"
                )

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def total_lengths(self) -> list[int]:
        return [len(t) for t in self.tokens]

    def select(self, indices: Sequence[int]) -> RolloutBatch:
        """The samples at ``indices``, in that order."""
        picked: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            picked[f.name] = None if value is None else [value[i] for i in indices]
        return replace(self, **picked)

    @classmethod
    def from_samples(cls, args: Any, samples: Sequence[Any]) -> RolloutBatch:
        """Build the batch from ``services.core.sample.Sample`` objects (groups flattened, in order)."""
        if args.custom_reward_post_process_path is not None:
            from services.core.plugins import load_function

            post_process = load_function(
                args.custom_reward_post_process_path, flag="--custom-reward-post-process-path"
            )
            raw_rewards, rewards = post_process(args, list(samples))
        else:
            raw_rewards = [s.get_reward_value(args) for s in samples]
            if any(r is None for r in raw_rewards):
                missing = next(i for i, r in enumerate(raw_rewards) if r is None)
                raise ValueError(f"sample {missing} has no reward; score every sample before training")
            rewards = normalized_rewards(args, raw_rewards)
        if len(raw_rewards) != len(samples) or len(rewards) != len(samples):
            raise ValueError(
                f"--custom-reward-post-process-path returned {len(raw_rewards)} raw rewards and {len(rewards)} rewards "
                f"for {len(samples)} samples"
            )
        raw = [
            float(s.metadata["raw_reward"]) if "raw_reward" in s.metadata else float(r)
            for s, r in zip(samples, raw_rewards, strict=True)
        ]
        has_rollout_log_probs = bool(samples) and all(s.rollout_log_probs is not None for s in samples)
        has_rounds = bool(samples) and all("round_number" in s.metadata for s in samples)
        return cls(
            tokens=[list(s.tokens) for s in samples],
            response_lengths=[s.response_length for s in samples],
            rewards=[float(r) for r in rewards],
            raw_reward=raw,
            loss_masks=[
                list(s.loss_mask) if s.loss_mask is not None else [1] * s.response_length for s in samples
            ],
            truncated=[1 if s.status == s.Status.TRUNCATED else 0 for s in samples],
            sample_indices=[s.index if s.index is not None else i for i, s in enumerate(samples)],
            rollout_log_probs=[list(s.rollout_log_probs) for s in samples] if has_rollout_log_probs else None,
            round_number=[int(s.metadata["round_number"]) for s in samples] if has_rounds else None,
        )
