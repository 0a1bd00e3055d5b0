"""Prometheus metrics of the aggregator and the shard workers, and the /metrics server a worker starts.

The aggregator and shard code call three small functions (no Prometheus types leak out)::

    observe_round(duration_s=..., applied=3, staleness=[0, 1, 0], bytes_in=..., bytes_out=...)
    observe_shard_task(duration_s=..., samples=512, bytes_up=..., bytes_down=...)
    observe_rejected("stale")

With ``AAS_METRICS_PORT`` set, a worker serves ``/metrics`` on ``AAS_METRICS_HOST:AAS_METRICS_PORT``
once it is ready (the ``worker_ready`` signal below; import this module from the worker). Metrics are
per process: with ``--pool=solo`` (GPU workers, the aggregator) the process that runs the tasks is the
one that serves them. Under prefork the children run the tasks, so the main process's /metrics stays
empty: run workers that should be scraped with ``--pool=solo`` (one process per container or device).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from celery.signals import worker_ready
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from pipeline.reasons import REJECT_REASONS

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()


# ---------------------------------------------------------------- aggregator

VERSIONS_PUBLISHED = Counter("aas_versions_published", "Model versions committed by the aggregator",
                             ["mode"], registry=REGISTRY)
UPDATES_APPLIED = Counter("aas_updates_applied", "Gradient updates folded into a version", ["mode"],
                          registry=REGISTRY)
UPDATES_REJECTED = Counter("aas_updates_rejected", "Gradient updates refused by the aggregator", ["reason"],
                           registry=REGISTRY)
STALENESS = Histogram("aas_update_staleness_versions", "Staleness of applied updates (versions behind)",
                      buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16, 32), registry=REGISTRY)
AGG_BYTES_IN = Counter("aas_aggregator_bytes_in", "Bytes the aggregator read (blobs, checkpoints, test data)",
                       registry=REGISTRY)
AGG_BYTES_OUT = Counter("aas_aggregator_bytes_out", "Bytes the aggregator wrote (checkpoints, artifacts)",
                        registry=REGISTRY)
ROUND_SECONDS = Histogram("aas_round_duration_seconds", "Aggregation of one round: read, apply, checkpoint, eval",
                          buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=REGISTRY)

# ---------------------------------------------------------------- shard workers

SHARD_SAMPLES_PER_S = Gauge("aas_shard_samples_per_second", "Training throughput of the last shard task",
                            registry=REGISTRY)
SHARD_SECONDS = Histogram("aas_shard_task_duration_seconds", "One shard task: load, compute, encode, upload",
                          buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=REGISTRY)
SHARD_TASKS = Counter("aas_shard_tasks", "Shard tasks finished", registry=REGISTRY)
SHARD_BYTES_UP = Counter("aas_shard_bytes_up", "Bytes shard workers uploaded (gradient blobs)", registry=REGISTRY)
SHARD_BYTES_DOWN = Counter("aas_shard_bytes_down", "Bytes shard workers downloaded (weights, data)",
                           registry=REGISTRY)


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
        AGG_BYTES_IN.inc(bytes_in)
    if bytes_out > 0:
        AGG_BYTES_OUT.inc(bytes_out)


def observe_shard_task(*, duration_s: float, samples: int, bytes_up: int = 0, bytes_down: int = 0) -> None:
    """One shard task over `samples` samples (all local steps together)."""
    duration_s = max(0.0, float(duration_s))
    SHARD_SECONDS.observe(duration_s)
    SHARD_TASKS.inc()
    if duration_s > 0 and samples > 0:
        SHARD_SAMPLES_PER_S.set(samples / duration_s)
    if bytes_up > 0:
        SHARD_BYTES_UP.inc(bytes_up)
    if bytes_down > 0:
        SHARD_BYTES_DOWN.inc(bytes_down)


def observe_rejected(code: str) -> None:
    """One update refused; `code` is one of REJECT_REASONS (``reason_code(exc)`` of the refusal)."""
    UPDATES_REJECTED.labels(reason=code if code in REJECT_REASONS else "other").inc()


_server: Any = None


def start_metrics_server(port: int, host: str = "127.0.0.1") -> bool:
    """Serve REGISTRY on http://host:port/metrics in a daemon thread; once per process. False if already."""
    global _server
    if _server is not None:
        return False
    try:
        _server = start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as e:
        raise OSError(f"cannot serve metrics on {host}:{port}: {e} (set AAS_METRICS_PORT to a free port, "
                      "or unset it)") from None
    log.info("metrics on http://%s:%d/metrics", host, port)
    return True


@worker_ready.connect
def _serve_metrics_when_ready(**_: Any) -> None:
    from pipeline.settings import get_settings

    s = get_settings()
    if s.metrics_port is None:
        return
    try:
        start_metrics_server(s.metrics_port, s.metrics_host)
    except OSError as e:
        log.error("%s", e)  # a worker without metrics still trains
