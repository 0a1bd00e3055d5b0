"""Security: signatures on gradients and artifacts, the registry token, no pickle, no secrets where they leak.

The first tests run in-process (fakeredis, a local folder); the rest start real `celery worker`s on the
machine's Redis and an S3 server (conftest's `workers` fixture). Flower's basic auth is covered by
tests/integration/test_flower.py.
"""

from __future__ import annotations

import os
import pickle
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fakeredis
import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from pipeline import blobs
from pipeline.artifacts import build_artifact
from pipeline.client import Client
from pipeline.models import build_model, default_args
from pipeline.settings import Settings
from storage import keys
from storage.objectstore import LocalStore
from storage.registry import Registry
from workers import aggregator, shard

M = "digits-cnn"
KEY = b"sign-key-Jx8Rt4"  # distinctive, so a leak is found by grep
integration = [pytest.mark.integration, pytest.mark.slow]


# ---------------------------------------------------------------- signatures (in-process)


def _signed_ctx(unit_ctx: Any) -> Any:
    from pydantic import SecretStr

    unit_ctx.settings = unit_ctx.settings.model_copy(update={"signing_key": SecretStr(KEY.decode())})
    return unit_ctx


@pytest.mark.parametrize("forger_key, reason", [(None, "unsigned"), (b"wrong-key", "bad signature")])
def test_the_aggregator_refuses_an_unsigned_or_wrongly_signed_gradient_and_the_recomputed_shard_is_applied(
        unit_ctx: Any, forger_key: bytes | None, reason: str) -> None:
    ctx = _signed_ctx(unit_ctx)
    job_id = Client(ctx.settings, store=ctx.store, redis_client=ctx.redis).stage({"shards": 2, "batch_size": 16})
    results = [shard.train_shard(ctx, job_id, s, 0, 0, 0) for s in range(2)]
    genuine = blobs.decode(ctx.store.get(results[1]["key"]), "genuine", signing_key=KEY)
    forged = blobs.encode(genuine.tensors, genuine.meta, signing_key=forger_key)  # same numbers, not our key
    ctx.store.put(results[1]["key"], forged)
    bad = {**results[1], "sha256": blobs.sha256_hex(forged)}
    with pytest.raises(aggregator.RoundIncomplete, match=reason) as err:
        aggregator.aggregate_round(ctx, job_id, 0, [results[0], bad])
    assert err.value.recompute == [1] and ctx.jobs.get(job_id).version == 0
    shard.train_shard(ctx, job_id, 1, 0, 0, 1)  # the retry's recompute, by a worker holding the key
    assert aggregator.aggregate_round(ctx, job_id, 0, [results[0], bad]).committed
    assert keys.gradient_identity(job_id, 1, 0, 1) in ctx.jobs.consumed(job_id, 1)


def _register(reg: Registry, artifact_key: bytes | None, alias: str | None = "production") -> int:
    data, _ = build_artifact(M, default_args(M), build_model(M).state_dict(), signing_key=artifact_key)
    rec = reg.register(M, data, codec="fp32+zstd", metrics={"accuracy": 0.5}, lineage={"job": "test"})
    if alias:
        reg.set_alias(M, alias, rec.version)
    return rec.version


@pytest.mark.parametrize("forger_key, reason", [(None, "unsigned"), (b"wrong-key", "bad signature")])
def test_the_inference_worker_refuses_an_unsigned_or_wrongly_signed_artifact_and_keeps_serving_the_old_one(
        tmp_path: Path, forger_key: bytes | None, reason: str) -> None:
    from workers.inference import create_app

    r, store = fakeredis.FakeRedis(), LocalStore(tmp_path / "store")
    good = _register(Registry(r, store, signing_key=KEY), KEY)
    settings = Settings(_env_file=None, signing_key=KEY.decode())
    app = create_app(M, settings=settings, registry=Registry(r, store, signing_key=KEY), follow=False)
    server, client = app.state.server, TestClient(app)
    assert server.sync() and server.current().version == good
    # Someone with registry write access but without the key publishes a version and promotes it.
    forged = _register(Registry(r, store, signing_key=forger_key), forger_key)
    assert server.sync() is False
    assert server.current().version == good
    health = client.get("/healthz").json()
    assert health["version"] == good and health["last_error"]["version"] == forged
    assert reason in health["last_error"]["error"]
    resp = client.post(f"/v1/models/{M}/predict", json={"inputs": [[0.0] * 64]})
    assert resp.status_code == 200 and resp.json()["version"] == good


# ---------------------------------------------------------------- the registry token (in-process)


def test_registry_write_endpoints_need_the_bearer_token_and_reads_do_not(tmp_path: Path) -> None:
    from workers.registry_api import create_app

    token = "reg-token-Kd2Lm9"
    reg = Registry(fakeredis.FakeRedis(), LocalStore(tmp_path / "store"))
    v1, v2 = _register(reg, None), _register(reg, None, alias=None)
    client = TestClient(create_app(Settings(_env_file=None, registry_token=token), registry=reg))
    writes: list[tuple[str, str, dict[str, Any] | None]] = [
        ("POST", f"/v1/models/{M}/aliases/production", {"version": v2}),
        ("POST", f"/v1/models/{M}/aliases/production/rollback", None),
        ("DELETE", f"/v1/models/{M}/versions/{v2}", None),
    ]
    wrong = [{}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {token}"},
             {"Authorization": f"Bearer {token}x"}, {"Authorization": f"Bearer {token[:-1]}"}]
    for method, url, body in writes:
        for headers in wrong:
            resp = client.request(method, url, json=body, headers=headers)
            assert resp.status_code == 401, (method, url, headers, resp.text)
            assert resp.headers["www-authenticate"] == "Bearer" and token not in resp.text
    assert reg.aliases(M) == {"production": v1}, "a refused write changed the registry"
    for path in ["/v1/models", f"/v1/models/{M}", f"/v1/models/{M}/versions/production", "/healthz"]:
        assert client.get(path).status_code == 200, path
    auth = {"Authorization": f"Bearer {token}"}
    assert client.post(f"/v1/models/{M}/aliases/production", json={"version": v2}, headers=auth).json()["version"] == v2
    assert client.post(f"/v1/models/{M}/aliases/production/rollback", headers=auth).json()["version"] == v1
    assert client.delete(f"/v1/models/{M}/versions/{v2}", headers=auth).status_code == 200


# ---------------------------------------------------------------- real workers


def _wait_event(client: Client, job_id: str, kind: str, contains: str, timeout_s: float = 90) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for e in client.jobs.events(job_id, count=1000):
            if e["kind"] == kind and contains in e.get("reason", ""):
                return e
        time.sleep(0.2)
    raise AssertionError(f"no {kind!r} event containing {contains!r} for job {job_id}: {client.jobs.events(job_id)}")


@pytest.mark.integration
@pytest.mark.slow
def test_a_shard_worker_without_the_key_has_its_gradients_refused_and_the_job_finishes_on_a_keyed_one(
        workers: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.settings import get_settings

    monkeypatch.setenv("AAS_SIGNING_KEY", KEY.decode())  # the client signs version 0 with it
    get_settings.cache_clear()
    keyed = {"AAS_SIGNING_KEY": KEY.decode(), "AAS_TASK_MAX_RETRIES": "30"}
    workers("aggregator", "aggregate", extra_env=keyed)
    group = workers("rogue", extra_env={"AAS_SIGNING_KEY": ""})  # reads unverified, writes unsigned blobs
    client = Client()
    job_id = client.submit({"shards": 2, "epochs": 1, "batch_size": 512})
    event = _wait_event(client, job_id, "rejected", "unsigned, but a signing key is configured")
    group.kill("rogue")
    workers("keyed", extra_env=keyed)
    final = client.wait(job_id, timeout=120)
    assert final["status"] == "succeeded", final.get("error")
    assert final["version"] == final["total_rounds"]
    base, refused = int(event["version"]), int(event["shard"])
    consumed = client.jobs.consumed(job_id, base + 1)
    assert keys.gradient_identity(job_id, refused, base, 0) not in consumed  # the unsigned attempt 0 ...
    assert any(keys.parse_identity(i).shard == refused for i in consumed)  # ... replaced by a recompute
    for version in range(1, final["version"] + 1):
        for ident in client.jobs.consumed(job_id, version):
            g = keys.parse_identity(ident)
            blob_key = keys.gradient(job_id, g.version, g.shard, g.attempt)
            if client.store.exists(blob_key):  # every applied blob still stored verifies against the key
                blobs.decode(client.store.get(blob_key), blob_key, signing_key=KEY)


def _send_raw(settings: Settings, body: bytes, content_type: str, task: str = "aas.train_shard") -> str:
    from workers.app import app_for

    task_id = str(uuid.uuid4())
    headers = {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "parent_id": None, "group": None,
               "argsrepr": "()", "kwargsrepr": "{}", "retries": 0, "eta": None, "expires": None, "origin": "test"}
    with app_for(settings).connection_for_write() as conn:
        conn.Producer().publish(body, exchange="", routing_key="shards", content_type=content_type,
                                content_encoding="binary", headers=headers)
    return task_id


class _Tripwire:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def _wait_log(path: Path, text: str, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        log = path.read_text(errors="replace") if path.exists() else ""
        if text in log:
            return log
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path.name} after {timeout_s} s:\n{log[-3000:]}")


@pytest.mark.integration
@pytest.mark.slow
def test_a_real_worker_refuses_a_pickle_message_and_malformed_task_arguments_and_keeps_serving(
        workers: Any, tmp_path: Path) -> None:
    from workers.app import app_for

    group = workers("w1", "shards,aggregate")
    settings = Settings()
    capp = app_for(settings)
    marker = tmp_path / "unpickled"
    _send_raw(settings, pickle.dumps(_Tripwire(marker)), "application/x-python-serialize")
    log = group.logdir / "w1.log"
    _wait_log(log, "ContentDisallowed")
    malformed: list[tuple[str, list[Any], dict[str, Any]]] = [
        ("aas.train_shard", [], {}),  # missing arguments
        ("aas.train_shard", ["job", "not-a-number", 0, 0], {}),  # wrong types
        ("aas.train_shard", ["no-such-job", 0, 0, 0], {}),  # no such job
        ("aas.train_shard", ["j", 0, 0, 0], {"evil": "x"}),  # unknown keyword
        ("aas.aggregate", ["not-a-list", "no-such-job", 0], {}),
        ("aas.aggregate", [[{"shard": "x", "key": "../../etc/passwd"}], "no-such-job", "v"], {}),
        ("aas.apply_update", [{"key": "/etc/passwd", "shard": 0, "step": 0, "version": 0}, "no-such-job"], {}),
        ("aas.apply_update", ["garbage", "no-such-job"], {}),
    ]
    results = [capp.send_task(name, args=args, kwargs=kwargs) for name, args, kwargs in malformed]
    capp.send_task("aas.no_such_task", args=[1])
    for (name, args, _), res in zip(malformed, results, strict=True):
        res.get(timeout=30, propagate=False)
        assert res.state in ("FAILURE", "SUCCESS"), (name, args, res.state)
        if res.state == "SUCCESS":  # refused by the task itself, as data
            assert "ignored" in res.result or "failed" in res.result, (name, args, res.result)
    assert not marker.exists(), "a pickle body was deserialized"
    assert group.procs["w1"].poll() is None, "the worker died"
    client = Client(settings)
    job_id = client.submit({"shards": 1, "epochs": 1, "batch_size": 512})  # and it still trains
    assert client.wait(job_id, timeout=60)["status"] == "succeeded"
    _wait_log(log, "Received unregistered task")


# ---------------------------------------------------------------- secrets never leak


SECRETS = {"AAS_S3_SECRET_KEY": "s3-secret-Zq7Wp1", "AAS_SIGNING_KEY": KEY.decode(),
           "AAS_REGISTRY_TOKEN": "reg-token-Kd2Lm9"}


def _dump_redis(url: str) -> str:
    """Every key and value in the test's Redis db, as text: job state, events, results, registry, queues."""
    r = redis.Redis.from_url(url)
    read: dict[str, Callable[[bytes], Any]] = {
        "string": r.get, "hash": r.hgetall, "list": lambda k: r.lrange(k, 0, -1), "set": r.smembers,
        "zset": lambda k: r.zrange(k, 0, -1), "stream": r.xrange,
    }  # fmt: skip
    out = [f"{key!r} {read.get(r.type(key).decode(), lambda _: None)(key)!r}" for key in r.scan_iter(count=1000)]
    return "\n".join(out)


@pytest.mark.integration
@pytest.mark.slow
def test_secrets_never_appear_in_logs_task_arguments_results_metrics_or_health(
        workers: Any, monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    from pipeline.client.processes import free_port, wait_for_workers, worker_argv
    from pipeline.settings import get_settings
    from workers.app import app_for
    from workers.inference import create_app as inference_app
    from workers.registry_api import create_app as registry_app

    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    port = free_port()
    group = workers.group  # type: ignore[attr-defined]
    argv = [a if a != "--loglevel=INFO" else "--loglevel=DEBUG" for a in worker_argv("w1", "shards,aggregate")]
    group.start("w1", argv, {**SECRETS, "AAS_METRICS_PORT": str(port)})
    settings = Settings()
    wait_for_workers(app_for(settings), ["w1"], timeout_s=90)
    client = Client(settings)
    job_id = client.submit({"shards": 2, "epochs": 1, "batch_size": 512, "register_as": "leakcheck"})
    assert client.wait(job_id, timeout=90)["status"] == "succeeded"

    texts: dict[str, str] = {
        "worker log": (group.logdir / "w1.log").read_text(errors="replace"),
        "worker argv": (Path(f"/proc/{group.procs['w1'].pid}/cmdline").read_bytes().decode(errors="replace")),
        "redis (job state, events, task args and results, registry)": _dump_redis(redis_url),
        "worker /metrics": httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text,
        "settings repr": repr(settings) + str(settings.model_dump()),
        "job record in the store": client.store.get(keys.job_record(job_id)).decode(),
    }
    served = TestClient(inference_app("leakcheck", settings=settings, follow=False))
    served.app.state.server.sync()
    for path in ["/metrics", "/healthz", "/v1/models/leakcheck"]:
        texts[f"inference {path}"] = served.get(path).text
    texts["inference 503/422 bodies"] = served.post("/v1/models/leakcheck/predict", json={"inputs": "x"}).text
    api = TestClient(registry_app(settings))
    texts["registry reads"] = api.get("/v1/models/leakcheck").text + api.get("/healthz").text
    texts["registry 401"] = api.post("/v1/models/leakcheck/aliases/production", json={"version": 1}).text
    assert "aas_" in texts["worker /metrics"]
    assert "leakcheck" in texts["inference /healthz"]
    for where, text in texts.items():
        for name, secret in SECRETS.items():
            assert secret not in text, f"{name} appears in the {where}"
    assert os.environ["AAS_SIGNING_KEY"] == KEY.decode()  # the secrets were really in effect ...
    blobs.decode(client.store.get(keys.checkpoint(job_id, 1)), "v1", signing_key=KEY)  # ... and used
