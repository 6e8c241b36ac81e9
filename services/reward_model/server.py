"""The reward-model service: ``POST /reward`` (what slime's ``remote_rm`` sends), ``POST /reward/batch`` and the
gRPC RewardService (Score, ScoreGroup), in one process, with the rule-based graders in a process pool.

``slime serve reward-model [--port 8000] [--rm-type ...] [--custom-rm-path ...] [--rm-url ...] [--reward-key ...]``
"""

from __future__ import annotations

import argparse
import hmac
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from numbers import Real
from typing import Any

import grpc
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel, ConfigDict, Field

from protos import slime_pb2, slime_pb2_grpc
from services.core.arguments import SlimeArgumentParser, add_service_arguments, add_slime_arguments
from services.core.grpc_util import create_grpc_server, dict_to_struct, struct_to_dict
from services.core.http_app import ApiError, create_app, run_app
from services.core.logging_setup import setup_logging
from services.core.plugins import PluginLoadError, load_function
from services.core.sample import Sample
from services.core.wire import RewardRequest
from services.reward_model.client import REWARD_ERROR_HEADER, ScoredReward
from services.reward_model.graders import Reward, split_boxed
from services.reward_model.hub import (
    DEFAULT_GRADER_TIMEOUT_S,
    REMOTE_RM,
    RewardConfigError,
    RewardHub,
    check_rm_type,
    default_num_workers,
    select_reward,
)
from services.reward_model.pool import GraderPool

logger = logging.getLogger(__name__)

SERVICE = "reward-model"
DEFAULT_PORT = 8000
DEFAULT_MAX_CONCURRENCY = 1024
DEFAULT_MAX_BODY_BYTES = 16 << 20
GRPC_GRACE_S = 5.0

INFLIGHT = Gauge("slime_reward_model_inflight_items", "Items admitted and not yet scored.")
REJECTED = Counter(
    "slime_reward_model_rejected_total",
    "Requests refused because --max-concurrency items were in flight (HTTP 429, gRPC RESOURCE_EXHAUSTED).",
    ["protocol"],
)
GRPC_REQUESTS = Counter(
    "slime_reward_model_grpc_requests_total",
    "gRPC calls answered, by method and status code.",
    ["method", "code"],
)
GRPC_SECONDS = Histogram(
    "slime_reward_model_grpc_request_seconds",
    "Time to answer one gRPC call, by method.",
    ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


class Overloaded(Exception):
    """Admitting the request would exceed --max-concurrency items in flight; the client should retry later."""


class BatchTooLarge(Exception):
    """One request holds more items than --max-concurrency; it could never be admitted and must be split."""


class RewardBatchRequest(BaseModel):
    """``POST /reward/batch``: items scored on their own, or as one group (slime's --group-rm) with ``group``."""

    model_config = ConfigDict(extra="forbid")

    items: list[RewardRequest]
    rm_type: str | None = Field(default=None, description="Overrides --rm-type for this request.")
    reward_key: str | None = Field(default=None, description="Overrides --reward-key for this request.")
    group: bool = False


class RewardService:
    """Admission control, reward-key selection and scoring shared by the HTTP and gRPC front ends."""

    def __init__(self, args: argparse.Namespace, hub: RewardHub):
        self.args = args
        self.hub = hub
        self.max_items = args.max_concurrency
        self.inflight = 0

    def _admit(self, count: int, protocol: str) -> None:
        if count > self.max_items:
            raise BatchTooLarge(
                f"{count} items in one request exceed --max-concurrency {self.max_items}; split it"
            )
        if self.inflight + count > self.max_items:
            REJECTED.labels(protocol).inc()
            raise Overloaded(
                f"{self.inflight} items in flight; {count} more would exceed --max-concurrency {self.max_items}"
            )
        self.inflight += count
        INFLIGHT.inc(count)

    def _release(self, count: int) -> None:
        self.inflight -= count
        INFLIGHT.dec(count)

    def reward_key(self, requested: str | None) -> str | None:
        return requested or self.args.reward_key or None

    async def score(
        self, samples: Sequence[Sample], *, rm_type: str | None, group: bool, protocol: str
    ) -> list[ScoredReward]:
        """Raw rewards (dicts unselected) for ``samples``; raises Overloaded, BatchTooLarge or RewardConfigError."""
        if rm_type:
            check_rm_type(rm_type)
        self._admit(len(samples), protocol)
        try:
            if group:
                return await self.hub.score_group(samples, rm_type=rm_type)
            return await self.hub.score_batch(samples, rm_type=rm_type)
        finally:
            self._release(len(samples))


def scalar_reward(reward: Reward, reward_key: str | None) -> Reward:
    """``reward`` with a dict reduced to ``reward[reward_key]`` when a key applies; that field must be a number."""
    selected = select_reward(reward, reward_key)
    if (
        isinstance(reward, dict)
        and reward_key
        and (not isinstance(selected, Real) or isinstance(selected, bool))
    ):
        raise RewardConfigError(
            f"reward key {reward_key!r} selects {selected!r}, which is not a number", field="reward_key"
        )
    return selected


def _header_safe(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ").encode("latin-1", "replace").decode("latin-1")[:300]


def _http_error(exc: Overloaded | BatchTooLarge | RewardConfigError) -> ApiError:
    if isinstance(exc, Overloaded):
        return ApiError(429, str(exc), headers={"Retry-After": "1"})
    if isinstance(exc, BatchTooLarge):
        return ApiError(413, str(exc), field="items")
    return ApiError(400, str(exc), field=exc.field)


def _sample(body: RewardRequest) -> Sample:
    return Sample(prompt=body.prompt, response=body.response, label=body.label, metadata=dict(body.metadata))


def _service(request: Request) -> RewardService:
    return request.app.state.reward


router = APIRouter(tags=["reward"])


@router.post("/reward")
async def score_one(body: RewardRequest, request: Request) -> JSONResponse:
    """The reward of one response: a number, or a dict (dapo, some custom functions) when no reward key applies.

    A failed grading still answers 200 with the failure reward; the reason is in the ``X-Reward-Error`` header.
    """
    service = _service(request)
    try:
        (outcome,) = await service.score([_sample(body)], rm_type=None, group=False, protocol="http")
        value = scalar_reward(outcome.value, service.reward_key(None))
    except (Overloaded, BatchTooLarge, RewardConfigError) as exc:
        raise _http_error(exc) from exc
    headers = {REWARD_ERROR_HEADER: _header_safe(outcome.error)} if outcome.error else None
    return JSONResponse(value, headers=headers)


@router.post("/reward/batch")
async def score_batch(body: RewardBatchRequest, request: Request) -> dict[str, Any]:
    """``{"rewards": [...], "errors": [null | reason, ...]}``, one entry per item, in order."""
    service = _service(request)
    samples = [_sample(item) for item in body.items]
    key = service.reward_key(body.reward_key)
    try:
        outcomes = await service.score(samples, rm_type=body.rm_type, group=body.group, protocol="http")
        rewards = [scalar_reward(outcome.value, key) for outcome in outcomes]
    except (Overloaded, BatchTooLarge, RewardConfigError) as exc:
        raise _http_error(exc) from exc
    return {"rewards": rewards, "errors": [outcome.error for outcome in outcomes]}


def reward_value(outcome: ScoredReward, reward_key: str | None) -> slime_pb2.RewardValue:
    """The RewardValue of one outcome: a number in ``value``; a dict in ``fields``, with ``is_dict`` unless a
    reward key picked the number out of it."""
    message = slime_pb2.RewardValue(error=outcome.error or "")
    reward = outcome.value
    if isinstance(reward, dict):
        message.fields.CopyFrom(dict_to_struct(reward, path="reward"))
        if reward_key:
            message.value = float(scalar_reward(reward, reward_key))
        else:
            message.is_dict = True
    else:
        message.value = float(reward)
    return message


def _sample_from_item(item: slime_pb2.RewardItem) -> Sample:
    return Sample(
        prompt=item.prompt,
        response=item.response,
        label=item.label,
        metadata=struct_to_dict(item.metadata),
        **({"uid": item.uid} if item.uid else {}),
    )


class RewardServicer(slime_pb2_grpc.RewardServiceServicer):
    """gRPC front end of ``RewardService`` for the rollout workers: batch scoring and group scoring."""

    def __init__(self, service: RewardService, auth_token: str | None):
        self.service = service
        self._token = auth_token.encode() if auth_token else None

    async def Score(
        self, request: slime_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> slime_pb2.ScoreResponse:
        return await self._score(request, context, group=False, method="Score")

    async def ScoreGroup(
        self, request: slime_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> slime_pb2.ScoreResponse:
        return await self._score(request, context, group=True, method="ScoreGroup")

    async def _score(
        self, request: slime_pb2.ScoreRequest, context: grpc.aio.ServicerContext, *, group: bool, method: str
    ) -> slime_pb2.ScoreResponse:
        start = time.perf_counter()
        code, failure = self._authorize(context)
        response = None
        try:
            if failure is None:
                code, failure, response = await self._answer(request, group)
        except Exception as exc:
            logger.exception("%s failed", method)
            code, failure = grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"
        try:
            if failure is not None:
                await context.abort(code, failure)
            return response
        finally:
            GRPC_REQUESTS.labels(method, code.name).inc()
            GRPC_SECONDS.labels(method).observe(time.perf_counter() - start)

    def _authorize(self, context: grpc.aio.ServicerContext) -> tuple[grpc.StatusCode, str | None]:
        if self._token is None:
            return grpc.StatusCode.OK, None
        metadata = dict(context.invocation_metadata() or ())
        scheme, _, token = str(metadata.get("authorization", "")).partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._token):
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or invalid bearer token in 'authorization' metadata",
            )
        return grpc.StatusCode.OK, None

    async def _answer(
        self, request: slime_pb2.ScoreRequest, group: bool
    ) -> tuple[grpc.StatusCode, str | None, slime_pb2.ScoreResponse | None]:
        key = self.service.reward_key(request.reward_key or None)
        try:
            samples = [_sample_from_item(item) for item in request.items]
            outcomes = await self.service.score(
                samples, rm_type=request.rm_type or None, group=group, protocol="grpc"
            )
            rewards = [reward_value(outcome, key) for outcome in outcomes]
        except Overloaded as exc:
            return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), None
        except BatchTooLarge as exc:
            return grpc.StatusCode.INVALID_ARGUMENT, f"items: {exc}", None
        except RewardConfigError as exc:
            return grpc.StatusCode.INVALID_ARGUMENT, f"{exc.field}: {exc}", None
        except (TypeError, ValueError) as exc:
            return grpc.StatusCode.INVALID_ARGUMENT, str(exc), None
        return grpc.StatusCode.OK, None, slime_pb2.ScoreResponse(rewards=rewards)


def build_app(args: argparse.Namespace) -> FastAPI:
    """The HTTP app; its lifespan starts the grader pool and the gRPC server on ``args.grpc_port``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Bind first: a taken gRPC port then fails the start before any worker process exists.
        grpc_server = create_grpc_server(args.grpc_port, args.host)
        hub = RewardHub(args, pool=GraderPool(args.num_workers, args.grader_timeout))
        app.state.reward = RewardService(args, hub)
        slime_pb2_grpc.add_RewardServiceServicer_to_server(
            RewardServicer(app.state.reward, args.auth_token), grpc_server
        )
        try:
            # Rule-based graders are warmed up front; a service that only forwards or calls custom code starts
            # its pool on the first request whose metadata names a rule-based type.
            if not args.custom_rm_path and args.rm_type and split_boxed(args.rm_type)[1] != REMOTE_RM:
                await hub.pool.start()
            await grpc_server.start()
            app.state.started = True
            logger.info(
                "reward model up: HTTP %s:%d, gRPC %s:%d, rm_type=%s, custom_rm_path=%s, %d grader workers",
                args.host,
                args.port,
                args.host,
                args.grpc_port,
                args.rm_type,
                args.custom_rm_path,
                args.num_workers,
            )
            yield
        finally:
            await grpc_server.stop(GRPC_GRACE_S)
            await hub.aclose()

    app = create_app(
        SERVICE, auth_token=args.auth_token, max_body_bytes=args.max_body_bytes, lifespan=lifespan
    )
    app.state.started = False
    app.include_router(router)
    return app


def build_parser() -> argparse.ArgumentParser:
    parser = SlimeArgumentParser(
        prog="slime serve reward-model",
        description="Reward model service: slime's rule-based, remote and custom rewards over HTTP and gRPC.",
    )
    add_slime_arguments(parser, groups=["Network", "Reward Model"])
    add_service_arguments(parser)
    group = parser.add_argument_group("Reward service")
    group.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default: --port + 1).")
    group.add_argument(
        "--num-workers",
        type=int,
        default=default_num_workers(),
        help="Grader worker processes (default: CPU count, at most 4).",
    )
    group.add_argument(
        "--grader-timeout",
        type=float,
        default=DEFAULT_GRADER_TIMEOUT_S,
        help="Seconds one item may grade before its worker is killed and the item gets the failure reward.",
    )
    group.add_argument(
        "--max-concurrency",
        type=int,
        default=DEFAULT_MAX_CONCURRENCY,
        help="Items in flight at once; a request beyond it is answered 429 (gRPC RESOURCE_EXHAUSTED).",
    )
    group.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="Largest HTTP request body accepted; larger ones are answered 413.",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags; errors name the flag and exit 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.port = DEFAULT_PORT if args.port is None else args.port
    args.grpc_port = args.port + 1 if args.grpc_port is None else args.grpc_port
    for flag, value in (("--port", args.port), ("--grpc-port", args.grpc_port)):
        if not 1 <= value <= 65535:
            parser.error(f"{flag} must be in 1..65535, got {value}")
    if args.grpc_port == args.port:
        parser.error(f"--grpc-port must differ from --port (both {args.port})")
    if args.num_workers < 1:
        parser.error(f"--num-workers must be at least 1, got {args.num_workers}")
    if args.grader_timeout <= 0:
        parser.error(f"--grader-timeout must be positive, got {args.grader_timeout}")
    if args.max_concurrency < 1:
        parser.error(f"--max-concurrency must be at least 1, got {args.max_concurrency}")
    if args.max_body_bytes < 1:
        parser.error(f"--max-body-bytes must be at least 1, got {args.max_body_bytes}")
    if args.rm_type:
        try:
            check_rm_type(args.rm_type)
        except RewardConfigError as exc:
            parser.error(f"--rm-type: {exc}")
        if split_boxed(args.rm_type)[1] == REMOTE_RM and not args.rm_url:
            parser.error("--rm-type remote_rm needs --rm-url (the reward server's URL)")
    if args.rm_url and not args.rm_url.startswith(("http://", "https://")):
        parser.error(f"--rm-url must be an http(s) URL, got {args.rm_url!r}")
    if args.custom_rm_path:
        try:
            load_function(args.custom_rm_path, flag="--custom-rm-path")
        except PluginLoadError as exc:
            parser.error(str(exc))
    elif not args.rm_type:
        logger.warning("neither --rm-type nor --custom-rm-path is set: every request must name its rm_type")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level, service=SERVICE)
    app = build_app(args)
    run_app(app, args.host, args.port, log_level=args.log_level)
    return 0 if app.state.started else 1


if __name__ == "__main__":
    raise SystemExit(main())
