"""The data plane: zero-copy blobs, streamed aggregation, and the commit path without evaluation."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pipeline import blobs, tensorfile
from pipeline.aggregate import Accumulator, Update, sgd_step, sgd_step_
from pipeline.client import Client
from pipeline.spec import JobSpec
from storage import keys
from storage.objectstore import LocalStore
from workers import aggregator, liveness, shard, updates
from workers.lifecycle import advance

TENSORS = {"w": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "h": torch.randn(9).half(),
           "e": torch.zeros(0), "flag": torch.tensor(True), "bf": torch.randn(4).bfloat16()}


def test_tensorfile_reads_and_writes_the_same_files_as_the_safetensors_library() -> None:
    ours = tensorfile.dumps(TENSORS)
    theirs = st_save(TENSORS)
    for data in (ours, theirs):
        back = tensorfile.load(memoryview(bytearray(data)))
        assert set(back) == set(TENSORS) and all(torch.equal(back[k], TENSORS[k]) for k in TENSORS)
    back = st_load(ours)
    assert all(torch.equal(back[k], TENSORS[k]) for k in TENSORS)
    assert tensorfile.file_size({k: (tuple(v.shape), v.dtype) for k, v in TENSORS.items()}) == len(ours)


def test_a_decoded_blob_is_a_view_of_the_bytes_read_and_a_read_only_buffer_is_copied() -> None:
    data = bytearray(blobs.encode({"w": torch.ones(1000)}, {"k": 1}))
    blob = blobs.decode(data, "b")
    blob.tensors["w"][0] = 7.0  # writes through to the buffer the store returned: no copy was made
    assert 7.0 in torch.frombuffer(data, dtype=torch.float32)
    frozen = bytes(blobs.encode({"w": torch.ones(1000)}, {"k": 1}))
    blobs.decode(frozen, "b").tensors["w"][0] = 7.0  # a copy: bytes stay immutable
    assert blobs.decode(frozen, "b").tensors["w"][0] == 1.0


@pytest.mark.parametrize("defect, reason", [
    ("bad-length", "safetensors"), ("overlap", "overlap or gap"), ("dtype", "unknown dtype"),
])
def test_a_malformed_tensor_table_is_refused_naming_the_problem(defect: str, reason: str) -> None:
    import json
    import struct

    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    table = {"bad-length": {"a": {**entry, "data_offsets": [0, 12]}},
             "overlap": {"a": entry, "b": {**entry, "data_offsets": [4, 12]}},
             "dtype": {"a": {**entry, "dtype": "F7"}}}[defect]
    head = json.dumps(table).encode()
    data = struct.pack("<Q", len(head)) + head + bytes(12 if defect == "overlap" else 8)
    with pytest.raises(tensorfile.TensorFileError, match=reason if defect != "bad-length" else "bytes for shape"):
        tensorfile.load(memoryview(bytearray(data)))


def _stream(data: bytes) -> blobs.BlobStream:
    f = io.BytesIO(data)
    return blobs.BlobStream(f.readinto, len(data), "s")


def test_a_blob_streamed_in_pieces_gives_the_same_tensors_and_checks_its_digest_and_signature() -> None:
    w = torch.randn(10_000)
    data = blobs.encode({"w.values": w, "v.values": torch.randn(3)}, {"k": 1}, signing_key=b"key")
    bs = _stream(data)
    entries = bs.tensors()
    got = {n: torch.empty(0) for n, _ in entries}
    for name, first, piece in bs.pieces(entries, max_bytes=4096):
        assert first == got[name].numel()
        got[name] = torch.cat([got[name], piece.clone()])
    bs.finish(signing_key=b"key", expect_digest=blobs.digest_of(data))
    assert torch.equal(got["w.values"], w)
    flipped = bytearray(data)
    flipped[-5] ^= 1
    bad = _stream(bytes(flipped))
    for _ in bad.pieces(bad.tensors()):
        pass
    with pytest.raises(blobs.BlobError, match="blake3 mismatch"):
        bad.finish()
    for_key = _stream(data)
    for _ in for_key.pieces(for_key.tensors()):
        pass
    with pytest.raises(blobs.BlobError, match="bad signature"):
        for_key.finish(signing_key=b"other")
    with pytest.raises(blobs.BlobError, match="truncated"):
        _stream(data[:-10]).tensors()


@pytest.mark.parametrize("fmt", [2, 3])
def test_blobs_of_the_sha256_format_and_the_blake3_format_are_read_streamed_and_checked(fmt: int) -> None:
    """Format 3 (written now) digests with BLAKE3, format 2 (written before) with SHA-256: both are decoded and
    streamed, their signature checked and a flipped bit refused naming the hash; a blob whose format byte is
    rewritten to the other format fails its digest."""
    w = torch.randn(5_000)
    data = blobs.encode({"w": w}, {"k": 1}, signing_key=b"key", fmt=fmt)
    algo = "blake3" if fmt == 3 else "sha256"
    assert data[4] == fmt and len(blobs.digest_of(data)) == 64
    assert torch.equal(blobs.decode(data, "b", signing_key=b"key", expect_digest=blobs.digest_of(data)).tensors["w"], w)
    bs = _stream(data)
    for _ in bs.pieces(bs.tensors(), max_bytes=4096):
        pass
    bs.finish(signing_key=b"key")
    flipped = bytearray(data)
    flipped[-5] ^= 1
    with pytest.raises(blobs.BlobError, match=f"{algo} mismatch"):
        blobs.decode(bytes(flipped), "b")
    with pytest.raises(blobs.BlobError, match="bad signature"):
        blobs.decode(data, "b", signing_key=b"other")
    other = bytearray(data)
    other[4] = 5 - fmt
    with pytest.raises(blobs.BlobError, match="mismatch"):
        blobs.decode(bytes(other), "b")
    with pytest.raises(ValueError, match="format 2 or 3"):
        blobs.encode({"w": w}, fmt=1)


def test_aas_blob_format_2_makes_a_process_write_what_a_release_before_format_3_reads(monkeypatch) -> None:
    """A rolling upgrade: upgraded processes write format 2 (SHA-256) until no older process runs; a value that is
    not a format is refused naming the setting."""
    from pydantic import ValidationError

    from pipeline.settings import Settings, get_settings

    monkeypatch.setenv("AAS_BLOB_FORMAT", "2")
    get_settings.cache_clear()
    try:
        data = blobs.encode({"w": torch.ones(3)}, {"k": 1}, signing_key=b"key")
        assert data[4] == 2 and blobs.decode(data, "b", signing_key=b"key").meta == {"k": 1}
        monkeypatch.setenv("AAS_BLOB_FORMAT", "4")
        with pytest.raises(ValidationError, match="blob_format"):
            Settings()
    finally:
        monkeypatch.delenv("AAS_BLOB_FORMAT")
        get_settings.cache_clear()
    assert blobs.encode({"w": torch.ones(3)})[4] == 3


def test_the_local_store_writes_parts_without_joining_them_and_streams_reads(tmp_path: Any) -> None:
    store = LocalStore(tmp_path)
    parts = blobs.encode_parts({"w": torch.arange(100.0)}, {"k": 1})
    store.put("a/b", parts)
    assert bytes(store.get("a/b")) == b"".join(bytes(p) for p in parts)
    with store.reader("a/b") as r:
        buf = bytearray(r.size)
        assert r.readinto(memoryview(buf)) == r.size
    assert bytes(buf) == bytes(store.get("a/b"))


def test_the_accumulator_and_the_in_place_step_match_the_functional_ones() -> None:
    g1, g2 = {"w": torch.randn(50)}, {"w": torch.randn(50)}
    acc = Accumulator({"w": (50,)})
    acc.add(Update("a", 0, g1, 3, 1.0))
    acc.add(Update("b", 1, g2, 1, 2.0))
    mean, n, loss = acc.mean()
    assert n == 4 and loss == pytest.approx(1.25)
    assert torch.allclose(mean["w"], (3 * g1["w"] + g2["w"]) / 4, atol=1e-6)
    params, bufs = {"w": torch.randn(50)}, {"w": torch.randn(50)}
    want_p, want_b = sgd_step(params, mean, bufs, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    sgd_step_(params, mean, bufs, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    assert torch.equal(params["w"], want_p["w"]) and torch.equal(bufs["w"], want_b["w"])


def _round0(unit_ctx: Any, **spec: Any) -> tuple[str, list[dict[str, Any]]]:
    client = Client(unit_ctx.settings, store=unit_ctx.store, redis_client=unit_ctx.redis, dispatch=unit_ctx.dispatch)
    job_id = client.stage({"shards": 2, "batch_size": 32, "epochs": 1, **spec})
    return job_id, [shard.train_shard(unit_ctx, job_id, s, 0, 0, 0) for s in range(2)]


@pytest.fixture
def streamed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stream every blob, however small (digits-cnn's are below the size where streaming starts)."""
    monkeypatch.setattr(updates, "STREAM_MIN_BYTES", 0)


def test_the_streamed_aggregation_equals_the_in_memory_one(unit_ctx: Any, streamed: None) -> None:
    job_id, results = _round0(unit_ctx)
    ckpt = unit_ctx.checkpoint(keys.checkpoint(job_id, 0), job_id)
    shapes = {n: tuple(ckpt.state[n].shape) for n in unit_ctx.param_names(ckpt)}
    spec = JobSpec.model_validate(unit_ctx.jobs.get(job_id).spec)
    streamed = aggregator.fold_round(unit_ctx, job_id, spec, 0, results, shapes)
    in_memory = Accumulator(shapes)
    for r in results:
        in_memory.add(updates.load_update(unit_ctx, job_id, r["key"], r["sha256"], shapes,
                                          {"job": job_id, "shard": r["shard"], "base_version": 0}))
    assert all(torch.equal(streamed.sum[n], in_memory.sum[n]) for n in shapes)
    assert [u.identity for u in streamed.folded] == [u.identity for u in in_memory.folded]


def test_a_blob_whose_digest_fails_after_it_was_streamed_leaves_the_round_uncommitted(unit_ctx: Any,
                                                                                       streamed: None) -> None:
    job_id, results = _round0(unit_ctx)
    data = bytearray(unit_ctx.store.get(results[1]["key"]))
    data[-7] ^= 0x10  # inside the last tensor: noticed only when the whole blob has been folded
    unit_ctx.store.put(results[1]["key"], data)
    with pytest.raises(aggregator.RoundIncomplete, match="blake3 mismatch") as err:
        aggregator.aggregate_round(unit_ctx, job_id, 0, results)
    assert err.value.recompute == [1] and unit_ctx.jobs.get(job_id).version == 0
    assert not unit_ctx.store.exists(keys.checkpoint(job_id, 1))


def test_commit_launches_the_next_round_before_any_evaluation_and_the_job_ends_after_the_last_one(
        unit_ctx: Any, run_published: Any) -> None:
    job_id, results = _round0(unit_ctx, batch_size=512)
    unit_ctx.jobs.set_status(job_id, "running")
    total = unit_ctx.jobs.get(job_id).total_rounds
    assert total >= 2
    assert aggregator.aggregate_round(unit_ctx, job_id, 0, results).committed
    assert "accuracy" not in unit_ctx.jobs.metrics(job_id)[0]  # nothing evaluated on the commit path
    advance(unit_ctx, job_id)
    kinds = [k for k, _ in unit_ctx.dispatch.sent]
    assert kinds.index("round") < kinds.index("publish")  # the next round first, then the evaluation
    for v in range(1, total):
        results = [shard.train_shard(unit_ctx, job_id, s, v, v, 0) for s in range(2)]
        assert aggregator.aggregate_round(unit_ctx, job_id, v, results).committed
        advance(unit_ctx, job_id)
    job = unit_ctx.jobs.get(job_id)
    assert job.status == "running"  # the last version is not yet evaluated
    spec = JobSpec.model_validate(job.spec)
    assert liveness.needed_slots(unit_ctx, liveness.book_of(unit_ctx), job, spec) == [keys.slot_publish(total)]
    out = run_published(unit_ctx)
    assert [o.get("skipped") for o in out] == [f"v{total} is newer"] * (total - 1) + [None]
    job = unit_ctx.jobs.get(job_id)
    assert job.status == "succeeded" and job.num("test_accuracy") > 0
    metrics = unit_ctx.jobs.metrics(job_id)
    assert "accuracy" not in metrics[0] and metrics[-1]["accuracy"] == job.num("test_accuracy")


def test_an_evaluation_of_an_older_version_never_overwrites_a_newer_ones_numbers(unit_ctx: Any) -> None:
    job_id, _ = _round0(unit_ctx)
    jobs = unit_ctx.jobs
    jobs.commit_version(job_id, base_version=0, new_version=1, checkpoint_key="k1", identities=[], metrics={})
    jobs.commit_version(job_id, base_version=1, new_version=2, checkpoint_key="k2", identities=[], metrics={})
    assert jobs.record_evaluation(job_id, 2, {"accuracy": 0.9, "loss": 0.1})
    assert not jobs.record_evaluation(job_id, 1, {"accuracy": 0.5, "loss": 0.7})
    assert jobs.get(job_id).num("test_accuracy") == 0.9
    assert jobs.metrics_at(job_id, 1)["accuracy"] == 0.5  # its own entry is still filled in


def test_the_publish_slot_is_named_parsed_and_found_in_a_queued_message() -> None:
    from workers.app import QUEUE_PUBLISH, TASK_PUBLISH

    slot = keys.slot_publish(7)
    assert keys.parse_slot(slot) == keys.Slot("publish", version=7)
    assert liveness.slot_of_message(TASK_PUBLISH, [], {"job_id": "j", "version": 7}) == ("j", slot)
    assert liveness.queue_of(slot) == QUEUE_PUBLISH


def test_a_lost_evaluation_of_the_last_version_is_sent_again(unit_ctx: Any) -> None:
    job_id, _ = _round0(unit_ctx)
    jobs = unit_ctx.jobs
    jobs.set_status(job_id, "running")
    total = jobs.get(job_id).total_rounds
    for v in range(total):
        jobs.commit_version(job_id, base_version=v, new_version=v + 1, checkpoint_key="k", identities=[], metrics={})
    advance(unit_ctx, job_id)
    advance(unit_ctx, job_id)
    assert unit_ctx.dispatch.of("publish") == [{"job_id": job_id, "version": total}]  # once, not per advance
    liveness.relaunch_slot(unit_ctx, jobs.get(job_id), JobSpec.model_validate(jobs.get(job_id).spec),
                           keys.slot_publish(total))
    assert len(unit_ctx.dispatch.of("publish")) == 2


def test_a_queued_shard_message_as_the_dispatcher_sends_it_is_seen_as_its_slot() -> None:
    """shard_signature names its arguments; a probe that read only positional ones saw no queued shard
    task and relaunched a shard that was merely waiting for a free worker, every few seconds."""
    from workers.app import app, shard_signature

    sig = shard_signature(app, "j", 1, 4, 4, 0)
    assert liveness.slot_of_message(sig.task, list(sig.args), dict(sig.kwargs)) == ("j", keys.slot_shard(4, 1))
    assert liveness.slot_of_message(sig.task, ["j", 1, -1, 9, 0], {}) == ("j", keys.slot_step(1, 9))


def test_a_shard_worker_loads_the_next_version_into_the_module_it_has(unit_ctx: Any) -> None:
    job_id, results = _round0(unit_ctx)
    other = type(unit_ctx)(settings=unit_ctx.settings, redis=unit_ctx.redis, store=unit_ctx.store, jobs=unit_ctx.jobs,
                           dispatch=unit_ctx.dispatch)  # the aggregator: another process
    assert aggregator.aggregate_round(other, job_id, 0, results).committed
    cpu = torch.device("cpu")
    v0 = unit_ctx.model(keys.checkpoint(job_id, 0), job_id, cpu)
    v1 = unit_ctx.model(keys.checkpoint(job_id, 1), job_id, cpu)
    assert v1 is v0  # the same module: not built again
    want = other.checkpoint(keys.checkpoint(job_id, 1), job_id).state
    assert all(torch.equal(t, want[n]) for n, t in v1.state_dict().items())
    assert all(p.requires_grad for p in v1.parameters())


def test_aggregation_in_parameter_ranges_gives_the_same_weights_and_commits_once(unit_ctx: Any) -> None:
    from workers.aggregator import aggregate_part, part_ranges

    def run(parts: int) -> tuple[str, dict[str, torch.Tensor]]:
        job_id, results = _round0(unit_ctx, aggregation_parts=parts, seed=3)
        spec = JobSpec.model_validate(unit_ctx.jobs.get(job_id).spec)
        for v in range(2):
            if v:
                results = [shard.train_shard(unit_ctx, job_id, s, v, v, 0) for s in range(2)]
            if parts == 1:
                assert aggregator.aggregate_round(unit_ctx, job_id, v, results).committed
                continue
            assert all(len(r["parts"]) == parts for r in results)  # one blob per range and shard
            n = len(part_ranges(unit_ctx, spec))
            outcomes = [aggregate_part(unit_ctx, job_id, v, results, p) for p in range(n)]
            assert [o.committed for o in outcomes] == [False] * (n - 1) + [True]  # the last part commits
            assert not aggregate_part(unit_ctx, job_id, v, results, 0).committed  # a redelivery: nothing new
        fresh = type(unit_ctx)(settings=unit_ctx.settings, redis=unit_ctx.redis, store=unit_ctx.store,
                               jobs=unit_ctx.jobs, dispatch=unit_ctx.dispatch)  # reads from the store
        return job_id, fresh.checkpoint(keys.checkpoint(job_id, 2), job_id, with_opt=True).state

    _, whole = run(1)
    job_id, parted = run(3)
    assert unit_ctx.jobs.get(job_id).version == 2
    assert set(whole) == set(parted) and all(torch.equal(whole[n], parted[n]) for n in whole)
    assert len(unit_ctx.jobs.consumed(job_id, 2)) == 2  # each shard's update, once (all its ranges)


def test_aggregation_parts_are_for_sync_jobs() -> None:
    from pipeline.spec import SpecError, parse_spec

    with pytest.raises(SpecError, match="aggregation_parts"):
        parse_spec({"mode": "async", "aggregation_parts": 2})
    with pytest.raises(SpecError, match="cannot be split by parameter range"):
        parse_spec({"codec": "topk+q4", "aggregation_parts": 2})


# ---------------------------------------------------------------- which versions are evaluated


@pytest.mark.parametrize(("every", "target", "due"), [
    (1, None, [1, 2, 3, 4, 5, 6]),
    (0, None, [6]),  # only the last: a job that registers only its final version is evaluated only then
    (4, None, [4, 6]),
    (0, 0.9, [1, 2, 3, 4, 5, 6]),  # the stop rule reads the test accuracy of every version
])
def test_versions_are_evaluated_as_publish_every_versions_says_and_always_the_last(every, target, due) -> None:
    from workers.publish import evaluation_due

    spec = JobSpec.model_validate({"publish_every_versions": every, "target_accuracy": target})
    assert [v for v in range(0, 7) if evaluation_due(spec, v, 6)] == due


def test_an_evaluation_is_skipped_only_for_a_newer_version_that_is_due() -> None:
    from workers.publish import newer_due

    every4 = JobSpec.model_validate({"publish_every_versions": 4})
    assert not newer_due(every4, 4, 7, 10)  # 5..7 are not due: v4 is still evaluated
    assert newer_due(every4, 4, 8, 10)
    assert newer_due(every4, 4, 10, 10)  # the last
    assert not newer_due(JobSpec.model_validate({"publish_every_versions": 0}), 3, 9, 10)


def test_advance_requests_the_evaluation_of_due_versions_only(unit_ctx) -> None:
    client = Client(unit_ctx.settings, store=unit_ctx.store, redis_client=unit_ctx.redis, dispatch=unit_ctx.dispatch)
    job_id = client.stage({"shards": 2, "epochs": 1, "batch_size": 512, "publish_every_versions": 0})
    total = unit_ctx.jobs.get(job_id).total_rounds
    assert total > 1
    for v in range(1, total + 1):
        unit_ctx.redis.hset(keys.job(job_id), "version", v)  # as if version v had just been committed
        advance(unit_ctx, job_id)
    assert unit_ctx.dispatch.of("publish") == [{"job_id": job_id, "version": total}]
