"""Prometheus metrics of the aggregator and the shard workers, and the /metrics server a worker starts.

The aggregator and shard code call three small functions (no Prometheus types leak out)::

    observe_round(duration_s=..., applied=3, staleness=[0, 1, 0], bytes_in=..., bytes_out=...)
    observe_shard_task(duration_s=..., samples=512, bytes_up=..., bytes_down=...)
    observe_rejected("stale")

Each role has its own registry, so a process exports what it does: a shard worker (queue ``shards``)
serves SHARD_REGISTRY, an aggregator (queue ``aggregate``) AGGREGATOR_REGISTRY plus the state read from
Redis at scrape time (queue depths, each model's version, accuracy and loss per alias); a worker on both
queues serves both. Every process adds the standard ``process_*`` and ``python_*`` metrics. Labelled
series are created up front with every label value they can take (modes, refusal reasons), so a
dashboard shows 0, not "No data", until something happens. Byte counters carry the unit last
(``aas_shard_up_bytes_total``), as Prometheus's naming conventions ask.

With ``AAS_METRICS_PORT`` set, a worker serves ``/metrics`` on ``AAS_METRICS_HOST:AAS_METRICS_PORT``
once it is ready (the ``worker_ready`` signal below; import this module from the worker). Metrics are
per process: with ``--pool=solo`` (GPU workers, the aggregator) the process that runs the tasks is the
one that serves them. Under prefork the children run the tasks, so the main process's /metrics stays
empty: run workers that should be scraped with ``--pool=solo`` (one process per container or device).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from celery.signals import worker_ready
from prometheus_client import (
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from pipeline.reasons import REJECT_REASONS

log = logging.getLogger(__name__)

ROLE_SHARD = "shard"
ROLE_AGGREGATOR = "aggregator"
MODES = ("sync", "async", "other")

SHARD_REGISTRY = CollectorRegistry()
AGGREGATOR_REGISTRY = CollectorRegistry()


# ---------------------------------------------------------------- aggregator

_A = AGGREGATOR_REGISTRY
VERSIONS_PUBLISHED = Counter("aas_versions_published", "Model versions committed by the aggregator", ["mode"],
                             registry=_A)
UPDATES_APPLIED = Counter("aas_updates_applied", "Gradient updates folded into a version", ["mode"], registry=_A)
UPDATES_REJECTED = Counter("aas_updates_rejected", "Gradient updates refused by the aggregator", ["reason"],
                           registry=_A)
STALENESS = Histogram("aas_update_staleness_versions", "Staleness of applied updates (versions behind)",
                      buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16, 32), registry=_A)
AGG_IN_BYTES = Counter("aas_aggregator_in_bytes", "Bytes the aggregator read (blobs, checkpoints, test data)",
                       registry=_A)
AGG_OUT_BYTES = Counter("aas_aggregator_out_bytes", "Bytes the aggregator wrote (checkpoints, artifacts)",
                        registry=_A)
ROUND_SECONDS = Histogram("aas_round_duration_seconds", "Aggregation of one round: read, apply, checkpoint, eval",
                          buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=_A)
for _mode in MODES:
    VERSIONS_PUBLISHED.labels(mode=_mode)
    UPDATES_APPLIED.labels(mode=_mode)
for _reason in REJECT_REASONS:
    UPDATES_REJECTED.labels(reason=_reason)

# ---------------------------------------------------------------- shard workers

_S = SHARD_REGISTRY
SHARD_SAMPLES_PER_S = Gauge("aas_shard_samples_per_second", "Training throughput of the last shard task",
                            registry=_S)
SHARD_SECONDS = Histogram("aas_shard_task_duration_seconds", "One shard task: load, compute, encode, upload",
                          buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=_S)
SHARD_TASKS = Counter("aas_shard_tasks", "Shard tasks finished", registry=_S)
SHARD_UP_BYTES = Counter("aas_shard_up_bytes", "Bytes shard workers uploaded (gradient blobs)", registry=_S)
SHARD_DOWN_BYTES = Counter("aas_shard_down_bytes", "Bytes shard workers downloaded (weights, data)", registry=_S)
# workers/replay.py: a version built from the round's blobs, or not (and why): "replayed", "mismatch" (the checksum
# differed: e.g. workers whose CPUs round differently from the aggregator's), "unreadable" (a blob missing or bad).
REPLAY_OUTCOMES = ("replayed", "mismatch", "unreadable")
VERSIONS_REPLAYED = Counter("aas_shard_versions_replayed", "Versions a shard worker built from the round's blobs "
                            "instead of downloading the weights, by outcome", ["outcome"], registry=_S)
for _outcome in REPLAY_OUTCOMES:
    VERSIONS_REPLAYED.labels(outcome=_outcome)


def observe_round(*, duration_s: float, applied: int, mode: str = "sync", published: bool = True,
                  staleness: Iterable[int] = (), bytes_in: int = 0, bytes_out: int = 0) -> None:
    """One aggregation: `applied` updates folded in, a version committed when `published`."""
    mode = mode if mode in ("sync", "async") else "other"
    ROUND_SECONDS.observe(max(0.0, float(duration_s)))
    if applied > 0:
        UPDATES_APPLIED.labels(mode=mode).inc(applied)
    if published:
        VERSIONS_PUBLISHED.labels(mode=mode).inc()
    for s in staleness:
        STALENESS.observe(max(0, int(s)))
    if bytes_in > 0:
        AGG_IN_BYTES.inc(bytes_in)
    if bytes_out > 0:
        AGG_OUT_BYTES.inc(bytes_out)


def observe_replay(outcome: str) -> None:
    VERSIONS_REPLAYED.labels(outcome=outcome).inc()


def observe_shard_task(*, duration_s: float, samples: int, bytes_up: int = 0, bytes_down: int = 0) -> None:
    """One shard task over `samples` samples (all local steps together)."""
    duration_s = max(0.0, float(duration_s))
    SHARD_SECONDS.observe(duration_s)
    SHARD_TASKS.inc()
    if duration_s > 0 and samples > 0:
        SHARD_SAMPLES_PER_S.set(samples / duration_s)
    if bytes_up > 0:
        SHARD_UP_BYTES.inc(bytes_up)
    if bytes_down > 0:
        SHARD_DOWN_BYTES.inc(bytes_down)


def observe_rejected(code: str) -> None:
    """One update refused; `code` is one of REJECT_REASONS (``reason_code(exc)`` of the refusal)."""
    UPDATES_REJECTED.labels(reason=code if code in REJECT_REASONS else "other").inc()


# ---------------------------------------------------------------- state read at scrape time

# kombu's Redis transport keeps a queue's priority levels in lists "<queue>\x06\x16<step>".
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (3, 6, 9)
FOLLOWED_ALIASES = ("production", "staging")  # besides "latest"


def queue_depths(r: Any, queues: Iterable[str]) -> dict[str, int]:
    """Messages waiting in each queue on a Redis broker (all priority levels together)."""
    queues = tuple(queues)
    pipe = r.pipeline()
    for q in queues:
        pipe.llen(q)
        for step in PRIORITY_STEPS:
            pipe.llen(f"{q}{PRIORITY_SEP}{step}")
    counts = pipe.execute()
    per = 1 + len(PRIORITY_STEPS)
    return {q: int(sum(counts[i * per:(i + 1) * per])) for i, q in enumerate(queues)}


class StateCollector(Collector):
    """Reads queue depths and each registered model's version, accuracy and loss (per alias, and
    ``latest``) from Redis when Prometheus scrapes. `services` builds (once, lazily) an object with
    ``redis`` and ``registry()``; a Redis that does not answer yields ``aas_state_up 0``."""

    def __init__(self, services: Callable[[], Any], queues: Iterable[str]) -> None:
        self._build, self._services = services, None
        self.queues = tuple(queues)

    def describe(self) -> list[Any]:
        return []  # collected live: no describe-time Redis call when registered

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("aas_state_up", "Whether the last read of queue and model state from Redis worked")
        depth = GaugeMetricFamily("aas_queue_depth_messages", "Messages waiting in a broker queue", labels=["queue"])
        version = GaugeMetricFamily("aas_model_version", "Version an alias of a registered model points to "
                                    "(alias 'latest': the newest)", labels=["model", "alias"])
        accuracy = GaugeMetricFamily("aas_model_accuracy_ratio", "Test accuracy of that version (what is served)",
                                     labels=["model", "alias"])
        loss = GaugeMetricFamily("aas_model_loss", "Test loss of that version", labels=["model", "alias"])
        try:
            if self._services is None:
                self._services = self._build()
            svc = self._services
            for q, n in queue_depths(svc.redis, self.queues).items():
                depth.add_metric([q], n)
            reg = svc.registry()
            for model in reg.list_models():
                versions = reg.list_versions(model)
                if not versions:
                    continue
                by_number = {v.version: v for v in versions}
                points = {"latest": versions[-1].version, **{a: v for a, v in reg.aliases(model).items()
                                                              if a in FOLLOWED_ALIASES}}
                for alias, number in points.items():
                    version.add_metric([model, alias], number)
                    rec = by_number.get(number)
                    metrics = rec.metrics if rec is not None else {}
                    if isinstance(metrics.get("accuracy"), (int, float)):
                        accuracy.add_metric([model, alias], float(metrics["accuracy"]))
                    if isinstance(metrics.get("loss"), (int, float)):
                        loss.add_metric([model, alias], float(metrics["loss"]))
            up.add_metric([], 1)
        except Exception as e:  # noqa: BLE001 - a scrape must answer; say the state is unknown
            log.warning("metrics: cannot read state from Redis: %s", e)
            up.add_metric([], 0)
        yield from (up, depth, version, accuracy, loss)


# ---------------------------------------------------------------- per-role registries and the server


def roles_for_queues(queues: Iterable[str]) -> set[str]:
    """The roles a worker consuming `queues` plays (names from workers.app)."""
    from workers.app import QUEUE_AGGREGATE, QUEUE_SHARDS

    qs = set(queues)
    return ({ROLE_SHARD} if QUEUE_SHARDS in qs else set()) | ({ROLE_AGGREGATOR} if QUEUE_AGGREGATE in qs else set())


class _Union(Collector):
    def __init__(self, registries: Iterable[CollectorRegistry]) -> None:
        self.registries = tuple(registries)

    def collect(self) -> Iterator[Any]:
        for r in self.registries:
            yield from r.collect()


def registry_for(roles: Iterable[str], *, state: StateCollector | None = None) -> CollectorRegistry:
    """What a process with these roles serves: its roles' metrics, process metrics, and (aggregator) state."""
    roles = set(roles)
    out = CollectorRegistry(auto_describe=False)
    parts = [r for role, r in ((ROLE_SHARD, SHARD_REGISTRY), (ROLE_AGGREGATOR, AGGREGATOR_REGISTRY)) if role in roles]
    out.register(_Union(parts))
    out.register(PROCESS_COLLECTOR)
    out.register(PLATFORM_COLLECTOR)
    if state is not None and ROLE_AGGREGATOR in roles:
        out.register(state)
    return out


def default_state_collector() -> StateCollector:
    """State from the Redis the settings name (built at the first scrape)."""
    from workers.app import QUEUES

    def build() -> Any:
        from storage.services import build_services

        return build_services()

    return StateCollector(build, QUEUES)


_server: Any = None


def start_metrics_server(port: int, host: str = "127.0.0.1", registry: CollectorRegistry | None = None) -> bool:
    """Serve `registry` on http://host:port/metrics in a daemon thread; once per process. False if already."""
    global _server
    if _server is not None:
        return False
    registry = registry or registry_for({ROLE_SHARD, ROLE_AGGREGATOR})
    try:
        _server = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise OSError(f"cannot serve metrics on {host}:{port}: {e} (set AAS_METRICS_PORT to a free port, "
                      "or unset it)") from None
    log.info("metrics on http://%s:%d/metrics", host, port)
    return True


def _consumed_queues(consumer: Any) -> list[str]:
    try:
        return [q.name for q in consumer.task_consumer.queues]
    except AttributeError:
        return []


@worker_ready.connect
def _serve_metrics_when_ready(sender: Any = None, **_: Any) -> None:
    from pipeline.settings import get_settings

    s = get_settings()
    if s.metrics_port is None:
        return
    roles = roles_for_queues(_consumed_queues(sender)) or {ROLE_SHARD, ROLE_AGGREGATOR}
    try:
        start_metrics_server(s.metrics_port, s.metrics_host, registry_for(roles, state=default_state_collector()))
    except OSError as e:
        log.error("%s", e)  # a worker without metrics still trains
