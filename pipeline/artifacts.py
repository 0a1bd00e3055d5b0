"""Serving artifacts: a model's weights packed for inference, rebuilt into a ready-to-serve module.

An artifact is a blob (``storage.blobs``) whose meta names the model, its arguments and how the
weights were packed. ``load_artifact`` never unpickles: it rebuilds the module from the model
registry and loads the decoded tensors into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.models import build_model
from storage import blobs

KIND = "artifact"


@dataclass(frozen=True)
class ArtifactChain:
    """How a serving artifact is derived from training weights. Default: fp32, zstd."""

    zstd: bool = True


@dataclass(frozen=True)
class LoadedArtifact:
    model: nn.Module
    meta: dict[str, Any]


def build_artifact(
    model_name: str,
    model_args: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    *,
    chain: ArtifactChain | None = None,
    meta: dict[str, Any] | None = None,
    signing_key: bytes | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """Pack weights into artifact bytes. Returns (bytes, stats with raw_bytes/stored_bytes/ratio)."""
    chain = chain or ArtifactChain()
    tensors = {k: v.detach().float().cpu() for k, v in state_dict.items()}
    raw_bytes = sum(t.numel() * 4 for t in tensors.values())
    m = {"kind": KIND, "model": model_name, "model_args": model_args, "packing": "fp32", **(meta or {})}
    data = blobs.encode(tensors, m, compress=chain.zstd, signing_key=signing_key)
    stats = {"raw_bytes": raw_bytes, "stored_bytes": len(data), "ratio": raw_bytes / max(1, len(data))}
    return data, stats


def load_artifact(
    data: bytes, where: str = "<artifact>", *, signing_key: bytes | None = None, device: str = "cpu"
) -> LoadedArtifact:
    """Verify and decode an artifact, rebuild the module, load the weights, and return it in eval mode."""
    blob = blobs.decode(data, where, signing_key=signing_key)
    meta = blob.meta
    if meta.get("kind") != KIND:
        raise blobs.BlobError(where, f"not a serving artifact (kind {meta.get('kind')!r})")
    if meta.get("packing") != "fp32":
        raise blobs.BlobError(where, f"unknown packing {meta.get('packing')!r} (known: fp32)")
    try:
        model = build_model(str(meta["model"]), dict(meta.get("model_args") or {}))
        model.load_state_dict(blob.tensors, strict=True)
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise blobs.BlobError(where, f"weights do not fit model {meta.get('model')!r}: {e}") from None
    return LoadedArtifact(model=model.to(device).eval(), meta=meta)
