"""Liveness records in Redis: worker heartbeats, task leases, the shards a round has done, and the counts the
liveness monitor keeps (how often a slot's worker died, when a slot was first seen orphaned).

A heartbeat and a lease are keys with a TTL that a live worker process keeps renewing; a process that is
killed or stopped stops renewing and its keys expire: nothing has to run for a death to become visible.
Each lease also has an entry in its job's ``job_leases`` hash, so an expired lease is *seen* (an entry whose
key is gone) rather than merely absent. Key layouts are in ``storage/keys.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis

from storage import keys

DONE_TTL_S = 24 * 3600  # a round's done-set outlives any round
# A round's recorded results (~350 bytes a shard) are read by its aggregation, seconds later. An hour bounds what
# a fast job leaves in Redis (a small model commits ~20 versions a second); a round that outlasts it loses only
# the digests: its aggregation then finds the blobs in the store and checks each one's own digest.
RESULTS_TTL_S = 3600


@dataclass(frozen=True)
class Lease:
    """One task's lease: which slot of which job it works on, where, since when; whether it is still renewed."""

    task_id: str
    job_id: str
    slot: str
    worker: str
    what: str
    started: float
    state: str  # "running" | "retry" (held by a worker until its countdown ends) | "hung" (past the hard limit)
    alive: bool

    def to_dict(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "slot": self.slot, "worker": self.worker, "what": self.what,
                "started": self.started, "state": self.state, "alive": self.alive}


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class LeaseBook:
    """The liveness records of every job and worker, on one Redis."""

    def __init__(self, r: redis.Redis, ttl_s: float) -> None:
        self.r = r
        self.ttl_s = ttl_s

    # ------------------------------------------------------------ workers

    def heartbeat(self, worker: str, info: dict[str, Any]) -> None:
        self.r.set(keys.worker_heartbeat(worker), json.dumps({**info, "t": time.time()}), px=_ms(self.ttl_s))

    def drop_worker(self, worker: str) -> None:
        self.r.delete(keys.worker_heartbeat(worker))

    def workers(self) -> dict[str, dict[str, Any]]:
        """Every worker whose heartbeat has not expired, with what it last reported."""
        names = list(self.r.scan_iter(match=keys.worker_heartbeat_pattern(), count=1000))
        if not names:
            return {}
        out = {}
        prefix = keys.worker_heartbeat("")
        for name, raw in zip(names, self.r.mget(names), strict=True):
            if raw is not None:
                out[name.decode().removeprefix(prefix)] = json.loads(raw)
        return out

    # ------------------------------------------------------------ leases

    def acquire(self, job_id: str, task_id: str, slot: str, worker: str, what: str, *,
                then: Callable[[Any], Any] | None = None) -> list[Any]:
        """Take the lease; `then(pipe)` queues more commands in the same round trip: their replies are returned."""
        entry = {"slot": slot, "worker": worker, "what": what, "started": time.time(), "state": "running"}
        pipe = self.r.pipeline()
        pipe.set(keys.lease(task_id), job_id, px=_ms(self.ttl_s))
        pipe.hset(keys.job_leases(job_id), task_id, json.dumps(entry))
        if then is not None:
            then(pipe)
        return list(pipe.execute()[2:])

    def renew(self, task_ids: Iterable[str]) -> list[str]:
        """Extend these leases; returns the ids whose lease had already expired (the monitor may have moved on)."""
        ids = list(task_ids)
        if not ids:
            return []
        pipe = self.r.pipeline()
        for t in ids:
            pipe.pexpire(keys.lease(t), _ms(self.ttl_s))
        return [t for t, ok in zip(ids, pipe.execute(), strict=True) if not ok]

    def hold(self, job_id: str, task_id: str, hold_s: float) -> None:
        """A task waiting for its retry countdown in a worker's memory: leased for the countdown plus one TTL."""
        self._set_state(job_id, task_id, "retry")
        self.r.set(keys.lease(task_id), job_id, px=_ms(hold_s + self.ttl_s))

    def mark_hung(self, job_id: str, task_id: str) -> None:
        """The worker is about to end itself (hard limit): the lease is lost now, not one TTL later."""
        self._set_state(job_id, task_id, "hung")
        self.r.delete(keys.lease(task_id))

    def _set_state(self, job_id: str, task_id: str, state: str) -> None:
        raw = self.r.hget(keys.job_leases(job_id), task_id)
        if raw is not None:
            self.r.hset(keys.job_leases(job_id), task_id, json.dumps({**json.loads(raw), "state": state}))

    def release(self, job_id: str, task_id: str) -> None:
        pipe = self.r.pipeline()
        pipe.delete(keys.lease(task_id))
        pipe.hdel(keys.job_leases(job_id), task_id)
        pipe.execute()

    def leases(self, job_id: str) -> list[Lease]:
        """Every lease recorded for the job, each with whether its key is still alive."""
        raw = self.r.hgetall(keys.job_leases(job_id))
        if not raw:
            return []
        ids = [k.decode() for k in raw]
        pipe = self.r.pipeline()
        for t in ids:
            pipe.exists(keys.lease(t))
        alive = pipe.execute()
        out = []
        for t, ok in zip(ids, alive, strict=True):
            e = json.loads(raw[t.encode()])
            out.append(Lease(t, job_id, str(e["slot"]), str(e["worker"]), str(e.get("what", e["slot"])),
                             float(e["started"]), str(e.get("state", "running")), bool(ok)))
        return out

    def reap(self, job_id: str) -> list[tuple[Lease, int]]:
        """Remove the job's lost leases; each comes back with its slot's lost count (once, whoever reaps it)."""
        out = []
        for lease in self.leases(job_id):
            if lease.alive:
                continue
            if not self.r.hdel(keys.job_leases(job_id), lease.task_id):
                continue  # another sweeper reaped it
            out.append((lease, int(self.r.hincrby(keys.job_lost(job_id), lease.slot, 1))))
        return out

    def summary(self, job_id: str, fields: dict[str, str], now: float | None = None) -> dict[str, Any]:
        """What `aas status` and `aas top` show of a job's liveness: seconds since its last progress (a commit or
        an accepted update), how many times work was relaunched, and which tasks run where."""
        now = time.time() if now is None else now
        progress_at = float(fields.get("progress_at") or 0)
        return {"since_progress_s": round(now - progress_at, 1) if progress_at else None,
                "relaunches": int(fields.get("relaunches") or 0),
                "tasks": [lease.to_dict() for lease in self.leases(job_id)]}

    def lost_count(self, job_id: str, slot: str) -> int:
        return int(self.r.hget(keys.job_lost(job_id), slot) or 0)

    # ------------------------------------------------------------ rounds

    def mark_done(self, job_id: str, version: int, shard: int, *, result: dict[str, Any] | None = None,
                  then: Callable[[Any], Any] | None = None) -> tuple[int, bool, Any]:
        """Record that shard `shard` of round `version` finished, with its task's `result` (JSON); returns how
        many shards have, whether this call added the shard (False for a repeat), and the reply of `then(pipe)`
        (a read queued in the same round trip; None without one). One transaction: of the calls that add a
        round's shards, exactly one sees the count reach the round's size."""
        key = keys.job_done(job_id, version)
        pipe = self.r.pipeline()
        pipe.sadd(key, shard)
        pipe.expire(key, DONE_TTL_S)
        pipe.scard(key)
        if result is not None:
            rkey = keys.job_results(job_id, version)
            pipe.hset(rkey, str(shard), json.dumps(result))
            pipe.expire(rkey, RESULTS_TTL_S)
        if then is not None:
            then(pipe)
        out = pipe.execute()
        return int(out[2]), bool(out[0]), (out[-1] if then is not None else None)

    def done(self, job_id: str, version: int) -> set[int]:
        return {int(s) for s in self.r.smembers(keys.job_done(job_id, version))}

    # ------------------------------------------------------------ orphans

    def orphaned_since(self, job_id: str, slot: str, now: float) -> float:
        """When the slot was first seen orphaned (now, if this is the first time)."""
        key = keys.job_orphans(job_id)
        self.r.hsetnx(key, slot, repr(now))
        return float(self.r.hget(key, slot) or now)

    def keep_orphans(self, job_id: str, slots: set[str]) -> None:
        """Forget every orphan record but these (slots that are alive again or no longer needed)."""
        key = keys.job_orphans(job_id)
        stale = [f for f in self.r.hkeys(key) if f.decode() not in slots]
        if stale:
            self.r.hdel(key, *stale)


def round_results(r: redis.Redis, job_id: str, version: int) -> list[dict[str, Any]]:
    """The results the shards of sync round `version` recorded (``LeaseBook.mark_done``), by shard."""
    raw = r.hgetall(keys.job_results(job_id, version))
    return [json.loads(raw[k]) for k in sorted(raw, key=int)]


def shard_results(r: redis.Redis, job_id: str) -> list[dict[str, Any]]:
    """The results of the job's shard tasks: a sync round's as its shards recorded them (``LeaseBook.mark_done``:
    one per shard and round, the last recorded), an async step's from the Celery result backend (the app sets
    ``result_extended``, so each stored result names its task and, by name, its ``job_id``). For benches and
    tests that read what the workers did."""
    out: list[dict[str, Any]] = []
    for key in r.scan_iter(match=keys.job_results(job_id, "*"), count=500):  # type: ignore[arg-type]
        out += [json.loads(v) for v in r.hgetall(key).values()]
    for key in r.scan_iter(match="celery-task-meta-*", count=500):
        raw = r.get(key)
        meta = json.loads(raw) if raw else {}
        args, kwargs, res = meta.get("args") or [], meta.get("kwargs") or {}, meta.get("result")
        job = kwargs.get("job_id", args[0] if args else None)  # positional in messages older than shard_signature
        if meta.get("name") == "aas.train_shard" and job == job_id and isinstance(res, dict):
            out.append(res)
    return out
