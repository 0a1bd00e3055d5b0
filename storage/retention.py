"""How long a finished job's state stays in Redis (the registry's own retention is Registry.apply_retention).

A job writes keys per version (the identities each version consumed, the launch marker of each round)
and working keys (async pending updates, shard progress, the job lock). Without limits Redis grows with
every version of every job (~10.8k keys after 7 jobs). When a job ends:

- its per-version keys get a TTL (``finished_ttl_s``): long enough to audit exactly-once after a run
  (ops/chaos reads them), then gone; its async working keys too, unless it failed (``aas resume`` needs
  them to continue exactly once);
- finished jobs beyond the newest ``keep_jobs`` lose their Redis state altogether: hash, metrics, events.
  Their record and checkpoints stay in the object store (``aas resume`` rebuilds from there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from storage import keys


@dataclass(frozen=True)
class Retention:
    finished_ttl_s: int = 24 * 3600  # per-version keys of a finished job live this long (0: deleted at once)
    keep_jobs: int = 200  # finished jobs whose state stays in Redis, newest first (0: all)


TERMINAL = ("succeeded", "failed", "cancelled")


def _version_keys(r: Any, job_id: str) -> list[bytes]:
    found: list[bytes] = []
    for pattern in (keys.job_consumed_pattern(job_id), keys.job_launched_pattern(job_id),
                    keys.job_publish_pattern(job_id), keys.job_parts_pattern(job_id)):
        found.extend(r.scan_iter(match=pattern, count=1000))
    return found


def compact_finished_job(r: Any, job_id: str, status: str, policy: Retention) -> int:
    """Expire (or delete) the per-version and working keys of a job that just ended; returns how many."""
    doomed = [*_version_keys(r, job_id), keys.job_affinity(job_id).encode()]  # a placement hint: never kept
    if status != "failed":  # a failed job may be resumed: its async progress must survive
        doomed += [k.encode() for k in (keys.job_pending(job_id), keys.job_progress(job_id), keys.job_ahead(job_id),
                                        keys.job_issued(job_id), keys.job_lock(job_id))]
    pipe = r.pipeline(transaction=False)
    for k in doomed:
        if policy.finished_ttl_s > 0:
            pipe.expire(k, policy.finished_ttl_s)
        else:
            pipe.delete(k)
    pipe.execute()
    return len(doomed)


def forget_job(r: Any, job_id: str) -> None:
    """Remove every Redis key of a job (its object-store record and checkpoints stay)."""
    doomed = [*_version_keys(r, job_id), *(k.encode() for k in (
        keys.job(job_id), keys.job_metrics(job_id), keys.job_events(job_id), keys.job_pending(job_id),
        keys.job_progress(job_id), keys.job_ahead(job_id), keys.job_issued(job_id), keys.job_lock(job_id),
        keys.job_affinity(job_id)))]
    pipe = r.pipeline(transaction=False)
    pipe.delete(*doomed)
    pipe.zrem(keys.jobs_index(), job_id)
    pipe.execute()


def prune_finished_jobs(r: Any, policy: Retention) -> list[str]:
    """Forget finished jobs beyond the newest `policy.keep_jobs`; running and queued jobs are never touched."""
    if policy.keep_jobs <= 0:
        return []
    ids = [j.decode() for j in r.zrevrange(keys.jobs_index(), 0, -1)]
    pipe = r.pipeline(transaction=False)
    for j in ids:
        pipe.hget(keys.job(j), "status")
    statuses = pipe.execute()
    finished = [j for j, s in zip(ids, statuses, strict=True) if s is not None and s.decode() in TERMINAL]
    old = finished[policy.keep_jobs:]
    for j in old:
        forget_job(r, j)
    return old
