"""The deployment files, checked without docker: compose services, commands, settings, ports, monitoring."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml is needed to read docker-compose.yml")

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
AAS_VAR = re.compile(r"\bAAS_[A-Z0-9_]+\b")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _command(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command") or []
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def _opt(cmd: list[str], flag: str) -> str | None:
    for i, arg in enumerate(cmd):
        if arg == flag and i + 1 < len(cmd):
            return cmd[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _known_queues() -> set[str]:
    import workers.app
    from workers.app import QUEUE_BEAT

    return {v for k, v in vars(workers.app).items() if k.startswith("QUEUE_")} | {QUEUE_BEAT}


def _setting_names() -> set[str]:
    from pipeline.settings import Settings

    return {f"AAS_{name.upper()}" for name in Settings.model_fields}


def _one_shot(svc: dict[str, Any]) -> bool:
    return str(svc.get("restart", "")) == "no"


def test_every_service_has_an_image_or_a_build(services: dict[str, dict[str, Any]]) -> None:
    assert services
    for name, svc in services.items():
        assert svc.get("image") or svc.get("build"), f"service {name} has neither image nor build"


def test_commands_run_real_modules_and_queues_that_exist(services: dict[str, dict[str, Any]]) -> None:
    from pipeline.client.cli import build_parser

    queues = _known_queues()
    subcommands = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    seen: set[str] = set()
    for name, svc in services.items():
        cmd = _command(svc)
        if not cmd or cmd[0] not in ("celery", "python", "aas"):
            continue
        if cmd[0] == "celery":
            module = _opt(cmd, "-A")
            assert module in ("workers.app", "workers.beat"), f"{name}: celery -A {module}"
            assert importlib.util.find_spec(module) is not None
            seen.add(module)
            if "worker" in cmd:
                q = _opt(cmd, "-Q")
                assert q, f"{name}: a worker must name its queues with -Q"
                assert set(q.split(",")) <= queues, f"{name}: unknown queue in {q!r} (known: {sorted(queues)})"
                assert "-E" in cmd, f"{name}: workers need task events (-E) for Flower"
            if "beat" in cmd:
                assert _opt(cmd, "-S") == "redbeat.RedBeatScheduler", f"{name}: beat must use RedBeat"
        elif cmd[0] == "python":
            module = _opt(cmd, "-m")
            assert module and importlib.util.find_spec(module) is not None, f"{name}: python -m {module}"
            seen.add(module)
        else:
            assert cmd[1] in subcommands, f"{name}: aas {cmd[1]} is not a command (known: {sorted(subcommands)})"
            seen.add(f"aas {cmd[1]}")
    assert {"workers.app", "workers.beat", "workers.registry_api", "workers.inference", "aas flower"} <= seen


def test_every_queue_has_a_worker_and_shard_workers_can_scale(services: dict[str, dict[str, Any]]) -> None:
    consumed = set()
    for svc in services.values():
        cmd = _command(svc)
        if cmd[:1] == ["celery"] and "worker" in cmd:
            consumed |= set((_opt(cmd, "-Q") or "").split(","))
    assert {"shards", "aggregate", "beat"} <= consumed
    assert "ports" not in services["shard-worker"], "a published host port would stop --scale shard-worker=N"
    assert _opt(_command(services["aggregator"]), "--pool") == "solo" or "--pool=solo" in _command(
        services["aggregator"])


def test_every_aas_variable_is_a_settings_field() -> None:
    text = "\n".join(line for line in COMPOSE.read_text().splitlines() if not line.lstrip().startswith("#"))
    names = set(AAS_VAR.findall(text))
    assert names, "compose configures nothing through AAS_ variables"
    unknown = names - _setting_names()
    assert not unknown, f"AAS_ variables with no field in pipeline.settings.Settings: {sorted(unknown)}"
    example = set(AAS_VAR.findall((REPO / ".env.example").read_text()))
    assert not example - _setting_names(), f".env.example names unknown settings: {sorted(example - _setting_names())}"
    defaulted = set(re.findall(r"\$\{(AAS_[A-Z0-9_]+):-", text))
    assert defaulted <= example, f"documented defaults missing from .env.example: {sorted(defaulted - example)}"


def test_service_environments_use_only_aas_variables(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        env = svc.get("environment") or {}
        keys = env if isinstance(env, dict) else [e.split("=", 1)[0] for e in env]
        for key in keys:
            third_party = ((name == "minio" and key.startswith("MINIO_"))  # their own names, fed from AAS_ vars
                           or (name == "grafana" and key.startswith("GF_")))
            assert key.startswith("AAS_") or third_party, f"{name}: {key} is not an AAS_ setting"
            value = str(env[key]) if isinstance(env, dict) else ""
            if third_party:
                assert "${AAS_" in value, f"{name}: {key} must come from an AAS_ variable"


def test_host_ports_are_unique(services: dict[str, dict[str, Any]]) -> None:
    bound: dict[str, str] = {}
    for name, svc in services.items():
        for spec in svc.get("ports", []):
            parts = str(spec).split(":")
            host = ":".join(parts[:-1]) if len(parts) > 1 else parts[0]
            port = host.rsplit(":", 1)[-1]
            assert port not in bound, f"host port {port} is published by both {bound.get(port)} and {name}"
            bound[port] = name


def test_every_long_running_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        if _one_shot(svc):
            continue
        hc = svc.get("healthcheck")
        assert hc and hc.get("test"), f"service {name} has no healthcheck"


def test_depends_on_names_existing_services(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        deps = svc.get("depends_on") or []
        for dep in deps if isinstance(deps, list) else deps.keys():
            assert dep in services, f"{name} depends on unknown service {dep}"
            if isinstance(deps, dict) and _one_shot(services[dep]):
                assert deps[dep].get("condition") == "service_completed_successfully"


def test_each_gpu_worker_is_one_process_pinned_to_its_own_device(services: dict[str, dict[str, Any]]) -> None:
    gpus = {name: svc for name, svc in services.items() if name.startswith("shard-worker-gpu")}
    assert len(gpus) >= 2, "per-device GPU services (shard-worker-gpu0, -gpu1, ...)"
    pinned: dict[str, str] = {}
    names: set[str] = set()
    for name, gpu in gpus.items():
        assert gpu["profiles"] == ["gpu"]
        [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert "count" not in device, f"{name}: `count: 1` is GPU 0 for every replica; pin device_ids"
        [dev] = device["device_ids"]
        assert dev not in pinned, f"{name} and {pinned.get(dev)} both reserve GPU {dev}"
        pinned[dev] = name
        cmd = _command(gpu)
        assert "--pool=solo" in cmd, "GPU workers must not fork after CUDA"
        worker = _opt(cmd, "-n")
        assert worker not in names, f"{name}: worker name {worker} is used twice"
        names.add(str(worker))
        assert gpu["environment"]["AAS_DEVICE"] == "cuda"


def test_the_gpu_launcher_pins_one_device_per_process() -> None:
    import os
    import subprocess

    out = subprocess.run([str(REPO / "ops" / "gpu-workers"), "3"], env={**os.environ, "AAS_GPU_WORKERS_DRY_RUN": "1"},
                         capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()
    assert len(out) == 3
    for i, line in enumerate(out):
        assert f"CUDA_VISIBLE_DEVICES={i} " in line and f"-n gpu{i}@%h" in line and "--pool=solo" in line
        assert f"AAS_METRICS_PORT={9100 + i} " in line and f"aas-gpu{i}.health" in line


def test_the_dockerfile_installs_cpu_torch_by_default_then_the_package() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    runs = [line for line in text.splitlines() if line.startswith("RUN ")]
    torch = next(i for i, line in enumerate(runs) if '--index-url "${TORCH_INDEX_URL}"' in line)
    package = next(i for i, line in enumerate(runs) if "pip install ." in line)
    assert torch < package, "torch must come from its index before `pip install .` pulls the default build"


def test_the_dashboard_is_valid_json_whose_queries_use_exported_metrics() -> None:
    dash = json.loads((REPO / "ops" / "grafana" / "aas-dashboard.json").read_text())
    assert dash["title"] and dash["panels"]
    from conftest import exposed_names, metrics_endpoints

    exported = set().union(*(exposed_names(text) for text in metrics_endpoints().values()))
    used = set()
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == "prometheus", "the provisioned data source's uid"
        for target in panel["targets"]:
            used |= set(re.findall(r"\b(?:aas|process)_[a-z0-9_]+", target["expr"]))
    assert used, "the dashboard queries no aas_ metric"
    assert not used - exported, f"dashboard queries metrics nobody exports at start-up: {sorted(used - exported)}"
    for needed in ("aas_versions_published_total", "aas_updates_rejected_total", "aas_shard_samples_per_second",
                   "aas_round_duration_seconds_bucket", "aas_update_staleness_versions_bucket",
                   "aas_model_version", "aas_model_accuracy_ratio", "aas_model_loss", "aas_queue_depth_messages",
                   "aas_inference_latency_seconds_bucket", "aas_inference_load_failures_total",
                   "process_resident_memory_bytes"):
        assert needed in used, f"no panel for {needed}"


def test_grafana_provisions_the_dashboard_and_the_prometheus_data_source(services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]
    mounts = " ".join(grafana["volumes"])
    assert "./ops/grafana/provisioning:/etc/grafana/provisioning" in mounts
    assert "./ops/grafana/aas-dashboard.json:/var/lib/grafana/dashboards/" in mounts
    [source] = yaml.safe_load((REPO / "ops/grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert source["uid"] == "prometheus" and source["url"] == "http://prometheus:9090"
    [provider] = yaml.safe_load((REPO / "ops/grafana/provisioning/dashboards/aas.yml").read_text())["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert "prometheus" in grafana["depends_on"]


def test_prometheus_scrapes_the_services_on_their_metrics_ports(services: dict[str, dict[str, Any]]) -> None:
    prom = yaml.safe_load((REPO / "ops" / "prometheus.yml").read_text())
    mounted = " ".join(services["prometheus"]["volumes"])
    assert "./ops/prometheus.yml:/etc/prometheus/prometheus.yml" in mounted
    for job in prom["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for host in sd["names"]:
                assert host in services, f"{job['job_name']}: scrapes unknown service {host}"
                assert str(services[host]["environment"]["AAS_METRICS_PORT"]) == str(sd["port"])
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host = target.split(":")[0]
                assert host == "localhost" or host in services, f"{job['job_name']}: unknown target {target}"


def test_the_beat_healthcheck_reads_redbeats_lock_key(services: dict[str, dict[str, Any]]) -> None:
    from storage import keys

    check = " ".join(services["beat"]["healthcheck"]["test"])
    assert f"'{keys.redbeat_prefix()}:lock'" in check, "the beat healthcheck must read RedBeat's lock key"


SECRETS = ("AAS_SIGNING_KEY", "AAS_REGISTRY_TOKEN", "AAS_S3_ACCESS_KEY", "AAS_S3_SECRET_KEY", "AAS_FLOWER_PASSWORD")


def test_no_secret_has_a_working_default_so_compose_stops_until_each_is_set() -> None:
    text = COMPOSE.read_text()
    for name in SECRETS:
        uses = re.findall(r"\$\{" + name + r"([^}]*)\}", text)
        assert uses, f"{name} is not configured in docker-compose.yml"
        for tail in uses:
            assert tail.startswith(":?"), f"${{{name}{tail}}}: a secret must be required (${{{name}:?message}})"
    example = dict(line.split("=", 1) for line in (REPO / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert all(example.get(name, "") == "" for name in SECRETS), ".env.example must not ship a usable secret"
def test_the_rabbitmq_profile_runs_a_broker_whose_consumer_timeout_exceeds_the_task_limit(
        services: dict[str, dict[str, Any]]) -> None:
    from pipeline.settings import Settings

    rabbit = services["rabbitmq"]
    assert rabbit["profiles"] == ["rabbitmq"]
    assert rabbit["healthcheck"]["test"]
    [conf] = [v.split(":")[0] for v in rabbit["volumes"] if v.startswith("./ops/")]
    settings = dict(line.split(" = ", 1) for line in (REPO / conf).read_text().splitlines()
                    if line and not line.startswith("#"))
    limits = Settings(_env_file=None)
    assert int(settings["consumer_timeout"]) > 1000 * (limits.task_time_limit_s + limits.hard_exit_grace_s)
    assert "AAS_BROKER_URL" in services["shard-worker"]["environment"]
    for name in ("shard-worker", "aggregator"):  # a worker that ends itself (hung task) is started again
        assert services[name]["restart"] == "unless-stopped"
