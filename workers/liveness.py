"""Liveness: every worker heartbeats and leases the task it runs; a monitor relaunches the work that is missing.

``WorkerAgent`` (one per worker process) renews, every ``heartbeat_interval_s``, the process's heartbeat and the
lease of each task it runs (``storage/leases.py``), and ends the process (``os._exit``) when a task runs past
its hard limit, on any pool, solo included: the supervisor (compose ``restart``, systemd, ``celery multi``)
starts a new one. A SIGKILLed or SIGSTOPped worker renews nothing, so its lease expires after ``lease_ttl_s``.

``sweep`` (the monitor; one process at a time under a Redis lock, every ``liveness_interval_s``) looks at each
running job's *slots*: the pieces of work the job needs next (a sync round's missing shards, then its
aggregation; each async shard's next data step). A slot is alive while a task for it holds a lease or waits in
the broker's queues: the shared ones, and the own shard queue of each live worker (``workers/affinity.py``; a
task waiting in a dead worker's queue is not queued). A slot whose lease was lost (worker dead or hung) is
relaunched at once; a slot that is neither done, queued nor leased (kombu's Redis transport lost its message
between BRPOP and the unacked record, a round's aggregation was never sent, or the message waits in a dead
worker's own queue) is relaunched once it has stayed so for ``relaunch_grace_s``. Relaunches go to the shared
queues. Only the missing slots are relaunched; duplicates are harmless by design (deterministic shard work, guarded
commits). A slot whose worker died ``max_deliveries`` times is a poison message: the job fails, naming it.

The sweep also notices that Redis lost its state (its epoch key is gone) and rebuilds the jobs that were
running from the object store (``ops/live-jobs.json``, the job records and checkpoints).

The stall watchdog in ``workers/lifecycle.py`` stays as the last resort.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import redis

from pipeline.spec import JobSpec
from pipeline.stop_rule import is_finished
from storage import keys
from storage.jobstate import TERMINAL, JobNotFound, JobState
from storage.leases import LeaseBook
from storage.objectstore import ObjectNotFound, StoreError
from workers.affinity import HEARTBEAT_QUEUE, live_queues
from workers.app import (
    QUEUE_AGGREGATE,
    QUEUE_PUBLISH,
    QUEUE_SHARDS,
    QUEUES,
    TASK_AGGREGATE,
    TASK_AGGREGATE_PART,
    TASK_APPLY_UPDATE,
    TASK_PUBLISH,
    TASK_TRAIN_SHARD,
    own_shard_queue,
)
from workers.context import Context
from workers.lifecycle import NEWEST, async_steps, next_attempt, progress_of, relaunch
from workers.staging import rebuild_job

log = logging.getLogger(__name__)

EXIT_HUNG = 75  # the worker's exit status after ending a hung task (EX_TEMPFAIL: the supervisor restarts it)
PROBE_MAX_MESSAGES = 10_000  # per queue: past this, a queue only says "busy" (like RabbitMQ's count)
REDIS_PRIORITY_SEP, REDIS_PRIORITY_STEPS = "\x06\x16", (3, 6, 9)  # kombu's sibling lists of a prioritised queue


def book_of(ctx: Context) -> LeaseBook:
    return LeaseBook(ctx.redis, ctx.settings.lease_ttl_s)


# ---------------------------------------------------------------- the worker side


@dataclass
class _Running:
    job_id: str
    what: str
    t0: float  # monotonic


class WorkerAgent:
    """Heartbeat, lease renewal and the hard time limit of one worker process (a daemon thread)."""

    def __init__(self, book: LeaseBook, worker: str, *, interval_s: float, hard_limit_s: float,
                 on_hung: Callable[[str, str, float], None] | None = None,
                 exit_fn: Callable[[int], Any] = os._exit, clock: Callable[[], float] = time.monotonic) -> None:
        self.book = book
        self.worker = worker
        self.interval_s = interval_s
        self.hard_limit_s = hard_limit_s
        self.on_hung = on_hung
        self.exit_fn = exit_fn
        self.clock = clock
        self.running: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.started = time.time()

    def begin(self, job_id: str, task_id: str, slot: str, what: str, *,
              then: Callable[[Any], Any] | None = None) -> list[Any]:
        """Lease the task's slot; `then(pipe)`: more commands in the same round trip (their replies returned)."""
        with self._lock:
            self.running[task_id] = _Running(job_id, what, self.clock())
        return self.book.acquire(job_id, task_id, slot, self.worker, what, then=then)

    def end(self, job_id: str, task_id: str) -> None:
        with self._lock:
            self.running.pop(task_id, None)
        self.book.release(job_id, task_id)

    def hold(self, job_id: str, task_id: str, hold_s: float) -> None:
        """The task will run again after `hold_s` (a retry's countdown), from this worker's memory."""
        with self._lock:
            self.running.pop(task_id, None)
        self.book.hold(job_id, task_id, hold_s)

    def tick(self) -> None:
        """One heartbeat: report, renew every lease, end the process if a task ran past the hard limit."""
        with self._lock:
            running = dict(self.running)
        now = self.clock()
        own = own_shard_queue()  # where the tasks of the shards whose state this process holds are sent
        self.book.heartbeat(self.worker, {"host": socket.gethostname(), "pid": os.getpid(), "since": self.started,
                                          **({HEARTBEAT_QUEUE: own[1]} if own else {}),
                                          "tasks": [{"what": r.what, "job": r.job_id, "running_s": round(now - r.t0, 1)}
                                                    for r in running.values()]})
        self.book.renew(running)
        hung = [(t, r) for t, r in running.items() if now - r.t0 > self.hard_limit_s]
        if hung:
            self._end_hung(hung, now)

    def _end_hung(self, hung: list[tuple[str, _Running]], now: float) -> None:
        for task_id, r in hung:
            log.error("%s: running for %.0f s, past the hard limit of %.0f s: ending this worker process so its "
                      "supervisor restarts it", r.what, now - r.t0, self.hard_limit_s)
            try:
                self.book.mark_hung(r.job_id, task_id)
                if self.on_hung is not None:
                    self.on_hung(r.job_id, r.what, now - r.t0)
            except Exception:  # noqa: BLE001 - Redis down: the lease expires by itself
                log.warning("could not record the hung task", exc_info=True)
        try:
            self.book.drop_worker(self.worker)
        except Exception:  # noqa: BLE001
            pass
        self.exit_fn(EXIT_HUNG)

    def start(self) -> WorkerAgent:
        def loop() -> None:
            while True:
                try:
                    self.tick()
                except Exception:  # noqa: BLE001 - Redis unreachable: try again next beat
                    log.warning("heartbeat failed", exc_info=True)
                time.sleep(self.interval_s)

        self._thread = threading.Thread(target=loop, name="aas-heartbeat", daemon=True)
        self._thread.start()
        return self


_agent: WorkerAgent | None = None
_agent_pid = 0
_agent_lock = threading.Lock()


def agent_for(ctx: Context, hostname: str | None = None) -> WorkerAgent:
    """This process's agent, started on first use (a prefork child gets its own after the fork)."""
    global _agent, _agent_pid
    with _agent_lock:
        if _agent is None or _agent_pid != os.getpid():
            s = ctx.settings
            worker = f"{hostname or socket.gethostname()}/{os.getpid()}"

            def on_hung(job_id: str, what: str, running_s: float) -> None:
                ctx.jobs.event(job_id, "hung", task=what, worker=worker, running_s=round(running_s, 1),
                               reason=f"past the hard limit of {s.task_time_limit_s + s.hard_exit_grace_s:.0f} s; "
                                      "worker process ended")

            _agent = WorkerAgent(book_of(ctx), worker, interval_s=s.heartbeat_interval_s,
                                 hard_limit_s=s.task_time_limit_s + s.hard_exit_grace_s, on_hung=on_hung).start()
            _agent_pid = os.getpid()
        return _agent


def shard_finished(ctx: Context, job_id: str, shard: int, version: int, attempt: int,
                   result: dict[str, Any] | None = None) -> None:
    """Record a sync shard's blob as done, with its task's `result`: the round's fan-in. The shard that completes
    the round sends its aggregation, which reads the round's results from there (a Celery chord would cost a
    result write and a chord counter per shard, a chord setup per round, and a message carrying every result,
    for the count kept here anyway). A relaunched shard sends it too when the round is complete (it may be
    recomputing a rejected blob: the round was complete before it); an aggregation sent twice commits once. A
    process that dies between the record and the send leaves a complete round without an aggregation: the
    monitor relaunches it (``needed_slots``)."""
    if version < 0:
        return  # async: progress is the job's own record
    # The job is read in the same round trip (one per shard task, on the round's critical path).
    n, added, raw = book_of(ctx).mark_done(job_id, version, shard, result=result,
                                           then=lambda pipe: pipe.hgetall(keys.job(job_id)))
    try:
        job = ctx.jobs.parse(job_id, raw)
    except JobNotFound:
        return
    spec = JobSpec.model_validate(job.spec)
    relaunched = attempt > 0 or job.fields.get("relaunched_round") == str(version)
    completes = (added and n == spec.shards) or (relaunched and n >= spec.shards)
    if completes and job.status == "running" and job.version == version:
        ctx.dispatch.aggregate(job_id, version)


# ---------------------------------------------------------------- what the broker holds


def slot_of_message(task: str, args: list[Any], kwargs: dict[str, Any]) -> tuple[str, str] | None:
    """(job, slot) of a queued task message; None for messages of no job slot."""
    try:
        if task == TASK_TRAIN_SHARD:
            # shard_signature sends named arguments (readable in Flower); older messages are positional.
            fields = ("job_id", "shard_id", "version", "step")
            named = kwargs if "job_id" in kwargs else dict(zip(fields, args, strict=False))
            job_id, shard = str(named["job_id"]), int(named["shard_id"])
            version, step = int(named["version"]), int(named["step"])
            return job_id, keys.slot_shard(version, shard) if version >= 0 else keys.slot_step(shard, step)
        if task == TASK_AGGREGATE:
            if "job_id" in kwargs:
                return str(kwargs["job_id"]), keys.slot_aggregate(int(kwargs["version"]))
            return str(args[1]), keys.slot_aggregate(int(args[2]))
        if task == TASK_AGGREGATE_PART:
            return str(kwargs["job_id"]), keys.slot_aggregate(int(kwargs["version"]))
        if task == TASK_PUBLISH:
            if "job_id" in kwargs:
                return str(kwargs["job_id"]), keys.slot_publish(int(kwargs["version"]))
            return str(args[0]), keys.slot_publish(int(args[1]))
        if task == TASK_APPLY_UPDATE:
            result = args[0]
            job_id = str(kwargs["job_id"]) if "job_id" in kwargs else str(args[1])
            return job_id, keys.slot_step(int(result["shard"]), int(result["step"]))
    except (IndexError, KeyError, TypeError, ValueError):
        return None
    return None


def queue_of(slot: str) -> str:
    kind = keys.parse_slot(slot).kind
    return QUEUE_SHARDS if kind == "shard" else QUEUE_PUBLISH if kind == "publish" else QUEUE_AGGREGATE


ExtraQueues = Callable[[], Iterable[str]]  # the own shard queues of the live workers, asked at each snapshot


@dataclass
class Queued:
    """What the broker holds at one moment: exact slots where the broker can be read (Redis), else only which
    queues have messages waiting (RabbitMQ: a message there may be any job's)."""

    slots: set[tuple[str, str]] = field(default_factory=set)
    busy: set[str] = field(default_factory=set)  # queues whose messages could not be read one by one
    depths: dict[str, int] = field(default_factory=dict)

    def holds(self, job_id: str, slot: str) -> bool:
        if (job_id, slot) in self.slots:
            return True
        kind = keys.parse_slot(slot).kind
        # An async step is a shard task first, then the application of its result on the aggregate queue.
        queues = {QUEUE_SHARDS, QUEUE_AGGREGATE} if kind == "step" else {queue_of(slot)}
        return bool(queues & self.busy)


class RedisProbe:
    """Reads kombu's Redis lists: every waiting message, parsed to its job and slot; `shard_queues` names the
    live workers' own shard queues, read too (a busy one counts as a busy ``shards``)."""

    def __init__(self, r: redis.Redis, queues: Iterable[str] = QUEUES, shard_queues: ExtraQueues | None = None
                 ) -> None:
        self.r = r
        self.queues = tuple(queues)
        self.shard_queues = shard_queues

    def _lists(self, q: str) -> list[str]:
        return [q] + [f"{q}{REDIS_PRIORITY_SEP}{p}" for p in REDIS_PRIORITY_STEPS]

    def depths(self, queues: Iterable[str] | None = None) -> dict[str, int]:
        names = tuple(self.queues if queues is None else queues)
        pipe = self.r.pipeline()
        for q in names:
            for name in self._lists(q):
                pipe.llen(name)
        counts = pipe.execute()
        per = 1 + len(REDIS_PRIORITY_STEPS)
        return {q: int(sum(counts[i * per:(i + 1) * per])) for i, q in enumerate(names)}

    def snapshot(self) -> Queued:
        own = sorted(set(self.shard_queues()) - set(self.queues)) if self.shard_queues else []
        out = Queued(depths=self.depths([*self.queues, *own]))
        for q in [*self.queues, *own]:
            if out.depths[q] > PROBE_MAX_MESSAGES:
                out.busy.add(QUEUE_SHARDS if q in own else q)
                continue
            for name in self._lists(q):
                for raw in self.r.lrange(name, 0, -1):
                    hit = parse_redis_message(raw)
                    if hit is not None:
                        out.slots.add(hit)
        return out


def parse_redis_message(raw: bytes) -> tuple[str, str] | None:
    """A kombu Redis message (JSON envelope, base64 JSON body [args, kwargs, embed]) → (job, slot)."""
    try:
        msg = json.loads(raw)
        task = str(msg["headers"]["task"])
        body = msg["body"]
        if msg.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, kwargs = json.loads(body)[:2]
    except (ValueError, KeyError, TypeError):
        return None
    return slot_of_message(task, list(args), dict(kwargs))


class RabbitProbe:
    """RabbitMQ: the number of ready messages per queue (a passive declare); messages are never read. A message in
    a live worker's own shard queue (`shard_queues`) makes ``shards`` busy."""

    def __init__(self, broker_url: str, queues: Iterable[str] = QUEUES, shard_queues: ExtraQueues | None = None
                 ) -> None:
        self.url = broker_url
        self.queues = tuple(queues)
        self.shard_queues = shard_queues
        self._conn: Any = None

    def depths(self, queues: Iterable[str] | None = None) -> dict[str, int]:
        from kombu import Connection

        names = tuple(self.queues if queues is None else queues)
        out = {}
        for attempt in range(2):
            try:
                if self._conn is None:
                    self._conn = Connection(self.url, connect_timeout=3)
                    self._conn.connect()
                for q in names:
                    ch = self._conn.channel()
                    try:
                        out[q] = int(ch.queue_declare(queue=q, passive=True).message_count)
                    except Exception:  # noqa: BLE001 - not declared yet (no worker has started): empty
                        out[q] = 0
                    finally:
                        try:
                            ch.close()
                        except Exception:  # noqa: BLE001 - a failed passive declare already closed it
                            pass
                return out
            except Exception:
                self.close()
                if attempt:
                    raise
        return out

    def snapshot(self) -> Queued:
        own = sorted(set(self.shard_queues()) - set(self.queues)) if self.shard_queues else []
        depths = self.depths([*self.queues, *own])
        return Queued(busy={QUEUE_SHARDS if q in own else q for q, n in depths.items() if n > 0}, depths=depths)

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.release()
            except Exception:  # noqa: BLE001
                pass
        self._conn = None


def shard_queues_of(ctx: Context) -> ExtraQueues | None:
    """The own shard queues of the live workers, from their heartbeats (None with affinity off: none exist)."""
    if not ctx.settings.shard_affinity:
        return None
    return lambda: live_queues(book_of(ctx).workers())


def probe_for(ctx: Context) -> RedisProbe | RabbitProbe:
    s = ctx.settings
    own = shard_queues_of(ctx)
    if s.broker_kind() == "rabbitmq":
        return RabbitProbe(s.broker(), shard_queues=own)
    if s.broker() == s.redis_url:
        return RedisProbe(ctx.redis, shard_queues=own)
    return RedisProbe(redis.Redis.from_url(s.broker(), socket_connect_timeout=3, socket_timeout=10), shard_queues=own)


# ---------------------------------------------------------------- the monitor


@dataclass(frozen=True)
class Action:
    job_id: str
    kind: str  # "relaunch" | "failed" | "resumed"
    slot: str
    reason: str


def needed_slots(ctx: Context, book: LeaseBook, job: JobState, spec: JobSpec) -> list[str]:
    """The work the job needs next: the evaluation of its last version once it has no more rounds to run;
    sync, the round's shards not yet done, else its aggregation; async, each shard's next data step."""
    if job.version > 0 and is_finished(progress_of(ctx, job, spec)):
        evaluated = int(job.fields.get("evaluated_version", 0))
        return [] if evaluated >= job.version else [keys.slot_publish(job.version)]
    if spec.mode == "async":
        return [keys.slot_step(s, step) for s, step in async_steps(ctx, job, spec)]
    done = book.done(job.job_id, job.version)
    missing = [keys.slot_shard(job.version, s) for s in range(spec.shards) if s not in done]
    return missing or [keys.slot_aggregate(job.version)]


def relaunch_slot(ctx: Context, job: JobState, spec: JobSpec, slot: str) -> None:
    """Enqueue exactly this slot's work again."""
    s = keys.parse_slot(slot)
    n = int(ctx.redis.hincrby(keys.job(job.job_id), "relaunches", 1))
    if s.kind == "shard":
        ctx.jobs.set_fields(job.job_id, relaunched_round=s.version)
        ctx.dispatch.shard(job.job_id, s.shard, s.version, s.version * spec.local_steps, n, apply=False)
    elif s.kind == "aggregate":
        ctx.dispatch.aggregate(job.job_id, s.version)
    elif s.kind == "publish":
        ctx.dispatch.publish(job.job_id, s.version)
    else:
        ctx.dispatch.shard(job.job_id, s.shard, NEWEST, s.step, next_attempt(ctx, job.job_id, s.shard), apply=True)


def check_job(ctx: Context, book: LeaseBook, queued: Queued, job: JobState, now: float) -> list[Action]:
    """Reap the job's lost leases (failing it on a poison message), then relaunch its orphaned slots."""
    spec = JobSpec.model_validate(job.spec)
    job_id = job.job_id
    lost = book.reap(job_id)
    for lease, n in lost:
        cause = "ran past its hard time limit" if lease.state == "hung" else "died or stopped"
        ctx.jobs.event(job_id, "lease_lost", task=lease.what, slot=lease.slot, worker=lease.worker, times=n,
                       reason=f"worker {cause} while running it")
        if n >= ctx.settings.max_deliveries:
            reason = (f"{lease.what}: its worker {cause} while running it, {n} times: a poison message "
                      f"(max_deliveries {ctx.settings.max_deliveries})")
            log.error("job %s failed: %s", job_id, reason)
            ctx.jobs.set_status(job_id, "failed", error=reason)
            return [Action(job_id, "failed", lease.slot, reason)]
    lost_slots = {lease.slot: lease for lease, _ in lost}
    held = {lease.slot for lease in book.leases(job_id) if lease.alive}
    grace = ctx.settings.relaunch_grace_s
    actions, orphans = [], set()
    for slot in needed_slots(ctx, book, job, spec):
        if slot in held or queued.holds(job_id, slot):
            continue
        since = book.orphaned_since(job_id, slot, now)
        if slot in lost_slots:
            gone = lost_slots[slot]
            reason = f"lease lost: {gone.what} on {gone.worker} ({gone.state})"
        elif now - since >= grace:
            reason = f"neither done, queued nor leased for {now - since:.1f} s (message lost)"
        else:
            orphans.add(slot)
            continue
        relaunch_slot(ctx, job, spec, slot)
        ctx.jobs.event(job_id, "relaunch", slot=slot, version=job.version, reason=reason)
        log.warning("job %s: relaunched %s: %s", job_id, slot, reason)
        actions.append(Action(job_id, "relaunch", slot, reason))
    book.keep_orphans(job_id, orphans)
    return actions


def recover_lost_state(ctx: Context, now: float) -> list[Action] | None:
    """After Redis lost its state, rebuild and relaunch the jobs that were running. None: another process is
    doing it (skip this sweep)."""
    if ctx.redis.exists(keys.liveness_epoch()):
        return []
    if not ctx.redis.set(keys.liveness_recovering(), os.getpid(), nx=True, ex=120):
        return None
    actions = []
    try:
        for job_id in _read_live_jobs(ctx):
            try:
                ctx.jobs.get(job_id)
                continue  # Redis still knows it
            except JobNotFound:
                pass
            try:
                rebuild_job(ctx, job_id)
            except JobNotFound:
                continue
            ctx.redis.hset(keys.job(job_id), mapping={"status": "running", "error": ""})
            relaunch(ctx, job_id)
            reason = "Redis lost the job's state: rebuilt from its record and newest checkpoint"
            ctx.jobs.event(job_id, "resumed", version=ctx.jobs.get(job_id).version, reason=reason)
            log.warning("job %s: %s", job_id, reason)
            actions.append(Action(job_id, "resumed", "", reason))
        ctx.redis.set(keys.liveness_epoch(), repr(now))
    finally:
        ctx.redis.delete(keys.liveness_recovering())
    return actions


def _read_live_jobs(ctx: Context) -> list[str]:
    """The jobs running when Redis lost its state: the monitor's last list, and the markers of jobs submitted
    since (or whose end nobody has seen yet)."""
    try:
        listed = [str(j) for j in json.loads(ctx.store.get(keys.live_jobs()))]
    except ObjectNotFound:
        listed = []
    return sorted(set(listed) | set(_live_markers(ctx)))


def _live_markers(ctx: Context) -> list[str]:
    prefix = keys.live_marker_prefix()
    return [k[len(prefix):] for k in ctx.store.list(prefix) if "/" not in k[len(prefix):]]


def _drop_ended_markers(ctx: Context, running: list[str]) -> None:
    """Remove the markers of jobs Redis says have ended. A marker Redis knows nothing of stays: its job may be
    being submitted right now (the marker is written first)."""
    for job_id in _live_markers(ctx):
        if job_id in running:
            continue
        try:
            ended = ctx.jobs.get(job_id).status in TERMINAL
        except JobNotFound:
            continue
        if ended:
            ctx.store.delete(keys.live_marker(job_id))


_mirrored: list[str] | None = None


def _mirror_live_jobs(ctx: Context, running: list[str]) -> None:
    """Keep the store's list of running jobs current (one PUT per change, not per sweep)."""
    global _mirrored
    running = sorted(running)
    if running == _mirrored:
        return
    try:
        ctx.store.put(keys.live_jobs(), json.dumps(running).encode())
        _drop_ended_markers(ctx, running)
        _mirrored = running
    except StoreError:
        log.warning("could not record the running jobs in the store", exc_info=True)


def sweep(ctx: Context, probe: RedisProbe | RabbitProbe, *, now: float | None = None) -> list[Action]:
    """One pass of the monitor over every running job; returns what it did."""
    now = time.time() if now is None else now
    recovered = recover_lost_state(ctx, now)
    if recovered is None:
        return []
    book = book_of(ctx)
    queued = probe.snapshot()
    actions, running = list(recovered), []
    for job_id in ctx.jobs.list(limit=1000):
        try:
            job = ctx.jobs.get(job_id)
        except JobNotFound:
            continue
        if job.status != "running":
            continue
        running.append(job_id)
        try:
            actions += check_job(ctx, book, queued, job, now)
        except Exception:  # noqa: BLE001 - one bad job must not stop the others' liveness
            log.exception("liveness check of job %s failed", job_id)
    _mirror_live_jobs(ctx, running)
    return actions


def start_monitor(ctx: Context) -> threading.Thread | None:
    """Sweep every `liveness_interval_s` from this process; a Redis lock lets one process sweep per interval."""
    interval = ctx.settings.liveness_interval_s
    if interval <= 0:
        return None
    token = uuid.uuid4().hex

    def loop() -> None:
        probe = None
        while True:
            time.sleep(interval)
            try:
                # Expires by itself if this process dies mid-sweep; a slow sweep overlapping the next is harmless.
                if not ctx.redis.set(keys.liveness_lock(), token, nx=True, px=int(max(3.0, 3 * interval) * 1000)):
                    continue
                t0 = time.monotonic()
                probe = probe or probe_for(ctx)
                sweep(ctx, probe)
                # Hold the lock for the rest of the interval: at most one sweep per interval, fleet-wide.
                left_ms = int(max(0.001, interval - (time.monotonic() - t0)) * 1000)
                if ctx.redis.get(keys.liveness_lock()) == token.encode():
                    ctx.redis.pexpire(keys.liveness_lock(), left_ms)
            except Exception:  # noqa: BLE001 - Redis or the broker down: try again next interval
                log.warning("liveness sweep failed", exc_info=True)
                if isinstance(probe, RabbitProbe):
                    probe.close()
                probe = None

    t = threading.Thread(target=loop, name="aas-liveness", daemon=True)
    t.start()
    return t
