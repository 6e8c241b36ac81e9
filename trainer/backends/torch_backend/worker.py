"""One training rank of the torch backend: its model shard, optimizer and schedule, the log-prob, advantage and
training passes over its share of a rollout, checkpoints and the weight push to engines.

Ranks of one group (the actor's or the critic's) form a torch.distributed world (gloo on CPU, NCCL on GPU) and
shard the model with FSDP2; a group of one rank runs the plain model in the caller's process.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from services.core.process_group import training_backend
from services.core.supervisor import usable_cpus
from trainer import checkpoint
from trainer.algorithms.advantages import AdvantageConfig, compute_advantages_and_returns
from trainer.algorithms.logprobs import response_log_probs
from trainer.algorithms.loss import LossConfig, PolicyLossInputs, policy_loss, sft_loss, value_loss
from trainer.algorithms.reduction import make_reducer, normalizer
from trainer.algorithms.tis import load_tis_function
from trainer.backends.batch import RolloutBatch
from trainer.backends.torch_backend import model as model_lib
from trainer.backends.torch_backend.optim import LRSchedule, OptimizerConfig, build_optimizer
from trainer.data_packing import (
    PackedBatch,
    dynamic_micro_batches,
    first_fit_bins,
    fixed_micro_batches,
    pack_sequences,
    pack_shared_prompts,
    partition_for_dp,
)
from trainer.memory_snapshot import MemoryHistory
from trainer.weight_sync.engine_client import EngineClient
from trainer.weight_sync.transports import (
    DiskSender,
    DistributedSender,
    TensorSender,
    WeightSender,
    plan_buckets,
)

logger = logging.getLogger(__name__)

ACTOR, CRITIC = "actor", "critic"


@dataclass(frozen=True)
class DistInit:
    """Where the ranks of one group meet (a TCP store hosted by rank 0), and the first GPU of the group."""

    master_addr: str
    master_port: int
    timeout_minutes: int = 10
    gpu_offset: int = 0


@dataclass(frozen=True)
class WeightPushRequest:
    """One weight push: the engines (base URLs), the transport and the version to publish."""

    engines: tuple[str, ...]
    transport: str
    version: str
    disk_dir: str | None = None
    master_port: int | None = None
    auth_token: str | None = None


@dataclass
class WeightPushReport:
    transport: str
    version: str
    bytes: int
    seconds: float
    buckets: int


@dataclass
class LocalRollout:
    """This rank's samples of a rollout and everything computed for them (per-sample response tensors)."""

    indices: list[int]
    tokens: list[list[int]]
    total_lengths: list[int]
    response_lengths: list[int]
    loss_masks: list[torch.Tensor]
    rewards: list[float]
    rollout_log_probs: list[torch.Tensor] | None
    steps: list[list[list[int]]]
    log_prob_steps: list[list[list[int]]]
    log_probs: list[torch.Tensor] | None = None
    ref_log_probs: list[torch.Tensor] | None = None
    entropy: list[torch.Tensor] | None = None
    ref_entropy: list[torch.Tensor] | None = None
    values: list[torch.Tensor] | None = None
    advantages: list[torch.Tensor] | None = None
    returns: list[torch.Tensor] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    # The old policy's log-probs come from the training forward (see TrainWorker._old_policy_from_training).
    old_policy_from_training: bool = False
    # Each micro-batch's packed row (samples' positions -> PackedBatch): every pass over it packs it the same way.
    # Packed rows by micro-batch (sample positions); a backend may keep per-row layouts here under its own keys.
    packed: dict[tuple[Any, ...], Any] = field(default_factory=dict)

    def record_old_policy(
        self, positions: list[int], log_probs: list[torch.Tensor], entropy: list[torch.Tensor] | None
    ) -> None:
        """Keep the old policy's log-probs (detached) and entropies of the samples at ``positions``, as the
        training forward computed them, for the rollout metrics."""
        if self.log_probs is None:
            self.log_probs = [torch.empty(0)] * len(self.tokens)
        if entropy is not None and self.entropy is None:
            self.entropy = [torch.empty(0)] * len(self.tokens)
        for k, i in enumerate(positions):
            self.log_probs[i] = log_probs[k]
            if entropy is not None:
                self.entropy[i] = entropy[k].detach()


def _pick_device(gpu_index: int) -> torch.device:
    if torch.cuda.is_available():
        device = torch.device("cuda", gpu_index % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def _cat_double(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``tensors`` end to end in float64 (an empty float64 tensor for none)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([t if t.dim() == 1 else t.reshape(-1) for t in tensors]).double()


class TrainWorker:
    """One rank of the actor or critic group."""

    def __init__(
        self, args: Any, *, role: str, rank: int, world_size: int, dist_init: DistInit | None
    ) -> None:
        if role not in (ACTOR, CRITIC):
            raise ValueError(f"unknown training role {role!r}")
        if args.hf_checkpoint is None:
            raise ValueError("--train-backend fsdp needs --hf-checkpoint: the Hugging Face model to train")
        self.args = args
        self.role = role
        self.rank = rank
        self.world_size = world_size
        self.device = _pick_device(rank + (dist_init.gpu_offset if dist_init is not None else 0))
        self.memory_history = MemoryHistory.start(args, rank=rank, role=role, device=self.device)
        self.group: dist.ProcessGroup | None = None
        if world_size > 1:
            if dist_init is None:
                raise ValueError("a multi-rank group needs a rendezvous address")
            if self.device.type == "cpu":
                # Ranks share the host's cores; oversubscribed thread pools slow every rank down (torchrun
                # likewise defaults each process to a share of the cores).
                torch.set_num_threads(max(1, usable_cpus() // world_size))
            backend = training_backend(args.distributed_backend, self.device)
            dist.init_process_group(
                backend,
                init_method=f"tcp://{dist_init.master_addr}:{dist_init.master_port}",
                rank=rank,
                world_size=world_size,
                timeout=timedelta(minutes=dist_init.timeout_minutes),
            )
            self.group = dist.group.WORLD
        if args.deterministic_mode:
            torch.use_deterministic_algorithms(True)
        if args.true_on_policy_mode and self.device.type == "cuda":
            _enable_batch_invariant_kernels()
        torch.manual_seed(args.seed)

        self.compute_dtype = torch.bfloat16 if args.bf16 else None
        init_path = self._initial_weights_path()
        loader = model_lib.load_policy if role == ACTOR else model_lib.load_critic
        self.model = loader(init_path, dtype=torch.float32, device=self.device)
        self.architecture = model_lib.architecture_name(self.model)
        self.hf_config = self.model.config
        if world_size > 1:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(self.device.type, (world_size,))
            model_lib.apply_fsdp(self.model, mesh, param_dtype=self.compute_dtype)

        self.steps_per_rollout = args.rollout_batch_size * args.n_samples_per_prompt // args.global_batch_size
        total_steps = args.num_rollout * self.steps_per_rollout if args.num_rollout else None
        self.optim_config = OptimizerConfig.from_args(args, role=role, total_steps=total_steps)
        self.optimizer = build_optimizer(self.model.parameters(), self.optim_config)
        self.schedule = LRSchedule(self.optimizer, self.optim_config)
        self.loss_config = LossConfig.from_args(args)
        self.adv_config = AdvantageConfig.from_args(args)
        self.tis_fn = (
            functools.partial(load_tis_function(args.custom_tis_function_path), args)
            if args.use_tis
            else None
        )
        self.custom_loss = None
        if role == ACTOR and args.loss_type == "custom_loss":
            from services.core.plugins import load_function

            self.custom_loss = load_function(
                args.custom_loss_function_path, flag="--custom-loss-function-path"
            )

        self.stores: dict[str, model_lib.TensorStore] = {}
        if role == ACTOR:
            if args.kl_coef != 0 or args.use_kl_loss:
                self.stores["ref"] = self._load_reference()
            self._reset_old_actor_stores()
        self.local: LocalRollout | None = None
        # --offload: model and optimizer state live in host memory between trainings (see offload()).
        self.offloaded = False
        self.senders: dict[tuple[str, tuple[str, ...], int | None], WeightSender] = {}
        logger.info(
            "%s rank %d/%d on %s: %s from %s",
            role,
            rank,
            world_size,
            self.device,
            self.architecture,
            init_path,
        )

    # ----------------------------------------------------------------------------------------------- setup
    def _initial_weights_path(self) -> str:
        if (
            self.role == CRITIC
            and self.args.critic_load
            and (Path(self.args.critic_load) / "config.json").is_file()
        ):
            return self.args.critic_load
        return self.args.hf_checkpoint

    def _load_reference(self) -> model_lib.TensorStore:
        """The reference model's shards in host memory: ``--ref-load`` (a checkpoint, at ``--ref-ckpt-step`` or its
        latest, or a Hugging Face directory), else the initial ``--hf-checkpoint`` weights."""
        ref_load = self.args.ref_load
        if ref_load is None:
            return model_lib.TensorStore.snapshot(self.model)
        if checkpoint.is_checkpoint_root(ref_load):
            step = checkpoint.resolve_iteration(ref_load, self.args.ref_ckpt_step, flag="--ref-load")
            own = model_lib.TensorStore.snapshot(self.model)
            checkpoint.load_model(checkpoint.iteration_dir(ref_load, step) / "model", self.model)
            ref = model_lib.TensorStore.snapshot(self.model)
            own.load_into(self.model)
            logger.info("reference model: %s at rollout %d", ref_load, step)
            return ref
        logger.info("reference model: Hugging Face weights %s", ref_load)
        return model_lib.TensorStore.from_full_state(
            self.model, checkpoint.read_hf_weights(ref_load, flag="--ref-load")
        )

    def _reset_old_actor_stores(self) -> None:
        if self.args.keep_old_actor:
            self.stores["old_actor"] = model_lib.TensorStore.snapshot(self.model)
            if self.args.update_weights_interval == 1:
                self.stores["rollout_actor"] = model_lib.TensorStore.snapshot(self.model)

    # --------------------------------------------------------------------------------------- collectives
    def _all_reduce(self, values: Sequence[float], op: dist.ReduceOp = dist.ReduceOp.SUM) -> list[float]:
        if self.group is None:
            return [float(v) for v in values]
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=op, group=self.group)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    # ------------------------------------------------------------------------------------------- batches
    def _localize(self, batch: RolloutBatch, *, training: bool = True) -> LocalRollout:
        """This rank's samples and their micro-batch schedule.

        For training the rollout must fill whole global batches, split over the ranks (strided or
        ``--balance-data``) and into ``--num-steps-per-rollout`` steps. A forward-only pass takes any number of
        samples as one step; ranks short of a sample repeat sample 0 (index -1, result dropped) because FSDP ranks
        must run the same number of forwards.
        """
        args = self.args
        n = len(batch)
        if n == 0:
            raise ValueError("the rollout batch is empty")
        if training:
            if n % args.global_batch_size:
                raise ValueError(
                    f"a rollout of {n} samples is not a multiple of --global-batch-size {args.global_batch_size}"
                )
            if args.global_batch_size % self.world_size:
                raise ValueError(
                    f"--global-batch-size {args.global_batch_size} does not split over {self.world_size} "
                    "data-parallel ranks"
                )
            parts = partition_for_dp(
                batch.total_lengths,
                self.world_size,
                balance=args.balance_data,
                group_size=args.n_samples_per_prompt,
            )
            indices = parts[self.rank]
            local = batch.select(indices)
            local_gbs = args.global_batch_size // self.world_size
            step_samples = [
                list(range(s * local_gbs, (s + 1) * local_gbs)) for s in range(n // args.global_batch_size)
            ]
        else:
            per_rank = -(-n // self.world_size)
            indices = list(range(self.rank, n, self.world_size))
            padding = per_rank - len(indices)
            local = batch.select(indices + [0] * padding)
            indices = indices + [-1] * padding
            step_samples = [list(range(per_rank))]
        lengths = local.total_lengths
        steps = self._micro_batches(step_samples, lengths, args.max_tokens_per_gpu)
        log_prob_steps = steps
        if args.use_dynamic_batch_size and args.log_probs_max_tokens_per_gpu not in (
            None,
            args.max_tokens_per_gpu,
        ):
            log_prob_steps = self._micro_batches(step_samples, lengths, args.log_probs_max_tokens_per_gpu)
        return LocalRollout(
            indices=indices,
            tokens=local.tokens,
            total_lengths=lengths,
            response_lengths=local.response_lengths,
            loss_masks=[torch.tensor(m, dtype=torch.float32, device=self.device) for m in local.loss_masks],
            rewards=local.rewards,
            rollout_log_probs=None
            if local.rollout_log_probs is None
            else [
                torch.tensor(lp, dtype=torch.float32, device=self.device) for lp in local.rollout_log_probs
            ],
            steps=steps,
            log_prob_steps=log_prob_steps,
        )

    def _micro_batches(
        self, step_samples: list[list[int]], lengths: list[int], max_tokens: int | None
    ) -> list[list[list[int]]]:
        """Per step, the micro-batches (lists of local sample positions); every rank gets the same count."""
        args = self.args
        if args.true_on_policy_mode:
            # One sequence per forward: its numerics cannot depend on what it is batched with.
            return [[[i] for i in samples] for samples in step_samples]
        if not args.use_dynamic_batch_size:
            return [
                [[samples[j] for j in mb] for mb in fixed_micro_batches(len(samples), args.micro_batch_size)]
                for samples in step_samples
            ]
        counts = [first_fit_bins([lengths[i] for i in samples], max_tokens) for samples in step_samples]
        counts = [int(c) for c in self._all_reduce(counts, op=dist.ReduceOp.MAX)]
        out = []
        for samples, count in zip(step_samples, counts, strict=True):
            parts = dynamic_micro_batches([lengths[i] for i in samples], min(count, len(samples)))
            out.append([[samples[j] for j in part] for part in parts if part])
        return out

    # ----------------------------------------------------------------------------------------- forwards
    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        if self.compute_dtype is not None and self.group is None:
            with torch.autocast(self.device.type, dtype=self.compute_dtype):
                yield
        else:
            yield

    def _shares_prompts(self) -> bool:
        """Whether micro-batches are packed with shared prompts (:func:`pack_shared_prompts`): not for a custom
        loss, which reads the logits in slime's layout, one whole sample after another."""
        return not self.args.disable_prompt_sharing and self.loss_config.loss_type != "custom_loss"

    def _pack(self, local: LocalRollout, positions: list[int]) -> PackedBatch:
        key = tuple(positions)
        packed = local.packed.get(key)
        if packed is None:
            tokens = [local.tokens[i] for i in positions]
            responses = [local.response_lengths[i] for i in positions]
            if self._shares_prompts():
                packed = pack_shared_prompts(tokens, responses, device=self.device)
            else:
                packed = pack_sequences(tokens, device=self.device, response_lengths=responses)
            local.packed[key] = packed
        return packed

    def _forward(self, local: LocalRollout, positions: list[int]) -> torch.Tensor:
        packed = self._pack(local, positions)
        with self._autocast():
            return model_lib.forward_logits(self.model, packed)

    def _response_rows(self, local: LocalRollout, positions: list[int]) -> list[torch.Tensor]:
        """Per sample, the rows of ``_forward``'s output that predict its response tokens."""
        return self._pack(local, positions).response_rows

    def _response_log_probs(
        self, logits: torch.Tensor, local: LocalRollout, positions: list[int], *, with_entropy: bool
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        return response_log_probs(
            logits,
            self._response_rows(local, positions),
            [torch.as_tensor(local.tokens[i], device=self.device) for i in positions],
            [local.response_lengths[i] for i in positions],
            temperature=self.args.rollout_temperature,
            with_entropy=with_entropy,
        )

    @torch.no_grad()
    def _log_prob_pass(
        self, local: LocalRollout, *, with_entropy: bool
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        log_probs: list[torch.Tensor | None] = [None] * len(local.tokens)
        entropy: list[torch.Tensor | None] = [None] * len(local.tokens)
        for step in local.log_prob_steps:
            for positions in step:
                self._fill_log_probs(local, positions, log_probs, entropy, with_entropy=with_entropy)
        return log_probs, (entropy if with_entropy else None)

    def _fill_log_probs(
        self,
        local: LocalRollout,
        positions: list[int],
        log_probs: list[torch.Tensor | None],
        entropy: list[torch.Tensor | None],
        *,
        with_entropy: bool,
    ) -> torch.Tensor:
        """One micro-batch's forward; its samples' response log-probs (and entropies) go to their positions in
        ``log_probs`` (``entropy``). Returns the forward's output."""
        logits = self._forward(local, positions)
        lps, ents = self._response_log_probs(logits, local, positions, with_entropy=with_entropy)
        for k, i in enumerate(positions):
            log_probs[i] = lps[k]
            if ents is not None:
                entropy[i] = ents[k]
        return logits

    @torch.no_grad()
    def _value_pass(self, local: LocalRollout) -> list[torch.Tensor]:
        values: list[torch.Tensor | None] = [None] * len(local.tokens)
        for step in local.log_prob_steps:
            for positions in step:
                out = self._forward(local, positions).float()[:, 0]
                for i, rows in zip(positions, self._response_rows(local, positions), strict=True):
                    values[i] = out[rows]
        return values

    def _with_weights(self, tag: str) -> contextlib.AbstractContextManager[None]:
        """Swap a stored set of weights into the model for the duration of a forward-only pass."""

        @contextlib.contextmanager
        def swap() -> Iterator[None]:
            if "actor" in self.stores:
                self.stores["actor"].update_from(self.model)
            else:
                self.stores["actor"] = model_lib.TensorStore.snapshot(self.model)
            own = self.stores["actor"]
            self.stores[tag].load_into(self.model)
            try:
                yield
            finally:
                own.load_into(self.model)

        return swap()

    # ----------------------------------------------------------------------------------------- actor API
    def compute_log_probs(self, batch: RolloutBatch) -> dict[int, list[float]]:
        """Response log-probs of the current weights for this rank's samples, keyed by position in ``batch``."""
        local = self._localize(batch, training=False)
        log_probs, _ = self._log_prob_pass(local, with_entropy=False)
        return {idx: lp.tolist() for idx, lp in zip(local.indices, log_probs, strict=True) if idx >= 0}

    def prepare(self, batch: RolloutBatch, values: list[list[float]] | None = None) -> dict[int, list[float]]:
        """Reference and old-policy log-probs, advantages and returns for this rank's samples; returns the returns
        (for the critic), keyed by position in ``batch``."""
        args = self.args
        local = self._localize(batch)
        if args.compute_advantages_and_returns:
            if "ref" in self.stores:
                with self._with_weights("ref"):
                    local.ref_log_probs, local.ref_entropy = self._log_prob_pass(
                        local, with_entropy=args.use_rollout_entropy
                    )
            if self._old_policy_from_training(local):
                local.old_policy_from_training = True
            elif args.keep_old_actor:
                with self._with_weights("old_actor"):
                    local.log_probs, local.entropy = self._log_prob_pass(
                        local, with_entropy=args.use_rollout_entropy
                    )
            else:
                local.log_probs, local.entropy = self._log_prob_pass(
                    local, with_entropy=args.use_rollout_entropy
                )
            if values is not None:
                local.values = [
                    torch.tensor(values[i], dtype=torch.float32, device=self.device) for i in local.indices
                ]
            local.advantages, local.returns = compute_advantages_and_returns(
                self.adv_config,
                rewards=local.rewards,
                response_lengths=local.response_lengths,
                loss_masks=[m.cpu() for m in local.loss_masks],
                log_probs=None if local.log_probs is None else [t.cpu() for t in local.log_probs],
                ref_log_probs=None if local.ref_log_probs is None else [t.cpu() for t in local.ref_log_probs],
                values=None if local.values is None else [t.cpu() for t in local.values],
                group=self.group,
            )
            local.advantages = [a.to(self.device) for a in local.advantages]
            local.returns = [r.to(self.device) for r in local.returns]
        if not local.old_policy_from_training:
            # Otherwise they are computed once training has produced the old policy's log-probs.
            local.metrics = self._rollout_metrics(local)
        self.local = local
        if local.returns is None:
            return {}
        return {idx: r.tolist() for idx, r in zip(local.indices, local.returns, strict=True)}

    def _old_policy_from_training(self, local: LocalRollout) -> bool:
        """Whether the old policy's log-probs can be read off the training forward instead of a pass of their own.

        When the rollout is a single optimizer step, every micro-batch's forward runs on the weights the old-policy
        pass would use (the update comes after the last one), over the same micro-batches: the same numbers, so
        ``ppo_kl`` is exactly 0 either way and the loss, its gradient and the update do not change (bit for bit on
        CPU, as the tests check; on GPU a no-grad pass may pick other kernels, and the training forward's values
        are then the exact on-policy ones). That needs the current weights as the old policy (no
        ``--keep-old-actor``), log-prob micro-batches equal to the training ones, the policy loss (a custom loss
        reads them before its forward) and advantages that do not use them (``--kl-coef`` 0).
        """
        args = self.args
        return (
            self.role == ACTOR
            and not args.keep_old_actor
            and len(local.steps) == 1
            and local.log_prob_steps == local.steps
            and self.loss_config.loss_type == "policy_loss"
            and args.kl_coef == 0
        )

    def _rollout_metrics(self, local: LocalRollout) -> dict[str, float]:
        """Means over the rollout's samples of each per-token quantity's masked mean (slime's rollout/* keys)."""
        series: dict[str, list[torch.Tensor] | None] = {
            "log_probs": local.log_probs,
            "ref_log_probs": local.ref_log_probs,
            "entropy": local.entropy,
            "ref_entropy": local.ref_entropy,
            "values": local.values,
            "advantages": local.advantages,
            "returns": local.returns,
            "rollout_log_probs": local.rollout_log_probs,
        }
        # Each quantity concatenated over the samples and reduced as the loss is (a per-sample loop was thousands
        # of tiny ops, a tenth of a small model's training step on CPU).
        flat = {name: _cat_double(values) for name, values in series.items() if values is not None}
        if "log_probs" in flat and "rollout_log_probs" in flat:
            flat["train_rollout_logprob_abs_diff"] = (flat["log_probs"] - flat["rollout_log_probs"]).abs()
        if "log_probs" in flat and "ref_log_probs" in flat:
            flat["kl"] = flat["log_probs"] - flat["ref_log_probs"]
        names = list(flat)
        sum_of_sample_means = make_reducer(local.loss_masks, per_token=False)
        sums = [float(sum_of_sample_means(flat[name])) for name in names]
        totals = self._all_reduce([*sums, len(local.tokens)])
        count = max(totals[-1], 1.0)
        return {name: total / count for name, total in zip(names, totals[:-1], strict=True)}

    # ---------------------------------------------------------------------------------------- critic API
    def compute_values(self, batch: RolloutBatch) -> dict[int, list[float]]:
        """The critic's values of this rank's samples (kept for its own update), keyed by position in ``batch``."""
        local = self._localize(batch)
        local.values = self._value_pass(local)
        self.local = local
        return {idx: v.tolist() for idx, v in zip(local.indices, local.values, strict=True)}

    def set_returns(self, returns: list[list[float]]) -> None:
        """Give the critic the returns computed on the actor side (positions of the batch it last saw)."""
        if self.local is None or self.local.values is None:
            raise RuntimeError("compute_values must run before set_returns")
        self.local.returns = [
            torch.tensor(returns[i], dtype=torch.float32, device=self.device) for i in self.local.indices
        ]

    # -------------------------------------------------------------------------------------------- train
    def train(self, rollout_id: int) -> dict[str, Any]:
        """Every optimizer step of the prepared rollout; returns per-step metrics and the rollout metrics."""
        local = self.local
        if local is None:
            raise RuntimeError(
                "prepare (actor) or compute_values + set_returns (critic) must run before train"
            )
        step_metrics = [self._train_step(local, step) for step in local.steps]
        if local.old_policy_from_training:
            local.metrics = self._rollout_metrics(local)
        if self.role == ACTOR:
            self._after_actor_train(rollout_id)
        self.local = None
        return {"steps": step_metrics, "rollout": local.metrics}

    def _accumulate_gradients(self, local: LocalRollout, micro_batches: list[list[int]]) -> dict[str, float]:
        """Forward and backward of every micro-batch of one optimizer step, the loss normalised over the whole step
        on every data-parallel rank; returns the step's loss metrics, averaged the same way."""
        denominator = self._step_denominator(local, micro_batches)
        scale = self._gradient_average_ranks() / denominator
        sums: dict[str, float] = {}
        for k, positions in enumerate(micro_batches):
            self._before_micro_batch(last=k == len(micro_batches) - 1)
            loss, metrics = self._micro_batch_loss(local, positions)
            (loss * scale).backward()
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        return self._step_means(sums, denominator)

    def _gradient_average_ranks(self) -> int:
        """How many ranks the gradient reduction averages over (the loss scale undoes it): the data-parallel ones."""
        return self.world_size

    def _step_denominator(self, local: LocalRollout, micro_batches: list[list[int]]) -> float:
        """What a step's summed losses are divided by: its sample (or masked-token) count over every rank."""
        masks = [local.loss_masks[i] for mb in micro_batches for i in mb]
        total = self._all_reduce([normalizer(masks, per_token=self.loss_config.per_token)])[0]
        return max(total, 1.0)

    def _step_means(self, sums: dict[str, float], denominator: float) -> dict[str, float]:
        """The step's metrics: each micro-batch sum, totalled over the ranks, over the step's denominator."""
        keys = sorted(sums)
        totals = self._all_reduce([sums[k] for k in keys])
        return {k: v / denominator for k, v in zip(keys, totals, strict=True)}

    def _before_micro_batch(self, *, last: bool) -> None:
        if hasattr(self.model, "set_requires_gradient_sync"):
            # Reduce gradients across ranks once, after the last micro-batch.
            self.model.set_requires_gradient_sync(last)

    def _train_step(self, local: LocalRollout, micro_batches: list[list[int]]) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        out = self._accumulate_gradients(local, micro_batches)
        max_norm = self.optim_config.clip_grad if self.optim_config.clip_grad > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        grad_norm = float(model_lib.full_tensor(grad_norm))
        out["grad_norm"] = grad_norm
        out["lr"] = self.schedule.lr
        if torch.isfinite(torch.tensor(grad_norm)):
            self.optimizer.step()
        else:
            logger.warning("%s: non-finite gradient norm %s, optimizer step skipped", self.role, grad_norm)
            out["skipped_step"] = 1.0
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out

    def _micro_batch_loss(
        self, local: LocalRollout, positions: list[int]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self._forward(local, positions)
        masks = [local.loss_masks[i] for i in positions]
        reduce = make_reducer(masks, per_token=self.loss_config.per_token)

        def pick(values: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
            return None if values is None else [values[i] for i in positions]

        if self.role == CRITIC:
            out = logits.float()[:, 0]
            values = [out[rows] for rows in self._response_rows(local, positions)]
            return value_loss(self.loss_config, values, pick(local.values), pick(local.returns), reduce)

        loss_type = self.loss_config.loss_type
        if loss_type == "custom_loss":
            return self.custom_loss(
                self.args, self._slime_batch(local, positions), logits.unsqueeze(0), reduce
            )
        need_entropy = loss_type == "policy_loss"
        log_probs, entropy = self._response_log_probs(logits, local, positions, with_entropy=need_entropy)
        if loss_type == "sft_loss":
            return sft_loss(log_probs, reduce)
        if local.advantages is None or (local.log_probs is None and not local.old_policy_from_training):
            raise ValueError(
                "--loss-type policy_loss needs advantages: drop --disable-compute-advantages-and-returns or use sft_loss"
            )
        if local.old_policy_from_training:
            old_log_probs = [lp.detach() for lp in log_probs]
            local.record_old_policy(
                positions, old_log_probs, entropy if self.args.use_rollout_entropy else None
            )
        else:
            old_log_probs = pick(local.log_probs)
        inputs = PolicyLossInputs(
            log_probs=log_probs,
            entropy=entropy,
            old_log_probs=old_log_probs,
            advantages=pick(local.advantages),
            loss_masks=masks,
            total_lengths=[local.total_lengths[i] for i in positions],
            response_lengths=[local.response_lengths[i] for i in positions],
            ref_log_probs=pick(local.ref_log_probs),
            rollout_log_probs=pick(local.rollout_log_probs),
        )
        return policy_loss(self.loss_config, inputs, reduce, tis_fn=self.tis_fn)

    def _slime_batch(self, local: LocalRollout, positions: list[int]) -> dict[str, Any]:
        """The micro-batch as slime's loss functions see it (keys of its ``RolloutBatch`` dict)."""
        tokens = [torch.as_tensor(local.tokens[i], device=self.device) for i in positions]
        batch: dict[str, Any] = {
            "unconcat_tokens": tokens,
            "tokens": tokens,
            "total_lengths": [local.total_lengths[i] for i in positions],
            "response_lengths": [local.response_lengths[i] for i in positions],
            "loss_masks": [local.loss_masks[i] for i in positions],
            "rewards": [local.rewards[i] for i in positions],
        }
        for key in ("log_probs", "ref_log_probs", "advantages", "returns", "values", "rollout_log_probs"):
            values = getattr(local, key)
            if values is not None:
                batch[key] = [values[i] for i in positions]
        return batch

    def _after_actor_train(self, rollout_id: int) -> None:
        interval = self.args.ref_update_interval
        if interval is not None and "ref" in self.stores and (rollout_id + 1) % interval == 0:
            logger.info(
                "rollout %d: reference model <- actor (--ref-update-interval %d)", rollout_id, interval
            )
            self.stores["ref"].update_from(self.model)

    def parameter_checksum(self) -> list[float]:
        """Sum and sum of squares of every parameter (float64), identical on every rank; for tests and sanity."""
        total = torch.zeros(2, dtype=torch.float64)
        for _, param in model_lib.named_parameters(self.model):
            local = model_lib.local_tensor(param.detach()).double().cpu()
            total += torch.stack([local.sum(), local.square().sum()])
        return self._all_reduce(total.tolist())

    def full_state(self) -> dict[str, torch.Tensor]:
        """Every parameter in full on rank 0 (host memory); other ranks return an empty dict (collective)."""
        state = {}
        for name, param in model_lib.named_parameters(self.model):
            full = model_lib.full_tensor(param.detach())
            if self.rank == 0:
                state[name] = full.cpu().clone()
        return state

    # -------------------------------------------------------------------------------------- checkpoints
    def save(self, directory: str) -> None:
        path = Path(directory)
        if self.rank == 0:
            path.mkdir(parents=True, exist_ok=True)
        self.barrier()
        checkpoint.save_model(path / "model", self.model)
        checkpoint.save_optimizer(path / "optim", self.model, self.optimizer)
        checkpoint.save_rank_state(
            path / f"rank_{self.rank:05d}.pt",
            {"rng": checkpoint.rng_state(), "schedule": self.schedule.state_dict()},
        )
        self.barrier()

    def load(self, directory: str, *, load_optimizer: bool, load_rng: bool) -> None:
        path = Path(directory)
        checkpoint.load_model(path / "model", self.model)
        if load_optimizer:
            checkpoint.load_optimizer(path / "optim", self.model, self.optimizer)
            rank_file = path / f"rank_{self.rank:05d}.pt"
            state = checkpoint.load_rank_state(rank_file if rank_file.is_file() else path / "rank_00000.pt")
            self.schedule.load_state_dict(state["schedule"])
            if load_rng and rank_file.is_file():
                checkpoint.set_rng_state(state["rng"])
        if self.role == ACTOR:
            self._reset_old_actor_stores()
        self.barrier()

    def _writes_files(self) -> bool:
        """Whether this rank writes what every rank computes together (the Hugging Face export)."""
        return self.rank == 0

    def export_hf(self, out_dir: str, dtype: str | None = None) -> str | None:
        state = self.full_state()
        if not self._writes_files():
            return None
        path = checkpoint.write_hf_checkpoint(
            out_dir,
            state,
            config=self.hf_config,
            architecture=self.architecture,
            tokenizer_source=self.args.hf_checkpoint,
            dtype=None if dtype is None else getattr(torch, dtype),
        )
        return str(path)

    # ---------------------------------------------------------------------------------------- offload
    def offload(self) -> int:
        """slime's sleep (``--offload``): parameters and optimizer state to host memory, the device's cache freed
        for the engines. On a CPU rank the host is the device and nothing moves. Returns the bytes torch still
        holds allocated on the device."""
        if not self.offloaded and self.device.type == "cuda":
            self.optimizer.zero_grad(set_to_none=True)
            self.model.to("cpu")
            self._move_optimizer_state(torch.device("cpu"))
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
        self.offloaded = True
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0

    def onload(self) -> int:
        """slime's wake-up: parameters and optimizer state back on the device before a training pass."""
        if self.offloaded and self.device.type == "cuda":
            self.model.to(self.device)
            self._move_optimizer_state(self.device)
        self.offloaded = False
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0

    def _move_optimizer_state(self, device: torch.device) -> None:
        for state in self.optimizer.state.values():
            for key, value in state.items():
                # AdamW's step counter stays on the host (this backend runs it neither fused nor capturable).
                if isinstance(value, torch.Tensor) and key != "step":
                    state[key] = value.to(device, non_blocking=True)

    # ------------------------------------------------------------------------------------- weight push
    def _sender(self, request: WeightPushRequest, buckets: list[list[str]]) -> WeightSender | None:
        """The sender of this rank for ``request`` (None when this rank has no engine to feed)."""
        transport = request.transport
        if transport == "tensor":
            mine = request.engines[self.rank :: self.world_size]
            if not mine:
                return None
        elif self.rank != 0:
            return None
        else:
            mine = request.engines
        key = (transport, tuple(mine), request.master_port)
        if key not in self.senders:
            # A new engine set (or a forced reconnect) replaces this transport's previous sender and group.
            for stale in [k for k in self.senders if k[0] == transport]:
                with contextlib.suppress(Exception):
                    self.senders.pop(stale).close()
            clients = [EngineClient(url, auth_token=request.auth_token) for url in mine]
            if transport == "distributed":
                if request.master_port is None:
                    raise ValueError("the distributed transport needs a master port for its process group")
                self.senders[key] = DistributedSender(
                    clients,
                    device=self.device,
                    gpus_per_engine=self.args.rollout_num_gpus_per_engine,
                    master_port=request.master_port,
                )
            elif transport == "tensor":
                self.senders[key] = TensorSender(
                    clients, device=self.device, tp_size=self.args.rollout_num_gpus_per_engine
                )
            elif transport == "disk":
                if request.disk_dir is None:
                    raise ValueError("the disk transport needs a directory shared with the engines")
                self.senders[key] = DiskSender(
                    clients,
                    directory=request.disk_dir,
                    config=self.hf_config,
                    architecture=self.architecture,
                    tokenizer_source=self.args.hf_checkpoint,
                    num_buckets=len(buckets),
                )
            else:
                raise ValueError(
                    f"unknown weight-sync transport {transport!r}; valid: distributed, tensor, disk"
                )
        return self.senders[key]

    def push_weights(self, request: WeightPushRequest) -> WeightPushReport | None:
        """Gather the full weights bucket by bucket (every rank takes part) and send them; rank 0's report."""
        params = dict(model_lib.named_parameters(self.model))
        # Engines serve in the compute dtype, so bf16 training sends half the bytes of its fp32 master weights.
        dtype = self.compute_dtype
        sizes = [
            (name, p.numel() * (p.element_size() if dtype is None else dtype.itemsize))
            for name, p in params.items()
        ]
        buckets = plan_buckets(sizes, self.args.update_weight_buffer_size)
        sender = self._sender(request, buckets)
        start = time.perf_counter()
        if sender is not None:
            sender.begin(request.version)
        # An offloaded model sends from host memory, one bucket on the device at a time.
        staged = self.offloaded and self.device.type == "cuda"

        def full(name: str) -> torch.Tensor:
            tensor = params[name].detach()
            return model_lib.full_tensor(tensor.to(self.device) if staged else tensor)

        with self._push_guard(sender):
            for names in buckets:
                bucket = [(name, full(name)) for name in names]
                if dtype is not None:
                    bucket = [(name, tensor.to(dtype)) for name, tensor in bucket]
                if sender is not None:
                    sender.send(bucket)
        return self._finish_push(request, sender, start, len(buckets))

    @contextlib.contextmanager
    def _push_guard(self, sender: WeightSender | None) -> Iterator[None]:
        """A push that fails (an engine died or refused) closes its sender at once: the engines still receiving
        from its group get an error now, instead of waiting out the group's timeout in a broadcast that will
        never finish, and the next push builds a new sender (and group)."""
        try:
            yield
        except BaseException:
            if sender is not None:
                for key in [k for k, v in self.senders.items() if v is sender]:
                    del self.senders[key]
                try:
                    sender.close()
                except Exception as exc:  # noqa: BLE001 - the push's own error is the one to raise
                    logger.warning("closing the weight sender after a failed push: %s", exc)
            raise

    def _push_barrier(self) -> None:
        """Every rank of the push waits for the others (all ranks, whatever their model-parallel groups)."""
        self.barrier()

    def _finish_push(
        self, request: WeightPushRequest, sender: WeightSender | None, start: float, buckets: int
    ) -> WeightPushReport | None:
        """After the last bucket: every rank done, bytes totalled, the old actor advanced; the writer's report."""
        if sender is not None:
            sender.finish()
        self._push_barrier()
        seconds = time.perf_counter() - start
        sent = self._all_reduce([sender.bytes_sent if sender is not None else 0])[0]
        if self.role == ACTOR and self.args.keep_old_actor:
            self._advance_old_actor()
        if not self._writes_files():
            return None
        return WeightPushReport(
            transport=request.transport,
            version=request.version,
            bytes=int(sent),
            seconds=seconds,
            buckets=buckets,
        )

    def _advance_old_actor(self) -> None:
        # The policy that generated the next batch is the one just pushed; with one-step-off pipelining
        # (interval 1) the batch trained next was generated by the push before it.
        if "rollout_actor" in self.stores:
            self.stores["old_actor"].copy_from(self.stores["rollout_actor"])
            self.stores["rollout_actor"].update_from(self.model)
        else:
            self.stores["old_actor"].update_from(self.model)

    def shutdown(self) -> None:
        if self.memory_history is not None:
            self.memory_history.stop()
            self.memory_history = None
        for sender in self.senders.values():
            with contextlib.suppress(Exception):
                sender.close()
        self.senders.clear()
        if self.group is not None and dist.is_initialized():
            dist.destroy_process_group()
            self.group = None


def _enable_batch_invariant_kernels() -> None:
    """SGLang's batch-invariant kernels, the GPU half of ``--true-on-policy-mode`` (needs SGLang installed)."""
    try:
        from sglang.srt.batch_invariant_ops import enable_batch_invariant_mode
    except ImportError as exc:
        raise RuntimeError(
            "--true-on-policy-mode on GPU needs SGLang's batch-invariant kernels: pip install 'slime-rl[sglang]'"
        ) from exc
    enable_batch_invariant_mode()
