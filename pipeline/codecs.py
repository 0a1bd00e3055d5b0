"""Gradient codecs: pure functions from a dict of gradients to safetensors-ready payload tensors and back.

Codecs (``CODECS``):

- ``none``: fp32, dense.
- ``fp16`` / ``bf16``: a cast (2 bytes per element).
- ``int8``: symmetric int8 with one fp32 absmax scale per ``chunk`` elements of the flattened tensor.
- ``topk``: the k = ceil(density · numel) largest |values| of each tensor, as fp32 values + sorted indices,
  with error feedback (Lin et al. 2018, Deep Gradient Compression): what is not sent this step is carried
  in a residual and added to the next step's gradient.
- ``topk+int8``: topk whose values are int8-quantised per chunk; the quantisation error feeds back too.
- ``topk+q8`` / ``topk+q4`` / ``topk+q2``: topk in the packed format (``pipeline/packed.py``): the whole
  gradient in one uint8 tensor, gap-coded indices (~log2(1/density) + 1.5 bits each), 8/4/2-bit sign and
  magnitude values on a per-tensor [lo, hi] grid; the quantisation error feeds back. The JSON header is only
  ``{"codec", "format": 2, "density"}``: names and shapes travel (compressed) inside the payload.

The top-k codecs take the Deep Gradient Compression techniques (Lin et al. 2018, "Deep Gradient Compression:
Reducing the Communication Bandwidth for Distributed Training", ICLR) that make 99%+ sparsity cost no accuracy:

- momentum correction (``CodecConfig.momentum`` m > 0): the worker keeps a velocity u ← m·u + g and
  accumulates v ← v + u (the residual), so what is delayed is the momentum-SGD update, not the raw gradient;
  the aggregator then applies plain SGD (the job's server momentum is 0);
- momentum-factor masking: where v is sent, u is zeroed too, so stale momentum does not push a coordinate
  again after its update was delivered;
- density warm-up (``warmup_density``): exponentially from 25% down to the target over the first steps;
- local gradient clipping (``CodecConfig.clip_norm`` c > 0): each worker scales its gradient to an L2 norm of at
  most c before it enters the velocity and the residual (DGC clips at the sync threshold · N^-1/2 for N
  workers, so that the sum of N clipped gradients is clipped as sync training would clip it).

Small tensors whole (``CodecConfig.dense_below`` n > 0): a tensor of at most n elements (biases, norm gains) is
sent entirely (k = numel, in the same format), as DGC and PowerSGD leave biases uncompressed. At 1% a
128-element LayerNorm gain moves one coordinate a step; these tensors are ~1% of a transformer's parameters, so
sending them whole costs little (char-lm: 404 → 500 bytes a sample with ``topk+q4``).

``encode`` returns an ``Encoded``: payload tensors named ``{name}.values`` / ``{name}.indices`` /
``{name}.scales`` and a JSON header (``meta``) that says how to read them. ``decode`` trusts neither: it
checks every name, dtype, length, index and scale against the header (and the header against the model's
shapes when given) and raises ``CodecError`` naming the blob rather than return a wrong gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pipeline import packed
from pipeline.packing import PackError
from pipeline.reasons import Refusal

PACKED_BITS = {"topk+q8": 8, "topk+q4": 4, "topk+q2": 2}  # packed top-k codecs and their bits per value
CODECS = ("none", "fp16", "bf16", "int8", "topk", "topk+int8", *PACKED_BITS)
FORMAT = 1
PACKED_FORMAT = 2
PACKED_KEY = "packed"  # the one payload tensor of a packed codec
INT8_MAX = 127  # symmetric range [-127, 127]; -128 is never produced
FP16_MAX = 65504.0
_SPARSE = ("topk", "topk+int8", *PACKED_BITS)
ERROR_FEEDBACK = _SPARSE  # the codecs that carry state (a residual) from one step to the next
_QUANTISED = ("int8", "topk+int8")
_VALUE_DTYPE = {
    "none": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "int8": torch.int8,
    "topk": torch.float32,
    "topk+int8": torch.int8,
}


class CodecError(Refusal):
    """A codec config or an encoded gradient is invalid. The message names the blob and the problem."""

    default_code = "corrupt"


@dataclass(frozen=True)
class CodecConfig:
    """Which codec and its knobs. density: topk's fraction kept per tensor (≥ 1 element); chunk: int8
    elements per scale."""

    name: str = "none"
    density: float = 0.01
    chunk: int = 4096
    momentum: float = 0.0  # DGC momentum correction (topk codecs only); 0: plain error feedback
    dense_below: int = 0  # topk codecs: tensors of at most this many elements are sent whole (0: none)
    clip_norm: float = 0.0  # topk codecs: DGC local gradient clipping, the gradient's L2 norm at most this (0: none)

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise CodecError(f"unknown codec {self.name!r} (known: {', '.join(CODECS)})")
        if not (isinstance(self.density, (int, float)) and 0.0 < self.density <= 1.0):
            raise CodecError(f"codec density must be in (0, 1], got {self.density!r}")
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 1:
            raise CodecError(f"codec chunk must be an integer ≥ 1, got {self.chunk!r}")
        if not (isinstance(self.momentum, (int, float)) and 0.0 <= self.momentum < 1.0):
            raise CodecError(f"codec momentum must be in [0, 1), got {self.momentum!r}")
        if self.momentum and self.name not in _SPARSE:
            raise CodecError(f"codec momentum (momentum correction) needs a topk codec, not {self.name!r}")
        if isinstance(self.dense_below, bool) or not isinstance(self.dense_below, int) or self.dense_below < 0:
            raise CodecError(f"codec dense_below must be an integer ≥ 0, got {self.dense_below!r}")
        if not (isinstance(self.clip_norm, (int, float)) and math.isfinite(self.clip_norm) and self.clip_norm >= 0):
            raise CodecError(f"codec clip_norm must be a finite number ≥ 0, got {self.clip_norm!r}")
        if self.clip_norm and self.name not in _SPARSE:
            raise CodecError(f"codec clip_norm (local gradient clipping) needs a topk codec, not {self.name!r}")


@dataclass(frozen=True)
class Encoded:
    """Payload tensors (valid safetensors keys), a JSON-serialisable header, and the error-feedback residual
    (and, with momentum correction, the masked velocity) to pass to the next ``encode`` (None for codecs
    without error feedback / without momentum)."""

    tensors: dict[str, Tensor]
    meta: dict[str, Any]
    residual: dict[str, Tensor] | None
    velocity: dict[str, Tensor] | None = None


def warmup_density(target: float, step: int, warmup_steps: int, start: float = 0.25) -> float:
    """DGC's density warm-up: ``start`` at step 0, falling exponentially to ``target`` at ``warmup_steps`` (and
    ``target`` after); never below the target. DGC uses 25% → 6.25% → 1.56% → 0.4% → 0.1% over 4 epochs."""
    if warmup_steps <= 0 or step >= warmup_steps or target >= start:
        return target
    return max(target, start * (target / start) ** (max(0, step) / warmup_steps))


def clip_scale(grads: dict[str, Tensor], max_norm: float) -> float:
    """The factor that brings the gradients' joint L2 norm down to ``max_norm`` (1.0 when it is already at most
    that, or when the norm is not finite: the encoder then refuses the gradient by name)."""
    norm = math.hypot(*(float(torch.linalg.vector_norm(g.detach(), dtype=torch.float32)) for g in grads.values()))
    return max_norm / norm if math.isfinite(norm) and norm > max_norm else 1.0


def topk_count(numel: int, density: float) -> int:
    """How many elements topk keeps of a tensor: ceil(density · numel), at least 1 (0 for an empty tensor)."""
    if numel == 0:
        return 0
    return min(numel, max(1, math.ceil(density * numel)))


def index_dtype(numel: int) -> torch.dtype:
    """The narrowest signed integer that holds every index of a tensor of ``numel`` elements."""
    return torch.int16 if numel <= 2**15 else torch.int32 if numel < 2**31 else torch.int64


def quantise_int8(x: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """Symmetric per-chunk int8 of a 1-D tensor: (q (n,) int8, scales (ceil(n/chunk),) fp32), x ≈ q · scale."""
    n = x.numel()
    chunks = -(-n // chunk)
    padded = torch.zeros(chunks * chunk, dtype=torch.float32, device=x.device)
    padded[:n] = x
    blocks = padded.view(chunks, chunk)  # (chunks, chunk)
    scales = blocks.abs().amax(dim=1) / INT8_MAX  # (chunks,)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(blocks / safe[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.flatten()[:n], scales


def dequantise_int8(q: Tensor, scales: Tensor, chunk: int) -> Tensor:
    """Inverse of ``quantise_int8``: (n,) fp32."""
    n = q.numel()
    per_elem = scales.repeat_interleave(chunk)[:n] if n else scales.new_zeros(0)  # (n,)
    return q.to(torch.float32) * per_elem


def _check_state(what: str, state: dict[str, Tensor] | None, grads: dict[str, Tensor]) -> None:
    if state is None:
        return
    if set(state) != set(grads):
        raise CodecError(f"{what} names {sorted(state)} do not match the gradient's {sorted(grads)}")
    for key, t in state.items():
        if tuple(t.shape) != tuple(grads[key].shape):
            raise CodecError(f"{what} {key!r} has shape {tuple(t.shape)}, gradient {tuple(grads[key].shape)}")


def encode(grads: dict[str, Tensor], cfg: CodecConfig, residual: dict[str, Tensor] | None = None,
           velocity: dict[str, Tensor] | None = None) -> Encoded:
    """Encode gradients with ``cfg``. For topk codecs the input is grads + residual (with momentum correction:
    velocity' = m·velocity + grads, input = residual + velocity') and the returned residual is that sum minus
    exactly what the receiver will decode; the returned velocity is velocity' zeroed where values were sent.
    With ``cfg.clip_norm`` the gradients are first scaled to that L2 norm over all tensors (never up).
    Other codecs ignore ``residual`` and ``velocity``."""
    name = cfg.name
    ef = name in _SPARSE
    if ef:
        _check_state("residual", residual, grads)
        _check_state("velocity", velocity if cfg.momentum else None, grads)
    scale = clip_scale(grads, cfg.clip_norm) if cfg.clip_norm else 1.0
    new_velocity: dict[str, Tensor] = {}
    payload: dict[str, Tensor] = {}
    layout: dict[str, dict[str, Any]] = {}
    new_residual: dict[str, Tensor] = {}
    parts: list[packed.Part] = []
    for key, g in grads.items():
        if not torch.is_floating_point(g):
            raise CodecError(f"gradient {key!r} has dtype {g.dtype}, expected a floating-point tensor")
        x = g.detach().to(torch.float32).flatten()  # (n,)
        if scale != 1.0:
            x = x * scale
        u = None
        if ef and cfg.momentum:
            u = x if velocity is None else cfg.momentum * velocity[key].detach().to(x).flatten() + x  # (n,)
            x = u
        if ef and residual is not None:
            x = x + residual[key].detach().to(device=x.device, dtype=torch.float32).flatten()
        if not bool(torch.isfinite(x).all()):
            raise CodecError(f"gradient {key!r} has NaN or Inf values; refusing to encode it", code="nonfinite")
        entry: dict[str, Any] = {"shape": list(g.shape), "dtype": str(g.dtype).removeprefix("torch.")}
        if name == "none":
            payload[f"{key}.values"] = x
        elif name in ("fp16", "bf16"):
            if name == "fp16" and x.numel() and float(x.abs().max()) > FP16_MAX:
                raise CodecError(f"gradient {key!r} exceeds the fp16 range (±{FP16_MAX:g}); use bf16 or int8")
            payload[f"{key}.values"] = x.to(_VALUE_DTYPE[name])
        elif name == "int8":
            q, scales = quantise_int8(x, cfg.chunk)
            payload[f"{key}.values"], payload[f"{key}.scales"] = q, scales
        else:
            k = x.numel() if x.numel() <= cfg.dense_below else topk_count(x.numel(), cfg.density)
            idx = torch.topk(x.abs(), k, sorted=False).indices.sort().values  # (k,) ascending
            vals = x[idx]  # (k,)
            if name in PACKED_BITS:
                codes, lo, hi, sent = packed.quantise(vals, PACKED_BITS[name])
                parts.append(packed.Part(key, tuple(g.shape), idx.cpu().numpy(), codes.cpu().numpy(), lo, hi))
            elif name == "topk+int8":
                q, scales = quantise_int8(vals, cfg.chunk)
                payload[f"{key}.values"], payload[f"{key}.scales"] = q, scales
                sent = dequantise_int8(q, scales, cfg.chunk)
            else:
                payload[f"{key}.values"] = vals
                sent = vals
            if name not in PACKED_BITS:
                payload[f"{key}.indices"] = idx.to(index_dtype(x.numel()))
            rest = x.clone()
            rest[idx] -= sent  # what was not delivered, including int8 rounding error
            new_residual[key] = rest.view(g.shape)
            if u is not None:
                u = u.clone()
                u[idx] = 0.0  # momentum-factor masking
                new_velocity[key] = u.view(g.shape)
            entry["k"] = k
        layout[key] = entry
    meta: dict[str, Any] = {"codec": name, "format": FORMAT, "tensors": layout}
    if name in PACKED_BITS:  # the layout travels inside the payload
        payload = {PACKED_KEY: packed.encode(parts, PACKED_BITS[name])}
        meta = {"codec": name, "format": PACKED_FORMAT}
    if name in _SPARSE:
        meta["density"] = float(cfg.density)
    if name in _QUANTISED:
        meta["chunk"] = cfg.chunk
    return Encoded(tensors=payload, meta=meta, residual=new_residual if ef else None,
                   velocity=new_velocity if ef and cfg.momentum else None)


def encoded_nbytes(enc: Encoded) -> int:
    """Bytes of payload tensor data (what safetensors stores, before zstd and headers)."""
    return sum(t.numel() * t.element_size() for t in enc.tensors.values())


# ---------------------------------------------------------------- decode


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_fit(shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str) -> None:
    if set(shapes) != set(expected):
        missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
        raise CodecError(f"blob {where} does not fit the model: missing tensors {missing}, unexpected {extra}",
                         code="shape")
    for key, shape in shapes.items():
        if tuple(shape) != tuple(expected[key]):
            raise CodecError(f"tensor {key!r} in blob {where} has shape {tuple(shape)}, "
                             f"the model's is {tuple(expected[key])}")


def _decode_packed(tensors: dict[str, Tensor], meta: dict[str, Any], where: str,
                   expected_shapes: dict[str, tuple[int, ...]] | None) -> dict[str, Tensor]:
    """Decode a packed top-k payload; the model's shapes (when given) are checked before anything is allocated."""
    name = meta["codec"]
    if meta.get("format") != PACKED_FORMAT:
        raise CodecError(f"unsupported format {meta.get('format')!r} for codec {name} in blob {where} "
                         f"(known: {PACKED_FORMAT})")
    if set(tensors) != {PACKED_KEY}:
        raise CodecError(f"payload of blob {where} holds {sorted(tensors)[:5]}; codec {name} expects one "
                         f"tensor {PACKED_KEY!r}")
    try:
        reader, layout = packed.read_layout(tensors[PACKED_KEY])
        if expected_shapes is not None:
            _check_fit({t.name: t.shape for t in layout}, expected_shapes, where)
        out = packed.decode(reader, layout, PACKED_BITS[name])
    except PackError as e:
        raise CodecError(f"packed {name} payload of blob {where} is malformed: {e}") from None
    return out


def _header(meta: Any, where: str) -> tuple[str, dict[str, dict[str, Any]], int]:
    """Validate the header's structure; return (codec, layout, chunk)."""
    if not isinstance(meta, dict):
        raise CodecError(f"codec header in blob {where} is {type(meta).__name__}, expected an object")
    name = meta.get("codec")
    if name not in CODECS:
        raise CodecError(f"unknown codec {name!r} in blob {where} (known: {', '.join(CODECS)})")
    if meta.get("format") != FORMAT:
        raise CodecError(f"unsupported codec format {meta.get('format')!r} in blob {where} (known: {FORMAT})")
    chunk = meta.get("chunk", 0)
    if name in _QUANTISED and not (_is_int(chunk) and chunk >= 1):
        raise CodecError(f"codec {name} in blob {where} needs an integer chunk ≥ 1, header has {chunk!r}")
    layout = meta.get("tensors")
    if not isinstance(layout, dict):
        raise CodecError(f"codec header in blob {where} lacks a 'tensors' object")
    for key, e in layout.items():
        shape = e.get("shape") if isinstance(e, dict) else None
        if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
            raise CodecError(f"tensor {key!r} in blob {where}: header shape {shape!r} is not a list of sizes")
        if name in _SPARSE:
            k = e.get("k")
            if not (_is_int(k) and 0 <= k <= math.prod(shape)):
                raise CodecError(f"tensor {key!r} in blob {where}: header k={k!r} outside [0, {math.prod(shape)}]")
    return name, layout, int(chunk)


def _payload(tensors: dict[str, Tensor], key: str, part: str, dtypes: tuple[torch.dtype, ...], n: int,
             where: str) -> Tensor:
    t = tensors[f"{key}.{part}"]
    if t.dtype not in dtypes:
        want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise CodecError(f"tensor {key!r} in blob {where}: {part} have dtype {t.dtype}, expected {want}")
    if t.dim() != 1 or t.numel() != n:
        raise CodecError(f"tensor {key!r} in blob {where}: {part} have shape {tuple(t.shape)}, header implies ({n},)")
    return t


def _scales(tensors: dict[str, Tensor], key: str, n: int, chunk: int, where: str) -> Tensor:
    s = _payload(tensors, key, "scales", (torch.float32,), -(-n // chunk), where)
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise CodecError(f"tensor {key!r} in blob {where}: scales must be finite and ≥ 0")
    return s


def decode(tensors: dict[str, Tensor], meta: dict[str, Any], where: str = "<blob>",
           expected_shapes: dict[str, tuple[int, ...]] | None = None, *, check_finite: bool = True
           ) -> dict[str, Tensor]:
    """Dense fp32 gradients from payload tensors and header. Raises CodecError naming ``where`` for any
    disagreement between header, payload and (when given) the model's shapes; never returns a partial result.
    An fp32 payload is returned as views of `tensors` (no copy). Without `check_finite` the caller checks
    finiteness itself (the sync aggregator does, once, on the sum of a round's updates)."""
    if isinstance(meta, dict) and meta.get("codec") in PACKED_BITS:
        return _decode_packed(tensors, meta, where, expected_shapes)
    name, layout, chunk = _header(meta, where)
    if expected_shapes is not None:
        _check_fit({key: tuple(e["shape"]) for key, e in layout.items()}, expected_shapes, where)
    parts = ["values"] + (["indices"] if name in _SPARSE else []) + (["scales"] if name in _QUANTISED else [])
    want = {f"{key}.{p}" for key in layout for p in parts}
    if set(tensors) != want:
        missing, extra = sorted(want - set(tensors)), sorted(set(tensors) - want)
        raise CodecError(f"payload of blob {where} disagrees with its {name} header: "
                         f"missing {missing[:5]}, unexpected {extra[:5]}")
    out: dict[str, Tensor] = {}
    for key, e in layout.items():
        shape = tuple(e["shape"])
        numel = math.prod(shape)
        n = int(e["k"]) if name in _SPARSE else numel
        v = _payload(tensors, key, "values", (_VALUE_DTYPE[name],), n, where)
        vals = dequantise_int8(v, _scales(tensors, key, n, chunk, where), chunk) if name in _QUANTISED else v.float()
        if name in _SPARSE:
            idx = _payload(tensors, key, "indices", (torch.int16, torch.int32, torch.int64), n, where).to(torch.int64)
            if n and (int(idx.min()) < 0 or int(idx.max()) >= numel):
                raise CodecError(f"tensor {key!r} in blob {where}: indices outside [0, {numel})")
            if n > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise CodecError(f"tensor {key!r} in blob {where}: indices are not strictly increasing "
                                 "(duplicated or unsorted)")
            dense = torch.zeros(numel, dtype=torch.float32)
            dense[idx] = vals
            vals = dense
        if check_finite and not bool(torch.isfinite(vals).all()):
            raise CodecError(f"tensor {key!r} in blob {where}: decoded values contain NaN or Inf", code="nonfinite")
        out[key] = vals.reshape(shape)
    return out
