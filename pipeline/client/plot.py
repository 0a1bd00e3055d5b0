"""``aas plot JOB -o curve.png``: a job's learning curve as a PNG (matplotlib, Agg backend, no display).

Panels: test loss (and mean training loss) per version; test accuracy per version; and, when the
job's metrics record them, cumulative bytes moved. A metrics entry may carry ``bytes_up``/``bytes_down``
(the job's cumulative counters when the version was committed) or ``bytes`` (bytes moved by that
version alone, summed here).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from storage.jobstate import JobStore

DPI = 100


class PlotError(ValueError):
    """Nothing to plot, or a bad output size. The message names the job or the option."""


def _series(metrics: Sequence[dict[str, Any]], name: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for m in metrics:
        v = m.get(name)
        if isinstance(v, (int, float)) and "version" in m:
            xs.append(int(m["version"]))
            ys.append(float(v))
    return xs, ys


def bytes_series(metrics: Sequence[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """Cumulative bytes moved per version, from whichever byte fields the entries carry; empty if none."""
    xs, ys = [], []
    running = 0.0
    for m in metrics:
        if "version" not in m:
            continue
        if isinstance(m.get("bytes_up"), (int, float)) or isinstance(m.get("bytes_down"), (int, float)):
            total = float(m.get("bytes_up") or 0) + float(m.get("bytes_down") or 0)
        elif isinstance(m.get("bytes"), (int, float)):
            running += float(m["bytes"])
            total = running
        else:
            continue
        xs.append(int(m["version"]))
        ys.append(total)
    return xs, ys


def plot_metrics(metrics: Sequence[dict[str, Any]], out: str | Path, *, title: str = "",
                 width_px: int = 1000, height_px: int = 700) -> Path:
    """Write the learning curve of `metrics` (JobStore.metrics entries) to a PNG of exactly that size."""
    if width_px < 200 or height_px < 150:
        raise PlotError(f"image size {width_px}x{height_px} px is too small (at least 200x150)")
    if not metrics:
        raise PlotError(f"{title or 'job'}: no versions recorded yet, nothing to plot")
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    loss_x, loss_y = _series(metrics, "loss")
    tl_x, tl_y = _series(metrics, "train_loss")
    acc_x, acc_y = _series(metrics, "accuracy")
    b_x, b_y = bytes_series(metrics)
    panels = 3 if b_x else 2

    # Figure (not pyplot): no global state, nothing left open; fixed size and dpi, so the PNG is exactly
    # width_px × height_px (no bbox_inches="tight", which would crop it).
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout="constrained")
    axes = fig.subplots(panels, 1, sharex=True)
    ax_loss, ax_acc = axes[0], axes[1]
    if loss_x:
        ax_loss.plot(loss_x, loss_y, marker="o", markersize=3, label="test loss")
    if tl_x:
        ax_loss.plot(tl_x, tl_y, marker=".", markersize=3, alpha=0.7, label="train loss")
    ax_loss.set_ylabel("loss")
    if loss_x or tl_x:
        ax_loss.legend(loc="upper right")
    ax_loss.grid(alpha=0.3)
    if acc_x:
        ax_acc.plot(acc_x, acc_y, marker="o", markersize=3, color="tab:green")
    ax_acc.set_ylabel("test accuracy")
    ax_acc.grid(alpha=0.3)
    if b_x:
        axes[2].plot(b_x, [b / 1e6 for b in b_y], marker=".", color="tab:purple")
        axes[2].set_ylabel("MB moved (cumulative)")
        axes[2].grid(alpha=0.3)
    axes[-1].set_xlabel("version")
    if title:
        fig.suptitle(title)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path


def plot_job(r: redis.Redis, job_id: str, out: str | Path, *, width_px: int = 1000, height_px: int = 700) -> Path:
    """Plot job `job_id`'s recorded versions (JobNotFound if there is no such job)."""
    jobs = JobStore(r)
    state = jobs.get(job_id)
    model = state.spec.get("model", "?")
    title = f"job {job_id} · {model} · {state.status} v{state.version}/{state.total_rounds}"
    return plot_metrics(jobs.metrics(job_id), out, title=title, width_px=width_px, height_px=height_px)
