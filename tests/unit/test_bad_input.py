"""Bad input is refused with a reason and never applied: job specs, gradient blobs, object keys, Celery bodies.

Everything here runs on fakeredis and a local folder. Hypothesis draws the invalid specs and the bit flips;
the blob defects are the ones a buggy or hostile shard worker could produce.
"""

from __future__ import annotations

import math
import pickle
import string
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import blobs
from pipeline.client import Client
from pipeline.codecs import CODECS as CODEC_NAMES
from pipeline.models import BUILTIN as BUILTIN_MODELS
from pipeline.settings import Settings
from pipeline.spec import JobSpec, SpecError
from storage import keys
from workers import aggregator, shard, updates

BASE = {"shards": 2, "epochs": 1, "batch_size": 64}
_word = st.text(alphabet=string.ascii_lowercase + "_-", min_size=1, max_size=12)


def _not(*allowed: str) -> st.SearchStrategy[str]:
    return _word.filter(lambda s: s not in allowed)


# field → values that must be refused. The error must name the field (model_args/dataset_args: the
# model/dataset they fail to build; an over-large shard count: shards, checked against the data).
INVALID: dict[str, st.SearchStrategy[Any]] = {
    "shards": st.integers(max_value=0) | st.integers(min_value=100_001) | st.integers(1439, 100_000) | _word,
    "epochs": st.integers(max_value=0) | st.integers(min_value=100_001),
    "batch_size": st.integers(max_value=0) | st.floats(0.1, 0.9) | st.integers(min_value=65_537),
    "local_steps": st.integers(max_value=0) | st.integers(min_value=10_001),
    "mode": _not("sync", "async"),
    "kind": _not("train", "distill"),
    "momentum": st.floats(max_value=-1e-9) | st.floats(min_value=1.0) | st.just(math.nan),
    "weight_decay": st.floats(max_value=-1e-9) | st.just(math.inf),
    "temperature": st.floats(max_value=0) | st.just(math.inf),
    "codec": _not(*CODEC_NAMES),
    "codec_density": st.floats(max_value=0) | st.floats(min_value=1.0, exclude_min=True),
    "optimizer": _not("sgd"),
    "inner_optimizer": _not("sgd", "adamw"),
    "inner_state": _not("keep", "reset"),
    "staleness_rule": _not("inverse", "constant"),
    "target_accuracy": st.floats(max_value=0) | st.floats(min_value=1.0, exclude_min=True),
    "publish_every": st.integers(max_value=0),
    "max_staleness": st.integers(max_value=-1),
    "seed": _word | st.integers(min_value=2**63) | st.just(2**80) | st.integers(max_value=-1),
    "register_as": st.sampled_from(["a b", "../prod", "", "x" * 200, "-lead", "ünï"]),
    "teacher": st.sampled_from(["a b@1", "@prod", "m@x y", "x" * 400]),
    "init_from": st.sampled_from(["a b", "@7", "m@../x"]),
    "lr": st.floats(max_value=0) | st.sampled_from([math.inf, math.nan]) | st.floats(min_value=101),
    "publish_every_versions": st.integers(max_value=-1) | st.integers(min_value=100_001),
    "model": _not(*BUILTIN_MODELS) | st.sampled_from(["no_such_module_xyz:factory", "math:pi", "os:nope", "os:system"]),
    "dataset": _not("digits") | st.sampled_from(["no_such_module_xyz:load", "math:pi"]),
    "artifact_chain": st.sampled_from(["int9", "prune", "prune:x", "zstd,zstd", "fp16,int8", "gzip", "int4:3",
                                       "int8:64"]),
    "codec_momentum": st.floats(max_value=-0.01) | st.floats(min_value=1.0) | st.just(math.nan),
    "codec_warmup_epochs": st.floats(max_value=-0.01) | st.floats(min_value=1001),
    "codec_clip_norm": st.floats(max_value=-0.01) | st.floats(min_value=1.01e6) | st.just(math.nan),
    "codec_state": st.sampled_from(["disk", "", "redis"]),
    "weight_prediction": st.floats(max_value=-0.01) | st.floats(min_value=16.01) | st.just(math.nan),
    "promote": st.sampled_from(["a b", "latest", "123", "../prod", "", "x" * 200]),
    "model_args": st.sampled_from([{"hidden": -1}, {"no_such_arg": 1}, {"channels": [1]}, []]),
    "dataset_args": st.sampled_from([{"no_such_arg": 1}, "digits", {"test_fraction": 0}, {"test_fraction": 1.0},
                                     {"pad": "x" * 20_000}]),
}
NAMED = {"model_args": "model", "dataset_args": "dataset"}


def offline_client(store_root: Path, r: fakeredis.FakeRedis) -> Client:
    """A client on fakeredis and a local folder whose enqueued work lands in a StubDispatcher."""
    from storage.objectstore import LocalStore
    from workers.dispatch import StubDispatcher

    return Client(Settings(_env_file=None, redis_url="redis://unused.invalid:1/0"), store=LocalStore(store_root),
                  redis_client=r, dispatch=StubDispatcher())


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_invalid_job_specs_are_refused_naming_the_field_and_write_nothing(data: st.DataObject) -> None:
    choice = data.draw(st.sampled_from([*sorted(INVALID), "<unknown field>", "<distill without teacher>"]))
    if choice == "<unknown field>":
        field = data.draw(st.text(min_size=1, max_size=16).filter(lambda k: k not in JobSpec.model_fields))
        spec, named = {**BASE, field: 1}, field
    elif choice == "<distill without teacher>":
        spec, named = {**BASE, "kind": "distill"}, "teacher"
    else:
        spec, named = {**BASE, choice: data.draw(INVALID[choice], label=choice)}, choice
    r = fakeredis.FakeRedis()
    with tempfile.TemporaryDirectory() as root:
        client = offline_client(Path(root), r)
        with pytest.raises(SpecError) as err:
            client.submit(spec)
        assert f"{named}:" in str(err.value) or f"{NAMED.get(named)}:" in str(err.value), str(err.value)
        assert client.dispatch.sent == [], "a refused spec enqueued work"
        assert r.dbsize() == 0, "a refused spec wrote to Redis"
        assert list(client.store.list("")) == [], "a refused spec wrote to the object store"


@pytest.mark.parametrize("field, value", [
    ("seed", 2**80), ("seed", -1), ("batch_size", 10**6), ("register_as", "a b"), ("register_as", "../prod"),
    ("dataset_args", {"test_fraction": 0}), ("model", "os:system"), ("dataset", "os:getcwd"), ("lr", 1e9),
    ("init_from", "a b@7"), ("model_args", {"pad": "x" * 20_000}),
    ("codec_momentum", 0.9),  # BASE's codec is not topk: momentum correction has nothing to correct
    ("weight_prediction", 1.0),  # BASE is a sync job: its updates are applied to the weights they were computed on
    ("inner_momentum", 1.0), ("inner_momentum", -0.1),
])
def test_fields_that_were_unchecked_are_refused_at_submit_naming_the_field(
        tmp_path: Path, field: str, value: Any) -> None:
    r = fakeredis.FakeRedis()
    client = offline_client(tmp_path, r)
    with pytest.raises(SpecError) as err:
        client.submit({**BASE, field: value})
    assert f"{field}:" in str(err.value) or f"{NAMED.get(field)}:" in str(err.value), str(err.value)
    assert "Traceback" not in str(err.value) and r.dbsize() == 0 and client.dispatch.sent == []


def test_a_valid_spec_passes_the_same_checks(tmp_path: Path) -> None:
    client = offline_client(tmp_path, fakeredis.FakeRedis())
    job_id = client.stage(BASE)
    assert client.jobs.get(job_id).status == "queued"


# ---------------------------------------------------------------- gradient blobs


@pytest.fixture
def round0(unit_ctx) -> tuple[str, list[dict[str, Any]]]:
    """A staged 2-shard job with both shards' round-0 blobs computed."""
    client = Client(unit_ctx.settings, store=unit_ctx.store, redis_client=unit_ctx.redis,
                    dispatch=unit_ctx.dispatch)
    job_id = client.stage({"shards": 2, "batch_size": 16, "momentum": 0.0})
    return job_id, [shard.train_shard(unit_ctx, job_id, s, 0, 0, 0) for s in range(2)]


def rewrite(ctx, result: dict[str, Any], edit: Callable[[dict[str, torch.Tensor], dict[str, Any]], None]
            ) -> dict[str, Any]:
    """Re-encode a shard's blob after `edit(tensors, meta)`, as a buggy shard would: sha256 reported honestly."""
    blob = blobs.decode(ctx.store.get(result["key"]), result["key"])
    tensors, meta = {k: v.clone() for k, v in blob.tensors.items()}, dict(blob.meta)
    meta["codec"] = dict(meta["codec"])
    edit(tensors, meta)
    data = blobs.encode(tensors, meta, signing_key=ctx.signing_key)
    ctx.store.put(result["key"], data)
    return {**result, "sha256": blobs.digest_of(data)}


def put_bytes(ctx, result: dict[str, Any], data: bytes) -> dict[str, Any]:
    """Store `data` where the shard's blob was; the result reports the digest its header declares (if any)."""
    ctx.store.put(result["key"], data)
    try:
        return {**result, "sha256": blobs.digest_of(data)}
    except blobs.BlobError:
        return {**result, "sha256": blobs.sha256_hex(data)}


def _reshape_bias(t: dict[str, torch.Tensor], m: dict[str, Any]) -> None:
    t["fc2.bias.values"] = torch.zeros(11)
    m["codec"]["tensors"] = {**m["codec"]["tensors"], "fc2.bias": {"shape": [11], "dtype": "float32"}}


def _poison(value: float) -> Callable[[dict[str, torch.Tensor], dict[str, Any]], None]:
    def edit(t: dict[str, torch.Tensor], _: dict[str, Any]) -> None:
        t["fc2.bias.values"][3] = value

    return edit


DEFECTS: dict[str, tuple[Callable[[Any, dict[str, Any]], dict[str, Any]], str]] = {
    "truncated to its prelude": (lambda ctx, r: put_bytes(ctx, r, ctx.store.get(r["key"])[:6]), "truncated"),
    "truncated payload": (lambda ctx, r: put_bytes(ctx, r, ctx.store.get(r["key"])[:-100]), "truncated"),
    "bit-flipped payload": (lambda ctx, r: put_bytes(ctx, r, _flip(ctx.store.get(r["key"]), -50)), "blake3 mismatch"),
    "a pickle instead of a blob": (lambda ctx, r: put_bytes(ctx, r, pickle.dumps({"w": 1})), "not an AaS blob"),
    "an unknown codec": (lambda ctx, r: rewrite(ctx, r, lambda t, m: m["codec"].update(codec="zz")), "unknown codec"),
    "wrong shapes": (lambda ctx, r: rewrite(ctx, r, _reshape_bias), "has shape (11,)"),
    "NaN values": (lambda ctx, r: rewrite(ctx, r, _poison(math.nan)), "NaN or Inf"),
    "Inf values": (lambda ctx, r: rewrite(ctx, r, _poison(math.inf)), "NaN or Inf"),
    "another shard's identity": (lambda ctx, r: rewrite(ctx, r, lambda t, m: m.update(shard=0)), "header shard=0"),
    "another base version": (lambda ctx, r: rewrite(ctx, r, lambda t, m: m.update(base_version=3)), "base_version"),
}


def _flip(data: bytes, at: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[at] ^= 1 << bit
    return bytes(out)


def assert_not_applied(ctx, job_id: str) -> None:
    assert ctx.jobs.get(job_id).version == 0
    assert ctx.jobs.consumed(job_id, 1) == set()
    assert not ctx.store.exists(keys.checkpoint(job_id, 1)) or ctx.jobs.get(job_id).version == 0


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_a_defective_gradient_blob_is_rejected_with_a_reason_and_never_applied(unit_ctx, round0, defect: str) -> None:
    job_id, results = round0
    make, reason = DEFECTS[defect]
    bad = make(unit_ctx, results[1])
    with pytest.raises(aggregator.RoundIncomplete) as err:
        aggregator.aggregate_round(unit_ctx, job_id, 0, [results[0], bad])
    assert reason in str(err.value) and "shard 1" in str(err.value)
    assert err.value.recompute == [1]
    assert_not_applied(unit_ctx, job_id)
    assert not unit_ctx.store.exists(bad["key"]), "a rejected blob must be removed so it can never be applied"
    assert any(e["kind"] == "rejected" and e["shard"] == "1" for e in unit_ctx.jobs.events(job_id))


def test_an_oversize_blob_is_rejected_before_it_is_decoded(unit_ctx, round0) -> None:
    job_id, results = round0
    unit_ctx.settings = unit_ctx.settings.model_copy(update={"max_blob_bytes": 1024})
    with pytest.raises(aggregator.RoundIncomplete, match="exceeds the limit of 1024"):
        aggregator.aggregate_round(unit_ctx, job_id, 0, results)
    assert_not_applied(unit_ctx, job_id)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_any_single_bit_flip_anywhere_in_a_blob_is_detected(unit_ctx, round0, where: float, bit: int) -> None:
    job_id, results = round0
    key = results[0]["key"]
    data = unit_ctx.store.get(key)
    model = unit_ctx.checkpoint(keys.checkpoint(job_id, 0), job_id).build()
    params = {n: p.detach() for n, p in model.named_parameters()}
    unit_ctx.store.put(key, _flip(data, int(where * len(data)), bit))
    try:
        # sha256=None: the envelope's own digest must catch it (no shard result to compare with)
        with pytest.raises((blobs.BlobError, aggregator.UpdateRejected)):
            updates.load_update(unit_ctx, job_id, key, None, params, {"job": job_id, "shard": 0, "base_version": 0})
    finally:
        unit_ctx.store.put(key, data)


def test_an_aggregation_sent_without_results_checks_each_blob_against_the_digest_its_shard_recorded(
        unit_ctx, round0) -> None:
    """The shard that completes a round sends the aggregation without results (workers/liveness.py); the
    aggregation reads the results the shards recorded, digests included: a blob replaced after its shard
    recorded it (here by another validly signed blob) is rejected, not applied."""
    from workers import liveness

    job_id, results = round0
    for s, r in enumerate(results):
        liveness.shard_finished(unit_ctx, job_id, s, 0, 0, r)
    rewrite(unit_ctx, results[1], lambda t, m: t.update({n: v * 2 for n, v in t.items() if v.is_floating_point()}))
    with pytest.raises(aggregator.RoundIncomplete) as err:
        aggregator.aggregate_round(unit_ctx, job_id, 0, [])
    assert "shard 1" in str(err.value) and "differs from what the writer reported" in str(err.value)
    assert_not_applied(unit_ctx, job_id)


def test_a_recomputed_shard_replaces_its_rejected_blob_and_the_round_commits(unit_ctx, round0) -> None:
    job_id, results = round0
    bad = DEFECTS["NaN values"][0](unit_ctx, results[1])
    with pytest.raises(aggregator.RoundIncomplete):
        aggregator.aggregate_round(unit_ctx, job_id, 0, [results[0], bad])
    shard.train_shard(unit_ctx, job_id, 1, 0, 0, 1)  # the retry's recompute: attempt 1
    # The round's result list is unchanged on retry: it still names the rejected (now deleted) attempt 0.
    outcome = aggregator.aggregate_round(unit_ctx, job_id, 0, [results[0], bad])
    assert outcome.committed
    assert unit_ctx.jobs.consumed(job_id, 1) == {keys.gradient_identity(job_id, 0, 0, 0),
                                                 keys.gradient_identity(job_id, 1, 0, 1)}


# ---------------------------------------------------------------- object keys


def _foreign_keys(ctx, job_id: str) -> dict[str, str]:
    manifest = ctx.jobs.get(job_id).fields["manifest"]
    return {
        "another job's gradient": "jobs/otherjob000/grads/v000000/s00001-a0.aast",
        "the data set manifest": manifest,
        "this job's checkpoint": keys.checkpoint(job_id, 0),
        "a traversal out of the gradient prefix": f"jobs/{job_id}/grads/../ckpt/v000000.aast",
        "an absolute path": "/etc/passwd",
        "a deep traversal": f"jobs/{job_id}/grads/v000000/../../../../etc/passwd",
    }


@pytest.mark.parametrize("which", ["another job's gradient", "the data set manifest", "this job's checkpoint",
                                   "a traversal out of the gradient prefix", "an absolute path", "a deep traversal"])
def test_a_result_naming_a_key_outside_the_jobs_gradient_prefix_is_refused_unread_and_nothing_is_deleted(
        unit_ctx, round0, which: str) -> None:
    job_id, results = round0
    key = _foreign_keys(unit_ctx, job_id)[which]
    if which == "another job's gradient":
        unit_ctx.store.put(key, unit_ctx.store.get(results[1]["key"]))
    before = sorted(unit_ctx.store.list(""))
    with pytest.raises(aggregator.RoundIncomplete) as err:
        aggregator.aggregate_round(unit_ctx, job_id, 0, [results[0], {**results[1], "key": key}])
    assert "outside" in str(err.value) and "shard 1" in str(err.value)
    assert sorted(unit_ctx.store.list("")) == before, "a foreign object was deleted or written"
    assert_not_applied(unit_ctx, job_id)


# ---------------------------------------------------------------- Celery bodies


class _Tripwire:
    """Unpickling this creates a file: proof that a pickle body was deserialized."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def test_the_celery_app_accepts_json_only_and_refuses_a_pickle_body_without_unpickling_it(tmp_path: Path) -> None:
    from kombu.exceptions import ContentDisallowed
    from kombu.serialization import loads

    from workers.app import app

    assert app.conf.accept_content == ["json"] and app.conf.result_accept_content == ["json"]
    assert app.conf.task_serializer == "json" and app.conf.result_serializer == "json"
    marker = tmp_path / "unpickled"
    body = pickle.dumps(_Tripwire(marker))
    for content_type, encoding in [("application/x-python-serialize", "binary"), ("application/x-yaml", "utf-8"),
                                   ("application/x-msgpack", "binary")]:
        with pytest.raises(ContentDisallowed):
            loads(body, content_type, encoding, accept=app.conf.accept_content)
    assert not marker.exists(), "the pickle body was deserialized"


# ---------------------------------------------------------------- state left behind by a lost Redis


def test_a_job_hash_holding_only_counters_is_not_a_job_and_resume_rebuilds_it_from_the_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from storage.jobstate import JobNotFound

    r = fakeredis.FakeRedis()
    client = offline_client(tmp_path, r)
    job_id = client.stage({**BASE, "epochs": 2})
    want = client.jobs.get(job_id)
    r.flushdb()  # Redis lost everything ...
    client.jobs.add_bytes(job_id, up=123)  # ... and a task still running bumped its byte counter (HINCRBY)
    with pytest.raises(JobNotFound):
        client.jobs.get(job_id)
    state = client.resume(job_id)
    assert state["status"] == "running" and state["version"] == 0
    assert state["total_rounds"] == want.total_rounds and client.jobs.get(job_id).spec == want.spec
    assert client.dispatch.of("round") == [{"job_id": job_id, "version": 0, "shards": 2, "step": 0}]


def test_an_unreachable_redis_is_one_line_naming_it_not_a_traceback(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.client.cli import main
    from pipeline.settings import get_settings

    monkeypatch.setenv("AAS_REDIS_URL", "redis://:pw-Hq2@127.0.0.1:1/0")
    get_settings.cache_clear()
    try:
        assert main(["status", "abc123"]) == 3  # exit 3: a service did not answer
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "cannot reach Redis at redis://:***@127.0.0.1:1/0" in err
    assert "pw-Hq2" not in err and len(err.strip().splitlines()) == 1


def test_inner_momentum_is_refused_for_an_inner_optimizer_with_its_own_moments(tmp_path: Path) -> None:
    r = fakeredis.FakeRedis()
    client = offline_client(tmp_path, r)
    with pytest.raises(SpecError, match="inner_momentum: .*'adamw'"):
        client.submit({**BASE, "local_steps": 4, "inner_optimizer": "adamw", "inner_momentum": 0.9})
    assert r.dbsize() == 0 and client.dispatch.sent == []
