"""Durable job state in Redis (not in Celery results, which expire): status, version, metrics, events.

The version bump is the commit point of an update: ``commit_version`` moves the job from version N to
N+1, records the exact set of gradient identities that produced it and the version's metrics, all in
one MULTI/EXEC guarded by WATCH, so a redelivered or duplicate aggregation commits nothing twice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from pipeline import async_plan
from storage import keys
from storage.retention import Retention, compact_finished_job, prune_finished_jobs

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")
EVENTS_MAXLEN = 10_000


class JobNotFound(KeyError):
    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:
        return f"no job {self.job_id!r} (aas status lists jobs)"


@dataclass(frozen=True)
class JobState:
    job_id: str
    status: str
    version: int
    total_rounds: int
    spec: dict[str, Any]
    fields: dict[str, str]

    @property
    def error(self) -> str | None:
        return self.fields.get("error") or None

    def num(self, name: str, default: float = 0.0) -> float:
        try:
            return float(self.fields.get(name, default))
        except ValueError:
            return default

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "job_id": self.job_id,
            "status": self.status,
            "version": self.version,
            "total_rounds": self.total_rounds,
            "error": self.error,
            "bytes_up": int(self.num("bytes_up")),
            "bytes_down": int(self.num("bytes_down")),
            "bytes_state": int(self.num("bytes_state")),
        }
        for k in ("created_at", "started_at", "finished_at", "test_accuracy", "test_loss", "perplexity"):
            if k in self.fields:
                out[k] = float(self.fields[k])
        if "state_local" in self.fields or "state_moved" in self.fields:  # top-k tasks that found their codec
            out["state_local"] = int(self.num("state_local"))                # state in-process, or not
            out["state_moved"] = int(self.num("state_moved"))
        for k in ("checkpoint", "manifest", "registered_model"):
            if k in self.fields:
                out[k] = self.fields[k]
        return out


class JobStore:
    def __init__(self, r: redis.Redis, retention: Retention | None = None) -> None:
        """`retention`: what happens to a job's Redis state when it ends (storage/retention.py)."""
        self.r = r
        self.retention = retention or Retention()

    def create(self, job_id: str, spec: dict[str, Any], *, total_rounds: int, fields: dict[str, Any]) -> None:
        mapping = {
            "spec": json.dumps(spec),
            "status": "queued",
            "version": 0,
            "total_rounds": total_rounds,
            "created_at": time.time(),
            "progress_at": time.time(),  # last commit or accepted update: the watchdog's stall clock
            "bytes_up": 0,
            "bytes_down": 0,
            **fields,
        }
        pipe = self.r.pipeline()
        pipe.hset(keys.job(job_id), mapping={k: str(v) for k, v in mapping.items()})
        pipe.zadd(keys.jobs_index(), {job_id: time.time()})
        pipe.execute()

    def delete(self, job_id: str) -> None:
        """Remove every trace of a job's state (used when a submit is rolled back)."""
        pipe = self.r.pipeline()
        pipe.delete(keys.job(job_id), keys.job_metrics(job_id), keys.job_events(job_id))
        pipe.zrem(keys.jobs_index(), job_id)
        pipe.execute()

    def get(self, job_id: str) -> JobState:
        return self.parse(job_id, self.r.hgetall(keys.job(job_id)))

    @staticmethod
    def parse(job_id: str, raw: dict[bytes, bytes]) -> JobState:
        """A job's state from its hash as HGETALL returned it (``get``, or a read queued in a pipeline)."""
        if b"spec" not in raw:
            # Missing, or only the counters a task still running bumped (HINCRBY) after Redis lost the job:
            # not a job. Treating such a stub as one made `resume` finish the job at version 0.
            raise JobNotFound(job_id)
        f = {k.decode(): v.decode() for k, v in raw.items()}
        return JobState(
            job_id=job_id,
            status=f.get("status", "queued"),
            version=int(f.get("version", 0)),
            total_rounds=int(f.get("total_rounds", 0)),
            spec=json.loads(f.get("spec", "{}")),
            fields=f,
        )

    def list(self, limit: int = 50) -> list[str]:
        return [j.decode() for j in self.r.zrevrange(keys.jobs_index(), 0, limit - 1)]

    def set_fields(self, job_id: str, **fields: Any) -> None:
        self.r.hset(keys.job(job_id), mapping={k: str(v) for k, v in fields.items()})

    def set_status(self, job_id: str, status: str, *, error: str | None = None) -> bool:
        """Move to `status` unless the job already ended; returns whether it moved."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        key = keys.job(job_id)

        def still_open(pipe: Any) -> bool:
            current = pipe.hget(key, "status")
            return current is not None and current.decode() not in TERMINAL

        mapping: dict[str, str] = {"status": status}
        if status == "running":
            mapping["started_at"] = str(time.time())
        if status in TERMINAL:
            mapping["finished_at"] = str(time.time())
        if error:
            mapping["error"] = error
        if not self._check_and_write(key, still_open, lambda pipe: pipe.hset(key, mapping=mapping)):
            return False
        self.event(job_id, "status", status=status, **({"error": error} if error else {}))
        if status in TERMINAL:
            compact_finished_job(self.r, job_id, status, self.retention)
            prune_finished_jobs(self.r, self.retention)
        return True

    def commit_version(
        self,
        job_id: str,
        *,
        base_version: int,
        new_version: int,
        checkpoint_key: str,
        identities: list[str],
        metrics: dict[str, Any],
        pending_consumed: int = 0,
        count_bytes: bool = False,
        add_bytes_down: int = 0,
        event: dict[str, Any] | None = None,
        fields: dict[str, str] | None = None,
    ) -> JobState | None:
        """Atomically move version base→new with its consumed identities and metrics; return the job's state
        as the commit left it (read in the same round trip as the version check, under WATCH). `fields`: more
        job fields written in the same transaction.

        Returns None (and changes nothing) when the job is no longer at `base_version`: another
        aggregation already committed, so this one is a duplicate. `count_bytes`: add the job's bytes moved
        so far (``bytes_up``, ``bytes_down``, the latter after adding `add_bytes_down`) to `metrics`;
        `event`: append this ``version`` event to the job's events in the same transaction.
        """
        key = keys.job(job_id)
        fields = {**(fields or {}), "version": str(new_version), "checkpoint": checkpoint_key,
                  "progress_at": str(time.time())}
        for k in ("accuracy", "loss", "perplexity"):
            if k in metrics:
                fields[f"test_{k}" if k != "perplexity" else k] = str(metrics[k])

        before: dict[bytes, bytes] = {}

        def at_base(pipe: Any) -> bool:
            before.clear()
            before.update(pipe.hgetall(key))
            if count_bytes:
                metrics.update(bytes_up=int(before.get(b"bytes_up", 0)),
                               bytes_down=int(before.get(b"bytes_down", 0)) + add_bytes_down)
            cur = before.get(b"version")
            return cur is not None and int(cur) == base_version

        def write(pipe: Any) -> None:
            pipe.hset(key, mapping=fields)
            if add_bytes_down:
                pipe.hincrby(key, "bytes_down", add_bytes_down)
            if identities:
                pipe.sadd(keys.job_consumed(job_id, new_version), *identities)
            pipe.rpush(keys.job_metrics(job_id), json.dumps({"version": new_version, **metrics}))
            if pending_consumed:
                pipe.ltrim(keys.job_pending(job_id), pending_consumed, -1)
            if event is not None:
                pipe.xadd(keys.job_events(job_id), _event_body("version", event), maxlen=EVENTS_MAXLEN,
                          approximate=True)

        if not self._check_and_write(key, at_base, write):
            return None
        after = {**before, **{k.encode(): v.encode() for k, v in fields.items()}}
        after[b"bytes_down"] = str(int(before.get(b"bytes_down", 0)) + add_bytes_down).encode()
        return self.parse(job_id, after)

    def record_part(self, job_id: str, version: int, part: int, payload: dict[str, Any]) -> None:
        """Aggregation part `part` of round `version` has written its range of version+1 (idempotent)."""
        key = keys.job_parts(job_id, version)
        pipe = self.r.pipeline()
        pipe.hset(key, str(part), json.dumps(payload))
        pipe.expire(key, 7 * 24 * 3600)
        pipe.execute()

    def claim_part(self, job_id: str, version: int, part: int, claimant: str) -> bool:
        """Take parameter range `part` of round `version` for `claimant` (an aggregator process): True when it was
        free or is already this claimant's."""
        key = keys.job_part_claims(job_id, version)
        pipe = self.r.pipeline()
        pipe.hsetnx(key, str(part), claimant)
        pipe.hget(key, str(part))
        pipe.expire(key, 24 * 3600)
        owner = pipe.execute()[1]
        return (owner.decode() if isinstance(owner, bytes) else str(owner)) == claimant

    def parts_done(self, job_id: str, version: int) -> dict[str, dict[str, Any]]:
        return {(k.decode() if isinstance(k, bytes) else str(k)): json.loads(v)
                for k, v in self.r.hgetall(keys.job_parts(job_id, version)).items()}

    def record_evaluation(self, job_id: str, version: int, metrics: dict[str, Any]) -> bool:
        """Add a committed version's test metrics to its metrics entry; the job's test_* fields (what the
        stop rule and ``aas status`` read) follow the newest evaluated version. Returns whether it was the
        newest (an evaluation of an older version, finishing late, only fills in its own entry)."""
        key = keys.job(job_id)
        entry = self.metrics_at(job_id, version)
        if entry is not None:
            self.r.lset(keys.job_metrics(job_id), version - 1, json.dumps({**entry, **metrics}))
        fields = {"evaluated_version": str(version)}
        for k in ("accuracy", "loss", "perplexity"):
            if k in metrics:
                fields[f"test_{k}" if k != "perplexity" else k] = str(metrics[k])

        def newest(pipe: Any) -> bool:
            return int(pipe.hget(key, "evaluated_version") or 0) < version

        return self._check_and_write(key, newest, lambda pipe: pipe.hset(key, mapping=fields))

    def _check_and_write(self, key: str | tuple[str, ...], check: Callable[[Any], bool],
                         write: Callable[[Any], None]) -> bool:
        """WATCH `key` (or keys); when check(pipe) holds, run write(pipe) in one MULTI/EXEC. Retries on a
        concurrent change of a watched key; returns False (writing nothing) when the check fails."""
        watched = (key,) if isinstance(key, str) else key
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(*watched)
                    if not check(pipe):
                        pipe.unwatch()
                        return False
                    pipe.multi()
                    write(pipe)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    # ------------------------------------------------------------ async mode

    def progress(self, job_id: str) -> dict[int, int]:
        return {int(k): int(v) for k, v in self.r.hgetall(keys.job_progress(job_id)).items()}

    def pending(self, job_id: str) -> list[dict[str, Any]]:
        return [json.loads(e) for e in self.r.lrange(keys.job_pending(job_id), 0, -1)]

    def ahead(self, job_id: str) -> set[tuple[int, int]]:
        """Async: the (shard, step) results accepted above their shard's mark (out of order)."""
        out = set()
        for m in self.r.smembers(keys.job_ahead(job_id)):
            s, step = m.decode().split(":")
            out.add((int(s), int(step)))
        return out

    def awaits(self, job_id: str, shard: int, step: int) -> bool:
        """Async: whether the job still awaits this step's result (not accepted, in or out of order)."""
        mark = int(self.r.hget(keys.job_progress(job_id), str(shard)) or 0)
        return async_plan.awaited(mark, self._ahead_of(self.r, job_id, shard), step)

    @staticmethod
    def _ahead_of(r: Any, job_id: str, shard: int) -> set[int]:
        return {int(m.decode().split(":")[1]) for m in r.smembers(keys.job_ahead(job_id))
                if m.decode().split(":")[0] == str(shard)}

    def accept_update(self, job_id: str, *, shard: int, step: int, local_steps: int,
                      entry: dict[str, Any] | None) -> bool:
        """Record an accepted async step (with its update `entry`, appended to ``pending``; None for a step
        consumed without an update) and move the shard's mark, atomically.

        Refuses (returns False) unless the job still awaits the step: a redelivered or duplicate result for a
        step already accepted is never recorded twice, whatever order the steps arrive in.
        """
        pkey, akey = keys.job_progress(job_id), keys.job_ahead(job_id)
        seen: dict[str, Any] = {}

        def awaited(pipe: Any) -> bool:
            seen["mark"] = int(pipe.hget(pkey, str(shard)) or 0)
            seen["ahead"] = self._ahead_of(pipe, job_id, shard)
            return async_plan.awaited(seen["mark"], seen["ahead"], step)

        def write(pipe: Any) -> None:
            mark, rest = async_plan.accept(seen["mark"], seen["ahead"], step, local_steps)
            if entry is not None:
                pipe.rpush(keys.job_pending(job_id), json.dumps(entry))
            pipe.hset(pkey, str(shard), str(mark))
            gone = (seen["ahead"] | {step}) - rest
            if gone - {step}:
                pipe.srem(akey, *(f"{shard}:{k}" for k in sorted(gone - {step})))
            if step in rest:
                pipe.sadd(akey, f"{shard}:{step}")
            pipe.hincrby(keys.job(job_id), "accepted", 1)
            pipe.hset(keys.job(job_id), "progress_at", str(time.time()))

        return self._check_and_write((pkey, akey), awaited, write)

    def consumed(self, job_id: str, version: int) -> set[str]:
        return {m.decode() for m in self.r.smembers(keys.job_consumed(job_id, version))}

    def add_bytes(self, job_id: str, *, up: int = 0, down: int = 0, state: int = 0) -> None:
        """Count bytes moved: gradient blobs up, checkpoints down, and codec state written to and read from the
        store (top-k error feedback kept with the shard; not part of the gradient traffic)."""
        pipe = self.r.pipeline()
        if state:
            pipe.hincrby(keys.job(job_id), "bytes_state", state)
        if up:
            pipe.hincrby(keys.job(job_id), "bytes_up", up)
        if down:
            pipe.hincrby(keys.job(job_id), "bytes_down", down)
        pipe.execute()

    def metrics(self, job_id: str) -> list[dict[str, Any]]:
        return [json.loads(m) for m in self.r.lrange(keys.job_metrics(job_id), 0, -1)]

    def metrics_at(self, job_id: str, version: int) -> dict[str, Any] | None:
        """The metrics recorded when `version` was committed (versions are committed in order)."""
        raw = self.r.lindex(keys.job_metrics(job_id), version - 1)
        if raw is None:
            return None
        m: dict[str, Any] = json.loads(raw)
        return m if m.get("version") == version else None

    def event(self, job_id: str, kind: str, **fields: Any) -> None:
        self.r.xadd(keys.job_events(job_id), _event_body(kind, fields), maxlen=EVENTS_MAXLEN, approximate=True)

    def events(self, job_id: str, count: int = 100) -> list[dict[str, str]]:
        out = []
        for eid, body in self.r.xrevrange(keys.job_events(job_id), count=count):
            out.append({"id": eid.decode(), **{k.decode(): v.decode() for k, v in body.items()}})
        return list(reversed(out))


def _event_body(kind: str, fields: dict[str, Any]) -> dict[str, str]:
    return {"kind": kind, "t": f"{time.time():.3f}", **{k: str(v) for k, v in fields.items()}}
