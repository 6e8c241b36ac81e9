"""gRPC plumbing every service shares: grpc.aio servers and channels (keepalive, UNAVAILABLE retries with
backoff, message limits sized for rollout samples), the default deadline, and Struct/Value <-> Python conversion.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from google.protobuf import struct_pb2

logger = logging.getLogger(__name__)

# Every unary call and the first message of a stream should finish well inside this; callers of long-polling
# streams (BufferService.FetchGroups) add their own wait to it.
DEFAULT_DEADLINE_S = 30.0

# A group of samples with long responses, token ids and log-probs runs to several MB; gRPC's 4 MB default
# receive limit would reject it.
MAX_MESSAGE_BYTES = 64 << 20

KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000

# gRPC caps maxAttempts at 5. Attempt n waits a random time in [0, min(initial * multiplier**(n-1), max)], so
# the whole retry window is at most 0.5 + 1 + 2 + 4 = 7.5 s (about half that on average): enough to ride out a
# server restart or a pod being rescheduled on the same address, well inside DEFAULT_DEADLINE_S.
RETRY_POLICY: dict[str, Any] = {
    "maxAttempts": 5,
    "initialBackoff": "0.5s",
    "maxBackoff": "4s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
# An empty name entry makes this the default method config for every service on the channel.
SERVICE_CONFIG: dict[str, Any] = {"methodConfig": [{"name": [{}], "retryPolicy": RETRY_POLICY}]}

GrpcOptions = Sequence[tuple[str, int | str]]

DEFAULT_SERVER_OPTIONS: GrpcOptions = (
    # gRPC sets SO_REUSEPORT by default, so a second server on a taken port would bind "successfully" and
    # silently share the traffic; a port conflict must fail at startup instead.
    ("grpc.so_reuseport", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    # Clients ping every KEEPALIVE_TIME_MS even while a long-polling stream carries no data; the server's
    # default floor (5 min) would count those pings as abuse and close the connection.
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 3),
)

DEFAULT_CHANNEL_OPTIONS: GrpcOptions = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 1),
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
    # The channel's own reconnect backoff starts at 1 s by default; retried calls fail fast while it waits, so
    # a slow reconnect would burn the retry budget before the restarted server is even dialled.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)


def _merge_options(defaults: GrpcOptions, overrides: GrpcOptions | None) -> list[tuple[str, int | str]]:
    merged = dict(defaults)
    merged.update(dict(overrides or ()))
    return list(merged.items())


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def create_grpc_server(
    port: int,
    host: str = "127.0.0.1",
    *,
    max_workers: int | None = None,
    options: GrpcOptions | None = None,
) -> grpc.aio.Server:
    """A grpc.aio server bound (insecure) to ``host:port``; add servicers, then ``await server.start()``.

    ``max_workers`` sizes the thread pool that runs servicer methods written as plain (non-async) functions;
    async methods run on the event loop and need none. ``options`` are merged over DEFAULT_SERVER_OPTIONS.
    """
    if not 1 <= port <= 65535:
        raise ValueError(f"gRPC port must be in 1..65535, got {port}")
    if max_workers is not None and max_workers < 1:
        raise ValueError(f"max_workers must be at least 1, got {max_workers}")
    executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc") if max_workers else None
    server = grpc.aio.server(
        migration_thread_pool=executor,
        options=_merge_options(DEFAULT_SERVER_OPTIONS, options),
    )
    address = _host_port(host, port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot bind gRPC server to {address}: {exc}") from exc
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {address}")
    logger.info("gRPC server bound to %s", address)
    return server


def grpc_channel(
    addr: str,
    *,
    aio: bool = True,
    options: GrpcOptions | None = None,
) -> grpc.aio.Channel | grpc.Channel:
    """An insecure channel to ``addr`` (``host:port`` or any gRPC target such as ``unix:/path``).

    The channel keeps the connection alive, retries UNAVAILABLE with backoff per RETRY_POLICY (a server that
    is down when the call starts and comes back within the retry window still answers it) and allows
    MAX_MESSAGE_BYTES messages. Pass ``timeout=DEFAULT_DEADLINE_S`` (or your own) on every call: the
    deadline bounds the retries too. ``aio=False`` gives a blocking ``grpc.Channel`` for synchronous code.
    """
    if not addr or addr.startswith(("http://", "https://")):
        raise ValueError(f"gRPC address must be host:port (or a gRPC target like unix:/path), got {addr!r}")
    merged = _merge_options(DEFAULT_CHANNEL_OPTIONS, options)
    if aio:
        return grpc.aio.insecure_channel(addr, options=merged)
    return grpc.insecure_channel(addr, options=merged)


# Struct/Value carry JSON: numbers are IEEE doubles. Integers beyond 2**53 would come back altered, so they are
# refused; integral numbers come back as int so ids and counters (round_number, start_rollout_id) stay usable as
# indices after a round trip.
_MAX_EXACT_INT = 2**53


def _fill_value(target: struct_pb2.Value, obj: Any, path: str) -> None:
    if obj is None:
        target.null_value = struct_pb2.NULL_VALUE
    elif isinstance(obj, bool):
        target.bool_value = obj
    elif isinstance(obj, int):
        if abs(obj) > _MAX_EXACT_INT:
            raise ValueError(f"{path}: integer {obj} is too large for a protobuf Value (|n| <= 2**53)")
        target.number_value = obj
    elif isinstance(obj, float):
        target.number_value = obj
    elif isinstance(obj, str):
        target.string_value = obj
    elif isinstance(obj, Mapping):
        _fill_struct(target.struct_value, obj, path)
    elif isinstance(obj, list | tuple):
        target.list_value.SetInParent()
        for i, item in enumerate(obj):
            _fill_value(target.list_value.values.add(), item, f"{path}[{i}]")
    else:
        raise TypeError(
            f"{path}: {type(obj).__name__} is not JSON-representable (use None, bool, number, str, list, dict)"
        )


def _fill_struct(target: struct_pb2.Struct, mapping: Mapping[str, Any], path: str) -> None:
    target.SetInParent()
    for key, item in mapping.items():
        if not isinstance(key, str):
            raise TypeError(
                f"{path}: key {key!r} is a {type(key).__name__}; protobuf Struct keys must be str"
            )
        _fill_value(target.fields[key], item, f"{path}.{key}")


def python_to_value(obj: Any, *, path: str = "value") -> struct_pb2.Value:
    """A JSON-like Python object as a ``google.protobuf.Value``; ``path`` names it in error messages."""
    value = struct_pb2.Value()
    _fill_value(value, obj, path)
    return value


def dict_to_struct(mapping: Mapping[str, Any], *, path: str = "struct") -> struct_pb2.Struct:
    """A str-keyed mapping of JSON-like values as a ``google.protobuf.Struct``."""
    struct = struct_pb2.Struct()
    _fill_struct(struct, mapping, path)
    return struct


def value_to_python(value: struct_pb2.Value) -> Any:
    """The Python object a ``google.protobuf.Value`` holds; integral numbers come back as int."""
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if math.isfinite(number) and number.is_integer() and abs(number) <= _MAX_EXACT_INT:
            return int(number)
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_to_dict(value.struct_value)
    if kind == "list_value":
        return [value_to_python(item) for item in value.list_value.values]
    return None


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A ``google.protobuf.Struct`` as a plain dict."""
    return {key: value_to_python(item) for key, item in struct.fields.items()}
