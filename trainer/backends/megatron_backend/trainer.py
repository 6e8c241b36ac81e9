"""``MegatronTrainer``: the driver's contract of ``TorchTrainer`` (load, compute_log_probs, train_step, save,
export_hf, update_weights, register_state, close) over Megatron ranks, which always run as child processes
(megatron-core's parallel state is per process)."""

from __future__ import annotations

import logging
from typing import Any

from trainer.backends.megatron_backend import convert
from trainer.backends.megatron_backend.config import pipeline_split_flags, recompute_config_kwargs
from trainer.backends.placement import actor_gpu_offset, critic_gpu_offset
from trainer.backends.torch_backend.group import WorkerGroup
from trainer.backends.torch_backend.trainer import TorchTrainer
from trainer.backends.torch_backend.worker import ACTOR, CRITIC

logger = logging.getLogger(__name__)


def require_megatron(prog: str = "slime train") -> None:
    """Exit with the flag at fault unless this machine has a CUDA GPU and megatron-core."""
    import torch

    missing = []
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible")
    try:
        import megatron.core  # noqa: F401
    except ImportError:
        missing.append("megatron-core is not installed (pip install 'slime-rl[megatron]')")
    if missing:
        raise SystemExit(
            f"{prog}: error: --train-backend megatron (the default) needs a CUDA GPU and megatron-core, but "
            f"{' and '.join(missing)}; on this machine use --train-backend fsdp (the torch backend, CPU or GPU)"
        )


# Megatron-LM flags (accepted as pass-through) for virtual pipeline stages and stage splits other than
# --decoder-first/last-pipeline-num-layers.
UNEVEN_OR_INTERLEAVED_PIPELINE_FLAGS = (
    "--num-layers-per-virtual-pipeline-stage",
    "--num-virtual-stages-per-pipeline-rank",
    "--microbatch-group-size-per-virtual-pipeline-stage",
    "--pipeline-model-parallel-layout",
    "--account-for-embedding-in-pipeline-split",
    "--account-for-loss-in-pipeline-split",
)


def check_parallelism(args: Any) -> None:
    """Raise naming the Megatron flag this backend cannot honour, and what it can: parallel layouts and
    activation recomputation (checked again against the model's layers once a rank has loaded its config)."""
    gpus = args.actor_num_gpus_per_node * args.actor_num_nodes
    if args.actor_num_nodes != 1:
        raise ValueError(
            "--train-backend megatron runs its ranks on the trainer's host: set --actor-num-nodes 1"
        )
    cp = args.context_parallel_size
    if cp < 1:
        raise ValueError(f"--context-parallel-size must be at least 1, got {cp}")
    if cp > 1 and args.loss_type == "custom_loss":
        raise ValueError(
            f"--loss-type custom_loss with --context-parallel-size {cp} is not supported: a custom loss reads "
            "the logits of whole samples (slime's layout), and each context-parallel rank holds only its share "
            "of every sample's tokens; use --context-parallel-size 1"
        )
    for flag in UNEVEN_OR_INTERLEAVED_PIPELINE_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value not in (None, False):
            raise ValueError(
                f"{flag} is not supported by this Megatron backend: it splits the layers over "
                "--pipeline-model-parallel-size stages evenly or by --decoder-first-pipeline-num-layers / "
                "--decoder-last-pipeline-num-layers, and runs the non-interleaved (1F1B) schedule"
            )
    first, last = pipeline_split_flags(args)
    if (first is not None or last is not None) and args.pipeline_model_parallel_size == 1:
        flag = convert.FIRST_STAGE_FLAG if first is not None else convert.LAST_STAGE_FLAG
        raise ValueError(f"{flag} needs --pipeline-model-parallel-size above 1")
    recompute_config_kwargs(args)
    tp, pp, ep = (
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        args.expert_model_parallel_size,
    )
    groups = [("--actor-num-gpus-per-node", gpus)]
    if args.use_critic:
        if args.critic_num_nodes != 1:
            raise ValueError(
                "--train-backend megatron runs the critic's ranks on the trainer's host: set --critic-num-nodes 1"
            )
        groups.append(("--critic-num-gpus-per-node", args.critic_num_gpus_per_node))
    for flag, count in groups:
        if count % (tp * pp * ep):
            raise ValueError(
                f"{flag} {count} must be a multiple of --tensor-model-parallel-size {tp} × "
                f"--pipeline-model-parallel-size {pp} × --expert-model-parallel-size {ep}"
            )
        if count % (tp * pp * cp):
            raise ValueError(
                f"{flag} {count} must be a multiple of --tensor-model-parallel-size {tp} × "
                f"--pipeline-model-parallel-size {pp} × --context-parallel-size {cp}"
            )


class MegatronWorkerGroup(WorkerGroup):
    """The actor's or the critic's Megatron ranks, one child process per GPU, even for one rank."""

    rank_module = "trainer.backends.megatron_backend.rank"
    single_rank_in_process = False

    def __init__(self, args: Any, *, world_size: int, gpu_offset: int = 0, role: str = ACTOR) -> None:
        super().__init__(args, role=role, world_size=world_size, gpu_offset=gpu_offset)


class MegatronTrainer(TorchTrainer):
    """The Megatron backend (``--train-backend megatron``), with ``TorchTrainer``'s sequencing, checkpoint layout
    and weight-sync protocol."""

    def __init__(self, args: Any) -> None:
        require_megatron()
        check_parallelism(args)
        super().__init__(args)

    def _actor_group(self, args: Any) -> WorkerGroup:
        return MegatronWorkerGroup(
            args, world_size=args.actor_num_gpus_per_node, gpu_offset=actor_gpu_offset(args)
        )

    def _critic_group(self, args: Any) -> WorkerGroup:
        """The critic's Megatron ranks (same parallel layout as the actor): after the actor's GPUs when the host
        has enough, else on the actor's."""
        return MegatronWorkerGroup(
            args, role=CRITIC, world_size=args.critic_num_gpus_per_node, gpu_offset=critic_gpu_offset(args)
        )
