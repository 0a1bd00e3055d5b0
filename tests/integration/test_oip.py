"""Open Inference Protocol v2: Triton's own HTTP client against a running inference worker process.

The worker is a real `python -m workers.inference` process on real Redis and an S3 server (moto), serving
digits-cnn versions trained here on the digits data set; predictions are compared with the trained
module's own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import torch

from pipeline.artifacts import build_artifact
from pipeline.client.processes import free_port
from pipeline.data import load_digits
from pipeline.models import build_model, default_args
from pipeline.settings import Settings
from storage.objectstore import open_store
from storage.registry import Registry

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.integration

M = "digits-cnn"
REPO = Path(__file__).resolve().parents[2]
MAX_BATCH = 16  # the worker's AAS_MAX_PREDICT_BATCH: small, so the limits are cheap to reach


def train(epochs: int, seed: int = 0) -> torch.nn.Module:
    """digits-cnn trained in this process (plain SGD, a few seconds on one core)."""
    torch.manual_seed(seed)
    ds = load_digits()
    model = build_model(M)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(epochs):
        for idx in torch.randperm(ds.n_train).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(ds.x_train[idx]), ds.y_train[idx]).backward()
            opt.step()
    return model.eval()


def publish(reg: Registry, model: torch.nn.Module) -> int:
    data, _ = build_artifact(M, default_args(M), model.state_dict())
    rec = reg.register(M, data, codec="fp32+zstd", metrics={}, lineage={"job": "test-oip"})
    reg.set_alias(M, "production", rec.version)
    return rec.version


@dataclass
class Worker:
    url: str  # host:port, as tritonclient takes it
    proc: subprocess.Popen[bytes]
    log: Path

    def client(self) -> httpclient.InferenceServerClient:
        return httpclient.InferenceServerClient(self.url, connection_timeout=10, network_timeout=30)

    def wait_live(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://{self.url}/v2/health/live", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"worker {self.url} not live after {timeout_s}s:\n{self.log.read_text()[-3000:]}")

    def served(self) -> int | None:
        resp = httpx.get(f"http://{self.url}/v2/models/{M}", timeout=5)
        return int(resp.json()["versions"][0]) if resp.status_code == 200 else None


@pytest.fixture
def registry(services_env: dict[str, str]) -> Iterator[Registry]:
    settings = Settings(_env_file=None)
    r = redis.Redis.from_url(settings.redis_url)
    yield Registry(r, open_store(settings))
    r.close()


@pytest.fixture
def worker(services_env: dict[str, str], tmp_path: Path) -> Iterator[Worker]:
    """One inference worker process following digits-cnn@production; stopped at teardown."""
    port = free_port()
    env = {**os.environ, **services_env, "AAS_TORCH_THREADS": "1", "AAS_MAX_PREDICT_BATCH": str(MAX_BATCH),
           "PYTHONPATH": str(REPO)}
    log = tmp_path / "worker.log"
    cmd = [sys.executable, "-m", "workers.inference", "--model", M, "--port", str(port), "--log-level", "warning"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    w = Worker(f"127.0.0.1:{port}", proc, log)
    yield w
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_for(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.1)


def infer_input(x: np.ndarray, datatype: str = "FP32", binary: bool = False) -> httpclient.InferInput:
    inp = httpclient.InferInput("input", list(x.shape), datatype)
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def test_triton_client_sees_health_readiness_and_metadata_of_a_running_worker(
    worker: Worker, registry: Registry
) -> None:
    worker.wait_live()
    client = worker.client()
    assert client.is_server_live()
    assert not client.is_server_ready() and not client.is_model_ready(M)  # nothing published yet
    v = publish(registry, train(epochs=1))
    wait_for(client.is_server_ready, 30, "the worker to load v1")
    assert client.is_model_ready(M) and client.is_model_ready(M, str(v))
    assert not client.is_model_ready(M, str(v + 1)) and not client.is_model_ready("other")

    server = client.get_server_metadata()
    assert server["name"] == "aas" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata(M)
    assert meta == client.get_model_metadata(M, str(v))
    assert meta["name"] == M and meta["versions"] == [str(v)]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]} == {
        "predictions": ("INT64", [-1]), "probabilities": ("FP32", [-1, 10])}  # fmt: skip
    with pytest.raises(InferenceServerException, match="unknown model 'other'") as e:
        client.get_model_metadata("other")
    assert e.value.status() == "404"


def test_triton_client_infers_digits_with_the_trained_models_own_predictions(
    worker: Worker, registry: Registry
) -> None:
    model = train(epochs=3)
    v = publish(registry, model)
    worker.wait_live()
    client = worker.client()
    wait_for(lambda: client.is_model_ready(M), 30, "the worker to load the trained version")
    x = load_digits().x_test[:MAX_BATCH]  # (16, 1, 8, 8) real digits rows
    with torch.inference_mode():
        probs = torch.softmax(model(x), dim=-1).numpy()  # (16, 10)
    want = probs.argmax(axis=1)
    assert (want == load_digits().y_test[:MAX_BATCH].numpy()).mean() > 0.8  # a trained model, not noise

    rows = x.numpy().reshape(MAX_BATCH, 64)
    requests = [
        ("JSON FP32 (B, 64)", infer_input(rows), None),
        ("binary FP32 (B, 1, 8, 8)", infer_input(x.numpy(), binary=True), None),
        ("JSON FP64", infer_input(rows.astype(np.float64), "FP64"), None),
        ("one version pinned", infer_input(rows), str(v)),
    ]
    for what, inp, version in requests:
        outputs = [httpclient.InferRequestedOutput("predictions", binary_data=False),
                   httpclient.InferRequestedOutput("probabilities", binary_data=True)]
        result = client.infer(M, [inp], model_version=version or "", request_id=f"req-{what}", outputs=outputs)
        np.testing.assert_array_equal(result.as_numpy("predictions"), want, err_msg=what)
        np.testing.assert_allclose(result.as_numpy("probabilities"), probs, atol=1e-6, err_msg=what)
        resp = result.get_response()
        assert resp["id"] == f"req-{what}" and resp["model_version"] == str(v)
        assert resp["parameters"] == {"version": v, "alias": "production"}

    # INT64 inputs are converted to fp32: the raw pixel counts 0..16 of the digits, as integers.
    ints = np.rint(rows * 4).astype(np.int64)
    result = client.infer(M, [infer_input(ints, "INT64")])  # no outputs named: all, in binary (Triton's default)
    with torch.inference_mode():
        want_ints = model(torch.tensor(ints, dtype=torch.float32).reshape(-1, 1, 8, 8)).argmax(-1).numpy()
    np.testing.assert_array_equal(result.as_numpy("predictions"), want_ints)
    assert result.as_numpy("probabilities").shape == (MAX_BATCH, 10)


def test_a_pinned_version_answers_while_held_and_fails_clearly_once_the_alias_moves(
    worker: Worker, registry: Registry
) -> None:
    v1 = publish(registry, train(epochs=1, seed=1))
    worker.wait_live()
    client = worker.client()
    wait_for(lambda: worker.served() == v1, 30, f"the worker to serve v{v1}")
    rows = load_digits().x_test[:4].numpy().reshape(4, 64)

    pinned: list[tuple[str, int | None]] = []  # ("ok", version) or ("404", None), in order
    stop = threading.Event()

    def pinned_load() -> None:
        c = worker.client()  # a client per thread (gevent-based connections are not shared across threads)
        for _ in range(5_000):  # bounded; normally stopped by `stop`
            if stop.is_set():
                return
            try:
                r = c.infer(M, [infer_input(rows)], model_version=str(v1))
                pinned.append(("ok", r.get_response()["parameters"]["version"]))
            except InferenceServerException as e:
                assert e.status() == "404" and f"holds version {v1 + 1}" in e.message(), e
                pinned.append(("404", None))
            time.sleep(0.005)

    t = threading.Thread(target=pinned_load)
    t.start()
    try:
        wait_for(lambda: len(pinned) >= 10, 30, "pinned requests on v1")
        v2 = publish(registry, train(epochs=2, seed=1))
        wait_for(lambda: worker.served() == v2, 30, f"the worker to serve v{v2}")
        n_at_swap = len(pinned)
        wait_for(lambda: len(pinned) >= n_at_swap + 10, 30, "pinned requests after the swap")
    finally:
        stop.set()
        t.join(timeout=30)

    outcomes = [o for o, _ in pinned]
    first_error = outcomes.index("404")
    assert first_error >= 10 and set(outcomes[first_error:]) == {"404"}  # answered while held, then refused
    assert {v for _, v in pinned[:first_error]} == {v1}  # a pinned request never got another version
    with pytest.raises(InferenceServerException, match=f"version '{v1}' is not served here") as e:
        client.infer(M, [infer_input(rows)], model_version=str(v1))
    assert e.value.status() == "404"
    assert client.infer(M, [infer_input(rows)], model_version=str(v2)).get_response()["model_version"] == str(v2)
    assert client.infer(M, [infer_input(rows)]).get_response()["parameters"]["version"] == v2  # follows the alias


def test_bad_requests_get_the_protocols_error_bodies_and_status_codes(worker: Worker, registry: Registry) -> None:
    publish(registry, train(epochs=1))
    worker.wait_live()
    client = worker.client()
    wait_for(lambda: client.is_model_ready(M), 30, "the worker to load v1")
    cases = [
        (infer_input(np.zeros((1, 64), np.int32), "INT32"), "400", "datatype 'INT32'"),
        (infer_input(np.zeros((1, 63), np.float32)), "400", "expects [B, 1, 8, 8] or [B, 64]"),
        (infer_input(np.zeros((MAX_BATCH + 1, 64), np.float32), binary=True), "413", "exceeds the limit of 16"),
    ]
    for inp, status, message in cases:
        with pytest.raises(InferenceServerException) as e:
            client.infer(M, [inp])
        assert e.value.status() == status and message in e.value.message(), e.value

    url = f"http://{worker.url}/v2/models/{M}/infer"
    good = {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}
    raw_cases: list[tuple[bytes | dict[str, object], int, str]] = [
        (b"{not json", 400, "not valid JSON"),
        ({"inputs": [{**good, "name": "pixels"}]}, 400, "unknown input 'pixels'"),
        ({"inputs": [{**good, "data": [0.0] * 63}]}, 400, "63 values; its shape needs 64"),
        ({"inputs": [{**good, "data": ["0"] * 64}]}, 400, "its values must be numbers"),
        ({"inputs": [good], "outputs": [{"name": "logits"}]}, 400, "unknown output 'logits'"),
        ({"inputs": [{**good, "shape": [MAX_BATCH, 1_000_000]}]}, 413, "values exceed the limit of 262144"),
    ]
    for body, status, message in raw_cases:
        resp = httpx.post(url, content=body) if isinstance(body, bytes) else httpx.post(url, json=body)
        assert resp.status_code == status and message in resp.json()["error"], (body, resp.text)
        assert list(resp.json()) == ["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap is on the bytes actually read
        for _ in range(160):  # 10 MiB, above the body cap (24 B × AAS_MAX_PREDICT_VALUES + 4 KiB ≈ 6 MiB)
            yield b" " * 65_536
    resp = httpx.post(url, content=chunks())
    assert resp.status_code == 413 and "exceeds the limit" in resp.json()["error"]
    assert client.is_server_ready()  # and it keeps serving
