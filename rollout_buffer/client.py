"""The trainer's side of the buffer: fetch complete groups over the gRPC stream (HTTP v1 as fallback), ack them
after training, and turn agent trajectories into token ids and loss masks.

``--fetch-trajectory-retry-times`` bounds the fetch attempts that fail (buffer unreachable); -1 retries forever.
``--min-batch-collection-ratio`` r (slime parses it, we implement it): a fetch of n groups returns early with at
least ceil(r * n) groups once a whole wait window (``wait_seconds``) brings nothing new; r = 1 waits for all n.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import grpc
import httpx

from protos import slime_pb2, slime_pb2_grpc
from rollout_buffer.convert import is_untokenized_trajectory, sample_to_trajectory
from rollout_buffer.grpc_service import QUEUE_METADATA_KEY
from rollout_buffer.loss_mask import MultiTurnLossMaskGenerator, response_length
from rollout_buffer.store import KIND_SAMPLE
from services.core.grpc_util import DEFAULT_DEADLINE_S, grpc_channel
from services.core.sample import Sample

logger = logging.getLogger(__name__)

# After a gRPC failure the client uses HTTP for this long before trying gRPC again.
GRPC_RETRY_AFTER_S = 30.0


class BufferUnavailable(RuntimeError):
    """Neither the gRPC nor the HTTP API of the buffer answered."""


class BufferFetchError(RuntimeError):
    """The fetch gave up: --fetch-trajectory-retry-times attempts failed."""


@dataclass
class FetchedGroup:
    """One leased group: rollout-worker Samples, or agent trajectories still to tokenize (``to_samples``)."""

    group_id: str
    lease_id: str
    samples: list[Sample] = field(default_factory=list)
    trajectories: list[dict[str, Any]] = field(default_factory=list)

    def to_samples(self, mask_generator: MultiTurnLossMaskGenerator | None = None) -> list[Sample]:
        """The group as training Samples; trajectories need ``mask_generator`` (tokenizer + --loss-mask-type)."""
        if not self.trajectories:
            return list(self.samples)
        if mask_generator is None:
            raise ValueError(
                f"group {self.group_id} holds agent trajectories: pass a MultiTurnLossMaskGenerator"
            )
        return [trajectory_sample(item, mask_generator) for item in self.trajectories]


def trajectory_sample(item: dict[str, Any], mask_generator: MultiTurnLossMaskGenerator) -> Sample:
    """One trajectory item as a training Sample, as slime's rollout_buffer_example builds it."""
    tokens, mask = mask_generator.get_loss_mask(item["messages"])
    length = response_length(mask)
    extra_info = dict(item.get("extra_info") or {})
    instance_id = item.get("instance_id")
    tokenizer = mask_generator.tokenizer
    return Sample(
        index=instance_id if isinstance(instance_id, int) and not isinstance(instance_id, bool) else None,
        prompt=tokenizer.decode(tokens[: len(tokens) - length]),
        tokens=tokens,
        response=tokenizer.decode(tokens[len(tokens) - length :]) if length else "",
        response_length=length,
        reward=item.get("reward"),
        loss_mask=mask[len(mask) - length :],
        status=Sample.Status.TRUNCATED
        if extra_info.get("finish_reason") == "length"
        else Sample.Status.COMPLETED,
        metadata=extra_info,
        uid=str(item["uid"]),
    )


def start_rollout_payload(args: Any, skip_instance_ids: Sequence[Any] = ()) -> dict[str, Any]:
    """slime's /start_rollout payload from the trainer's flags (numbers as strings, as slime sends them)."""
    router = getattr(args, "router_url", None) or (
        f"http://{getattr(args, 'sglang_router_ip', None)}:{getattr(args, 'sglang_router_port', None)}"
    )
    return {
        "num_process": str(getattr(args, "rollout_num_process", 100)),
        "num_epoch": str(getattr(args, "num_epoch", None) or 3),
        "remote_engine_url": router,
        "remote_buffer_url": args.rollout_buffer_url,
        "task_type": args.rollout_task_type,
        "input_file": getattr(args, "prompt_data", None),
        "num_repeat_per_sample": str(args.n_samples_per_prompt),
        "max_tokens": str(args.rollout_max_response_len),
        "sampling_params": {
            "max_tokens": args.rollout_max_response_len,
            "temperature": args.rollout_temperature,
            "top_p": args.rollout_top_p,
        },
        "tokenizer_path": getattr(args, "hf_checkpoint", None),
        "skip_instance_ids": list(skip_instance_ids),
    }


def _group_from_proto(message: slime_pb2.Group) -> FetchedGroup:
    samples = [Sample.from_proto(sample) for sample in message.samples]
    group = FetchedGroup(group_id=message.group_id, lease_id=message.lease_id)
    if samples and all(is_untokenized_trajectory(sample) for sample in samples):
        group.trajectories = [sample_to_trajectory(sample, message.group_id) for sample in samples]
    else:
        group.samples = samples
    return group


def _group_from_json(body: dict[str, Any]) -> FetchedGroup:
    group = FetchedGroup(group_id=body["instance_id"], lease_id=body["lease_id"])
    if body["kind"] == KIND_SAMPLE:
        group.samples = [Sample.from_dict(item) for item in body["items"]]
    else:
        group.trajectories = list(body["items"])
    return group


class BufferClient:
    """Fetches leased groups from one buffer; give ``http_url`` (gRPC found via /v1/info), ``grpc_addr``, or both."""

    def __init__(
        self,
        http_url: str | None = None,
        *,
        grpc_addr: str | None = None,
        run_id: str = "default",
        auth_token: str | None = None,
        retry_times: int = -1,
        min_batch_collection_ratio: float = 1.0,
        lease_seconds: float | None = None,
        wait_seconds: float = 5.0,
        queue: str = "train",
        retry_backoff_s: float = 1.0,
    ):
        if http_url is None and grpc_addr is None:
            raise ValueError(
                "BufferClient needs the buffer's address: --rollout-buffer-url (HTTP) or a gRPC address"
            )
        if not 0 < min_batch_collection_ratio <= 1:
            raise ValueError(
                f"--min-batch-collection-ratio must be in (0, 1], got {min_batch_collection_ratio}"
            )
        if retry_times < -1:
            raise ValueError(
                f"--fetch-trajectory-retry-times must be -1 (forever) or >= 0, got {retry_times}"
            )
        self.http_url = http_url.rstrip("/") if http_url else None
        self.grpc_addr = grpc_addr
        self.run_id = run_id
        self.retry_times = retry_times
        self.ratio = min_batch_collection_ratio
        self.lease_seconds = lease_seconds
        self.wait_seconds = wait_seconds
        self.queue = queue
        self.retry_backoff_s = retry_backoff_s
        headers = {"Authorization": f"Bearer {auth_token}"} if auth_token else {}
        self._metadata = [
            (QUEUE_METADATA_KEY, queue),
            *((("authorization", headers["Authorization"]),) if headers else ()),
        ]
        self._http = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(30.0), trust_env=False)
        self._channel: grpc.aio.Channel | None = None
        self._stub: slime_pb2_grpc.BufferServiceStub | None = None
        self._grpc_down_until = 0.0
        self._discovered = grpc_addr is not None or http_url is None

    @classmethod
    def from_args(cls, args: Any, **overrides: Any) -> BufferClient:
        """A client configured by slime's flags: --rollout-buffer-url, --fetch-trajectory-retry-times,
        --min-batch-collection-ratio, plus the service's --run-id and --auth-token."""
        http_url = overrides.pop("http_url", args.rollout_buffer_url)
        options: dict[str, Any] = {
            "run_id": getattr(args, "run_id", "default"),
            "auth_token": getattr(args, "auth_token", None),
            "retry_times": args.fetch_trajectory_retry_times,
            "min_batch_collection_ratio": args.min_batch_collection_ratio,
            **overrides,
        }
        return cls(http_url, **options)

    async def fetch(self, n_groups: int) -> list[FetchedGroup]:
        """Lease ``n_groups`` complete groups (fewer only as --min-batch-collection-ratio allows); ack them later."""
        enough = max(1, math.ceil(self.ratio * n_groups - 1e-9))
        groups: list[FetchedGroup] = []
        while len(groups) < n_groups:
            got = await self.lease(n_groups - len(groups), min_groups=n_groups - len(groups))
            groups += got
            if not got and len(groups) >= enough:
                logger.info(
                    "taking %d of %d groups (--min-batch-collection-ratio %g)",
                    len(groups),
                    n_groups,
                    self.ratio,
                )
                break
        return groups

    async def lease(self, max_groups: int, *, min_groups: int = 1) -> list[FetchedGroup]:
        """One lease of up to ``max_groups`` complete groups, answered as soon as ``min_groups`` are there or after
        ``wait_seconds`` (possibly empty); an unreachable buffer is retried per --fetch-trajectory-retry-times."""
        failures = 0
        while True:
            try:
                return await self._fetch_once(max_groups, min_groups)
            except BufferUnavailable as exc:
                failures += 1
                if self.retry_times != -1 and failures > self.retry_times:
                    raise BufferFetchError(
                        f"fetching groups from the rollout buffer failed {failures} times "
                        f"(--fetch-trajectory-retry-times {self.retry_times}); last error: {exc}"
                    ) from exc
                logger.warning("fetch from the rollout buffer failed (%s); retry %d", exc, failures)
                await asyncio.sleep(self.retry_backoff_s)

    async def start_rollout(self, args: Any, skip_instance_ids: Sequence[Any] = ()) -> str:
        """POST slime's /start_rollout (task type --rollout-task-type) so the buffer runs its generator; retried
        like a fetch. ``skip_instance_ids``: groups already trained on (slime's resume). Returns the message."""
        payload = start_rollout_payload(args, skip_instance_ids)
        failures = 0
        while True:
            try:
                return str((await self._post("/start_rollout", payload))["message"])
            except BufferUnavailable as exc:
                failures += 1
                if self.retry_times != -1 and failures > self.retry_times:
                    raise BufferFetchError(
                        f"/start_rollout failed {failures} times (--fetch-trajectory-retry-times "
                        f"{self.retry_times}); last error: {exc}"
                    ) from exc
                await asyncio.sleep(self.retry_backoff_s)

    async def ack(self, lease_ids: Sequence[str]) -> int:
        """Acknowledge leased groups (they are deleted); returns how many leases were still current."""
        if not lease_ids:
            return 0
        stub = await self._grpc_stub()
        if stub is not None:
            try:
                reply = await stub.Ack(
                    slime_pb2.AckRequest(run_id=self.run_id, lease_ids=list(lease_ids)),
                    timeout=DEFAULT_DEADLINE_S,
                    metadata=self._metadata,
                )
                return reply.acked
            except grpc.aio.AioRpcError as exc:
                self._grpc_failed(exc)
        body = await self._post("/v1/groups/ack", {"run_id": self.run_id, "lease_ids": list(lease_ids)})
        return int(body["acked"])

    async def _fetch_once(self, count: int, min_groups: int) -> list[FetchedGroup]:
        stub = await self._grpc_stub()
        if stub is not None:
            groups: list[FetchedGroup] = []
            request = slime_pb2.FetchRequest(
                run_id=self.run_id,
                max_groups=count,
                min_groups=min_groups,
                lease_seconds=self.lease_seconds or 0.0,
                wait_seconds=self.wait_seconds,
            )
            try:
                stream = stub.FetchGroups(
                    request, timeout=self.wait_seconds + DEFAULT_DEADLINE_S, metadata=self._metadata
                )
                async for message in stream:
                    groups.append(_group_from_proto(message))
                return groups
            except grpc.aio.AioRpcError as exc:
                self._grpc_failed(exc)
                if groups:
                    return groups
        body = await self._post(
            "/v1/groups/lease",
            {
                "run_id": self.run_id,
                "max_groups": count,
                "min_groups": min_groups,
                "wait_seconds": self.wait_seconds,
                "lease_seconds": self.lease_seconds,
                "queue": self.queue,
            },
        )
        return [_group_from_json(group) for group in body["groups"]]

    def _grpc_failed(self, exc: grpc.aio.AioRpcError) -> None:
        if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT):
            raise BufferFetchError(f"rollout buffer refused the request: {exc.details()}") from exc
        logger.warning("gRPC to the rollout buffer failed (%s); using HTTP", exc.code().name)
        self._grpc_down_until = time.monotonic() + GRPC_RETRY_AFTER_S

    async def _grpc_stub(self) -> slime_pb2_grpc.BufferServiceStub | None:
        if time.monotonic() < self._grpc_down_until:
            return None
        if not self._discovered:
            self._discovered = True
            try:
                info = (await self._http.get(f"{self.http_url}/v1/info")).json()
            except (httpx.HTTPError, ValueError) as exc:
                logger.info("no gRPC address from %s/v1/info (%s); using HTTP", self.http_url, exc)
                info = {}
            if info.get("grpc_port"):
                self.grpc_addr = f"{urlsplit(self.http_url).hostname}:{info['grpc_port']}"
        if self.grpc_addr is None:
            return None
        if self._stub is None:
            # No transparent retries: a failed call falls back to HTTP at once, and fetch() has its own retries.
            self._channel = grpc_channel(self.grpc_addr, options=[("grpc.enable_retries", 0)])
            self._stub = slime_pb2_grpc.BufferServiceStub(self._channel)
        return self._stub

    async def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        if self.http_url is None:
            raise BufferUnavailable(
                f"gRPC at {self.grpc_addr} failed and no --rollout-buffer-url to fall back to"
            )
        try:
            response = await self._http.post(
                f"{self.http_url}{path}", json=payload, timeout=self.wait_seconds + DEFAULT_DEADLINE_S
            )
        except httpx.HTTPError as exc:
            raise BufferUnavailable(f"{self.http_url}{path}: {type(exc).__name__}: {exc}") from exc
        if response.status_code >= 500 or response.status_code == 429:
            raise BufferUnavailable(
                f"{self.http_url}{path} answered {response.status_code}: {response.text[:200]}"
            )
        if response.is_error:
            raise BufferFetchError(
                f"{self.http_url}{path} refused the request ({response.status_code}): {response.text[:300]}"
            )
        return response.json()

    async def aclose(self) -> None:
        await self._http.aclose()
        if self._channel is not None:
            await self._channel.close()
