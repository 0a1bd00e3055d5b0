"""Reading one shard's update blob: verified (key, size, signature, digest, identity, codec, shapes) and decoded,
or folded into a sum as it is read. The aggregator's code (sync and async), which a shard worker that rebuilds a
version from the round's blobs runs too (workers/replay.py, workers/rebuild.py): one way to read an update.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

from pipeline import blobs, codecs
from pipeline.aggregate import Accumulator, Update, check_update
from storage import keys
from storage.objectstore import StoreError, memory_reader
from storage.services import Services

log = logging.getLogger(__name__)


class KeyRefused(blobs.BlobError):
    """A result named an object outside its job's gradient prefix: refused unread, and never deleted."""

    default_code = "other"


def check_gradient_key(job_id: str, key: str) -> None:
    """A shard result may only point into its own job's gradients (no other job's, no checkpoint, no '..')."""
    prefix = keys.gradients_prefix(job_id)
    if not key.startswith(prefix) or "\\" in key or any(p in ("", ".", "..") for p in key.split("/")):
        raise KeyRefused(key, f"outside job {job_id}'s gradient prefix {prefix}: refused unread")


Shapes = dict[str, tuple[int, ...]]
STREAM_MIN_BYTES = 8 << 20  # below this a blob is read whole: its memory is nothing, a stream's set-up is not


def load_update(ctx: Services, job_id: str, key: str, digest: str | None, shapes: Shapes,
                expect: dict[str, int], *, finite: bool = True) -> Update:
    """Fetch, verify (key, digest, signature, identity, codec, shapes and, with `finite`, finiteness) and
    decode one blob. The bytes are hashed once; fp32 tensors are views of the bytes read (no copy)."""
    check_gradient_key(job_id, key)
    data = ctx.store.get(key)
    ctx.jobs.add_bytes(job_id, down=len(data))
    _check_size(ctx, key, len(data))
    return _decode_update(ctx, job_id, data, key, digest, shapes, expect, finite=finite)


def _check_size(ctx: Services, key: str, size: int) -> None:
    if size > ctx.settings.max_blob_bytes:
        raise blobs.BlobError(key, f"{size} bytes exceeds the limit of {ctx.settings.max_blob_bytes}",
                              code="too_large")


def _check_expected(meta: dict[str, Any], expect: dict[str, int], key: str) -> None:
    for field, want in expect.items():
        if meta.get(field) != want:
            raise blobs.BlobError(key, f"header {field}={meta.get(field)!r}, expected {want!r}")


def _identity(job_id: str, m: dict[str, Any]) -> Update:
    ident = keys.gradient_identity(job_id, int(m["shard"]), int(m["base_version"]), int(m["attempt"]))
    return Update(ident, int(m["shard"]), {}, int(m["samples"]), float(m["loss"]))


def _decode_codec(tensors: dict[str, torch.Tensor], meta: dict[str, Any], key: str, shapes: Shapes, *,
                  finite: bool) -> dict[str, torch.Tensor]:
    try:
        return codecs.decode(tensors, meta.get("codec") or {}, key, expected_shapes=shapes, check_finite=finite)
    except codecs.CodecError as e:
        raise blobs.BlobError(key, str(e), code=e.code) from None


def _decode_update(ctx: Services, job_id: str, data: bytearray, key: str, digest: str | None, shapes: Shapes,
                   expect: dict[str, int], *, finite: bool) -> Update:
    blob = blobs.decode(data, key, signing_key=ctx.signing_key, expect_digest=digest)
    _check_expected(blob.meta, expect, key)
    tensors = _decode_codec(blob.tensors, blob.meta, key, shapes, finite=finite)
    check_update(tensors, shapes, key, finite=finite)
    u = _identity(job_id, blob.meta)
    return Update(u.identity, u.shard, tensors, u.samples, u.loss)


def fold_blob(ctx: Services, job_id: str, key: str, digest: str | None, shapes: Shapes, expect: dict[str, int],
              acc: Accumulator, *, held: list[Any] | None = None) -> int:
    """Fold one blob into `acc` as it is read: a plain fp32 update tensor piece by tensor piece (memory: one
    piece), anything else (compressed codecs: small) decoded in memory. The digest and signature are checked
    at the end: on a BlobError `acc` holds part of a bad blob and must be thrown away (the round is retried).
    Returns the blob's size: the caller counts a round's bytes down once (``fold_round``). `held`: the blob's
    bytes, kept by the process that wrote it (read from memory, checked the same way; its size is returned)."""
    check_gradient_key(job_id, key)
    with ctx.store.reader(key) if held is None else memory_reader(held) as r:
        _check_size(ctx, key, r.size)
        bs = blobs.BlobStream(r.readinto, r.size, key)
        _check_expected(bs.meta, expect, key)
        codec = bs.meta.get("codec")
        streamed = bs.plain and bs.header["format"] >= 2 and isinstance(codec, dict) and codec.get("codec") == "none"
        if not streamed or r.size < STREAM_MIN_BYTES:  # small (or compressed) blobs: one read, views of it
            acc.add(_decode_update(ctx, job_id, bs.rest(), key, digest, shapes, expect, finite=False))
            return r.size
        entries = bs.tensors()
        shells = {n: torch.empty(shape, dtype=dtype, device="meta") for n, (dtype, shape, _, _) in entries}
        _decode_codec(shells, bs.meta, key, shapes, finite=False)  # names, dtypes and shapes, before any data
        u = _identity(job_id, bs.meta)
        for name, first, piece in bs.pieces(entries):
            acc.fold(name.removesuffix(".values"), first, piece, u.samples)
        bs.finish(signing_key=ctx.signing_key, expect_digest=digest)
        size = r.size
    acc.count(u)
    return size


def drop_blobs(ctx: Services, job_id: str, blob_keys: Iterable[str]) -> None:
    """Delete update blobs nothing will read again (a committed version's: ``async_agg.drop_applied``,
    ``aggregator.drop_spent_round``, ``drop_under``). A failed delete leaves an orphan, logged; it never fails the
    caller."""
    for key in blob_keys:
        try:
            ctx.store.delete(key)
        except StoreError as e:
            log.warning("job %s: spent object %s not deleted (%s); it stays as an orphan", job_id, key, e)


def drop_under(ctx: Services, job_id: str, prefix: str) -> None:
    """Delete every object under `prefix` (``drop_blobs``); a failed listing is logged, never raised."""
    try:
        found = list(ctx.store.list(prefix))
    except StoreError as e:
        log.warning("job %s: %s not listed for deletion (%s); what it holds stays", job_id, prefix, e)
        return
    drop_blobs(ctx, job_id, found)
