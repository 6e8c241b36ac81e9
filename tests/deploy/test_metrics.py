"""Prometheus side of the deployment: each service's real /metrics passes `promtool check metrics`, the alert rules
and the compose Prometheus config pass `promtool check rules|config`, and the dashboard and rules name only
metrics some service registers.

promtool is Debian's (deploy/tools/get-promtool.sh extracts it from the prometheus package; no daemon runs).
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml
from prometheus_client import REGISTRY

from router.echo_upstream import EchoUpstream
from services.cli import SERVICES
from services.core.embedded_redis import EmbeddedRedis
from services.core.net import free_port, wait_http_ok
from services.core.tiny_model import build_tiny_model

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "slime.json"
RULES = REPO / "deploy" / "prometheus" / "alert-rules.yml"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
# Where each service's metrics are registered: every module of each `slime serve` service's package (a server
# imports some of them only once it starts), and the trainer's status endpoints, which the driver serves.
SERVICE_PACKAGES = ("services.rollout_engine", "router", "services.reward_model", "rollout_buffer")
TRAINER_METRICS_MODULE = "trainer.status"
METRIC_NAME = re.compile(r"\bslime_[a-z0-9_]+\b")
APT_UNAVAILABLE = 3


@pytest.fixture(scope="module")
def promtool() -> Path:
    result = subprocess.run(
        ["bash", str(REPO / "deploy" / "tools" / "get-promtool.sh")], capture_output=True, text=True
    )
    if result.returncode == APT_UNAVAILABLE:
        pytest.skip(f"promtool cannot be fetched without apt: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip())


def _promtool(promtool: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(promtool), *args], input=stdin, capture_output=True, cwd=REPO)


def test_alert_rules_pass_promtool(promtool):
    result = _promtool(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert b"SUCCESS: 4 rules found" in result.stdout


def test_prometheus_config_passes_promtool(promtool):
    result = _promtool(promtool, "check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_promtool_rejects_a_broken_rule(promtool, tmp_path):
    rules = yaml.safe_load(RULES.read_text())
    rules["groups"][0]["rules"][0]["expr"] = "max by (worker (slime_router_worker_state"
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    assert _promtool(promtool, "check", "rules", str(path)).returncode != 0


# ------------------------------------------------------------------------------------ every service's /metrics


class _EchoEngine:
    """An engine for the router to route to, so that its per-worker series exist."""

    def __init__(self) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            EchoUpstream(), host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        url = f"http://127.0.0.1:{self.port}"
        wait_http_ok(f"{url}/health_generate", timeout=30)
        return url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _serve(service: str, argv: list[str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "services.cli", "serve", service, *argv],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@pytest.fixture(scope="module")
def running_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Every `slime serve` service as a real process on loopback, each given some work so that its labelled
    series exist; the trainer's status server runs in this process."""
    tmp = tmp_path_factory.mktemp("services")
    ports = {name: free_port() for name in SERVICES}
    procs: list[subprocess.Popen] = []
    with EmbeddedRedis(dir=tmp / "redis") as redis, _EchoEngine() as engine_url:
        launches = {
            "router": lambda: ["--worker-urls", engine_url],
            "reward-model": lambda: [
                "--grpc-port",
                str(free_port()),
                "--rm-type",
                "math",
                "--num-workers",
                "1",
            ],
            "rollout-buffer": lambda: ["--grpc-port", str(free_port()), "--redis-url", redis.url],
            # The model is built while the other services start.
            "rollout-engine": lambda: [
                *("--hf-checkpoint", str(build_tiny_model(tmp / "model"))),
                *("--engine-backend", "builtin", "--num-threads", "1"),
            ],
        }
        try:
            for name, argv in launches.items():
                procs.append(_serve(name, [*argv(), "--port", str(ports[name])], tmp / f"{name}.log"))
            urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
            for name, url in urls.items():
                try:
                    wait_http_ok(f"{url}/health", timeout=120)
                except TimeoutError:
                    pytest.fail(f"{name} did not start:\n{(tmp / f'{name}.log').read_text()[-3000:]}")
            _give_work(urls)
            with _trainer_status() as trainer_url:
                yield {**urls, "trainer": trainer_url}
        finally:
            for proc in procs:
                proc.kill()
                proc.wait(timeout=10)


def _give_work(urls: dict[str, str]) -> None:
    with httpx.Client(timeout=60, trust_env=False) as http:
        generate = {"text": "1+1=", "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
        assert http.post(f"{urls['rollout-engine']}/generate", json=generate).is_success
        assert http.post(f"{urls['router']}/generate", json=generate).is_success
        reward = {"prompt": "1+1=", "response": "\\boxed{2}", "label": "2"}
        assert http.post(f"{urls['reward-model']}/reward", json=reward).json() == 1
        item = {
            "uid": "u-1",
            "instance_id": "i-1",
            "messages": [{"role": "user", "content": "hi"}],
            "reward": 1.0,
        }
        assert http.post(f"{urls['rollout-buffer']}/buffer/write", json=item).is_success
        assert http.post(f"{urls['rollout-buffer']}/buffer/write", content=b"{not json").status_code == 422


class _trainer_status:
    """The trainer's HTTP endpoints (what `slime train` serves on --port), with one rollout's metrics published."""

    def __enter__(self) -> str:
        from trainer.status import TrainerStatusServer

        args = argparse.Namespace(host="127.0.0.1", port=free_port(), run_id="metrics-check", auth_token=None)
        self.server = TrainerStatusServer(args)
        self.server.start()
        metrics = {
            "rollout/raw_reward": 0.5,
            "rollout/kl": 0.01,
            "perf/weight_sync_seconds": 1.5,
            "eval/math": 0.4,
        }
        self.server.update(rollout_id=3, weight_version=4, metrics=metrics)
        return f"http://127.0.0.1:{self.server.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.stop()


@pytest.mark.parametrize("service", [*SERVICES, "trainer"])
def test_metrics_endpoint_passes_promtool(running_services, promtool, service):
    response = httpx.get(f"{running_services[service]}/metrics", timeout=30, trust_env=False)
    assert response.status_code == 200
    assert "text/plain" in response.headers["content-type"]
    prefix = "slime_" + service.replace("-", "_") + "_"
    assert prefix in response.text, f"{service} exports no {prefix}* metric"
    result = _promtool(promtool, "check", "metrics", stdin=response.content)
    assert result.returncode == 0 and result.stdout == b"", result.stdout.decode() + result.stderr.decode()


def test_promtool_flags_a_badly_named_metric(promtool):
    exposition = (
        b"# HELP slime_bad_requests Requests.\n# TYPE slime_bad_requests counter\nslime_bad_requests 1\n"
    )
    result = _promtool(promtool, "check", "metrics", stdin=exposition)
    assert result.returncode != 0 and b"_total" in result.stdout + result.stderr


# ------------------------------------------------------------------------- queries name only exported metrics


def _series_names(family: Any) -> set[str]:
    """The sample names a metric family exposes, whatever labels its samples will have."""
    name = family.name
    if family.type == "counter":
        return {f"{name}_total", f"{name}_created"}
    if family.type == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"}
    if family.type == "summary":
        return {name, f"{name}_sum", f"{name}_count", f"{name}_created"}
    if family.type == "info":
        return {f"{name}_info"}
    return {name}


@pytest.fixture(scope="module")
def registered_metrics() -> set[str]:
    assert {module.rsplit(".", 1)[0] for module in SERVICES.values()} == set(SERVICE_PACKAGES)
    for package in SERVICE_PACKAGES:
        for module in pkgutil.walk_packages(importlib.import_module(package).__path__, f"{package}."):
            importlib.import_module(module.name)
    importlib.import_module(TRAINER_METRICS_MODULE)
    return {series for family in REGISTRY.collect() for series in _series_names(family)}


def _dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return queries


def _rule_queries() -> list[str]:
    return [rule["expr"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_registry_holds_every_service_prefix(registered_metrics):
    for service in [*SERVICES, "trainer"]:
        prefix = "slime_" + service.replace("-", "_") + "_"
        assert any(name.startswith(prefix) for name in registered_metrics), prefix
    assert "slime_http_requests_total" in registered_metrics


@pytest.mark.parametrize("source", ["dashboard", "alert rules"])
def test_queries_name_only_registered_metrics(registered_metrics, source):
    queries = _dashboard_queries() if source == "dashboard" else _rule_queries()
    named = {name for query in queries for name in METRIC_NAME.findall(query)}
    assert named, f"the {source} name no slime metric"
    assert named - registered_metrics == set()


def test_dashboard_covers_what_an_operator_watches():
    dashboard = json.loads(DASHBOARD.read_text())
    titles = {panel["title"] for panel in dashboard["panels"] if panel["type"] == "row"}
    assert titles == {
        "Rollout throughput",
        "Reward and accuracy",
        "Policy",
        "Engines",
        "Queues and lag",
        "Weight sync",
        "Errors",
    }
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
