"""AdamW and the learning-rate schedule of the torch backend (Megatron's semantics, counted in optimizer steps).

lr(s) during warm-up (s < W): ``lr · (s + 1) / W`` (the first step already moves); then with decay ratio ρ = (s − W) / (D − W):
``constant`` → lr; ``linear`` → lr − (lr − min_lr)·ρ; ``cosine`` → min_lr + (lr − min_lr)·(1 + cos πρ)/2;
``inverse-square-root`` → max(min_lr, lr·sqrt(max(W, 1)) / sqrt(max(s, 1))); ρ is clipped to 1 (min_lr after D).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW hyper-parameters and the learning-rate schedule (``--lr``, ``--min-lr``, ``--lr-decay-style``, …)."""

    lr: float
    min_lr: float = 0.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    decay_steps: int | None = None
    decay_style: str = "linear"
    clip_grad: float = 1.0

    def __post_init__(self) -> None:
        if self.decay_style not in DECAY_STYLES:
            raise ValueError(
                f"--lr-decay-style {self.decay_style!r} is not supported by the torch backend; "
                f"valid: {', '.join(DECAY_STYLES)}"
            )
        if self.lr < 0:
            raise ValueError(f"--lr must be >= 0, got {self.lr}")

    @classmethod
    def from_args(cls, args: Any, *, role: str, total_steps: int | None) -> OptimizerConfig:
        """The actor's (``role="actor"``) or the critic's (``--critic-lr``, ``--critic-lr-warmup-iters``) settings."""
        decay_steps = args.lr_decay_iters if args.lr_decay_iters is not None else total_steps
        if role == "critic":
            lr = args.critic_lr if args.critic_lr is not None else args.lr
            warmup = args.critic_lr_warmup_iters
        else:
            lr = args.lr
            warmup = args.lr_warmup_iters
            if args.lr_warmup_fraction is not None and decay_steps is not None:
                warmup = int(args.lr_warmup_fraction * decay_steps)
        return cls(
            lr=lr,
            min_lr=args.min_lr,
            weight_decay=args.weight_decay,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_eps,
            warmup_steps=warmup,
            decay_steps=decay_steps,
            decay_style=args.lr_decay_style,
            clip_grad=args.clip_grad,
        )

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based)."""
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.decay_style == "constant" or self.decay_steps is None:
            return self.lr
        if self.decay_style == "inverse-square-root":
            return max(self.min_lr, self.lr * math.sqrt(max(self.warmup_steps, 1)) / math.sqrt(max(step, 1)))
        span = max(self.decay_steps - self.warmup_steps, 1)
        ratio = min(max(step - self.warmup_steps, 0) / span, 1.0)
        if self.decay_style == "linear":
            return self.lr - (self.lr - self.min_lr) * ratio
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * ratio))


class LRSchedule:
    """Sets the optimizer's learning rate per step; its state (the step count) is checkpointed."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: OptimizerConfig) -> None:
        self.optimizer = optimizer
        self.config = config
        self.step_count = 0
        self._apply()

    @property
    def lr(self) -> float:
        return self.config.lr_at(self.step_count)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def state_dict(self) -> dict[str, int]:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step_count = int(state["step_count"])
        self._apply()


def build_optimizer(params: Iterable[torch.nn.Parameter], config: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW over ``params``; biases and norm weights (1-D) are not decayed, as in Megatron and HF trainers."""
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The multi-tensor implementation everywhere: torch picks it only for CUDA tensors, and on CPU the per-tensor
    # loop's dozen small ops per parameter cost more than the update itself for a small model.
    return torch.optim.AdamW(groups, lr=config.lr_at(0), betas=config.betas, eps=config.eps, foreach=True)
