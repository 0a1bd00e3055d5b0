"""Plot the training-loss curve of each pipeline row in training-bench JSON files (their rows' ``curve``).

    ops/bench/run curves --png docs/assets/async_curves.png A.json[:label] B.json[:label] ...
    ops/bench/run curves --png out.png docs/assets/training_async_converged.json   # a file of named runs

Each curve is one job's training loss per version, smoothed over `--window` versions: where an async run went
astray (a collapse shows as a plateau above the others) is seen at a glance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def runs_of(path: str, label: str | None) -> list[tuple[str, list[list[Any]]]]:
    """(label, curve) for every row with a curve: a training-bench JSON (``rows``) or a file of named runs."""
    data = json.loads(Path(path).read_text())
    named = data["runs"] if "runs" in data else {label or Path(path).stem: data["rows"]}
    out = []
    for name, rows in named.items():
        for r in rows:
            if r.get("curve"):
                out.append((f"{name} {r['row']} ({r.get('perplexity') or r.get('accuracy'):.4g})", r["curve"]))
    return out


def smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="JSON files, each optionally ':label'")
    ap.add_argument("--png", required=True)
    ap.add_argument("--window", type=int, default=28, help="versions averaged per point (default 28)")
    ap.add_argument("--title", default="training loss per version")
    ap.add_argument("--only", default="", help="comma-separated prefixes: only runs whose label starts with one")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    curves = []
    for item in args.files:
        path, _, label = item.partition(":")
        curves += runs_of(path, label or None)
    if args.only:
        curves = [c for c in curves if c[0].startswith(tuple(args.only.split(",")))]
    if not curves:
        raise SystemExit("no row with a 'curve' in these files (ops/bench/run training writes it)")
    fig = Figure(figsize=(9, 5))
    ax = fig.add_subplot()
    for label, curve in curves:
        points = [(int(v), float(loss)) for v, loss, *_ in curve if v is not None and loss is not None]
        ax.plot([v for v, _ in points], smooth([loss for _, loss in points], args.window), label=label, lw=1.2)
    ax.set_xlabel("version")
    ax.set_ylabel(f"training loss (mean of {args.window} versions)")
    ax.set_title(args.title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"{len(curves)} curves → {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
