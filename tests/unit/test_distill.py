"""Distillation through the same pipeline: the shard loss uses a registered teacher's soft outputs."""

from __future__ import annotations

import pytest
import torch

from pipeline.artifacts import build_artifact
from pipeline.client import Client
from pipeline.models import build_model, count_parameters
from pipeline.spec import SpecError
from pipeline.training import distill_loss, loss_fn
from storage.registry import Registry
from workers import aggregator, shard
from workers.publish import evaluate_and_publish


def register_teacher(unit_ctx) -> int:
    torch.manual_seed(1)
    teacher = build_model("digits-cnn")
    data, _ = build_artifact("digits-cnn", {}, teacher.state_dict())
    reg = Registry(unit_ctx.redis, unit_ctx.store)
    rec = reg.register("digits-cnn", data, codec="zstd", metrics={"accuracy": 0.9}, lineage={"job": "t"})
    reg.set_alias("digits-cnn", "production", rec.version)
    return rec.version


def test_distill_loss_mixes_soft_teacher_targets_and_hard_labels() -> None:
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    assert distill_loss(s, y, t, 4.0, 0.0).item() == pytest.approx(loss_fn(s, y).item())
    assert distill_loss(t, y, t, 4.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_distill_job_pins_the_teacher_version_and_registers_the_student_with_it_in_lineage(unit_ctx) -> None:
    v = register_teacher(unit_ctx)
    client = Client(unit_ctx.settings, store=unit_ctx.store, redis_client=unit_ctx.redis,
                    dispatch=unit_ctx.dispatch)
    job_id = client.stage({"kind": "distill", "model": "digits-cnn-small", "teacher": "digits-cnn@production",
                           "shards": 2, "epochs": 1, "batch_size": 512})
    job = unit_ctx.jobs.get(job_id)
    assert job.fields["teacher"] == f"digits-cnn@{v}"
    results = [shard.train_shard(unit_ctx, job_id, s, 0, 0, 0) for s in range(2)]
    assert aggregator.aggregate_round(unit_ctx, job_id, 0, results).committed
    rec = evaluate_and_publish(unit_ctx, job_id, 1)["registered"]
    assert rec is not None and rec["model"] == "digits-cnn-small"
    assert rec["lineage"]["teacher"] == f"digits-cnn@{v}"
    assert count_parameters(build_model("digits-cnn")) >= 4 * count_parameters(build_model("digits-cnn-small"))


def test_distill_job_with_an_unknown_teacher_is_rejected_at_submit(unit_ctx) -> None:
    client = Client(unit_ctx.settings, store=unit_ctx.store, redis_client=unit_ctx.redis,
                    dispatch=unit_ctx.dispatch)
    with pytest.raises(SpecError, match="teacher"):
        client.stage({"kind": "distill", "model": "digits-cnn-small", "teacher": "nobody@production"})
