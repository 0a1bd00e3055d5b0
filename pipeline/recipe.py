"""A sync version's recipe: how a shard worker holding version N builds N+1 from the round's update blobs.

Pure functions (no services): the aggregator writes the recipe with its commit, ``workers/replay.py`` follows
it. See there for when a recipe is written and what it guarantees.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import torch

from pipeline import blobs

KIND = "recipe"

Source = tuple[str, str | None, int, int]  # a folded update blob: key, digest (None: not known), size, shard


CHECK = "xxh3_64"  # the checksum new recipes record; "crc32" (zlib), what recipes recorded before, is still read
CHECKS = ("crc32", "xxh3_64")


def state_crc(state: Mapping[str, torch.Tensor], check: str = CHECK) -> int:
    """A checksum of a state dict's names, dtypes, shapes and bytes, in name order: xxh3-64 (~11 GB/s here, memory
    speed: 18 ms for weights + momentum of 25M parameters) or CRC-32 (zlib, ~2.2 GB/s: 92 ms). It checks that two
    computations gave the same bits; the blobs themselves are signed and digested."""
    xxh = None
    if _check_name(check) == "xxh3_64":
        import xxhash

        xxh = xxhash.xxh3_64()
    crc = 0
    for name in sorted(state):
        t = state[name].detach()
        parts = [f"{name}:{t.dtype}:{tuple(t.shape)};".encode()]
        if t.numel():
            parts.append(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        for p in parts:
            if xxh is not None:
                xxh.update(p)
            else:
                crc = zlib.crc32(p, crc)
    return xxh.intdigest() if xxh is not None else crc


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def momentum_entries(momentum: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Momentum buffers under names no state entry has, for ``state_crc`` over weights and buffers together."""
    return {f"\x00momentum\x00{n}": t for n, t in momentum.items()}


def recipe(version: int, sources: list[Source], state: Mapping[str, torch.Tensor],
           hparams: Mapping[str, Any], momentum: Mapping[str, torch.Tensor], *, base_had_momentum: bool,
           full: int | None = None, always: bool = False, part: int | None = None) -> dict[str, Any]:
    """The aggregator's recipe for `version`: its new `state` and `momentum` buffers, stepped with `hparams` from
    the folded `sources` (in folding order), from a base whose buffers existed (`base_had_momentum`) or not (the
    first step creates them). {} where replaying would not save bytes, unless `version` has no checkpoint of its
    own (`full`: the version of the full checkpoint it is rebuilt from), where the recipe is the version, or
    `always` (a job whose versions between full checkpoints its workers replay anyway: replaying this one too
    keeps their momentum buffers, which a checkpoint read would cost as many bytes again to restore). `part`: the
    parameter range of a job aggregated in parts that `state` and `momentum` are (its blobs are that range's)."""
    if not sources:
        return {}
    weights = state_bytes(state)
    if full is None and not always and sum(s[2] for s in sources) - max(s[2] for s in sources) >= weights:
        return {}  # uncompressed updates from several shards: the weights are fewer bytes
    mu = float(hparams.get("momentum") or 0.0)
    return {"version": version, "updates": [list(s) for s in sources], "bytes": weights,
            "hparams": {"lr": hparams["lr"], "momentum": mu, "nesterov": hparams["nesterov"],
                        "weight_decay": hparams["weight_decay"]},
            "base_momentum": base_had_momentum if mu else False,
            "crc": state_crc({**state, **momentum_entries(momentum if mu else {})}), "check": CHECK,
            **({} if full is None else {"full": full}), **({"always": True} if always else {}),
            **({} if part is None else {"part": part})}


def full_checkpoint_of(version: int, every: int) -> int:
    """The version of the full checkpoint a version between full checkpoints is rebuilt from (every `every`)."""
    return (version // every) * every


def parse(r: Any) -> dict[str, Any]:
    """A recipe (as ``recipe`` wrote it, read back from JSON) with every field checked and typed: ``updates``
    as ``Source`` tuples; ``full`` None for a version that has its own checkpoint; ``part`` None for a version
    aggregated in one part. ValueError when malformed."""
    try:
        h = r["hparams"]
        full, part = r.get("full"), r.get("part")
        return {"version": int(r["version"]),
                "updates": [(str(k), None if d is None else str(d), int(n), int(s)) for k, d, n, s in r["updates"]],
                "hparams": {"lr": float(h["lr"]), "momentum": float(h.get("momentum") or 0.0),
                            "nesterov": bool(h["nesterov"]), "weight_decay": float(h["weight_decay"])},
                "base_momentum": bool(r.get("base_momentum")), "bytes": int(r["bytes"]), "crc": int(r["crc"]),
                "check": _check_name(r.get("check", "crc32")),
                "full": None if full is None else int(full), "always": bool(r.get("always")),
                "part": None if part is None else int(part)}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"malformed recipe ({type(e).__name__}: {e})") from None


def _check_name(check: Any) -> str:
    if check not in CHECKS:
        raise ValueError(f"unknown state checksum {check!r} (known: {', '.join(CHECKS)})")
    return str(check)


def encode_recipe(r: dict[str, Any], *, signing_key: bytes | None = None) -> list[bytes | memoryview]:
    """A version's recipe as a stored object: signed like a checkpoint, since it stands for one."""
    return blobs.encode_parts({}, {"kind": KIND, "recipe": r}, signing_key=signing_key)


def parse_round(raw: Any) -> list[dict[str, Any]]:
    """The recipes of one version as a job's ``recipe`` field holds them: one recipe, or (a job aggregated in
    parts) ``{"version": v, "parts": [recipe of part 0, ...]}``, each of `v` and of its part. ValueError when
    malformed."""
    if not isinstance(raw, dict) or "parts" not in raw:
        return [parse(raw)]
    try:
        version, listed = int(raw["version"]), list(raw["parts"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed recipe ({type(e).__name__}: {e})") from None
    out = [parse(r) for r in listed]
    if not out or any(r["version"] != version or r["part"] != p for p, r in enumerate(out)):
        raise ValueError(f"malformed recipe: its parts are not those of version {version} in order")
    return out


def decode_recipe(data: bytes | bytearray, where: str, *, version: int, signing_key: bytes | None = None,
                  part: int | None = None) -> dict[str, Any]:
    """A stored recipe, verified (signature, digest) and checked to be `version`'s (and `part`'s, for a version
    aggregated in parts) in ``parse``'s form."""
    blob = blobs.decode(data, where, signing_key=signing_key)
    if blob.meta.get("kind") != KIND:
        raise blobs.BlobError(where, f"not a recipe (kind {blob.meta.get('kind')!r})")
    try:
        r = parse(blob.meta.get("recipe"))
    except ValueError as e:
        raise blobs.BlobError(where, str(e)) from None
    if r["version"] != version or r["full"] is None or not 0 <= r["full"] < version or r["part"] != part:
        raise blobs.BlobError(where, f"not the recipe of version {version}{'' if part is None else f' part {part}'} "
                                     f"between full checkpoints (version {r['version']}, full {r['full']}, part "
                                     f"{r['part']})")
    return r
