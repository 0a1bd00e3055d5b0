"""Training checkpoint format: weights + optimizer state + model arguments + version/step.

Stored as a blob (safetensors inside the AaS envelope): tensors ``model.<name>`` (the full state dict)
and ``opt.<slot>.<name>`` (optimizer slots such as momentum buffers); meta records the model's name and
arguments so a resume can rebuild the module and check every shape before loading.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline import blobs
from pipeline.models import build_model

KIND = "checkpoint"
OPT_KIND = "optimizer"


@dataclass(frozen=True)
class Checkpoint:
    model: str
    model_args: dict[str, Any]
    version: int
    state: dict[str, torch.Tensor]  # full model state dict (parameters and buffers), fp32 on CPU
    opt: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # slot → name → tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def build(self, device: str | torch.device = "cpu", *, copy: bool = True) -> nn.Module:
        """Rebuild the module and load the weights; shapes are checked by load_state_dict(strict=True).

        The module is built on the meta device, so no weight is allocated or initialised only to be
        overwritten (a 1B-parameter model's random init alone takes seconds and 4 GB); the checkpoint's
        tensors then become its parameters. With copy=False they are this checkpoint's own tensors
        where `device` is the CPU (no second copy): only for a caller that owns this Checkpoint and
        does not change the weights in place, or restores them (see training.local_steps).
        """
        device = torch.device(device)
        model = _build_on_meta(self.model, self.model_args)
        if model is not None:
            state = {k: v.to(device, copy=copy) for k, v in self.state.items()}
            model.load_state_dict(state, strict=True, assign=True)
            if not any(t.is_meta for t in (*model.parameters(), *model.buffers())):
                return model
        # A module that cannot be built on meta, or holds a tensor the state dict does not (a
        # non-persistent buffer, computed in __init__): build it for real.
        model = build_model(self.model, self.model_args)
        model.load_state_dict(self.state, strict=True)
        return model.to(device)


def param_names(ckpt: Checkpoint) -> list[str]:
    """Names of the model's trainable parameters, in module order (tied weights once), without
    allocating any weight (the module is built on the meta device when it can be)."""
    return [n for n, _ in param_sizes(ckpt.model, ckpt.model_args)]


def param_sizes(model_name: str, model_args: dict[str, Any]) -> list[tuple[str, int]]:
    """(name, number of elements) of the model's trainable parameters, in module order."""
    model = _build_on_meta(model_name, model_args) or build_model(model_name, model_args)
    return [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]


def part_state(state: Mapping[str, torch.Tensor], ranges: list[list[str]], part: int) -> dict[str, torch.Tensor]:
    """Range `part`'s entries of a state dict: its parameters and, in the first range, every entry no range names
    (buffers: a version aggregated in parts stores them with part 0)."""
    out = {n: state[n] for n in ranges[part]}
    if part == 0:
        named = {n for r in ranges for n in r}
        out.update({k: v for k, v in state.items() if k not in named})
    return out


def parts_of(ckpt: Checkpoint) -> list[str]:
    """The keys of a version aggregated in parts (its checkpoint is then a list of them); [] otherwise."""
    parts = ckpt.meta.get("parts")
    return [str(k) for k in parts] if isinstance(parts, list) else []


def merge_parts(manifest: Checkpoint, parts: list[Checkpoint], where: str) -> Checkpoint:
    """One checkpoint from a version's parts, each checked to be of that version and model."""
    state: dict[str, torch.Tensor] = {}
    opt: dict[str, dict[str, torch.Tensor]] = {}
    for p in parts:
        if (p.model, p.model_args, p.version) != (manifest.model, manifest.model_args, manifest.version):
            raise blobs.BlobError(where, f"part of {p.model} v{p.version} listed in {manifest.model} "
                                         f"v{manifest.version}")
        clash = set(state) & set(p.state)
        if clash:
            raise blobs.BlobError(where, f"parts overlap: {sorted(clash)[:3]}")
        state.update(p.state)
        for slot, named in p.opt.items():
            opt.setdefault(slot, {}).update(named)
    meta = {k: v for k, v in manifest.meta.items() if k != "parts"}
    if parts and all("rebuilt_from" in p.meta for p in parts):  # stored as recipes: rebuilt with its momentum
        meta["rebuilt_from"] = parts[0].meta["rebuilt_from"]
    return Checkpoint(manifest.model, manifest.model_args, manifest.version, state, opt, meta)


def _build_on_meta(name: str, args: dict[str, Any]) -> nn.Module | None:
    try:
        with torch.device("meta"):
            return build_model(name, args)
    except (NotImplementedError, RuntimeError):  # e.g. a user __init__ that reads a value (.item()) of a tensor
        return None


def encode_checkpoint(ckpt: Checkpoint, *, signing_key: bytes | None = None, with_opt: bool = True) -> bytes:
    """The checkpoint as one blob; with_opt=False leaves the optimizer state out (see encode_optimizer)."""
    return b"".join(checkpoint_parts(ckpt, signing_key=signing_key, with_opt=with_opt))


def checkpoint_parts(ckpt: Checkpoint, *, signing_key: bytes | None = None, with_opt: bool = True
                     ) -> list[bytes | memoryview]:
    """``encode_checkpoint`` as buffers to write one after the other: the weights are not copied."""
    tensors = {f"model.{k}": v for k, v in ckpt.state.items()}
    if with_opt:
        for slot, named in ckpt.opt.items():
            tensors.update({f"opt.{slot}.{k}": v for k, v in named.items()})
    meta = {
        "kind": KIND,
        "model": ckpt.model,
        "model_args": ckpt.model_args,
        "version": ckpt.version,
        "opt_slots": sorted(ckpt.opt) if with_opt else [],
        **ckpt.meta,
    }
    return blobs.encode_parts(tensors, meta, signing_key=signing_key)


def encode_optimizer(ckpt: Checkpoint, *, signing_key: bytes | None = None) -> list[bytes | memoryview] | None:
    """The optimizer state alone, as buffers to write (None when there is none): stored apart so weight
    readers skip it."""
    if not ckpt.opt:
        return None
    tensors = {f"opt.{slot}.{k}": v for slot, named in ckpt.opt.items() for k, v in named.items()}
    meta = {"kind": OPT_KIND, "version": ckpt.version, "opt_slots": sorted(ckpt.opt)}
    return blobs.encode_parts(tensors, meta, signing_key=signing_key)


def _read_opt(tensors: dict[str, torch.Tensor], slots: list[str], where: str) -> dict[str, dict[str, torch.Tensor]]:
    opt: dict[str, dict[str, torch.Tensor]] = {slot: {} for slot in slots}
    for key, t in tensors.items():
        head, _, rest = key.partition(".")
        slot, _, name = rest.partition(".")
        if head != "opt" or slot not in opt:
            raise blobs.BlobError(where, f"unexpected tensor {key!r}")
        opt[slot][name] = t
    return opt


def decode_checkpoint(data: bytes | bytearray, where: str, *, signing_key: bytes | None = None,
                      opt_data: bytes | bytearray | None = None) -> Checkpoint:
    """Decode weights (and, given `opt_data`, the optimizer state stored beside them): views of the bytes
    when they are a ``bytearray`` (as the stores return), so the checkpoint owns them from then on."""
    blob = blobs.decode(data, where, signing_key=signing_key)
    meta = dict(blob.meta)
    if meta.get("kind") != KIND:
        raise blobs.BlobError(where, f"not a checkpoint (kind {meta.get('kind')!r})")
    state = {k.removeprefix("model."): t for k, t in blob.tensors.items() if k.startswith("model.")}
    opt = _read_opt({k: t for k, t in blob.tensors.items() if not k.startswith("model.")},
                    list(meta.get("opt_slots", [])), where)
    if opt_data is not None:
        opt.update(decode_optimizer(opt_data, where, version=meta.get("version"), signing_key=signing_key))
    extra = {k: v for k, v in meta.items() if k not in ("kind", "model", "model_args", "version", "opt_slots")}
    return Checkpoint(
        model=str(meta["model"]),
        model_args=dict(meta.get("model_args") or {}),
        version=int(meta["version"]),
        state=state,
        opt=opt,
        meta=extra,
    )


def decode_optimizer(data: bytes | bytearray, where: str, *, version: Any, signing_key: bytes | None = None
                     ) -> dict[str, dict[str, torch.Tensor]]:
    """The optimizer state stored beside checkpoint `where` (see ``encode_optimizer``), checked to be `version`'s."""
    owhere = f"{where} (optimizer state)"
    oblob = blobs.decode(data, owhere, signing_key=signing_key)
    if oblob.meta.get("kind") != OPT_KIND or oblob.meta.get("version") != version:
        raise blobs.BlobError(owhere, f"not the optimizer state of version {version}")
    return _read_opt(oblob.tensors, list(oblob.meta.get("opt_slots", [])), owhere)


def check_model(ckpt: Checkpoint, model: str, model_args: dict[str, Any], where: str) -> None:
    """Refuse a checkpoint that names another model or other arguments than the job's validated spec.

    A worker builds the model the spec names; the checkpoint only supplies weights. Without this check,
    whoever can write the object store would choose the code a worker runs (the checkpoint's model name).
    """
    if ckpt.model != model or _canonical(ckpt.model_args) != _canonical(model_args):
        raise blobs.BlobError(where, f"checkpoint names model {ckpt.model!r} with {ckpt.model_args}, but the job's "
                                     f"spec names {model!r} with {model_args}: refused, nothing built")


def _canonical(args: dict[str, Any]) -> str:
    import json

    return json.dumps(args, sort_keys=True, default=list)


def initial_checkpoint(model_name: str, model_args: dict[str, Any], seed: int) -> Checkpoint:
    """Version 0: the model's seeded initialisation."""
    torch.manual_seed(seed)
    model = build_model(model_name, model_args)
    # The module is dropped on return, so its tensors are taken as they are (no second copy of a large
    # model); a tensor sharing storage with an earlier one (tied weights) is cloned: safetensors refuses
    # shared storage.
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        ptr = v.untyped_storage().data_ptr()
        state[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return Checkpoint(model=model_name, model_args=model_args, version=0, state=state)
