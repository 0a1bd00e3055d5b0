"""Every /metrics endpoint, as served at start-up: valid for Prometheus, per role, series pre-created."""

from __future__ import annotations

import subprocess
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import exposed_names, metrics_endpoints
from prometheus_client.parser import text_string_to_metric_families


@pytest.fixture(scope="module")
def endpoints() -> dict[str, str]:
    return metrics_endpoints()


def test_every_endpoint_parses_and_exports_process_metrics(endpoints: dict[str, str]) -> None:
    for name, text in endpoints.items():
        families = {f.name for f in text_string_to_metric_families(text)}
        assert "process_resident_memory_bytes" in families and "process_cpu_seconds" in families, name


def test_promtool_check_metrics_finds_nothing_to_fix(endpoints: dict[str, str], promtool: str) -> None:
    for name, text in endpoints.items():
        done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), \
            f"{name}: promtool check metrics:\n{done.stdout}{done.stderr}"


def test_each_role_exports_only_its_own_metrics(endpoints: dict[str, str]) -> None:
    shard, agg = exposed_names(endpoints["shard-worker"]), exposed_names(endpoints["aggregator"])
    assert "aas_shard_tasks_total" in shard and not any(n.startswith(("aas_versions", "aas_updates")) for n in shard)
    assert "aas_versions_published_total" in agg and not any(n.startswith("aas_shard_") for n in agg)
    assert "aas_queue_depth_messages" in agg and "aas_queue_depth_messages" not in shard


def test_labelled_series_exist_at_zero_before_anything_happens(endpoints: dict[str, str]) -> None:
    from pipeline.reasons import REJECT_REASONS

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(endpoints["aggregator"]) for s in f.samples}
    # Present (other tests in this process may already have counted some: the counters are process-wide).
    for reason in REJECT_REASONS:
        assert ("aas_updates_rejected_total", (("reason", reason),)) in samples, reason
    for mode in ("sync", "async"):
        assert ("aas_versions_published_total", (("mode", mode),)) in samples
        assert ("aas_updates_applied_total", (("mode", mode),)) in samples
    assert samples[("aas_state_up", ())] == 1
    inference = {(s.name, tuple(s.labels.items())) for f in text_string_to_metric_families(endpoints["inference"])
                 for s in f.samples}
    assert ("aas_inference_requests_total", (("status", "200"),)) in inference
    assert ("aas_inference_load_failures_total", ()) in inference


def test_byte_counters_name_their_unit_last(endpoints: dict[str, str]) -> None:
    names = set().union(*(exposed_names(t) for t in endpoints.values()))
    assert {"aas_shard_up_bytes_total", "aas_shard_down_bytes_total", "aas_aggregator_in_bytes_total",
            "aas_aggregator_out_bytes_total"} <= names
    ok_endings = ("bytes_total", "_created", "_bucket", "_sum", "_count")
    assert not [n for n in names if n.startswith("aas_") and "bytes_" in n and not n.endswith(ok_endings)]


class _Registry:
    def __init__(self) -> None:
        rec = lambda v, acc, loss: SimpleNamespace(version=v, metrics={"accuracy": acc, "loss": loss})  # noqa: E731
        self.versions = [rec(1, 0.5, 1.2), rec(2, 0.9, 0.3), rec(3, 0.8, 0.4)]

    def list_models(self) -> list[str]:
        return ["digits-cnn"]

    def list_versions(self, model: str) -> list[Any]:
        return self.versions

    def aliases(self, model: str) -> dict[str, int]:
        return {"production": 2, "canary": 1}


def test_the_aggregator_reads_queue_depth_and_each_models_version_accuracy_loss(fake_redis: Any) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from workers.metrics import PRIORITY_SEP, StateCollector

    fake_redis.rpush("shards", b"a", b"b")
    fake_redis.rpush(f"shards{PRIORITY_SEP}6", b"c")
    services = SimpleNamespace(redis=fake_redis, registry=_Registry)
    reg = CollectorRegistry()
    reg.register(StateCollector(lambda: services, ("shards", "aggregate")))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(generate_latest(reg).decode()) for s in f.samples}
    assert samples[("aas_queue_depth_messages", (("queue", "shards"),))] == 3
    assert samples[("aas_queue_depth_messages", (("queue", "aggregate"),))] == 0
    prod = (("alias", "production"), ("model", "digits-cnn"))
    latest = (("alias", "latest"), ("model", "digits-cnn"))
    assert samples[("aas_model_version", prod)] == 2 and samples[("aas_model_version", latest)] == 3
    assert samples[("aas_model_accuracy_ratio", prod)] == 0.9 and samples[("aas_model_loss", latest)] == 0.4
    assert ("aas_model_version", (("alias", "canary"), ("model", "digits-cnn"))) not in samples


def test_a_redis_that_does_not_answer_still_yields_a_scrape(fake_redis: Any) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from workers.metrics import StateCollector

    def broken() -> Any:
        raise ConnectionError("redis down")

    reg = CollectorRegistry()
    reg.register(StateCollector(broken, ("shards",)))
    assert "aas_state_up 0.0" in generate_latest(reg).decode()


def test_a_worker_serves_the_roles_of_the_queues_it_consumes() -> None:
    from workers.metrics import ROLE_AGGREGATOR, ROLE_SHARD, roles_for_queues

    assert roles_for_queues(["shards"]) == {ROLE_SHARD}
    assert roles_for_queues(["aggregate", "beat"]) == {ROLE_AGGREGATOR}
    assert roles_for_queues(["shards", "aggregate"]) == {ROLE_SHARD, ROLE_AGGREGATOR}
