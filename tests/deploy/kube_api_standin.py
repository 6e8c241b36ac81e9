"""StandInKubeApiServer: a small real HTTP server standing in for a Kubernetes API server, since no cluster runs here.

It speaks only what ``trainer.k8s`` calls through the ``kubernetes`` client: list pods in a namespace by label
selector, read one pod, and delete one (with the ``preconditions.uid`` check, and graceful termination: a deleted
pod stays listed with a ``deletionTimestamp`` until ``finish_terminations()``, as a kubelet would). Requests need
``Authorization: Bearer <token>``; errors are ``Status`` objects with the API server's codes and reasons.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

_POD_PATH = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods(?:/(?P<name>[^/]+))?$")
_REASONS = {400: "BadRequest", 401: "Unauthorized", 404: "NotFound", 405: "MethodNotAllowed", 409: "Conflict"}


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class StandInPod:
    """One pod as the stand-in stores it; ``to_json`` renders the v1 Pod the real API would return."""

    name: str
    namespace: str
    labels: dict[str, str]
    ip: str | None
    ready: bool = True
    hostname: str | None = None
    subdomain: str | None = None
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    deleted_at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "name": self.name,
            "namespace": self.namespace,
            "uid": self.uid,
            "labels": self.labels,
            "creationTimestamp": _rfc3339(self.created_at),
            "resourceVersion": "1",
        }
        if self.deleted_at is not None:
            metadata["deletionTimestamp"] = _rfc3339(self.deleted_at)
            metadata["deletionGracePeriodSeconds"] = 30
        spec: dict[str, Any] = {"containers": [{"name": "engine", "image": "slime-rl:test"}]}
        if self.hostname:
            spec["hostname"] = self.hostname
        if self.subdomain:
            spec["subdomain"] = self.subdomain
        status: dict[str, Any] = {
            "phase": "Running" if self.ip else "Pending",
            "conditions": [{"type": "Ready", "status": "True" if self.ready else "False"}],
        }
        if self.ip:
            status["podIP"] = self.ip
        return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec, "status": status}


class SelectorError(ValueError):
    pass


def matches(selector: str, labels: dict[str, str]) -> bool:
    """Equality-based label selectors (``a=b``, ``a==b``, ``a!=b``, ``a``, ``!a``), comma-separated."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if " in " in term or " notin " in term:
            raise SelectorError(f"set-based selector {term!r} is not supported by the stand-in")
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class StandInKubeApiServer:
    """The stand-in API server on 127.0.0.1; ``url`` and ``token`` go into a kubeconfig or a client Configuration."""

    def __init__(self, token: str = "stand-in-token"):
        self.token = token
        self._pods: dict[tuple[str, str], StandInPod] = {}
        self._lock = threading.Lock()
        self.deletions: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="kube-api-standin",
            daemon=True,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> StandInKubeApiServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> StandInKubeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_pod(self, pod: StandInPod) -> StandInPod:
        with self._lock:
            self._pods[(pod.namespace, pod.name)] = pod
        return pod

    def pod(self, namespace: str, name: str) -> StandInPod | None:
        with self._lock:
            return self._pods.get((namespace, name))

    def set_ready(self, namespace: str, name: str, ready: bool) -> None:
        with self._lock:
            self._pods[(namespace, name)].ready = ready

    def finish_terminations(self) -> list[str]:
        """Remove every pod that is terminating, as the kubelet does once its containers have stopped."""
        with self._lock:
            gone = [key for key, pod in self._pods.items() if pod.deleted_at is not None]
            for key in gone:
                del self._pods[key]
        return [name for _, name in gone]

    def kubeconfig(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "stand-in", "cluster": {"server": self.url}}],
            "users": [{"name": "driver", "user": {"token": self.token}}],
            "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "driver"}}],
            "current-context": "stand-in",
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def _send(self, status: int, body: dict[str, Any]) -> None:
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _status(self, code: int, message: str) -> None:
                self._send(
                    code,
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Failure",
                        "message": message,
                        "reason": _REASONS.get(code, "InternalError"),
                        "code": code,
                    },
                )

            def _route(self) -> tuple[str, str | None, dict[str, list[str]]] | None:
                server.requests.append((self.command, self.path))
                if self.headers.get("Authorization") != f"Bearer {server.token}":
                    self._status(401, "Unauthorized")
                    return None
                parts = urlsplit(self.path)
                match = _POD_PATH.match(parts.path)
                if match is None:
                    self._status(404, f"the stand-in serves only pods, not {parts.path}")
                    return None
                return match["ns"], match["name"], parse_qs(parts.query)

            def do_GET(self) -> None:
                route = self._route()
                if route is None:
                    return
                namespace, name, query = route
                with server._lock:
                    if name is not None:
                        pod = server._pods.get((namespace, name))
                        if pod is None:
                            self._status(404, f'pods "{name}" not found')
                        else:
                            self._send(200, pod.to_json())
                        return
                    selector = query.get("labelSelector", [""])[0]
                    try:
                        items = [
                            pod.to_json()
                            for (ns, _), pod in sorted(server._pods.items())
                            if ns == namespace and matches(selector, pod.labels)
                        ]
                    except SelectorError as exc:
                        self._status(400, str(exc))
                        return
                self._send(
                    200,
                    {
                        "apiVersion": "v1",
                        "kind": "PodList",
                        "metadata": {"resourceVersion": "1"},
                        "items": items,
                    },
                )

            def do_DELETE(self) -> None:
                route = self._route()
                if route is None:
                    return
                namespace, name, query = route
                length = int(self.headers.get("Content-Length") or 0)
                options = json.loads(self.rfile.read(length) or b"{}")
                if name is None:
                    self._status(405, "the stand-in does not delete collections")
                    return
                with server._lock:
                    pod = server._pods.get((namespace, name))
                    if pod is None:
                        self._status(404, f'pods "{name}" not found')
                        return
                    wanted_uid = (options.get("preconditions") or {}).get("uid")
                    if wanted_uid is not None and wanted_uid != pod.uid:
                        self._status(
                            409,
                            f"Precondition failed: UID in precondition: {wanted_uid}, UID in object meta: {pod.uid}",
                        )
                        return
                    if pod.deleted_at is None:
                        pod.deleted_at = datetime.now(UTC)
                    server.deletions.append(
                        {
                            "name": name,
                            "uid": pod.uid,
                            "grace_period_seconds": query.get("gracePeriodSeconds", [None])[0],
                            "precondition_uid": wanted_uid,
                        }
                    )
                    body = pod.to_json()
                self._send(200, body)

        return Handler
