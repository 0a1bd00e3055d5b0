"""Data sets, sharding and the shard manifest.

A data set is four tensors (train and test inputs and targets). Built-in: ``digits`` (scikit-learn's
bundled 1,797 8×8 handwritten digits, fixed seeded 80/20 split). A user data set is ``module:function``
returning a dict with keys x_train, y_train, x_test, y_test (or a 4-tuple in that order).

Sharding is pure: a seeded permutation of the training indices split into contiguous, near-equal parts.
Batches are pure too: shard s, round r, local step h → a deterministic set of row indices, so any worker
(or a single process) can recompute exactly what a round used.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import torch

from pipeline.corpus import DATASET_NAME as CHARS
from pipeline.corpus import load_chars
from pipeline.dataset import DataError, Dataset
from pipeline.imports import ImportRefused, check_import, is_import_path, resolve_import

DIGITS_MEAN, DIGITS_STD = 0.3053, 0.3762


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's digits as (N, 1, 8, 8) standardised float32 and int64 labels, split with a fixed seed."""
    if not 0 < test_fraction < 1:
        raise DataError(f"dataset 'digits': test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    # Pixel values 0..16, standardised with the training split's mean and std (fixed constants, so the
    # inference worker's callers can apply the same transform).
    x = (torch.tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0 - DIGITS_MEAN) / DIGITS_STD
    y = torch.tensor(bunch.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(1234 + seed)
    perm = torch.randperm(x.shape[0], generator=g)
    n_test = int(round(x.shape[0] * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return Dataset(x[train], y[train], x[test], y[test], {"name": "digits", "classes": 10})


BUILTIN: dict[str, Callable[..., Dataset]] = {"digits": load_digits, CHARS: load_chars}


def _from_user(obj: Any, name: str) -> Dataset:
    if isinstance(obj, Dataset):
        return obj
    if isinstance(obj, dict):
        try:
            parts = [obj["x_train"], obj["y_train"], obj["x_test"], obj["y_test"]]
        except KeyError as e:
            raise DataError(f"dataset {name!r}: the loader's dict lacks {e.args[0]!r}") from None
    elif isinstance(obj, (tuple, list)) and len(obj) == 4:
        parts = list(obj)
    else:
        raise DataError(f"dataset {name!r}: the loader must return a dict or a 4-tuple of tensors")
    tensors = [torch.as_tensor(p) for p in parts]
    if tensors[0].shape[0] != tensors[1].shape[0] or tensors[2].shape[0] != tensors[3].shape[0]:
        raise DataError(f"dataset {name!r}: inputs and targets differ in length")
    x_train, x_test = (_user_inputs(t, name, part) for t, part in ((tensors[0], "x_train"), (tensors[2], "x_test")))
    y_train, y_test = (_user_labels(t, name, part) for t, part in ((tensors[1], "y_train"), (tensors[3], "y_test")))
    return Dataset(x_train, y_train, x_test, y_test, meta={"name": name})


def _user_inputs(t: torch.Tensor, name: str, part: str) -> torch.Tensor:
    """Features as models take them: any float dtype → float32 (scikit-learn and numpy give float64);
    integer inputs (token ids) → int64."""
    if t.is_floating_point():
        return t.to(torch.float32)
    if t.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        return t.to(torch.int64)
    raise DataError(f"dataset {name!r}: {part} has dtype {t.dtype}; return float features (any float dtype, "
                    "converted to float32) or integer token ids")


def _user_labels(t: torch.Tensor, name: str, part: str) -> torch.Tensor:
    """Class ids or target tokens as the losses take them: any integer dtype → int64."""
    if t.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        return t.to(torch.int64)
    raise DataError(f"dataset {name!r}: {part} has dtype {t.dtype}; return integer class ids (e.g. "
                    "y.astype('int64') for a numpy array), not floats or booleans")


def load_dataset(name: str, args: dict[str, Any] | None = None) -> Dataset:
    """Load a built-in data set by name or a user one by ``module:function``."""
    args = args or {}
    if name in BUILTIN:
        return BUILTIN[name](**args)
    if not is_import_path(name):
        raise DataError(f"unknown dataset {name!r} (built-in: {', '.join(sorted(BUILTIN))}; or 'module:function')")
    try:
        loader = resolve_import(name, "dataset")
    except ImportRefused as e:
        raise DataError(str(e)) from None
    return _from_user(loader(**args), name)


OBJECTS = "objects"  # data shards already in the object store (dataset_args: keys, test_dataset); the client loads it


def check_dataset_name(name: str, *, import_it: bool = True) -> None:
    """Cheap submit-time check that a data set name resolves, without loading the data. With
    ``import_it=False`` a user loader's path is checked against the allowlist but not imported."""
    if name in BUILTIN or name == OBJECTS:
        return
    if not is_import_path(name):
        raise DataError(f"unknown dataset {name!r} (built-in: {', '.join(sorted(BUILTIN))}; or 'module:function')")
    try:
        resolve_import(name, "dataset") if import_it else check_import(name, "dataset")
    except ImportRefused as e:
        raise DataError(str(e)) from None


# ------------------------------------------------------------------ sharding and batches


def shard_indices(n: int, shards: int, seed: int) -> list[torch.Tensor]:
    """Split range(n) into `shards` near-equal parts after a seeded shuffle."""
    if shards < 1 or shards > n:
        raise DataError(f"cannot split {n} samples into {shards} shards")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [t.clone() for t in torch.tensor_split(perm, shards)]


def batches_per_epoch(shard_sizes: list[int], batch_size: int) -> int:
    """Every shard walks its data in the same number of batches per epoch (the largest shard's count)."""
    return max(1, math.ceil(max(shard_sizes) / batch_size))


def total_rounds(shard_sizes: list[int], batch_size: int, epochs: int, local_steps: int) -> int:
    return max(1, math.ceil(epochs * batches_per_epoch(shard_sizes, batch_size) / local_steps))


def batch_rows(shard_size: int, batch_size: int, step: int, bpe: int, seed: int, shard: int) -> torch.Tensor:
    """Row indices (within the shard) of the shard's `step`-th mini-batch; empty if the shard has run out.

    Step k falls in epoch k // bpe; each epoch reshuffles the shard with a seed derived from (seed, epoch, shard).
    """
    epoch, b = divmod(step, bpe)
    g = torch.Generator().manual_seed(hash_seed(seed, epoch, shard))
    perm = torch.randperm(shard_size, generator=g)
    return perm[b * batch_size : (b + 1) * batch_size]


def hash_seed(*parts: int | str) -> int:
    """A seed from the parts, the same in every process (unlike hash(), which PYTHONHASHSEED salts)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def round_steps(round_: int, local_steps: int) -> range:
    """The global step numbers a round covers: H consecutive mini-batches per shard."""
    return range(round_ * local_steps, (round_ + 1) * local_steps)


def tensor_digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()

