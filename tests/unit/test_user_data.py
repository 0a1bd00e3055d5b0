"""A user data set as scikit-learn and numpy hand it over: float64 features and int32 labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def test_float64_features_and_int32_labels_are_converted_to_what_models_take() -> None:
    from pipeline.data import _from_user

    rng = np.random.default_rng(0)
    ds = _from_user((rng.normal(size=(20, 1, 8, 8)), rng.integers(0, 10, 20).astype(np.int32),
                     rng.normal(size=(5, 1, 8, 8)), rng.integers(0, 10, 5).astype(np.int32)), "mine:load")
    assert ds.x_train.dtype == torch.float32 and ds.x_test.dtype == torch.float32
    assert ds.y_train.dtype == torch.int64 and ds.y_test.dtype == torch.int64

    from pipeline.models import build_model

    model = build_model("digits-cnn", {})
    assert model(ds.x_train[:4]).shape == (4, 10)  # the float64 input would fail: "mat1 and mat2 ... dtype"


def test_float_labels_are_refused_with_what_to_return() -> None:
    from pipeline.data import DataError, _from_user

    x = np.zeros((4, 64))
    with pytest.raises(DataError, match=r"y_train has dtype torch.float64; return integer class ids .*astype"):
        _from_user({"x_train": x, "y_train": np.zeros(4), "x_test": x, "y_test": np.zeros(4, dtype=np.int64)}, "m:f")
