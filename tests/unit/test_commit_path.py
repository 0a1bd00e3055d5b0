"""The lean commit path: a sync round's Redis work folded into fewer round trips, with nothing lost.

The commit returns the job's state as it left it (read under WATCH with the version check), counts the bytes
the round read and appends the version event in its own transaction; shard workers count the version they
read with their upload. Each must equal what the separate calls used to write.
"""

from __future__ import annotations

import os

from pipeline.client import Client
from storage import keys
from storage.objectstore import LocalStore
from workers import aggregator, shard
from workers.lifecycle import advance


def stage(unit_ctx, **spec) -> str:
    client = Client(unit_ctx.settings, store=unit_ctx.store, redis_client=unit_ctx.redis,
                    dispatch=unit_ctx.dispatch)
    return client.stage({"momentum": 0.9, "lr": 0.1, "batch_size": 16, "shards": 2, **spec})


def size(unit_ctx, key: str) -> int:
    return len(unit_ctx.store.get(key)) if unit_ctx.store.exists(key) else 0


def test_the_commit_returns_the_state_a_fresh_read_gives(unit_ctx) -> None:
    job_id = stage(unit_ctx)
    results = [shard.train_shard(unit_ctx, job_id, s, 0, 0, 0) for s in range(2)]
    outcome = aggregator.aggregate_round(unit_ctx, job_id, 0, results)
    assert outcome.committed and outcome.job is not None
    fresh = unit_ctx.jobs.get(job_id)
    assert outcome.job.version == fresh.version == 1
    assert outcome.job.fields == fresh.fields
    assert outcome.job.spec == fresh.spec and outcome.job.status == fresh.status


def test_every_byte_of_a_round_is_counted_once_and_its_metrics_agree(unit_ctx) -> None:
    job_id = stage(unit_ctx)
    v0 = keys.checkpoint(job_id, 0)
    results = [shard.train_shard(unit_ctx, job_id, s, 0, 0, 0) for s in range(2)]
    blobs = sum(size(unit_ctx, r["key"]) for r in results)
    assert blobs == sum(r["bytes"] for r in results) > 0
    # The shard workers share this process's context: the first reads version 0 (counted with its upload),
    # the second finds the module built. Data splits are counted when read, as before.
    before = unit_ctx.jobs.get(job_id)
    assert before.num("bytes_up") == blobs
    outcome = aggregator.aggregate_round(unit_ctx, job_id, 0, results)
    after = unit_ctx.jobs.get(job_id)
    # The aggregator read version 0 with its optimizer state (none yet: momentum starts at zero) and both blobs.
    read = size(unit_ctx, v0) + size(unit_ctx, keys.optimizer_state(v0)) + blobs
    assert after.num("bytes_down") - before.num("bytes_down") == read
    assert after.num("bytes_up") == blobs
    entry = unit_ctx.jobs.metrics(job_id)[-1]
    assert entry["bytes_down"] == after.num("bytes_down") and entry["bytes_up"] == after.num("bytes_up")
    assert outcome.metrics["bytes_down"] == entry["bytes_down"]
    assert unit_ctx.take_unsent_down(job_id) == 0  # nothing left uncounted


def test_a_duplicate_aggregation_commits_nothing_but_its_reads_still_count(unit_ctx) -> None:
    job_id = stage(unit_ctx)
    results = [shard.train_shard(unit_ctx, job_id, s, 0, 0, 0) for s in range(2)]
    first = aggregator.aggregate_round(unit_ctx, job_id, 0, results)
    assert first.committed
    # Redelivered before it saw the commit: replay the fold and the commit of round 0 against version 1.
    job = unit_ctx.jobs.get(job_id)
    down = job.num("bytes_down")
    stale = type(job)(job_id=job_id, status=job.status, version=0, total_rounds=job.total_rounds, spec=job.spec,
                      fields={**job.fields, "version": "0"})
    unit_ctx.forget_checkpoint(keys.checkpoint(job_id, 0))
    second = aggregator.aggregate_round(unit_ctx, job_id, 0, results, stale)
    assert not second.committed and second.job is None
    assert unit_ctx.jobs.get(job_id).version == 1 and len(unit_ctx.jobs.metrics(job_id)) == 1
    v0 = keys.checkpoint(job_id, 0)
    read = size(unit_ctx, v0) + size(unit_ctx, keys.optimizer_state(v0)) + sum(r["bytes"] for r in results)
    assert unit_ctx.jobs.get(job_id).num("bytes_down") == down + read
    assert [e["version"] for e in unit_ctx.jobs.events(job_id) if e["kind"] == "version"] == ["1"]


def test_the_version_event_is_written_with_the_commit(unit_ctx) -> None:
    job_id = stage(unit_ctx)
    for v in range(2):
        results = [shard.train_shard(unit_ctx, job_id, s, v, v, 0) for s in range(2)]
        assert aggregator.aggregate_round(unit_ctx, job_id, v, results).committed
    events = [e for e in unit_ctx.jobs.events(job_id) if e["kind"] == "version"]
    assert [e["version"] for e in events] == ["1", "2"]
    assert all(float(e["train_loss"]) > 0 for e in events)


def test_advance_after_its_own_commit_launches_the_next_round_once(unit_ctx) -> None:
    job_id = stage(unit_ctx)
    unit_ctx.jobs.set_status(job_id, "running")
    results = [shard.train_shard(unit_ctx, job_id, s, 0, 0, 0) for s in range(2)]
    outcome = aggregator.aggregate_round(unit_ctx, job_id, 0, results)
    advance(unit_ctx, job_id, outcome.job)
    assert [m["version"] for m in unit_ctx.dispatch.of("round")] == [1]
    # Anyone else advancing the job (the watchdog, a redelivery) finds the round launched.
    advance(unit_ctx, job_id)
    assert [m["version"] for m in unit_ctx.dispatch.of("round")] == [1]


def test_a_gradient_blob_is_not_flushed_to_disk_but_everything_else_is(tmp_path, monkeypatch) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    store = LocalStore(tmp_path)
    store.put("jobs/j/grad/a", b"gradient", durable=False)
    assert synced == [] and bytes(store.get("jobs/j/grad/a")) == b"gradient"
    store.put("jobs/j/ckpt/v1", [b"check", b"point"])
    assert len(synced) == 1 and bytes(store.get("jobs/j/ckpt/v1")) == b"checkpoint"
