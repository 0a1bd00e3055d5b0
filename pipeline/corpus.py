"""The ``chars`` corpus: text that exists on every machine without a download.

By default the Python standard library's own top-level ``*.py`` sources, read in sorted order, byte-level
(vocabulary 256, so no vocabulary file). The text differs between Python versions, so a data set's digest
(and its id in the store) does too; on one machine it is fully deterministic.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

from pipeline.dataset import Dataset
from pipeline.models.char_lm import VOCAB_SIZE

DATASET_NAME = "chars"



def stdlib_sources() -> list[Path]:
    """The standard library's top-level ``*.py`` files, sorted by name (no site-packages, no tests)."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def read_corpus(root: str | Path | None = None, max_chars: int = 1_000_000) -> bytes:
    """Up to `max_chars` bytes: the sorted ``*.py`` files under `root` (recursively), or the stdlib's."""
    files = stdlib_sources() if root is None else sorted(p for p in Path(root).rglob("*.py") if p.is_file())
    out = bytearray()
    for f in files:
        if len(out) >= max_chars:
            break
        out += f.read_bytes()
        out += b"\n"
    if len(out) < 2:
        where = root if root is not None else sysconfig.get_paths()["stdlib"]
        raise ValueError(f"chars: no text found under {where} (*.py files); pass root= a folder with some")
    return bytes(out[:max_chars])


def load_chars(block_size: int = 64, max_chars: int = 1_000_000, seed: int = 0, root: str | None = None,
               test_windows: int = 64) -> Dataset:
    """Byte windows of the corpus: x (N, T) int64 tokens, y = x shifted left by one; seeded train/test split.

    Windows do not overlap (stride T; a target row reaches one byte into the next window). The test
    split is a fixed number of windows: the aggregator evaluates every version on it, so it stays small.
    """
    if block_size < 1:
        raise ValueError(f"chars: block_size must be ≥ 1, got {block_size}")
    data = torch.frombuffer(bytearray(read_corpus(root, max_chars)), dtype=torch.uint8).to(torch.int64)  # (L,)
    n = (data.numel() - 1) // block_size
    if n < 2:
        raise ValueError(f"chars: {data.numel()} bytes give fewer than 2 windows of {block_size}; raise max_chars")
    x = data[: n * block_size].view(n, block_size)  # (N, T)
    y = data[1 : n * block_size + 1].view(n, block_size)  # (N, T): the next byte of each position
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(4321 + seed))
    n_test = max(1, min(test_windows, n // 5))
    test, train = perm[:n_test], perm[n_test:]
    meta = {"name": DATASET_NAME, "task": "lm", "vocab_size": VOCAB_SIZE, "block_size": block_size,
            "chars": int(data.numel())}
    return Dataset(x[train].clone(), y[train].clone(), x[test].clone(), y[test].clone(), meta)
