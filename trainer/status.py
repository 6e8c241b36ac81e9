"""The trainer's own endpoints: Prometheus gauges and ``/status`` over HTTP, ``TrainerService`` over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading
from typing import Any

import grpc
import uvicorn
from prometheus_client import Gauge

from protos import slime_pb2, slime_pb2_grpc
from services.core.grpc_util import create_grpc_server
from services.core.http_app import create_app
from services.core.net import free_port

logger = logging.getLogger(__name__)

DEFAULT_PORT = 9000

ROLLOUT_ID = Gauge("slime_trainer_rollout_id", "Id of the last rollout trained on.")
WEIGHT_VERSION = Gauge("slime_trainer_weight_version", "Weight version last pushed to the engines.")
REWARD_MEAN = Gauge("slime_trainer_reward_mean", "Mean raw reward of the last training batch.")
KL = Gauge("slime_trainer_kl", "Mean KL to the reference model in the last rollout (0 when not computed).")
ENTROPY = Gauge("slime_trainer_entropy", "Mean token entropy of the policy in the last rollout.")
TOKENS_PER_SECOND = Gauge(
    "slime_trainer_rollout_tokens_per_second", "Generated tokens per second, last rollout."
)
STALENESS = Gauge("slime_trainer_staleness_max", "Largest weight-version lag of a sample in the last batch.")
SYNC_SECONDS = Gauge("slime_trainer_weight_sync_seconds", "Wall time of the last weight sync.")
EVAL_SCORE = Gauge("slime_trainer_eval_score", "Mean eval reward per dataset, at the last eval.", ["dataset"])

_GAUGES = {
    "rollout/raw_reward": REWARD_MEAN,
    "rollout/kl": KL,
    "rollout/entropy": ENTROPY,
    "perf/tokens_per_second": TOKENS_PER_SECOND,
    "rollout/staleness_max": STALENESS,
    "perf/weight_sync_seconds": SYNC_SECONDS,
}


class _Servicer(slime_pb2_grpc.TrainerServiceServicer):
    def __init__(self, server: TrainerStatusServer):
        self.server = server

    async def GetStatus(self, request: slime_pb2.StatusRequest, context: grpc.aio.ServicerContext):
        s = self.server.snapshot()
        return slime_pb2.TrainerStatus(
            run_id=s["run_id"],
            rollout_id=s["rollout_id"],
            weight_version=s["weight_version"],
            state=s["state"],
            reward_mean=s["reward_mean"],
        )


class TrainerStatusServer:
    """HTTP (``--port``, default 9000, or a free port when taken) and gRPC (HTTP port + 1) on a background thread."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        # --port 0 asks for any free port (tests, several runs on one host).
        self.port = DEFAULT_PORT if args.port is None else (args.port or free_port())
        self._state: dict[str, Any] = {
            "run_id": args.run_id,
            "rollout_id": -1,
            "weight_version": 0,
            "state": "starting",
            "reward_mean": 0.0,
        }
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._ready = threading.Event()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._state)

    def update(self, *, rollout_id: int, weight_version: int, metrics: dict[str, Any]) -> None:
        with self._lock:
            self._state.update(
                rollout_id=rollout_id,
                weight_version=weight_version,
                state="training",
                reward_mean=float(metrics.get("rollout/raw_reward", 0.0)),
            )
        ROLLOUT_ID.set(rollout_id)
        WEIGHT_VERSION.set(weight_version)
        for key, gauge in _GAUGES.items():
            if key in metrics:
                gauge.set(float(metrics[key]))
        for key, value in metrics.items():
            if key.startswith("eval/") and key.count("/") == 1 and "-" not in key:
                EVAL_SCORE.labels(key.split("/", 1)[1]).set(float(value))

    def start(self) -> None:
        try:
            self._bind(self.port)
        except OSError:
            self.port = free_port()
            self._bind(self.port)
        logger.info(
            "trainer metrics at http://%s:%d/metrics (gRPC status on %d)",
            self.args.host,
            self.port,
            self.port + 1,
        )

    def _bind(self, port: int) -> None:
        import socket

        with socket.socket() as probe:
            probe.bind((self.args.host, port))
        app = create_app("trainer", auth_token=self.args.auth_token)

        @app.get("/status")
        async def status() -> dict[str, Any]:
            return self.snapshot()

        config = uvicorn.Config(app, host=self.args.host, port=port, log_level="warning", access_log=False)
        self._server = uvicorn.Server(config)
        self._ready.clear()
        self._thread = threading.Thread(target=self._serve, name="trainer-status", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise OSError(f"trainer status server did not start on port {port}")

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop

        async def both() -> None:
            grpc_server = create_grpc_server(self.port + 1, host=self.args.host)
            slime_pb2_grpc.add_TrainerServiceServicer_to_server(_Servicer(self), grpc_server)
            await grpc_server.start()
            serve = asyncio.ensure_future(self._server.serve())
            while not self._server.started and not serve.done():
                await asyncio.sleep(0.01)
            self._ready.set()
            await serve
            await grpc_server.stop(grace=1)

        try:
            loop.run_until_complete(both())
        except Exception:
            logger.exception("trainer status server stopped")
        finally:
            self._ready.set()
            loop.close()

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
