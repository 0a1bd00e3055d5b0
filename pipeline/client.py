"""The Python client: submit a job, follow it, cancel or resume it.

    from pipeline import Client, JobSpec
    client = Client()
    job_id = client.submit(JobSpec(model="digits-cnn", shards=2, epochs=4))
    state = client.wait(job_id, timeout=600)

Submit validates everything it can before it writes anything: the spec, the services, the data set
against the shard count, the model against a sample. A rejected job enqueues nothing.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from pipeline.checkpoint import encode_checkpoint, initial_checkpoint
from pipeline.data import OBJECTS, DataError, load_dataset, total_rounds
from pipeline.datastore import write_dataset
from pipeline.models import ModelError, build_model
from pipeline.settings import Settings, get_settings
from pipeline.spec import JobSpec, SpecError, parse_spec
from storage import keys
from storage.jobstate import TERMINAL, JobNotFound, JobStore
from storage.objectstore import ObjectNotFound, ObjectStore, StoreError, open_store


class ServiceUnavailable(RuntimeError):
    """Redis or the object store cannot be reached. One line, naming the endpoint."""


class Client:
    def __init__(self, settings: Settings | None = None, *, store: ObjectStore | None = None,
                 redis_client: redis.Redis | None = None) -> None:
        self.settings = settings or get_settings()
        self.redis = redis_client or redis.Redis.from_url(
            self.settings.redis_url, socket_connect_timeout=5, socket_timeout=30
        )
        self.store = store or open_store(self.settings)
        self.jobs = JobStore(self.redis)

    # ------------------------------------------------------------------ checks

    def check_services(self) -> None:
        try:
            self.redis.ping()
        except redis.RedisError as e:
            raise ServiceUnavailable(
                f"cannot reach Redis at {self.settings.redis_display()}: {e.__class__.__name__}: {e}"
                " (set AAS_REDIS_URL or start Redis)"
            ) from None
        try:
            self.store.check()
        except StoreError as e:
            raise ServiceUnavailable(f"object store unavailable: {e}") from None

    def _context(self) -> Any:
        from workers.context import Context

        return Context(settings=self.settings, redis=self.redis, store=self.store, jobs=self.jobs)

    # ------------------------------------------------------------------ jobs

    def submit(self, spec: JobSpec | dict[str, Any]) -> str:
        """Validate, stage data and version 0, enqueue round 0; return the job id."""
        self.check_services()
        job_id = self.stage(spec)
        try:
            from workers.tasks import advance

            advance(self._context(), job_id)
        except Exception as e:
            self.jobs.delete(job_id)
            raise ServiceUnavailable(f"could not enqueue job on {self.settings.redis_display()}: {e}") from None
        return job_id

    def stage(self, spec: JobSpec | dict[str, Any]) -> str:
        """Validate the spec against its data, write shards and version 0, record the job; enqueue nothing."""
        spec = spec if isinstance(spec, JobSpec) else parse_spec(spec)
        try:
            if spec.dataset == OBJECTS:
                ds = self._objects_dataset(spec)
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
        self._check_model(spec, ds.x_train[:2], ds.y_train[:2])
        right = self._registry_right(spec)
        teacher = self._resolve_teacher(spec) if spec.kind == "distill" else None
        init = self._init_from(spec) if spec.init_from else None
        try:
            manifest = write_dataset(self.store, ds, spec.shards, spec.seed)
            job_id = uuid.uuid4().hex[:12]
            ckpt = init[1] if init else initial_checkpoint(spec.model, spec.model_args, spec.seed)
            self.store.put(keys.checkpoint(job_id, 0), encode_checkpoint(ckpt, signing_key=self._signing_key()))
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
            self.store.put(keys.job_record(job_id), json.dumps(record).encode())
        except StoreError as e:
            raise ServiceUnavailable(f"object store unavailable: {e}") from None
        self.jobs.create(job_id, record["spec"], total_rounds=rounds, fields=fields)
        return job_id

    def _registry_right(self, spec: JobSpec) -> Callable[[str], str] | None:
        """With the registry token: a grant for the job (to register into, and promote in, an existing model).
        Without: SpecError naming register_as when the model already exists, as its publish would be refused."""
        from pipeline.security import registry_grant, registry_token
        from workers.publish import model_name

        name = model_name(spec)
        token = registry_token(self.settings)
        if token is not None:
            return lambda job_id: registry_grant(token, job_id, name)
        if not self.settings.insecure_dev and self.redis.sismember(keys.registry_models(), name):
            raise SpecError(
                f"invalid job spec: register_as: model {name!r} already exists in the registry; registering into it "
                "needs the registry token (set AAS_REGISTRY_TOKEN), or choose a new register_as"
            )
        return None

    def _signing_key(self) -> bytes | None:
        k = self.settings.signing_key
        return k.get_secret_value().encode() if k else None

    @staticmethod
    def _check_model(spec: JobSpec, x: Any, y: Any) -> None:
        try:
            model = build_model(spec.model, spec.model_args)
            out = model(x)
        except (ModelError, TypeError, RuntimeError, ValueError) as e:
            raise SpecError(f"invalid job spec: model: {spec.model!r} does not run on {spec.dataset!r}: {e}") from None
        if out.shape[0] != x.shape[0]:
            raise SpecError(f"invalid job spec: model: output batch {out.shape[0]} != input batch {x.shape[0]}")

    def _objects_dataset(self, spec: JobSpec) -> Any:
        """Training data from blobs already in the store (x, y tensors each); the test split from a named set."""
        import torch

        from pipeline.data import Dataset
        from storage import blobs

        keys_ = spec.dataset_args.get("keys")
        if not isinstance(keys_, list) or not keys_:
            raise DataError("dataset 'objects' needs dataset_args.keys: a non-empty list of object keys")
        xs, ys = [], []
        for key in keys_:
            try:
                blob = blobs.decode(self.store.get(str(key)), str(key))
            except (StoreError, blobs.BlobError) as e:
                raise DataError(f"object {key!r}: {e}") from None
            if "x" not in blob.tensors or "y" not in blob.tensors:
                raise DataError(f"object {key!r} has no 'x' and 'y' tensors")
            xs.append(blob.tensors["x"])
            ys.append(blob.tensors["y"])
        test = load_dataset(str(spec.dataset_args.get("test_dataset", "digits")))
        return Dataset(torch.cat(xs), torch.cat(ys), test.x_test, test.y_test,
                       {**test.meta, "name": "objects", "objects": len(keys_)})

    def _init_from(self, spec: JobSpec) -> tuple[str, Any]:
        """Version 0 of a fine-tune: the dense weights of a registered version, pinned as "model@N"."""
        from pipeline.artifacts import dequantized_state
        from pipeline.checkpoint import Checkpoint
        from storage.registry import Registry, RegistryError

        name, _, ref = str(spec.init_from).partition("@")
        try:
            reg = Registry(self.redis, self.store, signing_key=self._signing_key())
            rec = reg.resolve(name, ref or "production")
            state = dequantized_state(reg.fetch_artifact(rec.model, rec.version), rec.artifact_key,
                                      signing_key=self._signing_key())
        except (RegistryError, StoreError, ValueError) as e:
            raise SpecError(f"invalid job spec: init_from: {e}") from None
        model = build_model(spec.model, spec.model_args)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise SpecError(f"invalid job spec: init_from: {rec.model}@{rec.version} does not fit {spec.model}: "
                            f"{str(e).splitlines()[0]}") from None
        return f"{rec.model}@{rec.version}", Checkpoint(spec.model, spec.model_args, 0, dict(state))

    def _resolve_teacher(self, spec: JobSpec) -> str:
        """Pin the teacher to a version now ("model@alias" → "model@7"), so the whole job distils one model."""
        from storage.registry import Registry, RegistryError

        name, _, ref = str(spec.teacher).partition("@")
        try:
            rec = Registry(self.redis, self.store).resolve(name, ref or "production")
        except RegistryError as e:
            raise SpecError(f"invalid job spec: teacher: {e}") from None
        return f"{rec.model}@{rec.version}"

    def status(self, job_id: str) -> dict[str, Any]:
        state = self.jobs.get(job_id)
        out = state.to_dict()
        out["metrics"] = self.jobs.metrics(job_id)
        out["spec"] = state.spec
        return out

    def list(self, limit: int = 20) -> list[dict[str, Any]]:
        return [self.jobs.get(j).to_dict() for j in self.jobs.list(limit)]

    def wait(self, job_id: str, timeout: float | None = None, *, poll_s: float = 0.2,
             on_progress: Callable[[dict[str, Any], list[dict[str, Any]]], None] | None = None) -> dict[str, Any]:
        """Block until the job ends; call on_progress(state, new_metrics) as versions arrive."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = 0
        while True:
            state = self.jobs.get(job_id).to_dict()
            if on_progress is not None:
                new = self.redis.lrange(keys.job_metrics(job_id), seen, -1)
                if new:
                    seen += len(new)
                    on_progress(state, [json.loads(m) for m in new])
            if state["status"] in TERMINAL:
                return self.status(job_id)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state['status']} at version {state['version']} "
                                   f"after {timeout} s")
            time.sleep(poll_s)

    def cancel(self, job_id: str) -> bool:
        self.jobs.get(job_id)
        return self.jobs.set_status(job_id, "cancelled", error="cancelled by user")

    def resume(self, job_id: str) -> dict[str, Any]:
        """Re-enqueue a job from its last committed version (after a crash, a failure or a Redis restart).

        With its Redis state gone, the job is rebuilt from what the object store keeps: the job record
        (spec, data set) and the newest checkpoint. Metrics of earlier versions are not recoverable, and
        an async job's per-shard data positions restart from an even split of the updates applied.
        """
        from workers.tasks import advance, launch_round

        try:
            state = self.jobs.get(job_id)
        except JobNotFound:
            state = self._rebuild(job_id)
        if state.status in ("succeeded", "cancelled"):
            return state.to_dict()
        self.redis.hset(keys.job(job_id), mapping={"status": "running", "error": ""})
        ctx = self._context()
        spec = JobSpec.model_validate(state.spec)
        self.redis.delete(keys.job_issued(job_id))  # async: reissue every shard's current step
        if advance(ctx, job_id) == "running" and spec.mode == "sync":
            launch_round(ctx, job_id, spec, self.jobs.get(job_id).version, force=True)
        self.jobs.event(job_id, "resumed", version=self.jobs.get(job_id).version)
        return self.jobs.get(job_id).to_dict()

    def _rebuild(self, job_id: str) -> Any:
        try:
            record = json.loads(self.store.get(keys.job_record(job_id)))
        except ObjectNotFound:
            raise JobNotFound(job_id) from None
        versions = [int(k.rsplit("/v", 1)[1].split(".")[0]) for k in self.store.list(keys.checkpoint_prefix(job_id))]
        version = max(versions, default=0)
        spec = JobSpec.model_validate(record["spec"])
        fields = dict(record["fields"])
        fields.update(version=version, checkpoint=keys.checkpoint(job_id, version), rebuilt_from_store="1")
        self.jobs.create(job_id, record["spec"], total_rounds=int(record["total_rounds"]), fields=fields)
        if spec.mode == "async":
            accepted = version * spec.publish_every
            per_shard = accepted // spec.shards
            self.redis.hset(keys.job(job_id), "accepted", accepted)
            self.redis.hset(keys.job_progress(job_id),
                            mapping={str(s): per_shard * spec.local_steps for s in range(spec.shards)})
        return self.jobs.get(job_id)
