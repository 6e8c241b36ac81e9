"""One rank of the Megatron backend: a tensor-parallel shard of one pipeline stage of megatron-core's ``GPTModel``
(the actor, or with a value head the PPO critic) under Megatron's ``DistributedDataParallel`` and optimizer.

It is the torch backend's ``TrainWorker`` with the model, the forward pass, the optimizer step, checkpoints,
export and the weight push replaced: the data schedule (DP partition, micro-batches, dynamic batching), the
log-prob, advantage and loss passes (``trainer.algorithms``) and the weight-sync transports are the same code.
``self.rank`` / ``self.world_size`` / ``self.group`` are the data-parallel ones, so everything inherited splits
data and reduces metrics over data-parallel ranks only; tensor-parallel peers compute the same values.

With pipeline stages (``--pipeline-model-parallel-size``), every pass over micro-batches (log-probs, values,
training) runs through megatron-core's pipeline schedule; the last stage computes log-probs, values and losses
with the shared code and broadcasts them to the other stages, so every rank holds the same rollout state and the
driver reads any rank's answer.

With context parallelism (``--context-parallel-size``), the context-parallel ranks of a data-parallel rank hold the
same samples and each runs its share of every packed row (``context_parallel``); the per-token log-probs,
entropies and values are gathered over them, so every one computes the same losses and metrics from its own
tokens' gradients, which Megatron's DDP then sums over the data- and context-parallel ranks.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer import checkpoint
from trainer.algorithms.advantages import AdvantageConfig
from trainer.algorithms.logprobs import token_log_probs
from trainer.algorithms.loss import LossConfig
from trainer.algorithms.tis import load_tis_function
from trainer.backends.batch import RolloutBatch
from trainer.backends.megatron_backend import context_parallel, convert, torch_format
from trainer.backends.megatron_backend import model as mg_model
from trainer.backends.megatron_backend.config import (
    architecture_from_hf,
    check_megatron_args,
    pipeline_split_flags,
)
from trainer.backends.megatron_backend.routing_replay import RoutingReplay
from trainer.backends.torch_backend import model as model_lib
from trainer.backends.torch_backend.optim import LRSchedule, OptimizerConfig
from trainer.backends.torch_backend.worker import (
    ACTOR,
    CRITIC,
    DistInit,
    LocalRollout,
    TrainWorker,
    WeightPushReport,
    WeightPushRequest,
)
from trainer.weight_sync.transports import WeightSender, plan_buckets

logger = logging.getLogger(__name__)


def _load_hook(path: str | None, flag: str) -> Any:
    if not path:
        return None
    from services.core.plugins import load_function

    return load_function(path, flag=flag)


def _no_reduction(loss: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The pipeline schedule's loss function: the loss (and metrics) were computed in the forward step."""
    return loss, {}


class MegatronTrainWorker(TrainWorker):
    """One rank of the actor or the critic (tensor × pipeline × expert × data parallel)."""

    def __init__(
        self, args: Any, *, role: str, rank: int, world_size: int, dist_init: DistInit | None
    ) -> None:
        if role not in (ACTOR, CRITIC):
            raise ValueError(f"unknown role {role!r}: expected {ACTOR!r} or {CRITIC!r}")
        if dist_init is None:
            raise ValueError("a Megatron rank needs a rendezvous address")
        from megatron.core import parallel_state as mpu
        from transformers import AutoConfig

        self.args = args
        self.role = role
        self.global_rank = rank
        self.global_world_size = world_size
        self.device = torch.device("cuda", (rank + dist_init.gpu_offset) % torch.cuda.device_count())
        torch.cuda.set_device(self.device)
        tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
        mg_model.initialize_parallel(
            rank=rank,
            world_size=world_size,
            master_addr=dist_init.master_addr,
            master_port=dist_init.master_port,
            timeout_minutes=dist_init.timeout_minutes,
            tp_size=tp,
            pp_size=pp,
            ep_size=args.expert_model_parallel_size,
            seed=args.seed,
            cp_size=args.context_parallel_size,
        )
        self.rank = mpu.get_data_parallel_rank()
        self.world_size = mpu.get_data_parallel_world_size()
        self.group = mpu.get_data_parallel_group() if self.world_size > 1 else None
        self.tp_rank = mpu.get_tensor_model_parallel_rank()
        self.cp_size = args.context_parallel_size
        self.cp_rank = mpu.get_context_parallel_rank()
        self.pp_size = pp
        self.pp_rank = mpu.get_pipeline_model_parallel_rank()
        self.last_stage = mpu.is_pipeline_last_stage()
        if args.deterministic_mode:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(args.seed)
        init_hook = _load_hook(args.custom_megatron_init_path, "--custom-megatron-init-path")
        if init_hook is not None:
            init_hook(args)

        self.hf_config = AutoConfig.from_pretrained(self._initial_weights_path())
        self.architecture = (getattr(self.hf_config, "architectures", None) or ["Qwen2ForCausalLM"])[0]
        self.arch = architecture_from_hf(
            self.hf_config,
            padded_vocab=args.padded_vocab_size,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            tp_size=tp,
        )
        self.shape = self.arch.shape
        check_megatron_args(args, self.arch)
        first, last = pipeline_split_flags(args)
        convert.check_tp_compatible(self.shape, tp)
        convert.stage_layers(self.shape.num_layers, pp, self.pp_rank, first=first, last=last)
        if args.use_routing_replay and not self.shape.num_experts:
            raise ValueError(
                f"--use-routing-replay replays MoE expert routing, but {args.hf_checkpoint} ({self.architecture}) "
                "has no experts"
            )
        self.routing = RoutingReplay() if args.use_routing_replay and role == ACTOR else None
        self._preparing = False
        self.offloaded = False
        self.compute_dtype = torch.bfloat16 if args.bf16 else None
        self.config = mg_model.transformer_config(self.arch, args)
        if self.routing is not None:
            self.routing.replay_in_backward = self.config.recompute_granularity == "full"
        self.steps_per_rollout = args.rollout_batch_size * args.n_samples_per_prompt // args.global_batch_size
        total_steps = args.num_rollout * self.steps_per_rollout if args.num_rollout else None
        self.optim_config = OptimizerConfig.from_args(args, role=role, total_steps=total_steps)
        self.model, self.optimizer = self._build()
        self.rotary = mg_model.RotaryAngles(self.arch, self.config, self.device) if self.cp_size > 1 else None
        self.param_plan = mg_model.full_param_plan(self.model, self.shape)
        # The same schedule as the torch backend, applied to Megatron's parameter groups; it is what the
        # before-train-step hook receives as ``opt_param_scheduler``.
        self.schedule = LRSchedule(self.optimizer, self.optim_config)
        self.loss_config = LossConfig.from_args(args)
        self.adv_config = AdvantageConfig.from_args(args)
        self.tis_fn = (
            functools.partial(load_tis_function(args.custom_tis_function_path), args)
            if args.use_tis
            else None
        )
        self.custom_loss = _load_hook(
            args.custom_loss_function_path if args.loss_type == "custom_loss" else None,
            "--custom-loss-function-path",
        )
        self.before_log_prob_hook = _load_hook(
            args.custom_megatron_before_log_prob_hook_path, "--custom-megatron-before-log-prob-hook-path"
        )
        self.before_train_step_hook = _load_hook(
            args.custom_megatron_before_train_step_hook_path, "--custom-megatron-before-train-step-hook-path"
        )
        self._store_prefix = ""
        self._rollout_id = 0
        self._step_id = 0

        self.stores: dict[str, model_lib.TensorStore] = {}
        if role == ACTOR:
            if args.kl_coef != 0 or args.use_kl_loss:
                self.stores["ref"] = self._load_reference()
            self._reset_old_actor_stores()
        self.local: LocalRollout | None = None
        self.senders: dict[tuple[str, tuple[str, ...], int | None], WeightSender] = {}
        logger.info(
            "megatron %s rank %d/%d (TP %d/%d, PP %d/%d, CP %d/%d, DP %d/%d) on %s: %s from %s",
            role,
            rank,
            world_size,
            self.tp_rank,
            tp,
            self.pp_rank,
            pp,
            self.cp_rank,
            self.cp_size,
            self.rank,
            self.world_size,
            self.device,
            self.architecture,
            self._initial_weights_path(),
        )

    # ----------------------------------------------------------------------------------------------- setup
    def _build(self) -> tuple[torch.nn.Module, Any]:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
        from megatron.core.optimizer import get_megatron_optimizer

        args = self.args
        if self.routing is not None:
            self.routing.forget_routers()
        gpt = mg_model.build_gpt_model(self.arch, self.config, value_head=self.role == CRITIC)
        mg_model.load_hf_state(gpt, self._initial_hf_weights(), self.shape)
        gpt.cuda(self.device)
        wrapped = mg_model.wrap_fp16(gpt, self.config)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=True,
        )
        model = DistributedDataParallel(config=self.config, ddp_config=ddp_config, module=wrapped)
        model.eval()  # no dropout anywhere: RL log-probs must be reproducible
        optimizer = get_megatron_optimizer(
            MegatronOptimizerConfig(
                optimizer="adam",
                lr=self.optim_config.lr,
                min_lr=args.min_lr,
                weight_decay=args.weight_decay,
                adam_beta1=args.adam_beta1,
                adam_beta2=args.adam_beta2,
                adam_eps=args.adam_eps,
                clip_grad=args.clip_grad,
                bf16=args.bf16,
                params_dtype=self.config.params_dtype,
                use_distributed_optimizer=True,
            ),
            [model],
        )
        return model, optimizer

    def _initial_hf_weights(self) -> dict[str, torch.Tensor]:
        """The starting weights by Hugging Face name: the policy's, or the critic's (``--critic-load`` as a Hugging
        Face directory, else the policy's body with a new value head initialised as Hugging Face does: normal with
        the config's ``initializer_range``, zero bias, from ``--seed``)."""
        path = self._initial_weights_path()
        flag = "--critic-load" if path != self.args.hf_checkpoint else "--hf-checkpoint"
        weights = dict(checkpoint.read_hf_weights(path, flag=flag))
        if self.role == CRITIC and "score.weight" not in weights:
            std = float(getattr(self.hf_config, "initializer_range", 0.02))
            generator = torch.Generator().manual_seed(self.args.seed)
            weights["score.weight"] = torch.randn(1, self.shape.hidden_size, generator=generator) * std
            weights["score.bias"] = torch.zeros(1)
        return weights

    def _load_reference(self) -> model_lib.TensorStore:
        """``--ref-load`` as a checkpoint of this backend, a ``slime convert`` Megatron checkpoint or a Hugging
        Face directory; else the initial weights."""
        ref_load = self.args.ref_load
        if ref_load is None:
            return model_lib.TensorStore.snapshot(self.model)
        own = model_lib.TensorStore.snapshot(self.model)
        if torch_format.is_release_checkpoint(ref_load):
            full, _, _ = torch_format.read(ref_load)
            self._load_full_megatron(full)
        elif checkpoint.is_checkpoint_root(ref_load):
            step = checkpoint.resolve_iteration(ref_load, self.args.ref_ckpt_step, flag="--ref-load")
            self._dist_load(checkpoint.iteration_dir(ref_load, step) / "model", load_optimizer=False)
        else:
            mg_model.load_hf_state(
                self.model, checkpoint.read_hf_weights(ref_load, flag="--ref-load"), self.shape
            )
        ref = model_lib.TensorStore.snapshot(self.model)
        own.load_into(self.model)
        logger.info("reference model: %s", ref_load)
        return ref

    @torch.no_grad()
    def _load_full_megatron(self, full: dict[str, torch.Tensor]) -> None:
        shards = mg_model.local_shards(self.model, full, self.shape)
        for name, param in self.model.named_parameters():
            param.copy_(shards[name])

    # ----------------------------------------------------------------------------------------- forwards
    def _forward(self, local: LocalRollout, positions: list[int]) -> torch.Tensor:
        """The micro-batch's logits ``[T, vocab]`` (a critic's values ``[T, 1]``); on a pipeline stage before the
        last, the hidden states it sends on."""
        from megatron.core import parallel_state as mpu

        packed = self._pack(local, positions)
        multiple = mg_model.sequence_multiple(self.config)
        split = self._split(local, positions) if self.cp_size > 1 else None
        routing = contextlib.nullcontext()
        if self.routing is not None:
            sequence_group = mpu.get_tensor_model_parallel_group() if self.config.sequence_parallel else None
            routing = self.routing.forward(
                positions,
                packed.total_lengths,
                padding=-packed.num_tokens % multiple,
                sequence_group=sequence_group,
                split=split,
            )
        with routing:
            if split is not None:
                return self._forward_split(packed, split)
            if not self.last_stage:
                return mg_model.forward_packed(self.model, packed, multiple)
            if self.role == CRITIC:
                return mg_model.forward_values(self.model, packed, multiple=multiple)
            return mg_model.forward_logits(
                self.model, packed, vocab_size=self.shape.vocab_size, multiple=multiple
            )

    def _split(self, local: LocalRollout, positions: list[int]) -> context_parallel.RowSplit:
        """This context-parallel rank's share of the micro-batch's packed row (kept with the packed row)."""
        key = ("context_parallel", *positions)
        split = local.packed.get(key)
        if split is None:
            split = mg_model.split_packed(
                self._pack(local, positions), mg_model.sequence_multiple(self.config), self.device
            )
            local.packed[key] = split
        return split

    def _forward_split(self, packed: Any, split: context_parallel.RowSplit) -> torch.Tensor:
        """``_forward`` under context parallelism: the last stage's actor returns its own tokens' logits
        ``[T_local, vocab]`` (``_response_log_probs`` gathers what it computes from them); the critic the values of
        the whole row ``[T, 1]``."""
        from megatron.core import tensor_parallel

        out = mg_model.forward_split(self.model, packed, split, self.rotary)
        if not self.last_stage:
            return out
        if self.role == CRITIC:
            return context_parallel.gather_rows(out[0].float(), split)
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(out)
        return logits[0, :, : self.shape.vocab_size].float()

    def _response_log_probs(
        self, logits: torch.Tensor, local: LocalRollout, positions: list[int], *, with_entropy: bool
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Under context parallelism ``logits`` are this rank's tokens': each rank computes the log-probs (and
        entropies) of its own response rows, and every rank gathers all of them."""
        if self.cp_size == 1:
            return super()._response_log_probs(logits, local, positions, with_entropy=with_entropy)
        split = self._split(local, positions)
        rows = self._response_rows(local, positions)
        targets = torch.zeros(split.num_tokens, dtype=torch.long, device=self.device)
        scored = torch.zeros(split.num_tokens, dtype=torch.bool, device=self.device)
        for i, r in zip(positions, rows, strict=True):
            sample = torch.as_tensor(local.tokens[i], device=self.device)
            targets[r] = sample[len(sample) - local.response_lengths[i] :]
            scored[r] = True
        mine = context_parallel.local_part(scored, split, fill=False).nonzero().squeeze(1)
        lp, ent = token_log_probs(
            logits[mine],
            context_parallel.local_part(targets, split)[mine],
            temperature=self.args.rollout_temperature,
            with_entropy=with_entropy,
        )

        def gathered(values: torch.Tensor) -> list[torch.Tensor]:
            per_token = values.new_zeros(split.local_tokens).index_copy(0, mine, values)
            full = context_parallel.gather_rows(per_token, split)
            return [full[r] for r in rows]

        return gathered(lp), (gathered(ent) if ent is not None else None)

    def _micro_batches(
        self, step_samples: list[list[int]], lengths: list[int], max_tokens: int | None
    ) -> list[list[list[int]]]:
        """As the torch backend's, a micro-batch holding up to ``--max-tokens-per-gpu`` tokens per GPU: under
        context parallelism that is ``max_tokens × --context-parallel-size`` tokens of samples (as slime)."""
        if max_tokens is not None:
            max_tokens *= self.cp_size
        return super()._micro_batches(step_samples, lengths, max_tokens)

    def _gradient_average_ranks(self) -> int:
        """Megatron's DDP averages gradients over the data- and context-parallel ranks, while context-parallel
        ranks hold parts of the same samples' gradients: without pipeline stages the loss scale undoes both (with
        them megatron-core's schedule multiplies the loss by the context-parallel size itself)."""
        return self.world_size * (self.cp_size if self.pp_size == 1 else 1)

    # --------------------------------------------------------------------------------- pipeline stages
    def _run_pipeline(
        self,
        local: LocalRollout,
        micro_batches: list[list[int]],
        last_stage_step: Any,
        *,
        forward_only: bool,
    ) -> None:
        """Every micro-batch through megatron-core's pipeline schedule (1F1B when training). Stages before the last
        run the model and send its hidden states on; the last stage runs ``last_stage_step(positions)``, which
        returns the loss to differentiate (already scaled for the step, or any scalar when ``forward_only``).

        Packed rows differ in length, so the stages exchange each activation's shape first (the config's
        ``variable_seq_lengths``); ``seq_length`` is then unused."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        count = len(micro_batches)

        def forward_step(
            data_iterator: Iterator[list[int]], model: torch.nn.Module
        ) -> tuple[torch.Tensor, Any]:
            positions = next(data_iterator)
            if not self.last_stage:
                return self._forward(local, positions), None
            loss = last_stage_step(positions)
            # The schedule divides what the loss function returns by the number of micro-batches; the step's
            # scale is already in the loss.
            return loss * count, _no_reduction

        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=self.model,
            num_microbatches=count,
            seq_length=max(sum(local.total_lengths[i] for i in mb) for mb in micro_batches),
            micro_batch_size=1,
            forward_only=forward_only,
        )

    def _from_last_stage(
        self, per_sample: list[torch.Tensor | None], lengths: list[int]
    ) -> list[torch.Tensor]:
        """Per-sample float32 tensors of ``lengths`` elements, computed on the last pipeline stage, on every stage
        (one broadcast over the pipeline group)."""
        from megatron.core import parallel_state as mpu

        if self.last_stage:
            flat = torch.cat([t.float().reshape(-1) for t in per_sample])
        else:
            flat = torch.empty(sum(lengths), dtype=torch.float32, device=self.device)
        dist.broadcast(
            flat,
            src=mpu.get_pipeline_model_parallel_last_rank(),
            group=mpu.get_pipeline_model_parallel_group(),
        )
        return list(flat.split(lengths))

    def _metrics_from_last_stage(self, metrics: dict[str, float]) -> dict[str, float]:
        """The last pipeline stage's ``metrics`` on every stage."""
        from megatron.core import parallel_state as mpu

        box = [metrics]
        dist.broadcast_object_list(
            box,
            src=mpu.get_pipeline_model_parallel_last_rank(),
            group=mpu.get_pipeline_model_parallel_group(),
            device=self.device,
        )
        return box[0]

    @torch.no_grad()
    def _pipelined_log_probs(
        self, local: LocalRollout, *, with_entropy: bool
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        log_probs: list[torch.Tensor | None] = [None] * len(local.tokens)
        entropy: list[torch.Tensor | None] = [None] * len(local.tokens)

        def step(positions: list[int]) -> torch.Tensor:
            logits = self._fill_log_probs(local, positions, log_probs, entropy, with_entropy=with_entropy)
            return logits.new_zeros(())

        self._run_pipeline(
            local, [mb for step in local.log_prob_steps for mb in step], step, forward_only=True
        )
        lengths = local.response_lengths
        return (
            self._from_last_stage(log_probs, lengths),
            self._from_last_stage(entropy, lengths) if with_entropy else None,
        )

    @torch.no_grad()
    def _value_pass(self, local: LocalRollout) -> list[torch.Tensor]:
        if self.pp_size == 1:
            return super()._value_pass(local)
        values: list[torch.Tensor | None] = [None] * len(local.tokens)

        def step(positions: list[int]) -> torch.Tensor:
            out = self._forward(local, positions)[:, 0]
            for i, rows in zip(positions, self._response_rows(local, positions), strict=True):
                values[i] = out[rows]
            return out.new_zeros(())

        self._run_pipeline(
            local, [mb for step in local.log_prob_steps for mb in step], step, forward_only=True
        )
        return self._from_last_stage(values, local.response_lengths)

    def _with_weights(self, tag: str) -> contextlib.AbstractContextManager[None]:
        inner = super()._with_weights(tag)

        @contextlib.contextmanager
        def tagged() -> Iterator[None]:
            self._store_prefix = f"{tag}_"
            try:
                with inner:
                    yield
            finally:
                self._store_prefix = ""

        return tagged()

    def _log_prob_pass(self, local: LocalRollout, *, with_entropy: bool):
        if self.before_log_prob_hook is not None:
            self.before_log_prob_hook(self.args, self.model, self._store_prefix)
        # The old policy's pass of a rollout being prepared records the routes training replays.
        old_policy = self._preparing and not self._store_prefix.startswith("ref")
        recording = self.routing.recording() if self.routing is not None and old_policy else None
        with recording or contextlib.nullcontext():
            if self.pp_size > 1:
                return self._pipelined_log_probs(local, with_entropy=with_entropy)
            return super()._log_prob_pass(local, with_entropy=with_entropy)

    def _shares_prompts(self) -> bool:
        """Megatron's forward packs every sample whole (its attention takes one sequence per segment)."""
        return False

    def _old_policy_from_training(self, local: LocalRollout) -> bool:
        """This backend always runs the old policy's pass: its before-log-prob hook and routing replay's recording
        run there."""
        return False

    def prepare(self, batch: RolloutBatch, values: list[list[float]] | None = None) -> dict[int, list[float]]:
        self._preparing = True
        try:
            return super().prepare(batch, values)
        finally:
            self._preparing = False

    # -------------------------------------------------------------------------------------------- train
    def train(self, rollout_id: int) -> dict[str, Any]:
        self._rollout_id = rollout_id
        self._step_id = 0
        with self.routing.replaying() if self.routing is not None else contextlib.nullcontext():
            return super().train(rollout_id)

    def _before_micro_batch(self, *, last: bool) -> None:
        """Megatron's DDP reduces the gradient buffers in ``finalize_model_grads``, after the last micro-batch."""

    def _accumulate_gradients(self, local: LocalRollout, micro_batches: list[list[int]]) -> dict[str, float]:
        """The torch backend's gradient accumulation (the loss normalised over the whole step on every data-parallel
        rank), through the pipeline schedule when there are several stages: the last stage computes each
        micro-batch's loss and the step's metrics, which every stage then returns."""
        if self.pp_size == 1:
            return super()._accumulate_gradients(local, micro_batches)
        denominator = self._step_denominator(local, micro_batches)
        scale = self._gradient_average_ranks() / denominator
        sums: dict[str, float] = {}

        def step(positions: list[int]) -> torch.Tensor:
            loss, metrics = self._micro_batch_loss(local, positions)
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            return loss * scale

        self._run_pipeline(local, micro_batches, step, forward_only=False)
        metrics = self._step_means(sums, denominator) if self.last_stage else {}
        return self._metrics_from_last_stage(metrics)

    def _train_step(self, local: LocalRollout, micro_batches: list[list[int]]) -> dict[str, float]:
        from megatron.core.distributed import finalize_model_grads

        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        if self.before_train_step_hook is not None:
            self.before_train_step_hook(
                self.args, self._rollout_id, self._step_id, self.model, self.optimizer, self.schedule
            )
        # Megatron's DDP averages gradients over data-parallel ranks, as FSDP does in the torch backend.
        with mg_model.recomputing(self.model, self.config):
            out = self._accumulate_gradients(local, micro_batches)
        finalize_model_grads([self.model])
        success, grad_norm, _ = self.optimizer.step()
        out["grad_norm"] = float(grad_norm) if grad_norm is not None else 0.0
        out["lr"] = self.schedule.lr
        if not success:
            logger.warning("non-finite gradients, optimizer step skipped")
            out["skipped_step"] = 1.0
        self.schedule.step()
        self._step_id += 1
        return out

    # ---------------------------------------------------------------------------------------- offload
    def _ddp_buffers(self) -> list[Any]:
        return [*self.model.buffers, *self.model.expert_parallel_buffers]

    def _inner_optimizers(self) -> list[torch.optim.Optimizer]:
        wrapped = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        return [
            w.optimizer for w in wrapped if isinstance(getattr(w, "optimizer", None), torch.optim.Optimizer)
        ]

    def offload(self) -> int:
        """slime's sleep (``--offload``): Megatron's parameter and gradient buffers (megatron-core's own buffer
        offload: parameters to pinned host memory, gradients dropped), the optimizer's main weights and moments to
        host memory, the cache freed. Returns the bytes torch still holds on the device.

        In fp32 the optimizer's main weights are views of the parameter buffer and travel with it; only main weights
        of their own (bf16 training) move separately, so an update still lands in the model after ``onload``."""
        if not self.offloaded:
            aliased = {
                b.param_data.untyped_storage().data_ptr()
                for b in self._ddp_buffers()
                if b.param_data is not None
            }
            for inner in self._inner_optimizers():
                for group in inner.param_groups:
                    for param in group["params"]:
                        if param.is_cuda and param.untyped_storage().data_ptr() not in aliased:
                            param.data = param.data.cpu()
                for state in inner.state.values():
                    for key, value in state.items():
                        if isinstance(value, torch.Tensor) and value.is_cuda:
                            state[key] = value.cpu()
            for buffer in self._ddp_buffers():
                buffer.offload_to_cpu(move_params=True, move_grads=True)
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
        self.offloaded = True
        return torch.cuda.memory_allocated(self.device)

    def onload(self) -> int:
        """slime's wake-up: buffers, main weights and moments back on the GPU (gradients zeroed)."""
        if self.offloaded:
            for buffer in self._ddp_buffers():
                buffer.reload_from_cpu(move_params=True, move_grads=True)
            for inner in self._inner_optimizers():
                for group in inner.param_groups:
                    for param in group["params"]:
                        if not param.is_cuda:
                            param.data = param.data.to(self.device)
                for state in inner.state.values():
                    for key, value in state.items():
                        # AdamW's step counter stays on the host (neither fused nor capturable here).
                        if isinstance(value, torch.Tensor) and key != "step":
                            state[key] = value.to(self.device)
        self.offloaded = False
        return torch.cuda.memory_allocated(self.device)

    @contextlib.contextmanager
    def _weights_on_device(self) -> Iterator[None]:
        """The parameters on the GPU for the duration (an offloaded rank pushing or summing its weights), then back
        to host memory; gradients and optimizer state stay where they are."""
        if not self.offloaded:
            yield
            return
        for buffer in self._ddp_buffers():
            buffer.reload_from_cpu(move_params=True, move_grads=False)
        try:
            yield
        finally:
            for buffer in self._ddp_buffers():
                buffer.offload_to_cpu(move_params=True, move_grads=False)
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------------------------------- weights
    def parameter_checksum(self) -> list[float]:
        total = torch.zeros(2, dtype=torch.float64)
        with self._weights_on_device():
            for _, tensor in mg_model.iter_full_megatron_params(self.model, self.shape, self.param_plan):
                t = tensor.double().cpu()
                total += torch.stack([t.sum(), t.square().sum()])
        return total.tolist()

    def full_state(self) -> dict[str, torch.Tensor]:
        """Every parameter by Hugging Face name (every pipeline stage's) on global rank 0 (host memory); a
        collective."""
        state = {}
        with self._weights_on_device():
            for name, tensor in mg_model.iter_hf_params(self.model, self.shape, self.param_plan):
                if self.global_rank == 0:
                    state[name] = tensor.cpu().clone()
        return state

    def _writes_files(self) -> bool:
        return self.global_rank == 0

    # -------------------------------------------------------------------------------------- checkpoints
    def _sharded_state(self, *, with_optimizer: bool, is_loading: bool) -> dict[str, Any]:
        model_state = self.model.module.sharded_state_dict()
        state: dict[str, Any] = {"model": model_state}
        if with_optimizer:
            # Saved fully reshardable: a run can resume with another data-parallel size.
            state["optimizer"] = self.optimizer.sharded_state_dict(
                model_state,
                is_loading=is_loading,
                metadata={"distrib_optim_sharding_type": "fully_reshardable"},
            )
        return state

    def _world_barrier(self) -> None:
        dist.barrier()

    def save(self, directory: str) -> None:
        """Model and optimizer in Megatron's distributed checkpoint format (``iter_N/model``), plus per-rank RNG
        and schedule state."""
        from megatron.core import dist_checkpointing

        path = Path(directory)
        if self.global_rank == 0:
            # A rollout saved again (a run resumed before its next save) starts from an empty directory.
            shutil.rmtree(path / "model", ignore_errors=True)
            (path / "model").mkdir(parents=True)
        self._world_barrier()
        dist_checkpointing.save(
            self._sharded_state(with_optimizer=True, is_loading=False), str(path / "model")
        )
        checkpoint.save_rank_state(
            path / f"rank_{self.global_rank:05d}.pt",
            {"rng": checkpoint.rng_state(), "schedule": self.schedule.state_dict()},
        )
        self._world_barrier()

    def _init_empty_optimizer_state(self) -> None:
        """Zero AdamW state at step 0 for every parameter that has none (a run that has not stepped yet).

        Without TransformerEngine or Apex, megatron-core's distributed optimizer wraps plain torch AdamW and reads a
        ``step`` from every parameter's state when it builds the state dict to load into (a fresh optimizer has
        none); what is made here is what :meth:`_load_optimizer` then overwrites.
        """
        for inner in self._inner_optimizers():
            for group in inner.param_groups:
                on_device = group.get("fused") or group.get("capturable")
                for param in group["params"]:
                    state = inner.state[param]
                    if "step" in state:
                        continue
                    state["step"] = torch.tensor(
                        0.0, dtype=torch.float32, device=param.device if on_device else None
                    )
                    state.setdefault("exp_avg", torch.zeros_like(param))
                    state.setdefault("exp_avg_sq", torch.zeros_like(param))

    def _load_optimizer(self, saved: Any) -> None:
        """Load a distributed-optimizer state saved by :meth:`save` (fully reshardable).

        megatron-core's own loader breaks on plain torch AdamW, its fallback without TransformerEngine or Apex:
        it gives every parameter's state one shared ``step`` tensor (taken from the parameter groups), then
        copies the saved tensors into every tensor of that state while the saved entries carry no ``step``
        (KeyError 'step'); and a ``step`` shared by all parameters would be advanced once per parameter by the
        next ``foreach`` AdamW step, skewing its bias correction. So the groups are loaded first, each
        parameter's ``step`` is set aside while the saved moments and main parameters are copied in, and it comes
        back as a tensor of its own. With TransformerEngine or Apex there is no per-parameter ``step`` and this
        is megatron-core's loader step for step.
        """
        optimizers = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        if len(optimizers) == 1:
            parts = [saved]
        else:
            parts = [saved[index] for index in sorted(saved)] if isinstance(saved, dict) else list(saved)
        for optimizer, part in zip(optimizers, parts, strict=True):
            part = dict(part)
            param_state = part.pop("param_state", None)
            sharding_type = part.pop("param_state_sharding_type", None)
            optimizer.load_state_dict(part)
            if param_state is None:
                continue
            if sharding_type != "fully_reshardable":
                raise ValueError(
                    f"--load: distributed-optimizer state of type {sharding_type!r}; this backend saves and "
                    "loads 'fully_reshardable'"
                )
            inner = optimizer.optimizer.state
            steps = {param: state.pop("step") for param, state in inner.items() if "step" in state}
            optimizer.load_parameter_state_from_fully_reshardable(param_state)
            for param, step in steps.items():
                inner[param]["step"] = step.detach().clone()

    def _dist_load(self, path: Path, *, load_optimizer: bool) -> None:
        from megatron.core import dist_checkpointing

        if load_optimizer:
            self._init_empty_optimizer_state()
        state = dist_checkpointing.load(
            self._sharded_state(with_optimizer=load_optimizer, is_loading=True), str(path)
        )
        self.model.module.load_state_dict(state["model"])
        if load_optimizer:
            self._load_optimizer(state["optimizer"])

    def load(self, directory: str, *, load_optimizer: bool, load_rng: bool) -> None:
        path = Path(directory)
        self._dist_load(path / "model", load_optimizer=load_optimizer)
        if load_optimizer:
            rank_file = path / f"rank_{self.global_rank:05d}.pt"
            state = checkpoint.load_rank_state(rank_file if rank_file.is_file() else path / "rank_00000.pt")
            self.schedule.load_state_dict(state["schedule"])
            if load_rng and rank_file.is_file():
                checkpoint.set_rng_state(state["rng"])
        if self.role == ACTOR:
            self._reset_old_actor_stores()
        self._world_barrier()

    # ------------------------------------------------------------------------------------- weight push
    def _sender(self, request: WeightPushRequest, buckets: list[list[str]]) -> WeightSender | None:
        # One rank per data-parallel replica (first pipeline stage, tensor- and context-parallel rank 0) feeds
        # engines; the others only help gather.
        if self.tp_rank != 0 or self.pp_rank != 0 or self.cp_rank != 0:
            return None
        return super()._sender(request, buckets)

    def push_weights(self, request: WeightPushRequest) -> WeightPushReport | None:
        """Gather each parameter over tensor (and expert) parallel ranks and pipeline stages, convert it to Hugging
        Face names and push bucket by bucket (``--update-weight-buffer-size``); global rank 0's report. An offloaded
        rank brings its parameters (not gradients or optimizer state) back to the GPU for the push."""
        dtype = self.compute_dtype
        sizes = mg_model.megatron_param_sizes(self.param_plan, dtype)
        buckets = plan_buckets(sizes, self.args.update_weight_buffer_size)
        last_of_bucket = {names[-1] for names in buckets}
        sender = self._sender(request, buckets)
        start = time.perf_counter()
        if sender is not None:
            sender.begin(request.version)
        pending: list[tuple[str, torch.Tensor]] = []
        with self._weights_on_device(), self._push_guard(sender):
            for mg_name, tensor in mg_model.iter_full_megatron_params(
                self.model, self.shape, self.param_plan
            ):
                if sender is not None:
                    converted = convert.megatron_param_to_hf(mg_name, tensor, self.shape)
                    pending.extend((n, t if dtype is None else t.to(dtype)) for n, t in converted)
                if mg_name in last_of_bucket:
                    if sender is not None:
                        sender.send(pending)
                    pending = []
        return self._finish_push(request, sender, start, len(buckets))

    def _push_barrier(self) -> None:
        self._world_barrier()

    def shutdown(self) -> None:
        for sender in self.senders.values():
            with contextlib.suppress(Exception):
                sender.close()
        self.senders.clear()
        from megatron.core import parallel_state as mpu

        with contextlib.suppress(Exception):
            mpu.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
        self.group = None
