"""Refusals carry a reason code; the rejection metric reads the code, never the message's wording."""

from __future__ import annotations

import pytest
import torch

from pipeline import blobs
from pipeline.aggregate import UpdateRejected, check_update
from pipeline.reasons import REJECT_REASONS, reason_code
from workers import metrics

PARAMS = {"w": torch.zeros(2, 2)}


def _refusal(update: dict[str, torch.Tensor]) -> UpdateRejected:
    with pytest.raises(UpdateRejected) as err:
        check_update(update, PARAMS, "blob x")
    return err.value


def test_a_nan_update_is_refused_as_nonfinite_and_a_misshapen_one_as_shape() -> None:
    assert reason_code(_refusal({"w": torch.full((2, 2), float("nan"))})) == "nonfinite"
    assert reason_code(_refusal({"w": torch.zeros(3)})) == "shape"
    assert reason_code(_refusal({"v": torch.zeros(2, 2)})) == "shape"


def test_a_tampered_blob_is_corrupt_and_a_wrongly_signed_one_is_a_signature_refusal() -> None:
    data = blobs.encode({"w": torch.ones(2, 2)}, {"kind": "gradient"}, signing_key=b"k1")
    tampered = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(blobs.BlobError) as err:
        blobs.decode(tampered, "t")
    assert reason_code(err.value) == "corrupt"
    with pytest.raises(blobs.BlobError) as err:
        blobs.decode(data, "t", signing_key=b"k2")
    assert reason_code(err.value) == "signature"


def test_the_code_not_the_wording_chooses_the_metric_label() -> None:
    # A message that mentions "stale" and "NaN" is still labelled by its code.
    err = UpdateRejected("stale NaN sha256 words everywhere", code="shape")
    before = metrics.UPDATES_REJECTED.labels(reason="shape")._value.get()
    metrics.observe_rejected(reason_code(err))
    assert metrics.UPDATES_REJECTED.labels(reason="shape")._value.get() == before + 1
    assert reason_code(ValueError("anything")) == "other" and "other" in REJECT_REASONS
