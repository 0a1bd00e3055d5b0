"""A sync job on a multi-host fleet (ops/fleet): two shard workers on their own network hosts behind
20 Mbit/s links, the aggregator, Redis and S3 on theirs, ends with the weights one process computes.

Needs root and iproute2 (network namespaces, veth pairs, tc tbf): skipped with the reason where either
is missing; under CI=true, a root machine whose namespaces do not work fails the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
pytestmark = [pytest.mark.integration, pytest.mark.slow]

SPEC = {"model": "digits-cnn", "dataset": "digits", "shards": 2, "batch_size": 128, "epochs": 1, "lr": 0.05,
        "momentum": 0.9, "seed": 3, "publish_every_versions": 0, "promote": None}


def fleet_or_skip() -> None:
    if os.geteuid() != 0:
        pytest.skip("not root: a fleet needs network namespaces and tc (CAP_NET_ADMIN)")
    from ops.fleet import netns

    why = netns.available()
    if why is None:
        return
    if IN_CI:
        pytest.fail(f"root, but the fleet's network cannot be made: {why}")
    pytest.skip(f"no fleet here: {why}")


def single_process_weights() -> dict[str, torch.Tensor]:
    """SGD with momentum on the mean loss over the union of every shard's step-k batch, step by step."""
    from pipeline.checkpoint import initial_checkpoint
    from pipeline.data import batch_rows, batches_per_epoch, load_dataset, shard_indices
    from pipeline.training import loss_fn

    ds = load_dataset(SPEC["dataset"])
    parts = shard_indices(ds.n_train, SPEC["shards"], SPEC["seed"])
    sizes = [int(p.numel()) for p in parts]
    bpe = batches_per_epoch(sizes, SPEC["batch_size"])
    model = initial_checkpoint(SPEC["model"], {}, SPEC["seed"]).build()
    opt = torch.optim.SGD(model.parameters(), lr=SPEC["lr"], momentum=SPEC["momentum"])
    model.train()
    for step in range(bpe * SPEC["epochs"]):
        idx = torch.cat([p[batch_rows(n, SPEC["batch_size"], step, bpe, SPEC["seed"], s)]
                         for s, (p, n) in enumerate(zip(parts, sizes, strict=True))])
        loss = loss_fn(model(ds.x_train[idx]), ds.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_sync_job_on_a_two_host_fleet_over_20_mbit_links_ends_with_the_single_process_weights(tmp_path) -> None:
    fleet_or_skip()
    from safetensors.torch import load_file

    from ops.fleet import netns

    out, weights = tmp_path / "report.json", tmp_path / "final.safetensors"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen(
        [sys.executable, "-m", "ops.fleet.fleet", "job", "--workers", "2", "--bandwidth", "20mbit",
         "--spec", json.dumps(SPEC), "--timeout-s", "120", "--out", str(out), "--weights", str(weights),
         "--workdir", str(tmp_path / "fleet")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            p.terminate()  # SIGTERM: the fleet tears itself down
            p.communicate(timeout=60)
    assert p.returncode == 0, f"fleet job failed ({p.returncode}):\n{stdout[-2000:]}\n{stderr[-4000:]}"
    ours = f"{netns.PREFIX}{p.pid}-"
    assert not [ns for ns in netns.list_namespaces() if ns.startswith(ours)], "namespaces left behind"

    report = json.loads(out.read_text())
    assert report["status"] == "succeeded"
    assert report["version"] == report["total_rounds"]
    for v, idents in report["consumed"].items():
        assert len(idents) == SPEC["shards"], f"version {v} consumed {idents}"
    got = load_file(str(weights))
    want = single_process_weights()
    assert got.keys() == want.keys()
    for name, w in want.items():
        assert (got[name] - w).abs().max().item() <= 1e-5, name
