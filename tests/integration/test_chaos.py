"""A short chaos run: a sync job survives a shard worker SIGKILL, an unreachable store and a hung worker.

The machinery is ops/chaos/chaos.py's (``ops/chaos/run`` is the long version): moto behind a TCP proxy
that can refuse connections, real ``celery worker`` processes, the test's Redis db. Shard compute is
stretched (AAS_SLOW_FACTOR) so the kill lands mid-task and the hang holds an unacknowledged message
past the visibility timeout: Redis redelivers it to the other worker, and the stopped one, continued,
finishes it a second time. Neither may lose or double an update: the weights equal a fault-free run's.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHAOS_DIR = Path(__file__).resolve().parents[2] / "ops" / "chaos"
SPEC = {"shards": 2, "epochs": 1, "batch_size": 128, "seed": 3, "publish_every_versions": 0}  # 6 rounds
VISIBILITY_TIMEOUT_S = 4


@pytest.fixture
def chaos() -> Any:
    sys.path.insert(0, str(CHAOS_DIR))
    try:
        import chaos as module

        yield module
    finally:
        sys.path.remove(str(CHAOS_DIR))


@pytest.fixture
def cluster(chaos: Any, redis_url: str, tmp_path: Path) -> Any:
    try:
        import moto.server  # noqa: F401
    except ImportError:
        pytest.skip("moto[server] is not installed")
    c = chaos.Cluster(tmp_path, redis_url=redis_url, visibility_timeout_s=VISIBILITY_TIMEOUT_S, slow_factor=40,
                      watchdog_stall_s=10)
    try:
        c.start().wait_ready()
        yield c
    finally:
        c.close()


def test_a_shard_kill_a_store_outage_and_a_hung_worker_lose_no_update_and_apply_none_twice(chaos: Any,
                                                                                          cluster: Any) -> None:
    client = cluster.client()
    reference = chaos.check_job(chaos.JobRun(cluster, client, SPEC, []).run(), client, 2, None)
    assert reference["status"] == "succeeded" and reference["version"] == 6

    faults = [
        chaos.Fault(1, 0.25, "shard_kill"),  # mid-task: its message comes back after the visibility timeout
        chaos.Fault(2, 0.25, "store_pause", duration_s=5.0),  # every S3 request refused, then restored
        chaos.Fault(4, 0.1, "hang", duration_s=VISIBILITY_TIMEOUT_S + 3.0),  # SIGSTOP past the timeout
    ]
    # The faulted job stores versions 1, 2, 4 and 5 only as recipes (checkpoint_every_versions 3): the workers and
    # the aggregator that take over after each fault rebuild them, and the result is still the reference's.
    run = chaos.JobRun(cluster, client, {**SPEC, "checkpoint_every_versions": 3}, faults, timeout_s=120,
                       stall_s=30).run()
    row = chaos.check_job(run, client, 2, reference)

    assert [f["kind"] for f in run["injected"] if "skipped" not in f] == ["shard_kill", "store_pause", "hang"]
    assert row["status"] == "succeeded", row["notes"]
    assert row["version"] == row["total_rounds"] == 6
    assert row["lost"] == 0 and row["duplicates"] == 0 and row["unrecorded"] == 0 and row["wrong_base"] == 0
    assert row["applied"] == 2 * 6
    assert row["max_abs_diff"] <= 1e-6
    from storage import keys

    listed = list(client.store.list(keys.checkpoint_prefix(run["job_id"])))
    assert (keys.checkpoint_versions(listed), keys.recipe_versions(listed)) == ([0, 3, 6], [1, 2, 4, 5])
    # The killed worker's task always comes back; whether the SIGSTOP lands while the hung worker holds a
    # task depends on timing (a loaded machine can stop it between tasks), so only one redelivery is certain.
    assert row["redelivered"] >= 1, "the killed worker's task should come back"
    assert cluster.proxy.stats.pauses == 1 and not cluster.proxy.paused
