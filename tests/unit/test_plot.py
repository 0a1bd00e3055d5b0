"""`aas plot` and `aas top --once` on fakeredis: the PNG and the text frame."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest

from pipeline.client.plot import PlotError, bytes_series, plot_job
from storage.jobstate import JobStore

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert data.rstrip(b"\x00").endswith(b"IEND\xaeB`\x82"), "PNG is truncated"
    return width, height


def _job_with_versions(r: Any, n: int, *, with_bytes: bool = False) -> str:
    jobs = JobStore(r)
    jobs.create("j1", {"model": "digits-cnn", "mode": "sync"}, total_rounds=n, fields={})
    for v in range(1, n + 1):
        extra = {"bytes_up": 1000 * v, "bytes_down": 3000 * v} if with_bytes else {}
        jobs.commit_version("j1", base_version=v - 1, new_version=v, checkpoint_key=f"ck{v}", identities=[],
                            metrics={"loss": 2.0 / v, "accuracy": 1 - 0.5 / v, "train_loss": 2.2 / v, **extra})
    return "j1"


def test_plot_writes_a_valid_png_of_the_requested_size(fake_redis: Any, tmp_path: Path) -> None:
    job = _job_with_versions(fake_redis, 6)
    out = plot_job(fake_redis, job, tmp_path / "plots" / "curve.png", width_px=800, height_px=500)
    assert out.exists()
    assert _png_size(out) == (800, 500)


def test_plot_adds_a_bytes_panel_when_bytes_are_recorded(fake_redis: Any, tmp_path: Path) -> None:
    job = _job_with_versions(fake_redis, 4, with_bytes=True)
    out = plot_job(fake_redis, job, tmp_path / "curve.png")
    assert _png_size(out) == (1000, 700)
    assert bytes_series(JobStore(fake_redis).metrics(job)) == ([1, 2, 3, 4], [4000.0, 8000.0, 12000.0, 16000.0])
    assert bytes_series([{"version": 1, "bytes": 5}, {"version": 2, "bytes": 7}]) == ([1, 2], [5.0, 12.0])


def test_plot_of_a_job_without_versions_says_so(fake_redis: Any, tmp_path: Path) -> None:
    JobStore(fake_redis).create("empty", {"model": "digits-cnn"}, total_rounds=3, fields={})
    with pytest.raises(PlotError, match="no versions recorded yet"):
        plot_job(fake_redis, "empty", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_the_plot_command_exits_2_with_one_line_for_an_unknown_job(fake_redis: Any, tmp_path: Path,
                                                                  capsys: Any) -> None:
    from pipeline.client.cli import build_parser
    from pipeline.client.cli_ops import run_plot

    args = build_parser().parse_args(["plot", "nope", "-o", str(tmp_path / "c.png")])
    assert run_plot(args, redis_client=fake_redis) == 2
    assert "no job 'nope'" in capsys.readouterr().err
    _job_with_versions(fake_redis, 3)
    args = build_parser().parse_args(["plot", "j1", "-o", str(tmp_path / "c.png"), "--width", "640",
                                      "--height", "480"])
    assert run_plot(args, redis_client=fake_redis) == 0
    assert _png_size(tmp_path / "c.png") == (640, 480)


class FakeInspect:
    def ping(self) -> dict[str, Any]:
        return {"w1@host": {"ok": "pong"}, "agg@host": {"ok": "pong"}}

    def active(self) -> dict[str, Any]:
        return {"w1@host": [{"name": "aas.train_shard", "args": ["j1", 0, 3, 3, 0], "time_start": None}]}


class FakeApp:
    class control:  # noqa: N801 - mimics celery's app.control
        @staticmethod
        def inspect(timeout: float) -> FakeInspect:
            return FakeInspect()


def test_top_once_shows_jobs_workers_and_queue_depths(fake_redis: Any) -> None:
    from pipeline.client.top import collect, render
    from workers.metrics import PRIORITY_SEP

    _job_with_versions(fake_redis, 3)
    fake_redis.rpush("shards", b"m1", b"m2")
    fake_redis.rpush(f"shards{PRIORITY_SEP}6", b"m3")
    fake_redis.rpush("aggregate", b"m4")
    snap = collect(fake_redis, FakeApp())
    assert snap.queues == {"shards": 3, "aggregate": 1, "publish": 0, "predict": 0, "beat": 0}
    frame = render(snap)
    assert "shards 3" in frame and "aggregate 1" in frame
    assert "w1@host" in frame and "aas.train_shard(j1, 0, 3, 3, 0)" in frame and "agg@host" in frame
    assert "j1" in frame and "3/3" in frame and "0.8333" in frame
