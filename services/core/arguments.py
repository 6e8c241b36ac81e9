"""slime's command-line surface: every slime flag in its original group, SGLang and Megatron pass-through and
the service flags, parsed and then validated and derived as slime's ``parse_args`` does (docs/arguments.md)."""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import re
import shlex
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn

from services.core import arg_validation

logger = logging.getLogger(__name__)

DEFAULT_ROLLOUT_FUNCTION_PATH = "slime.rollout.sglang_rollout.generate_rollout"

# SGLang server arguments slime sets for every engine itself, with the slime flag that decides each one.
SGLANG_MANAGED_FIELDS: dict[str, str] = {
    "model_path": "--hf-checkpoint",
    "dtype": "the checkpoint's dtype",
    "trust_remote_code": "always on",
    "random_seed": "--seed (plus the engine rank)",
    "enable_memory_saver": "--offload",
    "tp_size": "--rollout-num-gpus-per-engine",
    "tensor_parallel_size": "--rollout-num-gpus-per-engine",
    "port": "the engine's port allocation",
    "nnodes": "--rollout-num-gpus-per-engine and --num-gpus-per-node",
    "node_rank": "the engine's placement",
    "dist_init_addr": "the engine's port allocation",
    "gpu_id_step": "the engine's placement",
    "base_gpu_id": "the engine's placement",
    "nccl_port": "the engine's port allocation",
    "skip_server_warmup": "always on",
}

# Explicitly defined `--sglang-*` flags that are SGLang `ServerArgs` fields (as opposed to the router and
# concurrency settings slime keeps for itself); they join `args.sglang_passthrough` when set off-default.
SGLANG_SERVER_FIELDS = (
    "mem_fraction_static",
    "enable_deterministic_inference",
    "dp_size",
    "pp_size",
    "ep_size",
    "enable_metrics",
    "enable_dp_attention",
)

# Megatron-LM flags (megatron/training/arguments.py of core 0.14, 0.16 and main, plus the GLM4 norms of
# slime's Megatron patch and slime's --megatron-to-hf-mode) accepted as
# `--flag [VALUE ...]` without a typed definition here. They land on args as `flag_name` (values typed by
# literal parsing) and, verbatim and in order, in `args.megatron_extra_argv`, which the Megatron backend
# hands to Megatron's own parser for exact semantics. The common model/optimizer flags are defined
# with Megatron's types and defaults in the "Megatron" group instead and are not repeated here.
MEGATRON_PASSTHROUGH_FLAGS = frozenset(
    """
    --account-for-embedding-in-pipeline-split --account-for-loss-in-pipeline-split --adlr-autoresume
    --adlr-autoresume-interval --allow-ambiguous-pad-tokens --app-tag-run-name --app-tag-run-version
    --apply-layernorm-1p --apply-query-key-layer-scaling --apply-residual-connection-post-layernorm
    --apply-wd-to-qk-layernorm --async-save --auto-detect-ckpt-format --batch-size --bert-embedder-type
    --bert-load --bert-no-binary-head --biencoder-projection-dim --biencoder-shared-query-context-model
    --block-data-path --cache-mla-latents --calc-ft-timeouts --check-for-large-grads
    --check-for-spiky-loss --check-weight-hash-across-dp-replicas-interval --checkpoint-activations
    --ckpt-assume-constant-structure --ckpt-convert-format --ckpt-convert-save
    --ckpt-convert-update-legacy-dist-opt-format --ckpt-drop-redundant-extra-state --ckpt-format
    --ckpt-fully-parallel-load --ckpt-fully-parallel-save --ckpt-step --classes-fraction
    --config-logger-dir --cp-comm-type --create-all-gather-group --cross-entropy-fusion-impl
    --cross-entropy-loss-fusion --cuda-graph-modules --cuda-graph-scope --cuda-graph-warmup-steps
    --data-args-path --data-cache-path --data-parallel-random-init --data-parallel-sharding-strategy
    --data-path --data-per-class-fraction --dataloader-defer-npy-index-mmap --dataloader-fast-cache-load
    --dataloader-inter-document-masking --dataloader-type --ddp-average-in-collective --ddp-bucket-size
    --ddp-num-buckets --ddp-pad-buckets-for-high-nccl-busbw
    --ddp-param-name-patterns-for-fp32-local-accumulation --ddp-reduce-scatter-with-fp32-accumulation
    --decode-only-cuda-graphs --decoder-first-pipeline-num-layers --decoder-last-pipeline-num-layers
    --decoder-num-layers --decoder-seq-length --decoupled-lr --decoupled-min-lr
    --decrease-batch-size-if-needed --defer-embedding-wgrad-compute --delay-wgrad-compute
    --dino-bottleneck-size --dino-freeze-last-layer --dino-head-hidden-size --dino-local-crops-number
    --dino-local-img-size --dino-norm-last-layer --dino-teacher-temp --dino-warmup-teacher-temp
    --dino-warmup-teacher-temp-epochs --disable-bf16-reduced-precision-matmul --disable-chunked-prefill
    --disable-gloo-process-groups --disable-jit-fuser --disable-mamba-mem-eff-path --disable-msc
    --disable-straggler-on-startup --disable-symmetric-registration --disable-tp-comm-bulk-dgrad
    --disable-tp-comm-bulk-wgrad --disable-tp-comm-overlap-ag --disable-tp-comm-overlap-rs
    --disable-tp-comm-split-ag --disable-tp-comm-split-rs --dist-ckpt-format --dist-ckpt-strictness
    --dist-ckpt-workers --distribute-saved-activations --distributed-timeout-seconds-after-init
    --dump-param-to-param-group-map --embedding-init-method-std --embedding-path
    --empty-unused-memory-level --enable-chunked-prefill --enable-cuda-graph --enable-experimental
    --enable-ft-package --enable-full-sharding-in-hsdp --enable-msc --encoder-num-layers
    --encoder-seq-length --end-weight-decay --eod-mask-loss --error-injection-rate
    --error-injection-type --eval-iters --evidence-data-path --exit-duration-in-mins --exit-interval
    --exit-on-missing-checkpoint --exit-signal-handler --exp-avg-dtype --exp-avg-sq-dtype
    --external-cuda-graph --fake-process-group --fim-data --fim-eod-token --fim-fragment-rate
    --fim-middle-token --fim-no-prefix --fim-pad-token --fim-prefix-token --fim-rate --fim-split-sample
    --fim-spm-rate --fim-suffix-token --finetune --first-last-layers-bf16 --flash-decode
    --fp16-lm-cross-entropy --fp32-residual-connection --fp4-param-gather --fp8-amax-compute-algo
    --fp8-amax-history-len --fp8-format --fp8-interval --fp8-margin --fp8-param-gather --fp8-recipe
    --freeze-all-layers --fsdp-db-use-persist-buf-on-alloc-fail --fsdp-double-buffer
    --fsdp-manual-registration --ft-num-warmup-iters --full-validation --grad-reduce-in-bf16
    --grpo-clamp-eps-lower --grpo-clamp-eps-upper --grpo-entropy-term-weight
    --grpo-filter-groups-with-same-reward --grpo-group-size --grpo-iterations --grpo-kl-beta
    --grpo-prompts-per-step --gtp-expert-remat-nccl-ub --gtp-remat-nccl-ub
    --gtp-remat-reduce-scatter-with-fp32-accumulation --head-lr-mult
    --heterogeneous-layers-config-encoded-json --heterogeneous-layers-config-path
    --hierarchical-context-parallel-sizes --high-priority-stream-groups --hybrid-attention-ratio
    --hybrid-layer-pattern --hybrid-mlp-ratio --hybrid-override-pattern --hysteresis --ict-head-size
    --ict-load --img-h --img-w --indexer-batch-size --indexer-log-interval
    --inference-batch-times-seqlen-threshold --inference-coordinator-port
    --inference-cuda-graph-all-prefills --inference-cuda-graph-max-tokens
    --inference-disable-ep-consensus --inference-dynamic-batching
    --inference-dynamic-batching-async-sched-mode --inference-dynamic-batching-block-size
    --inference-dynamic-batching-buffer-guaranteed-fraction
    --inference-dynamic-batching-buffer-overflow-factor --inference-dynamic-batching-buffer-size-gb
    --inference-dynamic-batching-chunk-size --inference-dynamic-batching-cuda-graph-max-tokens
    --inference-dynamic-batching-cuda-graph-mixed-prefill-count
    --inference-dynamic-batching-cuda-graph-sizing-distribution
    --inference-dynamic-batching-logprobs-mode --inference-dynamic-batching-mamba-memory-ratio
    --inference-dynamic-batching-max-requests --inference-dynamic-batching-max-requests-override
    --inference-dynamic-batching-max-tokens --inference-dynamic-batching-max-tokens-override
    --inference-dynamic-batching-num-cuda-graphs --inference-dynamic-batching-paused-buffer-size-gb
    --inference-dynamic-batching-prefix-caching
    --inference-dynamic-batching-prefix-caching-coordinator-policy
    --inference-dynamic-batching-prefix-caching-eviction-policy
    --inference-dynamic-batching-prefix-caching-mamba-gb
    --inference-dynamic-batching-prefix-caching-routing-alpha
    --inference-dynamic-batching-sampling-backend
    --inference-dynamic-batching-track-generated-token-events
    --inference-dynamic-batching-track-paused-request-events
    --inference-dynamic-batching-unified-memory-level --inference-logging-step-interval
    --inference-max-batch-size --inference-max-requests --inference-max-seq-length
    --inference-rng-tracker --inference-shards --inference-text-gen-server-logging
    --inference-use-synchronous-zmq-collectives --inference-wandb-logging --init-method-std
    --init-method-xavier-uniform --init-model-with-meta-device --initial-loss-scale
    --inprocess-active-world-size --inprocess-barrier-timeout --inprocess-completion-timeout
    --inprocess-empty-cuda-cache --inprocess-granularity --inprocess-hard-timeout
    --inprocess-heartbeat-interval --inprocess-heartbeat-timeout --inprocess-last-call-wait
    --inprocess-max-iterations --inprocess-monitor-process-interval --inprocess-monitor-thread-interval
    --inprocess-progress-watchdog-interval --inprocess-restart --inprocess-soft-timeout
    --inprocess-termination-grace-time --is-hybrid-model --iter-per-epoch --iterations-to-skip
    --keep-fp8-transpose-cache --kitchen-config-file --kitchen-recipe-number --kv-lora-rank
    --langrl-env-config --langrl-external-server --langrl-inference-server-conversation-template
    --langrl-inference-server-type --lazy-mpu-init --legacy-tokenizer --linear-attention-freq
    --lion-beta1 --lion-beta2 --load-main-params-from-ckpt --load-model-opt-format --local-rank
    --log-energy --log-interval --log-memory-to-tensorboard --log-num-zeros-in-grad --log-params-norm
    --log-progress --log-straggler --log-throughput --log-timers-to-tensorboard
    --log-validation-ppl-to-tensorboard --log-world-size-to-tensorboard --logging-level
    --logits-load-decode-threads --logits-load-dir --logits-load-ignore-errors
    --logits-load-kd-loss-alpha --logits-load-msc-prefetch-depth --logits-load-prefetch-factor
    --logits-save-dir --logits-save-dtype --logits-save-top-k --logits-save-top-p
    --logits-save-top-p-min-k --loss-scale --loss-scale-window --lr-decay-samples --lr-warmup-init
    --lr-warmup-samples --lr-wsd-decay-iters --lr-wsd-decay-samples --lr-wsd-decay-style
    --main-grads-dtype --main-params-dtype --mamba-head-dim --mamba-inference-conv-states-dtype
    --mamba-inference-ssm-states-dtype --mamba-num-groups --mamba-num-heads --mamba-state-dim
    --mamba-training-ssm-states-dtype --manual-gc --manual-gc-interval --mask-factor --mask-prob
    --mask-type --max-tokens-to-oom --megatron-fsdp-enable-fine-grained-param-gather
    --megatron-fsdp-grad-comm-dtype --megatron-fsdp-main-grads-dtype --megatron-fsdp-main-params-dtype
    --megatron-fsdp-max-pool-double-buffer --megatron-fsdp-version --megatron-to-hf-mode
    --memory-snapshot-path --merge-file --microbatch-group-size-per-virtual-pipeline-stage
    --mid-level-dataset-surplus --min-loss-scale --mla-down-proj-fusion --mlp-chunks-for-prefill
    --mock-data --model-parallel-size --moe-apply-probs-on-input --moe-deepep-num-sms
    --moe-enable-deepep --moe-expert-capacity-factor --moe-extended-tp --moe-input-jitter-eps
    --moe-layer-freq --moe-layer-recompute --moe-pad-expert-input-to-capacity
    --moe-pad-experts-for-cuda-graph-inference --moe-per-layer-logging --moe-router-force-load-balancing
    --moe-router-fusion --moe-router-group-topk --moe-router-num-groups --moe-router-padding-for-fp8
    --moe-shared-expert-overlap --moe-token-drop-policy --moe-upcycling-granularity
    --moe-use-legacy-grouped-gemm --moe-use-upcycling --moe-z-loss-coeff --mrope-section --mscale
    --mscale-all-dim --mtp-loss-scaling-factor --mtp-num-layers --multi-latent-attention
    --multiple-validation-sets --muon-coefficient-type --muon-extra-scale-factor --muon-fp32-matmul-prec
    --muon-momentum --muon-nesterov --muon-no-split-qkv --muon-num-ns-steps --muon-scalar-optimizer
    --muon-scale-mode --muon-tp-mode --muon-use-nesterov --muon-use-syrk --nccl-all-reduce-for-prefill
    --nccl-communicator-config-path --no-align-grad-reduce --no-align-param-gather
    --no-async-tensor-model-parallel-allreduce --no-barrier-with-level-1-timing --no-bias-dropout-fusion
    --no-bias-gelu-fusion --no-bias-swiglu-fusion --no-check-for-nan-in-loss-and-grad
    --no-ckpt-fully-parallel-save --no-clone-scatter-output-in-embedding
    --no-create-attention-mask-in-dataloader --no-data-sharding --no-fp8-wgrad
    --no-gradient-accumulation-fusion --no-gradient-reduce-div-fusion --no-initialization
    --no-load-optim --no-load-rng --no-log-loss-scale-to-tensorboard --no-manual-gc-eval
    --no-masked-softmax-fusion --no-mmap-bin-files --no-one-logger --no-overlap-p2p-communication
    --no-persist-layer-norm --no-pin-cpu-grads --no-pin-cpu-params --no-position-embedding
    --no-rope-freq --no-rope-fusion --no-save-optim --no-save-rng
    --no-scatter-gather-tensors-in-pipeline --no-strict-fsdp-dtensor-load
    --no-use-layer-wise-param-layout --no-use-tokenizer-model-from-checkpoint-args
    --no-weight-decay-cond-type --no-yarn-correction-range-round-to-int --non-persistent-ckpt-type
    --non-persistent-global-ckpt-dir --non-persistent-local-ckpt-algo --non-persistent-local-ckpt-dir
    --non-persistent-save-interval --num-channels --num-classes --num-dataset-builder-threads
    --num-distributed-optimizer-instances --num-layers-at-end-in-bf16 --num-layers-at-start-in-bf16
    --num-layers-per-virtual-pipeline-stage --num-speculative-tokens
    --num-virtual-stages-per-pipeline-rank --num-workers --object-storage-cache-path --one-logger-async
    --one-logger-project --one-logger-run-name --onnx-safe --openai-gelu --optimizer-cuda-graph
    --optimizer-offload-fraction --otel-enabled --otel-service-name --otel-span-groups
    --outer-dp-sharding-strategy --output-bert-embeddings --output-logit-dtype --overlap-grad-reduce
    --overlap-moe-expert-parallel-comm --overlap-p2p-communication-warmup-flush --overlap-param-gather
    --overlap-param-gather-with-optimizer-step --override-ckpt-iteration --override-opt_param-scheduler
    --patch-dim --per-dataset-sequences-path --per-split-data-args-path --perform-rl-step
    --persistent-save-interval --phase-transition-iterations --pipeline-model-parallel-comm-backend
    --pipeline-model-parallel-layout --post-mlp-layernorm --post-self-attn-layernorm
    --pretrained-checkpoint --profile --profile-ranks --profile-step-end --profile-step-start
    --q-lora-rank --qk-head-dim --qk-l2-norm --qk-pos-emb-head-dim --query-in-block-prob --quick-geglu
    --rampup-batch-size --recompute-activations --recompute-modules --record-memory-history
    --refit-method --relative-attention-max-distance --relative-attention-num-buckets --replication
    --replication-factor --replication-jump --rerun-mode --reset-attention-mask --reset-position-ids
    --result-rejected-tracker-filename --retriever-report-topk-accuracies --retriever-score-scaling
    --retriever-seq-length --retro-add-retriever --retro-attention-gate --retro-cyclic-train-iters
    --retro-encoder-attention-dropout --retro-encoder-hidden-dropout --retro-encoder-layers
    --retro-no-verify-neighbor-count --retro-num-neighbors --retro-num-retrieved-chunks
    --retro-project-dir --reuse-grad-buf-for-mxfp8-param-ag --rl-consumption-granularity
    --rl-default-temperature --rl-default-top-k --rl-default-top-p --rl-durable-rollout-bank
    --rl-generation-lag --rl-importance-sampling-truncation-coef
    --rl-inference-expert-model-parallel-size --rl-inference-expert-tensor-model-parallel-size
    --rl-inference-logprobs-is-correction --rl-inference-model-unified-memory-level
    --rl-inference-parsers --rl-inference-pipeline-model-parallel-size
    --rl-inference-tensor-model-parallel-size --rl-kv-cache-management-mode --rl-max-inflight-requests
    --rl-offload-inference-model-weights-when-idle --rl-offload-kv-cache-during-training
    --rl-offload-optimizer-during-inference --rl-parallel-generation-tasks --rl-partial-rollouts
    --rl-persist-cuda-graphs --rl-profile --rl-profile-dir --rl-prompts-per-eval
    --rl-remove-kv-cache-during-training --rl-reset-cuda-graphs --rl-rollout-bank-dir
    --rl-rollout-bank-max-bytes --rl-sequence-packing-algo --rl-sequence-packing-max-sequences-per-bin
    --rl-skip-bos-token --rl-submission-granularity --rl-training-cuda-graphs --rl-use-sequence-packing
    --rl-verify-model-weights-swap --rope-scaling-factor --rope-type --rotary-interleaved
    --rotary-percent --rotary-scaling-factor --rotary-seq-len-interpolation-factor
    --run-workload-inspector-server --sample-rate --save-retain-interval --sft
    --sft-tokenizer-prompt-format --sgd-momentum --sharp-enabled-group --short-seq-prob --skip-train
    --split --squared-relu --start-weight-decay --straggler-ctrlr-port --straggler-minmax-count
    --suggested-communication-unit-size --swin-backbone-type --symmetric-ar-type
    --te-precision-config-file --te-rng-tracker --tensorboard-dir --tensorboard-log-interval
    --tensorboard-queue-size --test-data-path --test-mode --tiktoken-num-special-tokens
    --tiktoken-pattern --tiktoken-special-tokens --timing-log-level --timing-log-option
    --titles-data-path --tokenizer-hf-include-special-tokens --tokenizer-hf-use-fast
    --tokenizer-metadata --tokenizer-sentencepiece-legacy --tokenizer-special-tokens
    --torch-fsdp2-no-reshard-after-forward --tp-comm-bootstrap-backend --tp-comm-overlap
    --tp-comm-overlap-cfg --tp-comm-overlap-rs-dgrad --train-data-path --train-iters --train-samples
    --train-sync-interval --transformer-impl --trust-remote-code --use-checkpoint-args
    --use-checkpoint-opt_param-scheduler --use-cpu-initialization --use-dist-ckpt --use-flash-attn
    --use-fused-weighted-squared-relu --use-legacy-models --use-legacy-static-engine --use-mcore-models
    --use-megatron-fsdp --use-mp-args-from-checkpoint-args --use-nccl-ub --use-one-sent-docs
    --use-persistent-ckpt-worker --use-pytorch-profiler --use-ring-exchange-p2p --use-rope-scaling
    --use-same-sampling-seed-across-dp-ranks --use-sharp --use-torch-fsdp2
    --use-torch-optimizer-for-cpu-offload --use-tp-pp-dp-mapping --v-head-dim --valid-data-path
    --vision-backbone-type --vision-pretraining --vision-pretraining-type --vocab-extra-ids --vocab-file
    --wandb-exp-name --wandb-save-dir --warmup --weight-decay-incr-style --wgrad-deferral-limit
    --window-attn-skip-freq --window-size --yaml-cfg --yarn-beta-fast --yarn-beta-slow
    --yarn-correction-range-round-to-int --yarn-original-max-position-embeddings
    """.split()  # noqa: SIM905 - a wrapped block of 600+ names reads better than one name per line
)

# A negative number is a value, not a flag (`--sglang-foo -1`).
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class SlimeArgumentParser(argparse.ArgumentParser):
    """ArgumentParser whose ``@file`` lines are split like a shell line: quotes, ``#`` comments and trailing
    ``\\`` continuations, so flags copied out of a slime run script work unchanged."""

    def convert_arg_line_to_args(self, arg_line: str) -> list[str]:
        line = arg_line.strip()
        if line.endswith("\\"):
            line = line[:-1]
        try:
            return shlex.split(line, comments=True)
        except ValueError as exc:
            self.error(f"cannot split argument-file line {arg_line!r}: {exc}")

    def error(self, message: str) -> NoReturn:
        # The full usage line lists hundreds of flags; the message already names the one at fault.
        self.exit(2, f"{self.prog}: error: {message}\n(see `{self.prog} --help` for every flag)\n")


def new_parser(prog: str | None = None, description: str | None = None) -> SlimeArgumentParser:
    """An empty parser as slime's: ``@file`` arguments, one-line errors, no flag abbreviations."""
    # allow_abbrev=False as in Megatron: a prefix of a flag must never silently match another flag.
    return SlimeArgumentParser(
        prog=prog, description=description, fromfile_prefix_chars="@", allow_abbrev=False
    )


# --------------------------------------------------------------------------------------------------
# slime's groups, in the order and with the names of the seed list
# --------------------------------------------------------------------------------------------------


def _add_cluster(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--actor-num-nodes", type=int, default=1, help="Number of nodes for the training actor."
    )
    group.add_argument(
        "--actor-num-gpus-per-node",
        type=int,
        default=8,
        help="Number of GPUs per node for the training actor.",
    )
    group.add_argument(
        "--critic-num-nodes",
        type=int,
        default=None,
        help="Number of nodes for the critic (PPO). Defaults to --actor-num-nodes.",
    )
    group.add_argument(
        "--critic-num-gpus-per-node",
        type=int,
        default=None,
        help="Number of GPUs per node for the critic (PPO). Defaults to --actor-num-gpus-per-node.",
    )
    group.add_argument(
        "--rollout-num-gpus",
        type=int,
        default=None,
        help=(
            "Total number of GPUs used for inference. Ignored under --colocate, where it becomes "
            "actor_num_gpus_per_node * actor_num_nodes (plus the critic's GPUs for PPO)."
        ),
    )
    group.add_argument(
        "--rollout-num-gpus-per-engine",
        type=int,
        default=1,
        help="Number of GPUs per inference engine, i.e. SGLang's tp_size.",
    )
    group.add_argument(
        "--num-gpus-per-node",
        type=int,
        default=8,
        help="Number of GPUs per node for rollout; set it under --colocate when a node has fewer than 8 GPUs.",
    )
    group.add_argument(
        "--colocate",
        action="store_true",
        default=False,
        help="Put the inference engines on the actor's GPUs. Also turns on --offload.",
    )
    group.add_argument(
        "--offload",
        action="store_true",
        default=False,
        help=(
            "Offload the rollout engines and the training actor to CPU while the other one runs. "
            "Always on under --colocate."
        ),
    )
    group.add_argument("--distributed-backend", type=str, default="nccl", help="torch.distributed backend.")
    group.add_argument(
        "--distributed-timeout-minutes",
        type=int,
        default=10,
        help="Timeout of torch.distributed calls, in minutes.",
    )


def _add_train(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--train-backend",
        type=str,
        choices=["megatron", "fsdp"],
        default="megatron",
        help="Training backend: Megatron-core, or torch FSDP2.",
    )
    group.add_argument(
        "--true-on-policy-mode",
        action="store_true",
        default=False,
        help="Make training and inference numerically identical (SGLang batch-invariant kernels; FSDP only).",
    )


def _add_rollout(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--hf-checkpoint",
        type=str,
        default=None,
        help=(
            "Hugging Face checkpoint of the trained model. It initialises the inference engines and provides the "
            "tokenizer; the trainer pushes its own weights to the engines before the first rollout, so it only "
            "needs the right architecture, not the latest parameters."
        ),
    )
    group.add_argument(
        "--use-hf-config-for-megatron",
        action="store_true",
        help="Derive the Megatron model architecture from the Hugging Face config.",
    )
    group.add_argument(
        "--model-name",
        type=str,
        default=None,
        help=(
            "Model name used to convert Megatron weights to Hugging Face names. Defaults to the lower-cased "
            "class name of the --hf-checkpoint config."
        ),
    )
    group.add_argument(
        "--rollout-function-path",
        type=str,
        default=DEFAULT_ROLLOUT_FUNCTION_PATH,
        help=(
            "Dotted path of the rollout function, called as fn(args, rollout_id, data_source, evaluation=False) "
            "and returning RolloutFnTrainOutput (or list[list[Sample]]); each sample needs at least tokens, "
            "response_length, reward and status."
        ),
    )
    group.add_argument(
        "--rollout-temperature",
        type=float,
        default=1.0,
        help="Sampling temperature of the engines during rollout.",
    )
    group.add_argument(
        "--rollout-top-p", type=float, default=1.0, help="Top-p of the engines during rollout."
    )
    group.add_argument("--rollout-top-k", type=int, default=-1, help="Top-k of the engines during rollout.")
    group.add_argument(
        "--rollout-max-context-len",
        type=int,
        default=None,
        help="Maximum context length during rollout; must not exceed the model's max_position_embeddings.",
    )
    group.add_argument(
        "--rollout-max-prompt-len",
        type=int,
        default=None,
        help="Prompts longer than this many tokens are dropped when the global dataset is loaded.",
    )
    group.add_argument(
        "--rollout-max-response-len",
        type=int,
        default=1024,
        help="Maximum response length during rollout (SGLang's max_new_tokens).",
    )
    group.add_argument(
        "--rollout-skip-special-tokens",
        action="store_true",
        default=False,
        help="Skip special tokens in the decoded response (useful when a response becomes the next prompt).",
    )
    group.add_argument(
        "--rollout-stop",
        type=str,
        nargs="+",
        default=None,
        help="Stop strings for rollout; use --rollout-stop-token-ids for special tokens.",
    )
    group.add_argument(
        "--rollout-stop-token-ids", type=int, nargs="+", default=None, help="Stop token ids for rollout."
    )
    group.add_argument(
        "--rollout-shuffle", action="store_true", default=False, help="Shuffle the prompts every epoch."
    )
    group.add_argument(
        "--rollout-seed", type=int, default=42, help="Seed of prompt shuffling and of deterministic sampling."
    )
    group.add_argument(
        "--over-sampling-batch-size",
        type=int,
        default=None,
        help=(
            "Number of prompt groups submitted at a time whenever fewer than the target are in flight, whatever "
            "the filters or partial rollout do. Defaults to --rollout-batch-size and must not be smaller."
        ),
    )
    group.add_argument(
        "--dynamic-sampling-filter-path",
        type=str,
        default=None,
        help=(
            "Dotted path of the dynamic-sampling filter fn(args, samples) -> DynamicFilterOutput | bool, "
            "e.g. slime.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std (DAPO)."
        ),
    )
    group.add_argument(
        "--partial-rollout",
        action="store_true",
        default=False,
        help="Return unfinished samples to the buffer when a rollout is aborted, to continue them later.",
    )
    group.add_argument(
        "--custom-generate-function-path",
        type=str,
        default=None,
        help=(
            "Dotted path of an async generate(args, sample, sampling_params) that replaces the default "
            "single-turn generation inside the default rollout (multi-turn, tool calls, ...)."
        ),
    )
    group.add_argument(
        "--buffer-filter-path",
        type=str,
        default=None,
        help="Dotted path of the function selecting groups from the partial-rollout buffer.",
    )
    group.add_argument(
        "--update-weight-buffer-size",
        type=int,
        default=512 * 1024**2,
        help="Bucket size in bytes for chunked weight updates to the engines.",
    )
    group.add_argument(
        "--update-weights-interval", type=int, default=1, help="Push weights to the engines every N rollouts."
    )
    group.add_argument(
        "--keep-old-actor",
        action="store_true",
        help="Keep a copy of the rollout-time actor weights for computing old log-probs.",
    )
    group.add_argument(
        "--rollout-data-postprocess-path",
        type=str,
        default=None,
        help="Dotted path of fn(args) called once all rollout data, log-probs included, is ready.",
    )
    group.add_argument(
        "--rollout-external",
        action="store_true",
        default=False,
        help="Use inference engines that someone else runs instead of starting them.",
    )
    group.add_argument(
        "--rollout-external-engine-addrs",
        type=str,
        default=None,
        nargs="+",
        help="host:port of each external engine.",
    )


def _add_fault_tolerance(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--use-fault-tolerance",
        action="store_true",
        default=False,
        help="Probe the engines during rollout and restart the ones that stop answering.",
    )
    group.add_argument(
        "--rollout-health-check-interval",
        type=float,
        default=30.0,
        help="Seconds between /health_generate probes of each engine.",
    )
    group.add_argument(
        "--rollout-health-check-timeout",
        type=float,
        default=30.0,
        help="Seconds to wait for a /health_generate answer before the engine is declared dead.",
    )
    group.add_argument(
        "--rollout-health-check-first-wait",
        type=float,
        default=300.0,
        help="Seconds to wait (compilation, warm-up) before the first probe.",
    )


def _add_data(group: argparse._ArgumentGroup, *, require_rollout_batch_size: bool = True) -> None:
    group.add_argument("--num-rollout", type=int, default=None, help="Number of rollout steps.")
    group.add_argument(
        "--num-epoch",
        type=int,
        default=None,
        help=(
            "Number of epochs over --prompt-data; when --num-rollout is not given the driver sets "
            "num_rollout = num_epoch * len(dataset) // rollout_batch_size."
        ),
    )
    group.add_argument(
        "--disable-rollout-global-dataset",
        action="store_false",
        dest="rollout_global_dataset",
        help=(
            "Do not load --prompt-data as the global prompt dataset; the custom rollout function then has to "
            "manage its own data."
        ),
    )
    group.add_argument(
        "--prompt-data",
        type=str,
        default=None,
        help=(
            "Prompt dataset (.jsonl or .parquet, optional row slice path@[start:end]); each row holds "
            "--input-key and --label-key. With --apply-chat-template the input is an OpenAI-style message list."
        ),
    )
    group.add_argument(
        "--apply-chat-template",
        action="store_true",
        default=False,
        help="Apply the tokenizer's chat template to the prompt messages.",
    )
    group.add_argument("--input-key", type=str, default="input", help="Dataset key of the prompt.")
    group.add_argument("--label-key", type=str, default=None, help="Dataset key of the label.")
    group.add_argument(
        "--multimodal-keys",
        type=json.loads,
        default=None,
        help='JSON mapping of media type to dataset key, e.g. \'{"image": "image_file"}\'.',
    )
    group.add_argument("--metadata-key", type=str, default="metadata", help="Dataset key of the metadata.")
    group.add_argument(
        "--tool-key",
        type=str,
        default=None,
        help="Dataset key of the tools passed to apply_chat_template.",
    )
    group.add_argument(
        "--start-rollout-id",
        type=int,
        default=None,
        help="First rollout step; read from --load when resuming, otherwise 0.",
    )
    group.add_argument(
        "--rollout-batch-size",
        type=int,
        required=require_rollout_batch_size,
        help="Number of prompts per rollout step; a rollout returns rollout_batch_size * n_samples_per_prompt samples.",
    )
    group.add_argument(
        "--n-samples-per-prompt", type=int, default=1, help="Number of responses generated per prompt."
    )
    group.add_argument(
        "--global-batch-size",
        type=int,
        default=None,
        help=(
            "Samples (not prompts) per optimizer step. Derived from --num-steps-per-rollout when given, "
            "otherwise rollout_batch_size * n_samples_per_prompt (one step per rollout)."
        ),
    )
    group.add_argument(
        "--num-steps-per-rollout",
        type=int,
        default=None,
        help="Optimizer steps per rollout; sets global_batch_size = rollout_batch_size * n_samples_per_prompt // N.",
    )
    group.add_argument(
        "--micro-batch-size",
        type=int,
        default=1,
        help="Micro-batch size; ignored with --use-dynamic-batch-size.",
    )
    group.add_argument(
        "--balance-data",
        action="store_true",
        default=False,
        help="Balance tokens across data-parallel ranks (Karmarkar-Karp), keeping a prompt's samples together.",
    )
    group.add_argument(
        "--use-dynamic-batch-size",
        action="store_true",
        default=False,
        help="Pack micro-batches up to --max-tokens-per-gpu tokens instead of a fixed micro-batch size.",
    )
    group.add_argument(
        "--max-tokens-per-gpu",
        type=int,
        default=None,
        help="Token budget per GPU for dynamic batching; with context parallelism about max_response_len // cp_size.",
    )
    group.add_argument(
        "--log-probs-max-tokens-per-gpu",
        type=int,
        default=None,
        help="Token budget per GPU when computing log-probs; defaults to --max-tokens-per-gpu.",
    )


def _add_eval(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--eval-function-path",
        type=str,
        default=None,
        help="Dotted path of the eval generation function; defaults to --rollout-function-path.",
    )
    group.add_argument("--eval-interval", type=int, default=None, help="Evaluate every N rollouts.")
    group.add_argument(
        "--eval-prompt-data",
        type=str,
        default=None,
        nargs="+",
        help="Eval datasets as name/path pairs, e.g. aime /data/aime.jsonl (a single path is named aime).",
    )
    group.add_argument("--eval-input-key", type=str, default=None, help="Dataset key of the eval prompt.")
    group.add_argument("--eval-label-key", type=str, default=None, help="Dataset key of the eval label.")
    group.add_argument("--eval-tool-key", type=str, default=None, help="Dataset key of the eval tools.")
    group.add_argument(
        "--n-samples-per-eval-prompt", type=int, default=1, help="Number of responses per eval prompt."
    )
    group.add_argument(
        "--eval-temperature", type=float, default=None, help="Eval temperature (else rollout's)."
    )
    group.add_argument("--eval-top-p", type=float, default=None, help="Eval top-p (else rollout's).")
    group.add_argument("--eval-top-k", type=int, default=None, help="Eval top-k (else rollout's).")
    group.add_argument(
        "--eval-max-response-len",
        type=int,
        default=None,
        help="Eval maximum response length (else rollout's).",
    )
    group.add_argument(
        "--eval-min-new-tokens",
        type=int,
        default=None,
        help="Minimum new tokens during eval (parsed, unused).",
    )


def _add_algo(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--ref-load",
        type=str,
        default=None,
        help="Checkpoint of the reference model; also the starting checkpoint when --load holds none.",
    )
    group.add_argument(
        "--ref-ckpt-step", type=int, default=None, help="Checkpoint step of the reference model."
    )
    group.add_argument(
        "--load", type=str, default=None, help="Checkpoint directory to resume the actor from."
    )
    group.add_argument("--save", type=str, default=None, help="Checkpoint directory to save the actor to.")
    group.add_argument(
        "--save-interval", type=int, default=None, help="Save every N rollouts (needs --save)."
    )
    group.add_argument("--seed", type=int, default=1234, help="Random seed of the trainer.")
    group.add_argument("--clip-grad", type=float, default=1.0, help="Gradient clipping by global L2 norm.")
    group.add_argument(
        "--calculate-per-token-loss",
        action="store_true",
        help="Average the loss over tokens instead of per-sample means.",
    )
    group.add_argument("--lr", type=float, default=1e-6, help="Learning rate.")
    group.add_argument(
        "--num-critic-only-steps", type=int, default=0, help="Train only the critic for the first N rollouts."
    )
    group.add_argument(
        "--critic-load", type=str, default=None, help="Checkpoint of the critic (default --load)."
    )
    group.add_argument("--critic-save", type=str, default=None, help="Directory to save the critic to.")
    group.add_argument("--critic-lr", type=float, default=None, help="Critic learning rate (default --lr).")
    group.add_argument(
        "--critic-lr-warmup-iters",
        type=int,
        default=0,
        help="Iterations of linear learning-rate warm-up for the critic.",
    )
    group.add_argument("--eps-clip", type=float, default=0.2, help="PPO clip range.")
    group.add_argument(
        "--eps-clip-high", type=float, default=None, help="PPO upper clip range (defaults to --eps-clip)."
    )
    group.add_argument(
        "--eps-clip-c",
        type=float,
        default=None,
        help="Lower bound c > 1 of dual-clip PPO (https://arxiv.org/abs/1912.09729).",
    )
    group.add_argument("--value-clip", type=float, default=0.2, help="Clip range of the value loss.")
    group.add_argument(
        "--kl-coef",
        type=float,
        default=0.00,
        help="KL penalty coefficient for reward shaping, applied before advantages are computed.",
    )
    group.add_argument(
        "--loss-type",
        type=str,
        choices=["policy_loss", "sft_loss", "custom_loss"],
        default="policy_loss",
        help="Loss: PPO policy loss, SFT loss, or --custom-loss-function-path.",
    )
    group.add_argument(
        "--custom-loss-function-path",
        type=str,
        default=None,
        help="Dotted path of the loss used with --loss-type custom_loss.",
    )
    group.add_argument(
        "--kl-loss-type",
        type=str,
        choices=["k1", "k2", "k3", "low_var_kl"],
        default="k1",
        help="KL estimator of the KL loss.",
    )
    group.add_argument(
        "--advantage-estimator",
        type=str,
        choices=["grpo", "gspo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "ppo"],
        default="grpo",
        help="Advantage estimator; ppo also trains a critic.",
    )
    group.add_argument(
        "--disable-compute-advantages-and-returns",
        action="store_false",
        dest="compute_advantages_and_returns",
        help="Skip log-prob recomputation and advantages (SFT or a custom loss).",
    )
    group.add_argument("--use-kl-loss", action="store_true", default=False, help="Add GRPO's KL loss.")
    group.add_argument(
        "--kl-loss-coef",
        type=float,
        default=0.0,
        help="Coefficient of the KL loss added to the policy loss.",
    )
    group.add_argument(
        "--ref-update-interval",
        type=int,
        default=None,
        help="Copy the actor into the reference model every N rollouts (never when unset).",
    )
    group.add_argument("--entropy-coef", type=float, default=0.0, help="Entropy loss coefficient.")
    group.add_argument("--gamma", type=float, default=1.0, help="Discount gamma (PPO GAE, REINFORCE++).")
    group.add_argument("--lambd", type=float, default=1.0, help="GAE lambda (PPO).")
    group.add_argument(
        "--normalize-advantages",
        action="store_true",
        default=False,
        help="Whiten advantages over the data-parallel group.",
    )
    group.add_argument(
        "--disable-grpo-std-normalization",
        action="store_false",
        dest="grpo_std_normalization",
        help="Do not divide group-normalised rewards by their std (Dr. GRPO, https://arxiv.org/abs/2503.20783).",
    )
    group.add_argument(
        "--disable-rewards-normalization",
        action="store_false",
        dest="rewards_normalization",
        help="Do not normalise rewards within each prompt group.",
    )
    group.add_argument(
        "--use-rollout-entropy",
        action="store_true",
        default=False,
        help="Also compute the entropy when computing actor and reference log-probs.",
    )
    group.add_argument(
        "--use-tis",
        action="store_true",
        default=False,
        help="Truncated importance sampling against the rollout log-probs (https://fengyao.notion.site/off-policy-rl).",
    )
    group.add_argument(
        "--tis-clip", type=float, default=2.0, help="Upper clip C of the importance-sampling ratio."
    )
    group.add_argument(
        "--tis-clip-low", type=float, default=0, help="Lower clip of the importance-sampling ratio."
    )
    group.add_argument(
        "--custom-tis-function-path",
        type=str,
        default=None,
        help="Dotted path of a function computing the importance-sampling weights.",
    )
    group.add_argument(
        "--use-routing-replay",
        action="store_true",
        default=False,
        help="Replay the MoE routing decisions recorded during the old-log-prob pass in training.",
    )


def _add_router(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--use-slime-router",
        action="store_true",
        default=False,
        help="Route text requests with SlimeRouter instead of SGLang's token router.",
    )
    group.add_argument(
        "--slime-router-middleware-paths",
        type=str,
        nargs="+",
        default="",
        help="Dotted paths of the router middlewares.",
    )


def _add_wandb(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--use-wandb", action="store_true", default=False, help="Log to Weights & Biases.")
    group.add_argument(
        "--wandb-mode",
        type=str,
        default=None,
        choices=["online", "offline", "disabled"],
        help="W&B mode (overrides WANDB_MODE).",
    )
    group.add_argument("--wandb-dir", type=str, default=None, help="W&B log directory (default ./wandb).")
    group.add_argument("--wandb-key", type=str, default=None, help="W&B API key.")
    group.add_argument("--wandb-host", type=str, default=None, help="W&B host.")
    group.add_argument("--wandb-team", type=str, default=None, help="W&B team (entity).")
    group.add_argument("--wandb-group", type=str, default=None, help="W&B group.")
    group.add_argument("--wandb-project", type=str, default=None, help="W&B project.")
    group.add_argument(
        "--disable-wandb-random-suffix",
        action="store_false",
        dest="wandb_random_suffix",
        default=True,
        help="Do not append a random 6-character suffix to the W&B run name.",
    )
    group.add_argument(
        "--wandb-always-use-train-step",
        action="store_true",
        default=False,
        help="Use the train step as the step metric of every W&B series, not the rollout step.",
    )
    group.add_argument(
        "--log-multi-turn", action="store_true", default=False, help="Log multi-turn rollout statistics."
    )
    group.add_argument(
        "--log-passrate", action="store_true", default=False, help="Log pass@k of the rollouts."
    )
    group.add_argument(
        "--log-reward-category",
        type=str,
        default=None,
        help="Key of the reward dict whose values are logged as categories (e.g. why a reward failed).",
    )
    group.add_argument(
        "--wandb-run-id", type=str, default=None, help="W&B run id: resume that run (or start it)."
    )


def _add_tensorboard(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--use-tensorboard", action="store_true", default=False, help="Log to TensorBoard.")
    group.add_argument(
        "--tb-project-name",
        type=str,
        default=None,
        help="TensorBoard project directory (default: $TENSORBOARD_DIR).",
    )
    group.add_argument("--tb-experiment-name", type=str, default=None, help="TensorBoard experiment name.")


def _add_debug(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--save-debug-rollout-data",
        type=str,
        default=None,
        help="Save each rollout's samples to this template, formatted with {rollout_id}.",
    )
    group.add_argument(
        "--load-debug-rollout-data",
        type=str,
        default=None,
        help="Load rollouts from this {rollout_id} template instead of generating; implies --debug-train-only.",
    )
    group.add_argument(
        "--debug-rollout-only",
        action="store_true",
        default=False,
        help="Only generate rollouts, never train (turns --colocate and --offload off).",
    )
    group.add_argument(
        "--debug-train-only",
        action="store_true",
        default=False,
        help="Only train, start no inference engines.",
    )
    group.add_argument(
        "--save-debug-train-data",
        type=str,
        default=None,
        help="Save each rank's train data to this template, formatted with {rollout_id} and {rank}.",
    )
    group.add_argument(
        "--dump-details",
        type=str,
        default=None,
        help="Directory to dump rollout and train data (and the tokenizer) for post-hoc analysis.",
    )
    group.add_argument(
        "--memory-snapshot-dir",
        type=str,
        default=".",
        help="Directory of the CUDA memory snapshots --record-memory-history writes (on OOM and at shutdown).",
    )


def _add_network(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--http-proxy", type=str, default=None, help="HTTP proxy (parsed, unused by slime).")
    group.add_argument(
        "--use-distributed-post",
        action="store_true",
        default=False,
        help="Post generations from --num-gpus-per-node rollout-worker processes (embedded stack), not one client.",
    )


def _add_reward_model(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--rm-type",
        type=str,
        default=None,
        help="Built-in reward: remote_rm, deepscaler, dapo, math, f1 (prefix boxed_ to grade the last \\boxed{}).",
    )
    group.add_argument(
        "--reward-key",
        type=str,
        default=None,
        help="Key of the reward value when the reward model returns a dict.",
    )
    group.add_argument(
        "--eval-reward-key", type=str, default=None, help="--reward-key for eval (defaults to --reward-key)."
    )
    group.add_argument("--group-rm", action="store_true", default=False, help="Score a whole group at once.")
    group.add_argument(
        "--rm-url",
        type=str,
        default=None,
        help="URL of the reward service for --rm-type remote_rm, e.g. http://localhost:8000.",
    )
    group.add_argument(
        "--custom-rm-path",
        type=str,
        default=None,
        help="Dotted path of an async reward fn(args, sample) -> float | dict; takes precedence over --rm-type.",
    )
    group.add_argument(
        "--custom-reward-post-process-path",
        type=str,
        default=None,
        help="Dotted path of fn(args, samples) -> (raw_rewards, rewards), replacing the GRPO normalisation.",
    )


def _add_rollout_buffer(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--rollout-buffer-url", type=str, default=None, help="URL of the rollout buffer.")
    group.add_argument(
        "--fetch-trajectory-retry-times",
        type=int,
        default=-1,
        help="Times to retry fetching trajectories from the buffer; -1 retries forever.",
    )
    group.add_argument(
        "--min-batch-collection-ratio",
        type=float,
        default=1,
        help="Minimum batch collection ratio (parsed, unused by slime).",
    )
    group.add_argument(
        "--rollout-task-type", type=str, default="math", help="Task type of the buffer's generator."
    )
    group.add_argument(
        "--loss-mask-type",
        type=str,
        default="qwen",
        choices=["qwen", "qwen3", "distill_qwen"],
        help="Chat format used to build multi-turn loss masks.",
    )


def _add_custom_megatron_plugins(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--custom-megatron-init-path",
        type=str,
        default=None,
        help="Dotted path of fn(args) run at the end of Megatron initialisation.",
    )
    group.add_argument(
        "--custom-megatron-before-log-prob-hook-path",
        type=str,
        default=None,
        help="Dotted path of fn(args, model, store_prefix) run before each log-prob pass.",
    )
    group.add_argument(
        "--custom-megatron-before-train-step-hook-path",
        type=str,
        default=None,
        help="Dotted path of fn(args, rollout_id, step_id, model, optimizer, opt_param_scheduler) run before each step.",
    )


def _add_ci(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--ci-test", action="store_true", help="Turn on the CI assertions.")
    group.add_argument("--ci-disable-kl-checker", action="store_true", help="Skip the CI KL assertions.")
    group.add_argument("--ci-metric-checker-key", type=str, default=None, help="Eval metric checked in CI.")
    group.add_argument(
        "--ci-metric-checker-threshold",
        type=float,
        default=None,
        help="Minimum value of --ci-metric-checker-key in CI.",
    )


def _add_other(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--custom-config-path",
        type=str,
        default=None,
        help="YAML mapping of extra arguments for custom functions; keys already on args are not overridden.",
    )
    group.add_argument("--padded-vocab-size", type=int, default=None, help="Vocabulary size after padding.")


def _add_sglang(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--sglang-router-ip",
        type=str,
        default=None,
        help="IP of an already running router; when set no router is started.",
    )
    group.add_argument("--sglang-router-port", type=int, default=None, help="Port of that router.")
    group.add_argument(
        "--sglang-router-request-timeout-secs",
        type=int,
        default=3600,
        help="Request timeout of the router, in seconds.",
    )
    group.add_argument(
        "--sglang-server-concurrency",
        type=int,
        default=512,
        help="Concurrent generate requests per engine.",
    )
    group.add_argument(
        "--sglang-mem-fraction-static",
        type=float,
        default=None,
        help="Fraction of GPU memory for weights and KV cache (SGLang's default when unset).",
    )
    group.add_argument(
        "--sglang-enable-deterministic-inference",
        action="store_true",
        help="Batch-invariant kernels; rollout then seeds each sample (rollout_seed + index in group).",
    )
    group.add_argument(
        "--sglang-dp-size",
        "--sglang-data-parallel-size",
        dest="sglang_dp_size",
        type=int,
        default=1,
        help="SGLang data-parallel size per engine (needs --sglang-enable-dp-attention when > 1).",
    )
    group.add_argument(
        "--sglang-pp-size",
        "--sglang-pipeline-parallel-size",
        dest="sglang_pp_size",
        type=int,
        default=1,
        help="SGLang pipeline-parallel size per engine.",
    )
    group.add_argument(
        "--sglang-ep-size",
        "--sglang-expert-parallel-size",
        dest="sglang_ep_size",
        type=int,
        default=1,
        help="SGLang expert-parallel size per engine.",
    )
    group.add_argument(
        "--sglang-enable-dp-attention",
        action="store_true",
        help="SGLang data-parallel attention.",
    )
    group.add_argument(
        "--sglang-enable-metrics",
        action="store_true",
        help="Expose the engines' Prometheus metrics (scraped into W&B through the router).",
    )


def _add_megatron(group: argparse._ArgumentGroup) -> None:
    # Model shape.
    group.add_argument("--num-layers", type=int, default=None, help="Number of transformer layers.")
    group.add_argument("--hidden-size", type=int, default=None, help="Transformer hidden size.")
    group.add_argument(
        "--ffn-hidden-size",
        type=int,
        default=None,
        help="FFN hidden size (Megatron: 4 * hidden size if unset).",
    )
    group.add_argument("--num-attention-heads", type=int, default=None, help="Number of attention heads.")
    group.add_argument("--group-query-attention", action="store_true", help="Use grouped-query attention.")
    group.add_argument("--num-query-groups", type=int, default=1, help="Number of key/value groups (GQA).")
    group.add_argument(
        "--kv-channels", type=int, default=None, help="Per-head dimension (hidden_size // heads if unset)."
    )
    group.add_argument(
        "--max-position-embeddings", type=int, default=None, help="Maximum number of position embeddings."
    )
    group.add_argument(
        "--position-embedding-type",
        type=str,
        default="learned_absolute",
        choices=["learned_absolute", "rope", "mrope", "relative", "none"],
        help="Position embedding type.",
    )
    group.add_argument(
        "--use-rotary-position-embeddings",
        action="store_true",
        help="Rotary position embeddings (deprecated by Megatron in favour of --position-embedding-type rope).",
    )
    group.add_argument("--rotary-base", type=int, default=10000, help="Base of the rotary embeddings.")
    group.add_argument(
        "--normalization", default="LayerNorm", choices=["LayerNorm", "RMSNorm"], help="Normalisation layer."
    )
    group.add_argument("--norm-epsilon", type=float, default=1e-5, help="Epsilon of LayerNorm/RMSNorm.")
    group.add_argument("--swiglu", action="store_true", help="SwiGLU MLP instead of GeLU.")
    group.add_argument(
        "--disable-bias-linear",
        action="store_false",
        dest="add_bias_linear",
        help="No bias in the linear layers.",
    )
    group.add_argument("--add-qkv-bias", action="store_true", help="Bias only in the QKV projection.")
    group.add_argument(
        "--untie-embeddings-and-output-weights",
        action="store_true",
        help="Separate input embedding and output layer weights.",
    )
    group.add_argument("--qk-layernorm", action="store_true", help="Normalise queries and keys.")
    group.add_argument("--vocab-size", type=int, default=None, help="Vocabulary size before padding.")
    group.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="Pad the vocabulary to a multiple of this.",
    )
    group.add_argument("--seq-length", type=int, default=None, help="Maximum sequence length.")
    group.add_argument("--attention-dropout", type=float, default=0.1, help="Attention dropout probability.")
    group.add_argument("--hidden-dropout", type=float, default=0.1, help="Hidden-state dropout probability.")
    group.add_argument(
        "--attention-backend",
        type=str,
        default="auto",
        choices=["flash", "fused", "unfused", "local", "auto"],
        help="Attention implementation.",
    )
    # Mixture of experts.
    group.add_argument("--num-experts", type=int, default=None, help="Number of experts (None: dense model).")
    group.add_argument(
        "--moe-ffn-hidden-size", type=int, default=None, help="FFN hidden size of each expert."
    )
    group.add_argument(
        "--moe-shared-expert-intermediate-size",
        type=int,
        default=None,
        help="Total FFN hidden size of the shared experts.",
    )
    group.add_argument("--moe-router-topk", type=int, default=2, help="Experts each token is routed to.")
    group.add_argument(
        "--moe-router-score-function",
        type=str,
        default="softmax",
        choices=["softmax", "sigmoid"],
        help="Router score function.",
    )
    group.add_argument(
        "--moe-router-pre-softmax", action="store_true", help="Softmax before the top-k selection."
    )
    group.add_argument(
        "--moe-router-load-balancing-type",
        type=str,
        nargs="+",
        default="aux_loss",
        choices=["aux_loss", "seq_aux_loss", "sinkhorn", "none"],
        help="Load-balancing strategy of the router.",
    )
    group.add_argument(
        "--moe-aux-loss-coeff", type=float, nargs="+", default=0.0, help="Coefficient of the auxiliary loss."
    )
    group.add_argument(
        "--moe-router-enable-expert-bias",
        action="store_true",
        help="Aux-loss-free load balancing with a dynamic expert bias.",
    )
    group.add_argument(
        "--moe-router-bias-update-rate", type=float, default=1e-3, help="Update rate of that expert bias."
    )
    group.add_argument(
        "--moe-router-topk-scaling-factor",
        type=float,
        default=None,
        help="Scaling of the top-k routing scores.",
    )
    group.add_argument(
        "--moe-router-dtype",
        type=str,
        default=None,
        choices=["fp32", "fp64"],
        help="Data type of the routing computation.",
    )
    group.add_argument(
        "--moe-token-dispatcher-type",
        type=str,
        default="allgather",
        choices=["allgather", "alltoall", "flex"],
        help="Token dispatcher (slime switches allgather to alltoall for variable sequence lengths).",
    )
    group.add_argument("--moe-grouped-gemm", action="store_true", help="Grouped GEMM for the local experts.")
    group.add_argument("--moe-permute-fusion", action="store_true", help="Fuse the token permutation.")
    # Parallelism.
    group.add_argument("--tensor-model-parallel-size", type=int, default=1, help="Tensor-parallel size.")
    group.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="Pipeline-parallel size.")
    group.add_argument("--context-parallel-size", type=int, default=1, help="Context-parallel size.")
    group.add_argument("--expert-model-parallel-size", type=int, default=1, help="Expert-parallel size.")
    group.add_argument(
        "--expert-tensor-parallel-size",
        type=int,
        default=None,
        help="Tensor-parallel size of the experts (defaults to --tensor-model-parallel-size).",
    )
    group.add_argument("--sequence-parallel", action="store_true", help="Sequence parallelism (with TP).")
    # Optimizer and learning-rate schedule (the torch backend reads these too).
    group.add_argument("--optimizer", type=str, default="adam", choices=["adam", "sgd"], help="Optimizer.")
    group.add_argument(
        "--lr-decay-style",
        type=str,
        default="linear",
        choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
        help="Learning-rate decay function.",
    )
    group.add_argument(
        "--lr-decay-iters", type=int, default=None, help="Iterations to decay the learning rate over."
    )
    group.add_argument(
        "--lr-warmup-iters", type=int, default=0, help="Iterations of linear learning-rate warm-up."
    )
    group.add_argument(
        "--lr-warmup-fraction",
        type=float,
        default=None,
        help="Warm-up as a fraction of the decay iterations (exclusive with --lr-warmup-iters).",
    )
    group.add_argument("--min-lr", type=float, default=0.0, help="Floor of the learning rate.")
    group.add_argument("--weight-decay", type=float, default=0.01, help="Weight decay coefficient.")
    group.add_argument("--adam-beta1", type=float, default=0.9, help="Adam beta1.")
    group.add_argument("--adam-beta2", type=float, default=0.999, help="Adam beta2.")
    group.add_argument("--adam-eps", type=float, default=1e-08, help="Adam epsilon.")
    group.add_argument("--use-distributed-optimizer", action="store_true", help="Shard the optimizer state.")
    group.add_argument(
        "--optimizer-cpu-offload", action="store_true", help="Keep the optimizer state on CPU."
    )
    group.add_argument(
        "--overlap-cpu-optimizer-d2h-h2d",
        action="store_true",
        default=False,
        help="Overlap the CPU optimizer step with gradient and parameter copies.",
    )
    group.add_argument(
        "--use-precision-aware-optimizer",
        action="store_true",
        help="TransformerEngine's precision-aware optimizer.",
    )
    # Precision and numerics.
    group.add_argument("--bf16", action="store_true", help="Train in bfloat16.")
    group.add_argument("--fp16", action="store_true", help="Train in float16.")
    group.add_argument(
        "--accumulate-allreduce-grads-in-fp32",
        action="store_true",
        help="Accumulate and all-reduce gradients in fp32.",
    )
    group.add_argument(
        "--attention-softmax-in-fp32", action="store_true", help="Attention masking and softmax in fp32."
    )
    group.add_argument("--deterministic-mode", action="store_true", help="Deterministic kernels only.")
    # Activation recomputation.
    group.add_argument(
        "--recompute-granularity",
        type=str,
        default=None,
        choices=["full", "selective"],
        help="Activation recomputation granularity.",
    )
    group.add_argument(
        "--recompute-method",
        type=str,
        default=None,
        choices=["uniform", "block"],
        help="How layers are chosen for full recomputation.",
    )
    group.add_argument(
        "--recompute-num-layers", type=int, default=None, help="Layers per recomputation unit (or block)."
    )
    # Model construction and tokenizer.
    group.add_argument(
        "--spec",
        type=str,
        default=None,
        nargs="*",
        help="<module> <function> returning a custom layer spec.",
    )
    group.add_argument(
        "--tokenizer-type",
        type=str,
        default=None,
        choices=[
            "BertWordPieceLowerCase",
            "BertWordPieceCase",
            "GPT2BPETokenizer",
            "SentencePieceTokenizer",
            "GPTSentencePieceTokenizer",
            "HuggingFaceTokenizer",
            "Llama2Tokenizer",
            "TikTokenizer",
            "MultimodalTokenizer",
            "NullTokenizer",
            "NullMultimodalTokenizer",
            "SFTTokenizer",
        ],
        help="Tokenizer type (slime uses HuggingFaceTokenizer on --hf-checkpoint when unset).",
    )
    group.add_argument("--tokenizer-model", type=str, default=None, help="Tokenizer model path.")


def _add_service(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--redis-url",
        type=str,
        default=None,
        help="Redis URL (redis://, rediss:// or unix://); unset starts an embedded redis-server.",
    )
    group.add_argument("--run-id", type=str, default="default", help="Run id; namespaces every Redis key.")
    group.add_argument("--router-url", type=str, default=None, help="HTTP base URL of the router.")
    group.add_argument(
        "--reward-url", type=str, default=None, help="HTTP base URL of the reward-model service."
    )
    group.add_argument(
        "--reward-grpc-addr", type=str, default=None, help="host:port of the reward-model gRPC service."
    )
    group.add_argument(
        "--auth-token",
        type=str,
        default=None,
        help="Bearer token required by (and sent to) the HTTP services; none when unset.",
    )
    group.add_argument(
        "--engine-backend",
        type=str,
        default="auto",
        choices=["auto", "builtin", "sglang"],
        help="Rollout engine: SGLang when installed and a GPU is present (auto), the built-in torch engine, or SGLang.",
    )
    group.add_argument(
        "--output-dir",
        type=str,
        default=None,
        help="Where a run writes metrics, service logs and summaries (default: outputs/<run-id>).",
    )
    group.add_argument(
        "--weight-sync-transport",
        type=str,
        default="auto",
        choices=["auto", "distributed", "tensor", "disk"],
        help="How the trainer pushes weights to engines: a torch.distributed group (nccl/gloo), same-host tensor "
        "handles (CUDA IPC / shared memory), or a shared directory; auto = tensor with --colocate or where the "
        "embedded engines share the trainer's GPUs (too few for both), else distributed.",
    )
    group.add_argument(
        "--weight-sync-dir",
        type=str,
        default=None,
        help="Directory the trainer and every engine can read, for --weight-sync-transport disk.",
    )
    group.add_argument(
        "--save-hf",
        type=str,
        default=None,
        help="Also write the actor as a Hugging Face model directory at each save and at the end of the run; "
        "'{rollout_id}' in the path is filled in.",
    )
    group.add_argument(
        "--disable-prompt-sharing",
        action="store_true",
        default=False,
        help="Torch backend: pack every sample whole. By default the samples of a micro-batch that share a prompt "
        "(a group's) store and compute it once, their responses attending to it: the same log-probs and "
        "gradients up to float rounding, for P + n*R tokens instead of n*(P + R).",
    )
    group.add_argument("--host", type=str, default="127.0.0.1", help="Address the service binds to.")
    group.add_argument(
        "--port", type=int, default=None, help="Port the service binds to (its default when unset)."
    )
    group.add_argument(
        "--log-level",
        type=str.upper,
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="Log level.",
    )


_GroupBuilder = Callable[[argparse._ArgumentGroup], None]

# Seed section name -> builder, in the seed's order.
SEED_GROUPS: dict[str, _GroupBuilder] = {
    "Cluster": _add_cluster,
    "Train": _add_train,
    "Rollout": _add_rollout,
    "Fault Tolerance": _add_fault_tolerance,
    "Data": _add_data,
    "Eval": _add_eval,
    "Algo": _add_algo,
    "Router": _add_router,
    "W&B": _add_wandb,
    "TensorBoard": _add_tensorboard,
    "Debug": _add_debug,
    "Network": _add_network,
    "Reward Model": _add_reward_model,
    "Rollout Buffer": _add_rollout_buffer,
    "Custom Megatron Plugins": _add_custom_megatron_plugins,
    "CI": _add_ci,
    "Other": _add_other,
}
PASSTHROUGH_GROUPS: dict[str, _GroupBuilder] = {"SGLang": _add_sglang, "Megatron": _add_megatron}
SERVICE_GROUP = "Service"


def add_slime_arguments(
    parser: argparse.ArgumentParser,
    groups: Iterable[str] | None = None,
    *,
    require_rollout_batch_size: bool = True,
) -> argparse.ArgumentParser:
    """Add slime's flag groups (all of them, or the named seed sections plus "SGLang"/"Megatron") to ``parser``.

    A service that reads only a few batch sizes can pass ``require_rollout_batch_size=False``.
    """
    known = {**SEED_GROUPS, **PASSTHROUGH_GROUPS}
    names = list(known) if groups is None else list(groups)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown argument group(s) {unknown}; valid groups: {list(known)}")
    for name in names:
        group = parser.add_argument_group(name)
        if name == "Data":
            _add_data(group, require_rollout_batch_size=require_rollout_batch_size)
        else:
            known[name](group)
    return parser


def add_service_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the "Service" group: where Redis, the router and the reward model are, and how a service binds."""
    _add_service(parser.add_argument_group(SERVICE_GROUP))
    return parser


def build_parser(
    *, add_custom_arguments: Callable[[argparse.ArgumentParser], Any] | None = None, prog: str = "slime"
) -> SlimeArgumentParser:
    """The full parser: a user's custom arguments first (as slime adds them), then every slime group, the
    SGLang and Megatron groups and the service flags."""
    parser = new_parser(prog=prog, description="slime RL post-training as services; all of slime's flags.")
    if add_custom_arguments is not None:
        parser = add_custom_arguments(parser) or parser
    add_slime_arguments(parser)
    add_service_arguments(parser)
    return parser


# --------------------------------------------------------------------------------------------------
# pass-through: --sglang-* and Megatron flags that have no typed definition here
# --------------------------------------------------------------------------------------------------


def _is_flag(token: str) -> bool:
    return token.startswith("-") and token != "-" and not _NEGATIVE_NUMBER.match(token)


def literal_value(text: str) -> bool | int | float | str:
    """Type a pass-through value: true/false -> bool, then int, then float, else the string itself."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            continue
    return text


def _passthrough_value(values: Sequence[str]) -> Any:
    if not values:
        return True
    if len(values) == 1:
        return literal_value(values[0])
    return [literal_value(value) for value in values]


def _unknown_flag(parser: argparse.ArgumentParser, flag: str, *, sglang: bool, megatron: bool) -> NoReturn:
    candidates = [option for action in parser._actions for option in action.option_strings]
    if megatron:
        candidates.extend(MEGATRON_PASSTHROUGH_FLAGS)
    close = difflib.get_close_matches(flag, candidates, n=3, cutoff=0.75)
    accepted = ["a slime flag", "a service flag"]
    if sglang:
        accepted.append("an --sglang-<name> pass-through")
    if megatron:
        accepted.append("a Megatron flag (MEGATRON_PASSTHROUGH_FLAGS)")
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    parser.error(
        f"unrecognized argument {flag}: it is not {', '.join(accepted[:-1])} or {accepted[-1]}{hint}"
    )


def _absorb_extras(
    parser: argparse.ArgumentParser,
    namespace: argparse.Namespace,
    extras: Sequence[str],
    *,
    sglang: bool,
    megatron: bool,
) -> None:
    sglang_passthrough: dict[str, Any] = {}
    megatron_argv: list[str] = []
    index = 0
    while index < len(extras):
        token = extras[index]
        if not _is_flag(token):
            parser.error(f"unrecognized argument {token!r}: it follows no flag that takes a value")
        flag, has_inline, inline = token.partition("=")
        values = [inline] if has_inline else []
        end = index + 1
        if not has_inline:
            while end < len(extras) and not _is_flag(extras[end]):
                values.append(extras[end])
                end += 1
        if sglang and flag.startswith("--sglang-") and len(flag) > len("--sglang-"):
            name = flag[len("--sglang-") :].replace("-", "_")
            if name in SGLANG_MANAGED_FIELDS:
                parser.error(
                    f"{flag} cannot be passed through: SGLang's {name} is set for every engine from "
                    f"{SGLANG_MANAGED_FIELDS[name]}"
                )
            value = _passthrough_value(values)
            setattr(namespace, f"sglang_{name}", value)
            sglang_passthrough[name] = value
        elif megatron and flag in MEGATRON_PASSTHROUGH_FLAGS:
            setattr(namespace, flag[2:].replace("-", "_"), _passthrough_value(values))
            megatron_argv.extend(extras[index:end])
        else:
            _unknown_flag(parser, flag, sglang=sglang, megatron=megatron)
        index = end
    if sglang:
        for name in SGLANG_SERVER_FIELDS:
            dest = f"sglang_{name}"
            if hasattr(namespace, dest) and getattr(namespace, dest) != parser.get_default(dest):
                sglang_passthrough.setdefault(name, getattr(namespace, dest))
        namespace.sglang_passthrough = sglang_passthrough
    if megatron:
        namespace.megatron_extra_argv = megatron_argv


def parse_with_passthrough(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    *,
    sglang: bool = True,
    megatron: bool = True,
) -> argparse.Namespace:
    """Parse ``argv`` with ``parser``, accepting ``--sglang-<name> [VALUE ...]`` (kept as ``sglang_<name>`` and in
    ``args.sglang_passthrough``) and allow-listed Megatron flags (kept as attributes and verbatim in
    ``args.megatron_extra_argv``). Anything else unknown is an argparse error naming the flag."""
    namespace, extras = parser.parse_known_args(None if argv is None else list(argv))
    _absorb_extras(parser, namespace, extras, sglang=sglang, megatron=megatron)
    return namespace


def parse_args(
    argv: Sequence[str] | None = None,
    *,
    add_custom_arguments: Callable[[argparse.ArgumentParser], Any] | None = None,
    prog: str = "slime",
) -> argparse.Namespace:
    """Parse and validate like slime's ``parse_args``: every error exits with status 2 and a message naming
    the flag, and derived values (batch sizes, critic settings, eval defaults, ...) are filled in."""
    parser = build_parser(add_custom_arguments=add_custom_arguments, prog=prog)
    args = parse_with_passthrough(parser, argv)
    arg_validation.validate_args(parser, args)
    return args
