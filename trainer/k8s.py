"""Engine pods on Kubernetes: find them by label selector and register them with the router, and delete the pod of
an engine the router has declared DEAD so that its StatefulSet or Deployment controller replaces it.

Runs inside the driver as a background thread (``EnginePodController.start()``) or on its own as
``python -m trainer.k8s`` (the Helm chart's trainer sidecar).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType

import httpx
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from services.core.logging_setup import setup_logging

logger = logging.getLogger(__name__)

DEFAULT_ENGINE_PORT = 30001
DEFAULT_INTERVAL_S = 10.0
DEFAULT_DELETE_GRACE_PERIOD_S = 30
DEFAULT_LABEL_SELECTOR = "app.kubernetes.io/component=rollout-engine"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# creationTimestamp has one-second resolution: a pod stamped within this of the DEAD verdict counts as newer.
TIMESTAMP_RESOLUTION_S = 1.0
# The router's name for an engine it has given up on (its ``GET /workers`` ``state``).
DEAD = "DEAD"


class K8sConfigError(ValueError):
    """The controller cannot be configured: no cluster credentials, no namespace, or a bad flag value."""


@dataclass(frozen=True)
class EnginePod:
    """One engine pod as the controller sees it: where its engine answers and whether it can take traffic."""

    name: str
    uid: str
    url: str | None
    ready: bool
    deleting: bool
    created_at: float


@dataclass(frozen=True)
class RouterWorker:
    """One worker as the router's ``GET /workers`` reports it."""

    url: str
    state: str
    state_age_s: float


@dataclass
class SyncReport:
    """What one pass changed: workers registered with the router, pods deleted, workers removed."""

    registered: list[str] = field(default_factory=list)
    deleted_pods: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.registered or self.deleted_pods or self.removed)


@dataclass(frozen=True)
class EngineDiscoveryConfig:
    """Where the engines and the router are, and how often to reconcile them."""

    router_url: str
    namespace: str
    label_selector: str = DEFAULT_LABEL_SELECTOR
    engine_port: int = DEFAULT_ENGINE_PORT
    scheme: str = "http"
    interval_s: float = DEFAULT_INTERVAL_S
    delete_dead: bool = True
    delete_grace_period_s: int = DEFAULT_DELETE_GRACE_PERIOD_S
    request_timeout_s: float = 10.0
    # Bearer token of a router started with --auth-token.
    auth_token: str | None = None

    def __post_init__(self) -> None:
        if not self.router_url.startswith(("http://", "https://")):
            raise K8sConfigError(f"--router-url must be an http(s) URL, got {self.router_url!r}")
        if not self.namespace:
            raise K8sConfigError("--namespace is empty: name the namespace the engine pods run in")
        if not self.label_selector.strip():
            raise K8sConfigError("--label-selector is empty: it would match every pod in the namespace")
        if not 1 <= self.engine_port <= 65535:
            raise K8sConfigError(f"--engine-port must be in 1..65535, got {self.engine_port}")
        if self.scheme not in ("http", "https"):
            raise K8sConfigError(f"--engine-scheme must be http or https, got {self.scheme!r}")
        if self.interval_s <= 0:
            raise K8sConfigError(f"--interval must be > 0 seconds, got {self.interval_s}")
        if self.delete_grace_period_s < 0:
            raise K8sConfigError(
                f"--delete-grace-period must be >= 0 seconds, got {self.delete_grace_period_s}"
            )


def _epoch(moment: datetime | None) -> float:
    return moment.timestamp() if moment is not None else 0.0


def _is_ready(pod: k8s_client.V1Pod) -> bool:
    conditions = (pod.status.conditions if pod.status else None) or []
    return (
        pod.status is not None
        and pod.status.phase == "Running"
        and any(c.type == "Ready" and c.status == "True" for c in conditions)
    )


def engine_url(
    *,
    hostname: str | None,
    subdomain: str | None,
    pod_ip: str | None,
    namespace: str,
    port: int,
    scheme: str = "http",
) -> str | None:
    """Where a pod's engine answers: ``hostname.subdomain.namespace.svc`` for a pod with a stable DNS name (a
    StatefulSet's, behind its headless Service), else the pod IP; None while the pod has neither."""
    if hostname and subdomain:
        return f"{scheme}://{hostname}.{subdomain}.{namespace}.svc:{port}"
    if not pod_ip:
        return None
    host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
    return f"{scheme}://{host}:{port}"


class EnginePodController:
    """Reconciles the router's worker list with the engine pods that a label selector matches.

    Each pass (``sync_once``):

    - a Ready engine pod the router does not know is registered (``POST /add_worker?url=``); one the router holds
      as DEAD whose pod was created after that verdict (its replacement) is registered again, which the router
      turns into RESTARTING;
    - the pod of a worker the router reports DEAD is deleted, but only if that pod already existed when the
      router declared it dead, so a replacement that is still loading its model is never deleted in turn; the
      delete carries the pod's uid as a precondition for the same reason;
    - a worker whose pod is gone (scaled down, or an IP that will not come back) is removed from the router.

    A StatefulSet pod is addressed by its stable DNS name (``hostname.subdomain.namespace.svc``), so its
    replacement keeps the URL; any other pod by its IP.
    """

    def __init__(self, config: EngineDiscoveryConfig, core_api: k8s_client.CoreV1Api):
        self.config = config
        self.core_api = core_api
        # The router is reached directly: a proxy set in the environment (for W&B, say) must not carry these calls.
        headers = {"Authorization": f"Bearer {config.auth_token}"} if config.auth_token else None
        self.http = httpx.Client(timeout=config.request_timeout_s, headers=headers, trust_env=False)
        self._managed: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def pod_url(self, pod: k8s_client.V1Pod) -> str | None:
        """The engine URL of ``pod``, or None while it has neither a stable DNS name nor an IP."""
        spec, status = pod.spec, pod.status
        return engine_url(
            hostname=spec.hostname if spec is not None else None,
            subdomain=spec.subdomain if spec is not None else None,
            pod_ip=status.pod_ip if status is not None else None,
            namespace=self.config.namespace,
            port=self.config.engine_port,
            scheme=self.config.scheme,
        )

    def engine_pods(self) -> list[EnginePod]:
        """The pods the label selector matches, in name order."""
        pod_list = self.core_api.list_namespaced_pod(
            self.config.namespace,
            label_selector=self.config.label_selector,
            _request_timeout=self.config.request_timeout_s,
        )
        pods = [
            EnginePod(
                name=pod.metadata.name,
                uid=pod.metadata.uid,
                url=self.pod_url(pod),
                ready=_is_ready(pod),
                deleting=pod.metadata.deletion_timestamp is not None,
                created_at=_epoch(pod.metadata.creation_timestamp),
            )
            for pod in pod_list.items
        ]
        return sorted(pods, key=lambda p: p.name)

    def router_workers(self) -> dict[str, RouterWorker]:
        """The router's workers by URL (``GET /workers``)."""
        response = self.http.get(f"{self.config.router_url}/workers")
        response.raise_for_status()
        return {
            w["url"]: RouterWorker(
                url=w["url"], state=w["state"], state_age_s=float(w.get("state_age_s", 0.0))
            )
            for w in response.json()["workers"]
        }

    def _register(self, url: str) -> bool:
        response = self.http.post(f"{self.config.router_url}/add_worker", params={"url": url})
        if response.is_success:
            return True
        logger.warning("router refused to register %s: HTTP %d %s", url, response.status_code, response.text)
        return False

    def _remove(self, url: str) -> bool:
        response = self.http.post(f"{self.config.router_url}/remove_worker", params={"url": url})
        # 404: someone else removed it already, which is what this call wanted.
        if response.is_success or response.status_code == 404:
            return True
        logger.warning("router refused to remove %s: HTTP %d %s", url, response.status_code, response.text)
        return False

    def _delete_pod(self, pod: EnginePod) -> bool:
        try:
            self.core_api.delete_namespaced_pod(
                pod.name,
                self.config.namespace,
                grace_period_seconds=self.config.delete_grace_period_s,
                body=k8s_client.V1DeleteOptions(preconditions=k8s_client.V1Preconditions(uid=pod.uid)),
                _request_timeout=self.config.request_timeout_s,
            )
        except ApiException as exc:
            # 404: already gone; 409: the name now belongs to a replacement, which this delete must not touch.
            if exc.status in (404, 409):
                logger.info("pod %s (uid %s) was already replaced or deleted", pod.name, pod.uid)
                return False
            raise
        return True

    def sync_once(self) -> SyncReport:
        """One reconciliation pass; raises ApiException or httpx.HTTPError when the cluster or router is unreachable."""
        report = SyncReport()
        pods = self.engine_pods()
        workers = self.router_workers()
        now = time.time()
        pods_by_url: dict[str, list[EnginePod]] = {}
        for pod in pods:
            if pod.url is not None:
                pods_by_url.setdefault(pod.url, []).append(pod)
                self._managed.add(pod.url)

        for url, url_pods in pods_by_url.items():
            worker = workers.get(url)
            dead_since = now - worker.state_age_s if worker is not None and worker.state == DEAD else None
            for pod in url_pods:
                if pod.deleting:
                    continue
                if dead_since is not None and pod.created_at + TIMESTAMP_RESOLUTION_S <= dead_since:
                    if self.config.delete_dead and self._delete_pod(pod):
                        logger.warning(
                            "engine %s is DEAD: deleted pod %s so that it is replaced", url, pod.name
                        )
                        report.deleted_pods.append(pod.name)
                    continue
                fresh = worker is None or dead_since is not None
                if pod.ready and fresh and url not in report.registered and self._register(url):
                    logger.info("registered engine pod %s as %s", pod.name, url)
                    report.registered.append(url)

        for url in sorted(self._managed - pods_by_url.keys()):
            if url in workers and self._remove(url):
                logger.info("engine %s has no pod any more: removed it from the router", url)
                report.removed.append(url)
            self._managed.discard(url)
        return report

    def run(self) -> None:
        """Reconcile every ``interval_s`` until ``stop()``; a failed pass is logged and retried next interval."""
        while not self._stop.is_set():
            try:
                report = self.sync_once()
                if report.changed:
                    logger.info(
                        "engine pods: registered %s, deleted %s, removed %s",
                        report.registered,
                        report.deleted_pods,
                        report.removed,
                    )
            except ApiException as exc:
                logger.warning(
                    "Kubernetes API error listing or deleting pods in namespace %s: %s %s",
                    self.config.namespace,
                    exc.status,
                    exc.reason,
                )
            except httpx.HTTPError as exc:
                logger.warning("router %s unreachable or refusing: %s", self.config.router_url, exc)
            except Exception:
                # The loop outlives any one bad pass (an unexpected answer, say); the next pass starts afresh.
                logger.exception("engine-pod reconciliation pass failed")
            self._stop.wait(self.config.interval_s)

    def start(self) -> EnginePodController:
        """Run the reconciliation loop in a daemon thread; returns self."""
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="k8s-engine-pods", daemon=True)
        self._thread.start()
        return self

    def request_stop(self) -> None:
        """Ask the loop to end after the current pass; safe from a signal handler."""
        self._stop.set()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop and close the router connections."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout if timeout is not None else self.config.request_timeout_s * 3)
            self._thread = None
        self.http.close()

    def __enter__(self) -> EnginePodController:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def load_core_api(kubeconfig: str | None = None, context: str | None = None) -> k8s_client.CoreV1Api:
    """A CoreV1Api from ``kubeconfig`` when given, else the pod's service account, else ``~/.kube/config``."""
    try:
        if kubeconfig is None:
            try:
                configuration = k8s_client.Configuration()
                k8s_config.load_incluster_config(client_configuration=configuration)
                return k8s_client.CoreV1Api(k8s_client.ApiClient(configuration))
            except ConfigException:
                logger.debug("not inside a pod with a service account; trying the kubeconfig")
        api_client = k8s_config.new_client_from_config(config_file=kubeconfig, context=context)
    except (ConfigException, OSError) as exc:
        where = kubeconfig or "~/.kube/config"
        raise K8sConfigError(
            f"no Kubernetes credentials: not in a pod with a service account, and {where} is unusable ({exc}); "
            "pass --kubeconfig"
        ) from exc
    return k8s_client.CoreV1Api(api_client)


def default_namespace() -> str | None:
    """``$POD_NAMESPACE`` (the downward API), else the service account's namespace file, else None."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    if SERVICE_ACCOUNT_NAMESPACE.is_file():
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or None
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.k8s",
        description="Register engine pods with the router and replace the pods of engines it declares DEAD.",
    )
    parser.add_argument("--router-url", required=True, help="HTTP base URL of the router.")
    parser.add_argument(
        "--namespace",
        default=None,
        help="Namespace of the engine pods (default: $POD_NAMESPACE, then the pod's own).",
    )
    parser.add_argument(
        "--label-selector", default=DEFAULT_LABEL_SELECTOR, help="Label selector matching the engine pods."
    )
    parser.add_argument(
        "--engine-port", type=int, default=DEFAULT_ENGINE_PORT, help="Port the engines listen on."
    )
    parser.add_argument(
        "--engine-scheme", choices=["http", "https"], default="http", help="Scheme of engine URLs."
    )
    parser.add_argument(
        "--interval", type=float, default=DEFAULT_INTERVAL_S, help="Seconds between reconciliation passes."
    )
    parser.add_argument(
        "--no-delete-dead",
        dest="delete_dead",
        action="store_false",
        help="Only register engine pods; never delete the pod of a DEAD engine.",
    )
    parser.add_argument(
        "--delete-grace-period",
        type=int,
        default=DEFAULT_DELETE_GRACE_PERIOD_S,
        help="Termination grace period, in seconds, of a deleted engine pod.",
    )
    parser.add_argument(
        "--kubeconfig", default=None, help="kubeconfig file (default: in-cluster service account)."
    )
    parser.add_argument("--context", default=None, help="kubeconfig context (default: the current one).")
    parser.add_argument(
        "--auth-token",
        default=os.environ.get("SLIME_AUTH_TOKEN"),
        help="Bearer token of a router started with --auth-token (default: $SLIME_AUTH_TOKEN).",
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="Log level.",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    setup_logging(args.log_level, service="k8s-engine-pods")
    namespace = args.namespace or default_namespace()
    if namespace is None:
        parser.error(
            "--namespace is required outside a pod (no $POD_NAMESPACE, no service account namespace file)"
        )
    try:
        config = EngineDiscoveryConfig(
            router_url=args.router_url.rstrip("/"),
            namespace=namespace,
            label_selector=args.label_selector,
            engine_port=args.engine_port,
            scheme=args.engine_scheme,
            interval_s=args.interval,
            delete_dead=args.delete_dead,
            delete_grace_period_s=args.delete_grace_period,
            auth_token=args.auth_token,
        )
        core_api = load_core_api(args.kubeconfig, args.context)
    except K8sConfigError as exc:
        parser.error(str(exc))
    controller = EnginePodController(config, core_api)

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        controller.request_stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    logger.info(
        "watching pods %r in namespace %s for router %s",
        config.label_selector,
        config.namespace,
        config.router_url,
    )
    controller.run()
    controller.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
