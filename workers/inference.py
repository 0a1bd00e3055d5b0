"""Inference worker: serves one model through one alias and follows the registry's event stream.

A background follower reads the registry's stream from its last id (XREAD BLOCK, polling as the
fallback). On a change it resolves the alias, downloads and verifies the artifact, loads it, warms it
up and swaps it in with one reference assignment. A request grabs the (version, model) pair once, so
requests in flight finish on the version they started with, and every response names its version.
A failed load keeps the old version serving and is reported by /healthz and /metrics.
"""

from __future__ import annotations

import argparse
import logging
import math
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from pipeline.artifacts import LoadedArtifact, load_artifact
from pipeline.blobs import BlobError
from pipeline.models import ModelError, get_factory
from pipeline.security import require_signing_key
from pipeline.settings import Settings, get_settings
from storage.registry import Registry, RegistryError, VersionRecord
from workers.http_limits import BodyLimit, add_json_errors, error_responses
from workers.oip import Backend, oip_router

log = logging.getLogger("aas.inference")

# Per-sample input shape of the built-in architectures; a user factory may set ``input_shape``.
INPUT_SHAPES: dict[str, tuple[int, ...]] = {"digits-cnn": (1, 8, 8), "digits-cnn-small": (1, 8, 8)}
# Body cap per allowed input value: "-0.12345678901234568, " is 22 bytes, the longest a float32 prints to.
BYTES_PER_VALUE = 24
BODY_OVERHEAD_BYTES = 4096  # keys, brackets, whitespace


class PredictError(ValueError):
    """A request the model cannot answer; ``status`` is the HTTP status to send (400, 413, 422)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def input_shape(meta: dict[str, Any]) -> tuple[int, ...] | None:
    """The per-sample shape an artifact's model expects, or None when unknown (then any shape is tried)."""
    if isinstance(meta.get("input_shape"), list):
        return tuple(int(d) for d in meta["input_shape"])
    name = str(meta.get("model", ""))
    if name in INPUT_SHAPES:
        return INPUT_SHAPES[name]
    try:
        shape = getattr(get_factory(name), "input_shape", None)
    except ModelError:
        return None
    return tuple(shape) if shape else None


def _check_numbers(inputs: list[Any], max_values: int | None = None) -> None:
    stack: list[tuple[Any, str]] = [(inputs, "inputs")]
    values = 0
    while stack:
        obj, where = stack.pop()
        if isinstance(obj, list):
            values += len(obj)
            if max_values is not None and values > max_values:
                raise PredictError(413, f"more than {max_values} values in one request; send fewer samples")
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(obj))
        elif isinstance(obj, bool) or not isinstance(obj, (int, float)):
            raise PredictError(422, f"{where} is {type(obj).__name__} {obj!r}; inputs must be numbers")
        elif isinstance(obj, float) and not math.isfinite(obj):
            raise PredictError(422, f"{where} is {obj}; inputs must be finite numbers")


def to_batch(inputs: Any, shape: tuple[int, ...] | None, max_batch: int | None = None,
             max_values: int | None = None) -> torch.Tensor:
    """Validate a JSON batch and return a float32 tensor (B, *shape); flat rows are reshaped."""
    if not isinstance(inputs, list) or not inputs:
        raise PredictError(422, "inputs must be a non-empty list (a batch of samples)")
    if max_batch is not None and len(inputs) > max_batch:
        raise PredictError(413, f"batch of {len(inputs)} exceeds the limit of {max_batch}; split it")
    _check_numbers(inputs, max_values)
    try:
        x = torch.tensor(inputs, dtype=torch.float32)
    except (ValueError, TypeError, RuntimeError):
        raise PredictError(422, "inputs are ragged: every sample must have the same shape") from None
    if shape is None:
        return x
    want = "(B, " + ", ".join(map(str, shape)) + ")"
    flat = math.prod(shape)
    if tuple(x.shape[1:]) == shape:
        return x
    if x.dim() == 2 and x.shape[1] == flat:
        return x.reshape(x.shape[0], *shape)  # (B, flat) → (B, *shape)
    raise PredictError(422, f"inputs have shape {tuple(x.shape)}; this model expects {want} or (B, {flat})")


def predict_batch(
    loaded_model: LoadedArtifact | torch.nn.Module, inputs: Any, *, max_batch: int | None = None,
    max_values: int | None = None,
) -> dict[str, Any]:
    """Classify a batch: {"predictions": [class ids], "probabilities": [[p, ...], ...]}. Raises PredictError."""
    if isinstance(loaded_model, LoadedArtifact):
        model, meta = loaded_model.model, loaded_model.meta
    else:
        model, meta = loaded_model, {}
    x = inputs if isinstance(inputs, torch.Tensor) else to_batch(inputs, input_shape(meta), max_batch, max_values)
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            logits = model(x.to(device))  # (B, classes)
    except (RuntimeError, ValueError, TypeError) as e:
        raise PredictError(422, f"inputs of shape {tuple(x.shape)} do not fit the model: {e}") from None
    probs = torch.softmax(logits.float(), dim=-1)
    return {"predictions": probs.argmax(dim=-1).tolist(), "probabilities": probs.cpu().tolist()}


@dataclass(frozen=True)
class Served:
    """The unit that is swapped: one verified, loaded, warmed-up version."""

    record: VersionRecord
    loaded: LoadedArtifact
    loaded_at: float  # unix seconds

    @property
    def version(self) -> int:
        return self.record.version


class Metrics:
    """Prometheus metrics of one worker, in their own collector registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("aas_inference_requests", "Predict requests by HTTP status", ["status"], registry=r)
        self.latency = Histogram("aas_inference_latency_seconds", "Predict latency", registry=r)
        self.version = Gauge("aas_inference_served_version", "Version being served (0: none)", registry=r)
        self.swap = Histogram(
            "aas_inference_swap_seconds", "Resolve → fetch → verify → load → warm-up → swap", registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )  # fmt: skip
        self.load_failures = Counter("aas_inference_load_failures", "Versions refused or failed to load", registry=r)
        for status in ("200", "400", "401", "404", "413", "422", "503"):  # series exist before the first request
            self.requests.labels(status=status)
        r.register(PROCESS_COLLECTOR)


class ModelServer:
    """Holds the served version and brings it in line with the alias (``sync``)."""

    def __init__(
        self,
        registry: Registry,
        model: str,
        alias: str,
        *,
        device: str = "cpu",
        signing_key: bytes | None = None,
        metrics: Metrics | None = None,
        retry_failed_s: float = 30.0,
    ) -> None:
        self.registry, self.model, self.alias = registry, model, alias
        self.device, self.signing_key = device, signing_key
        self.metrics = metrics or Metrics()
        self.retry_failed_s = retry_failed_s
        self.last_error: dict[str, Any] | None = None
        self._current: Served | None = None
        self._previous: Served | None = None  # kept in memory: a rollback swaps back without a download
        self._failed: dict[tuple[int, str], float] = {}  # (version, sha256) → when it failed
        self._lock = threading.Lock()

    def current(self) -> Served | None:
        with self._lock:
            return self._current

    def sync(self) -> bool:
        """Serve the alias's current version. True when it swapped; a failed load keeps the old one."""
        rec = self.registry.resolve(self.model, self.alias)
        cur = self.current()
        if cur is not None and cur.version == rec.version and cur.record.sha256 == rec.sha256:
            return False
        failed_at = self._failed.get((rec.version, rec.sha256))
        if failed_at is not None and time.time() - failed_at < self.retry_failed_s:
            return False
        t0 = time.perf_counter()
        prev = self._previous
        try:
            if prev is not None and prev.version == rec.version and prev.record.sha256 == rec.sha256:
                served = prev
            else:
                served = self._load(rec)
        except (RegistryError, BlobError, PredictError) as e:
            self._failed[(rec.version, rec.sha256)] = time.time()
            self.last_error = {"version": rec.version, "error": str(e), "at": time.time()}
            self.metrics.load_failures.inc()
            log.error("keeping v%s: could not load %s v%d: %s", cur and cur.version, self.model, rec.version, e)
            return False
        with self._lock:
            self._previous, self._current = self._current, served
        self.metrics.version.set(served.version)
        self.metrics.swap.observe(time.perf_counter() - t0)
        log.info("now serving %s@%s = v%d", self.model, self.alias, served.version)
        return True

    def _load(self, rec: VersionRecord) -> Served:
        data = self.registry.fetch_artifact(self.model, rec.version)  # sha256 checked against the record
        loaded = load_artifact(data, rec.artifact_key, signing_key=self.signing_key, device=self.device)
        del data
        shape = input_shape(loaded.meta)
        if shape is not None:
            predict_batch(loaded, torch.zeros((2, *shape)))  # warm-up: a model that cannot run is refused
        return Served(record=rec, loaded=loaded, loaded_at=time.time())


class Follower(threading.Thread):
    """Follows the registry's event stream; polls every `poll_s` as the fallback and safety net."""

    def __init__(self, server: ModelServer, *, poll_s: float = 3.0, block_ms: int = 1000) -> None:
        super().__init__(name=f"follow-{server.model}@{server.alias}", daemon=True)
        self.server, self.poll_s, self.block_ms = server, poll_s, block_ms
        self.stop_event = threading.Event()

    def run(self) -> None:
        reg, last_id, last_sync = self.server.registry, None, 0.0
        while not self.stop_event.is_set():
            try:
                if last_id is None:  # take the stream position first, then load: no change can slip between
                    last_id = reg.latest_event_id()
                    self._sync()
                    last_sync = time.monotonic()
                events = reg.events_since(last_id, block_ms=self.block_ms)
                if events:
                    last_id = events[-1].id
                if any(e.model == self.server.model for e in events) or time.monotonic() - last_sync > self.poll_s:
                    self._sync()
                    last_sync = time.monotonic()
            except Exception as e:  # noqa: BLE001 - Redis down or a bug: keep serving, retry by polling
                log.warning("registry stream read failed (%s); polling every %.0fs", e, self.poll_s)
                self.stop_event.wait(self.poll_s)
                try:
                    self._sync()
                except Exception as e2:  # noqa: BLE001
                    log.warning("registry poll failed: %s", e2)

    def _sync(self) -> None:
        try:
            self.server.sync()
        except RegistryError as e:  # the alias or model does not exist (yet)
            self.server.last_error = {"version": None, "error": str(e), "at": time.time()}

    def stop(self) -> None:
        self.stop_event.set()


class PredictRequest(BaseModel):
    inputs: list[Any]
    probabilities: bool = False


def _err(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def create_app(
    model: str,
    alias: str = "production",
    *,
    settings: Settings | None = None,
    registry: Registry | None = None,
    follow: bool = True,
) -> FastAPI:
    """The worker's HTTP app. With `follow`, a follower thread runs for the app's lifetime."""
    s = settings or get_settings()
    key = require_signing_key(s, "the inference worker")
    if registry is None:
        import redis

        from storage.services import build_services

        r = redis.Redis.from_url(s.redis_url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30)
        registry = build_services(s, redis_conn=r).registry()
    server = ModelServer(registry, model, alias, device=pick_device(s.device), signing_key=key)
    metrics = server.metrics
    body_cap = BYTES_PER_VALUE * s.max_predict_values + BODY_OVERHEAD_BYTES

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        follower = Follower(server) if follow else None
        if follower:
            follower.start()
        yield
        if follower:
            follower.stop()
            follower.join(timeout=5)

    app = FastAPI(title=f"AaS inference: {model}@{alias}", version="1", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [
            "/".join(str(p) for p in e.get("loc", ()) if p != "body") + ": " + e.get("msg", "") for e in exc.errors()
        ]
        return _err(422, "invalid request: " + "; ".join(parts))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return _err(exc.status_code, str(exc.detail))

    app.add_middleware(BodyLimit, max_bytes=body_cap, read_timeout_s=s.request_read_timeout_s)
    add_json_errors(app)

    def _not_served(name: str) -> JSONResponse:
        return _err(404, f"this worker serves model {model!r} (alias {alias!r}), not {name!r}")

    @app.post("/v1/models/{name}/predict", responses=error_responses(404, 408, 413, 422, 503))
    def predict(name: str, req: PredictRequest) -> JSONResponse:
        t0 = time.perf_counter()
        resp = _predict(name, req)
        metrics.requests.labels(status=str(resp.status_code)).inc()
        metrics.latency.observe(time.perf_counter() - t0)
        return resp

    def _predict(name: str, req: PredictRequest) -> JSONResponse:
        if name != model:
            return _not_served(name)
        served = server.current()  # grabbed once: this request runs on this version, whatever swaps meanwhile
        if served is None:
            return _err(503, "no version loaded yet", last_error=server.last_error)
        try:
            out = predict_batch(served.loaded, req.inputs, max_batch=s.max_predict_batch,
                                max_values=s.max_predict_values)
        except PredictError as e:
            return _err(e.status, str(e), version=served.version)
        if not req.probabilities:
            out.pop("probabilities")
        return JSONResponse({"model": model, "alias": alias, "version": served.version, **out})

    @app.get("/v1/models/{name}", responses=error_responses(404, 503))
    def describe(name: str) -> JSONResponse:
        if name != model:
            return _not_served(name)
        served = server.current()
        if served is None:
            return _err(503, "no version loaded yet", last_error=server.last_error)
        rec = served.record
        return JSONResponse({
            "model": model, "alias": alias, "version": rec.version, "loaded_at": served.loaded_at,
            "sha256": rec.sha256, "artifact_key": rec.artifact_key, "codec": rec.codec, "metrics": rec.metrics,
            "input_shape": input_shape(served.loaded.meta), "last_error": server.last_error,
        })  # fmt: skip

    def _observe(status: int, seconds: float) -> None:
        metrics.requests.labels(status=str(status)).inc()
        metrics.latency.observe(seconds)

    app.include_router(oip_router(Backend(
        model=model, alias=alias, current=server.current, predict=predict_batch,
        sample_shape=lambda loaded: input_shape(loaded.meta), max_batch=s.max_predict_batch,
        max_values=s.max_predict_values, body_cap=body_cap, observe=_observe,
    )))  # fmt: skip  # the Open Inference Protocol v2 endpoints (/v2/...), see workers/oip.py

    @app.get("/healthz", responses=error_responses(503))
    def healthz() -> JSONResponse:
        served = server.current()
        body = {
            "status": "ok" if served else "loading", "model": model, "alias": alias,
            "version": served.version if served else None, "last_error": server.last_error,
        }  # fmt: skip
        return JSONResponse(body, status_code=200 if served else 503)

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workers.inference", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="registry model name to serve")
    p.add_argument("--alias", default="production", help="alias to follow (default: production)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    torch.set_num_threads(settings.torch_threads)
    uvicorn.run(create_app(args.model, args.alias, settings=settings), host=args.host, port=args.port,
                log_level=args.log_level, timeout_keep_alive=5, limit_concurrency=256)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
