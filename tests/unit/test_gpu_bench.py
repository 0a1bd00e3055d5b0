"""ops/bench/gpu, the prepared GPU check: its whole code path, tiny, on the CPU (--cpu-smoke)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def load_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "ops" / "bench" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_cpu_smoke_runs_the_shard_path_the_precision_check_and_the_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    assert load_bench().main(["--cpu-smoke", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["failures"] == []
    assert [t["version"] for t in report["shard"]["tasks"]] == [0, 0, 0, 1] and report["shard"]["version_after"] == 1
    assert report["shard"]["agreement_with_cpu_fp32"]["cosine"] > 0.99
    assert report["precision"]["micro_batches_vs_full"]["rel_l2"] < 1e-4
    assert {(r["precision"], r["device"]) for r in report["throughput"]} == {("bf16", "cpu"), ("fp32", "cpu")}
    assert all(r["samples_s"] > 0 for r in report["throughput"])


def test_without_a_gpu_the_real_run_fails_loudly(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        return
    assert load_bench().main(["--json", str(tmp_path / "x.json")]) == 1


def test_the_wrapper_uses_the_given_python_as_it_is_and_installs_nothing_it_has() -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run([str(REPO / "ops" / "bench" / "gpu"), "--help"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--cpu-smoke" in r.stdout and "installing" not in r.stderr
