"""Validation and derivation of parsed arguments, in the order and with the rules of slime's
``slime_validate_args`` (plus SGLang's and Megatron's parse-time checks); every error is ``parser.error``."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

# Megatron's tracker file: a checkpoint directory of any backend holds it once it can be resumed from.
CHECKPOINT_TRACKER = "latest_checkpointed_iteration.txt"

REINFORCE_ESTIMATORS = ("reinforce_plus_plus", "reinforce_plus_plus_baseline")


def is_resumable_checkpoint(path: str | None) -> bool:
    """Whether ``path`` is a checkpoint directory training can resume from (it has the tracker file)."""
    return path is not None and os.path.isfile(os.path.join(path, CHECKPOINT_TRACKER))


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validate and derive everything slime does after parsing, then the SGLang, Megatron and service checks."""
    _check_positive(parser, args)
    validate_slime_args(parser, args)
    validate_sglang_args(parser, args)
    validate_megatron_args(parser, args)
    validate_service_args(parser, args)


def _check_positive(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    # These feed divisions and loop bounds below; slime would crash on them with a ZeroDivisionError.
    for flag, minimum in (
        ("--rollout-batch-size", 1),
        ("--n-samples-per-prompt", 1),
        ("--n-samples-per-eval-prompt", 1),
        ("--num-steps-per-rollout", 1),
        ("--global-batch-size", 1),
        ("--micro-batch-size", 1),
        ("--rollout-num-gpus-per-engine", 1),
        ("--update-weights-interval", 1),
        ("--num-rollout", 0),
        ("--num-epoch", 1),
    ):
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None and value < minimum:
            parser.error(f"{flag} must be >= {minimum}, got {value}")


def validate_slime_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """slime's ``slime_validate_args``: checks and derived defaults, mutating ``args``."""
    if args.kl_coef != 0 or args.use_kl_loss:
        _check_reference_model(parser, args)

    # No resumable checkpoint in --load: start from --ref-load as a fine-tune (slime's fallback).
    if not is_resumable_checkpoint(args.load):
        args.no_load_optim = True
        args.no_load_rng = True
        args.finetune = True
        args.load = args.ref_load
        if args.ref_ckpt_step is not None:
            args.ckpt_step = args.ref_ckpt_step
        if args.start_rollout_id is None:
            args.start_rollout_id = 0

    _normalize_eval_prompt_data(parser, args)

    if args.save_interval is not None and args.save is None:
        parser.error(
            f"--save-interval {args.save_interval} needs --save: the directory to save checkpoints to"
        )

    if args.kl_coef != 0 and args.kl_loss_coef != 0:
        parser.error(
            f"--kl-coef ({args.kl_coef}, reward shaping) and --kl-loss-coef ({args.kl_loss_coef}, KL loss) are "
            "mutually exclusive: set only one of them to a non-zero value",
        )

    if args.advantage_estimator in REINFORCE_ESTIMATORS and not args.normalize_advantages:
        parser.error(
            f"--advantage-estimator {args.advantage_estimator} requires --normalize-advantages "
            f"(valid without it: grpo, gspo, ppo)",
        )

    if args.use_dynamic_batch_size:
        if args.max_tokens_per_gpu is None:
            parser.error(
                "--use-dynamic-batch-size requires --max-tokens-per-gpu (a positive token budget per GPU)",
            )
        if args.log_probs_max_tokens_per_gpu is None:
            args.log_probs_max_tokens_per_gpu = args.max_tokens_per_gpu

    if args.eps_clip_high is None:
        args.eps_clip_high = args.eps_clip
    if args.eps_clip_c is not None and args.eps_clip_c <= 1.0:
        parser.error(f"--eps-clip-c must be > 1 (dual-clip PPO lower bound), got {args.eps_clip_c}")

    if args.eval_reward_key is None:
        args.eval_reward_key = args.reward_key

    if args.dump_details is not None:
        args.save_debug_rollout_data = f"{args.dump_details}/rollout_data/{{rollout_id}}.pt"
        args.save_debug_train_data = f"{args.dump_details}/train_data/{{rollout_id}}_{{rank}}.pt"

    if args.load_debug_rollout_data is not None:
        logger.info(
            "--load-debug-rollout-data %s is set: no inference engines are started (--debug-train-only)",
            args.load_debug_rollout_data,
        )
        args.debug_train_only = True

    args.use_critic = args.advantage_estimator == "ppo"
    if args.critic_num_gpus_per_node is None:
        args.critic_num_gpus_per_node = args.actor_num_gpus_per_node
    if args.critic_num_nodes is None:
        args.critic_num_nodes = args.actor_num_nodes
    if args.critic_load is None:
        args.critic_load = args.load
    if args.critic_lr is None:
        args.critic_lr = args.lr

    if args.debug_rollout_only:
        _derive_debug_rollout_only(parser, args)

    if args.debug_rollout_only and args.debug_train_only:
        reason = " (implied by --load-debug-rollout-data)" if args.load_debug_rollout_data is not None else ""
        parser.error(
            f"--debug-rollout-only and --debug-train-only{reason} are mutually exclusive: choose one"
        )

    if args.colocate:
        args.offload = True
        actor_gpus = args.actor_num_gpus_per_node * args.actor_num_nodes
        if args.rollout_num_gpus != actor_gpus:
            if args.rollout_num_gpus is not None:
                logger.info(
                    "--colocate: --rollout-num-gpus %s overridden by the actor's %d GPUs",
                    args.rollout_num_gpus,
                    actor_gpus,
                )
            args.rollout_num_gpus = actor_gpus
            if args.use_critic:
                args.rollout_num_gpus += args.critic_num_gpus_per_node * args.critic_num_nodes

    if args.eval_function_path is None:
        args.eval_function_path = args.rollout_function_path

    _derive_global_batch_size(parser, args)

    if args.n_samples_per_prompt == 1 and args.grpo_std_normalization:
        args.grpo_std_normalization = False
        logger.info("--n-samples-per-prompt is 1: grpo_std_normalization set to False")

    if args.over_sampling_batch_size is None:
        args.over_sampling_batch_size = args.rollout_batch_size
    if args.over_sampling_batch_size < args.rollout_batch_size:
        parser.error(
            f"--over-sampling-batch-size {args.over_sampling_batch_size} must be >= --rollout-batch-size "
            f"{args.rollout_batch_size}",
        )

    _check_rollout_count(parser, args)

    if args.loss_type == "custom_loss" and args.custom_loss_function_path is None:
        parser.error(
            "--loss-type custom_loss requires --custom-loss-function-path (a dotted path pkg.module.fn)",
        )

    args.rank = 0
    args.world_size = args.actor_num_nodes * args.actor_num_gpus_per_node

    if args.custom_config_path:
        apply_custom_config(parser, args)


def _check_reference_model(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    kl_flags = "--use-kl-loss" if args.use_kl_loss else f"--kl-coef {args.kl_coef}"
    if args.ref_load is None:
        if args.hf_checkpoint is None:
            parser.error(
                f"{kl_flags} needs a reference model: pass --ref-load (a checkpoint directory) or --hf-checkpoint",
            )
        logger.info(
            "%s without --ref-load: the reference model is --hf-checkpoint %s", kl_flags, args.hf_checkpoint
        )
        return
    if not os.path.exists(args.ref_load):
        parser.error(
            f"--ref-load {args.ref_load} does not exist (the reference model is required by {kl_flags})",
        )
    if not os.path.isfile(os.path.join(args.ref_load, CHECKPOINT_TRACKER)) and not os.path.isfile(
        os.path.join(args.ref_load, "config.json")
    ):
        logger.warning(
            "--ref-load %s has neither %s nor config.json: is it a checkpoint directory?",
            args.ref_load,
            CHECKPOINT_TRACKER,
        )


def _normalize_eval_prompt_data(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.eval_interval is not None and args.eval_prompt_data is None:
        parser.error(
            f"--eval-interval {args.eval_interval} needs --eval-prompt-data NAME PATH [NAME PATH ...]"
        )
    if args.eval_prompt_data is None:
        return
    if len(args.eval_prompt_data) == 1:
        logger.info("one --eval-prompt-data path given: it is named 'aime' (slime's legacy form)")
        args.eval_prompt_data = ["aime", args.eval_prompt_data[0]]
    if len(args.eval_prompt_data) % 2 != 0:
        parser.error(
            f"--eval-prompt-data takes NAME PATH pairs (or one PATH), got {len(args.eval_prompt_data)} values: "
            f"{args.eval_prompt_data}",
        )


def _derive_debug_rollout_only(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    # The actor is never trained, so its GPU count is derived from the rollout GPUs (slime does the same).
    if args.colocate and args.rollout_num_gpus is None:
        args.rollout_num_gpus = args.actor_num_gpus_per_node * args.actor_num_nodes
    else:
        if args.rollout_num_gpus is None or args.rollout_num_gpus < 1:
            parser.error(
                f"--debug-rollout-only needs --rollout-num-gpus >= 1 (got {args.rollout_num_gpus}) "
                "unless --colocate is set",
            )
        args.actor_num_gpus_per_node = min(8, args.rollout_num_gpus)
        args.actor_num_nodes = args.rollout_num_gpus // args.actor_num_gpus_per_node
    args.colocate = False
    args.offload = False


def _derive_global_batch_size(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    samples_per_rollout = args.rollout_batch_size * args.n_samples_per_prompt
    if args.num_steps_per_rollout is not None:
        if args.num_steps_per_rollout > samples_per_rollout:
            parser.error(
                f"--num-steps-per-rollout {args.num_steps_per_rollout} exceeds the {samples_per_rollout} samples of "
                "a rollout (--rollout-batch-size x --n-samples-per-prompt)",
            )
        derived = samples_per_rollout // args.num_steps_per_rollout
        if args.global_batch_size is not None and args.global_batch_size != derived:
            parser.error(
                f"--global-batch-size {args.global_batch_size} contradicts --num-steps-per-rollout "
                f"{args.num_steps_per_rollout}: rollout_batch_size {args.rollout_batch_size} x n_samples_per_prompt "
                f"{args.n_samples_per_prompt} // {args.num_steps_per_rollout} = {derived}; give only one of them",
            )
        args.global_batch_size = derived
    elif args.global_batch_size is None:
        # slime leaves this to the user; one optimizer step per rollout is the natural default.
        args.global_batch_size = samples_per_rollout
    if samples_per_rollout % args.global_batch_size != 0:
        parser.error(
            f"--global-batch-size {args.global_batch_size} must divide rollout_batch_size {args.rollout_batch_size} "
            f"x n_samples_per_prompt {args.n_samples_per_prompt} = {samples_per_rollout}",
        )


def _check_rollout_count(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.num_epoch is not None:
        if args.num_rollout is not None:
            logger.info("both --num-epoch and --num-rollout are set: --num-epoch is ignored")
        elif not args.rollout_global_dataset:
            parser.error(
                "--num-epoch derives the rollout count from the global dataset, which "
                "--disable-rollout-global-dataset turns off: pass --num-rollout instead",
            )
    elif args.num_rollout is None:
        parser.error(
            "set --num-rollout N or --num-epoch N (the number of rollout steps or of dataset epochs)"
        )


def apply_custom_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Add the keys of the ``--custom-config-path`` YAML mapping that ``args`` lacks; existing keys stay."""
    import yaml  # only runs with --custom-config-path; keeps `slime args` imports small

    path = args.custom_config_path
    try:
        with open(path, encoding="utf-8") as handle:
            data: Any = yaml.safe_load(handle) or {}
    except OSError as exc:
        parser.error(f"--custom-config-path {path}: cannot read it ({exc.strerror or exc})")
    except yaml.YAMLError as exc:
        parser.error(f"--custom-config-path {path}: not valid YAML ({exc})")
    if not isinstance(data, dict) or not all(isinstance(key, str) for key in data):
        parser.error(f"--custom-config-path {path}: must hold a YAML mapping of names to values")
    for key, value in data.items():
        if hasattr(args, key):
            logger.warning(
                "--custom-config-path: %s is already set to %r; keeping it (the file's %r is ignored)",
                key,
                getattr(args, key),
                value,
            )
        else:
            setattr(args, key, value)


def validate_sglang_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """SGLang's checks slime runs: engine TP size from --rollout-num-gpus-per-engine, DP attention for DP > 1."""
    if not hasattr(args, "sglang_dp_size"):
        return
    args.sglang_tp_size = args.rollout_num_gpus_per_engine
    for flag in ("--sglang-dp-size", "--sglang-pp-size", "--sglang-ep-size"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if args.sglang_dp_size > 1 and not args.sglang_enable_dp_attention:
        parser.error(f"--sglang-dp-size {args.sglang_dp_size} requires --sglang-enable-dp-attention")
    if getattr(args, "true_on_policy_mode", False) and hasattr(args, "sglang_passthrough"):
        # Engines must return the log-probs of the trainer's own forward (SGLang's --rl-on-policy-target).
        args.sglang_rl_on_policy_target = args.sglang_passthrough.setdefault("rl_on_policy_target", "fsdp")


def validate_megatron_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The parse-time checks of Megatron's ``validate_args`` that concern flags defined here."""
    if not hasattr(args, "lr_warmup_fraction"):
        return
    if args.fp16 and args.bf16:
        parser.error("--fp16 and --bf16 are mutually exclusive: choose one precision")
    if args.lr_warmup_fraction is not None:
        if args.lr_warmup_iters != 0:
            parser.error("--lr-warmup-fraction and --lr-warmup-iters are mutually exclusive: give only one")
        if not 0.0 <= args.lr_warmup_fraction <= 1.0:
            parser.error(f"--lr-warmup-fraction must be in [0, 1], got {args.lr_warmup_fraction}")


def validate_service_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check the addresses of the "Service" group (and --rollout-buffer-url / --rm-url when present)."""
    for flag, schemes in (
        ("--redis-url", ("redis", "rediss", "unix")),
        ("--router-url", ("http", "https")),
        ("--reward-url", ("http", "https")),
        ("--rollout-buffer-url", ("http", "https")),
        ("--rm-url", ("http", "https")),
    ):
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is None:
            continue
        parsed = urlparse(value)
        if parsed.scheme not in schemes or (parsed.scheme != "unix" and not parsed.netloc):
            valid = ", ".join(f"{scheme}://" for scheme in schemes)
            parser.error(f"{flag} {value!r} is not a URL of the form {valid}host:port")
    addr = getattr(args, "reward_grpc_addr", None)
    if addr is not None:
        host, _, port = addr.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            parser.error(f"--reward-grpc-addr {addr!r} is not host:port (port 1-65535)")
    if getattr(args, "weight_sync_transport", None) == "disk" and not getattr(args, "weight_sync_dir", None):
        parser.error(
            "--weight-sync-transport disk needs --weight-sync-dir (a directory every engine can read)"
        )
    port_value = getattr(args, "port", None)
    if port_value is not None and not 0 <= port_value < 65536:
        parser.error(f"--port must be in 0-65535 (0: any free port), got {port_value}")
