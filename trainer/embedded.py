"""The embedded stack: every service of a run started as a child process on loopback, and stopped with the driver.

With no service addresses given, ``slime train`` and ``slime demo`` run Redis, the rollout engines, the router, the
reward model and the rollout buffer this way, each speaking its real protocol, so a laptop runs the same system a
cluster does. Children die with the driver, even when it is SIGKILLed (see ``services.core.supervisor``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from services.core.embedded_redis import EmbeddedRedis
from services.core.net import free_port
from services.core.supervisor import ServiceProcess, usable_cpus
from trainer.backends.placement import engine_cuda_visible_devices

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 300.0


def _flag_list(args: argparse.Namespace, pairs: list[tuple[str, str]]) -> list[str]:
    """Forward the given seed flags to a child, as ``--flag value`` for values and bare ``--flag`` for switches."""
    out: list[str] = []
    for flag, dest in pairs:
        value = getattr(args, dest, None)
        if value is None or value is False:
            continue
        if value is True:
            out.append(flag)
        elif isinstance(value, list):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


@dataclass
class StackAddresses:
    """Where each service of a run answers; the same shape whether the stack is embedded or external."""

    redis_url: str
    router_url: str
    reward_url: str | None
    reward_grpc_addr: str | None
    buffer_url: str | None
    engine_urls: list[str] = field(default_factory=list)

    def metrics_urls(self) -> dict[str, str]:
        urls = {"router": f"{self.router_url}/metrics"}
        if self.reward_url:
            urls["reward-model"] = f"{self.reward_url}/metrics"
        if self.buffer_url:
            urls["rollout-buffer"] = f"{self.buffer_url}/metrics"
        for i, url in enumerate(self.engine_urls):
            urls[f"engine-{i}"] = f"{url}/metrics"
        return urls


class EmbeddedStack:
    """Start Redis, ``num_engines`` built-in engines, the router, the reward model and the buffer for one run."""

    def __init__(
        self,
        args: argparse.Namespace,
        log_dir: str | Path,
        *,
        num_engines: int,
        rollout_workers: int = 1,
        engine_threads: int | None = None,
        external_engine_urls: list[str] | None = None,
    ):
        self.args = args
        self.log_dir = Path(log_dir)
        self.num_engines = num_engines
        self.rollout_workers = rollout_workers
        self.engine_threads = engine_threads
        # Engines someone else runs (--rollout-external-engine-addrs): registered with the router, never started.
        self.external_engine_urls = list(external_engine_urls or [])
        self.redis: EmbeddedRedis | None = None
        self.engines: list[ServiceProcess] = []
        self.services: dict[str, ServiceProcess] = {}
        self.addresses: StackAddresses | None = None

    def _serve(self, service: str, *argv: str) -> list[str]:
        return [sys.executable, "-m", "services.cli", "serve", service, *argv]

    def engine_process(self, index: int, port: int) -> ServiceProcess:
        args = self.args
        argv = self._serve(
            "rollout-engine",
            "--hf-checkpoint",
            args.hf_checkpoint,
            "--port",
            str(port),
            # slime seeds engine i with --seed + i: engines that shared a seed would draw the same random numbers
            # for the requests each of them gets, so the groups they sample would not be independent.
            "--rollout-seed",
            str(args.seed + index),
            *(["--num-threads", str(self.engine_threads)] if self.engine_threads else []),
        )
        target = getattr(args, "sglang_passthrough", {}).get("rl_on_policy_target")
        if target is not None:
            argv += ["--sglang-rl-on-policy-target", str(target)]
        env = {"OMP_NUM_THREADS": str(self.engine_threads)} if self.engine_threads else {}
        devices = engine_cuda_visible_devices(args, index)
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = devices
        return ServiceProcess(
            f"engine-{index}",
            argv,
            health_url=f"http://127.0.0.1:{port}/health",
            log_path=self.log_dir / f"engine-{index}.log",
            env=env or None,
        )

    def router_process(self, port: int, engine_urls: list[str], common: list[str]) -> ServiceProcess:
        args = self.args
        health = _flag_list(
            args,
            [
                ("--rollout-health-check-interval", "rollout_health_check_interval"),
                ("--rollout-health-check-timeout", "rollout_health_check_timeout"),
                ("--rollout-health-check-first-wait", "rollout_health_check_first_wait"),
                ("--use-slime-router", "use_slime_router"),
            ],
        )
        argv = self._serve(
            "router",
            "--port",
            str(port),
            "--worker-urls",
            *engine_urls,
            # As slime starts its router: cache-aware, but once the engines' loads differ by more than the
            # relative threshold the next request goes to the least loaded one. Otherwise a rollout's groups, whose
            # prompts share the chat template's prefix, pile onto one engine while the other waits.
            "--balance-abs-threshold",
            "0",
            *common,
            *health,
        )
        return ServiceProcess(
            "router",
            argv,
            health_url=f"http://127.0.0.1:{port}/health",
            log_path=self.log_dir / "router.log",
        )

    def start(self) -> StackAddresses:
        args = self.args
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.redis = EmbeddedRedis(dir=str(self.log_dir / "redis"), appendonly=True)
        self.redis.start()
        redis_url = self.redis.url
        common = ["--redis-url", redis_url, "--run-id", args.run_id, "--log-level", "WARNING"]

        engine_ports = [free_port() for _ in range(self.num_engines)]
        self.engines = [self.engine_process(i, port) for i, port in enumerate(engine_ports)]
        for engine in self.engines:
            engine.start()
        engine_urls = [f"http://127.0.0.1:{p}" for p in engine_ports] + self.external_engine_urls

        router_port = free_port()
        self.services["router"] = self.router_process(router_port, engine_urls, common)
        reward_port, reward_grpc = free_port(), free_port()
        reward_flags = _flag_list(
            args,
            [
                ("--rm-type", "rm_type"),
                ("--custom-rm-path", "custom_rm_path"),
                ("--rm-url", "rm_url"),
                ("--reward-key", "reward_key"),
                ("--group-rm", "group_rm"),
                ("--http-proxy", "http_proxy"),
            ],
        )
        self.services["reward-model"] = ServiceProcess(
            "reward-model",
            self._serve(
                "reward-model",
                "--port",
                str(reward_port),
                "--grpc-port",
                str(reward_grpc),
                "--num-workers",
                "1",
                "--log-level",
                "WARNING",
                *reward_flags,
            ),
            health_url=f"http://127.0.0.1:{reward_port}/health",
            log_path=self.log_dir / "reward-model.log",
        )
        buffer_port = free_port()
        router_url = f"http://127.0.0.1:{router_port}"
        self.services["rollout-buffer"] = ServiceProcess(
            "rollout-buffer",
            self._serve(
                "rollout-buffer",
                "--port",
                str(buffer_port),
                "--grpc-port",
                str(free_port()),
                *common,
                "--router-url",
                router_url,
                "--reward-url",
                f"http://127.0.0.1:{reward_port}",
                "--reward-grpc-addr",
                f"127.0.0.1:{reward_grpc}",
                "--rollout-workers",
                str(self.rollout_workers),
                "--hf-checkpoint",
                args.hf_checkpoint,
                "--n-samples-per-prompt",
                str(args.n_samples_per_prompt),
                *_flag_list(
                    args,
                    [
                        ("--custom-generate-function-path", "custom_generate_function_path"),
                        ("--group-rm", "group_rm"),
                        ("--partial-rollout", "partial_rollout"),
                    ],
                ),
            ),
            health_url=f"http://127.0.0.1:{buffer_port}/health",
            log_path=self.log_dir / "rollout-buffer.log",
        )
        for service in self.services.values():
            service.start()
        for proc in [*self.engines, *self.services.values()]:
            proc.wait_healthy(HEALTH_TIMEOUT_S)
        self.addresses = StackAddresses(
            redis_url=redis_url,
            router_url=router_url,
            reward_url=f"http://127.0.0.1:{reward_port}",
            reward_grpc_addr=f"127.0.0.1:{reward_grpc}",
            buffer_url=f"http://127.0.0.1:{buffer_port}",
            engine_urls=engine_urls,
        )
        self.write_manifest()
        logger.info("embedded stack up: %d engines, logs in %s", len(engine_urls), self.log_dir)
        return self.addresses

    def write_manifest(self) -> Path:
        """``services.json`` in the log directory: every child's pid, address and log, for operators and tests."""
        entries = {
            "redis": {
                "pid": self.redis.pid if self.redis else None,
                "url": self.redis.url if self.redis else None,
            }
        }
        urls = self.addresses.engine_urls if self.addresses else []
        for i, engine in enumerate(self.engines):
            entries[engine.name] = {"pid": engine.pid, "url": urls[i] if i < len(urls) else None}
        for name, proc in self.services.items():
            entries[name] = {
                "pid": proc.pid,
                "url": proc.health_url.rsplit("/health", 1)[0] if proc.health_url else None,
            }
        path = self.log_dir / "services.json"
        path.write_text(json.dumps(entries, indent=2))
        return path

    def restart_engine(self, index: int) -> None:
        """Relaunch a dead engine on its old port; it comes back with the checkpoint's weights (STALE)."""
        self.engines[index].stop(timeout=2)
        self.engines[index].start()
        self.engines[index].wait_healthy(HEALTH_TIMEOUT_S)
        self.write_manifest()

    def stop(self) -> None:
        for proc in [*self.services.values(), *self.engines]:
            proc.stop(timeout=10)
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> StackAddresses:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def default_engine_threads(num_engines: int, trainer_threads: int, *, cores: int | None = None) -> int:
    """Split this machine's cores (``usable_cpus()`` unless given) between engines and the trainer so that they do
    not oversubscribe them: the engines generate at the same time, and ``trainer_threads`` cores stay with a
    trainer that trains meanwhile."""
    cores = usable_cpus() if cores is None else cores
    return max(1, (cores - trainer_threads) // max(1, num_engines)) if cores > trainer_threads else 1
