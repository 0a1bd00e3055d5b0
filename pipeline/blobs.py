"""The one on-store format for tensors: a self-describing envelope around safetensors bytes.

Layout (all integers little-endian)::

    b"AAST" | u8 format version (2) | u32 header length | header JSON (utf-8, space-padded) | payload

The header holds ``compression`` ("none" | "zstd"), ``payload_bytes`` (uncompressed size),
``digest`` = BLAKE3(meta JSON ‖ payload as stored) (formats 1 and 2, still read: SHA-256), optional ``sig`` =
HMAC-SHA256 of that digest (format 1: HMAC over the bytes themselves), and ``meta``: a JSON object for whatever
the writer needs to describe (codec, shapes, base version, ...). The payload is a safetensors file whose
data starts 64-byte aligned, so tensors are read as views of the blob (``pipeline/tensorfile.py``).
A reader makes one pass over the bytes (the digest); nothing here unpickles anything.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from pipeline import tensorfile
from pipeline.reasons import Refusal

MAGIC = b"AAST"
# 1: the signature covered the whole blob; 2: it covers the digest (one pass); 3: the digest is BLAKE3 (~6 GB/s
# on one core here) instead of SHA-256 (~1.2-1.7 GB/s), which bounded the aggregator's fold. All three are read.
FORMAT = 3
FORMATS = (1, 2, 3)
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


def _mac(key: bytes, meta_bytes: bytes, payload: bytes | memoryview) -> str:
    """Format 1's signature: HMAC over the whole blob (a second pass over its bytes)."""
    h = hmac.new(key, digestmod=hashlib.sha256)
    h.update(len(meta_bytes).to_bytes(8, "little"))
    h.update(meta_bytes)
    h.update(payload)
    return h.hexdigest()


def _mac_digest(key: bytes, digest: str, fmt: int) -> str:
    """Formats 2 and 3's signature: HMAC over the digest the reader computes anyway (hash-then-MAC), so a
    signed blob is read in one pass over its bytes, not two. The format is in the MAC's input."""
    return hmac.new(key, f"aas-blob-v{fmt}:".encode() + digest.encode(), hashlib.sha256).hexdigest()


def writing_format() -> int:
    """The format this process writes (``AAS_BLOB_FORMAT``): 2 during a rolling upgrade from a release that reads
    only formats 1 and 2, else 3."""
    from pipeline.settings import get_settings

    return int(get_settings().blob_format)


def hasher(fmt: int, meta_bytes: bytes) -> Any:
    """The digest's hash of format `fmt`, fed the canonical meta: BLAKE3 from format 3, SHA-256 before. Its
    ``update`` releases the GIL on large buffers (both)."""
    if fmt >= 3:
        import blake3

        return blake3.blake3(meta_bytes)
    return hashlib.sha256(meta_bytes)


def digest_name(fmt: int) -> str:
    return "blake3" if fmt >= 3 else "sha256"


def _digest(meta_bytes: bytes, parts: list[bytes | memoryview] | tuple[bytes | memoryview, ...], fmt: int) -> str:
    h = hasher(fmt, meta_bytes)
    for p in parts:
        h.update(p)
    return str(h.hexdigest())


def encode_parts(
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any] | None = None,
    *,
    compress: bool = False,
    level: int = 3,
    signing_key: bytes | None = None,
    fmt: int | None = None,
) -> list[bytes | memoryview]:
    """The blob as a list of buffers (envelope, then each tensor's own memory): write them as they are.

    Concatenated they are the bytes ``encode`` returns. Uncompressed, no tensor is copied: a 4 GB model
    costs no extra 4 GB (or 8: safetensors' ``save`` and the concatenation each made one). `fmt`: 3 (BLAKE3) or 2
    (SHA-256, what a release before format 3 reads); None: the process's ``AAS_BLOB_FORMAT`` (default 3).
    """
    if fmt is None:
        fmt = writing_format()
    if fmt not in (2, 3):
        raise ValueError(f"blobs are written in format 2 or 3, not {fmt}")
    meta = dict(meta or {})
    st_head, views = tensorfile.dump(tensors)
    payload: list[bytes | memoryview] = [st_head, *views]
    raw_len = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in payload)
    if compress:
        import zstandard

        payload = [zstandard.ZstdCompressor(level=level).compress(b"".join(payload))]
    meta_bytes = _canonical(meta)
    digest = _digest(meta_bytes, payload, fmt)
    header: dict[str, Any] = {
        "compression": "zstd" if compress else "none",
        "payload_bytes": raw_len,
        "digest": digest,
        "meta": meta,
    }
    if signing_key:
        header["sig"] = _mac_digest(signing_key, digest, fmt)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    # Pad with JSON whitespace so that the payload starts 64-byte aligned: tensors read back as views
    # of the blob are then aligned for their dtype.
    head += b" " * (-(_PRELUDE.size + len(head)) % 64)
    return [_PRELUDE.pack(MAGIC, fmt, len(head)) + head, *payload]


def encode(tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None, **options: Any) -> bytes:
    """Serialize tensors (safetensors) with a header, as one bytes object (``encode_parts``'s options)."""
    return b"".join(encode_parts(tensors, meta, **options))


def size_of(parts: list[bytes | memoryview]) -> int:
    return sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)


def read_header(data: bytes | bytearray | memoryview, where: str = "<bytes>") -> tuple[dict[str, Any], memoryview]:
    """Parse the envelope (not yet verified); return the header and the (still encoded) payload."""
    if len(data) < _PRELUDE.size:
        raise BlobError(where, f"truncated: {len(data)} bytes is shorter than the {_PRELUDE.size}-byte prelude")
    magic, fmt, hlen = _PRELUDE.unpack_from(data, 0)
    if magic != MAGIC:
        raise BlobError(where, f"not an AaS blob (magic {magic!r}, expected {MAGIC!r})")
    if fmt not in FORMATS:
        raise BlobError(where, f"unsupported format version {fmt} (known: {', '.join(map(str, FORMATS))})")
    if hlen > MAX_HEADER_BYTES or _PRELUDE.size + hlen > len(data):
        raise BlobError(where, f"truncated or corrupt header (length {hlen}, blob {len(data)} bytes)")
    try:
        header = json.loads(bytes(memoryview(data)[_PRELUDE.size : _PRELUDE.size + hlen]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BlobError(where, f"header is not JSON: {e}") from None
    if not isinstance(header, dict) or not isinstance(header.get("meta"), dict):
        raise BlobError(where, "header lacks a 'meta' object")
    header["format"] = fmt
    payload = memoryview(data)[_PRELUDE.size + hlen :]
    return header, payload


def digest_of(data: bytes | bytearray | memoryview) -> str:
    """The digest a blob's header declares (what a shard reports for its upload; checked on read)."""
    header, _ = read_header(data)
    return str(header.get("digest", ""))


def verify(data: bytes | bytearray | memoryview, where: str = "<bytes>", *, signing_key: bytes | None = None,
           expect_digest: str | None = None) -> tuple[dict[str, Any], memoryview]:
    """Check the digest (one pass over the bytes) and the signature; return the header and the payload."""
    header, payload = read_header(data, where)
    _verify_parsed(header, payload, where, signing_key=signing_key, expect_digest=expect_digest)
    return header, payload


def _verify_parsed(header: dict[str, Any], payload: memoryview, where: str, *, signing_key: bytes | None,
                   expect_digest: str | None) -> None:
    try:
        meta_bytes = _canonical(header["meta"])
    except ValueError as e:
        raise BlobError(where, f"meta is not canonical JSON: {e}") from None
    _check_digest_and_sig(header, _digest(meta_bytes, (payload,), header["format"]), where, signing_key=signing_key,
                          expect_digest=expect_digest, mac_v1=lambda key: _mac(key, meta_bytes, payload))


def _check_digest_and_sig(header: dict[str, Any], actual: str, where: str, *, signing_key: bytes | None,
                          expect_digest: str | None, mac_v1: Callable[[bytes], str] | None) -> None:
    """The declared digest against what the writer reported and what the bytes hash to, then the signature
    (format 2: of the digest; format 1: of the bytes, through `mac_v1`, which a stream cannot give)."""
    declared, algo = str(header.get("digest", "")), digest_name(header["format"])
    if expect_digest is not None and not hmac.compare_digest(declared, expect_digest):
        raise BlobError(where, f"{algo} digest differs from what the writer reported")
    if not hmac.compare_digest(declared, actual):
        raise BlobError(where, f"{algo} mismatch: the blob is corrupt or was modified")
    if signing_key:
        sig = header.get("sig")
        if not sig:
            raise BlobError(where, "unsigned, but a signing key is configured", code="signature")
        if header["format"] >= 2:
            want = _mac_digest(signing_key, declared, header["format"])
        else:
            want = mac_v1(signing_key) if mac_v1 is not None else ""
        if not want or not hmac.compare_digest(str(sig), want):
            raise BlobError(where, "bad signature (HMAC-SHA256 does not match the configured key)", code="signature")


def decode(
    data: bytes | bytearray | memoryview,
    where: str = "<bytes>",
    *,
    signing_key: bytes | None = None,
    max_payload_bytes: int | None = None,
    expect_digest: str | None = None,
) -> Blob:
    """Verify digest (and signature when a key is given) and return tensors and meta.

    Tensors are views of `data` when it is writable (a ``bytearray``, as the stores return) and the
    payload is stored uncompressed: no copy. Raises BlobError for any defect; never returns a partially
    read blob.
    """
    header, payload = read_header(data, where)
    if header.get("compression") == "none":
        _check_plain_length(header, len(payload), where)
    _verify_parsed(header, payload, where, signing_key=signing_key, expect_digest=expect_digest)
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
            raw = memoryview(bytearray(zstandard.ZstdDecompressor().decompress(bytes(payload),
                                                                             max_output_size=expected)))
        except zstandard.ZstdError as e:
            raise BlobError(where, f"zstd payload does not decompress: {e}") from None
    elif comp == "none":
        raw = payload
    else:
        raise BlobError(where, f"unknown compression {comp!r} (known: none, zstd)")
    if len(raw) != expected:
        raise BlobError(where, f"payload is {len(raw)} bytes, header says {expected}")
    try:
        misaligned = comp == "none" and (len(data) - len(payload)) % 8 != 0  # a format-1 blob: no padding
        tensors = tensorfile.load(raw, copy=misaligned)
    except tensorfile.TensorFileError as e:
        raise BlobError(where, f"payload is not a valid safetensors file: {e}") from None
    return Blob(tensors=tensors, meta=header["meta"])


def _check_plain_length(header: dict[str, Any], size: int, where: str) -> None:
    """An uncompressed payload's length must be what the header says (a cut blob is named as such)."""
    if header.get("payload_bytes") != size:
        raise BlobError(where, f"truncated or padded: the payload is {size} bytes, the header says "
                               f"{header.get('payload_bytes')}")


class BlobStream:
    """One blob read from a stream, its tensors' bytes handed out piece by piece: memory is one piece, not
    the blob. Nothing read is trustworthy until ``finish`` has checked the digest (and signature): a
    caller folds pieces into something it throws away when ``finish`` raises.

    ``readinto(buf) -> int`` is the stream's (a file's, an HTTP response's); `size` the blob's length.
    """

    def __init__(self, readinto: Callable[[memoryview], int], size: int, where: str) -> None:
        self._readinto, self.size, self.where = readinto, size, where
        self._at = 0
        prelude = self._read(min(size, _PRELUDE.size))
        if len(prelude) < _PRELUDE.size:
            raise BlobError(where, f"truncated: {size} bytes is shorter than the {_PRELUDE.size}-byte prelude")
        hlen = _PRELUDE.unpack_from(prelude, 0)[2]
        if hlen > MAX_HEADER_BYTES:
            raise BlobError(where, f"truncated or corrupt header (length {hlen}, blob {size} bytes)")
        head = prelude + self._read(min(hlen, size - self._at))
        self.header, _ = read_header(head, where)  # every check of the in-memory path
        self.meta: dict[str, Any] = self.header["meta"]
        try:
            self._meta_bytes = _canonical(self.meta)
        except ValueError as e:
            raise BlobError(where, f"meta is not canonical JSON: {e}") from None
        self._hash = hasher(self.header["format"], self._meta_bytes)
        self._head = head

    def _read(self, n: int) -> bytearray:
        buf = bytearray(n)
        self._fill(memoryview(buf))
        return buf

    def _payload(self, n: int) -> bytearray:
        buf = self._read(n)
        self._hash.update(buf)
        return buf

    @property
    def plain(self) -> bool:
        """Whether the payload is stored uncompressed (only such a payload is streamed by tensor)."""
        return self.header.get("compression") == "none"

    def rest(self) -> bytearray:
        """The whole blob in memory (for ``decode``), when it is not to be streamed."""
        buf = bytearray(self.size)  # one allocation, filled in place
        buf[: len(self._head)] = self._head
        self._fill(memoryview(buf)[len(self._head) :])
        return buf

    def tensors(self) -> list[tuple[str, tensorfile.Entry]]:
        """The payload's tensor table (read from the stream), in the order of their bytes."""
        try:
            prefix = self._payload(8)
            hlen = tensorfile.header_length(prefix, self.size - self._at + 8)
            data_size = self.size - self._at - hlen
            _check_plain_length(self.header, 8 + hlen + data_size, self.where)
            return tensorfile.parse_header(self._payload(hlen), data_size)
        except tensorfile.TensorFileError as e:
            raise BlobError(self.where, f"payload is not a valid safetensors file: {e}") from None

    def pieces(self, entries: list[tuple[str, tensorfile.Entry]], max_bytes: int = 8 << 20
               ) -> Iterator[tuple[str, int, torch.Tensor]]:
        """(name, first element, 1-D tensor of the next elements) through every tensor in `entries` (as
        ``tensors`` returned them). Each piece is valid until the next one is read.

        Two buffers, reused: while the caller uses piece k, a helper thread hashes it (hashlib releases
        the GIL), and the next read goes into the other buffer once its hash is done."""
        from concurrent.futures import Future, ThreadPoolExecutor

        bufs = [bytearray(max_bytes), bytearray(max_bytes)]
        hashing: list[Future[None] | None] = [None, None]
        k = 0
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-hash") as pool:  # FIFO: hashed in order
            for name, (dtype, _shape, begin, end) in entries:
                size = tensorfile.itemsize(dtype)
                step = max(size, max_bytes - max_bytes % size)
                for off in range(begin, end, step):
                    n = min(step, end - off)
                    slot = k % 2
                    if hashing[slot] is not None:
                        hashing[slot].result()  # type: ignore[union-attr]
                    view = self._fill(memoryview(bufs[slot])[:n])
                    hashing[slot] = pool.submit(self._hash.update, view)
                    yield name, (off - begin) // size, torch.frombuffer(view, dtype=torch.uint8).view(dtype)
                    k += 1
            for f in hashing:
                if f is not None:
                    f.result()

    def _fill(self, view: memoryview) -> memoryview:
        got = 0
        while got < len(view):
            n = self._readinto(view[got:])
            if not n:
                raise BlobError(self.where, f"truncated: the stream ended after {self._at + got} of {self.size} bytes")
            got += n
        self._at += got
        return view

    def finish(self, *, signing_key: bytes | None = None, expect_digest: str | None = None) -> None:
        """Check that the stream is at its end and the digest (and signature) hold; BlobError otherwise."""
        if self._at != self.size:
            raise BlobError(self.where, f"{self.size - self._at} bytes after the last tensor")
        _check_digest_and_sig(self.header, self._hash.hexdigest(), self.where, signing_key=signing_key,
                              expect_digest=expect_digest, mac_v1=None)
