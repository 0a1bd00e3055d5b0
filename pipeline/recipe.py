"""A sync version's recipe: how a shard worker holding version N builds N+1 from the round's update blobs.

Pure functions (no services): the aggregator writes the recipe with its commit, ``workers/replay.py`` follows
it. See there for when a recipe is written and what it guarantees.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import torch

Source = tuple[str, str | None, int, int]  # a folded update blob: key, digest (None: not known), size, shard


def state_crc(state: Mapping[str, torch.Tensor]) -> int:
    """CRC-32 of a state dict's names, dtypes, shapes and bytes, in name order (~3 GB/s: 15 ms for 43 MB). It
    checks that two computations gave the same bits; the blobs themselves are signed and digested."""
    crc = 0
    for name in sorted(state):
        t = state[name].detach()
        crc = zlib.crc32(f"{name}:{t.dtype}:{tuple(t.shape)};".encode(), crc)
        if t.numel():
            crc = zlib.crc32(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy(), crc)
    return crc


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def momentum_entries(momentum: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Momentum buffers under names no state entry has, for ``state_crc`` over weights and buffers together."""
    return {f"\x00momentum\x00{n}": t for n, t in momentum.items()}


def recipe(version: int, sources: list[Source], state: Mapping[str, torch.Tensor],
           hparams: Mapping[str, Any], momentum: Mapping[str, torch.Tensor], *, base_had_momentum: bool
           ) -> dict[str, Any]:
    """The aggregator's recipe for `version`: its new `state` and `momentum` buffers, stepped with `hparams` from
    the folded `sources` (in folding order), from a base whose buffers existed (`base_had_momentum`) or not (the
    first step creates them). {} where replaying would not save bytes."""
    if not sources:
        return {}
    weights = state_bytes(state)
    if sum(s[2] for s in sources) - max(s[2] for s in sources) >= weights:
        return {}  # uncompressed updates from several shards: the weights are fewer bytes
    mu = float(hparams.get("momentum") or 0.0)
    return {"version": version, "updates": [list(s) for s in sources], "bytes": weights,
            "hparams": {"lr": hparams["lr"], "momentum": mu, "nesterov": hparams["nesterov"],
                        "weight_decay": hparams["weight_decay"]},
            "base_momentum": base_had_momentum if mu else False,
            "crc": state_crc({**state, **momentum_entries(momentum if mu else {})})}
