"""Golden numerics: a few versions of sync SGD, DiLoCo and top-k through the real shard and aggregator
code, compared with committed numbers (tests/assets/golden_training.json) within a tolerance.

A change to the math, the sharding, the batch order, a codec or the checkpoint format shows up here as
a numeric difference, not as a vague accuracy drop. Regenerate deliberately with
``AAS_REGEN_GOLDEN=1 ops/test tests/unit/test_golden.py`` and say why in the commit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.checkpoint import decode_checkpoint
from pipeline.client import Client
from storage import keys
from workers import aggregator, publish, shard

ASSET = Path(__file__).resolve().parents[1] / "assets" / "golden_training.json"
RTOL = 1e-4  # fp32 sums in a different order on another CPU stay well inside this
CASES = {
    "sgd-momentum": {"shards": 2, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
    "diloco-h4": {"shards": 2, "batch_size": 32, "local_steps": 4, "inner_lr": 0.05},
    "topk-1pct": {"shards": 3, "batch_size": 32, "lr": 0.05, "momentum": 0.9, "codec": "topk",
                  "codec_density": 0.01},
}
VERSIONS = 3


def run(unit_ctx, spec: dict) -> dict[str, list[float]]:
    client = Client(unit_ctx.settings, store=unit_ctx.store, redis_client=unit_ctx.redis, dispatch=unit_ctx.dispatch)
    job_id = client.stage({"epochs": 2, "seed": 5, **spec})
    start = decode_checkpoint(unit_ctx.store.get(keys.checkpoint(job_id, 0)), "v0").state
    losses, moved = [], []
    for v in range(VERSIONS):
        step = v * spec.get("local_steps", 1)
        results = [shard.train_shard(unit_ctx, job_id, s, v, step, 0) for s in range(spec["shards"])]
        done = aggregator.aggregate_round(unit_ctx, job_id, v, results)
        assert done.committed
        losses.append(float(publish.evaluate_and_publish(unit_ctx, job_id, v + 1)["metrics"]["loss"]))
        state = decode_checkpoint(unit_ctx.store.get(keys.checkpoint(job_id, v + 1)), "ckpt").state
        moved.append(float(sum((t.double() - start[n].double()).abs().sum() for n, t in state.items())))
    return {"test_loss": losses, "moved_l1": moved}  # moved_l1: |w_v − w_0|₁, sensitive to every update


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_numbers_match_the_committed_golden_values(unit_ctx, case: str) -> None:
    got = run(unit_ctx, CASES[case])
    if os.environ.get("AAS_REGEN_GOLDEN"):
        data = json.loads(ASSET.read_text()) if ASSET.exists() else {}
        data[case] = got
        ASSET.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    want = json.loads(ASSET.read_text())[case]
    for series in ("test_loss", "moved_l1"):
        assert got[series] == pytest.approx(want[series], rel=RTOL), series
