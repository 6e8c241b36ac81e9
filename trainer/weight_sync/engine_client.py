"""A blocking HTTP client for one engine's SGLang weight-update and control endpoints.

Request fields follow SGLang's ``io_struct.py`` (``UpdateWeightFromDiskReqInput``, ``InitWeightsUpdateGroupReqInput``,
``UpdateWeightsFromDistributedReqInput``, ``UpdateWeightsFromTensorReqInput``); update endpoints answer
``{"success": bool, "message": str}``, and a ``success: false`` is raised like an HTTP error.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx

from services.core.net import tls_context

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0


class EngineError(RuntimeError):
    """An engine answered a weight-sync or control request with an error."""

    def __init__(self, url: str, message: str) -> None:
        super().__init__(f"engine {url}: {message}")
        self.url = url


class EngineClient:
    """Calls to one engine at ``base_url`` (``http://host:port``), with an optional bearer token."""

    def __init__(
        self, base_url: str, *, auth_token: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {auth_token}"} if auth_token else {}
        self._client = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout_s, verify=tls_context(), trust_env=False
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> EngineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        try:
            response = self._client.request(method, path, json=payload)
        except httpx.HTTPError as exc:
            raise EngineError(self.base_url, f"{method} {path} failed: {exc}") from exc
        if response.status_code >= 400:
            raise EngineError(
                self.base_url, f"{method} {path} -> HTTP {response.status_code}: {response.text[:500]}"
            )
        if not response.content:
            return None
        try:
            body = response.json()
        except ValueError:
            return response.text
        if isinstance(body, dict) and body.get("success") is False:
            raise EngineError(self.base_url, f"{method} {path} refused: {body.get('message', body)}")
        return body

    def pause_generation(self) -> None:
        self._request("POST", "/pause_generation", {})

    def continue_generation(self) -> None:
        self._request("POST", "/continue_generation", {})

    def flush_cache(self, attempts: int = 60, interval_s: float = 0.5) -> None:
        """SGLang (and the built-in engine) refuse a flush with HTTP 400 while requests are running or waiting —
        a health probe, say — so retry as slime does until the engine is idle."""
        for attempt in range(attempts):
            try:
                # SGLang serves /flush_cache on GET and POST; slime uses GET.
                self._request("GET", "/flush_cache")
                return
            except EngineError as exc:
                if "HTTP 400" not in str(exc) or attempt == attempts - 1:
                    raise
                time.sleep(interval_s)

    def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        """Free the engine's ``tags`` (``weights``, ``kv_cache``, ``cuda_graph``; all when None) — SGLang's
        ``ReleaseMemoryOccupationReqInput``."""
        self._request("POST", "/release_memory_occupation", {"tags": tags})

    def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        self._request("POST", "/resume_memory_occupation", {"tags": tags})

    def get_server_info(self) -> dict[str, Any]:
        """SGLang's ``/get_server_info``: server arguments and state; the built-in engine adds
        ``weight_update_load_formats`` (the ``load_format`` values its update endpoints take)."""
        body = self._request("GET", "/get_server_info")
        if not isinstance(body, dict):
            raise EngineError(
                self.base_url, f"GET /get_server_info answered {str(body)[:200]!r}, not an object"
            )
        return body

    def get_weight_version(self) -> str | None:
        """The version the engine serves (SGLang answers ``{"weight_version": ...}``), None if it has none."""
        body = self._request("GET", "/get_weight_version")
        if isinstance(body, dict) and body.get("weight_version") is not None:
            return str(body["weight_version"])
        return None

    def update_weights_from_disk(
        self,
        model_path: str,
        *,
        weight_version: str,
        load_format: str | None = None,
        flush_cache: bool = False,
    ) -> Any:
        return self._request(
            "POST",
            "/update_weights_from_disk",
            {
                "model_path": model_path,
                "load_format": load_format,
                "weight_version": weight_version,
                "flush_cache": flush_cache,
            },
        )

    def update_weights_from_tensor(
        self,
        serialized_named_tensors: list[str],
        *,
        weight_version: str,
        load_format: str | None = None,
        flush_cache: bool = False,
    ) -> Any:
        return self._request(
            "POST",
            "/update_weights_from_tensor",
            {
                "serialized_named_tensors": serialized_named_tensors,
                "load_format": load_format,
                "flush_cache": flush_cache,
                "weight_version": weight_version,
            },
        )

    def init_weights_update_group(
        self,
        *,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str,
    ) -> Any:
        return self._request(
            "POST",
            "/init_weights_update_group",
            {
                "master_address": master_address,
                "master_port": master_port,
                "rank_offset": rank_offset,
                "world_size": world_size,
                "group_name": group_name,
                "backend": backend,
            },
        )

    def update_weights_from_distributed(
        self,
        *,
        names: list[str],
        dtypes: list[str],
        shapes: list[list[int]],
        group_name: str,
        weight_version: str,
        load_format: str | None = None,
        flush_cache: bool = False,
    ) -> Any:
        """``load_format="flattened_bucket"``: the tensors arrive as one broadcast of their bytes, not one each."""
        payload = {
            "names": names,
            "dtypes": dtypes,
            "shapes": shapes,
            "group_name": group_name,
            "flush_cache": flush_cache,
            "weight_version": weight_version,
        }
        if load_format is not None:
            # Only when set: the per-tensor request stays as it was (older SGLang versions have no such field).
            payload["load_format"] = load_format
        return self._request("POST", "/update_weights_from_distributed", payload)

    def destroy_weights_update_group(self, group_name: str) -> Any:
        return self._request("POST", "/destroy_weights_update_group", {"group_name": group_name})
