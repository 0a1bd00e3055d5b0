"""Open Inference Protocol v2 translation (workers/oip.py): pure request parsing and response building."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from workers.oip import HEADER_LENGTH, OipError, RequestedOutput, infer_response, parse_infer

SHAPE = (1, 8, 8)


def body(data: object, shape: list[int], datatype: str = "FP32", **extra: object) -> bytes:
    tensor = {"name": "input", "shape": shape, "datatype": datatype, "data": data}
    return json.dumps({"inputs": [tensor], **extra}).encode()


def parse(raw: bytes, header_length: str | None = None, max_batch: int = 8) -> torch.Tensor:
    return parse_infer(raw, header_length, sample_shape=SHAPE, max_batch=max_batch, max_values=max_batch * 64).batch


def test_flat_nested_and_image_shaped_inputs_give_the_same_batch() -> None:
    rows = np.arange(128, dtype=np.float32).reshape(2, 64) / 100
    flat = parse(body(rows.reshape(-1).tolist(), [2, 64]))
    nested = parse(body(rows.tolist(), [2, 64]))
    image = parse(body(rows.reshape(2, 1, 8, 8).tolist(), [2, 1, 8, 8]))
    assert flat.shape == (2, 1, 8, 8) and flat.dtype == torch.float32
    assert torch.equal(flat, nested) and torch.equal(flat, image)


def test_fp64_and_int64_inputs_are_converted_to_fp32() -> None:
    assert torch.equal(parse(body([1.5] * 64, [1, 64], "FP64")), torch.full((1, 1, 8, 8), 1.5))
    assert torch.equal(parse(body([3] * 64, [1, 64], "INT64")), torch.full((1, 1, 8, 8), 3.0))


def test_a_binary_tensor_after_the_json_header_is_read() -> None:
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
    head = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    got = parse(head + x.tobytes(), str(len(head)))
    assert torch.equal(got, torch.from_numpy(x).reshape(1, 1, 8, 8))
    with pytest.raises(OipError, match="binary_data_size is 256 but 255 bytes"):
        parse(head + x.tobytes()[:-1], str(len(head)))


@pytest.mark.parametrize(
    ("raw", "status", "reason"),
    [
        (body([0.0] * 64, [1, 64], "BYTES"), 400, "bad_datatype"),
        (body([0.0] * 63, [1, 63]), 400, "bad_shape"),
        (body([0.0] * 63, [1, 64]), 400, "bad_shape"),
        (body([0.0] * 65, [1, 64]), 400, "bad_shape"),
        (body([0.0] * 64, [-1, 64]), 400, "bad_shape"),
        (body([True] * 64, [1, 64]), 400, "bad_data"),
        (body([0.5] * 64, [1, 64], "INT64"), 400, "bad_data"),
        (body([2**63] * 64, [1, 64], "INT64"), 400, "bad_data"),
        (body([1e300] * 64, [1, 64]), 400, "bad_data"),  # beyond FP32's range
        (body([0.0] * 64, [1, 64]).replace(b"[0.0,", b"[NaN,"), 400, "bad_data"),
        (body([0.0] * 64 * 9, [9, 64]), 413, "too_large"),
        (body([0.0], [8, 10**6]), 413, "too_large"),
        (body([0.0] * 64, [1, 64], id=7), 400, "bad_request"),
        (body([0.0] * 64, [1, 64], outputs=[{"name": "logits"}]), 400, "unknown_output"),
        (b"[1, 2]", 400, "bad_json"),
        (b"{", 400, "bad_json"),
    ],
)
def test_bad_requests_raise_an_error_with_a_status_and_a_reason(raw: bytes, status: int, reason: str) -> None:
    with pytest.raises(OipError) as e:
        parse(raw)
    assert (e.value.status, e.value.reason) == (status, reason), str(e.value)


def test_a_response_names_its_version_and_echoes_the_id_in_json_and_binary() -> None:
    result = {"predictions": [3, 1], "probabilities": [[0.1] * 10, [0.2] * 10]}
    outputs = (RequestedOutput("predictions", False), RequestedOutput("probabilities", True))
    content, headers = infer_response(model="m", version=7, alias="production", request_id="r1", result=result,
                                      outputs=outputs)
    n = int(headers[HEADER_LENGTH])
    head = json.loads(content[:n])
    assert head["id"] == "r1" and head["model_version"] == "7"
    assert head["parameters"] == {"version": 7, "alias": "production"}
    assert head["outputs"][0] == {"name": "predictions", "datatype": "INT64", "shape": [2], "data": [3, 1]}
    assert head["outputs"][1]["parameters"] == {"binary_data_size": 80}
    probs = np.frombuffer(content[n:], dtype="<f4").reshape(2, 10)
    np.testing.assert_allclose(probs, np.asarray(result["probabilities"], dtype=np.float32))
