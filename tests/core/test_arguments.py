"""Tests of slime's argument surface: the seed flag table, slime's derivations and errors, pass-through and files."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
from pathlib import Path
from typing import Any

import pytest

from services.core import arguments
from services.core.arg_validation import CHECKPOINT_TRACKER
from services.core.arguments import (
    MEGATRON_PASSTHROUGH_FLAGS,
    SEED_GROUPS,
    add_service_arguments,
    add_slime_arguments,
    build_parser,
    new_parser,
    parse_args,
    parse_with_passthrough,
)

SEED = json.loads((Path(__file__).parent / "data" / "seed_flags.json").read_text(encoding="utf-8"))["flags"]
BASE = ["--rollout-batch-size", "8", "--num-rollout", "2"]

# Seed dests that slime's validation fills in when left unset, with the value it derives for BASE + n=4.
DERIVED_FOR_BASE_N4 = {
    "critic_num_nodes": 1,
    "critic_num_gpus_per_node": 8,
    "critic_lr": 1e-6,
    "eps_clip_high": 0.2,
    "over_sampling_batch_size": 8,
    "eval_function_path": "slime.rollout.sglang_rollout.generate_rollout",
    "global_batch_size": 32,
    "start_rollout_id": 0,
}


def _action_kind(action: argparse.Action) -> str:
    if isinstance(action, argparse._StoreTrueAction):
        return "store_true"
    if isinstance(action, argparse._StoreFalseAction):
        return "store_false"
    assert type(action) is argparse._StoreAction, f"{action.option_strings}: unexpected {type(action)}"
    return "store"


def _type_name(action: argparse.Action) -> str | None:
    if action.type is None:
        return None
    if action.type is json.loads:
        return "json.loads"
    return action.type.__name__


def _parse_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as excinfo:
        parse_args(argv)
    assert excinfo.value.code == 2
    return capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# the seed flag table
# --------------------------------------------------------------------------------------------------


def test_seed_table_is_complete() -> None:
    assert len(SEED) == 163
    assert list(dict.fromkeys(flag["section"] for flag in SEED)) == list(SEED_GROUPS)


@pytest.mark.parametrize("flag", SEED, ids=[flag["option"] for flag in SEED])
def test_seed_flag_matches_slime(flag: dict[str, Any]) -> None:
    parser = build_parser()
    action = parser._option_string_actions[flag["option"]]
    assert action.option_strings == [flag["option"]]
    assert action.dest == flag["dest"]
    assert action.default == flag["default"]
    assert type(action.default) is type(flag["default"]) or isinstance(flag["default"], float)
    assert _type_name(action) == flag["type"]
    assert action.choices == flag["choices"]
    if flag["action"] == "store":
        assert action.nargs == flag["nargs"]
    assert _action_kind(action) == flag["action"]
    assert action.required == flag["required"]
    (group,) = [group for group in parser._action_groups if action in group._group_actions]
    assert group.title == flag["section"]


def test_each_seed_group_holds_exactly_the_seed_flags() -> None:
    parser = build_parser()
    for title in SEED_GROUPS:
        (group,) = [group for group in parser._action_groups if group.title == title]
        defined = {option for action in group._group_actions for option in action.option_strings}
        assert defined == {flag["option"] for flag in SEED if flag["section"] == title}, title


def test_defaults_of_every_seed_dest() -> None:
    args = vars(parse_args([*BASE, "--n-samples-per-prompt", "4"]))
    for flag in SEED:
        expected = DERIVED_FOR_BASE_N4.get(flag["dest"], flag["default"])
        if flag["dest"] == "rollout_batch_size":
            expected = 8
        elif flag["dest"] in ("num_rollout", "n_samples_per_prompt"):
            expected = {"num_rollout": 2, "n_samples_per_prompt": 4}[flag["dest"]]
        assert args[flag["dest"]] == expected, flag["option"]
    assert args["rollout_function_path"] == "slime.rollout.sglang_rollout.generate_rollout"
    assert args["update_weight_buffer_size"] == 512 * 1024**2


def test_required_rollout_batch_size(capsys: pytest.CaptureFixture[str]) -> None:
    err = _parse_error(capsys, ["--num-rollout", "2"])
    assert "--rollout-batch-size" in err and "required" in err


# --------------------------------------------------------------------------------------------------
# derivations (slime_validate_args)
# --------------------------------------------------------------------------------------------------


def test_eps_clip_high_follows_eps_clip() -> None:
    assert parse_args([*BASE, "--eps-clip", "0.3"]).eps_clip_high == 0.3
    assert parse_args([*BASE, "--eps-clip", "0.3", "--eps-clip-high", "0.28"]).eps_clip_high == 0.28


def test_over_sampling_batch_size() -> None:
    assert parse_args(BASE).over_sampling_batch_size == 8
    assert parse_args([*BASE, "--over-sampling-batch-size", "16"]).over_sampling_batch_size == 16


def test_eval_defaults_follow_rollout() -> None:
    args = parse_args([*BASE, "--rollout-function-path", "my.pkg.rollout", "--reward-key", "score"])
    assert args.eval_function_path == "my.pkg.rollout"
    assert args.eval_reward_key == "score"
    args = parse_args([*BASE, "--eval-function-path", "my.pkg.eval", "--eval-reward-key", "acc"])
    assert (args.eval_function_path, args.eval_reward_key) == ("my.pkg.eval", "acc")


def test_critic_defaults_follow_actor() -> None:
    args = parse_args(
        [*BASE, "--advantage-estimator", "ppo", "--actor-num-nodes", "2", "--actor-num-gpus-per-node", "4"]
        + ["--lr", "2e-6", "--ref-load", "/ckpt/ref", "--save", "/ckpt/run"]
    )
    assert args.use_critic is True
    assert (args.critic_num_nodes, args.critic_num_gpus_per_node, args.critic_lr) == (2, 4, 2e-6)
    assert args.critic_load == "/ckpt/ref"  # --load fell back to --ref-load, and the critic follows --load
    assert args.critic_save is None
    explicit = parse_args([*BASE, "--critic-num-nodes", "3", "--critic-lr", "1e-5", "--critic-load", "/c"])
    assert (explicit.critic_num_nodes, explicit.critic_lr, explicit.critic_load) == (3, 1e-5, "/c")
    assert explicit.use_critic is False


def test_colocate_forces_offload_and_rollout_gpus() -> None:
    args = parse_args([*BASE, "--colocate", "--actor-num-gpus-per-node", "4", "--rollout-num-gpus", "2"])
    assert args.offload is True
    assert args.rollout_num_gpus == 4
    ppo = parse_args([*BASE, "--colocate", "--actor-num-gpus-per-node", "4", "--advantage-estimator", "ppo"])
    assert ppo.rollout_num_gpus == 8  # actor + critic GPUs


def test_global_batch_size_derivations() -> None:
    four = ["--n-samples-per-prompt", "4"]
    assert parse_args([*BASE, *four]).global_batch_size == 32  # one optimizer step per rollout
    assert parse_args([*BASE, *four, "--num-steps-per-rollout", "4"]).global_batch_size == 8
    assert parse_args([*BASE, *four, "--global-batch-size", "16"]).global_batch_size == 16
    same = parse_args([*BASE, *four, "--global-batch-size", "16", "--num-steps-per-rollout", "2"])
    assert same.global_batch_size == 16


def test_grpo_std_normalization_off_for_single_sample() -> None:
    assert parse_args(BASE).grpo_std_normalization is False
    assert parse_args([*BASE, "--n-samples-per-prompt", "2"]).grpo_std_normalization is True
    disabled = parse_args([*BASE, "--n-samples-per-prompt", "2", "--disable-grpo-std-normalization"])
    assert disabled.grpo_std_normalization is False


def test_num_epoch_leaves_num_rollout_to_the_driver() -> None:
    args = parse_args(["--rollout-batch-size", "8", "--num-epoch", "3"])
    assert (args.num_epoch, args.num_rollout) == (3, None)
    both = parse_args([*BASE, "--num-epoch", "3"])
    assert (both.num_epoch, both.num_rollout) == (3, 2)


def test_eval_prompt_data_pairs() -> None:
    legacy = parse_args([*BASE, "--eval-interval", "5", "--eval-prompt-data", "/data/aime.jsonl"])
    assert legacy.eval_prompt_data == ["aime", "/data/aime.jsonl"]
    pairs = parse_args([*BASE, "--eval-prompt-data", "gsm8k", "/d/g.jsonl", "math", "/d/m.jsonl"])
    assert pairs.eval_prompt_data == ["gsm8k", "/d/g.jsonl", "math", "/d/m.jsonl"]


def test_dump_details_sets_both_templates() -> None:
    args = parse_args([*BASE, "--dump-details", "/tmp/run1"])
    assert args.save_debug_rollout_data == "/tmp/run1/rollout_data/{rollout_id}.pt"
    assert args.save_debug_train_data == "/tmp/run1/train_data/{rollout_id}_{rank}.pt"


def test_debug_modes() -> None:
    loaded = parse_args([*BASE, "--load-debug-rollout-data", "/d/{rollout_id}.pt"])
    assert loaded.debug_train_only is True
    rollout_only = parse_args([*BASE, "--debug-rollout-only", "--rollout-num-gpus", "12", "--offload"])
    assert (rollout_only.colocate, rollout_only.offload) == (False, False)
    assert (rollout_only.actor_num_gpus_per_node, rollout_only.actor_num_nodes) == (8, 1)
    colocated = parse_args([*BASE, "--debug-rollout-only", "--colocate", "--actor-num-gpus-per-node", "2"])
    assert (colocated.colocate, colocated.offload, colocated.rollout_num_gpus) == (False, False, 2)


def test_dynamic_batch_size_log_probs_budget() -> None:
    args = parse_args([*BASE, "--use-dynamic-batch-size", "--max-tokens-per-gpu", "4096"])
    assert args.log_probs_max_tokens_per_gpu == 4096
    kept = parse_args(
        [
            *BASE,
            "--use-dynamic-batch-size",
            "--max-tokens-per-gpu",
            "4096",
            "--log-probs-max-tokens-per-gpu",
            "9000",
        ]
    )
    assert kept.log_probs_max_tokens_per_gpu == 9000


def test_load_falls_back_to_ref_load(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    ref.mkdir()
    fresh = parse_args(
        [*BASE, "--load", str(tmp_path / "run"), "--ref-load", str(ref), "--ref-ckpt-step", "7"]
    )
    assert fresh.load == str(ref)
    assert (fresh.finetune, fresh.no_load_optim, fresh.no_load_rng, fresh.ckpt_step) == (True, True, True, 7)
    assert fresh.start_rollout_id == 0

    run = tmp_path / "run"
    run.mkdir()
    (run / CHECKPOINT_TRACKER).write_text("3")
    resumed = parse_args([*BASE, "--load", str(run), "--ref-load", str(ref)])
    assert resumed.load == str(run)
    assert resumed.start_rollout_id is None  # the driver reads it from the checkpoint
    assert not hasattr(resumed, "finetune")


def test_kl_with_existing_ref_load_or_hf_checkpoint(tmp_path: Path) -> None:
    (tmp_path / CHECKPOINT_TRACKER).write_text("1")
    assert parse_args([*BASE, "--use-kl-loss", "--ref-load", str(tmp_path)]).ref_load == str(tmp_path)
    assert parse_args([*BASE, "--kl-coef", "0.1", "--hf-checkpoint", str(tmp_path)]).kl_coef == 0.1


def test_world_size() -> None:
    args = parse_args([*BASE, "--actor-num-nodes", "2", "--actor-num-gpus-per-node", "4"])
    assert (args.world_size, args.rank) == (8, 0)


def test_slime_builtin_module_paths_are_accepted() -> None:
    args = parse_args(
        [
            *BASE,
            "--rollout-function-path",
            "slime.rollout.sft_rollout.generate_rollout",
            "--dynamic-sampling-filter-path",
            "slime.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std",
            "--custom-generate-function-path",
            "slime.rollout.sglang_rollout.generate",
            "--buffer-filter-path",
            "slime.rollout.filter_hub.buffer_filters.pop_first",
            "--slime-router-middleware-paths",
            "slime.router.middleware_hub.radix_tree_middleware.RadixTreeMiddleware",
        ]
    )
    assert args.rollout_function_path == "slime.rollout.sft_rollout.generate_rollout"
    assert args.eval_function_path == "slime.rollout.sft_rollout.generate_rollout"
    assert args.slime_router_middleware_paths == [
        "slime.router.middleware_hub.radix_tree_middleware.RadixTreeMiddleware"
    ]


# --------------------------------------------------------------------------------------------------
# validation errors: exit status 2, the flag and the valid values named
# --------------------------------------------------------------------------------------------------

# (id, flags added to BASE, fragments the error message must contain)
ERRORS: list[tuple[str, list[str], list[str]]] = [
    ("choices", ["--advantage-estimator", "bogus"], ["--advantage-estimator", "'grpo'", "'ppo'", "'gspo'"]),
    ("wandb-mode", ["--wandb-mode", "cloud"], ["--wandb-mode", "'online'", "'offline'", "'disabled'"]),
    ("int type", ["--n-samples-per-prompt", "four"], ["--n-samples-per-prompt", "invalid int value"]),
    ("json type", ["--multimodal-keys", "{bad"], ["--multimodal-keys"]),
    (
        "over sampling",
        ["--over-sampling-batch-size", "4"],
        ["--over-sampling-batch-size 4", "--rollout-batch-size 8"],
    ),
    ("gbs divides", ["--global-batch-size", "3"], ["--global-batch-size 3", "must divide", "= 8"]),
    (
        "gbs vs steps",
        ["--global-batch-size", "4", "--num-steps-per-rollout", "4"],
        ["--global-batch-size 4", "--num-steps-per-rollout 4", "= 2"],
    ),
    ("steps > samples", ["--num-steps-per-rollout", "9"], ["--num-steps-per-rollout 9", "8 samples"]),
    (
        "kl exclusive",
        ["--kl-coef", "0.1", "--kl-loss-coef", "0.1", "--hf-checkpoint", "/m"],
        ["--kl-coef", "--kl-loss-coef", "only one"],
    ),
    (
        "reinforce++",
        ["--advantage-estimator", "reinforce_plus_plus"],
        ["--normalize-advantages", "grpo, gspo, ppo"],
    ),
    (
        "reinforce++ baseline",
        ["--advantage-estimator", "reinforce_plus_plus_baseline"],
        ["--advantage-estimator reinforce_plus_plus_baseline", "--normalize-advantages"],
    ),
    ("dynamic batch", ["--use-dynamic-batch-size"], ["--use-dynamic-batch-size", "--max-tokens-per-gpu"]),
    ("eps clip c", ["--eps-clip-c", "0.5"], ["--eps-clip-c", "> 1", "0.5"]),
    ("eval interval", ["--eval-interval", "5"], ["--eval-interval 5", "--eval-prompt-data"]),
    ("eval odd", ["--eval-prompt-data", "a", "/a", "b"], ["--eval-prompt-data", "pairs", "3 values"]),
    ("save interval", ["--save-interval", "5"], ["--save-interval 5", "--save"]),
    ("kl without ref", ["--use-kl-loss"], ["--use-kl-loss", "--ref-load", "--hf-checkpoint"]),
    (
        "ref missing",
        ["--use-kl-loss", "--ref-load", "/nonexistent/ref"],
        ["--ref-load /nonexistent/ref", "does not exist", "--use-kl-loss"],
    ),
    (
        "ref missing kl coef",
        ["--kl-coef", "0.01", "--ref-load", "/nonexistent/ref"],
        ["--ref-load", "--kl-coef 0.01"],
    ),
    (
        "debug both",
        ["--debug-rollout-only", "--debug-train-only", "--rollout-num-gpus", "8"],
        ["--debug-rollout-only", "--debug-train-only", "mutually exclusive"],
    ),
    ("debug rollout gpus", ["--debug-rollout-only"], ["--debug-rollout-only", "--rollout-num-gpus"]),
    ("positive", ["--n-samples-per-prompt", "0"], ["--n-samples-per-prompt must be >= 1", "got 0"]),
    (
        "custom loss",
        ["--loss-type", "custom_loss"],
        ["--loss-type custom_loss", "--custom-loss-function-path"],
    ),
    ("sglang dp", ["--sglang-dp-size", "2"], ["--sglang-dp-size 2", "--sglang-enable-dp-attention"]),
    ("sglang managed", ["--sglang-tp-size", "2"], ["--sglang-tp-size", "--rollout-num-gpus-per-engine"]),
    ("fp16 bf16", ["--fp16", "--bf16"], ["--fp16", "--bf16"]),
    (
        "warmup",
        ["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "10"],
        ["--lr-warmup-fraction", "--lr-warmup-iters"],
    ),
    ("redis url", ["--redis-url", "localhost:6379"], ["--redis-url", "redis://", "unix://"]),
    ("router url", ["--router-url", "router:30000"], ["--router-url", "http://", "https://"]),
    ("grpc addr", ["--reward-grpc-addr", "nohost"], ["--reward-grpc-addr", "host:port"]),
    ("engine backend", ["--engine-backend", "vllm"], ["--engine-backend", "'builtin'", "'sglang'"]),
    (
        "unknown flag",
        ["--rollout-batch-sise", "3"],
        ["--rollout-batch-sise", "did you mean --rollout-batch-size"],
    ),
    ("stray value", ["3"], ["unrecognized argument '3'"]),
]


@pytest.mark.parametrize(
    ("extra", "expected"), [(e, f) for _, e, f in ERRORS], ids=[name for name, _, _ in ERRORS]
)
def test_validation_errors(capsys: pytest.CaptureFixture[str], extra: list[str], expected: list[str]) -> None:
    err = _parse_error(capsys, [*BASE, *extra])
    assert "Traceback" not in err
    for fragment in expected:
        assert fragment in err, (fragment, err)


def test_rollout_count_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    err = _parse_error(capsys, ["--rollout-batch-size", "8"])
    assert "--num-rollout" in err and "--num-epoch" in err


def test_num_epoch_needs_global_dataset(capsys: pytest.CaptureFixture[str]) -> None:
    err = _parse_error(
        capsys, ["--rollout-batch-size", "8", "--num-epoch", "2", "--disable-rollout-global-dataset"]
    )
    assert "--num-epoch" in err and "--disable-rollout-global-dataset" in err and "--num-rollout" in err


def test_load_debug_rollout_data_conflicts_with_debug_rollout_only(
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = _parse_error(
        capsys,
        [*BASE, "--load-debug-rollout-data", "/d/{rollout_id}.pt", "--debug-rollout-only", "--colocate"],
    )
    assert "implied by --load-debug-rollout-data" in err


# --------------------------------------------------------------------------------------------------
# @file arguments
# --------------------------------------------------------------------------------------------------


def test_argument_file(tmp_path: Path) -> None:
    nested = tmp_path / "sampling.args"
    nested.write_text("--rollout-temperature 0.7  # comment after flags\n")
    args_file = tmp_path / "run.args"
    args_file.write_text(
        "# slime-style arguments\n"
        "--rollout-batch-size 8 --num-rollout 2 \\\n"
        "   --n-samples-per-prompt 4\n"
        "\n"
        "--rollout-stop '</answer>' \"two words\"\n"
        f"@{nested}\n"
        "--sglang-mem-fraction-static 0.6\n"
        "--num-layers 28 --swiglu\n"
    )
    args = parse_args([f"@{args_file}", "--seed", "7"])
    assert (args.rollout_batch_size, args.num_rollout, args.n_samples_per_prompt, args.seed) == (8, 2, 4, 7)
    assert args.rollout_stop == ["</answer>", "two words"]
    assert args.rollout_temperature == 0.7
    assert args.sglang_mem_fraction_static == 0.6
    assert (args.num_layers, args.swiglu) == (28, True)


def test_argument_file_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = _parse_error(capsys, [f"@{tmp_path / 'missing.args'}"])
    assert "missing.args" in err
    broken = tmp_path / "broken.args"
    broken.write_text("--rollout-stop 'unclosed\n")
    err = _parse_error(capsys, [*BASE, f"@{broken}"])
    assert "unclosed" in err


# --------------------------------------------------------------------------------------------------
# --sglang-* pass-through
# --------------------------------------------------------------------------------------------------


def test_sglang_explicit_flags() -> None:
    args = parse_args(BASE)
    assert args.sglang_server_concurrency == 512
    assert args.sglang_router_request_timeout_secs == 3600
    assert (args.sglang_router_ip, args.sglang_router_port, args.sglang_mem_fraction_static) == (
        None,
        None,
        None,
    )
    assert (args.sglang_dp_size, args.sglang_pp_size, args.sglang_ep_size) == (1, 1, 1)
    assert args.sglang_enable_deterministic_inference is False and args.sglang_enable_metrics is False
    assert args.sglang_tp_size == 1
    assert args.sglang_passthrough == {}


def test_sglang_passthrough_values() -> None:
    args = parse_args(
        [
            *BASE,
            "--sglang-cuda-graph-bs",
            "1",
            "2",
            "4",
            "--sglang-disable-radix-cache",
            "--sglang-attention-backend",
            "fa3",
            "--sglang-max-running-requests=128",
            "--sglang-schedule-conservativeness",
            "-0.5",
            "--sglang-enable-torch-compile",
            "false",
            "--sglang-mem-fraction-static",
            "0.7",
            "--sglang-dp-size",
            "2",
            "--sglang-enable-dp-attention",
            "--rollout-num-gpus-per-engine",
            "4",
            "--sglang-enable-ep-moe",
        ]
    )
    assert args.sglang_cuda_graph_bs == [1, 2, 4]
    assert args.sglang_disable_radix_cache is True
    assert args.sglang_attention_backend == "fa3"
    assert args.sglang_max_running_requests == 128
    assert args.sglang_schedule_conservativeness == -0.5
    assert args.sglang_enable_torch_compile is False
    assert args.sglang_enable_ep_moe is True
    assert args.sglang_tp_size == 4
    assert args.sglang_passthrough == {
        "cuda_graph_bs": [1, 2, 4],
        "disable_radix_cache": True,
        "attention_backend": "fa3",
        "max_running_requests": 128,
        "schedule_conservativeness": -0.5,
        "enable_torch_compile": False,
        "enable_ep_moe": True,
        "mem_fraction_static": 0.7,
        "dp_size": 2,
        "enable_dp_attention": True,
    }


def test_sglang_explicit_flag_is_typed(capsys: pytest.CaptureFixture[str]) -> None:
    err = _parse_error(capsys, [*BASE, "--sglang-server-concurrency", "many"])
    assert "--sglang-server-concurrency" in err and "invalid int value" in err


# --------------------------------------------------------------------------------------------------
# Megatron flags
# --------------------------------------------------------------------------------------------------


def test_megatron_defaults() -> None:
    args = parse_args(BASE)
    assert (args.lr_decay_style, args.weight_decay, args.optimizer) == ("linear", 0.01, "adam")
    assert (args.adam_beta1, args.adam_beta2, args.adam_eps) == (0.9, 0.999, 1e-8)
    assert (args.lr_warmup_iters, args.lr_warmup_fraction, args.min_lr, args.lr_decay_iters) == (
        0,
        None,
        0.0,
        None,
    )
    assert (args.tensor_model_parallel_size, args.expert_tensor_parallel_size) == (1, None)
    assert (args.normalization, args.norm_epsilon, args.rotary_base, args.num_query_groups) == (
        "LayerNorm",
        1e-5,
        10000,
        1,
    )
    assert (args.add_bias_linear, args.bf16, args.moe_router_topk) == (True, False, 2)
    assert args.megatron_extra_argv == []


def test_megatron_model_script_is_accepted() -> None:
    # scripts/models/qwen3-4B.sh and the PERF_ARGS of scripts/run-qwen3-4B.sh in slime.
    model_args = shlex.split(
        "--swiglu --num-layers 36 --hidden-size 2560 --ffn-hidden-size 9728 --num-attention-heads 32 "
        "--group-query-attention --num-query-groups 8 --use-rotary-position-embeddings --disable-bias-linear "
        "--normalization RMSNorm --norm-epsilon 1e-6 --rotary-base 1000000 --vocab-size 151936 --kv-channels 128 "
        "--qk-layernorm --tensor-model-parallel-size 2 --sequence-parallel --pipeline-model-parallel-size 1 "
        "--context-parallel-size 1 --expert-model-parallel-size 1 --expert-tensor-parallel-size 1 "
        "--recompute-granularity full --recompute-method uniform --recompute-num-layers 1 "
        "--optimizer adam --lr-decay-style constant --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.98 "
        "--attention-dropout 0.0 --hidden-dropout 0.0 --accumulate-allreduce-grads-in-fp32 "
        "--attention-softmax-in-fp32 --attention-backend flash --use-distributed-optimizer "
        "--moe-token-dispatcher-type alltoall --moe-aux-loss-coeff 0.001 --moe-router-load-balancing-type aux_loss "
        "--no-rope-fusion --no-gradient-accumulation-fusion --moe-layer-freq [0]*3+[1]*33 --use-mcore-models "
        "--untie-embeddings-and-output-weights --make-vocab-size-divisible-by 64 --seq-length 4096 "
        "--spec slime_plugins.models.glm4 get_glm_spec --post-self-attn-layernorm --post-mlp-layernorm "
        "--deterministic-mode --tokenizer-type HuggingFaceTokenizer --tokenizer-model /m --bf16"
    )
    args = parse_args([*BASE, *model_args])
    assert (args.num_layers, args.hidden_size, args.num_query_groups, args.kv_channels) == (36, 2560, 8, 128)
    assert (args.normalization, args.norm_epsilon, args.rotary_base) == ("RMSNorm", 1e-6, 1000000)
    assert (args.add_bias_linear, args.qk_layernorm, args.swiglu, args.sequence_parallel) == (
        False,
        True,
        True,
        True,
    )
    assert (args.lr_decay_style, args.weight_decay, args.adam_beta2) == ("constant", 0.1, 0.98)
    assert (args.recompute_granularity, args.recompute_num_layers, args.attention_backend) == (
        "full",
        1,
        "flash",
    )
    assert args.moe_aux_loss_coeff == [0.001]
    assert args.spec == ["slime_plugins.models.glm4", "get_glm_spec"]
    assert args.no_rope_fusion is True and args.post_mlp_layernorm is True
    assert args.moe_layer_freq == "[0]*3+[1]*33"
    assert args.megatron_extra_argv == [
        "--no-rope-fusion",
        "--no-gradient-accumulation-fusion",
        "--moe-layer-freq",
        "[0]*3+[1]*33",
        "--use-mcore-models",
        "--post-self-attn-layernorm",
        "--post-mlp-layernorm",
    ]


def test_megatron_passthrough_values() -> None:
    args = parse_args(
        [*BASE, "--cp-comm-type", "p2p", "a2a", "--train-iters=100", "--init-method-std", "0.02"]
    )
    assert (args.cp_comm_type, args.train_iters, args.init_method_std) == (["p2p", "a2a"], 100, 0.02)
    assert args.megatron_extra_argv == [
        "--cp-comm-type",
        "p2p",
        "a2a",
        "--train-iters=100",
        "--init-method-std",
        "0.02",
    ]


def test_megatron_allow_list_does_not_shadow_defined_flags() -> None:
    parser = build_parser()
    defined = set(parser._option_string_actions)
    assert not MEGATRON_PASSTHROUGH_FLAGS & defined
    assert {
        "--no-load-optim",
        "--moe-layer-freq",
        "--recompute-activations",
        "--train-iters",
    } <= MEGATRON_PASSTHROUGH_FLAGS


def test_unknown_flag_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    err = _parse_error(capsys, [*BASE, "--no-such-flag", "3"])
    assert "unrecognized argument --no-such-flag" in err
    assert "--sglang-<name>" in err and "MEGATRON_PASSTHROUGH_FLAGS" in err


# --------------------------------------------------------------------------------------------------
# --custom-config-path
# --------------------------------------------------------------------------------------------------


def test_custom_config_adds_new_keys_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = tmp_path / "custom.yaml"
    config.write_text("my_reward_threshold: 0.5\nmy_tools: [search, python]\nrollout_batch_size: 999\n")
    with caplog.at_level(logging.WARNING, logger="services.core.arg_validation"):
        args = parse_args([*BASE, "--custom-config-path", str(config)])
    assert args.my_reward_threshold == 0.5
    assert args.my_tools == ["search", "python"]
    assert args.rollout_batch_size == 8
    assert any("rollout_batch_size" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(None, "cannot read"), ("a: [unclosed\n", "not valid YAML"), ("- a\n- b\n", "YAML mapping")],
)
def test_custom_config_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: str | None, fragment: str
) -> None:
    config = tmp_path / "custom.yaml"
    if content is not None:
        config.write_text(content)
    err = _parse_error(capsys, [*BASE, "--custom-config-path", str(config)])
    assert "--custom-config-path" in err and fragment in err


# --------------------------------------------------------------------------------------------------
# building parsers for services; custom arguments
# --------------------------------------------------------------------------------------------------


def test_service_parser_with_a_subset_of_groups() -> None:
    parser = new_parser(prog="slime serve reward-model")
    add_service_arguments(parser)
    add_slime_arguments(parser, groups=["Data", "Reward Model", "SGLang"], require_rollout_batch_size=False)
    args = parse_with_passthrough(
        parser, ["--port", "8001", "--rm-type", "math", "--sglang-foo", "1"], megatron=False
    )
    assert (args.port, args.rm_type, args.rollout_batch_size, args.sglang_foo) == (8001, "math", None, 1)
    assert (args.redis_url, args.run_id, args.host, args.log_level, args.engine_backend) == (
        None,
        "default",
        "127.0.0.1",
        "INFO",
        "auto",
    )
    assert not hasattr(args, "hf_checkpoint")
    with pytest.raises(SystemExit):
        parse_with_passthrough(parser, ["--num-layers", "2"], megatron=False)


def test_service_defaults_and_log_level_case() -> None:
    args = parse_args(
        [*BASE, "--log-level", "debug", "--redis-url", "unix:///tmp/r.sock", "--reward-grpc-addr", "h:50051"]
    )
    assert (args.log_level, args.redis_url, args.reward_grpc_addr) == (
        "DEBUG",
        "unix:///tmp/r.sock",
        "h:50051",
    )
    assert (args.auth_token, args.router_url, args.reward_url, args.port) == (None, None, None, None)


def test_unknown_group_is_rejected() -> None:
    with pytest.raises(ValueError, match="Rollouts"):
        add_slime_arguments(argparse.ArgumentParser(), groups=["Rollouts"])


def test_add_custom_arguments_come_first() -> None:
    def add_custom(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("--my-judge-url", type=str, default="http://judge:1")
        return parser

    args = parse_args([*BASE, "--my-judge-url", "http://other:2"], add_custom_arguments=add_custom)
    assert args.my_judge_url == "http://other:2"
    parser = build_parser(add_custom_arguments=add_custom)
    assert parser._actions[1].option_strings == ["--my-judge-url"]


def test_literal_value() -> None:
    assert [arguments.literal_value(v) for v in ("True", "false", "3", "-2", "1e-3", "fa3", "0x10")] == [
        True,
        False,
        3,
        -2,
        1e-3,
        "fa3",
        "0x10",
    ]


def test_docs_describe_every_flag() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "arguments.md").read_text(encoding="utf-8")
    for option in build_parser()._option_string_actions:
        if option not in ("-h", "--help"):
            assert f"`{option}`" in docs, option
