"""ops/bench/compression_report on char-lm rows: perplexity and its change in percent replace accuracy (no training)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import load_bench

FP32_PPL = {0: 14.5, 1: 14.0}  # per seed


def row(codec: str, h: int, seed: int, ppl: float, bps: float) -> dict[str, Any]:
    """A codec row as compression.codec_rows writes it for char-lm, its delta against the same seed's fp32 row."""
    return {"row": f"{codec} H={h}", "codec": codec, "H": h, "seed": seed, "samples": 9344, "accuracy": 0.4,
            "accuracy_delta_pts": 0.0, "perplexity": ppl, "perplexity_delta_pct": 100 * (ppl / FP32_PPL[seed] - 1),
            "bytes_per_sample": bps, "ratio_vs_fp32_step": 52_000.0 / bps, "wall_s": 80.0}


def rows() -> list[dict[str, Any]]:
    return [row("none", 1, 0, 14.5, 52_000.0), row("topk+q4", 1, 0, 14.79, 400.0), row("none", 1, 1, 14.0, 52_000.0),
            row("topk+q4", 1, 1, 13.86, 420.0), {"row": "none H=8", "error": "boom"}]


def test_the_tables_give_perplexity_and_its_change_in_percent_per_seed_and_over_seeds() -> None:
    report = load_bench("compression_report")
    result = {"budget": {"model": "char-lm", "seeds": [0, 1]}, "codecs": rows()}
    s = {(x["codec"], x["H"]): x for x in report.summary(result["codecs"])}
    q4 = s[("topk+q4", 1)]
    assert q4["perplexity_by_seed"] == [14.79, 13.86]
    assert q4["perplexity_mean"] == pytest.approx(14.325)
    assert q4["ppl_delta_pct_max"] == pytest.approx(2.0) and q4["ppl_delta_pct_min"] == pytest.approx(-1.0)
    text = report.markdown(result)
    assert "### Gradient codecs (char-lm, 2 shards)" in text
    assert "| test perplexity | Δ % vs fp32 |" in text and "test accuracy" not in text and "Δ pts" not in text
    assert "| topk+q4 | 1 | 0 | 9,344 | 400.0 | 130.0 | 14.790 | +2.00 |" in text
    assert "| topk+q4 | 1 | 1 | 9,344 | 420.0 | 123.8 | 13.860 | -1.00 |" in text
    # worst seed first: the larger rise in perplexity
    assert "| topk+q4 | 1 | 0,1 | 410.0 | 123.8 | 14.325 | 14.790 / 13.860 | +2.00 … -1.00 |" in text
    assert "| none | 1 | 0,1 | 52000.0 | 1.0 | 14.250 | 14.500 / 14.000 | +0.00 … +0.00 |" in text
    assert "error: boom" in text


def test_digits_rows_keep_the_accuracy_tables() -> None:
    report = load_bench("compression_report")
    digits = [{k: v for k, v in r.items() if not k.startswith("perplexity")} for r in rows()]
    text = report.markdown({"codecs": digits})
    assert "### Gradient codecs (digits, 2 shards)" in text and "| test accuracy | Δ pts |" in text
    assert "perplexity" not in text


def test_the_plot_of_char_lm_rows_is_written(tmp_path: Path) -> None:
    report = load_bench("compression_report")
    merged = report.merge([{"budget": {"model": "char-lm", "seeds": [0]}, "codecs": rows()[:2]},
                           {"budget": {"model": "char-lm", "seeds": [1]}, "codecs": rows()[2:]}])
    assert merged["budget"]["seeds"] == [0, 1]
    out = report.plot(merged, tmp_path / "ppl.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_in_process_runs_are_rows_judged_against_fp32_sync_of_their_own_seed() -> None:
    report = load_bench("compression_report")

    def run(spec: dict, seed: int, ppl: float, bps: float, label: str | None = None) -> dict[str, Any]:
        out = {"model": "char-lm", "quick": True, "spec": spec, "epochs": 64, "seed": seed, "rounds": 224,
               "samples": 55_872, "bytes_up_per_sample": bps, "loss": 1.6, "accuracy": 0.6, "perplexity": ppl,
               "wall_s": 300.0}
        return out | ({"label": label} if label else {})

    merged = report.merge([run({}, 0, 5.0, 200_000.0), run({}, 1, 4.0, 200_000.0),
                           run({"local_steps": 8, "codec": "topk+q4"}, 0, 5.1, 400.0, label="q4-sgdm"),
                           run({"local_steps": 8, "codec": "topk+q4"}, 1, 3.9, 500.0, label="q4-sgdm"),
                           run({"codec": "topk"}, 2, 9.0, 100.0)])  # no fp32 row of seed 2: no change given
    by = {(r["codec"], r["H"], r["seed"]): r for r in merged["codecs"]}
    assert by[("q4-sgdm", 8, 0)]["perplexity_delta_pct"] == pytest.approx(2.0)
    assert by[("q4-sgdm", 8, 1)]["perplexity_delta_pct"] == pytest.approx(-2.5)
    assert by[("q4-sgdm", 8, 1)]["ratio_vs_fp32_step"] == pytest.approx(400.0)
    assert by[("none", 1, 0)]["perplexity_delta_pct"] == 0.0
    assert "perplexity_delta_pct" not in by[("topk", 1, 2)]
    assert merged["budget"]["seeds"] == [0, 1, 2]
    assert "| q4-sgdm | 8 | 0,1 | 450.0 | 400.0 |" in report.markdown(merged)
