"""Fine-tuning: a job that starts from a registered version and trains on new objects in the store."""

from __future__ import annotations

import pytest
import torch

from pipeline import blobs
from pipeline.artifacts import build_artifact
from pipeline.checkpoint import decode_checkpoint
from pipeline.client import Client
from pipeline.data import load_digits
from pipeline.models import build_model
from pipeline.schedules import parse_schedule, retrain_spec
from pipeline.spec import SpecError
from storage import keys
from storage.registry import Registry


def test_retrain_job_starts_from_the_alias_version_and_trains_on_exactly_the_new_objects(unit_ctx) -> None:
    torch.manual_seed(3)
    trained = build_model("digits-cnn")
    reg = Registry(unit_ctx.redis, unit_ctx.store)
    rec = reg.register("digits-cnn", build_artifact("digits-cnn", {}, trained.state_dict())[0], codec="zstd",
                       metrics={"accuracy": 0.5}, lineage={"job": "j0"})
    reg.set_alias("digits-cnn", "production", rec.version)
    ds = load_digits()
    new = []
    for i, (a, b) in enumerate([(0, 100), (100, 250)]):
        key = f"incoming/s/part-{i}.aast"
        unit_ctx.store.put(key, blobs.encode({"x": ds.x_train[a:b], "y": ds.y_train[a:b]}))
        new.append(key)
    sched = parse_schedule({"name": "s", "model": "digits-cnn", "alias": "production", "interval_s": 60,
                            "dataset_prefix": "incoming/s/", "spec": {"epochs": 1}})
    # Retraining registers into an existing model: beat's worker holds the registry token for that.
    from pydantic import SecretStr

    rights = unit_ctx.settings.model_copy(update={"registry_token": SecretStr("retrain-token")})
    client = Client(rights, store=unit_ctx.store, redis_client=unit_ctx.redis, dispatch=unit_ctx.dispatch)
    job_id = client.stage(retrain_spec(sched, new, rec.version))
    job = unit_ctx.jobs.get(job_id)
    assert job.fields["init_from"] == f"digits-cnn@{rec.version}"
    v0 = decode_checkpoint(unit_ctx.store.get(keys.checkpoint(job_id, 0)), "v0").state
    for name, w in trained.state_dict().items():
        assert torch.equal(v0[name], w), name
    manifest = unit_ctx.manifest(job.fields["manifest"])
    assert sum(manifest.shard_sizes) == 250


def test_init_from_an_unknown_model_or_a_mismatched_architecture_is_rejected_at_submit(unit_ctx) -> None:
    client = Client(unit_ctx.settings, store=unit_ctx.store, redis_client=unit_ctx.redis,
                    dispatch=unit_ctx.dispatch)
    with pytest.raises(SpecError, match="init_from"):
        client.stage({"init_from": "nobody@production"})
    small = build_model("digits-cnn-small")
    reg = Registry(unit_ctx.redis, unit_ctx.store)
    reg.register("small", build_artifact("digits-cnn-small", {}, small.state_dict())[0], codec="zstd",
                 metrics={}, lineage={})
    with pytest.raises(SpecError, match="does not fit digits-cnn"):
        client.stage({"init_from": "small@1"})
