"""The fleet benchmark's bookkeeping (ops/fleet/bench.py): which rows a run names, and its compute shares."""

from __future__ import annotations

import pytest
import torch

from ops.fleet.bench import Row, compute_shares, parse_row, select_rows


def test_any_diloco_local_step_count_can_be_named_as_a_row() -> None:
    assert parse_row("DiLoCo H=256") == Row("DiLoCo H=256", "pipeline", 256, "none")
    assert parse_row("DiLoCo H=64 int8") == Row("DiLoCo H=64 int8", "pipeline", 64, "int8")
    assert parse_row("DiLoCo H=1") is None  # one local step is sync mode, not DiLoCo
    assert parse_row("DDP gloo") is None


def test_row_selection_keeps_prefix_matches_and_adds_named_local_step_counts_once() -> None:
    labels = [r.label for r in select_rows(["DDP", "DiLoCo H=128", "DiLoCo H=256 int8", "DiLoCo H=256 int8"])]
    assert labels == ["DDP gloo", "DiLoCo H=128 int8", "DiLoCo H=128", "DiLoCo H=256 int8"]


def test_an_unknown_row_name_stops_the_run_naming_the_known_ones() -> None:
    with pytest.raises(SystemExit, match="'DiLoCo H=x': no such row .known: DDP gloo"):
        select_rows(["DiLoCo H=x"])


def test_compute_share_counts_the_whole_job_and_the_rounds_between_first_and_last_commit() -> None:
    # Two workers, four rounds: each task computes 8 s; versions 1..4 committed at t = 20, 30, 40, 50 s after
    # a submit at t = 0, the job ending at 52 s. Steady state: the tasks on versions 1..3 (6 × 8 s) over 30 s.
    tasks = [(v, 8.0) for v in range(4) for _ in range(2)]
    whole, steady = compute_shares(tasks, [20.0, 30.0, 40.0, 50.0], 0.0, 52.0, workers=2)
    assert whole == pytest.approx(64.0 / 104.0)
    assert steady == pytest.approx(48.0 / 60.0)


def test_one_committed_version_has_no_steady_state() -> None:
    whole, steady = compute_shares([(0, 5.0), (0, 5.0)], [12.0], 0.0, 12.5, workers=2)
    assert whole == pytest.approx(10.0 / 25.0)
    assert steady is None


def test_one_worker_one_round_of_plain_averaging_is_that_workers_adamw_run() -> None:
    # The sweep's DiLoCo math against its DDP math: with one worker, H = the whole budget and an outer SGD step
    # of lr 1 without momentum, the new weights are the worker's own end weights, so both reach the same model.
    from ops.fleet.sweep import ddp, diloco
    from ops.fleet.workload import Workload

    torch.manual_seed(0)
    w = Workload(n_embd=32, n_layer=1, n_head=2, block_size=16, batch=8, steps=32, workers=1, outer_lr=1.0,
                 outer_momentum=0.0)
    (got,) = diloco(w, local_steps=32)
    (want,) = ddp(w, every=32)
    assert got == pytest.approx(want, rel=1e-4)


def test_task_compute_is_read_from_results_sent_with_named_or_positional_arguments() -> None:
    import json

    import fakeredis

    from ops.fleet.bench import shard_task_compute
    from storage import keys

    r = fakeredis.FakeRedis()
    def meta(name: str, job: str, version: int, compute_s: float, positional: bool = False) -> dict[str, object]:
        call = {"args": [job, 0, version]} if positional else {"kwargs": {"job_id": job, "shard_id": 0}}
        return {"name": name, **call, "result": {"version": version, "compute_s": compute_s}}

    metas = [
        meta("aas.train_shard", "j1", 0, 2.0),
        meta("aas.train_shard", "j1", 0, 3.0, positional=True),
        meta("aas.train_shard", "j1", 1, 9.0),  # version 1 was not committed
        meta("aas.train_shard", "j2", 0, 5.0),  # another job
        meta("aas.aggregate", "j1", 0, 7.0),  # not a shard task
    ]
    for i, m in enumerate(metas):
        r.set(f"celery-task-meta-{i}", json.dumps(m))
    # A sync round's results are recorded by its shards, not stored by Celery.
    r.hset(keys.job_results("j1", 0), "1", json.dumps({"shard": 1, "version": 0, "compute_s": 4.0}))
    r.hset(keys.job_results("j2", 0), "0", json.dumps({"shard": 0, "version": 0, "compute_s": 6.0}))
    assert sorted(shard_task_compute(r, "j1", below_version=1)) == [(0, 2.0), (0, 3.0), (0, 4.0)]
