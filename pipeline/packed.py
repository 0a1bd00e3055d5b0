"""The packed top-k format (codecs ``topk+q8`` / ``topk+q4`` / ``topk+q2``): a whole sparse gradient in one
uint8 tensor, so that a small model's blob is not mostly header.

What a tensor costs here, against the legacy ``topk`` layout (fp32 values, int16/int32 indices, a JSON entry
with name, shape, dtype and k per tensor, three safetensors entries per tensor): ``bits`` per value (sign and
magnitude), ~log2(1/density) + 1.5 bits per index (``pipeline.packing``), and a few bytes of layout. On
digits-cnn (38k parameters) at 1% density the blob goes from ~3.3 kB to ~1.1 kB.

Values: the magnitudes of a tensor's kept values are coded on a uniform grid of L = 2^(bits−1) levels
between their smallest and largest (``lo``, ``hi``, stored as bf16, which keeps fp32's range), the sign in the
top bit; one level (bits = 1) sends sign × mean magnitude. Every kept index carries a non-zero level, unlike
absmax rounding, which spends index bytes on zeros. The encoder computes what is sent with the decoder's own
``levels_to_values``, so error feedback carries exactly what was lost.

Payload (all integers LEB128 varints unless said)::

    n_tensors | per tensor: len(name) name(utf-8) ndim dims... k r(u8) lo(bf16 LE) hi(bf16 LE)
              | per tensor: index high bytes | index low bits (k·r) | value codes (k·bits)

``decode`` checks every length, limit and range and raises ``PackError`` naming the tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pipeline.packing import PackError, Reader, decode_indices, encode_indices, gap_bits, pack_bits, unpack_bits, varint

MAX_TENSORS = 100_000
MAX_NAME_BYTES = 1024
MAX_NDIM = 16
MAX_NUMEL = 2**40


@dataclass(frozen=True)
class Part:
    """One tensor of a packed gradient: its name, shape, kept indices (sorted) and value codes."""

    name: str
    shape: tuple[int, ...]
    indices: np.ndarray  # (k,) int64, strictly increasing
    codes: np.ndarray  # (k,) int64 in [0, 2^bits)
    lo: Tensor  # () bf16
    hi: Tensor  # () bf16


def levels_to_values(codes: Tensor, lo: Tensor, hi: Tensor, bits: int) -> Tensor:
    """Decoded fp32 values of sign/magnitude codes (the one function both sides use)."""
    levels = 1 << (bits - 1)
    mag_code = codes & (levels - 1)
    lo32, hi32 = lo.float(), hi.float()
    step = (hi32 - lo32) / (levels - 1) if levels > 1 else torch.zeros((), dtype=torch.float32)
    mag = lo32 + step * mag_code.to(torch.float32)
    return torch.where((codes >> (bits - 1)) & 1 == 1, -mag, mag)


def quantise(values: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(codes (k,) int64, lo, hi, sent (k,) fp32) for the kept values of one tensor."""
    mags = values.abs()
    levels = 1 << (bits - 1)
    if values.numel() == 0:
        zero = torch.zeros((), dtype=torch.bfloat16)
        return torch.zeros(0, dtype=torch.int64), zero, zero, values.new_zeros(0)
    if levels == 1:
        lo = hi = mags.mean().to(torch.bfloat16)
        mag_code = torch.zeros_like(mags, dtype=torch.int64)
    else:
        lo, hi = mags.min().to(torch.bfloat16), mags.max().to(torch.bfloat16)
        span = float(hi.float() - lo.float())
        scaled = (mags - lo.float()) / span * (levels - 1) if span > 0 else torch.zeros_like(mags)
        mag_code = torch.round(scaled).clamp_(0, levels - 1).to(torch.int64)
    codes = mag_code | ((values < 0).to(torch.int64) << (bits - 1))
    return codes, lo, hi, levels_to_values(codes, lo, hi, bits)


def _bf16_bytes(t: Tensor) -> bytes:
    return t.detach().cpu().reshape(1).view(torch.int16).numpy().astype("<i2").tobytes()  # CUDA encodes too


def encode(parts: list[Part], bits: int) -> Tensor:
    """The packed payload, (n,) uint8."""
    head = bytearray(varint(len(parts)))
    body = bytearray()
    for p in parts:
        name = p.name.encode()
        numel = math.prod(p.shape)
        r = gap_bits(p.indices, numel)
        head += varint(len(name)) + name + varint(len(p.shape)) + b"".join(varint(d) for d in p.shape)
        head += varint(len(p.indices)) + bytes([r]) + _bf16_bytes(p.lo) + _bf16_bytes(p.hi)
        high, low = encode_indices(p.indices, r)
        body += high + low + pack_bits(p.codes, bits)
    return torch.frombuffer(bytearray(head + body), dtype=torch.uint8)  # head holds at least the count


@dataclass(frozen=True)
class Layout:
    name: str
    shape: tuple[int, ...]
    k: int
    r: int
    lo: Tensor
    hi: Tensor


def _bf16(rd: Reader, what: str) -> Tensor:
    raw = rd.take(2, what).astype(np.uint8).tobytes()
    return torch.frombuffer(bytearray(raw), dtype=torch.int16).view(torch.bfloat16)[0].clone()


def read_layout(payload: Tensor) -> tuple[Reader, list[Layout]]:
    """Parse the per-tensor headers; the reader is left at the first tensor's index bytes."""
    if payload.dtype != torch.uint8 or payload.dim() != 1:
        raise PackError(f"packed payload has dtype {payload.dtype} and {payload.dim()} dims, expected 1-D uint8")
    rd = Reader(payload.numpy().tobytes())
    n = rd.varint("tensor count", MAX_TENSORS)
    out: list[Layout] = []
    seen: set[str] = set()
    for i in range(n):
        raw = rd.take(rd.varint(f"tensor {i} name length", MAX_NAME_BYTES), f"tensor {i} name").tobytes()
        try:
            name = raw.decode()
        except UnicodeDecodeError:
            raise PackError(f"tensor {i}: name is not utf-8") from None
        if name in seen:
            raise PackError(f"tensor {name!r} appears twice")
        seen.add(name)
        ndim = rd.varint(f"tensor {name!r} ndim", MAX_NDIM)
        shape = tuple(rd.varint(f"tensor {name!r} dim", MAX_NUMEL) for _ in range(ndim))
        numel = math.prod(shape)
        if numel > MAX_NUMEL:
            raise PackError(f"tensor {name!r}: shape {shape} has more than 2^40 elements")
        k = rd.varint(f"tensor {name!r} k", numel)
        r = int(rd.take(1, f"tensor {name!r} index bits")[0])
        if r >= 32:
            raise PackError(f"tensor {name!r}: index low bits r={r}, expected < 32")
        lo, hi = _bf16(rd, f"tensor {name!r} lo"), _bf16(rd, f"tensor {name!r} hi")
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi)) and 0 <= float(lo) <= float(hi)):
            raise PackError(f"tensor {name!r}: value range lo={float(lo)}, hi={float(hi)} is not 0 ≤ lo ≤ hi, finite")
        out.append(Layout(name, shape, k, r, lo, hi))
    return rd, out


def decode(rd: Reader, layout: list[Layout], bits: int) -> dict[str, Tensor]:
    """Dense fp32 tensors from a reader positioned after the layout; refuses trailing bytes."""
    out: dict[str, Tensor] = {}
    for t in layout:
        numel = math.prod(t.shape)
        idx = decode_indices(rd, t.k, t.r, numel, f"tensor {t.name!r}")
        codes = torch.from_numpy(unpack_bits(rd, t.k, bits, f"tensor {t.name!r} values"))
        dense = torch.zeros(numel, dtype=torch.float32)
        dense[torch.from_numpy(idx)] = levels_to_values(codes, t.lo, t.hi, bits)
        out[t.name] = dense.reshape(t.shape)
    if rd.left():
        raise PackError(f"{rd.left()} bytes after the last tensor")
    return out
