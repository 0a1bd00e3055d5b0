"""Serving artifacts: a model's weights packed for inference, rebuilt into a ready-to-serve module.

An artifact is a blob (``pipeline.blobs``) whose meta names the model, its arguments and how each tensor
was packed. The packing chain (``ArtifactChain``) is, in order:

1. magnitude pruning of weight tensors (ndim ≥ 2): w · I(|w| > τ), or the smallest-|w| fraction of each
   layer set to zero;
2. quantisation of weight tensors: fp16, int8 symmetric per output channel (dim 0, one fp32 scale per
   channel), or int4 symmetric per group of G consecutive elements of the flattened tensor (codes in
   [-7, 7], two per byte, one fp16 scale per group; "int4:G", G = 64 by default); biases and other 1-D
   tensors stay fp32;
3. sparse storage: a tensor with zeros is stored as a bitmask + nonzero values, or as int32 indices +
   values, whichever is smallest (dense otherwise), so pruned zeros cost ≤ 1 bit;
4. zstd over the whole safetensors payload.

``load_artifact`` never unpickles: it rebuilds the module from the model registry, checks every packed
tensor against the module's own shapes, and loads dense fp32 (dequantised) weights into it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from pipeline import blobs, tensorfile
from pipeline.codecs import INT8_MAX
from pipeline.models import build_model

KIND = "artifact"
PACKING = "packed/1"
LEGACY_PACKING = "fp32"  # artifacts written before the chain existed: fp32 tensors under their own names
FP16_MAX = 65504.0
QUANTIZE = ("none", "fp16", "int8", "int4")
INT4_MAX = 7  # symmetric range [-7, 7]; the nibble 0b1000 (-8) is never written and refused on read
INT4_GROUP = 64  # default elements per fp16 scale: 0.25 bit of scale per weight
INT4_GROUPS = (8, 4096)  # the group sizes a chain may ask for (inclusive)
_STEPS = ("none, fp32, fp16, int8, int4[:group], prune:<fraction of zeros>, threshold:<tau>, sparse, dense, "
          "zstd")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}


class ChainError(ValueError):
    """An artifact chain that cannot be built (bad step, conflicting steps, out-of-range number)."""


@dataclass(frozen=True)
class ArtifactChain:
    """How a serving artifact is derived from training weights. Default: fp32, zstd.

    prune_threshold: zero weights with |w| ≤ τ; prune_sparsity: zero that fraction of each weight tensor
    (smallest |w| first); at most one of the two. quantize: weight tensors (ndim ≥ 2) to fp16, per-channel
    int8 or per-group int4 (group: elements per fp16 scale, int4 only).
    sparse: store tensors with zeros as bitmask/indices + values when that is smaller.
    """

    prune_threshold: float | None = None
    prune_sparsity: float | None = None
    quantize: Literal["none", "fp16", "int8", "int4"] = "none"
    sparse: bool = True
    zstd: bool = True
    group: int = INT4_GROUP

    def __post_init__(self) -> None:
        if self.prune_threshold is not None and self.prune_sparsity is not None:
            raise ChainError("prune_threshold and prune_sparsity are mutually exclusive; give one")
        if self.prune_threshold is not None and not (math.isfinite(self.prune_threshold) and self.prune_threshold >= 0):
            raise ChainError(f"prune_threshold must be a finite number ≥ 0, got {self.prune_threshold!r}")
        if self.prune_sparsity is not None and not (0.0 <= self.prune_sparsity < 1.0):
            raise ChainError(f"prune_sparsity must be in [0, 1), got {self.prune_sparsity!r}")
        if self.quantize not in QUANTIZE:
            raise ChainError(f"unknown quantize {self.quantize!r} (known: {', '.join(QUANTIZE)})")
        lo, hi = INT4_GROUPS
        if isinstance(self.group, bool) or not isinstance(self.group, int) or not lo <= self.group <= hi:
            raise ChainError(f"int4 group size must be an integer in [{lo}, {hi}], got {self.group!r}")
        if self.group != INT4_GROUP and self.quantize != "int4":
            raise ChainError(f"a group size ({self.group}) applies to int4 only, not to quantize {self.quantize!r}")

    @classmethod
    def parse(cls, text: str) -> ArtifactChain:
        """Parse a job-spec string such as "prune:0.5,int8,zstd", "fp16" or "none" (steps separated by ',' or
        '+'). The string is the whole chain: zstd applies only when listed."""
        steps = [s.strip().lower() for s in text.replace("+", ",").split(",")]
        if steps == ["none"] or steps == [""]:
            return cls(zstd=False)
        kw: dict[str, Any] = {"zstd": False}
        seen: set[str] = set()
        for step in steps:
            head, _, arg = step.partition(":")
            group = {"fp32": "quantize", "fp16": "quantize", "int8": "quantize", "int4": "quantize",
                     "prune": "prune", "threshold": "prune", "sparse": "sparse", "dense": "sparse",
                     "zstd": "zstd"}.get(head)
            if group is None or (bool(arg) != (head in ("prune", "threshold")) and not (head == "int4")):
                raise ChainError(f"unknown step {step!r} in artifact chain {text!r} (known: {_STEPS})")
            if group in seen:
                raise ChainError(f"artifact chain {text!r} sets {group} twice")
            seen.add(group)
            if group == "quantize":
                kw["quantize"] = "none" if head == "fp32" else head
                if arg:
                    if not arg.isdigit():
                        raise ChainError(f"step {step!r} in artifact chain {text!r}: group {arg!r} is not an integer")
                    kw["group"] = int(arg)
            elif group == "prune":
                try:
                    value = float(arg)
                except ValueError:
                    raise ChainError(f"step {step!r} in artifact chain {text!r}: {arg!r} is not a number") from None
                kw["prune_sparsity" if head == "prune" else "prune_threshold"] = value
            else:
                kw[group] = head != "dense"
        return cls(**kw)

    def describe(self) -> str:
        """The canonical chain string; ``ArtifactChain.parse(c.describe()) == c``."""
        steps = []
        if self.prune_sparsity is not None:
            steps.append(f"prune:{self.prune_sparsity:g}")
        if self.prune_threshold is not None:
            steps.append(f"threshold:{self.prune_threshold:g}")
        if self.quantize == "int4" and self.group != INT4_GROUP:
            steps.append(f"int4:{self.group}")
        elif self.quantize != "none":
            steps.append(self.quantize)
        if not self.sparse:
            steps.append("dense")
        if self.zstd:
            steps.append("zstd")
        return ",".join(steps) or "none"


@dataclass(frozen=True)
class LoadedArtifact:
    model: nn.Module
    meta: dict[str, Any]


# ---------------------------------------------------------------- packing


def prune(w: Tensor, chain: ArtifactChain) -> Tensor:
    """Magnitude pruning of one weight tensor (any shape) as the chain says; a new tensor."""
    if chain.prune_threshold is not None:
        return w * (w.abs() > chain.prune_threshold)
    if chain.prune_sparsity:
        flat = w.flatten()
        keep = flat.numel() - round(chain.prune_sparsity * flat.numel())
        out = torch.zeros_like(flat)
        idx = torch.topk(flat.abs(), keep, sorted=False).indices
        out[idx] = flat[idx]
        return out.view_as(w)
    return w.clone()


def quantize_per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per output channel: w (C, ...) → (q (C, ...) int8, scales (C,) fp32), w ≈ q · scale."""
    if w.numel() == 0:
        return w.to(torch.int8), torch.zeros(w.shape[0])
    flat = w.reshape(w.shape[0], -1)  # (C, rest)
    scales = flat.abs().amax(dim=1) / INT8_MAX  # (C,)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(flat / safe[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.view(w.shape), scales


def quantize_int4_groups(w: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """Symmetric int4 per group of ``group`` consecutive elements of the flattened tensor:
    w (any shape, n elements) → (codes (n,) int8 in [-7, 7], scales (ceil(n/group),) fp16), w ≈ code · scale.
    The codes are rounded against the fp16 scale that is stored, so dequantising reproduces the served weight."""
    flat = w.flatten().to(torch.float32)
    n = flat.numel()
    groups = -(-n // group)
    padded = torch.zeros(groups * group, dtype=torch.float32)
    padded[:n] = flat
    blocks = padded.view(groups, group)  # (groups, group)
    absmax = blocks.abs().amax(dim=1)  # (groups,)
    if groups and float(absmax.max()) / INT4_MAX > FP16_MAX:
        raise ChainError(f"weights exceed the int4 fp16-scale range (|w| ≤ {FP16_MAX * INT4_MAX:g})")
    scales = (absmax / INT4_MAX).to(torch.float16)  # (groups,)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales)).to(torch.float32)
    codes = torch.round(blocks / safe[:, None]).clamp_(-INT4_MAX, INT4_MAX).to(torch.int8)
    return codes.flatten()[:n], scales


def pack_nibbles(codes: Tensor) -> Tensor:
    """int8 codes in [-8, 7] (n,) → uint8 (ceil(n/2),): element 2j in the low nibble of byte j, 2j+1 in the high
    one, two's complement; an odd count pads the last high nibble with 0."""
    n = codes.numel()
    padded = torch.zeros(-(-n // 2) * 2, dtype=torch.uint8)
    padded[:n] = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    pairs = padded.view(-1, 2)  # (ceil(n/2), 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles(packed: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """uint8 (ceil(n/2),) → (codes (n,) int8, nibbles (ceil(n/2)·2,) uint8); the caller checks the nibbles."""
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=1).flatten()  # (2·len,)
    codes = nibbles[:n].to(torch.int8)
    codes = torch.where(codes >= 8, codes - 16, codes).to(torch.int8)
    return codes, nibbles


def pack_bits(mask: Tensor) -> Tensor:
    """Bool (n,) → uint8 (ceil(n/8),), bit i of byte j is element 8j + i."""
    n = mask.numel()
    padded = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8)
    padded[:n] = mask.to(torch.uint8)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    return (padded.view(-1, 8) * weights).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    """uint8 (ceil(n/8),) → bool (ceil(n/8)·8,); the caller checks the padding bits."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((packed[:, None] >> shifts) & 1).flatten().bool()


def _pack_tensor(name: str, w: Tensor, chain: ArtifactChain, out: dict[str, Tensor]) -> tuple[dict[str, Any], int]:
    """Pack one state-dict tensor into ``out``; return its layout entry and how many zeros it serves."""
    entry: dict[str, Any] = {"shape": list(w.shape)}
    if not torch.is_floating_point(w):  # integer buffers (e.g. BatchNorm's num_batches_tracked) pass through
        entry.update(dtype=str(w.dtype).removeprefix("torch."), raw=True)
        out[f"{name}.values"] = w.contiguous()
        return entry, 0
    w = w.to(torch.float32)
    nibbles = False
    if w.dim() >= 2:
        w = prune(w, chain)
        if chain.quantize == "int4":
            w, out[f"{name}.scales"] = quantize_int4_groups(w, chain.group)
            entry["group"] = chain.group
            nibbles = True
        elif chain.quantize == "int8":
            w, out[f"{name}.scales"] = quantize_per_channel(w)
        elif chain.quantize == "fp16":
            if w.numel() and float(w.abs().max()) > FP16_MAX:
                raise ChainError(f"weight {name!r} exceeds the fp16 range (±{FP16_MAX:g}); use int8")
            w = w.to(torch.float16)
    entry["dtype"] = "int4" if nibbles else str(w.dtype).removeprefix("torch.")
    flat = w.flatten()
    nz = flat != 0
    nnz = int(nz.sum())
    es = 0.5 if nibbles else flat.element_size()
    # Bytes each layout stores (before zstd); ties keep dense. coo's int32 indices cap it below 2^31 elements.
    size = {"dense": flat.numel() * es, "bitmask": -(-flat.numel() // 8) + nnz * es, "coo": nnz * (es + 4)}
    options = ("dense", "bitmask", "coo") if flat.numel() < 2**31 else ("dense", "bitmask")
    layout = min(options, key=lambda k: size[k]) if chain.sparse else "dense"
    entry["layout"] = layout
    store = pack_nibbles if nibbles else (lambda t: t)
    if layout == "dense":
        out[f"{name}.values"] = store(flat)
    else:
        entry["nnz"] = nnz
        out[f"{name}.values"] = store(flat[nz])
        if layout == "bitmask":
            out[f"{name}.mask"] = pack_bits(nz)
        else:
            out[f"{name}.indices"] = nz.nonzero().flatten().to(torch.int32)
    return entry, flat.numel() - nnz


def build_artifact(
    model_name: str,
    model_args: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    *,
    chain: ArtifactChain | None = None,
    meta: dict[str, Any] | None = None,
    signing_key: bytes | None = None,
    as_parts: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """Pack weights into artifact bytes. Returns (bytes, stats): raw_bytes (the fp32 safetensors size of the
    state dict), stored_bytes, ratio = raw/stored, sparsity (fraction of zeros in the served float weights).
    With `as_parts` the bytes are a list of buffers (the weights' own memory where they are served as they
    are) for ``Registry.register`` to write without joining them: a 4 GB model makes no 4 GB copy."""
    chain = chain or ArtifactChain()
    state = {k: v.detach().cpu() for k, v in state_dict.items()}
    # The fp32 safetensors file's size, computed from shapes (nothing is encoded to count its bytes).
    raw_bytes = tensorfile.file_size({k: (tuple(v.shape), torch.float32 if torch.is_floating_point(v) else v.dtype)
                                      for k, v in state.items()})
    payload: dict[str, Tensor] = {}
    layout: dict[str, dict[str, Any]] = {}
    zeros = floats = 0
    for name, w in state.items():
        layout[name], z = _pack_tensor(name, w, chain, payload)
        zeros += z
        floats += w.numel() if torch.is_floating_point(w) else 0
    m = {**(meta or {}), "kind": KIND, "model": model_name, "model_args": model_args, "packing": PACKING,
         "chain": chain.describe(), "tensors": layout}
    # zstd level 3: level 19 saves < 0.1% on weights and is ~100x slower on a 100 MB model.
    parts = blobs.encode_parts(payload, m, compress=chain.zstd, signing_key=signing_key)
    stored = blobs.size_of(parts)
    stats = {"raw_bytes": raw_bytes, "stored_bytes": stored, "ratio": raw_bytes / max(1, stored),
             "sparsity": zeros / max(1, floats), "chain": chain.describe()}
    return (parts if as_parts else b"".join(parts)), stats


# ---------------------------------------------------------------- unpacking


def _part(blob: blobs.Blob, name: str, part: str, dtype: torch.dtype, n: int, where: str) -> Tensor:
    t = blob.tensors.get(f"{name}.{part}")
    if t is None:
        raise blobs.BlobError(where, f"tensor {name!r}: the payload has no {part}")
    if t.dtype != dtype or t.dim() != 1 or t.numel() != n:
        raise blobs.BlobError(where, f"tensor {name!r}: {part} are {t.dtype} {tuple(t.shape)}, "
                                     f"the header implies {dtype} ({n},)")
    return t


def _unpack_tensor(blob: blobs.Blob, name: str, e: dict[str, Any], ref: Tensor, where: str) -> tuple[Tensor, set[str]]:
    """One dense tensor (fp32 for float weights) and the payload keys it used."""
    numel, shape = ref.numel(), tuple(ref.shape)
    if e.get("raw"):
        if torch.is_floating_point(ref) or e.get("dtype") != str(ref.dtype).removeprefix("torch."):
            raise blobs.BlobError(where, f"tensor {name!r}: raw {e.get('dtype')!r} where the model has {ref.dtype}")
        return _part(blob, name, "values", ref.dtype, numel, where).reshape(shape), {f"{name}.values"}
    int4 = e.get("dtype") == "int4"
    dtype = torch.int8 if int4 else _DTYPES.get(str(e.get("dtype")))
    quantised = dtype in (torch.int8, torch.float16)
    if dtype is None or not torch.is_floating_point(ref) or (quantised and ref.dim() < 2):
        raise blobs.BlobError(where, f"tensor {name!r}: stored dtype {e.get('dtype')!r} cannot serve a "
                                     f"{ref.dim()}-D {ref.dtype} tensor")
    layout, used = e.get("layout"), {f"{name}.values"}

    def values(n: int) -> Tensor:
        if not int4:
            return _part(blob, name, "values", dtype, n, where)
        codes, nibbles = unpack_nibbles(_part(blob, name, "values", torch.uint8, -(-n // 2), where), n)
        if bool((nibbles == 8).any()) or bool(nibbles[n:].any()):
            raise blobs.BlobError(where, f"tensor {name!r}: int4 codes outside [-7, 7] or padding nibble set")
        return codes

    if layout == "dense":
        flat = values(numel)
    elif layout in ("bitmask", "coo"):
        nnz = e.get("nnz")
        if not (isinstance(nnz, int) and not isinstance(nnz, bool) and 0 <= nnz <= numel):
            raise blobs.BlobError(where, f"tensor {name!r}: nnz {nnz!r} outside [0, {numel}]")
        vals = values(nnz)
        if layout == "bitmask":
            bits = unpack_bits(_part(blob, name, "mask", torch.uint8, -(-numel // 8), where), numel)
            if bool(bits[numel:].any()) or int(bits.sum()) != nnz:
                raise blobs.BlobError(where, f"tensor {name!r}: bitmask does not hold exactly {nnz} set bits")
            idx = bits[:numel].nonzero().flatten()
        else:
            idx = _part(blob, name, "indices", torch.int32, nnz, where).to(torch.int64)
            if nnz and (int(idx.min()) < 0 or int(idx.max()) >= numel):
                raise blobs.BlobError(where, f"tensor {name!r}: indices outside [0, {numel})")
            if nnz > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise blobs.BlobError(where, f"tensor {name!r}: indices are not strictly increasing")
        used.add(f"{name}.{'mask' if layout == 'bitmask' else 'indices'}")
        flat = torch.zeros(numel, dtype=dtype)
        flat[idx] = vals
    else:
        raise blobs.BlobError(where, f"tensor {name!r}: unknown layout {layout!r} (known: dense, bitmask, coo)")
    if int4:
        group = e.get("group")
        lo, hi = INT4_GROUPS
        if not (isinstance(group, int) and not isinstance(group, bool) and lo <= group <= hi):
            raise blobs.BlobError(where, f"tensor {name!r}: int4 group {group!r} outside [{lo}, {hi}]")
        scales = _part(blob, name, "scales", torch.float16, -(-numel // group), where).to(torch.float32)
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise blobs.BlobError(where, f"tensor {name!r}: group scales must be finite and ≥ 0")
        used.add(f"{name}.scales")
        dense = flat.to(torch.float32) * scales.repeat_interleave(group)[:numel]
    elif dtype == torch.int8:
        scales = _part(blob, name, "scales", torch.float32, shape[0], where)
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise blobs.BlobError(where, f"tensor {name!r}: channel scales must be finite and ≥ 0")
        used.add(f"{name}.scales")
        dense = flat.view(shape[0], numel // max(1, shape[0])).to(torch.float32) * scales[:, None]  # (C, rest)
    else:
        dense = flat.to(torch.float32)
    if not bool(torch.isfinite(dense).all()):
        raise blobs.BlobError(where, f"tensor {name!r}: weights contain NaN or Inf")
    return dense.reshape(shape), used


def _unpack(data: bytes, where: str, signing_key: bytes | None) -> tuple[dict[str, Any], nn.Module, dict[str, Tensor]]:
    """Verify the blob, rebuild the (untrained) module, and decode every tensor against its shapes."""
    blob = blobs.decode(data, where, signing_key=signing_key)
    meta = blob.meta
    if meta.get("kind") != KIND:
        raise blobs.BlobError(where, f"not a serving artifact (kind {meta.get('kind')!r})")
    packing = meta.get("packing")
    if packing not in (PACKING, LEGACY_PACKING):
        raise blobs.BlobError(where, f"unknown packing {packing!r} (known: {PACKING}, {LEGACY_PACKING})")
    try:
        model = build_model(str(meta["model"]), dict(meta.get("model_args") or {}))
    except Exception as e:  # noqa: BLE001 - a user factory may raise anything; the artifact is what is wrong
        raise blobs.BlobError(where, f"cannot rebuild model {meta.get('model')!r}: {e}") from None
    refs = model.state_dict()
    layout = meta.get("tensors") if packing == PACKING else {k: "legacy" for k in blob.tensors}
    if not isinstance(layout, dict):
        raise blobs.BlobError(where, "header lacks a 'tensors' object")
    if set(layout) != set(refs):
        missing, extra = sorted(set(refs) - set(layout)), sorted(set(layout) - set(refs))
        raise blobs.BlobError(where, f"weights do not fit model {meta['model']!r}: missing {missing[:5]}, "
                                     f"unexpected {extra[:5]}")
    state: dict[str, Tensor] = {}
    used: set[str] = set()
    for name, ref in refs.items():
        e = layout[name]
        if packing == LEGACY_PACKING:
            t = blob.tensors[name]
            if tuple(t.shape) != tuple(ref.shape) or (t.is_floating_point() and not bool(torch.isfinite(t).all())):
                raise blobs.BlobError(where, f"tensor {name!r}: shape {tuple(t.shape)} or values do not fit the model")
            state[name], keys = t.to(ref.dtype), {name}
        elif not isinstance(e, dict) or e.get("shape") != list(ref.shape):
            shape = e.get("shape") if isinstance(e, dict) else e
            raise blobs.BlobError(where, f"tensor {name!r}: header shape {shape!r}, the model's is {list(ref.shape)}")
        else:
            state[name], keys = _unpack_tensor(blob, name, e, ref, where)
        used |= keys
    if used != set(blob.tensors):
        raise blobs.BlobError(where, f"payload holds tensors the header does not describe: "
                                     f"{sorted(set(blob.tensors) - used)[:5]}")
    return meta, model, state


def dequantized_state(data: bytes, where: str = "<artifact>", *, signing_key: bytes | None = None) -> dict[str, Tensor]:
    """The dense weights an artifact serves (fp32 for float tensors, dequantised), checked like ``load_artifact``."""
    return _unpack(data, where, signing_key)[2]


def load_artifact(
    data: bytes, where: str = "<artifact>", *, signing_key: bytes | None = None, device: str = "cpu"
) -> LoadedArtifact:
    """Verify and decode an artifact, rebuild the module, load the weights, and return it in eval mode."""
    meta, model, state = _unpack(data, where, signing_key)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as e:
        raise blobs.BlobError(where, f"weights do not fit model {meta.get('model')!r}: {e}") from None
    return LoadedArtifact(model=model.to(device).eval(), meta=meta)
