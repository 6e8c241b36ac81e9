"""``TorchTrainer``: what the driver calls to train with the torch backend (``--train-backend fsdp``).

It owns the actor's ranks and, for PPO, the critic's; sequences one rollout's passes across them (critic values →
actor log-probs and advantages → critic update → actor update); saves and resumes checkpoints with the state the
driver registers; exports Hugging Face models; and pushes weights to the engines, publishing each new version.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from services.core.net import free_port, tls_context
from trainer import checkpoint
from trainer.backends.batch import RolloutBatch
from trainer.backends.placement import actor_gpu_offset, critic_gpu_offset
from trainer.backends.torch_backend.group import WorkerGroup
from trainer.backends.torch_backend.worker import ACTOR, CRITIC, WeightPushReport, WeightPushRequest
from trainer.weight_sync.engine_client import EngineClient
from trainer.weight_sync.transports import TRANSPORTS

logger = logging.getLogger(__name__)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainResult:
    """What one ``train_step`` did: per optimizer step metrics of the actor (``loss``, ``pg_loss``,
    ``entropy_loss``, ``pg_clipfrac``, ``ppo_kl``, ``kl_loss``, ``tis``, … , ``grad_norm``, ``lr``) and of the
    critic (``value_loss``, ``value_clipfrac``, ``grad_norm``, ``lr``), and rollout-level means (``log_probs``,
    ``ref_log_probs``, ``advantages``, ``returns``, ``values``, ``entropy``, ``kl``, …)."""

    rollout_id: int
    steps: list[dict[str, float]] = field(default_factory=list)
    critic_steps: list[dict[str, float]] = field(default_factory=list)
    rollout: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """A flat dict for loggers: ``rollout/*``, and ``train/*`` / ``critic/*`` averaged over the steps."""
        out = {f"rollout/{k}": v for k, v in self.rollout.items()}
        for prefix, steps in (("train", self.steps), ("critic", self.critic_steps)):
            for key in sorted({k for step in steps for k in step}):
                values = [step[key] for step in steps if key in step]
                out[f"{prefix}/{key}"] = sum(values) / len(values)
        return out


@dataclass
class WeightSyncReport:
    """One weight sync: transport, published version, bytes pushed and where the time went."""

    transport: str
    version: str
    bytes: int
    buckets: int
    push_seconds: float
    total_seconds: float

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / self.push_seconds if self.push_seconds > 0 else 0.0


class TorchTrainer:
    """The torch (FSDP2) training backend. Contract with the driver:

    - ``load() -> int | None``: resume from ``--load`` (rollout id of the checkpoint, or None for a fresh start);
    - ``compute_log_probs(batch)``: the current policy's response log-probs, per sample;
    - ``train_step(batch, rollout_id) -> TrainResult``: one rollout's updates;
    - ``save(rollout_id)``: a checkpoint under ``--save`` (and ``--critic-save``);
    - ``export_hf(dir)``: a Hugging Face model directory;
    - ``update_weights(engines, …)``: push the weights to engine base URLs;
    - ``register_state(name, obj)``: driver state (``state_dict``/``load_state_dict``) saved with checkpoints;
    - ``offload()`` / ``onload()``: model and optimizer state to host memory and back (``--offload``);
    - ``close()``: stop the ranks.
    """

    def __init__(self, args: Any) -> None:
        if args.actor_num_nodes != 1 or (args.use_critic and args.critic_num_nodes != 1):
            raise ValueError(
                "--train-backend fsdp runs its ranks on the trainer's host: set --actor-num-nodes 1 "
                "(and --critic-num-nodes 1); spread larger jobs with more GPUs per node"
            )
        self.args = args
        self.weight_version = 0
        self._registered: dict[str, Stateful] = {}
        self._sync_port: int | None = None
        self._sync_engines: tuple[str, ...] = ()
        self._offloaded = False
        # Kept across weight syncs (keep-alive connections): the pause, flush and resume calls around every push,
        # and the version published to the router.
        self._engine_clients: dict[str, EngineClient] = {}
        headers = {"Authorization": f"Bearer {args.auth_token}"} if args.auth_token else {}
        self._router_client = httpx.Client(
            headers=headers, timeout=30.0, verify=tls_context(), trust_env=False
        )
        # Threads start as calls need them: one per engine that a sync reaches at once.
        self._calls = ThreadPoolExecutor(max_workers=64, thread_name_prefix="engine-call")
        self.actor = self._actor_group(args)
        self.critic: WorkerGroup | None = None
        try:
            if args.use_critic:
                self.critic = self._critic_group(args)
        except BaseException:
            self.actor.close()
            raise

    def _actor_group(self, args: Any) -> WorkerGroup:
        """The actor's ranks (the Megatron backend starts its own kind): after the embedded engines' GPUs when the
        host has GPUs for both (``trainer.backends.placement``)."""
        return WorkerGroup(
            args, role=ACTOR, world_size=args.actor_num_gpus_per_node, gpu_offset=actor_gpu_offset(args)
        )

    def _critic_group(self, args: Any) -> WorkerGroup:
        """The critic's ranks: on the GPUs after the actor's when the host has enough (slime gives it its own), else
        on the actor's."""
        return WorkerGroup(
            args, role=CRITIC, world_size=args.critic_num_gpus_per_node, gpu_offset=critic_gpu_offset(args)
        )

    # ------------------------------------------------------------------------------------------ offload
    @property
    def offloaded(self) -> bool:
        return self._offloaded

    def offload(self) -> list[int]:
        """``--offload``: every rank's model and optimizer state to host memory (slime's ``sleep``); the weights can
        still be pushed. Returns the bytes each actor rank still holds on its device."""
        if self.critic is not None:
            self.critic.call("offload")
        self._offloaded = True
        return self.actor.call("offload")

    def onload(self) -> list[int]:
        """Back on the devices (slime's ``wake_up``); every pass that needs the model does this first."""
        if self.critic is not None:
            self.critic.call("onload")
        self._offloaded = False
        return self.actor.call("onload")

    def _ready(self) -> None:
        if self._offloaded:
            self.onload()

    # ------------------------------------------------------------------------------------------ training
    def compute_log_probs(self, batch: RolloutBatch) -> list[list[float]]:
        """Response log-probs (temperature-scaled, as the engine reports them) of every sample in ``batch``."""
        self._ready()
        return _merge(self.actor.call("compute_log_probs", batch), len(batch))

    def train_step(self, batch: RolloutBatch, rollout_id: int) -> TrainResult:
        """Train on one rollout: ``--num-steps-per-rollout`` optimizer steps of ``--global-batch-size`` samples."""
        self._ready()
        result = TrainResult(rollout_id=rollout_id)
        values = None
        if self.critic is not None:
            values = _merge(self.critic.call("compute_values", batch), len(batch))
        returns = self.actor.call("prepare", batch, values)
        if self.critic is not None:
            self.critic.call("set_returns", _merge(returns, len(batch)))
            result.critic_steps = self.critic.call("train", rollout_id)[0]["steps"]
        if rollout_id >= self.args.num_critic_only_steps:
            actor_out = self.actor.call("train", rollout_id)[0]
            result.steps = actor_out["steps"]
            result.rollout = actor_out["rollout"]
        else:
            logger.info(
                "rollout %d: critic-only step (--num-critic-only-steps %d)",
                rollout_id,
                self.args.num_critic_only_steps,
            )
        return result

    # -------------------------------------------------------------------------------------- checkpoints
    def register_state(self, name: str, obj: Stateful) -> None:
        """Save ``obj.state_dict()`` with every checkpoint and restore it on ``load()``."""
        self._registered[name] = obj

    def _critic_root(self, base: str | None, explicit: str | None) -> Path | None:
        if explicit is not None and explicit != base:
            return Path(explicit)
        return None if base is None else Path(base) / "critic"

    def save(self, rollout_id: int) -> Path:
        """Checkpoint model, optimizer, schedule, RNG, rollout id, weight version and the registered state."""
        if self.args.save is None:
            raise ValueError("saving a checkpoint needs --save: the directory to save to")
        self._ready()
        start = time.perf_counter()
        directory = checkpoint.iteration_dir(self.args.save, rollout_id)
        self.actor.call("save", str(directory))
        critic_root = self._critic_root(self.args.save, self.args.critic_save)
        if self.critic is not None:
            self.critic.call("save", str(checkpoint.iteration_dir(critic_root, rollout_id)))
        extra = {name: obj.state_dict() for name, obj in self._registered.items()}
        extra["__weight_version__"] = self.weight_version
        checkpoint.save_driver_state(directory, rollout_id, extra)
        if self.critic is not None:
            checkpoint.commit(critic_root, rollout_id)
        checkpoint.commit(self.args.save, rollout_id)
        logger.info("saved rollout %d to %s in %.1fs", rollout_id, directory, time.perf_counter() - start)
        return directory

    def load(self) -> int | None:
        """Resume from ``--load`` when it holds a checkpoint (``--ckpt-step`` or the latest); None otherwise.

        Without a checkpoint the model keeps its ``--hf-checkpoint`` weights, as a fresh run or a fine-tune."""
        args = self.args
        if args.load is None or not checkpoint.is_checkpoint_root(args.load):
            return None
        options = vars(args)
        step = checkpoint.resolve_iteration(args.load, options.get("ckpt_step"), flag="--load")
        if step is None:
            return None
        self._ready()
        load_optimizer = not options.get("no_load_optim", False)
        load_rng = not options.get("no_load_rng", False)
        directory = checkpoint.iteration_dir(args.load, step)
        self.actor.call("load", str(directory), load_optimizer=load_optimizer, load_rng=load_rng)
        if self.critic is not None:
            critic_root = self._critic_root(args.load, args.critic_load)
            if critic_root is not None and checkpoint.is_checkpoint_root(critic_root):
                critic_step = checkpoint.resolve_iteration(critic_root, step, flag="--critic-load")
                self.critic.call(
                    "load",
                    str(checkpoint.iteration_dir(critic_root, critic_step)),
                    load_optimizer=load_optimizer,
                    load_rng=load_rng,
                )
        state = checkpoint.load_driver_state(directory)
        extra = dict(state["extra"])
        self.weight_version = int(extra.pop("__weight_version__", 0))
        for name, obj in self._registered.items():
            if name in extra:
                obj.load_state_dict(extra[name])
            else:
                logger.warning("checkpoint %s has no state for %r", directory, name)
        logger.info("resumed from %s (rollout %d)", directory, step)
        return step

    def export_hf(self, out_dir: str, *, dtype: str | None = None) -> Path:
        """Write the actor as a Hugging Face model directory (config, safetensors, tokenizer)."""
        self._ready()
        return Path(self.actor.call("export_hf", out_dir, dtype)[0])

    def parameter_checksum(self) -> list[float]:
        return self.actor.call("parameter_checksum")[0]

    # -------------------------------------------------------------------------------------- weight sync
    def update_weights(
        self,
        engines: Sequence[str],
        *,
        transport: str | None = None,
        disk_dir: str | None = None,
        router_url: str | None = None,
        reconnect: bool = False,
    ) -> WeightSyncReport:
        """Push the actor's weights to every engine under a new weight version.

        ``transport``: ``distributed`` (default), ``tensor`` (default with ``--colocate``) or ``disk`` (needs
        ``disk_dir``, a path the engines can read). The sequence is: bump the version, pause generation on every
        engine, push, flush their caches, resume, then publish the version to ``router_url``; a push that raises
        leaves the version where it was. ``reconnect`` rebuilds the distributed group (after an engine restarted)
        and the HTTP connections to the engines.
        """
        transport = transport or ("tensor" if self.args.colocate else "distributed")
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown weight-sync transport {transport!r}; valid: {', '.join(TRANSPORTS)}")
        if not engines:
            raise ValueError("update_weights needs at least one engine URL")
        engines = tuple(url.rstrip("/") for url in engines)
        if transport == "distributed" and (
            reconnect or self._sync_port is None or engines != self._sync_engines
        ):
            self._sync_port = free_port()
            self._sync_engines = engines
        self.weight_version += 1
        version = str(self.weight_version)
        start = time.perf_counter()
        if reconnect:
            self._close_engine_clients()
        clients = self._clients_for(engines)
        try:
            try:
                self._on_all(clients, "pause_generation")
                report: WeightPushReport = self.actor.call(
                    "push_weights",
                    WeightPushRequest(
                        engines=engines,
                        transport=transport,
                        version=version,
                        disk_dir=disk_dir,
                        master_port=self._sync_port if transport == "distributed" else None,
                        auth_token=self.args.auth_token,
                    ),
                )[0]
                self._on_all(clients, "flush_cache")
            except BaseException:
                # No engine may stay paused because another one failed; the first error is the one raised.
                for error in self._on_all(clients, "continue_generation", raise_errors=False):
                    logger.warning("resuming generation after a failed weight sync: %s", error)
                raise
            self._on_all(clients, "continue_generation")
            if router_url is not None:
                publish_weight_version(self._router_client, router_url, version)
        except BaseException:
            # The push that retries this one (after an engine restart) delivers the same version: versions count
            # the pushes that went through, which is what the samples' staleness is measured in.
            self.weight_version -= 1
            # An engine may have died mid-call: the retry starts on new connections.
            self._close_engine_clients()
            raise
        sync = WeightSyncReport(
            transport=transport,
            version=version,
            bytes=report.bytes,
            buckets=report.buckets,
            push_seconds=report.seconds,
            total_seconds=time.perf_counter() - start,
        )
        logger.info(
            "weights v%s -> %d engine(s) over %s: %.1f MB in %d bucket(s), push %.3fs (%.2f GB/s), total %.3fs",
            version,
            len(engines),
            transport,
            sync.bytes / 1e6,
            sync.buckets,
            sync.push_seconds,
            sync.gb_per_s,
            sync.total_seconds,
        )
        return sync

    def _clients_for(self, engines: Sequence[str]) -> list[EngineClient]:
        """The kept client of each engine; clients of engines no longer pushed to are closed."""
        for url in set(self._engine_clients) - set(engines):
            self._engine_clients.pop(url).close()
        for url in engines:
            if url not in self._engine_clients:
                self._engine_clients[url] = EngineClient(url, auth_token=self.args.auth_token)
        return [self._engine_clients[url] for url in engines]

    def _on_all(
        self, clients: Sequence[EngineClient], method: str, *, raise_errors: bool = True
    ) -> list[BaseException]:
        """Call ``method`` on every engine at once; raise the first error, or return them all."""
        futures = [self._calls.submit(getattr(client, method)) for client in clients]
        errors = [error for error in (f.exception() for f in futures) if error is not None]
        if errors and raise_errors:
            raise errors[0]
        return errors

    def _close_engine_clients(self) -> None:
        for client in self._engine_clients.values():
            client.close()
        self._engine_clients.clear()

    def close(self) -> None:
        self._close_engine_clients()
        self._router_client.close()
        self._calls.shutdown(wait=False)
        if self.critic is not None:
            self.critic.close()
            self.critic = None
        self.actor.close()

    def __enter__(self) -> TorchTrainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _merge(per_rank: list[dict[int, list[float]]], size: int) -> list[list[float]]:
    merged: dict[int, list[float]] = {}
    for part in per_rank:
        merged.update(part)
    missing = [i for i in range(size) if i not in merged]
    if missing:
        raise RuntimeError(f"no rank produced results for samples {missing[:10]}")
    return [merged[i] for i in range(size)]


def publish_weight_version(client: httpx.Client, router_url: str, version: str) -> None:
    """Tell the router which weight version is current, so engines behind it are held back as stale."""
    try:
        response = client.post(
            f"{router_url.rstrip('/')}/set_weight_version", json={"weight_version": version}
        )
    except httpx.HTTPError as exc:
        raise RuntimeError(f"router {router_url}: publishing weight version {version} failed: {exc}") from exc
    if response.status_code >= 400:
        raise RuntimeError(
            f"router {router_url}: publishing weight version {version} -> HTTP {response.status_code}: {response.text[:300]}"
        )
