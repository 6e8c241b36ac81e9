"""The training losses of ``--loss-type``: the policy loss (PPO/GRPO/GSPO with KL loss, entropy bonus and TIS),
the SFT loss and the critic's value loss, each returning a scalar plus the metrics slime reports.

Policy loss of one micro-batch, with R the reduction of ``reduction.py``:

    loss = R(L^clip · w_tis) − entropy_coef · R(H) + [use_kl_loss] kl_loss_coef · R(KL(π_θ ‖ π_ref))

where L^clip is ``policy_loss.compute_policy_loss`` on the token (or, for GSPO, sequence) ratio, w_tis the TIS
weights (1 without ``--use-tis``) and KL the ``--kl-loss-type`` estimator of ``kl.py``. SFT: ``loss = −R(log π_θ)``.
Every metric is reduced with R, so dividing by the step's sample (or token) count gives its mean.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from trainer.algorithms.kl import compute_approx_kl
from trainer.algorithms.policy_loss import compute_policy_loss, gspo_sequence_kl, token_ppo_kl
from trainer.algorithms.reduction import Reducer
from trainer.algorithms.value_loss import compute_value_loss

LOSS_TYPES = ("policy_loss", "sft_loss", "custom_loss")


@dataclass(frozen=True)
class LossConfig:
    """The flags that shape the training loss."""

    loss_type: str = "policy_loss"
    advantage_estimator: str = "grpo"
    eps_clip: float = 0.2
    eps_clip_high: float = 0.2
    eps_clip_c: float | None = None
    entropy_coef: float = 0.0
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.0
    kl_loss_type: str = "k1"
    use_tis: bool = False
    value_clip: float = 0.2
    per_token: bool = False

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"--loss-type: unknown loss {self.loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
        if self.eps_clip_c is not None and self.eps_clip_c <= 1.0:
            raise ValueError(f"--eps-clip-c must be > 1.0 for dual-clip PPO, got {self.eps_clip_c}")

    @classmethod
    def from_args(cls, args) -> LossConfig:
        return cls(
            loss_type=args.loss_type,
            advantage_estimator=args.advantage_estimator,
            eps_clip=args.eps_clip,
            eps_clip_high=args.eps_clip if args.eps_clip_high is None else args.eps_clip_high,
            eps_clip_c=args.eps_clip_c,
            entropy_coef=args.entropy_coef,
            use_kl_loss=args.use_kl_loss,
            kl_loss_coef=args.kl_loss_coef,
            kl_loss_type=args.kl_loss_type,
            use_tis=args.use_tis,
            value_clip=args.value_clip,
            per_token=args.calculate_per_token_loss,
        )


@dataclass
class PolicyLossInputs:
    """One micro-batch's per-sample tensors (response tokens only)."""

    log_probs: list[torch.Tensor]
    entropy: list[torch.Tensor]
    old_log_probs: list[torch.Tensor]
    advantages: list[torch.Tensor]
    loss_masks: list[torch.Tensor]
    total_lengths: list[int]
    response_lengths: list[int]
    ref_log_probs: list[torch.Tensor] | None = None
    rollout_log_probs: list[torch.Tensor] | None = None


TisFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


def _cat(tensors: Sequence[torch.Tensor], like: torch.Tensor | None = None) -> torch.Tensor:
    if tensors:
        return torch.cat(list(tensors))
    return torch.zeros(0) if like is None else like.new_zeros(0)


def policy_loss(
    config: LossConfig, inputs: PolicyLossInputs, reduce: Reducer, *, tis_fn: TisFn | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped policy loss with the optional KL loss, entropy bonus, dual clip and TIS; ``(loss, metrics)``.

    ``tis_fn`` is called with the keyword arguments of a ``--custom-tis-function-path`` function (minus ``args``,
    which the caller binds) and is required when ``config.use_tis``.
    """
    log_probs = _cat(inputs.log_probs)
    if config.advantage_estimator == "gspo":
        ppo_kl = gspo_sequence_kl(inputs.log_probs, inputs.old_log_probs, inputs.loss_masks).to(log_probs)
    else:
        ppo_kl = token_ppo_kl(log_probs, _cat(inputs.old_log_probs, log_probs))
    advantages = _cat(inputs.advantages, log_probs).to(log_probs)
    pg_losses, clipfrac, dualclip_frac = compute_policy_loss(
        ppo_kl,
        advantages,
        eps_clip=config.eps_clip,
        eps_clip_high=config.eps_clip_high,
        eps_clip_c=config.eps_clip_c,
    )

    metrics: dict[str, torch.Tensor] = {}
    if config.use_tis:
        if inputs.rollout_log_probs is None:
            raise ValueError("--use-tis needs the engine's rollout log-probs on every sample")
        if tis_fn is None:
            raise ValueError("--use-tis needs a TIS weight function")
        weights, tis_metrics = tis_fn(
            train_log_probs=inputs.old_log_probs,
            rollout_log_probs=inputs.rollout_log_probs,
            loss_masks=inputs.loss_masks,
            total_lengths=inputs.total_lengths,
            response_lengths=inputs.response_lengths,
        )
        pg_losses = pg_losses * weights.to(pg_losses)
        metrics["ois"] = reduce((-ppo_kl).exp().detach())
        for key, value in tis_metrics.items():
            metrics[key] = reduce(value.to(pg_losses).detach())

    pg_loss = reduce(pg_losses)
    entropy_loss = reduce(_cat(inputs.entropy, log_probs).to(log_probs))
    loss = pg_loss - config.entropy_coef * entropy_loss
    if config.use_kl_loss:
        if inputs.ref_log_probs is None:
            raise ValueError("--use-kl-loss needs reference log-probs (--ref-load)")
        kl = compute_approx_kl(
            log_probs, _cat(inputs.ref_log_probs, log_probs).to(log_probs), config.kl_loss_type
        )
        kl_loss = reduce(kl)
        loss = loss + config.kl_loss_coef * kl_loss
        metrics["kl_loss"] = kl_loss.detach()

    metrics.update(
        loss=loss.detach(),
        pg_loss=pg_loss.detach(),
        entropy_loss=entropy_loss.detach(),
        pg_clipfrac=reduce(clipfrac).detach(),
        ppo_kl=reduce(ppo_kl).detach(),
    )
    if config.eps_clip_c is not None:
        metrics["pg_dualclip_frac"] = reduce(dualclip_frac).detach()
    return loss, metrics


def sft_loss(
    log_probs: Sequence[torch.Tensor], reduce: Reducer
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Negative log-likelihood of the response tokens: ``−R(log π_θ)``."""
    loss = -reduce(_cat(log_probs))
    return loss, {"loss": loss.detach()}


def value_loss(
    config: LossConfig,
    values: Sequence[torch.Tensor],
    old_values: Sequence[torch.Tensor],
    returns: Sequence[torch.Tensor],
    reduce: Reducer,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The critic's clipped value loss; ``(loss, {"value_loss", "value_clipfrac"})``."""
    new = _cat(values)
    losses, clipfrac = compute_value_loss(
        new, _cat(old_values, new).to(new), _cat(returns, new).to(new), value_clip=config.value_clip
    )
    loss = reduce(losses)
    return loss, {"value_loss": loss.detach(), "value_clipfrac": reduce(clipfrac).detach()}
