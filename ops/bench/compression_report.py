"""Tables and the plot of ``ops/bench/run compression``: per-seed rows, a summary with the spread between seeds,
and accuracy against bytes moved for every codec row (one PNG). Rows that carry a perplexity (char-lm) are judged
by it instead: perplexity and its change in percent against fp32 sync in the tables, perplexity on the plot's y axis.

    ops/bench/run compression_report --json FILE [FILE ...] [--plot PNG] [--out FILE]   # re-render saved runs

A FILE may also be one ``ops/bench/run inprocess --json`` run (a row named by its ``--label``).

Several files (one per seed, say) are merged: their codec rows in order, the first file's budget and anatomy.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any


def is_lm(rows: list[dict[str, Any]]) -> bool:
    """Whether the rows are a language model's: they carry a perplexity, the metric to judge them by."""
    return any(r.get("perplexity") is not None for r in rows if "error" not in r)


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (row label, H) over its seeds: mean/min/max of accuracy, its change vs fp32, and bytes; for rows
    with a perplexity also its mean, per-seed values and the range of its change in percent vs fp32."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if "error" not in r:
            groups[(r["codec"], r["H"])].append(r)
    out = []
    for (codec, h), rs in groups.items():
        acc = [r["accuracy"] for r in rs]
        delta = [r.get("accuracy_delta_pts") for r in rs]
        ratio = [r.get("ratio_vs_fp32_step") for r in rs]
        out.append({"codec": codec, "H": h, "seeds": sorted(r.get("seed", 0) for r in rs),
                    "bytes_per_sample": sum(r["bytes_per_sample"] for r in rs) / len(rs),
                    "ratio_min": _over_seeds(ratio, min), "accuracy_mean": sum(acc) / len(acc),
                    "accuracy_spread_pts": 100 * (max(acc) - min(acc)), "delta_min": _over_seeds(delta, min),
                    "delta_max": _over_seeds(delta, max), "samples_vs_fp32": [r.get("samples_vs_fp32") for r in rs]})
        if all(r.get("perplexity") is not None for r in rs):
            ppl = [r["perplexity"] for r in rs]
            pct = [r.get("perplexity_delta_pct") for r in rs]
            out[-1] |= {"perplexity_mean": sum(ppl) / len(ppl), "perplexity_by_seed": ppl,
                        "ppl_delta_pct_min": _over_seeds(pct, min), "ppl_delta_pct_max": _over_seeds(pct, max)}
    return out


def _over_seeds(values: list[Any], pick: Callable[[list[float]], float]) -> float | None:
    """``pick`` (min or max) of a row's comparisons over its seeds; None when a seed had no fp32 run to compare with."""
    return None if None in values else pick(values)


def _num(value: float | None, spec: str) -> str:
    """A comparison with fp32 sync, or "–" for a run that had no fp32 row to compare with."""
    return "–" if value is None else format(value, spec)


def _range(worst: float | None, best: float | None) -> str:
    return "–" if worst is None or best is None else f"{worst:+.2f} … {best:+.2f}"


def codec_table(result: dict[str, Any]) -> list[str]:
    """Every row and seed; a language model's rows show test perplexity and its change in percent vs fp32 sync,
    a classifier's test accuracy and its change in points."""
    if is_lm(result["codecs"]):
        metric, delta, show = "test perplexity", "Δ % vs fp32", lambda r: (r["perplexity"], "perplexity_delta_pct", 3)
    else:
        metric, delta, show = "test accuracy", "Δ pts", lambda r: (r["accuracy"], "accuracy_delta_pts", 4)
    out = [f"| codec | H | seed | samples | bytes up / sample | × fewer than fp32 per step | {metric} | {delta} "
           "| state bytes / sample (store) | shard tasks off their state (moved / with state) | wall s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["codecs"]:
        if "error" in r:
            out.append(f"| {r['row']} | | | | error: {r['error']} | | | | | | |")
            continue
        moved = (f"{r['state_moved']} / {r['state_moved'] + r['state_local']}" if r.get("state_local") is not None
                 else "")
        value, delta_key, digits = show(r)
        out.append(f"| {r['codec']} | {r['H']} | {r.get('seed', 0)} | {r['samples']:,} | {r['bytes_per_sample']:.1f} "
                   f"| {_num(r.get('ratio_vs_fp32_step'), '.1f')} | {value:.{digits}f} "
                   f"| {_num(r.get(delta_key), '+.2f')} | {r.get('state_bytes_per_sample', 0):.1f} "
                   f"| {moved} | {r['wall_s']:.1f} |")
    return out


def summary_table(result: dict[str, Any]) -> list[str]:
    if is_lm(result["codecs"]):
        return lm_summary_table(result)
    out = ["| codec | H | seeds | bytes up / sample | × fewer (worst seed) | accuracy (mean) | spread between seeds "
           "(pts) | Δ pts vs fp32 (worst … best) |", "|---|---:|---|---:|---:|---:|---:|---|"]
    for s in summary(result["codecs"]):
        out.append(f"| {s['codec']} | {s['H']} | {','.join(map(str, s['seeds']))} | {s['bytes_per_sample']:.1f} "
                   f"| {_num(s['ratio_min'], '.1f')} | {s['accuracy_mean']:.4f} | {s['accuracy_spread_pts']:.2f} "
                   f"| {_range(s['delta_min'], s['delta_max'])} |")
    return out


def lm_summary_table(result: dict[str, Any]) -> list[str]:
    """``summary_table`` for a language model; the worst change is the largest rise in perplexity."""
    out = ["| codec | H | seeds | bytes up / sample | × fewer (worst seed) | perplexity (mean) | perplexity by seed "
           "| Δ % vs fp32 (worst … best) |", "|---|---:|---|---:|---:|---:|---|---|"]
    for s in summary(result["codecs"]):
        by_seed = " / ".join(f"{p:.3f}" for p in s["perplexity_by_seed"])
        out.append(f"| {s['codec']} | {s['H']} | {','.join(map(str, s['seeds']))} | {s['bytes_per_sample']:.1f} "
                   f"| {_num(s['ratio_min'], '.1f')} | {s['perplexity_mean']:.3f} | {by_seed} "
                   f"| {_range(s['ppl_delta_pct_max'], s['ppl_delta_pct_min'])} |")
    return out


def anatomy_table(result: dict[str, Any]) -> list[str]:
    out = ["| row | blob bytes | envelope prelude + JSON header | of which the codec's meta | payload (zstd'd) |",
           "|---|---:|---:|---:|---:|"]
    for a in result.get("anatomy", []):
        out.append(f"| {a['row']} | {a['blob_bytes']:,} | {a['header_bytes']:,} | {a['codec_meta_bytes']:,} "
                   f"| {a['payload_bytes']:,} |")
    return out


def markdown(result: dict[str, Any]) -> str:
    lm = is_lm(result["codecs"])
    model = result.get("budget", {}).get("model", "char-lm") if lm else "digits-cnn"
    out = [f"### Gradient codecs ({model if lm else 'digits'}, 2 shards)", "", *codec_table(result), "",
           "### Summary over seeds", "", *summary_table(result)]
    if result.get("anatomy"):
        out += ["", f"### What one gradient blob is made of ({model}, 1 step, density as in the row)", "",
                *anatomy_table(result)]
    if result.get("artifacts"):
        out += ["", "### Serving artifacts (from the fp32 run's final checkpoint)", "",
                "| chain | seed | stored bytes | × smaller than fp32 safetensors | test accuracy | drop pts |",
                "|---|---:|---:|---:|---:|---:|"]
        for r in result["artifacts"]:
            out.append(f"| {r['chain']} | {r.get('seed', 0)} | {r['stored_bytes']:,} | {r['ratio']:.1f} "
                       f"| {r['accuracy']:.4f} | {r['accuracy_drop_pts']:+.2f} |")
    d = result.get("distill")
    if d and "error" not in d:
        out += ["", "### Distillation", "",
                "| teacher params | student params | × fewer | teacher acc | student acc | drop pts |",
                "|---:|---:|---:|---:|---:|---:|",
                f"| {d['teacher_params']:,} | {d['student_params']:,} | {d['param_ratio']:.1f} | "
                f"{d['teacher_accuracy']:.4f} | {d['student_accuracy']:.4f} | {d['accuracy_drop_pts']:+.2f} |"]
    elif d:
        out += ["", f"Distillation: error: {d['error']}"]
    return "\n".join(out)


def moved(row: dict[str, Any]) -> float:
    """Bytes per sample a row uploads: its gradient blobs and, with ``codec_state="store"``, its codec state."""
    return float(row["bytes_per_sample"]) + float(row.get("state_bytes_per_sample", 0.0))


def plot(result: dict[str, Any], out: str | Path, *, title: str = "") -> Path:
    """Test accuracy against bytes uploaded per training sample (log scale; gradients plus any codec state written
    to the store), one marker per row and seed, a line joining each row's seeds (its spread), and fp32 sync's
    accuracy band (its seeds, down to 1 point below the lowest) shaded. Rows with a perplexity plot it instead,
    with fp32 sync's band running up to 2% above its highest seed."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 5.5), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    rows = [r for r in result["codecs"] if "error" not in r]
    lm = is_lm(rows)
    metric = "perplexity" if lm else "accuracy"
    base = [r[metric] for r in rows if r["codec"] == "none" and r["H"] == 1]
    if base and lm:
        ax.axhspan(min(base), 1.02 * max(base), color="0.9", label="fp32 sync (seeds) + 2%")
    elif base:
        ax.axhspan(min(base) - 0.01, max(base), color="0.9", label="fp32 sync (seeds) − 1 point")
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["codec"], r["H"])].append(r)
    markers = "os^vD<>pPX*h"
    for i, ((codec, h), rs) in enumerate(sorted(groups.items(), key=lambda kv: -moved(kv[1][0]))):
        xs, ys = [moved(r) for r in rs], [r[metric] for r in rs]
        line = ax.plot(xs, ys, linestyle="-", marker=markers[i % len(markers)], markersize=6,
                       label=f"{codec} H={h}")[0]
        ax.annotate(f"{codec} H={h}", (xs[0], ys[0]), fontsize=7, xytext=(4, -10), textcoords="offset points",
                    color=line.get_color())
    ax.set_xscale("log")
    if rows:  # room for the labels right of the largest row
        xs_all = [moved(r) for r in rows]
        ax.set_xlim(min(xs_all) / 1.5, max(xs_all) * 2.5)
    ax.set_xlabel("bytes uploaded per training sample: gradient blobs (envelope included) + codec state in the store")
    ax.set_ylabel("test perplexity (lower is better)" if lm else "test accuracy")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: no point hidden
    model = result.get("budget", {}).get("model", "char-lm")
    default = (f"{model}: perplexity against bytes moved, every codec row and seed" if lm
               else "digits-cnn: accuracy against bytes moved, every codec row and seed")
    ax.set_title(title or default, fontsize=10)
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def from_inprocess(run: dict[str, Any]) -> dict[str, Any]:
    """A run of ``ops/bench/run inprocess`` (one row: a spec at one seed) as a result of this report: its row named
    by its ``--label`` (else its codec), H its local steps."""
    spec = run.get("spec", {})
    row = {"codec": run.get("label") or spec.get("codec", "none"), "H": int(spec.get("local_steps", 1)),
           "seed": run["seed"], "samples": run["samples"], "bytes_per_sample": run["bytes_up_per_sample"],
           "accuracy": run["accuracy"], "perplexity": run.get("perplexity"), "wall_s": run["wall_s"], "spec": spec}
    return {"budget": {"model": run["model"], "epochs": run["epochs"]}, "codecs": [row]}


def against_fp32(rows: list[dict[str, Any]]) -> None:
    """Fill each row's change against fp32 sync (codec none, H=1) of its own seed where its run did not (in-process
    runs are one row each): Δ perplexity %, Δ accuracy points, × fewer bytes per sample."""
    base = {r.get("seed", 0): r for r in rows if r.get("codec") == "none" and r.get("H") == 1 and "error" not in r}
    for r in rows:
        b = base.get(r.get("seed", 0))
        if b is None or "error" in r or r.get("accuracy_delta_pts") is not None:
            continue
        r["accuracy_delta_pts"] = 100 * (r["accuracy"] - b["accuracy"])
        r["ratio_vs_fp32_step"] = b["bytes_per_sample"] / r["bytes_per_sample"]
        if r.get("perplexity") is not None and b.get("perplexity"):
            r["perplexity_delta_pct"] = 100 * (r["perplexity"] / b["perplexity"] - 1)


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several runs: every run's codec rows (a row repeated for the same seed once: the first),
    artifact rows, and the first run's other fields. In-process runs count as one row each (``from_inprocess``)."""
    results = [from_inprocess(r) if "codecs" not in r and "bytes_up_per_sample" in r else r for r in results]
    out = {**results[0], "codecs": [], "artifacts": []}
    seen: set[tuple[Any, Any, Any]] = set()
    for r in results:
        for row in r.get("codecs", []):
            key = (row.get("codec", row.get("row")), row.get("H"), row.get("seed"))
            if key not in seen:  # a run repeating a row (its fp32 base, say) keeps the first one
                seen.add(key)
                out["codecs"].append(row)
        out["artifacts"] += r.get("artifacts", [])
    seeds = sorted({row.get("seed", 0) for row in out["codecs"] if "error" not in row})
    if "budget" in out:
        out["budget"] = {**out["budget"], "seeds": seeds}
    against_fp32(out["codecs"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, nargs="+", metavar="FILE",
                   help="results written by `compression --json` or `inprocess --json`")
    p.add_argument("--plot", metavar="PNG")
    p.add_argument("--out", metavar="FILE", help="write the merged result here")
    args = p.parse_args(argv)
    result = merge([json.loads(Path(f).read_text()) for f in args.json])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(markdown(result))
    if args.plot:
        print(f"plot: {plot(result, args.plot)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
