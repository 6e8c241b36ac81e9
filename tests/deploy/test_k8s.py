"""The engine-pod controller against StandInKubeApiServer (no cluster runs here) and a real router process.

Engines are real HTTP servers (``router.echo_upstream``'s SGLang stand-in under uvicorn), each on its own loopback
address (127.0.0.2, 127.0.0.3, ...) so that every "pod IP" serves the same engine port, as pods in a cluster do;
shutting one down is an engine dying: its port refuses connections from then on.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml
from kubernetes import client as k8s_client
from kubernetes.client.exceptions import ApiException

from router.echo_upstream import EchoUpstream
from services.core.net import free_port, wait_http_ok
from tests.deploy.kube_api_standin import StandInKubeApiServer, StandInPod
from trainer.k8s import EngineDiscoveryConfig, EnginePodController, K8sConfigError, load_core_api, main

NAMESPACE = "rl"
ENGINE_LABELS = {"app.kubernetes.io/name": "slime", "app.kubernetes.io/component": "rollout-engine"}
SELECTOR = "app.kubernetes.io/name=slime,app.kubernetes.io/component=rollout-engine"
REPO = Path(__file__).resolve().parents[2]


def _engine_port() -> int:
    """A port free on every loopback address the test uses as a pod IP."""
    for _ in range(50):
        port = free_port()
        try:
            for last in range(2, 8):
                with socket.socket() as sock:
                    sock.bind((f"127.0.0.{last}", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on 127.0.0.2-7")


def _spawn(argv: list[str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def engine_port() -> int:
    return _engine_port()


def _start_router(log: Path, probe_interval: float, *extra: str) -> tuple[subprocess.Popen, str]:
    """A real router process (no Redis: its registry lives in the process)."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "services.cli",
        "serve",
        "router",
        "--port",
        str(port),
        "--log-level",
        "WARNING",
    ]
    argv += ["--rollout-health-check-interval", str(probe_interval), "--rollout-health-check-timeout", "1"]
    proc = _spawn([*argv, "--rollout-health-check-first-wait", "5", *extra], log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(f"{url}/health", timeout=60)
    except BaseException:
        _kill(proc)
        raise
    return proc, url


@pytest.fixture(scope="module")
def router_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A router that probes its engines every 0.2 s."""
    proc, url = _start_router(tmp_path_factory.mktemp("router") / "router.log", probe_interval=0.2)
    yield url
    _kill(proc)


@pytest.fixture
def router(router_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=router_url, timeout=10, trust_env=False) as http:
        yield http
        for worker in http.get("/workers").json()["workers"]:
            http.post("/remove_worker", params={"url": worker["url"]})


class Engine:
    """An SGLang-like engine answering on ``ip:port`` until ``kill()``."""

    def __init__(self, ip: str, port: int):
        config = uvicorn.Config(
            EchoUpstream(name=ip), host=ip, port=port, log_level="warning", access_log=False, lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"engine-{ip}", daemon=True)
        self.url = f"http://{ip}:{port}"

    def start(self) -> Engine:
        self.thread.start()
        wait_http_ok(f"{self.url}/health_generate", timeout=30)
        return self

    def kill(self) -> None:
        self.server.should_exit = True
        self.server.force_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def engines(engine_port: int) -> Iterator[Callable[[str], Engine]]:
    """Start an engine on ``ip:engine_port``; every engine is stopped after the test."""
    started: list[Engine] = []

    def start(ip: str) -> Engine:
        started.append(Engine(ip, engine_port).start())
        return started[-1]

    yield start
    for engine in started:
        engine.kill()


@pytest.fixture
def kube() -> Iterator[StandInKubeApiServer]:
    with StandInKubeApiServer() as server:
        yield server


def _core_api(server: StandInKubeApiServer, token: str | None = None) -> k8s_client.CoreV1Api:
    configuration = k8s_client.Configuration(host=server.url)
    configuration.api_key = {"BearerToken": token or server.token}
    configuration.api_key_prefix = {"BearerToken": "Bearer"}
    return k8s_client.CoreV1Api(k8s_client.ApiClient(configuration))


_CONTROLLERS: list[EnginePodController] = []


@pytest.fixture(autouse=True)
def _stop_controllers() -> Iterator[None]:
    yield
    while _CONTROLLERS:
        _CONTROLLERS.pop().stop()


def _controller(
    kube: StandInKubeApiServer, router_url: str, engine_port: int, **kw: Any
) -> EnginePodController:
    config = EngineDiscoveryConfig(
        router_url=router_url,
        namespace=NAMESPACE,
        label_selector=SELECTOR,
        engine_port=engine_port,
        interval_s=kw.pop("interval_s", 0.2),
        **kw,
    )
    _CONTROLLERS.append(EnginePodController(config, _core_api(kube)))
    return _CONTROLLERS[-1]


def _pod(name: str, ip: str | None, **kw) -> StandInPod:
    return StandInPod(name=name, namespace=NAMESPACE, labels=dict(ENGINE_LABELS), ip=ip, **kw)


def _states(router: httpx.Client) -> dict[str, str]:
    return {w["url"]: w["state"] for w in router.get("/workers").json()["workers"]}


def _wait_state(router: httpx.Client, url: str, state: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _states(router).get(url) == state:
            return
        time.sleep(0.05)
    raise AssertionError(f"{url} never reached {state}: router says {_states(router)}")


def test_ready_engine_pods_are_registered_with_the_router(kube, router, engines, router_url, engine_port):
    engines("127.0.0.2")
    engines("127.0.0.3")
    kube.add_pod(_pod("engine-0", "127.0.0.2"))
    kube.add_pod(_pod("engine-1", "127.0.0.3"))
    kube.add_pod(_pod("engine-2", "127.0.0.4", ready=False))
    kube.add_pod(_pod("engine-3", None, ready=False))
    kube.add_pod(StandInPod(name="reward-0", namespace=NAMESPACE, labels={"app": "other"}, ip="127.0.0.5"))
    kube.add_pod(
        StandInPod(name="engine-x", namespace="elsewhere", labels=dict(ENGINE_LABELS), ip="127.0.0.6")
    )

    controller = _controller(kube, router_url, engine_port)
    report = controller.sync_once()

    urls = [f"http://127.0.0.2:{engine_port}", f"http://127.0.0.3:{engine_port}"]
    assert report.registered == urls
    assert report.deleted_pods == [] and report.removed == []
    assert sorted(router.get("/list_workers").json()["urls"]) == urls
    for url in urls:
        _wait_state(router, url, "HEALTHY")
    assert controller.sync_once().changed is False
    assert kube.deletions == []


def test_dead_engine_pod_is_deleted_and_its_replacement_registered(
    kube, router, engines, router_url, engine_port
):
    engines("127.0.0.2")
    dying = engines("127.0.0.3")
    kube.add_pod(_pod("engine-0", "127.0.0.2"))
    old = kube.add_pod(_pod("engine-1", "127.0.0.3", created_at=datetime.now(UTC) - timedelta(minutes=5)))
    controller = _controller(kube, router_url, engine_port)
    controller.sync_once()
    dead_url, live_url = f"http://127.0.0.3:{engine_port}", f"http://127.0.0.2:{engine_port}"
    _wait_state(router, dead_url, "HEALTHY")

    dying.kill()
    _wait_state(router, dead_url, "DEAD")
    report = controller.sync_once()

    assert report.deleted_pods == ["engine-1"]
    assert kube.deletions == [
        {"name": "engine-1", "uid": old.uid, "grace_period_seconds": "30", "precondition_uid": old.uid}
    ]
    # While the pod terminates it is still listed: no second delete, and the worker stays registered.
    assert controller.sync_once().changed is False
    assert len(kube.deletions) == 1

    # The kubelet finishes; the StatefulSet-less controller (a Deployment) brings a new pod with a new IP.
    assert kube.finish_terminations() == ["engine-1"]
    engines("127.0.0.4")
    kube.add_pod(_pod("engine-1-b", "127.0.0.4"))
    report = controller.sync_once()

    new_url = f"http://127.0.0.4:{engine_port}"
    assert report.removed == [dead_url]
    assert report.registered == [new_url]
    assert sorted(router.get("/list_workers").json()["urls"]) == sorted([live_url, new_url])
    _wait_state(router, new_url, "HEALTHY")


def test_replacement_with_the_same_url_is_not_deleted_while_it_loads(
    kube, router, engines, router_url, engine_port
):
    """A StatefulSet's replacement keeps its predecessor's address; the router still says DEAD until it answers."""
    dying = engines("127.0.0.3")
    kube.add_pod(_pod("engine-0", "127.0.0.3", created_at=datetime.now(UTC) - timedelta(minutes=5)))
    controller = _controller(kube, router_url, engine_port)
    controller.sync_once()
    url = f"http://127.0.0.3:{engine_port}"
    _wait_state(router, url, "HEALTHY")
    dying.kill()
    _wait_state(router, url, "DEAD")
    assert controller.sync_once().deleted_pods == ["engine-0"]
    kube.finish_terminations()

    replacement = kube.add_pod(_pod("engine-0", "127.0.0.3", ready=False))
    for _ in range(3):
        report = controller.sync_once()
        assert report.deleted_pods == [] and report.registered == []
    assert _states(router)[url] == "DEAD"

    # Once it answers, the router's own probes may bring it back before the controller re-registers it.
    engines("127.0.0.3")
    kube.set_ready(NAMESPACE, "engine-0", True)
    assert controller.sync_once().registered in ([], [url])
    _wait_state(router, url, "HEALTHY")
    assert controller.sync_once().changed is False
    assert [d["uid"] for d in kube.deletions] != [replacement.uid]
    assert len(kube.deletions) == 1


def test_replacement_is_registered_again_before_the_router_probes_it(kube, engines, engine_port, tmp_path):
    """With slime's default 30 s probe interval a DEAD engine is looked at rarely; re-registering its Ready
    replacement makes the router probe it at once (DEAD -> RESTARTING -> HEALTHY). This router also wants a
    bearer token, which the controller must send."""
    proc, router_url = _start_router(tmp_path / "router.log", 60, "--auth-token", "router-secret")
    auth = {"Authorization": "Bearer router-secret"}
    try:
        with httpx.Client(base_url=router_url, timeout=10, trust_env=False, headers=auth) as router:
            dying = engines("127.0.0.3")
            kube.add_pod(_pod("engine-0", "127.0.0.3", created_at=datetime.now(UTC) - timedelta(minutes=5)))
            with pytest.raises(httpx.HTTPStatusError, match="401"):
                _controller(kube, router_url, engine_port).sync_once()
            controller = _controller(kube, router_url, engine_port, auth_token="router-secret")
            url = f"http://127.0.0.3:{engine_port}"
            assert controller.sync_once().registered == [url]
            _wait_state(router, url, "HEALTHY")
            dying.kill()
            # A failed request makes the worker SUSPECT at once; the prober confirms it DEAD on its next tick.
            router.post("/generate", json={"text": "1+1=", "sampling_params": {"max_new_tokens": 1}})
            _wait_state(router, url, "DEAD")
            assert controller.sync_once().deleted_pods == ["engine-0"]
            kube.finish_terminations()
            kube.add_pod(_pod("engine-0", "127.0.0.3"))
            engines("127.0.0.3")

            assert controller.sync_once().registered == [url]
            assert _states(router)[url] == "HEALTHY"
    finally:
        _kill(proc)


def test_deleting_dead_pods_can_be_turned_off(kube, router, engines, router_url, engine_port):
    dying = engines("127.0.0.3")
    kube.add_pod(_pod("engine-0", "127.0.0.3", created_at=datetime.now(UTC) - timedelta(minutes=5)))
    controller = _controller(kube, router_url, engine_port, delete_dead=False)
    controller.sync_once()
    url = f"http://127.0.0.3:{engine_port}"
    _wait_state(router, url, "HEALTHY")
    dying.kill()
    _wait_state(router, url, "DEAD")
    assert controller.sync_once().changed is False
    assert kube.deletions == []


def test_precondition_conflict_leaves_the_new_pod_alone(kube, router_url, engine_port):
    """The router reports DEAD, but between list and delete the pod was replaced: the uid precondition fails."""
    pod = kube.add_pod(_pod("engine-0", "127.0.0.3"))
    controller = _controller(kube, router_url, engine_port)
    listed = controller.engine_pods()[0]
    kube.add_pod(_pod("engine-0", "127.0.0.3"))
    assert controller._delete_pod(listed) is False
    assert kube.deletions == []
    assert kube.pod(NAMESPACE, "engine-0").uid != pod.uid


def test_statefulset_pods_are_addressed_by_their_stable_dns_name(kube, router_url, engine_port):
    kube.add_pod(_pod("engine-0", "10.1.2.3", hostname="engine-0", subdomain="slime-engine"))
    kube.add_pod(_pod("engine-x", "fd00::7"))
    pods = {p.name: p for p in _controller(kube, router_url, engine_port).engine_pods()}
    assert pods["engine-0"].url == f"http://engine-0.slime-engine.{NAMESPACE}.svc:{engine_port}"
    assert pods["engine-x"].url == f"http://[fd00::7]:{engine_port}"


def test_background_loop_registers_and_survives_errors(kube, router, engines, router_url, engine_port):
    engines("127.0.0.2")
    kube.add_pod(_pod("engine-0", "127.0.0.2"))
    bad_token = EnginePodController(
        EngineDiscoveryConfig(
            router_url=router_url, namespace=NAMESPACE, label_selector=SELECTOR, interval_s=0.05
        ),
        _core_api(kube, token="wrong"),
    )
    _CONTROLLERS.append(bad_token)
    with pytest.raises(ApiException) as err:
        bad_token.sync_once()
    assert err.value.status == 401
    # Refused passes are logged and retried: the loop keeps asking.
    with bad_token:
        deadline = time.monotonic() + 10
        while len(kube.requests) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(kube.requests) >= 5
    assert router.get("/list_workers").json()["urls"] == []

    with _controller(kube, router_url, engine_port, interval_s=0.1):
        _wait_state(router, f"http://127.0.0.2:{engine_port}", "HEALTHY")
    # Stopped: a new engine pod is no longer picked up.
    engines("127.0.0.3")
    kube.add_pod(_pod("engine-1", "127.0.0.3"))
    time.sleep(0.5)
    assert router.get("/list_workers").json()["urls"] == [f"http://127.0.0.2:{engine_port}"]


def test_kubeconfig_credentials_reach_the_api_server(kube, tmp_path):
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(kube.kubeconfig()))
    kube.add_pod(_pod("engine-0", "127.0.0.2"))
    api = load_core_api(str(path))
    assert [p.metadata.name for p in api.list_namespaced_pod(NAMESPACE).items] == ["engine-0"]
    with pytest.raises(K8sConfigError, match="--kubeconfig"):
        load_core_api(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("router_url", "router:30000", "--router-url"),
        ("namespace", "", "--namespace"),
        ("label_selector", " ", "--label-selector"),
        ("engine_port", 0, "--engine-port"),
        ("interval_s", 0, "--interval"),
    ],
)
def test_bad_configuration_names_the_flag(field, value, message):
    values = {"router_url": "http://router:30000", "namespace": NAMESPACE, field: value}
    with pytest.raises(K8sConfigError, match=message):
        EngineDiscoveryConfig(**values)


def test_cli_refuses_to_run_without_a_namespace(monkeypatch, capsys):
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["--router-url", "http://127.0.0.1:1"])
    assert exit_info.value.code == 2
    assert "--namespace" in capsys.readouterr().err


def test_cli_runs_until_terminated(kube, router, engines, router_url, engine_port, tmp_path):
    engines("127.0.0.2")
    kube.add_pod(_pod("engine-0", "127.0.0.2"))
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(kube.kubeconfig()))
    argv = [
        sys.executable,
        "-m",
        "trainer.k8s",
        "--router-url",
        router_url,
        "--namespace",
        NAMESPACE,
        "--label-selector",
        SELECTOR,
        "--engine-port",
        str(engine_port),
        "--interval",
        "0.2",
        "--kubeconfig",
        str(path),
    ]
    proc = _spawn(argv, tmp_path / "k8s.log")
    try:
        _wait_state(router, f"http://127.0.0.2:{engine_port}", "HEALTHY", timeout=60)
        proc.terminate()
        assert proc.wait(timeout=20) == 0
    finally:
        _kill(proc)
