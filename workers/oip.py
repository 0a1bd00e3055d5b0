"""Open Inference Protocol v2 (the KServe / Triton "v2" REST protocol) for the inference worker.

Two halves: pure translation between the protocol's JSON (and its binary tensor extension) and tensors
(`parse_infer`, `infer_response`, `model_metadata`), and a FastAPI router (`oip_router`) that wires it to
the worker through a small injected `Backend`, so this module does not import `workers.inference`.

The model has one input, ``input`` (B, *sample shape), and two outputs: ``predictions`` INT64 (B,) and
``probabilities`` FP32 (B, classes). FP32, FP64 and INT64 inputs are accepted and converted to fp32.
Version semantics: ``/v2/models/{name}`` is the version the worker serves (it follows an alias);
``/v2/models/{name}/versions/{v}`` answers only while the worker holds version v, and 404s once the alias
has moved past it, so a client can pin a version during a rollout and never get another one silently.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

INPUT = "input"
PREDICTIONS, PROBABILITIES = "predictions", "probabilities"
OUTPUTS = (PREDICTIONS, PROBABILITIES)
# datatype → (torch dtype, little-endian numpy dtype of the binary tensor extension)
DATATYPES: dict[str, tuple[torch.dtype, str]] = {
    "FP32": (torch.float32, "<f4"),
    "FP64": (torch.float64, "<f8"),
    "INT64": (torch.int64, "<i8"),
}
HEADER_LENGTH = "Inference-Header-Content-Length"  # binary tensor extension: byte length of the JSON part
SERVER = {"name": "aas", "version": "1", "extensions": ["binary_tensor_data"]}
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# OpenAPI schema of an inference request (documentation, and what the HTTP fuzz test generates from).
_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": list(DATATYPES)},
        "parameters": {"type": "object"},
        "data": {"type": "array"},
    },
}
INFER_REQUEST_SCHEMA = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object"},
        "inputs": {"type": "array", "items": _TENSOR},
        "outputs": {
            "type": "array",
            "items": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
        },
    },
}


class OipError(Exception):
    """A v2 request that cannot be answered: `status` is the HTTP status, `reason` a stable code."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool  # sent as raw little-endian bytes after the JSON header (binary tensor extension)


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    batch: torch.Tensor  # (B, *sample_shape) float32
    outputs: tuple[RequestedOutput, ...]


# ---------------------------------------------------------------- pure translation


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON object of a request and the binary tensor bytes that follow it (if `header_length` says so)."""
    n = len(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise OipError(400, "bad_header", f"{HEADER_LENGTH} is {header_length!r}; it must be the byte length "
                                              f"of the JSON part, at most the body's {len(body)} bytes")
        n = int(header_length)
    try:
        obj = json.loads(body[:n])
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise OipError(400, "bad_json", f"request body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise OipError(400, "bad_json", "request body must be a JSON object with an 'inputs' list")
    return obj, body[n:]


def _shape(raw: Any) -> list[int]:
    if (not isinstance(raw, list) or not raw
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in raw)):
        raise OipError(400, "bad_shape", f"input {INPUT!r} has shape {raw!r}; a shape is a list of non-negative "
                                         "integers starting with the batch size, e.g. [2, 64]")
    return raw


def _flatten(data: Any, count: int) -> list[Any]:
    """Row-major values of a flat or nested JSON array; fails as soon as there are more than `count`."""
    if not isinstance(data, list):
        raise OipError(400, "bad_data", f"input {INPUT!r}: 'data' must be an array, not {type(data).__name__}")
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            flat.append(v)
            if len(flat) > count:
                raise OipError(400, "bad_shape", f"input {INPUT!r} has more values than its shape's {count}")
        else:
            stack.pop()
    return flat


def _from_json(data: Any, datatype: str, count: int) -> torch.Tensor:
    flat = _flatten(data, count)
    if len(flat) != count:
        raise OipError(400, "bad_shape", f"input {INPUT!r} has {len(flat)} values; its shape needs {count}")
    kinds = (int,) if datatype == "INT64" else (int, float)
    bad = next((v for v in flat if type(v) not in kinds), None)  # type(), not isinstance: True is not a number
    if bad is not None:
        want = "integers" if datatype == "INT64" else "numbers"
        raise OipError(400, "bad_data", f"input {INPUT!r} ({datatype}) holds {type(bad).__name__} {bad!r}; "
                                        f"its values must be {want}")
    if datatype == "INT64":
        if any(v < INT64_MIN or v > INT64_MAX for v in flat):
            raise OipError(400, "bad_data", f"input {INPUT!r} (INT64) holds a value outside the int64 range")
        return torch.tensor(flat, dtype=torch.int64)
    try:
        return torch.tensor(flat, dtype=DATATYPES[datatype][0])
    except (OverflowError, RuntimeError):
        raise OipError(400, "bad_data", f"input {INPUT!r} ({datatype}) holds a value out of range") from None


def _from_binary(binary: bytes, size: Any, datatype: str, count: int) -> torch.Tensor:
    np_dtype = np.dtype(DATATYPES[datatype][1])
    if isinstance(size, bool) or not isinstance(size, int) or size != count * np_dtype.itemsize:
        raise OipError(400, "bad_data", f"input {INPUT!r}: binary_data_size is {size!r}; {count} {datatype} "
                                        f"values take {count * np_dtype.itemsize} bytes")
    if len(binary) != size:
        raise OipError(400, "bad_data", f"input {INPUT!r}: binary_data_size is {size} but {len(binary)} bytes "
                                        "follow the JSON header")
    return torch.from_numpy(np.frombuffer(binary, dtype=np_dtype, count=count).copy())


def _outputs(req: dict[str, Any]) -> tuple[RequestedOutput, ...]:
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise OipError(400, "bad_request", "'parameters' must be a JSON object")
    binary_default = params.get("binary_data_output") is True
    raw = req.get("outputs") or []  # none named: all outputs (as Triton does)
    if not isinstance(raw, list) or not all(isinstance(o, dict) for o in raw):
        raise OipError(400, "bad_request", "'outputs' must be a list of objects with a 'name'")
    if not raw:
        return tuple(RequestedOutput(n, binary_default) for n in OUTPUTS)
    outs = []
    for o in raw:
        if o.get("name") not in OUTPUTS:
            raise OipError(400, "unknown_output", f"unknown output {o.get('name')!r} (this model has: "
                                                  f"{', '.join(OUTPUTS)})")
        p = o.get("parameters") or {}
        binary = p.get("binary_data", binary_default) if isinstance(p, dict) else binary_default
        outs.append(RequestedOutput(o["name"], binary is True))
    if len({o.name for o in outs}) != len(outs):
        raise OipError(400, "bad_request", "an output is requested twice")
    return tuple(outs)


def parse_infer(
    body: bytes,
    header_length: str | None,
    *,
    sample_shape: tuple[int, ...] | None,
    max_batch: int,
    max_values: int,
) -> InferRequest:
    """Validate a v2 inference request and return its batch as float32 (B, *sample_shape). Raises OipError.

    Checks run cheapest first: the declared shape against the limits (batch rows, values) and the model's
    sample shape, before any value is read."""
    req, binary = split_body(body, header_length)
    rid = req.get("id")
    if rid is not None and not isinstance(rid, str):
        raise OipError(400, "bad_request", f"'id' must be a string, not {type(rid).__name__}")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise OipError(400, "bad_inputs", f"'inputs' must be a list of one tensor named {INPUT!r} "
                                          "(this model has one input)")
    tensor = inputs[0]
    if tensor.get("name") != INPUT:
        raise OipError(400, "unknown_input", f"unknown input {tensor.get('name')!r}; this model has one input, "
                                             f"{INPUT!r}")
    datatype = tensor.get("datatype")
    if datatype not in DATATYPES:
        raise OipError(400, "bad_datatype", f"input {INPUT!r} has datatype {datatype!r}; this model accepts "
                                            f"{', '.join(DATATYPES)} (converted to FP32)")
    shape = _shape(tensor.get("shape"))
    count = math.prod(shape)
    if shape[0] > max_batch:
        raise OipError(413, "too_large", f"batch of {shape[0]} exceeds the limit of {max_batch}; split it")
    if count > max_values:
        raise OipError(413, "too_large", f"{count} values exceed the limit of {max_values} per request; split it")
    if count == 0:
        raise OipError(400, "bad_shape", f"input {INPUT!r} has shape {shape}: no values")
    if sample_shape is not None and tuple(shape[1:]) not in (sample_shape, (math.prod(sample_shape),)):
        dims = ", ".join(map(str, sample_shape))
        raise OipError(400, "bad_shape", f"input {INPUT!r} has shape {shape}; this model expects [B, {dims}] "
                                         f"or [B, {math.prod(sample_shape)}]")
    params = tensor.get("parameters") or {}
    if not isinstance(params, dict):
        raise OipError(400, "bad_request", f"input {INPUT!r}: 'parameters' must be a JSON object")
    if "binary_data_size" in params:
        values = _from_binary(binary, params["binary_data_size"], datatype, count)
    elif binary:
        raise OipError(400, "bad_data", f"{len(binary)} bytes follow the JSON header but no input claims them "
                                        "(binary_data_size)")
    elif "data" not in tensor:
        raise OipError(400, "bad_data", f"input {INPUT!r} has no 'data' (nor a binary_data_size parameter)")
    else:
        values = _from_json(tensor["data"], datatype, count)
    x = values.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise OipError(400, "bad_data", f"input {INPUT!r} holds NaN or Inf (or a value beyond FP32's range)")
    x = x.reshape(shape[0], *sample_shape) if sample_shape is not None else x.reshape(shape)
    return InferRequest(id=rid, batch=x, outputs=_outputs(req))


def infer_response(
    *, model: str, version: int, alias: str, request_id: str | None, result: dict[str, Any],
    outputs: tuple[RequestedOutput, ...],
) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a v2 inference response from `predict_batch`'s predictions and probabilities.

    `parameters` names the version that answered and the alias it was served under."""
    tensors = {
        PREDICTIONS: ("INT64", np.asarray(result["predictions"], dtype="<i8")),  # (B,)
        PROBABILITIES: ("FP32", np.asarray(result["probabilities"], dtype="<f4")),  # (B, classes)
    }
    head: dict[str, Any] = {"model_name": model, "model_version": str(version)}
    if request_id is not None:
        head["id"] = request_id
    head["parameters"] = {"version": version, "alias": alias}
    head["outputs"], chunks = [], []
    for o in outputs:
        datatype, arr = tensors[o.name]
        entry: dict[str, Any] = {"name": o.name, "datatype": datatype, "shape": list(arr.shape)}
        if o.binary:
            raw = arr.tobytes()  # row-major, little-endian
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = arr.reshape(-1).tolist()
        head["outputs"].append(entry)
    header = json.dumps(head, separators=(",", ":")).encode()
    if not chunks:
        return header, {"content-type": "application/json"}
    return header + b"".join(chunks), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def model_metadata(
    model: str, version: int, alias: str, sample_shape: tuple[int, ...] | None, classes: int | None
) -> dict[str, Any]:
    """The v2 model metadata: the one version held, its input and outputs (-1: any size)."""
    return {
        "name": model,
        "versions": [str(version)],
        "platform": "pytorch",
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, *(sample_shape or (-1,))]}],
        "outputs": [
            {"name": PREDICTIONS, "datatype": "INT64", "shape": [-1]},
            {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, classes or -1]},
        ],
        "parameters": {"version": version, "alias": alias},
    }


# ---------------------------------------------------------------- the router


class ServedVersion(Protocol):
    """What the router reads of the worker's swapped unit (`workers.inference.Served`)."""

    @property
    def version(self) -> int: ...

    @property
    def loaded(self) -> Any: ...  # pipeline.artifacts.LoadedArtifact


@dataclass(frozen=True)
class Backend:
    """What the v2 router needs from the worker, injected by `workers.inference.create_app`."""

    model: str
    alias: str
    current: Callable[[], ServedVersion | None]  # grabbed once per request: it runs on that version
    predict: Callable[[Any, torch.Tensor], dict[str, Any]]  # (loaded, (B, *shape)) → predictions, probabilities
    sample_shape: Callable[[Any], tuple[int, ...] | None]  # loaded → per-sample input shape, None if unknown
    max_batch: int  # rows per request
    max_values: int  # numbers per request, whatever the shape (AAS_MAX_PREDICT_VALUES)
    body_cap: int  # bytes read per request
    observe: Callable[[int, float], None]  # (HTTP status, seconds) of each infer request, for metrics


def _error(e: OipError) -> JSONResponse:
    return JSONResponse({"error": str(e)}, status_code=e.status)


async def read_capped(request: Request, cap: int) -> bytes:
    """The request body, failing with 413 as soon as more than `cap` bytes have been read."""
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > cap:
            raise OipError(413, "too_large", f"request body exceeds the limit of {cap} bytes; split the batch")
        chunks.append(chunk)
    return b"".join(chunks)


def oip_router(b: Backend) -> APIRouter:
    """The v2 endpoints: health, server and model metadata, model readiness and infer (per model and version)."""
    router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])

    def held(name: str, version: str | None) -> ServedVersion:
        if name != b.model:
            raise OipError(404, "unknown_model", f"unknown model {name!r}: this worker serves {b.model!r} "
                                                 f"(alias {b.alias!r})")
        served = b.current()
        if served is None:
            raise OipError(503, "not_loaded", f"no version of {b.model!r} is loaded yet (alias {b.alias!r})")
        if version is not None and version != str(served.version):
            raise OipError(404, "version_not_held", f"model {b.model!r} version {version!r} is not served here: "
                                                    f"this worker holds version {served.version} (alias {b.alias!r}); "
                                                    f"use /v2/models/{b.model} to follow the alias")
        return served

    def metadata(name: str, version: str | None) -> JSONResponse:
        try:
            served = held(name, version)
        except OipError as e:
            return _error(e)
        classes = (served.loaded.meta.get("model_args") or {}).get("classes")
        meta = model_metadata(b.model, served.version, b.alias, b.sample_shape(served.loaded),
                              classes if isinstance(classes, int) else None)
        return JSONResponse(meta)

    def ready(name: str, version: str | None) -> JSONResponse:
        try:
            held(name, version)
        except OipError as e:  # the protocol's "false" is a 4xx
            status = 404 if e.reason == "unknown_model" else 400
            return JSONResponse({"name": name, "ready": False, "error": str(e)}, status_code=status)
        return JSONResponse({"name": name, "ready": True})

    def run(served: ServedVersion, body: bytes, header_length: str | None) -> Response:
        shape = b.sample_shape(served.loaded)
        req = parse_infer(body, header_length, sample_shape=shape, max_batch=b.max_batch, max_values=b.max_values)
        try:
            result = b.predict(served.loaded, req.batch)
        except ValueError as e:  # workers.inference.PredictError: inputs that do not fit the model
            raise OipError(400, "bad_shape", str(e)) from None
        content, headers = infer_response(model=b.model, version=served.version, alias=b.alias, request_id=req.id,
                                          result=result, outputs=req.outputs)
        return Response(content, headers=headers)

    async def infer(request: Request, name: str, version: str | None) -> Response:
        t0 = time.perf_counter()
        try:
            served = held(name, version)  # grabbed once: the request runs on this version, whatever swaps
            encoding = request.headers.get("content-encoding", "identity")
            if encoding != "identity":
                raise OipError(415, "bad_encoding", f"Content-Encoding {encoding!r} is not supported; send the "
                                                    "body uncompressed")
            body = await read_capped(request, b.body_cap)
            resp = await run_in_threadpool(run, served, body, request.headers.get(HEADER_LENGTH))
        except OipError as e:
            resp = _error(e)
        b.observe(resp.status_code, time.perf_counter() - t0)
        return resp

    @router.get("/health/live")
    def live() -> JSONResponse:
        return JSONResponse({"live": True})

    @router.get("/health/ready")
    def server_ready() -> JSONResponse:
        if b.current() is None:
            return JSONResponse({"ready": False, "error": f"no version of {b.model!r} loaded yet"}, status_code=400)
        return JSONResponse({"ready": True})

    @router.get("")
    def server_metadata() -> JSONResponse:
        return JSONResponse(SERVER)

    @router.get("/models/{name}")
    def model_meta(name: str) -> JSONResponse:
        return metadata(name, None)

    @router.get("/models/{name}/versions/{version}")
    def version_meta(name: str, version: str) -> JSONResponse:
        return metadata(name, version)

    @router.get("/models/{name}/ready")
    def model_ready(name: str) -> JSONResponse:
        return ready(name, None)

    @router.get("/models/{name}/versions/{version}/ready")
    def version_ready(name: str, version: str) -> JSONResponse:
        return ready(name, version)

    body_doc = {"requestBody": {"required": True, "content": {"application/json": {"schema": INFER_REQUEST_SCHEMA}}}}

    @router.post("/models/{name}/infer", openapi_extra=body_doc)
    async def model_infer(request: Request, name: str) -> Response:
        return await infer(request, name, None)

    @router.post("/models/{name}/versions/{version}/infer", openapi_extra=body_doc)
    async def version_infer(request: Request, name: str, version: str) -> Response:
        return await infer(request, name, version)

    return router
