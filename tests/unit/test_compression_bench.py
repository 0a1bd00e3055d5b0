"""ops/bench/compression: its row syntax, the blob anatomy, the summary over seeds and the plot (no training)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import load_bench


def row(codec: str, h: int, seed: int, acc: float, delta: float, bps: float) -> dict[str, Any]:
    return {"row": f"{codec} H={h}", "codec": codec, "H": h, "seed": seed, "samples": 100, "accuracy": acc,
            "accuracy_delta_pts": delta, "bytes_per_sample": bps, "ratio_vs_fp32_step": 4941.0 / bps, "wall_s": 1.0}


def test_a_row_names_a_codec_or_variant_and_optionally_its_local_steps() -> None:
    bench = load_bench("compression")
    assert bench.parse_row("topk+q4", (1, 8)) == ("topk+q4", (1, 8))
    assert bench.parse_row("topk+q4-dgc-3%@8", (1,)) == ("topk+q4-dgc-3%", (8,))
    with pytest.raises(ValueError, match="unknown codec row 'zz'"):
        bench.parse_row("zz@1", (1,))
    with pytest.raises(ValueError, match="integer ≥ 1"):
        bench.parse_row("none@0", (1,))


@pytest.mark.parametrize("model", ["digits-cnn", "char-lm"])
def test_every_variant_is_a_valid_job_on_the_budget_at_one_and_at_eight_local_steps(model: str) -> None:
    from pipeline.spec import parse_spec

    bench = load_bench("compression")
    spec = bench.budget_for(model, quick=True).spec(mode="sync")
    for name, fields in bench.VARIANTS.items():
        for h in (1, 8):
            parsed = parse_spec({**spec, **fields, "local_steps": h})
            assert parsed.codec == fields["codec"] and parsed.local_steps == h, name


def test_the_blob_anatomy_shows_the_packed_codec_header_is_a_few_dozen_bytes() -> None:
    bench = load_bench("compression")
    by_row = {a["row"]: a for a in bench.blob_anatomy(["topk", "topk+q4"])}
    assert by_row["topk"]["codec_meta_bytes"] > 400  # a JSON entry per tensor
    assert by_row["topk+q4"]["codec_meta_bytes"] < 60
    assert by_row["topk+q4"]["blob_bytes"] < by_row["topk"]["blob_bytes"] / 2
    for a in by_row.values():
        assert a["header_bytes"] + a["payload_bytes"] == a["blob_bytes"]


def test_the_summary_gives_each_row_its_spread_between_seeds_and_worst_change() -> None:
    report = load_bench("compression_report")
    rows = [row("none", 1, 0, 0.9777, 0.0, 4941.0), row("none", 1, 1, 0.9833, 0.0, 4941.0),
            row("topk+q4", 1, 0, 0.9749, -0.28, 38.0), row("topk+q4", 1, 1, 0.9861, 0.28, 40.0),
            {"row": "int8 H=1", "error": "boom"}]
    s = {(x["codec"], x["H"]): x for x in report.summary(rows)}
    assert set(s) == {("none", 1), ("topk+q4", 1)}
    q4 = s[("topk+q4", 1)]
    assert q4["accuracy_spread_pts"] == pytest.approx(1.12)
    assert (q4["delta_min"], q4["delta_max"]) == (-0.28, 0.28)
    assert q4["ratio_min"] == pytest.approx(4941.0 / 40.0) and q4["bytes_per_sample"] == pytest.approx(39.0)
    text = report.markdown({"codecs": rows})
    assert "| topk+q4 | 1 | 0,1 | 39.0 | 123.5 | 0.9805 | 1.12 | -0.28 … +0.28 |" in text
    assert "error: boom" in text


def test_rows_run_without_an_fp32_row_show_no_comparison_rather_than_a_zero_one() -> None:
    report = load_bench("compression_report")
    rows = [{"row": "topk+q4 H=1", "codec": "topk+q4", "H": 1, "seed": s, "samples": 100, "accuracy": 0.5,
             "perplexity": p, "bytes_per_sample": 600.0, "wall_s": 1.0} for s, p in ((0, 6.065), (1, 5.927))]
    (s,) = report.summary(rows)
    assert s["ratio_min"] is None and s["ppl_delta_pct_max"] is None and s["delta_min"] is None
    text = report.markdown({"codecs": rows})
    assert "| topk+q4 | 1 | 0 | 100 | 600.0 | – | 6.065 | – |" in text
    assert "| topk+q4 | 1 | 0,1 | 600.0 | – | 5.996 | 6.065 / 5.927 | – |" in text
    assert "+0.00" not in text


def test_the_plot_is_a_png_of_every_row(tmp_path: Path) -> None:
    report = load_bench("compression_report")
    rows = [row("none", 1, 0, 0.9777, 0.0, 4941.0), row("topk+q4", 1, 0, 0.9749, -0.28, 38.0),
            row("topk+q4-dgc-3%", 8, 0, 0.98, 0.2, 9.0)]
    rows.append({**row("topk+q4-store", 8, 0, 0.98, 0.2, 9.0), "state_bytes_per_sample": 1300.0})
    assert report.moved(rows[-1]) == 1309.0  # codec state written to the store counts as bytes moved
    out = report.plot({"codecs": rows}, tmp_path / "sub" / "acc.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_runs_of_one_seed_each_merge_into_one_result() -> None:
    report = load_bench("compression_report")
    a = {"budget": {"epochs": 24, "seeds": [0]}, "anatomy": [{"row": "none"}],
         "codecs": [row("none", 1, 0, 0.97, 0, 4941.0)]}
    b = {"budget": {"epochs": 24, "seeds": [1]}, "anatomy": [], "codecs": [row("none", 1, 1, 0.98, 0, 4941.0)]}
    again = {"codecs": [row("none", 1, 0, 0.97, 0, 4941.0), row("topk+q4", 1, 0, 0.97, 0, 38.0)]}
    merged = report.merge([a, b, again])
    assert [(r["codec"], r["seed"]) for r in merged["codecs"]] == [("none", 0), ("none", 1), ("topk+q4", 0)]
    assert merged["budget"] == {"epochs": 24, "seeds": [0, 1]} and merged["anatomy"] == [{"row": "none"}]
