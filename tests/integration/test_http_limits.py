"""Bounded requests against real uvicorn servers on loopback: body caps by bytes actually read (chunked
included), auth before the body, read timeouts, a cap on values, JSON 4xx for every client error, and an
OpenAPI schema that declares its security and statuses (issue 13, attacks 1, 3, 4 and 7)."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import uvicorn
from fastapi.testclient import TestClient

from pipeline.artifacts import build_artifact
from pipeline.client.processes import free_port
from pipeline.models import build_model, default_args
from pipeline.settings import Settings
from storage.objectstore import LocalStore
from storage.registry import Registry

pytestmark = pytest.mark.integration

M = "digits-cnn"
TOKEN = "limits-token-Qw3"
MiB = 1024 * 1024


def _registry(root: Path) -> Registry:
    reg = Registry(fakeredis.FakeRedis(), LocalStore(root))
    data, _ = build_artifact(M, default_args(M), build_model(M).state_dict())
    rec = reg.register(M, data, codec="fp32+zstd", metrics={"accuracy": 0.5}, lineage={"job": "limits"})
    reg.set_alias(M, "production", rec.version)
    return reg


def inference_app(root: Path, **settings: Any) -> Any:
    from workers.inference import create_app

    s = Settings(_env_file=None, insecure_dev=True, **settings)  # unsigned on purpose: limits, not signatures
    app = create_app(M, settings=s, registry=_registry(root), follow=False)
    assert app.state.server.sync()
    return app


def registry_app(root: Path, **settings: Any) -> Any:
    from workers.registry_api import create_app

    return create_app(Settings(_env_file=None, registry_token=TOKEN, **settings), registry=_registry(root))


@contextmanager
def serve(app: Any) -> Iterator[int]:
    """The app on a real uvicorn server in a thread (as `python -m workers.…` runs it); yields the port."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _response(sock: socket.socket, timeout_s: float = 15) -> tuple[int, dict[str, Any]]:
    sock.settimeout(timeout_s)
    raw = b""
    while b"\r\n\r\n" not in raw or len(raw.split(b"\r\n\r\n", 1)[1]) < _length(raw):
        chunk = sock.recv(65536)
        if not chunk:
            break
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body[: _length(raw)] or b"{}")


def _length(raw: bytes) -> int:
    for line in raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def push_chunked(port: int, path: str, total: int, headers: str = "") -> tuple[int, dict[str, Any], int]:
    """POST `total` bytes as a chunked body (no Content-Length), stopping when the server answers or stops
    reading. Returns (status, JSON body, bytes the server took in before it answered)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 f"Transfer-Encoding: chunked\r\n{headers}\r\n".encode())
    chunk = b"[" + b"0," * (MiB // 2 - 1) + b"0"  # 1 MiB of JSON numbers per chunk
    sent = 0
    sock.settimeout(2)
    try:
        while sent < total and not select.select([sock], [], [], 0)[0]:
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            sent += len(chunk)
    except (TimeoutError, BrokenPipeError, ConnectionResetError):
        pass  # the server stopped reading: what it answered is below
    status, body = _response(sock)
    sock.close()
    return status, body, sent


@pytest.mark.parametrize("service", ["inference", "registry"])
def test_a_chunked_body_without_content_length_is_cut_off_at_the_cap_not_read_to_its_end(
        tmp_path: Path, service: str) -> None:
    if service == "inference":
        app, path, auth = inference_app(tmp_path / "s"), f"/v1/models/{M}/predict", ""
    else:
        app, path, auth = registry_app(tmp_path / "s"), f"/v1/models/{M}/aliases/production", \
            f"Authorization: Bearer {TOKEN}\r\n"
    with serve(app) as port:
        status, body, sent = push_chunked(port, path, 200 * MiB, auth)
    assert status == 413 and "exceeds the limit" in body["error"]
    # The socket buffers on loopback hold a few MiB; the server read no further than its cap.
    assert sent < 40 * MiB, f"the server took in {sent / MiB:.0f} MiB of a 200 MiB body before refusing it"


def test_the_registry_refuses_an_unauthorized_write_before_reading_its_body(tmp_path: Path) -> None:
    with serve(registry_app(tmp_path / "s")) as port:
        status, body, sent = push_chunked(port, f"/v1/models/{M}/aliases/production", 150 * MiB)
        declared = socket.create_connection(("127.0.0.1", port), timeout=10)
        declared.sendall(f"POST /v1/models/{M}/aliases/production HTTP/1.1\r\nHost: t\r\n"
                         f"Content-Length: {150 * MiB}\r\n\r\n".encode())
        status2, body2 = _response(declared)
    assert status == 401 and "Bearer" in body["error"] and sent < 40 * MiB
    assert status2 == 401  # auth first: a declared 150 MB body is not even looked at


def test_a_body_that_arrives_too_slowly_is_answered_408_and_the_connection_freed(tmp_path: Path) -> None:
    with serve(inference_app(tmp_path / "s", request_read_timeout_s=1.0)) as port:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(f"POST /v1/models/{M}/predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     "Content-Length: 1000\r\n\r\n{\"inputs\": [".encode())
        t0 = time.monotonic()
        status, body = _response(sock, timeout_s=8)
        waited = time.monotonic() - t0
    assert status == 408 and "did not arrive" in body["error"] and waited < 5


def test_a_predict_request_over_the_value_cap_is_refused_before_it_becomes_a_tensor(tmp_path: Path) -> None:
    client = TestClient(inference_app(tmp_path / "s", max_predict_values=1000))
    one_long_row = client.post(f"/v1/models/{M}/predict", json={"inputs": [[0.0] * 1500]})
    assert one_long_row.status_code == 413 and "values" in one_long_row.json()["error"]
    too_many_rows = client.post(f"/v1/models/{M}/predict", json={"inputs": [[0.0] * 64] * 20})
    assert too_many_rows.status_code == 413
    declared = client.post(f"/v1/models/{M}/predict", content=b"0" * 100_000,
                           headers={"content-type": "application/json"})
    assert declared.status_code == 413 and "exceeds the limit" in declared.json()["error"]
    assert client.post(f"/v1/models/{M}/predict", json={"inputs": [[0.0] * 64] * 15}).status_code == 200


def test_every_client_error_is_a_json_4xx_including_odd_unicode_digits_in_a_path(tmp_path: Path) -> None:
    reg = TestClient(registry_app(tmp_path / "r"), raise_server_exceptions=False)
    inf = TestClient(inference_app(tmp_path / "i"), raise_server_exceptions=False)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    cases = [
        (reg, "GET", f"/v1/models/{M}/versions/%C2%B2", None, {}),  # "²".isdigit() is True; int("²") fails
        (reg, "GET", f"/v1/models/{M}/versions/%D9%A3", None, {}),  # Arabic-Indic three
        (reg, "GET", "/v1/models/%00/versions/1", None, {}),
        (reg, "DELETE", f"/v1/models/{M}/versions/%C2%B2", None, auth),
        (reg, "POST", f"/v1/models/{M}/aliases/production", "{", auth),
        (reg, "POST", f"/v1/models/{M}/aliases/production", '{"version": 99}', auth),
        (inf, "POST", f"/v1/models/{M}/predict", "not json", {}),
        (inf, "POST", f"/v1/models/{M}/predict", '{"inputs": [[1e999]]}', {}),
        (inf, "GET", "/no/such/path", None, {}),
    ]
    for client, method, path, body, headers in cases:
        resp = client.request(method, path, content=body, headers={"content-type": "application/json", **headers})
        assert 400 <= resp.status_code < 500, (method, path, resp.status_code, resp.text)
        assert isinstance(resp.json().get("error"), str), (method, path, resp.text)


def test_the_openapi_schemas_declare_the_bearer_scheme_and_every_error_status(tmp_path: Path) -> None:
    reg = TestClient(registry_app(tmp_path / "r")).get("/openapi.json").json()
    schemes = reg["components"]["securitySchemes"]
    assert any(s.get("scheme") == "bearer" for s in schemes.values())
    for path, ops in reg["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"])
            if method in ("post", "delete"):
                assert op.get("security"), f"{method} {path} declares no security"
                assert {"401", "403", "404", "409", "413", "422"} <= codes, (method, path, codes)
            elif "{name}" in path:
                assert {"404", "422"} <= codes, (method, path, codes)
    inf = TestClient(inference_app(tmp_path / "i")).get("/openapi.json").json()
    predict = inf["paths"]["/v1/models/{name}/predict"]["post"]["responses"]
    assert {"200", "404", "408", "413", "422", "503"} <= set(predict)
