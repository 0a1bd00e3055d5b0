"""The one on-store format for tensors: a self-describing envelope around safetensors bytes.

Layout (all integers little-endian)::

    b"AAST" | u8 format version (1) | u32 header length | header JSON (utf-8) | payload

The header holds ``compression`` ("none" | "zstd"), ``payload_bytes`` (uncompressed size),
``digest`` = sha256(meta JSON ‖ payload as stored), optional ``sig`` = HMAC-SHA256 over the same
bytes, and ``meta``: a JSON object for whatever the writer needs to describe (codec, shapes, base
version, ...). The payload is a safetensors file. Nothing here unpickles anything.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pipeline.reasons import Refusal

MAGIC = b"AAST"
FORMAT = 1
_PRELUDE = struct.Struct("<4sBI")  # magic, format, header length
MAX_HEADER_BYTES = 16 * 1024 * 1024


class BlobError(Refusal):
    """A blob is unreadable, corrupt, unsigned or wrongly signed. The message names the blob."""

    default_code = "corrupt"

    def __init__(self, where: str, reason: str, *, code: str | None = None) -> None:
        super().__init__(f"bad blob {where}: {reason}", code=code)
        self.where = where
        self.reason = reason


@dataclass(frozen=True)
class Blob:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _mac(key: bytes, meta_bytes: bytes, payload: bytes) -> str:
    h = hmac.new(key, digestmod=hashlib.sha256)
    h.update(len(meta_bytes).to_bytes(8, "little"))
    h.update(meta_bytes)
    h.update(payload)
    return h.hexdigest()


def encode(
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any] | None = None,
    *,
    compress: bool = False,
    level: int = 3,
    signing_key: bytes | None = None,
) -> bytes:
    """Serialize tensors (safetensors) with a header; zstd-compress the payload when asked."""
    meta = dict(meta or {})
    raw = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    if compress:
        import zstandard

        payload = zstandard.ZstdCompressor(level=level).compress(raw)
    else:
        payload = raw
    meta_bytes = _canonical(meta)
    header: dict[str, Any] = {
        "compression": "zstd" if compress else "none",
        "payload_bytes": len(raw),
        "digest": hashlib.sha256(meta_bytes + payload).hexdigest(),
        "meta": meta,
    }
    if signing_key:
        header["sig"] = _mac(signing_key, meta_bytes, payload)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return _PRELUDE.pack(MAGIC, FORMAT, len(head)) + head + payload


def read_header(data: bytes, where: str = "<bytes>") -> tuple[dict[str, Any], memoryview]:
    """Parse and verify the envelope; return the header and the (still encoded) payload."""
    if len(data) < _PRELUDE.size:
        raise BlobError(where, f"truncated: {len(data)} bytes is shorter than the {_PRELUDE.size}-byte prelude")
    magic, fmt, hlen = _PRELUDE.unpack_from(data, 0)
    if magic != MAGIC:
        raise BlobError(where, f"not an AaS blob (magic {magic!r}, expected {MAGIC!r})")
    if fmt != FORMAT:
        raise BlobError(where, f"unsupported format version {fmt} (known: {FORMAT})")
    if hlen > MAX_HEADER_BYTES or _PRELUDE.size + hlen > len(data):
        raise BlobError(where, f"truncated or corrupt header (length {hlen}, blob {len(data)} bytes)")
    try:
        header = json.loads(bytes(data[_PRELUDE.size : _PRELUDE.size + hlen]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BlobError(where, f"header is not JSON: {e}") from None
    if not isinstance(header, dict) or not isinstance(header.get("meta"), dict):
        raise BlobError(where, "header lacks a 'meta' object")
    payload = memoryview(data)[_PRELUDE.size + hlen :]
    return header, payload


def decode(
    data: bytes,
    where: str = "<bytes>",
    *,
    signing_key: bytes | None = None,
    max_payload_bytes: int | None = None,
) -> Blob:
    """Verify digest (and signature when a key is given) and return tensors and meta.

    Raises BlobError for any defect; never returns a partially read blob.
    """
    header, payload = read_header(data, where)
    meta = header["meta"]
    try:
        meta_bytes = _canonical(meta)
    except ValueError as e:
        raise BlobError(where, f"meta is not canonical JSON: {e}") from None
    digest = hashlib.sha256(meta_bytes + payload).hexdigest()
    if not hmac.compare_digest(str(header.get("digest", "")), digest):
        raise BlobError(where, "sha256 mismatch: the blob is corrupt or was modified")
    if signing_key:
        sig = header.get("sig")
        if not sig:
            raise BlobError(where, "unsigned, but a signing key is configured", code="signature")
        if not hmac.compare_digest(str(sig), _mac(signing_key, meta_bytes, bytes(payload))):
            raise BlobError(where, "bad signature (HMAC-SHA256 does not match the configured key)", code="signature")
    expected = header.get("payload_bytes")
    if not isinstance(expected, int) or expected < 0:
        raise BlobError(where, "header has no valid payload_bytes")
    if max_payload_bytes is not None and expected > max_payload_bytes:
        raise BlobError(where, f"payload of {expected} bytes exceeds the limit of {max_payload_bytes}",
                        code="too_large")
    comp = header.get("compression")
    if comp == "zstd":
        import zstandard

        try:
            raw = zstandard.ZstdDecompressor().decompress(bytes(payload), max_output_size=expected)
        except zstandard.ZstdError as e:
            raise BlobError(where, f"zstd payload does not decompress: {e}") from None
    elif comp == "none":
        raw = bytes(payload)
    else:
        raise BlobError(where, f"unknown compression {comp!r} (known: none, zstd)")
    if len(raw) != expected:
        raise BlobError(where, f"payload is {len(raw)} bytes, header says {expected}")
    try:
        tensors = st_load(raw)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise BlobError(where, f"payload is not a valid safetensors file: {e}") from None
    return Blob(tensors=tensors, meta=meta)
