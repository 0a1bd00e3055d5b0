"""Staging a job: validate its spec against its data and model, write the data shards and version 0 to
the object store, and record the job. Also rebuilding a job whose Redis state was lost.

Validation comes before any write: a rejected spec writes and enqueues nothing.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from pipeline import async_plan
from pipeline.checkpoint import checkpoint_parts, initial_checkpoint
from pipeline.data import OBJECTS, DataError, load_dataset, total_rounds
from pipeline.models import ModelError, build_model
from pipeline.names import registry_name
from pipeline.spec import JobSpec, SpecError, parse_spec
from storage import keys
from storage.datastore import write_dataset
from storage.jobstate import JobNotFound, JobState
from storage.objectstore import ObjectNotFound, StoreError
from storage.services import Services, ServiceUnavailable
from workers.context import Context
from workers.lifecycle import advance


def submit_job(ctx: Context, spec: JobSpec | dict[str, Any]) -> str:
    """Stage a job and enqueue its first work; a job that cannot be enqueued is deleted again."""
    job_id = stage_job(ctx, spec)
    try:
        advance(ctx, job_id)
    except Exception as e:
        ctx.jobs.delete(job_id)
        raise ServiceUnavailable(f"could not enqueue job on {ctx.settings.redis_display()}: {e}") from None
    return job_id


def stage_job(svc: Services, spec: JobSpec | dict[str, Any]) -> str:
    """Validate the spec against its data, write shards and version 0, record the job; enqueue nothing."""
    spec = spec if isinstance(spec, JobSpec) else parse_spec(spec)
    try:
        if spec.dataset == OBJECTS:
            ds = _objects_dataset(svc, spec)
        else:
            ds = load_dataset(spec.dataset, spec.dataset_args)
    except (DataError, TypeError) as e:
        raise SpecError(f"invalid job spec: dataset: {e}") from None
    if ds.x_test.shape[0] == 0 or ds.n_train == 0:  # no test split: nothing to measure, promote or stop on
        raise SpecError(f"invalid job spec: dataset_args: data set {spec.dataset!r} with {spec.dataset_args} has "
                        f"{ds.n_train} training and {ds.x_test.shape[0]} test samples; both must be non-empty")
    if spec.shards > ds.n_train:
        raise SpecError(
            f"invalid job spec: shards: {spec.shards} shards for {ds.n_train} training samples"
            " (at most one shard per sample)"
        )
    _check_model(spec, ds.x_train[:2], ds.y_train[:2])
    right = _registry_right(svc, spec)
    teacher = _resolve_teacher(svc, spec) if spec.kind == "distill" else None
    init = _init_from(svc, spec) if spec.init_from else None
    try:
        manifest = write_dataset(svc.store, ds, spec.shards, spec.seed)
        job_id = uuid.uuid4().hex[:12]
        ckpt = init[1] if init else initial_checkpoint(spec.model, spec.model_args, spec.seed)
        svc.store.put(keys.checkpoint(job_id, 0), checkpoint_parts(ckpt, signing_key=svc.signing_key))
    except StoreError as e:
        raise ServiceUnavailable(f"object store unavailable: {e}") from None
    rounds = total_rounds(manifest.shard_sizes, spec.batch_size, spec.epochs, spec.local_steps)
    fields = {"manifest": keys.dataset_manifest(manifest.dataset_id), "checkpoint": keys.checkpoint(job_id, 0)}
    if teacher:
        fields["teacher"] = teacher
    if init:
        fields["init_from"] = init[0]
    if right is not None:
        fields["registry_grant"] = right(job_id)
    if spec.mode == "async":
        # Async: a budget of updates (as many as sync would apply), published every K.
        budget = spec.shards * rounds
        fields["budget"] = str(budget)
        rounds = -(-budget // spec.publish_every)
    record = {"job_id": job_id, "spec": spec.model_dump(mode="json"), "total_rounds": rounds, "fields": fields}
    try:
        svc.store.put(keys.job_record(job_id), json.dumps(record).encode())
        svc.store.put(keys.live_marker(job_id), b"")
    except StoreError as e:
        raise ServiceUnavailable(f"object store unavailable: {e}") from None
    svc.jobs.create(job_id, record["spec"], total_rounds=rounds, fields=fields)
    return job_id

def _registry_right(svc: Services, spec: JobSpec) -> Callable[[str], str] | None:
    """With the registry token: a grant for the job (to register into, and promote in, an existing model).
    Without: SpecError naming register_as when the model already exists, as its publish would be refused."""
    from pipeline.security import registry_grant, registry_token

    name = registry_name(spec.model, spec.register_as)
    token = registry_token(svc.settings)
    if token is not None:
        return lambda job_id: registry_grant(token, job_id, name)
    if not svc.settings.insecure_dev and svc.redis.sismember(keys.registry_models(), name):
        raise SpecError(
            f"invalid job spec: register_as: model {name!r} already exists in the registry; registering into it "
            "needs the registry token (set AAS_REGISTRY_TOKEN), or choose a new register_as"
        )
    return None


def _check_model(spec: JobSpec, x: Any, y: Any) -> None:
    try:
        model = build_model(spec.model, spec.model_args)
        out = model(x)
    except (ModelError, TypeError, RuntimeError, ValueError) as e:
        raise SpecError(f"invalid job spec: model: {spec.model!r} does not run on {spec.dataset!r}: {e}") from None
    if out.shape[0] != x.shape[0]:
        raise SpecError(f"invalid job spec: model: output batch {out.shape[0]} != input batch {x.shape[0]}")

def _objects_dataset(svc: Services, spec: JobSpec) -> Any:
    """Training data from blobs already in the store (x, y tensors each); the test split from a named set."""
    import torch

    from pipeline import blobs
    from pipeline.data import Dataset

    keys_ = spec.dataset_args.get("keys")
    if not isinstance(keys_, list) or not keys_:
        raise DataError("dataset 'objects' needs dataset_args.keys: a non-empty list of object keys")
    xs, ys = [], []
    for key in keys_:
        try:
            blob = blobs.decode(svc.store.get(str(key)), str(key))
        except (StoreError, blobs.BlobError) as e:
            raise DataError(f"object {key!r}: {e}") from None
        if "x" not in blob.tensors or "y" not in blob.tensors:
            raise DataError(f"object {key!r} has no 'x' and 'y' tensors")
        xs.append(blob.tensors["x"])
        ys.append(blob.tensors["y"])
    test = load_dataset(str(spec.dataset_args.get("test_dataset", "digits")))
    return Dataset(torch.cat(xs), torch.cat(ys), test.x_test, test.y_test,
                   {**test.meta, "name": "objects", "objects": len(keys_)})

def _init_from(svc: Services, spec: JobSpec) -> tuple[str, Any]:
    """Version 0 of a fine-tune: the dense weights of a registered version, pinned as "model@N"."""
    from pipeline.artifacts import dequantized_state
    from pipeline.checkpoint import Checkpoint
    from storage.registry import RegistryError

    name, _, ref = str(spec.init_from).partition("@")
    try:
        reg = svc.registry()
        rec = reg.resolve(name, ref or "production")
        state = dequantized_state(reg.fetch_artifact(rec.model, rec.version), rec.artifact_key,
                                  signing_key=svc.signing_key)
    except (RegistryError, StoreError, ValueError) as e:
        raise SpecError(f"invalid job spec: init_from: {e}") from None
    model = build_model(spec.model, spec.model_args)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise SpecError(f"invalid job spec: init_from: {rec.model}@{rec.version} does not fit {spec.model}: "
                        f"{str(e).splitlines()[0]}") from None
    return f"{rec.model}@{rec.version}", Checkpoint(spec.model, spec.model_args, 0, dict(state))

def _resolve_teacher(svc: Services, spec: JobSpec) -> str:
    """Pin the teacher to a version now ("model@alias" → "model@7"), so the whole job distils one model."""
    from storage.registry import RegistryError

    name, _, ref = str(spec.teacher).partition("@")
    try:
        rec = svc.registry().resolve(name, ref or "production")
    except RegistryError as e:
        raise SpecError(f"invalid job spec: teacher: {e}") from None
    return f"{rec.model}@{rec.version}"


def rebuild_job(svc: Services, job_id: str) -> JobState:
    """Recreate a job's Redis state from what the object store keeps: its record and newest version."""
    try:
        record = json.loads(svc.store.get(keys.job_record(job_id)))
    except ObjectNotFound:
        raise JobNotFound(job_id) from None
    listed = list(svc.store.list(keys.checkpoint_prefix(job_id)))
    # The newest version stored: as a full checkpoint, or as its recipe (``checkpoint_every_versions``; readers
    # rebuild it from the full checkpoint it names).
    version = max([*keys.checkpoint_versions(listed), *keys.recipe_versions(listed)], default=0)
    spec = JobSpec.model_validate(record["spec"])
    fields = dict(record["fields"])
    fields.update(version=version, checkpoint=keys.checkpoint(job_id, version), rebuilt_from_store="1")
    svc.jobs.create(job_id, record["spec"], total_rounds=int(record["total_rounds"]), fields=fields)
    if spec.mode == "async":
        accepted = version * spec.publish_every  # the updates folded into the newest version, in the global order
        svc.redis.hset(keys.job(job_id), "accepted", accepted)
        marks = async_plan.marks_after(accepted, spec.shards, spec.local_steps)
        svc.redis.hset(keys.job_progress(job_id), mapping={str(s): m for s, m in marks.items()})
    return svc.jobs.get(job_id)
