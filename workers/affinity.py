"""Shard-to-worker affinity: a shard's next task goes to the worker process that holds its state.

Top-k error feedback keeps each shard's residual (and DGC velocity), and local steps with a kept inner optimizer
(``inner_state="keep"``) its AdamW state, in the worker process that ran the shard last
(``workers/codec_state.py``). On the one shared ``shards`` queue a shard's next task lands on whichever worker is
free first, which continues from a stale state. So every shard worker also consumes a queue of its own
(``shards.<node name>``, ``workers/app.py``), and:

- a shard worker that keeps codec state after a task records in Redis (``keys.job_affinity``) that it holds the
  shard's state, for which data step, and which queue reaches it (``record``);
- the next round's shard tasks (sync) and each shard's next step (async) go to that queue while the worker's
  heartbeat lives (``routes``); otherwise to the shared queue, where any worker takes it (the fallback). A worker
  takes at most ceil(shards / live shard workers) of a job's shards this way: the others go to the shared queue,
  so a worker that holds every shard (it was alone for a while) hands some back and the load evens out;
- relaunches (the liveness monitor, an incomplete round's recompute) name no queue: shared;
- jobs without such state (``JobSpec.shard_state``) record nothing and route nothing: their tasks never touch a
  worker's own queue.

The liveness monitor reads the own queues of live workers too (``workers/liveness.py``): a task waiting there is
queued; a task in a dead worker's queue is not, and its slot is relaunched to the shared queue.

Nothing here changes what a task computes: it is a placement hint. Exactly-once and resume rest where they did
(guarded commits, deterministic shard work); a stale or lost record only sends a task where the state is not, as
the shared queue did. A worker of a prefork pool (several processes behind one node) gets its shards back on its
node, not always in the same process: run shard workers with ``--pool=solo`` (as GPU workers must anyway).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.spec import JobSpec
from storage import keys
from storage.leases import LeaseBook
from workers.app import node_of_affinity_queue, own_shard_queue
from workers.context import Context

AFFINITY_TTL_S = 7 * 24 * 3600  # renewed by every record; retention shortens it when the job ends
HEARTBEAT_QUEUE = "shard_queue"  # the heartbeat field naming a worker's own shard queue (workers/liveness.py)


@dataclass(frozen=True)
class Holder:
    """The worker process (``node/pid``, as its heartbeat names it) holding a shard's state after `step`."""

    worker: str
    queue: str
    step: int


def keeps_state(ctx: Context, spec: JobSpec) -> bool:
    """Whether the job's shards are routed to their workers: affinity on, and state a shard carries (a codec with
    error feedback, a kept inner optimizer state)."""
    return ctx.settings.shard_affinity and spec.shard_state


def identity() -> tuple[str, str] | None:
    """(worker, queue) of this process: its heartbeat's name and its own shard queue; None outside a shard worker
    that consumes one."""
    own = own_shard_queue()
    if own is None:
        return None
    node, queue = own
    return f"{node}/{os.getpid()}", queue  # the name liveness.agent_for heartbeats under


def record(ctx: Context, job_id: str, shard: int, step: int, *, local: bool | None,
           me: tuple[str, str] | None = None) -> None:
    """After the task at `step` kept the shard's codec state in this process: this worker (`me`, default
    ``identity()``) holds it. `local` says whether the task started from state this process held for exactly the
    previous step (None: the first step, nothing to hold); counted in the job (``state_local`` / ``state_moved``)
    to show how often shards moved."""
    me = me or identity()
    pipe = ctx.redis.pipeline()
    if local is not None:
        pipe.hincrby(keys.job(job_id), "state_local" if local else "state_moved", 1)
    if me is not None and ctx.settings.shard_affinity:
        # A redelivered older task must not take the record from the newer one's worker. Read, then write: a race
        # between two tasks of one shard leaves a record one of them wrote, and a stale record costs one move.
        old = ctx.redis.hget(keys.job_affinity(job_id), str(shard))
        try:
            old_step = int(json.loads(old)["step"]) if old is not None else -1
        except (ValueError, KeyError, TypeError):
            old_step = -1  # a malformed record is replaced, never fatal to the task
        if old_step <= step:
            pipe.hset(keys.job_affinity(job_id), str(shard), json.dumps({"worker": me[0], "queue": me[1],
                                                                         "step": step}))
            pipe.expire(keys.job_affinity(job_id), AFFINITY_TTL_S)
    pipe.execute()


def holders(ctx: Context, job_id: str) -> dict[int, Holder]:
    """Every recorded holder of the job's shards (a malformed entry is skipped: it is a hint)."""
    out = {}
    for k, v in ctx.redis.hgetall(keys.job_affinity(job_id)).items():
        try:
            e = json.loads(v)
            out[int(k)] = Holder(str(e["worker"]), str(e["queue"]), int(e["step"]))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def live_queues(alive: Mapping[str, Mapping[str, Any]]) -> set[str]:
    """The own shard queues of the live workers (heartbeats from ``LeaseBook.workers``); a heartbeat naming any other
    queue (``aggregate``, say) is ignored: a hint in Redis never sends shard work elsewhere."""
    return {q for info in alive.values() if node_of_affinity_queue(q := str(info.get(HEARTBEAT_QUEUE) or ""))}


def plan(held: Mapping[int, Holder], alive: Mapping[str, Mapping[str, Any]], shards: int) -> dict[int, str]:
    """Shard → the queue of the live worker holding its state; a shard missing here goes to the shared queue.
    A holder is live while its heartbeat is (the same process: a restarted worker holds nothing). A worker gets at
    most ceil(shards / live shard workers) shards, lowest shard first; the rest go to the shared queue."""
    queues = live_queues(alive)
    if not queues:
        return {}
    cap = math.ceil(shards / len(queues))
    load: Counter[str] = Counter()
    out = {}
    for s in range(shards):
        h = held.get(s)
        if h is None or h.queue not in queues or alive.get(h.worker, {}).get(HEARTBEAT_QUEUE) != h.queue \
                or load[h.queue] >= cap:
            continue
        load[h.queue] += 1
        out[s] = h.queue
    return out


def routes(ctx: Context, job_id: str, spec: JobSpec) -> dict[int, str]:
    """Where the job's next shard tasks go: shard → a worker's own queue (absent: the shared queue)."""
    if not keeps_state(ctx, spec):
        return {}
    held = holders(ctx, job_id)
    if not held:
        return {}
    return plan(held, LeaseBook(ctx.redis, ctx.settings.lease_ttl_s).workers(), spec.shards)
