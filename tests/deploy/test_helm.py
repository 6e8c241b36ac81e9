"""The Helm chart: `helm lint` and `helm template` through Helm's own Go library (helm-python-sdk) for the default,
external-engines, GPU and external-Redis values, every manifest validated with `kubernetes-validate --strict`, and
what the rendered objects must say."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from tests.deploy.service_args import parse_command
from trainer.k8s import engine_url

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "slime"
VALUES_FILES = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE, NAMESPACE = "rl", "team-rl"
# Custom resources of the Prometheus Operator: kubernetes-validate has no schema for them (it warns and skips).
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
# Values the pods' environment gives the $(VAR) references in container args.
ENV_STAND_INS = {"$(SLIME_REDIS_URL)": "redis://redis:6379/0", "$(SLIME_AUTH_TOKEN)": "token"}


@pytest.fixture(scope="module")
def chart() -> helm.Chart:
    return helm.Chart.load(CHART)


def _values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def render(chart: helm.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [
        doc
        for path, text in sorted(manifests.items())
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, (
        f"expected one {kind} {name}, found {[d['metadata']['name'] for d in find(docs, kind)]}"
    )
    return found[0]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    spec = pod_spec(workload)
    return next(c for c in [*spec.get("initContainers", []), *spec["containers"]] if c["name"] == name)


def slime_argv(c: dict[str, Any]) -> list[str]:
    assert c["command"] == ["slime"]
    return [ENV_STAND_INS.get(a, a) for a in c["args"]]


def flag_values(argv: list[str], flag: str) -> list[str]:
    """The values after ``flag`` up to the next flag."""
    start = argv.index(flag) + 1
    end = next((i for i in range(start, len(argv)) if argv[i].startswith("--")), len(argv))
    return argv[start:end]


WORKLOADS = ("Deployment", "StatefulSet", "Job")


@pytest.mark.parametrize("values_file", VALUES_FILES, ids=lambda p: p.stem)
def test_helm_lint_is_clean(values_file):
    report = helm.lint(CHART, _values(values_file), strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [] and report["errors"] == []


def test_rendered_manifests_pass_kubernetes_schemas(chart, tmp_path):
    """Every document each values file renders, validated once (many are the same across values files)."""
    unique: dict[str, dict[str, Any]] = {}
    for values_file in VALUES_FILES:
        for doc in render(chart, _values(values_file)):
            unique.setdefault(json.dumps(doc, sort_keys=True), doc)
    docs = list(unique.values())
    crds = [d for d in docs if d["kind"] in CRD_KINDS]
    assert {d["kind"] for d in crds} == CRD_KINDS
    path = tmp_path / "manifests.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    # The oldest Kubernetes the chart admits (kubeVersion) and the newest schema the validator ships.
    for version in ("1.29.0", "1.37.0"):
        result = subprocess.run(
            [Path(sys.executable).parent / "kubernetes-validate", "--strict", "-k", version, str(path)],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        lines = [line for line in result.stdout.splitlines() if line.strip()]
        skipped = [line for line in lines if line.startswith("WARN")]
        assert len(skipped) == len(crds), skipped
        assert all(any(f"kind {kind} " in line for kind in CRD_KINDS) for line in skipped), skipped
        assert sum(line.startswith("INFO") for line in lines) == len(docs) - len(crds), result.stdout


@pytest.mark.parametrize("values_file", VALUES_FILES, ids=lambda p: p.stem)
def test_every_container_command_line_parses(chart, values_file):
    for workload in (d for d in render(chart, _values(values_file)) if d["kind"] in WORKLOADS):
        for c in pod_spec(workload)["containers"]:
            if c.get("command") == ["slime"]:
                parse_command(slime_argv(c))


@pytest.mark.parametrize("values_file", VALUES_FILES, ids=lambda p: p.stem)
def test_workloads_have_probes_pdbs_and_matching_services(chart, values_file):
    docs = render(chart, _values(values_file))
    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    pdb_selectors = [d["spec"]["selector"]["matchLabels"] for d in find(docs, "PodDisruptionBudget")]
    for workload in workloads:
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert any(s.items() <= labels.items() for s in pdb_selectors), workload["metadata"]["name"]
        for c in pod_spec(workload)["containers"]:
            for probe in ("livenessProbe", "readinessProbe"):
                assert probe in c, f"{workload['metadata']['name']}/{c['name']} has no {probe}"
                if c.get("command") == ["slime"]:
                    assert c[probe]["httpGet"]["path"] == "/health"
    for service in find(docs, "Service"):
        selector = service["spec"]["selector"]
        pods = [
            w for w in workloads if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(pods) == 1, service["metadata"]["name"]
        ports = {p["name"] for c in pod_spec(pods[0])["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports


def test_default_values_engines_are_statefulset_pods_the_router_and_sidecar_agree_on(chart):
    docs = render(chart, {})
    engines = one(docs, "StatefulSet", "rl-slime-engine")
    assert engines["spec"]["replicas"] == 2
    assert one(docs, "Service", engines["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
    router_argv = slime_argv(container(one(docs, "Deployment", "rl-slime-router"), "router"))
    assert router_argv[router_argv.index("--balance-abs-threshold") + 1] == "0"  # as slime starts its router

    # The sidecar derives each StatefulSet pod's URL from the hostname and subdomain Kubernetes gives it; it must
    # be the URL the router was started with, or the engine would be registered twice.
    sidecar = container(one(docs, "Job", "rl-slime-trainer"), "engine-pods")
    args = sidecar["args"]
    label_selector = args[args.index("--label-selector") + 1]
    expected = [
        engine_url(
            hostname=f"rl-slime-engine-{i}",
            subdomain=engines["spec"]["serviceName"],
            pod_ip="10.0.0.1",
            namespace=NAMESPACE,
            port=int(args[args.index("--engine-port") + 1]),
        )
        for i in range(2)
    ]
    assert flag_values(router_argv, "--worker-urls") == expected
    assert args[args.index("--router-url") + 1] == "http://rl-slime-router:30000"

    # The sidecar's selector matches the engine pods' labels and nothing else.
    selector = dict(term.split("=") for term in label_selector.split(","))
    assert selector.items() <= engines["spec"]["template"]["metadata"]["labels"].items()
    for workload in (d for d in docs if d["kind"] in WORKLOADS and d is not engines):
        assert not selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()
    assert sidecar["restartPolicy"] == "Always"

    # Only the trainer's service account may list and delete pods.
    role = one(docs, "Role", "rl-slime-engine-pods")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "delete"]}]
    binding = one(docs, "RoleBinding", "rl-slime-engine-pods")
    trainer_sa = pod_spec(one(docs, "Job", "rl-slime-trainer"))["serviceAccountName"]
    assert [s["name"] for s in binding["subjects"]] == [trainer_sa]
    for workload in (d for d in docs if d["kind"] in ("Deployment", "StatefulSet")):
        assert pod_spec(workload).get("automountServiceAccountToken") is False


def test_default_values_wire_every_service_to_the_others(chart):
    docs = render(chart, {})
    trainer = parse_command(slime_argv(container(one(docs, "Job", "rl-slime-trainer"), "trainer")))
    buffer = parse_command(
        slime_argv(container(one(docs, "Deployment", "rl-slime-rollout-buffer"), "rollout-buffer"))
    )
    services = {
        s["metadata"]["name"]: {p["name"]: p["port"] for p in s["spec"]["ports"]}
        for s in find(docs, "Service")
    }
    assert (
        trainer.router_url
        == buffer.router_url
        == f"http://rl-slime-router:{services['rl-slime-router']['http']}"
    )
    assert trainer.reward_url == buffer.reward_url == "http://rl-slime-reward-model:8000"
    assert trainer.reward_grpc_addr == buffer.reward_grpc_addr == "rl-slime-reward-model:8001"
    assert (
        trainer.rollout_buffer_url
        == f"http://rl-slime-rollout-buffer:{services['rl-slime-rollout-buffer']['http']}"
    )
    assert trainer.n_samples_per_prompt == buffer.n_samples_per_prompt == 4
    trainer_argv = slime_argv(container(one(docs, "Job", "rl-slime-trainer"), "trainer"))
    # --load names the same directory, so that a restarted trainer resumes (parse_args drops it while it is empty).
    assert trainer.save == "/shared/runs/quickstart/checkpoints"
    assert flag_values(trainer_argv, "--load") == [trainer.save]
    assert trainer.host == buffer.host == "0.0.0.0"
    # The default values train the quick-start task that the image carries (examples/ is copied to /app/examples).
    for path in (trainer.hf_checkpoint, trainer.prompt_data, buffer.hf_checkpoint):
        assert path.startswith("/app/examples/quickstart/"), path
        assert (REPO / path.removeprefix("/app/")).exists(), f"{path} is not in the image"

    redis = one(docs, "StatefulSet", "rl-slime-redis")
    redis_args = container(redis, "redis")["args"]
    assert redis_args[redis_args.index("--appendonly") + 1] == "yes"
    assert redis["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "8Gi"
    env = {e["name"]: e for e in container(one(docs, "Job", "rl-slime-trainer"), "trainer")["env"]}
    assert env["SLIME_REDIS_URL"]["value"] == "redis://rl-slime-redis:6379/0"
    assert env["SLIME_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "rl-slime-secrets",
        "key": "buffer-token",
    }
    assert "WANDB_API_KEY" not in env

    shared = one(docs, "PersistentVolumeClaim", "rl-slime-shared")
    assert shared["spec"]["accessModes"] == ["ReadWriteMany"]
    for workload in (one(docs, "Job", "rl-slime-trainer"), one(docs, "StatefulSet", "rl-slime-engine")):
        claims = [
            v["persistentVolumeClaim"]["claimName"]
            for v in pod_spec(workload)["volumes"]
            if "persistentVolumeClaim" in v
        ]
        assert claims == ["rl-slime-shared"]
    secret = one(docs, "Secret", "rl-slime-secrets")
    assert len(base64.b64decode(secret["data"]["buffer-token"])) == 40

    dashboard = one(docs, "ConfigMap", "rl-slime-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    committed = json.loads((REPO / "deploy" / "grafana" / "dashboards" / "slime.json").read_text())
    assert json.loads(dashboard["data"]["slime-dashboard.json"]) == committed
    assert find(docs, "ServiceMonitor") == [] and find(docs, "PrometheusRule") == []


def test_external_engines_mean_no_engine_pods(chart):
    docs = render(chart, _values(CHART / "ci" / "external-engines-values.yaml"))
    assert [d["metadata"]["name"] for d in find(docs, "StatefulSet")] == ["rl-slime-redis"]
    assert find(docs, "Role") == []
    router_argv = slime_argv(container(one(docs, "Deployment", "rl-slime-router"), "router"))
    assert flag_values(router_argv, "--worker-urls") == [
        "http://10.0.12.5:30001",
        "http://sglang-1.inference.svc:30000",
    ]
    job = one(docs, "Job", "rl-slime-trainer")
    assert "initContainers" not in pod_spec(job)
    trainer = parse_command(slime_argv(container(job, "trainer")))
    assert trainer.rollout_external is True
    # slime's own spelling: host:port, one per engine.
    assert trainer.rollout_external_engine_addrs == ["10.0.12.5:30001", "sglang-1.inference.svc:30000"]
    assert find(docs, "Secret") == []
    env = {e["name"]: e for e in container(job, "trainer")["env"]}
    assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "slime-credentials"

    monitor = one(docs, "ServiceMonitor", "rl-slime")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    scraped = [
        s
        for s in find(docs, "Service")
        if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    assert sorted(s["metadata"]["name"] for s in scraped) == [
        "rl-slime-reward-model",
        "rl-slime-rollout-buffer",
        "rl-slime-router",
        "rl-slime-trainer",
    ]
    assert all("http" in {p["name"] for p in s["spec"]["ports"]} for s in scraped)
    rules = one(docs, "PrometheusRule", "rl-slime")
    committed = yaml.safe_load((REPO / "deploy" / "prometheus" / "alert-rules.yml").read_text())
    assert rules["spec"] == committed


def test_gpu_values_request_gpus_on_tainted_nodes(chart):
    docs = render(chart, _values(CHART / "ci" / "gpu-values.yaml"))
    engines = one(docs, "StatefulSet", "rl-slime-engine")
    engine = container(engines, "engine")
    assert engine["image"] == "slime-rl-gpu:0.1.0"
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod_spec(engines)["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod_spec(engines)["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    args = parse_command(slime_argv(engine))
    assert args.engine_backend == "sglang"
    assert args.sglang_mem_fraction_static == 0.8
    assert (
        len(
            flag_values(
                slime_argv(container(one(docs, "Deployment", "rl-slime-router"), "router")), "--worker-urls"
            )
        )
        == 4
    )
    trainer = container(one(docs, "Job", "rl-slime-trainer"), "trainer")
    assert trainer["image"] == "slime-rl-gpu:0.1.0"
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == 8
    # The services that need no GPU stay on the CPU image.
    assert container(one(docs, "Deployment", "rl-slime-router"), "router")["image"] == "slime-rl:0.1.0"


def test_external_redis_comes_from_a_secret(chart):
    docs = render(chart, _values(CHART / "ci" / "external-redis-values.yaml"))
    assert find(docs, "StatefulSet", "rl-slime-redis") == [] and find(docs, "PersistentVolumeClaim") == []
    users = 0
    for workload in (d for d in docs if d["kind"] in WORKLOADS):
        for c in pod_spec(workload)["containers"]:
            env = {e["name"]: e for e in c["env"]}
            # Only the services that use Redis wait for its Secret; the engines and the reward model do not.
            assert ("--redis-url" in c["args"]) == ("SLIME_REDIS_URL" in env), c["name"]
            if "--redis-url" in c["args"]:
                users += 1
                secret_ref = env["SLIME_REDIS_URL"]["valueFrom"]["secretKeyRef"]
                assert secret_ref == {"name": "managed-redis", "key": "url"}
    assert users == 3
    job = one(docs, "Job", "rl-slime-trainer")
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in pod_spec(job)["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claims == ["team-rl-shared"]
    secret = one(docs, "Secret", "rl-slime-secrets")
    assert base64.b64decode(secret["data"]["buffer-token"]) == b"change-me-to-a-long-random-token"
    assert base64.b64decode(secret["data"]["wandb-api-key"]) == b"wandb-key-for-this-run"


def test_notes_tell_how_to_submit_trajectories_and_find_the_dashboard(chart):
    notes = chart.render({}, name=RELEASE, namespace=NAMESPACE, is_install=True)["slime/templates/NOTES.txt"]
    assert "svc/rl-slime-rollout-buffer 8889:8889" in notes
    assert "/buffer/write" in notes and "Authorization: Bearer $SLIME_TOKEN" in notes
    assert "get secret rl-slime-secrets" in notes
    assert "configmap rl-slime-dashboard" in notes


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"engines": {"replica": 3}}, "/engines"),
        ({"engines": {"external": ["engine-without-port"]}}, "/engines/external/0"),
        ({"trainer": {"mode": "fast"}}, "/trainer/mode"),
        ({"router": {"port": 70000}}, "/router/port"),
        ({"run": {"nSamplesPerPrompt": 0}}, "/run/nSamplesPerPrompt"),
    ],
)
def test_bad_values_are_refused_naming_the_field(values, field):
    report = helm.lint(CHART, values, strict=True)
    assert any(f"at '{field}'" in error for error in report["errors"]), report["errors"]


def test_external_redis_without_an_address_names_the_value(chart):
    with pytest.raises(helm.HelmRenderError, match=r"redis\.external\.url"):
        chart.render({"redis": {"bundled": False}}, name=RELEASE, namespace=NAMESPACE)
