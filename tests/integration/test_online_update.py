"""Online updates: inference workers follow an alias while serving, and never serve a bad version.

The first tests run the worker's app in-process (fakeredis); the integration test starts two real
worker processes on real Redis and publishes, corrupts and rolls back versions under load.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fakeredis
import httpx
import pytest
import redis
import torch
from fastapi.testclient import TestClient

from pipeline.artifacts import build_artifact
from pipeline.models import build_model, default_args
from pipeline.settings import Settings
from storage import keys
from storage.objectstore import LocalStore
from storage.registry import Registry
from workers.inference import create_app

M = "digits-cnn"
REPO = Path(__file__).resolve().parents[2]


def publish(reg: Registry, alias: str | None = "production", seed: int | None = None) -> int:
    """Register a digits-cnn version with random weights and (by default) point `alias` at it."""
    if seed is not None:
        torch.manual_seed(seed)
    data, stats = build_artifact(M, default_args(M), build_model(M).state_dict())
    rec = reg.register(
        M, data, codec="fp32+zstd", metrics={"accuracy": 0.1, "ratio": stats["ratio"]}, lineage={"job": "test"}
    )
    if alias:
        reg.set_alias(M, alias, rec.version)
    return rec.version


def corrupt(store: LocalStore, version: int) -> None:
    """Flip one bit of a registered artifact in place (the record's sha256 no longer matches)."""
    key = keys.artifact(M, version)
    data = bytearray(store.get(key))
    data[len(data) // 2] ^= 0x01
    store.put(key, bytes(data))


# ---------------------------------------------------------------- in-process worker (fakeredis)


@pytest.fixture
def local(tmp_path: Path) -> tuple[Registry, LocalStore]:
    store = LocalStore(tmp_path / "store")
    return Registry(fakeredis.FakeRedis(), store), store


def worker_app(reg: Registry, **settings: Any) -> tuple[TestClient, Any]:
    s = Settings(_env_file=None, **{"insecure_dev": True, **settings})  # unsigned on purpose: in-process, fakeredis
    app = create_app(M, "production", settings=s, registry=reg, follow=False)
    return TestClient(app), app.state.server


def test_a_worker_reports_unready_until_a_version_is_loaded(local: tuple[Registry, LocalStore]) -> None:
    reg, _ = local
    client, server = worker_app(reg)
    assert client.get("/healthz").status_code == 503
    assert client.post(f"/v1/models/{M}/predict", json={"inputs": [[0.0] * 64]}).status_code == 503
    v = publish(reg)
    assert server.sync() is True
    assert client.get("/healthz").json()["version"] == v
    assert client.get(f"/v1/models/{M}").json()["sha256"] == reg.get(M, v).sha256


def test_predict_validates_inputs_with_json_errors(local: tuple[Registry, LocalStore]) -> None:
    reg, _ = local
    client, server = worker_app(reg, max_predict_batch=4)
    v = publish(reg)
    server.sync()
    url = f"/v1/models/{M}/predict"
    flat = client.post(url, json={"inputs": [[0.5] * 64] * 3, "probabilities": True}).json()
    assert flat["version"] == v and flat["model"] == M and len(flat["predictions"]) == 3
    assert len(flat["probabilities"][0]) == 10
    image = client.post(url, json={"inputs": [[[[0.5] * 8] * 8]]}).json()
    assert image["predictions"] == flat["predictions"][:1] and "probabilities" not in image
    cases = [
        ({"inputs": [[0.0] * 64] * 5}, 413),
        ({"inputs": [[0.0] * 63]}, 422),
        ({"inputs": [[0.0] * 64, [0.0] * 10]}, 422),
        ({"inputs": [["a"] * 64]}, 422),
        ({"inputs": [[True] * 64]}, 422),
        ({"inputs": []}, 422),
        ({"inputs": "zeros"}, 422),
        ({"input": [[0.0] * 64]}, 422),
    ]
    for body, status in cases:
        resp = client.post(url, json=body)
        assert resp.status_code == status, (body, resp.text)
        assert isinstance(resp.json()["error"], str)
    assert client.post(url, content=b'{"inputs": [[NaN]]}').status_code == 422
    assert client.post(url, content=b"{broken").status_code == 422
    assert client.post("/v1/models/other/predict", json={"inputs": [[0.0] * 64]}).status_code == 404
    assert 'aas_inference_requests_total{status="413"} 1.0' in client.get("/metrics").text


def test_a_failed_load_keeps_the_old_version_serving(local: tuple[Registry, LocalStore]) -> None:
    reg, store = local
    client, server = worker_app(reg)
    good = publish(reg)
    server.sync()
    bad = publish(reg, alias=None)
    corrupt(store, bad)
    reg.set_alias(M, "production", bad)
    assert server.sync() is False
    assert server.current().version == good
    health = client.get("/healthz").json()
    assert health["version"] == good and health["last_error"]["version"] == bad
    assert "does not match its record" in health["last_error"]["error"]
    assert client.post(f"/v1/models/{M}/predict", json={"inputs": [[0.0] * 64]}).json()["version"] == good
    assert "aas_inference_load_failures_total 1.0" in client.get("/metrics").text


def test_a_rollback_swaps_back_to_the_version_kept_in_memory(local: tuple[Registry, LocalStore]) -> None:
    reg, store = local
    _, server = worker_app(reg)
    v1 = publish(reg)
    server.sync()
    publish(reg)
    server.sync()
    corrupt(store, v1)  # the rollback must not need the store: v1 is still loaded
    reg.rollback(M, "production")
    assert server.sync() is True and server.current().version == v1


# ---------------------------------------------------------------- real processes on real Redis


@pytest.fixture
def redis_db(redis_url: str) -> Iterator[redis.Redis]:
    """The test's own Redis db (tests/conftest.py: flushed before and after, one per pytest-xdist process)."""
    r = redis.Redis.from_url(redis_url, socket_connect_timeout=2)
    yield r
    r.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Worker:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"worker {self.url} not ready after {timeout_s}s:\n{self.log.read_text()[-3000:]}")

    def served(self) -> int | None:
        resp = httpx.get(f"{self.url}/v1/models/{M}", timeout=5)
        return resp.json()["version"] if resp.status_code == 200 else None

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/healthz", timeout=5).json()


@pytest.fixture
def start_worker(tmp_path: Path, redis_url: str) -> Iterator[Callable[[], Worker]]:
    """Start inference worker processes on free loopback ports; all are stopped at teardown."""
    started: list[Worker] = []
    env = {
        **os.environ,
        "AAS_REDIS_URL": redis_url,
        "AAS_STORE_ROOT": str(tmp_path / "store"),
        "AAS_TORCH_THREADS": "1",
        "AAS_INSECURE_DEV": "1",  # unsigned on purpose: these workers test following, not signatures
        "PYTHONPATH": str(REPO),
    }

    def start() -> Worker:
        port = free_port()
        log = tmp_path / f"worker-{port}.log"
        cmd = [sys.executable, "-m", "workers.inference", "--model", M, "--port", str(port), "--log-level", "warning"]
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        worker = Worker(f"http://127.0.0.1:{port}", proc, log)
        started.append(worker)
        return worker

    yield start
    for w in started:
        w.proc.terminate()
    for w in started:
        try:
            w.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()


def wait_for(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.1)


@pytest.mark.integration
def test_workers_follow_the_alias_under_load_and_never_serve_a_corrupt_version(
    tmp_path: Path, redis_db: redis.Redis, start_worker: Callable[[], Worker]
) -> None:
    store = LocalStore(tmp_path / "store")
    reg = Registry(redis_db, store)
    published = {publish(reg, seed=0)}
    workers = [start_worker(), start_worker()]  # started after v1: each loads it before reporting ready
    for w in workers:
        w.wait_ready()

    stop = threading.Event()
    results: list[tuple[int, int | None]] = []  # (status, version); status 0 = transport error
    inputs = [[random.random() for _ in range(64)] for _ in range(4)]

    def load(i: int) -> None:
        with httpx.Client(timeout=10) as client:
            for n in range(20_000):  # bounded; normally stopped by `stop`
                if stop.is_set():
                    return
                w = workers[(i + n) % len(workers)]
                try:
                    resp = client.post(f"{w.url}/v1/models/{M}/predict", json={"inputs": inputs})
                    results.append((resp.status_code, resp.json().get("version")))
                except httpx.HTTPError:
                    results.append((0, None))
                time.sleep(0.005)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(9):
            published.add(publish(reg))
            time.sleep(0.1)
        bad = publish(reg, alias=None)
        corrupt(store, bad)
        reg.set_alias(M, "production", bad)
        wait_for(lambda: all((w.health()["last_error"] or {}).get("version") == bad for w in workers), 20, "refusal")
        assert reg.rollback(M, "production").version == max(published)
        for _ in range(10):
            published.add(publish(reg))
            time.sleep(0.1)
        final = reg.resolve(M, "production").version
        wait_for(lambda: all(w.served() == final for w in workers), 30, f"both workers on v{final}")
        time.sleep(0.3)  # a little load on the final version
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)

    assert len(published) == 20 and final == max(published)
    failures = [r for r in results if r[0] != 200]
    assert len(results) > 50 and failures == []
    served = {v for _, v in results}
    assert served <= published and bad not in served
    assert len(served) > 1  # swaps happened while requests were flowing
    assert [w.served() for w in workers] == [final, final]
    assert "aas_inference_load_failures_total 1.0" in httpx.get(f"{workers[0].url}/metrics").text
