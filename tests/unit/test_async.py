"""Async mode through the real shard and aggregator code, on fakeredis and a local folder."""

from __future__ import annotations

import pytest
import torch

from pipeline.checkpoint import decode_checkpoint
from pipeline.client import Client
from pipeline.spec import JobSpec
from storage import keys
from workers import aggregator, async_agg, lifecycle, shard


class Enqueued:
    """The shard tasks async mode enqueued (on the Context's StubDispatcher) as (job, shard, version, step,
    attempt) tuples."""

    def __init__(self, dispatch) -> None:
        self.dispatch = dispatch

    def _all(self) -> list[tuple]:
        assert all(m["apply"] for m in self.dispatch.of("shard"))  # async results are applied on arrival
        return [(m["job_id"], m["shard"], m["version"], m["step"], m["attempt"]) for m in self.dispatch.of("shard")]

    def __iter__(self):
        return iter(self._all())

    def __contains__(self, item: tuple) -> bool:
        return item in self._all()

    def count(self, item: tuple) -> int:
        return self._all().count(item)


@pytest.fixture
def enqueued(unit_ctx) -> Enqueued:
    return Enqueued(unit_ctx.dispatch)


def stage(unit_ctx, **spec) -> str:
    client = Client(unit_ctx.settings, store=unit_ctx.store, redis_client=unit_ctx.redis, dispatch=unit_ctx.dispatch)
    base = {"mode": "async", "shards": 2, "batch_size": 64, "epochs": 1, "publish_every_versions": 0}
    return client.stage({**base, **spec})


def compute(unit_ctx, job_id: str, shard_id: int, version: int, step: int, attempt: int = 0) -> dict:
    return shard.train_shard(unit_ctx, job_id, shard_id, version, step, attempt)


def test_async_start_issues_the_first_steps_of_the_global_order_once(unit_ctx, enqueued) -> None:
    job_id = stage(unit_ctx)
    lifecycle.advance(unit_ctx, job_id)
    lifecycle.advance(unit_ctx, job_id)
    # The first `shards` steps of the global order: each shard's first.
    assert sorted(enqueued) == [(job_id, 0, -1, 0, 0), (job_id, 1, -1, 0, 0)]
    assert unit_ctx.jobs.get(job_id).status == "running"


def test_a_shards_steps_are_accepted_out_of_order_each_exactly_once(unit_ctx, enqueued) -> None:
    job_id = stage(unit_ctx)
    step1 = compute(unit_ctx, job_id, 0, 0, 1, attempt=1)  # a fast worker finishes shard 0's second step first
    step0 = compute(unit_ctx, job_id, 0, 0, 0, attempt=0)  # ... while a slow one still computes its first
    assert async_agg.apply_update(unit_ctx, job_id, step1)["outcome"] == "applied"
    assert unit_ctx.jobs.progress(job_id).get(0, 0) == 0 and unit_ctx.jobs.ahead(job_id) == {(0, 1)}
    assert async_agg.apply_update(unit_ctx, job_id, step1)["outcome"] == "duplicate"
    assert async_agg.apply_update(unit_ctx, job_id, step0)["outcome"] == "applied"
    assert unit_ctx.jobs.progress(job_id)[0] == 2 and unit_ctx.jobs.ahead(job_id) == set()
    for again in (step0, step1):  # redelivered after the mark moved past them
        assert async_agg.apply_update(unit_ctx, job_id, again)["outcome"] == "duplicate"
    assert unit_ctx.jobs.get(job_id).fields["accepted"] == "2"
    # In flight now: the first two steps of the global order not accepted, shard 1's first two (its second one
    # to whichever worker comes free first: shard 1 is not left to a slow worker holding its first).
    in_flight = {f.decode() for f in unit_ctx.redis.hkeys(keys.job_issued(job_id)) if b"@" in f}
    assert in_flight == {"1@0", "1@1"}
    assert [a for _, s, _, step, a in enqueued if s == 1] == [0, 1]  # a blob key of its own for each


def test_a_version_is_one_step_on_the_mean_of_shards_updates_as_a_sync_round(unit_ctx, enqueued) -> None:
    spec = {"shards": 2, "batch_size": 64, "epochs": 1, "publish_every_versions": 0}
    a = stage(unit_ctx, **spec)
    s = stage(unit_ctx, **{**spec, "mode": "sync"})
    for shard_id in range(2):
        out = async_agg.apply_update(unit_ctx, a, compute(unit_ctx, a, shard_id, 0, 0))
        assert out["outcome"] == "applied" and out["staleness"] == 0
    assert unit_ctx.jobs.get(a).version == 1  # publish_every defaults to the number of shards
    aggregator.aggregate_round(unit_ctx, s, 0, [compute(unit_ctx, s, i, 0, 0) for i in range(2)])
    got = decode_checkpoint(unit_ctx.store.get(keys.checkpoint(a, 1)), "a").state
    want = decode_checkpoint(unit_ctx.store.get(keys.checkpoint(s, 1)), "s").state
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6), name


def test_the_blobs_a_committed_version_applied_are_deleted_and_pending_ones_kept(unit_ctx, enqueued) -> None:
    job_id = stage(unit_ctx)  # a version every 2 accepted updates (one per shard)
    first, second = compute(unit_ctx, job_id, 0, 0, 0), compute(unit_ctx, job_id, 1, 0, 0)
    assert async_agg.apply_update(unit_ctx, job_id, first)["outcome"] == "applied"
    assert unit_ctx.jobs.get(job_id).version == 0 and unit_ctx.store.exists(first["key"])  # pending: kept
    unit_ctx.update_cache.clear()  # an aggregator restarted here reads the pending update's blob again
    assert async_agg.apply_update(unit_ctx, job_id, second)["outcome"] == "applied"
    assert unit_ctx.jobs.get(job_id).version == 1
    assert not unit_ctx.store.exists(first["key"]) and not unit_ctx.store.exists(second["key"])
    assert unit_ctx.store.exists(keys.checkpoint(job_id, 1))
    third = compute(unit_ctx, job_id, 0, 1, 1)
    async_agg.apply_update(unit_ctx, job_id, third)
    assert unit_ctx.store.exists(third["key"])  # applied to no committed version yet
    # A redelivered result of a deleted blob is a duplicate, not an error.
    assert async_agg.apply_update(unit_ctx, job_id, first)["outcome"] == "duplicate"


def test_a_dropped_result_naming_another_steps_blob_deletes_nothing(unit_ctx, enqueued) -> None:
    job_id = stage(unit_ctx, max_staleness=0, publish_every=1)
    async_agg.apply_update(unit_ctx, job_id, compute(unit_ctx, job_id, 0, 0, 0))  # version 1
    pending = compute(unit_ctx, job_id, 1, 1, 0)  # shard 1 on version 1: not yet applied
    forged = {**compute(unit_ctx, job_id, 1, 0, 1), "key": pending["key"]}  # stale, naming the other's blob
    assert async_agg.apply_update(unit_ctx, job_id, forged)["outcome"] == "stale"
    assert unit_ctx.store.exists(pending["key"])


def test_the_same_gradient_message_delivered_twice_is_applied_once(unit_ctx, enqueued) -> None:
    job_id = stage(unit_ctx, publish_every=1)
    result = compute(unit_ctx, job_id, 0, 0, 0)
    first = async_agg.apply_update(unit_ctx, job_id, result)
    second = async_agg.apply_update(unit_ctx, job_id, result)
    assert first["outcome"] == "applied" and second["outcome"] == "duplicate"
    job = unit_ctx.jobs.get(job_id)
    assert job.version == 1 and job.fields["accepted"] == "1"
    assert unit_ctx.jobs.consumed(job_id, 1) == {keys.gradient_identity(job_id, 0, 0, 0)}
    # The shard's next step was issued on the newest version, once.
    assert enqueued.count((job_id, 0, -1, 1, 0)) == 1


def test_updates_staler_than_the_bound_are_dropped_and_the_shard_reissued(unit_ctx, enqueued) -> None:
    job_id = stage(unit_ctx, max_staleness=1, publish_every=1)
    old = compute(unit_ctx, job_id, 1, 0, 0)  # shard 1 computes on version 0 ...
    for step in range(2):  # ... while shard 0 moves the job to version 2
        v = unit_ctx.jobs.get(job_id).version
        async_agg.apply_update(unit_ctx, job_id, compute(unit_ctx, job_id, 0, v, step))
    assert unit_ctx.jobs.get(job_id).version == 2
    out = async_agg.apply_update(unit_ctx, job_id, old)
    assert out["outcome"] == "stale" and out["staleness"] == 2
    assert unit_ctx.jobs.get(job_id).version == 2
    assert not unit_ctx.store.exists(old["key"])  # never to be applied: deleted
    # The same step again, on the newest version, as a new attempt of its shard.
    assert [a for _, s, _, step, a in enqueued if (s, step) == (1, 0)] == [0, 2]
    dropped = [e for e in unit_ctx.jobs.events(job_id) if e["kind"] == "dropped"]
    assert "staleness 2 exceeds max_staleness 1" in dropped[0]["reason"]


def test_accepted_stale_update_is_scaled_by_one_over_one_plus_staleness(unit_ctx, enqueued) -> None:
    job_id = stage(unit_ctx, max_staleness=4, publish_every=1)
    old = compute(unit_ctx, job_id, 1, 0, 0)
    async_agg.apply_update(unit_ctx, job_id, compute(unit_ctx, job_id, 0, 0, 0))
    async_agg.apply_update(unit_ctx, job_id, old)
    metrics = unit_ctx.jobs.metrics(job_id)
    assert [m["staleness_mean"] for m in metrics] == [0, 1]


def test_versions_publish_every_k_updates_and_a_restarted_aggregator_replays_pending(unit_ctx, enqueued) -> None:
    job_id = stage(unit_ctx, publish_every=2)
    async_agg.apply_update(unit_ctx, job_id, compute(unit_ctx, job_id, 0, 0, 0))
    assert unit_ctx.jobs.get(job_id).version == 0
    assert len(unit_ctx.jobs.pending(job_id)) == 1
    unit_ctx.update_cache = type(unit_ctx.update_cache)(256)  # the aggregator restarted: memory is gone
    async_agg.apply_update(unit_ctx, job_id, compute(unit_ctx, job_id, 1, 0, 0))
    job = unit_ctx.jobs.get(job_id)
    assert job.version == 1 and unit_ctx.jobs.pending(job_id) == []
    assert len(unit_ctx.jobs.consumed(job_id, 1)) == 2


def test_async_job_finishes_when_its_update_budget_is_applied(unit_ctx, enqueued, run_published) -> None:
    job_id = stage(unit_ctx, batch_size=512)  # 2 shards x 2 steps = a budget of 4 updates, 2 versions
    budget = int(unit_ctx.jobs.get(job_id).fields["budget"])
    assert budget == 4
    for _ in range(budget):
        job = unit_ctx.jobs.get(job_id)
        progress = unit_ctx.jobs.progress(job_id)
        s = min(range(2), key=lambda i: progress.get(i, 0))
        async_agg.apply_update(unit_ctx, job_id, compute(unit_ctx, job_id, s, job.version, progress.get(s, 0)))
    assert unit_ctx.jobs.get(job_id).status == "running"  # until its last version is evaluated
    run_published(unit_ctx)
    job = unit_ctx.jobs.get(job_id)
    assert job.status == "succeeded" and job.version == 2


def test_a_top_k_shard_computes_its_steps_one_at_a_time(unit_ctx, enqueued) -> None:
    job_id = stage(unit_ctx, codec="topk")  # step k+1 needs step k's error-feedback residual
    lifecycle.advance(unit_ctx, job_id)
    assert sorted(enqueued) == [(job_id, 0, -1, 0, 0), (job_id, 1, -1, 0, 0)]


def test_a_stale_update_is_delay_compensated_with_the_mean_square_kept_in_the_checkpoint(unit_ctx, enqueued) -> None:
    def run(lam: float) -> tuple[str, dict]:
        job_id = stage(unit_ctx, publish_every=1, momentum=0.0, delay_compensation=lam)
        old = compute(unit_ctx, job_id, 1, 0, 0)  # computed on version 0 ...
        async_agg.apply_update(unit_ctx, job_id, compute(unit_ctx, job_id, 0, 0, 0))
        assert async_agg.apply_update(unit_ctx, job_id, old)["staleness"] == 1  # ... applied to version 1
        return job_id, {v: decode_checkpoint(unit_ctx.store.get(keys.checkpoint(job_id, v)), str(v),
                                             opt_data=_opt(unit_ctx, job_id, v)) for v in (1, 2)}

    _, plain = run(0.0)
    job_id, dc = run(2.0)
    for name, w in plain[1].state.items():  # version 1's update was fresh: nothing to compensate
        assert torch.equal(dc[1].state[name], w), name
    assert any(not torch.equal(dc[2].state[n], w) for n, w in plain[2].state.items())  # version 2's was stale
    kept = dc[2].opt["dc_mean_square"]
    assert kept and kept.keys() <= dc[2].state.keys()
    assert "dc_mean_square" not in plain[2].opt


def test_staleness_momentum_lowers_the_momentum_of_a_step_on_stale_updates_only(unit_ctx, enqueued) -> None:
    def run(fraction: float) -> dict:
        job_id = stage(unit_ctx, publish_every=1, delay_compensation=0, staleness_momentum=fraction)
        old = compute(unit_ctx, job_id, 1, 0, 0)
        async_agg.apply_update(unit_ctx, job_id, compute(unit_ctx, job_id, 0, 0, 0))
        async_agg.apply_update(unit_ctx, job_id, old)  # staleness 1: momentum 0.9 - fraction * 1/2
        return {v: decode_checkpoint(unit_ctx.store.get(keys.checkpoint(job_id, v)), str(v),
                                     opt_data=_opt(unit_ctx, job_id, v)) for v in (1, 2)}

    off, on = run(0.0), run(1.0)
    for name, buf in off[1].opt["momentum"].items():  # a fresh update: the momentum is whole either way
        assert torch.equal(on[1].opt["momentum"][name], buf), name
        # buf2 = μ·buf1 + g: the same g, so the two runs' buffers differ by (0.9 - 0.4)·buf1
        gap = off[2].opt["momentum"][name] - on[2].opt["momentum"][name]
        assert torch.allclose(gap, 0.5 * buf, atol=1e-6), name


def _opt(unit_ctx, job_id: str, version: int) -> bytes | None:
    try:
        return unit_ctx.store.get(keys.optimizer_state(keys.checkpoint(job_id, version)))
    except Exception:  # noqa: BLE001 - plain SGD without momentum or delay compensation keeps no state
        return None


def test_weight_prediction_computes_the_gradient_one_step_ahead_and_leaves_the_cached_model(
        unit_ctx, enqueued, monkeypatch) -> None:
    seen: list[dict[str, torch.Tensor]] = []
    real = shard.gradient

    def recording(model, *args, **kwargs):
        seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(shard, "gradient", recording)
    job_id = stage(unit_ctx, publish_every=1, weight_prediction=1.0, lr_schedule="cosine")
    assert unit_ctx.jobs.get(job_id).spec["staleness_momentum"] == 0  # its default with a prediction
    async_agg.apply_update(unit_ctx, job_id, compute(unit_ctx, job_id, 0, 0, 0))  # version 0: nothing to predict
    w0, w1 = (decode_checkpoint(unit_ctx.store.get(keys.checkpoint(job_id, v)), str(v)).state for v in (0, 1))
    assert all(torch.equal(seen[0][n], w0[n]) for n in seen[0])
    compute(unit_ctx, job_id, 1, 1, 0)  # on version 1: the step that made it, once more
    compute(unit_ctx, job_id, 0, 1, 1)  # again, from the buffers this process holds
    for name, w in seen[1].items():
        assert torch.allclose(w, w1[name] + (w1[name] - w0[name]), atol=1e-6), name
        assert not torch.equal(w, w1[name]), name
        assert torch.equal(seen[2][name], w), name
    cached = unit_ctx.cached_model(keys.checkpoint(job_id, 1), unit_ctx.device())
    assert all(torch.equal(p, w1[n]) for n, p in cached.named_parameters())  # the shared module is untouched


@pytest.mark.parametrize("spec, named", [({"mode": "sync"}, "async"), ({"local_steps": 4}, "local_steps"),
                                         ({"momentum": 0.0}, "momentum")])
def test_weight_prediction_is_refused_where_there_is_no_last_step_to_repeat(unit_ctx, spec: dict, named: str) -> None:
    from pipeline.spec import SpecError

    with pytest.raises(SpecError, match=f"weight_prediction: .*{named}"):
        stage(unit_ctx, weight_prediction=1.0, **spec)
    assert list(unit_ctx.store.list("")) == []


@pytest.mark.parametrize("given, prediction, staleness_momentum", [
    ({}, 1.0, 0.0),  # the default: momentum 0.9, one SGD step per version
    ({"weight_prediction": 0}, 0.0, 1.0),  # refused by hand: the staleness momentum holds async instead
    ({"weight_prediction": 2}, 2.0, 0.0),
    ({"momentum": 0.0}, 0.0, 1.0),  # no last step to repeat
    ({"local_steps": 4}, 0.0, 1.0),  # a version is an outer step
    ({"codec": "topk", "codec_momentum": 0.9}, 0.0, 1.0),  # DGC: the momentum is on the workers
    ({"mode": "sync"}, 0.0, 1.0),
])
def test_an_async_job_predicts_its_weights_one_step_ahead_unless_it_has_no_step_to_repeat(
        given: dict, prediction: float, staleness_momentum: float) -> None:
    spec = JobSpec.model_validate({"mode": "async", "shards": 2, **given})
    assert (spec.weight_prediction, spec.staleness_momentum) == (prediction, staleness_momentum)
    assert JobSpec.model_validate(spec.model_dump()) == spec  # a stored spec reads back the same
