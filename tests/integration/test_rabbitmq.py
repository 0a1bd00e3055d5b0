"""RabbitMQ as the broker (Redis stays the state store): quorum queues, a job end to end on real workers, a
SIGKILLed computing worker whose message the broker hands to the survivor at once, and queue depths."""

from __future__ import annotations

import signal
import time

import pytest

from storage import keys

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SPEC = {"shards": 2, "epochs": 1, "batch_size": 128, "seed": 7, "publish_every_versions": 0}  # 6 rounds


@pytest.fixture
def on_rabbitmq(rabbitmq_url: str, services_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    from pipeline.settings import get_settings

    monkeypatch.setenv("AAS_BROKER_URL", rabbitmq_url)
    get_settings.cache_clear()
    return {"AAS_BROKER_URL": rabbitmq_url}


def test_a_job_on_rabbitmq_quorum_queues_survives_a_sigkilled_computing_worker(on_rabbitmq, workers) -> None:
    from kombu import Connection

    from pipeline.client import Client
    from storage.leases import LeaseBook
    from workers.liveness import RabbitProbe

    slow = {**on_rabbitmq, "AAS_SLOW_FACTOR": "60"}
    start = workers
    start("aggregator", "aggregate", extra_env=on_rabbitmq)
    start("survivor", extra_env=slow)
    start("victim", extra_env=slow)
    client = Client()
    assert client.settings.broker_kind() == "rabbitmq"
    job_id = client.submit(SPEC)
    book = LeaseBook(client.redis, client.settings.lease_ttl_s)
    deadline = time.monotonic() + 120
    while not any(lease.worker.startswith("victim@") for lease in book.leases(job_id)):
        assert time.monotonic() < deadline, "the victim never computed a shard"
        time.sleep(0.05)
    version = client.jobs.get(job_id).version
    start.group.kill("victim", signal.SIGKILL)  # type: ignore[attr-defined]
    t_kill = time.monotonic()
    while client.jobs.get(job_id).version <= version:
        assert time.monotonic() - t_kill < 60, "no version within 60 s of the kill"
        time.sleep(0.05)
    final = client.wait(job_id, timeout=240)
    assert final["status"] == "succeeded", final.get("error")
    for v in range(1, final["version"] + 1):
        assert {keys.parse_identity(i).shard for i in client.jobs.consumed(job_id, v)} == {0, 1}

    # The queues are quorum queues: redeclaring one as classic is refused by the broker.
    with Connection(on_rabbitmq["AAS_BROKER_URL"]) as conn:
        ch = conn.channel()
        with pytest.raises(Exception, match="PRECONDITION_FAILED|inequivalent arg"):
            ch.queue_declare("shards", durable=True, arguments={"x-queue-type": "classic"})
    depths = RabbitProbe(on_rabbitmq["AAS_BROKER_URL"]).depths()
    assert depths == {"shards": 0, "aggregate": 0, "publish": 0, "predict": 0, "beat": 0}
