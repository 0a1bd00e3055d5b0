"""A worker process's Context: the shared services, the dispatcher of Celery work, and small caches.

A worker reads the same checkpoint version and the same shard again and again; caching them per
process (keyed by object key, verified once) saves a GET per task.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

from pipeline.aggregate import partition
from pipeline.blobs import BlobError
from pipeline.checkpoint import (
    Checkpoint,
    check_model,
    checkpoint_parts,
    decode_checkpoint,
    encode_optimizer,
    merge_parts,
    param_names,
    param_sizes,
    part_state,
    parts_of,
)
from pipeline.recipe import encode_recipe
from pipeline.settings import get_settings
from storage import keys
from storage.datastore import Manifest, read_split
from storage.objectstore import ObjectNotFound
from storage.services import Services, build_services, redis_client
from workers.dispatch import Dispatcher
from workers.rebuild import read_recipe
from workers.rebuild import rebuild as rebuild_version


class LRU:
    def __init__(self, size: int) -> None:
        self.size = size
        self._d: OrderedDict[str, Any] = OrderedDict()

    def get(self, key: str) -> Any | None:
        if key in self._d:
            self._d.move_to_end(key)
            return self._d[key]
        return None

    def put(self, key: str, value: Any) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.size:
            self._d.popitem(last=False)

    def pop(self, key: str) -> Any | None:
        return self._d.pop(key, None)

    def keys(self) -> list[str]:
        return list(self._d)

    def clear(self) -> None:
        self._d.clear()


@dataclass
class Context(Services):
    """Services plus what a worker process keeps between tasks. ``dispatch`` enqueues Celery work
    (``StubDispatcher`` in unit tests); built from settings once per process by ``get_context``."""

    dispatch: Dispatcher = field(default=None)  # type: ignore[assignment]  # set in __post_init__
    checkpoints: LRU = field(default_factory=lambda: LRU(4))
    # Shard workers: the module of the version they last trained on, built once per version and device.
    # One only: a large model's process holds one copy of its weights (a new version replaces it).
    models: LRU = field(default_factory=lambda: LRU(1))
    # Shard workers: the compressed update blobs this process wrote for one round (key → buffers), which a replay
    # of the next version folds from memory (workers/replay.py); see ``hold_blob``.
    held_blobs: LRU = field(default_factory=lambda: LRU(64))
    data: LRU = field(default_factory=lambda: LRU(64))
    update_cache: LRU = field(default_factory=lambda: LRU(256))  # async: decoded updates awaiting publish
    # Top-k error-feedback state per (job, shard): a workers.codec_state.CodecState (the step it follows).
    residuals: dict[tuple[str, int], Any] = field(default_factory=dict)
    _shell: tuple[str, torch.nn.Module] | None = None  # (architecture, module) of the newest ``model``
    # Shard workers: (checkpoint key, momentum buffers) of the version the module holds, where replaying the next
    # version needs them (workers/replay.py). One version only, as ``models``.
    _momentum: tuple[str, dict[str, torch.Tensor]] | None = None
    # Bytes read for a job and not yet counted in it (``defer_down``): a shard worker's read of the version
    # is counted with its upload, an aggregation's reads with its commit, each in the same round trip.
    _unsent_down: dict[str, int] = field(default_factory=dict)
    # This process as it claims work in Redis (an aggregation part's parameter range): host, pid and a nonce.
    claimant: str = field(default_factory=lambda: f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}")

    def __post_init__(self) -> None:
        if self.dispatch is None:
            from workers.dispatch import CeleryDispatcher

            self.dispatch = CeleryDispatcher(self.settings)

    def manifest(self, key: str) -> Manifest:
        m = self.data.get("manifest:" + key)
        if m is None:
            m = Manifest.from_json(self.store.get(key))
            self.data.put("manifest:" + key, m)
        return m

    def split(self, entry: dict[str, Any], job_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        hit = self.data.get(entry["key"])
        if hit is None:
            x, y, n = read_split(self.store, entry)
            self.jobs.add_bytes(job_id, down=n)
            hit = (x, y)
            self.data.put(entry["key"], hit)
        return hit

    def teacher(self, model: str, version: int, device: torch.device) -> torch.nn.Module:
        """A registered model version, loaded once per process, for distillation (frozen, eval mode)."""
        key = f"teacher:{model}:{version}"
        hit = self.checkpoints.get(key)
        if hit is None:
            from pipeline.artifacts import load_artifact

            reg = self.registry()
            rec = reg.get(model, version)
            hit = load_artifact(reg.fetch_artifact(model, version), rec.artifact_key,
                                signing_key=self.signing_key).model
            for p in hit.parameters():
                p.requires_grad_(False)
            self.checkpoints.put(key, hit)
        return hit.to(device)

    def checkpoint(self, key: str, job_id: str, *, with_opt: bool = False, spec: dict[str, Any] | None = None
                   ) -> Checkpoint:
        """A version's checkpoint, cached per process. Shard workers read the weights only; the
        aggregator (with_opt) also reads the optimizer state stored beside them. `spec`: the job's spec when
        the caller holds it (saves reading the job again)."""
        full = self.checkpoints.get(key + "#opt")
        hit = full if full is not None else (None if with_opt else self.checkpoints.get(key))
        if hit is None:
            hit = self._read_checkpoint(key, job_id, with_opt=with_opt)
            if spec is None:  # the model comes from the validated spec, never from the store
                spec = self.jobs.get(job_id).spec
            check_model(hit, str(spec.get("model")), dict(spec.get("model_args") or {}), key)
            self.checkpoints.put(key + ("#opt" if with_opt else ""), hit)
        return hit

    def defer_down(self, job_id: str, n: int) -> None:
        """Count `n` bytes read for this job later, with the next write to its counters (``take_unsent_down``):
        one Redis round trip fewer on the round's critical path."""
        if n:
            self._unsent_down[job_id] = self._unsent_down.get(job_id, 0) + n

    def take_unsent_down(self, job_id: str) -> int:
        """The bytes read for this job and not yet counted (zero afterwards)."""
        return self._unsent_down.pop(job_id, 0)

    def _read_checkpoint(self, key: str, job_id: str, *, with_opt: bool, defer_count: bool = False,
                         rebuild: bool = True) -> Checkpoint:
        """Weights (and optimizer state) from the store; a version aggregated in parts is read part by part, and
        a version stored between full checkpoints (its recipe only) is rebuilt (`rebuild`; its momentum buffers
        come with it, whatever `with_opt`). The bytes are counted in the job now, or (`defer_count`) left for
        ``take_unsent_down``."""
        try:
            data = self.store.get(key)
        except ObjectNotFound as missing:
            named = keys.parse_version_key(key)
            if not rebuild or named is None:
                raise
            version, part = named
            try:
                last = read_recipe(self, job_id, version, part)
            except ObjectNotFound:
                raise missing from None  # neither a checkpoint nor a recipe: name the checkpoint
            base = self._full_base(job_id, last["full"], part, defer_count)
            ckpt, n = rebuild_version(self, job_id, base, last)
            if defer_count:
                self.defer_down(job_id, n)
            else:
                self.jobs.add_bytes(job_id, down=n)
            return ckpt
        opt_data = None
        if with_opt:
            try:
                opt_data = self.store.get(keys.optimizer_state(key))
            except ObjectNotFound:
                opt_data = None  # version 0, a list of parts, or plain SGD: no optimizer state
        n = len(data) + len(opt_data or b"")
        if defer_count:
            self.defer_down(job_id, n)
        else:
            self.jobs.add_bytes(job_id, down=n)
        ckpt = decode_checkpoint(data, key, signing_key=self.signing_key, opt_data=opt_data)
        del data, opt_data
        parts = parts_of(ckpt)
        if not parts:
            return ckpt
        prefix = keys.checkpoint_prefix(job_id)
        if not all(p.startswith(prefix) and keys.parse_checkpoint(p) is None for p in parts):
            raise BlobError(key, f"its parts must be this job's checkpoint parts (under {prefix})")
        return merge_parts(ckpt, [self._read_checkpoint(p, job_id, with_opt=with_opt, defer_count=defer_count)
                                  for p in parts], key)

    def _full_base(self, job_id: str, full: int, part: int | None, defer_count: bool) -> Checkpoint:
        """The full checkpoint a version stored as its recipe is rebuilt from: version `full`, or its range `part`
        (version 0 is one checkpoint whatever the job's parts: the range is cut from it)."""
        if part is None or full > 0:
            key = keys.checkpoint(job_id, full) if part is None else keys.checkpoint_part(job_id, full, part)
            return self._read_checkpoint(key, job_id, with_opt=True, defer_count=defer_count, rebuild=False)
        whole = self._read_checkpoint(keys.checkpoint(job_id, 0), job_id, with_opt=True, defer_count=defer_count,
                                      rebuild=False)
        spec = self.jobs.get(job_id).spec
        ranges = self.part_ranges(str(spec.get("model")), dict(spec.get("model_args") or {}),
                                  int(spec.get("aggregation_parts") or 1))
        if not 0 <= part < len(ranges):
            raise BlobError(keys.checkpoint(job_id, 0), f"has no parameter range {part}: the job has {len(ranges)}")
        return Checkpoint(whole.model, whole.model_args, 0, part_state(whole.state, ranges, part), {},
                          {**whole.meta, "part": part})

    def part_ranges(self, model: str, model_args: dict[str, Any], parts: int) -> list[list[str]]:
        """A model's parameter ranges for aggregation in `parts` (the shards split their blobs the same way, from
        the same sizes), computed once per process."""
        ckey = f"ranges:{model}:{json.dumps(model_args, sort_keys=True)}:{parts}"
        ranges = self.data.get(ckey)
        if ranges is None:
            ranges = partition(param_sizes(model, model_args), parts)
            self.data.put(ckey, ranges)
        return ranges  # type: ignore[no-any-return]

    def model(self, key: str, job_id: str, device: torch.device, spec: dict[str, Any] | None = None
              ) -> torch.nn.Module:
        """The module of checkpoint `key` on `device`, built once per process: a task on the version
        the previous one used neither downloads nor rebuilds. The caller must leave its weights as it
        found them (``training.local_steps`` restores them); gradients are left unset.

        The decoded checkpoint is not kept beside the module (on the CPU the module's parameters are its
        tensors), so a worker holds one copy of the weights, not two. A new version of the same model and
        arguments goes into the previous version's module (its tensors assigned): no module is built again.
        """
        mkey = _model_key(key, device)
        hit = self.models.get(mkey)
        if hit is None:
            if spec is None:  # the model comes from the validated spec, never from the store
                spec = self.jobs.get(job_id).spec
            arch = json.dumps([spec.get("model"), spec.get("model_args") or {}, str(device)], sort_keys=True)
            shell = self._shell[1] if self._shell is not None and self._shell[0] == arch else None
            self.models.clear()  # drop the old version before the new one is read: one copy at a time
            if self._momentum is not None and self._momentum[0] != key:
                self._momentum = None  # another version's buffers (workers/replay.py)
            self._shell = None
            cached = self.checkpoints.get(key + "#opt") or self.checkpoints.get(key)
            if cached is not None:  # shared with another user in this process (the aggregator): copy
                hit = cached.build(device)
            else:
                ckpt = self._read_checkpoint(key, job_id, with_opt=False, defer_count=True)
                check_model(ckpt, str(spec.get("model")), dict(spec.get("model_args") or {}), key)
                if shell is not None:
                    shell.load_state_dict({k: v.to(device) for k, v in ckpt.state.items()}, strict=True, assign=True)
                    hit = shell
                else:
                    hit = ckpt.build(device, copy=False)
                if ckpt.opt.get("momentum") and ckpt.meta.get("rebuilt_from") is not None:
                    self._momentum = (key, ckpt.opt["momentum"])  # rebuilt with it: the next version replays
            self.models.put(mkey, hit)
            self._shell = (arch, hit)
        return hit

    def cached_model(self, key: str, device: torch.device) -> torch.nn.Module | None:
        """The module of checkpoint `key` on `device` if this process holds it (see ``model``)."""
        return self.models.get(_model_key(key, device))  # type: ignore[no-any-return]

    def hold_blob(self, key: str, parts: list[Any]) -> None:
        """Keep an update blob this process wrote, dropping those of any other round (one round's worth: what
        the next version's replay can use)."""
        def round_of(k: str) -> tuple[str, int] | None:
            g = keys.parse_gradient(k)
            return None if g is None else (g.job, g.version)

        if any(round_of(k) != round_of(key) for k in self.held_blobs.keys()):
            self.held_blobs.clear()
        self.held_blobs.put(key, parts)

    def held_momentum(self, key: str) -> dict[str, torch.Tensor] | None:
        """The optimizer's momentum buffers of checkpoint `key`, if this process holds them (workers/replay.py)."""
        return self._momentum[1] if self._momentum is not None and self._momentum[0] == key else None

    def hold_momentum(self, key: str, buffers: dict[str, torch.Tensor]) -> None:
        self._momentum = (key, buffers)

    def forget_momentum(self) -> None:
        self._momentum = None

    def holds_checkpoint(self, key: str) -> bool:
        """Whether this process holds checkpoint `key` decoded (e.g. an aggregator that wrote it)."""
        return self.checkpoints.get(key + "#opt") is not None or self.checkpoints.get(key) is not None

    def keep_model(self, key: str, device: torch.device, module: torch.nn.Module) -> None:
        """Hold `module` as checkpoint `key`'s (it was brought there in place: workers/replay.py), alone."""
        self.models.clear()
        self.models.put(_model_key(key, device), module)

    def drop_models(self) -> None:
        self.models.clear()

    def write_checkpoint(self, key: str, ckpt: Checkpoint) -> None:
        """Store weights and optimizer state as two objects (state first) and keep the pair cached."""
        opt = encode_optimizer(ckpt, signing_key=self.signing_key)
        if opt is not None:
            self.store.put(keys.optimizer_state(key), opt)
        self.store.put(key, checkpoint_parts(ckpt, signing_key=self.signing_key, with_opt=False))
        self.checkpoints.put(key + "#opt", ckpt)  # the next round starts from it: no download of our own write

    def store_version(self, key: str, ckpt: Checkpoint, recipe: dict[str, Any] | None) -> None:
        """Store a version (or a part of one) this process computed: for a version between full checkpoints, its
        `recipe` (a few hundred bytes, signed) stands for it, and any reader rebuilds it from the full checkpoint
        and the blobs (workers/rebuild.py); otherwise its weights and optimizer state. Kept cached either way:
        the next round starts from it."""
        if recipe and recipe.get("full") is not None:
            self.store.put(keys.recipe_of(key), encode_recipe(recipe, signing_key=self.signing_key))
            self.keep_checkpoint(key, ckpt)
        else:
            self.write_checkpoint(key, ckpt)

    def keep_checkpoint(self, key: str, ckpt: Checkpoint) -> None:
        """Cache a version this process computed and stored as its recipe only: the next round starts from it."""
        self.checkpoints.put(key + "#opt", ckpt)

    def forget_checkpoint(self, key: str) -> None:
        """Drop a cached checkpoint (both forms): its caller is about to change its tensors in place."""
        self.checkpoints.pop(key + "#opt")
        self.checkpoints.pop(key)

    def param_names(self, ckpt: Checkpoint) -> list[str]:
        """The trainable parameters' names of the checkpoint's model (built on the meta device, once)."""
        ckey = f"params:{ckpt.model}:{json.dumps(ckpt.model_args, sort_keys=True)}"
        names = self.data.get(ckey)
        if names is None:
            names = param_names(ckpt)
            self.data.put(ckey, names)
        return list(names)


def _model_key(key: str, device: torch.device) -> str:
    return f"{key}@{device}"


@lru_cache(maxsize=1)
def get_context() -> Context:
    from pipeline.security import require_signing_key

    s = get_settings()
    require_signing_key(s, "a worker")  # also where no worker_init ran (a task called in-process)
    svc = build_services(s, redis_conn=redis_client(s, socket_timeout_s=None))
    return Context(settings=s, redis=svc.redis, store=svc.store, jobs=svc.jobs)
