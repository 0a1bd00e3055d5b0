"""ops/bench/training: a pipeline job's pace per quarter of its versions; the rows' specs (no training)."""

from __future__ import annotations

from conftest import load_bench


def test_pace_gives_samples_per_second_and_mean_write_per_quarter_of_the_versions() -> None:
    bench = load_bench("training")
    # 8 versions of 32 samples: the first half one per second, the second one per two seconds, writes doubling.
    t, metrics = 100.0, []
    for i in range(8):
        t += 1.0 if i < 4 else 2.0
        metrics.append({"t": t, "samples": 32, "write_s": 0.01 if i < 4 else 0.02})
    got = bench.pace(metrics, 100.0)
    assert got == {"pace": [32.0, 32.0, 16.0, 16.0], "write_s": [0.01, 0.01, 0.02, 0.02]}
    assert bench.pace(metrics[:3], 100.0) == {"pace": [], "write_s": []}  # fewer versions than quarters
    assert bench.pace([{"samples": 32}] * 8, 100.0) == {"pace": [], "write_s": []}  # metrics without times


def test_a_rows_inner_lr_follows_its_lr_unless_set() -> None:
    from dataclasses import replace

    bench = load_bench("training")
    b = bench.budget_for("char-lm", quick=True)
    assert b.spec()["inner_lr"] == b.lr
    tuned = replace(b, common_spec={"lr": b.lr / 2})  # --spec '{"lr": ...}' steps the H > 1 rows' inner SGD too
    assert tuned.spec(local_steps=8)["inner_lr"] == tuned.spec()["lr"] == b.lr / 2
    assert tuned.spec(local_steps=8, inner_lr=0.3)["inner_lr"] == 0.3
    assert replace(b, common_spec={"lr": 0.2, "inner_lr": 0.01}).spec()["inner_lr"] == 0.01
