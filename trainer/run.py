"""One RL run, top to bottom: the services, the data, the trainer, and the loop over rollouts.

Reading order for one step: ``RLRun._rollout`` (generate and score) → ``RLRun._train`` (reward post-processing,
advantages and losses inside the backend) → ``RLRun._push_weights`` → ``RLRun._evaluate``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import statistics
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx

from services.core.async_runner import AsyncRunner
from services.core.plugins import load_function
from services.core.redis_util import key as redis_key
from services.core.redis_util import redis_from_url
from services.core.sample import Sample
from trainer.backends.placement import cuda_devices, engines_share_trainer_gpus
from trainer.data import DatasetKeys, PromptDataset, RolloutDataSource
from trainer.driver import ASYNC, output_dir, run_in_background
from trainer.embedded import EmbeddedStack, StackAddresses, default_engine_threads
from trainer.metrics_log import MetricsLogger, passrate_metrics, reward_category_metrics, zero_std_metrics
from trainer.offload import EngineMemory
from trainer.rollout.base_types import RolloutFnEvalOutput, RolloutFnTrainOutput, call_rollout_fn
from trainer.rollout.distributed_post import poster_count
from trainer.rollout.filters import pop_first
from trainer.rollout.queue_rollout import RolloutContext, set_context
from trainer.status import TrainerStatusServer

logger = logging.getLogger(__name__)


def _flatten(groups: list[list[Sample]] | list[Sample]) -> list[Sample]:
    out: list[Sample] = []
    for item in groups:
        out.extend(_flatten(item) if isinstance(item, list) else [item])
    return out


class _DataSourceState:
    """What checkpoints store for the data source: in train-async, the state before the in-flight rollout."""

    def __init__(self, source: RolloutDataSource):
        self.source = source
        self.snapshot: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return self.snapshot if self.snapshot is not None else self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)


class RLRun:
    def __init__(self, args: argparse.Namespace, *, mode: str):
        self.args = args
        self.mode = mode
        self.out_dir = output_dir(args)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.stack: EmbeddedStack | None = None
        self.addresses: StackAddresses | None = None
        self.trainer: Any = None
        self.context: RolloutContext | None = None
        self.runner = AsyncRunner()
        self.metrics: MetricsLogger | None = None
        self.status: TrainerStatusServer | None = None
        self.history: list[dict[str, Any]] = []
        self.engines_needing_sync = False
        self.restarts = 0
        self.last_synced: tuple[str, ...] = ()
        self.engine_memory: EngineMemory | None = None

    # ------------------------------------------------------------------------------------------ set-up
    def __enter__(self) -> RLRun:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        args = self.args
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(args.hf_checkpoint)
        if args.dump_details:
            self.tokenizer.save_pretrained(Path(args.dump_details) / "tokenizer")
        self.data_source = self._data_source()
        if args.num_rollout is None:
            args.num_rollout = args.num_epoch * self.data_source.epoch_length(args.rollout_batch_size)
        self.metrics = MetricsLogger(args, self.out_dir)
        self.status = TrainerStatusServer(args)
        self.status.start()
        if not args.debug_train_only:
            self.addresses = self._services()
            if args.offload and self.mode != ASYNC and not args.debug_rollout_only:
                # slime releases the engines' memory before the trainer is built on the same GPUs.
                self.engine_memory = EngineMemory(auth_token=args.auth_token)
                self.engine_memory.release(self.addresses.engine_urls)
        if args.train_backend == "megatron":
            from trainer.backends.megatron_backend.trainer import MegatronTrainer as Trainer
        else:
            from trainer.backends.torch_backend.trainer import TorchTrainer as Trainer
        self.trainer = Trainer(args)
        self.data_state = _DataSourceState(self.data_source)
        self.trainer.register_state("data_source", self.data_state)
        loaded = self.trainer.load()
        if args.start_rollout_id is None:
            args.start_rollout_id = 0 if loaded is None else loaded + 1
        self.rollout_fn = load_function(args.rollout_function_path, flag="--rollout-function-path")
        self.eval_fn = load_function(args.eval_function_path, flag="--eval-function-path")
        self.postprocess_fn = (
            load_function(args.rollout_data_postprocess_path, flag="--rollout-data-postprocess-path")
            if args.rollout_data_postprocess_path
            else None
        )

    def _data_source(self) -> RolloutDataSource:
        args = self.args
        dataset = None
        if args.rollout_global_dataset and args.prompt_data:
            dataset = PromptDataset(
                args.prompt_data,
                keys=DatasetKeys(
                    input_key=args.input_key,
                    label_key=args.label_key,
                    metadata_key=args.metadata_key,
                    tool_key=args.tool_key,
                    multimodal_keys=args.multimodal_keys,
                ),
                tokenizer=self.tokenizer,
                apply_chat_template=args.apply_chat_template,
                max_prompt_len=args.rollout_max_prompt_len,
                seed=args.rollout_seed,
            )
        buffer_filter = (
            load_function(args.buffer_filter_path, flag="--buffer-filter-path")
            if args.buffer_filter_path
            else pop_first
        )
        return RolloutDataSource(
            dataset,
            n_samples_per_prompt=args.n_samples_per_prompt,
            shuffle=args.rollout_shuffle,
            buffer_filter=buffer_filter,
            args=args,
        )

    def _services(self) -> StackAddresses:
        args = self.args
        external = [
            e if e.startswith("http") else f"http://{e}" for e in args.rollout_external_engine_addrs or []
        ]
        if args.router_url is None:
            num_engines = (
                0
                if args.rollout_external
                else max(1, (args.rollout_num_gpus or 1) // args.rollout_num_gpus_per_engine)
            )
            self.stack = EmbeddedStack(
                args,
                self.out_dir / "logs",
                num_engines=num_engines,
                rollout_workers=poster_count(args),
                engine_threads=self._engine_threads(num_engines),
                external_engine_urls=external,
            )
            addresses = self.stack.start()
            args.redis_url = addresses.redis_url
            args.router_url = addresses.router_url
            args.rollout_buffer_url = addresses.buffer_url
        else:
            if args.redis_url is None or args.rollout_buffer_url is None:
                raise SystemExit(
                    "slime train: error: with --router-url, also give --redis-url and --rollout-buffer-url "
                    "(the services of a deployed stack); give none of them for the embedded stack"
                )
            engines = external
            for url in engines:
                httpx.post(
                    f"{args.router_url}/add_worker", params={"url": url}, timeout=10
                ).raise_for_status()
            addresses = StackAddresses(
                redis_url=args.redis_url,
                router_url=args.router_url,
                reward_url=args.reward_url,
                reward_grpc_addr=args.reward_grpc_addr,
                buffer_url=args.rollout_buffer_url,
                engine_urls=engines or self._router_workers(args.router_url),
            )
        from rollout_buffer.client import BufferClient

        self.context = RolloutContext(
            args=args,
            runner=self.runner,
            redis=redis_from_url(addresses.redis_url),
            router_url=addresses.router_url,
            train_buffer=BufferClient.from_args(args, http_url=addresses.buffer_url, queue="train"),
            eval_buffer=BufferClient.from_args(args, http_url=addresses.buffer_url, queue="eval"),
            tokenizer=self.tokenizer,
        )
        set_context(self.context)
        self.context.attempt = (
            self.runner.run(self.context.redis.incr(redis_key(args.run_id, "driver", "starts"))) - 1
        )
        self._take_back_leases()
        for name, url in addresses.metrics_urls().items():
            logger.info("metrics: %-15s %s", name, url)
        return addresses

    def _engine_threads(self, num_engines: int) -> int:
        """An engine's torch would take every core, yet the engines generate at the same time; ``train-async``
        trains meanwhile, on the trainer's threads (``OMP_NUM_THREADS``), while ``slime train`` trains in between."""
        import torch

        return default_engine_threads(
            num_engines, trainer_threads=torch.get_num_threads() if self.mode == ASYNC else 0
        )

    def _take_back_leases(self) -> None:
        """Groups a previous trainer of this run leased and never acknowledged (it died, and this one resumes it) go
        back to the queue now: waiting out their lease would stall the first rollout for the lease timeout."""
        from rollout_buffer.store import BufferStore

        released = self.runner.run(BufferStore(self.context.redis).release_leases(self.args.run_id))
        if released:
            logger.info(
                "run %s: %d group(s) leased by a previous trainer returned to the queue",
                self.args.run_id,
                released,
            )

    @staticmethod
    def _router_workers(router_url: str) -> list[str]:
        return list(httpx.get(f"{router_url}/list_workers", timeout=10).json()["urls"])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.context is not None:
                self.context.close()
        set_context(None)
        if self.trainer is not None:
            self.trainer.close()
            self.trainer = None
        if self.stack is not None:
            self.stack.stop()
            self.stack = None
        if self.status is not None:
            self.status.stop()
        if self.metrics is not None:
            self.metrics.close()
        self.runner.close()

    # ------------------------------------------------------------------------------------------ the loop
    def run(self) -> list[dict[str, Any]]:
        args = self.args
        start, end = args.start_rollout_id, args.num_rollout
        self._push_weights()
        if args.eval_interval and (end == 0 or start == 0):
            self._evaluate(start)
        pending: Future | None = None
        if self.mode == ASYNC and start < end:
            pending = run_in_background(self._rollout, start)
        from tqdm import tqdm

        for rollout_id in tqdm(range(start, end), desc="rollouts", unit="rollout", disable=None):
            if self.mode == ASYNC:
                samples, rollout_metrics = pending.result()
                # Against the weights these samples train, not those current when their generation ended.
                rollout_metrics.update(self._staleness_metrics(samples))
                self.data_state.snapshot = self.data_source.state_dict()
                pending = run_in_background(self._rollout, rollout_id + 1) if rollout_id + 1 < end else None
            else:
                samples, rollout_metrics = self._rollout(rollout_id)
                if self.engine_memory is not None:
                    self.engine_memory.release(self.addresses.engine_urls)
            train_metrics = self._train(rollout_id, samples)
            last = rollout_id + 1 == end
            if last or (args.save_interval and (rollout_id + 1) % args.save_interval == 0):
                if args.save:
                    self.trainer.save(rollout_id)
                if args.save_hf:
                    self.trainer.export_hf(args.save_hf.format(rollout_id=rollout_id))
            sync_metrics: dict[str, float] = {}
            if self.mode != ASYNC or (rollout_id + 1) % args.update_weights_interval == 0 or last:
                if pending is not None:
                    pending.result()
                sync_metrics = self._push_weights()
            record = {"rollout_id": rollout_id, **rollout_metrics, **train_metrics, **sync_metrics}
            if self.args.use_fault_tolerance:
                record["fault/engine_restarts"] = float(self.restarts)
            if args.eval_interval and (last or (rollout_id + 1) % args.eval_interval == 0):
                record.update(self._evaluate(rollout_id + 1))
            self.history.append(record)
            self.metrics.log(record, step_key="rollout/step", step=rollout_id)
            self.status.update(
                rollout_id=rollout_id, weight_version=self.trainer.weight_version, metrics=record
            )
            logger.info(self._status_line(record))
        if args.ci_test and args.ci_metric_checker_key:
            self._check_ci_metric()
        return self.history

    def _staleness_metrics(self, samples: list[Sample]) -> dict[str, float]:
        """How many weight versions behind the trainer's current one each sample's oldest token is."""
        current = self.trainer.weight_version if self.trainer else 0
        staleness = [
            current - min(int(v) for v in s.weight_versions)
            for s in samples
            if s.weight_versions and all(str(v).isdigit() for v in s.weight_versions)
        ]
        if not staleness:
            return {}
        return {
            "rollout/staleness_mean": statistics.fmean(staleness),
            "rollout/staleness_max": max(staleness),
        }

    @staticmethod
    def _status_line(record: dict[str, Any]) -> str:
        parts = [f"rollout {record['rollout_id']}"]
        for key, label, fmt in (
            ("rollout/raw_reward", "reward", "{:.3f}"),
            ("train/loss", "loss", "{:.4f}"),
            ("train/kl_loss", "kl", "{:.4f}"),
            ("perf/tokens_per_second", "tok/s", "{:.0f}"),
            ("perf/weight_sync_seconds", "sync s", "{:.2f}"),
            ("rollout/staleness_max", "staleness", "{:.0f}"),
        ):
            if key in record:
                parts.append(f"{label} {fmt.format(record[key])}")
        parts += [f"{k} {v:.3f}" for k, v in record.items() if k.startswith("eval/") and k.count("/") == 1]
        return " | ".join(parts)

    # --------------------------------------------------------------------------------------- one rollout
    def _rollout(self, rollout_id: int) -> tuple[list[Sample], dict[str, Any]]:
        """Generate and score one training batch; returns the samples (trimmed to whole global batches)."""
        args = self.args
        start = time.perf_counter()
        if args.load_debug_rollout_data:
            import torch

            path = args.load_debug_rollout_data.format(rollout_id=rollout_id)
            payload = torch.load(path, weights_only=False)
            samples = [Sample.from_dict(d) for d in payload["samples"]]
            return samples, self._rollout_metrics(samples, time.perf_counter() - start)
        if self.mode != ASYNC and self.args.use_fault_tolerance and self._engines_down():
            self._push_weights()
        output = call_rollout_fn(self.rollout_fn, args, rollout_id, self.data_source, evaluation=False)
        assert isinstance(output, RolloutFnTrainOutput)
        samples = _flatten(output.samples)
        if args.save_debug_rollout_data:
            import torch

            path = Path(args.save_debug_rollout_data.format(rollout_id=rollout_id))
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"rollout_id": rollout_id, "samples": [s.to_dict() for s in samples]}, path)
        keep = len(samples) // args.global_batch_size * args.global_batch_size
        if keep == 0:
            raise RuntimeError(
                f"rollout {rollout_id} produced {len(samples)} samples, fewer than --global-batch-size "
                f"{args.global_batch_size}"
            )
        samples = samples[:keep]
        seconds = time.perf_counter() - start
        metrics = dict(output.metrics or {})
        metrics.update(self._rollout_metrics(samples, seconds))
        return samples, metrics

    def _rollout_metrics(self, samples: list[Sample], seconds: float) -> dict[str, Any]:
        args = self.args
        rewards = [float(s.get_reward_value(args)) for s in samples]
        n = args.n_samples_per_prompt
        groups = [rewards[i : i + n] for i in range(0, len(rewards), n)]
        response_tokens = sum(s.response_length for s in samples)
        metrics: dict[str, Any] = {
            "rollout/raw_reward": statistics.fmean(rewards),
            "rollout/response_lengths": statistics.fmean(s.response_length for s in samples),
            "rollout/truncated": statistics.fmean(
                1.0 if s.status is Sample.Status.TRUNCATED else 0.0 for s in samples
            ),
            "perf/rollout_time": seconds,
            "perf/tokens_per_second": response_tokens / seconds if seconds > 0 else 0.0,
        }
        metrics.update(self._staleness_metrics(samples))
        if args.advantage_estimator != "ppo":
            metrics.update(zero_std_metrics(groups))
        if args.log_passrate:
            metrics.update(passrate_metrics(groups, "passrate/"))
        if args.log_reward_category:
            metrics.update(
                reward_category_metrics([s.reward for s in samples], args.log_reward_category, "rollout/")
            )
        if args.log_multi_turn:
            metrics.update(self._multi_turn_metrics(samples))
        return metrics

    def _multi_turn_metrics(self, samples: list[Sample]) -> dict[str, float]:
        """slime's ``--log-multi-turn``: response lengths (all tokens and trained tokens) and rounds per sample."""
        lengths = [s.response_length for s in samples]
        trained = [sum(s.loss_mask) if s.loss_mask is not None else s.response_length for s in samples]
        limit = self.args.rollout_max_response_len
        metrics = {
            "multi_turn/raw_response_length/mean": statistics.fmean(lengths),
            "multi_turn/raw_response_length/max": float(max(lengths)),
            "multi_turn/raw_response_length/min": float(min(lengths)),
            "multi_turn/raw_response_length/clip_ratio": statistics.fmean(
                1.0 if n >= limit else 0.0 for n in lengths
            ),
            "multi_turn/wo_obs_response_length/mean": statistics.fmean(trained),
            "multi_turn/wo_obs_response_length/max": float(max(trained)),
            "multi_turn/wo_obs_response_length/min": float(min(trained)),
        }
        rounds = [int(s.metadata["round_number"]) for s in samples if "round_number" in s.metadata]
        if rounds:
            metrics["multi_turn/round_number/mean"] = statistics.fmean(rounds)
            metrics["multi_turn/round_number/max"] = float(max(rounds))
            metrics["multi_turn/round_number/min"] = float(min(rounds))
        return metrics

    # ------------------------------------------------------------------------------------------- training
    def _train(self, rollout_id: int, samples: list[Sample]) -> dict[str, Any]:
        args = self.args
        if args.debug_rollout_only:
            self._ack(rollout_id)
            return {}
        from trainer.backends.batch import RolloutBatch

        start = time.perf_counter()
        batch = RolloutBatch.from_samples(args, samples)
        if self.postprocess_fn is not None:
            self._call_postprocess(batch)
        if args.save_debug_train_data:
            import dataclasses

            import torch

            path = Path(args.save_debug_train_data.format(rollout_id=rollout_id, rank=0))
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"rollout_id": rollout_id, "rank": 0, "rollout_data": dataclasses.asdict(batch)}, path)
        result = self.trainer.train_step(batch, rollout_id)
        self._ack(rollout_id)
        metrics = result.metrics()
        metrics["perf/train_time"] = time.perf_counter() - start
        if args.ci_test:
            self._check_ci(rollout_id, result)
        return metrics

    def _call_postprocess(self, batch: Any) -> None:
        """``--rollout-data-postprocess-path``: slime calls ``fn(args)``; a function taking a second parameter also
        gets the training batch (which it may modify in place)."""
        import inspect

        params = [
            p
            for p in inspect.signature(self.postprocess_fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if len(params) >= 2:
            self.postprocess_fn(self.args, batch)
        else:
            self.postprocess_fn(self.args)

    def _ack(self, rollout_id: int) -> None:
        if self.context is not None:
            self.context.ack_consumed(rollout_id)

    def _check_ci(self, rollout_id: int, result: Any) -> None:
        """slime's ``--ci-test`` checks: the first step of each rollout is on-policy; at rollout 0 the actor is
        the reference."""
        args = self.args
        if args.ci_disable_kl_checker or not result.steps:
            return
        first = result.steps[0]
        for key in ("ppo_kl", "pg_clipfrac"):
            if key in first and first[key] != 0:
                raise AssertionError(
                    f"--ci-test: rollout {rollout_id} step 0 has {key} = {first[key]}, expected 0"
                )
        if rollout_id == 0 and first.get("kl_loss", 0) != 0:
            raise AssertionError(f"--ci-test: kl_loss at the first step is {first['kl_loss']}, expected 0")
        rollout = result.rollout
        if rollout_id == 0 and "log_probs" in rollout and "ref_log_probs" in rollout:
            if rollout["log_probs"] != rollout["ref_log_probs"]:
                raise AssertionError(
                    "--ci-test: at rollout 0 the actor's log-probs differ from the reference's"
                )
            if not -0.5 < rollout["log_probs"] < 0:
                raise AssertionError(f"--ci-test: mean log-prob {rollout['log_probs']} outside (-0.5, 0)")
            if "entropy" in rollout and not 0 < rollout["entropy"] < 0.5:
                raise AssertionError(f"--ci-test: mean entropy {rollout['entropy']} outside (0, 0.5)")

    def _check_ci_metric(self) -> None:
        key, threshold = self.args.ci_metric_checker_key, self.args.ci_metric_checker_threshold
        values = [r[key] for r in self.history if key in r]
        if not values:
            raise AssertionError(f"--ci-metric-checker-key {key}: no eval logged that metric")
        if not any(v >= threshold for v in values):
            raise AssertionError(f"--ci-metric-checker-key {key}: best {max(values)} < threshold {threshold}")

    # ---------------------------------------------------------------------------------------- weight sync
    def _push_weights(self) -> dict[str, float]:
        """Push the trainer's weights to every engine that can take them, under a new weight version.

        With ``--use-fault-tolerance``, dead embedded engines are relaunched first, and engines the router holds
        DEAD (external ones that are down) are left out; the group is rebuilt whenever the set of engines changes,
        so a restarted engine is re-synced before the router lets it serve again.
        """
        if self.addresses is None or self.args.debug_rollout_only:
            return {}
        engines = self._heal_engines()
        try:
            report = self._push_to(engines)
        except Exception:
            # An engine killed between the health check and the push (train-async pushes while a rollout runs):
            # relaunch it and push again over a new group, once.
            if not (self.args.use_fault_tolerance and self._engines_down()):
                raise
            logger.warning("an engine died during the weight push; relaunching it and pushing again")
            engines = self._heal_engines()
            self.engines_needing_sync = True
            report = self._push_to(engines)
        self.engines_needing_sync = False
        if self.context is not None:
            self.context.weight_version = self.trainer.weight_version
        return {
            "perf/weight_sync_seconds": report.total_seconds,
            "perf/weight_sync_gb": report.bytes / 1e9,
            "fault/engines_synced": float(len(engines)),
        }

    def _push_to(self, engines: list[str]) -> Any:
        transport = self._weight_transport

        def push() -> Any:
            return self.trainer.update_weights(
                engines,
                transport=transport,
                disk_dir=self.args.weight_sync_dir,
                router_url=self.addresses.router_url,
                reconnect=self.engines_needing_sync,
            )

        memory = self.engine_memory
        return push() if memory is None else memory.push_weights(engines, self.trainer, push)

    @functools.cached_property
    def _weight_transport(self) -> str | None:
        """``--weight-sync-transport``; for ``auto`` the trainer's default (CUDA IPC colocated, NCCL otherwise),
        except where the embedded engines had to share the trainer's GPUs (too few for slime's layout): an NCCL
        group cannot hold two ranks on one GPU, so the weights go over CUDA IPC, as colocated."""
        transport = self.args.weight_sync_transport
        if transport != "auto":
            return transport
        stack = self.stack
        local_only = stack is not None and bool(stack.engines) and not stack.external_engine_urls
        if not (local_only and engines_share_trainer_gpus(self.args)):
            return None
        logger.info(
            "the engines share the trainer's GPUs (%d visible, not enough for --actor-num-gpus-per-node plus "
            "--rollout-num-gpus): weights go over CUDA IPC (the tensor transport)",
            cuda_devices(),
        )
        return "tensor"

    def _engines_down(self) -> bool:
        return self.stack is not None and not all(engine.alive() for engine in self.stack.engines)

    def _heal_engines(self) -> list[str]:
        """The engines to push to; relaunches dead embedded engines (``--use-fault-tolerance``)."""
        urls = list(self.addresses.engine_urls)
        if not self.args.use_fault_tolerance:
            return urls
        try:
            workers = httpx.get(f"{self.addresses.router_url}/workers", timeout=10).json()["workers"]
            dead = {w["url"] for w in workers if w.get("state") == "DEAD"}
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            logger.warning("cannot read worker states from the router: %s", exc)
            dead = set()
        if self.stack is not None:
            # The stack's own engines come first; external ones (--rollout-external-engine-addrs) are not ours to
            # relaunch: a DEAD one is left out until it is healthy again.
            for index, url in enumerate(urls[: len(self.stack.engines)]):
                if url in dead or not self.stack.engines[index].alive():
                    logger.warning("engine %s is dead; relaunching it", url)
                    self.stack.restart_engine(index)
                    dead.discard(url)
                    self.restarts += 1
                    self.engines_needing_sync = True
        live = [url for url in urls if url not in dead]
        if tuple(live) != self.last_synced:
            self.engines_needing_sync = True
            self.last_synced = tuple(live)
        if not live:
            raise RuntimeError("every rollout engine is DEAD; none can take the new weights")
        return live

    # ----------------------------------------------------------------------------------------------- eval
    def _evaluate(self, rollout_id: int) -> dict[str, float]:
        args = self.args
        if args.debug_train_only or not args.eval_prompt_data:
            return {}
        output = call_rollout_fn(self.eval_fn, args, rollout_id, self.data_source, evaluation=True)
        assert isinstance(output, RolloutFnEvalOutput)
        metrics: dict[str, float] = dict(output.metrics or {})
        for name, data in output.data.items():
            rewards = [float(r) for r in data["rewards"]]
            metrics[f"eval/{name}"] = statistics.fmean(rewards) if rewards else 0.0
            metrics[f"eval/{name}-truncated_ratio"] = (
                statistics.fmean(map(float, data["truncated"])) if rewards else 0.0
            )
            if args.log_passrate:
                n = args.n_samples_per_eval_prompt
                groups = [rewards[i : i + n] for i in range(0, len(rewards), n)]
                metrics.update(passrate_metrics(groups, f"eval/{name}-"))
            if args.log_reward_category and data.get("samples"):
                metrics.update(
                    reward_category_metrics(
                        [s.reward for s in data["samples"]], args.log_reward_category, f"eval/{name}-"
                    )
                )
        self.metrics.log(metrics, step_key="eval/step", step=rollout_id)
        if args.save_debug_rollout_data:
            import torch

            path = Path(args.save_debug_rollout_data.format(rollout_id=f"eval_{rollout_id}"))
            path.parent.mkdir(parents=True, exist_ok=True)
            samples = [s.to_dict() for data in output.data.values() for s in data.get("samples", [])]
            torch.save({"rollout_id": rollout_id, "samples": samples}, path)
        logger.info("eval at rollout %d: %s", rollout_id, {k: round(v, 4) for k, v in metrics.items()})
        return metrics
