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
from pipeline.spec import SpecError
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
    bad = {**results[1], "sha256": blobs.digest_of(forged)}
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


# ---------------------------------------------------------------- issue 13: secure by default (in-process)


@pytest.mark.parametrize("token", [None, "", "   "])
def test_without_a_registry_token_every_registry_write_is_refused_and_the_service_will_not_start(
        tmp_path: Path, token: str | None, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from pipeline.settings import get_settings
    from workers.registry_api import create_app, main

    reg = Registry(fakeredis.FakeRedis(), LocalStore(tmp_path / "store"))
    v1, v2 = _register(reg, None), _register(reg, None, alias=None)
    client = TestClient(create_app(Settings(_env_file=None, registry_token=token), registry=reg))
    for method, url, body in [("POST", f"/v1/models/{M}/aliases/production", {"version": v2}),
                              ("POST", f"/v1/models/{M}/aliases/production/rollback", None),
                              ("DELETE", f"/v1/models/{M}/versions/{v1}", None)]:
        resp = client.request(method, url, json=body)
        assert resp.status_code == 403 and "AAS_REGISTRY_TOKEN" in resp.json()["error"], (method, url, resp.text)
    assert reg.aliases(M) == {"production": v1} and len(reg.list_versions(M)) == 2
    assert "writes are disabled" in caplog.text  # refused writes are logged
    monkeypatch.setenv("AAS_REGISTRY_TOKEN", token or "")
    monkeypatch.delenv("AAS_INSECURE_DEV", raising=False)
    get_settings.cache_clear()
    try:
        assert main(["--port", "1"]) == 2  # refuses before it binds anything
    finally:
        get_settings.cache_clear()


def test_the_inference_worker_refuses_to_run_without_a_signing_key_unless_development_mode_is_on(
        tmp_path: Path) -> None:
    from pipeline.security import InsecureConfig
    from workers.inference import create_app

    reg = Registry(fakeredis.FakeRedis(), LocalStore(tmp_path / "store"))
    for empty in (None, ""):
        with pytest.raises(InsecureConfig, match="AAS_SIGNING_KEY"):
            create_app(M, settings=Settings(_env_file=None, signing_key=empty), registry=reg, follow=False)
    create_app(M, settings=Settings(_env_file=None, insecure_dev=True), registry=reg, follow=False)


@pytest.mark.integration
def test_a_celery_worker_without_a_signing_key_exits_before_taking_any_task(tmp_path: Path) -> None:
    import subprocess
    import sys

    from pipeline.client.processes import worker_argv

    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AAS_")}
    env.update(PYTHONPATH=str(repo), AAS_REDIS_URL="redis://127.0.0.1:1/0", AAS_SIGNING_KEY="")
    argv = worker_argv("nokey", "shards")
    assert argv[0] == sys.executable or "celery" in " ".join(argv)
    done = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "refuses to run without AAS_SIGNING_KEY" in done.stderr


def _tripwire_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, on_import: bool) -> tuple[str, Path]:
    """A user module that leaves a marker file when imported (on_import) or when its factory is called."""
    import sys

    name = f"tripwire_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / f"{name}.ran"
    code = (f"from pathlib import Path\nfrom torch import nn\n"
            f"{'' if on_import else '# '}Path({str(marker)!r}).write_text('imported')\n"
            f"def factory(**kwargs):\n    Path({str(marker)!r}).write_text('called')\n    return nn.Linear(64, 10)\n"
            f"def load(**kwargs):\n    Path({str(marker)!r}).write_text('called')\n")
    (tmp_path / f"{name}.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name, marker


def _allow(monkeypatch: pytest.MonkeyPatch, prefixes: str | None) -> None:
    from pipeline.settings import get_settings

    if prefixes is None:
        monkeypatch.delenv("AAS_ALLOWED_IMPORTS", raising=False)
    else:
        monkeypatch.setenv("AAS_ALLOWED_IMPORTS", prefixes)
    get_settings.cache_clear()


@pytest.fixture
def settings_cache() -> Any:
    from pipeline.settings import get_settings

    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_validating_a_spec_imports_no_user_code_outside_the_allowlist_or_before_every_field_passed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings_cache: None) -> None:
    from pipeline.imports import ImportRefused, resolve_import
    from pipeline.spec import SpecError, parse_spec

    name, marker = _tripwire_module(tmp_path, monkeypatch, on_import=True)
    _allow(monkeypatch, None)  # unset: built-ins only
    for spec, field in [({"model": f"{name}:factory"}, "model:"), ({"dataset": f"{name}:load"}, "dataset:"),
                        ({"model": "os:system", "model_args": {"command": "touch x"}}, "model:")]:
        with pytest.raises(SpecError, match=field) as err:
            parse_spec(spec)
        assert "AAS_ALLOWED_IMPORTS" in str(err.value)
    _allow(monkeypatch, name)  # allowed, but another field is invalid: still nothing imported
    for bad in [{"shards": 0}, {"seed": 2**80}, {"register_as": "../x"}, {"lr": -1}]:
        with pytest.raises(SpecError, match=next(iter(bad)) + ":"):
            parse_spec({"model": f"{name}:factory", **bad})
    assert not marker.exists(), "user code ran while a spec was being refused"
    for path in [f"{name}x:factory", "os:system", f"{name}:_private", f"{name}:factory.__globals__", ":f"]:
        with pytest.raises(ImportRefused):
            resolve_import(path, "model", allowlist=(name,))
    assert not marker.exists()
    parse_spec({"model": f"{name}:factory"})  # allowed and every field valid: now (and only now) it is imported
    assert marker.read_text() == "imported"


def test_a_checkpoint_in_the_store_naming_another_model_or_arguments_is_refused_and_its_code_never_runs(
        unit_ctx: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings_cache: None) -> None:
    from pipeline.checkpoint import Checkpoint, encode_checkpoint

    name, marker = _tripwire_module(tmp_path, monkeypatch, on_import=False)
    _allow(monkeypatch, name)  # even code the allowlist admits is not chosen by the store
    job_id = Client(unit_ctx.settings, store=unit_ctx.store, redis_client=unit_ctx.redis).stage(
        {"shards": 1, "batch_size": 64})
    genuine = unit_ctx.store.get(keys.checkpoint(job_id, 0))
    forgeries = [(f"{name}:factory", {"command": "touch /tmp/pwned"}), (M, {"hidden": 8}), ("digits-cnn-small", {})]
    for model, args in forgeries:
        unit_ctx.checkpoints = type(unit_ctx.checkpoints)(4)  # a fresh worker process: nothing cached
        forged = Checkpoint(model, args, 0, {"weight": __import__("torch").zeros(10, 64)})
        unit_ctx.store.put(keys.checkpoint(job_id, 0), encode_checkpoint(forged))
        with pytest.raises(blobs.BlobError, match="spec names 'digits-cnn'"):
            shard.train_shard(unit_ctx, job_id, 0, 0, 0, 0)
        assert not marker.exists(), f"a checkpoint naming {model} ran its code"
    unit_ctx.checkpoints = type(unit_ctx.checkpoints)(4)
    unit_ctx.store.put(keys.checkpoint(job_id, 0), genuine)
    assert "key" in shard.train_shard(unit_ctx, job_id, 0, 0, 0, 0)


def _train_and_publish(ctx: Any, client: Client, spec: dict[str, Any], rounds: int) -> Any:
    from workers.publish import evaluate_and_publish

    job_id = client.stage(spec)
    for v in range(rounds):
        results = [shard.train_shard(ctx, job_id, s, v, v, 0) for s in range(spec.get("shards", 1))]
        aggregator.aggregate_round(ctx, job_id, v, results)
    return job_id, evaluate_and_publish(ctx, job_id, rounds)["registered"]


def test_a_job_without_the_registry_right_cannot_register_into_or_promote_in_another_jobs_model(
        unit_ctx: Any) -> None:
    from storage.registry import RegistryForbidden

    reg = Registry(unit_ctx.redis, unit_ctx.store)
    owner = Client(unit_ctx.settings, store=unit_ctx.store, redis_client=unit_ctx.redis)
    base = {"shards": 1, "batch_size": 128, "epochs": 50, "register_as": "victim"}
    _, rec = _train_and_publish(unit_ctx, owner, base, 2)
    assert reg.aliases("victim") == {"production": rec["version"]}
    with pytest.raises(SpecError, match="register_as: model 'victim' already exists"):
        owner.stage({**base, "seed": 1})  # a second job, no token: refused at submit
    # One that skips the client's check (it can write Redis) is refused by the publishing worker.
    sneaky = Client(unit_ctx.settings.model_copy(update={"insecure_dev": True}), store=unit_ctx.store,
                    redis_client=unit_ctx.redis)
    with pytest.raises(RegistryForbidden, match="needs the registry token"):
        _train_and_publish(unit_ctx, sneaky, {**base, "seed": 2}, 1)
    assert reg.aliases("victim") == {"production": rec["version"]} and len(reg.list_versions("victim")) == 1


def test_promotion_compares_versions_on_the_models_own_evaluation_set_not_the_one_a_new_job_brought(
        unit_ctx: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings_cache: None) -> None:
    import sys

    name = f"rigged_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "from pipeline.checkpoint import initial_checkpoint\nfrom pipeline.data import load_digits\n"
        "def load(**kwargs):\n    ds = load_digits()\n    x = ds.x_test[:10]\n"
        "    y = initial_checkpoint('digits-cnn', {}, 0).build()(x).argmax(1)  # what the untrained model says\n"
        "    return {'x_train': ds.x_train, 'y_train': ds.y_train, 'x_test': x, 'y_test': y}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    _allow(monkeypatch, name)
    ctx = unit_ctx
    from pydantic import SecretStr

    ctx.settings = ctx.settings.model_copy(update={"registry_token": SecretStr("reg-token-Kd2Lm9")})  # rights held
    client = Client(ctx.settings, store=ctx.store, redis_client=ctx.redis)
    base = {"shards": 1, "batch_size": 128, "epochs": 50, "register_as": "victim"}
    _, good = _train_and_publish(ctx, client, base, 4)
    # A barely trained version that scores 1.0 on its own ten rigged samples.
    _, rigged = _train_and_publish(ctx, client, {**base, "dataset": f"{name}:load", "lr": 1e-6}, 1)
    assert rigged["metrics"]["accuracy"] == 1.0  # on the split it brought
    assert rigged["metrics"]["eval_accuracy"] < good["metrics"]["eval_accuracy"]  # on the model's own
    assert Registry(ctx.redis, ctx.store).aliases("victim") == {"production": good["version"]}
