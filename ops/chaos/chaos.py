"""Chaos run: sync-mode digits jobs on real services while a seeded schedule breaks things.

    ops/chaos/run [--broker redis|rabbitmq] [--faults N] [--minutes M] [--seed S] [--json FILE] [--quick]

The cluster (``Cluster``) is its own: a ``redis-server`` subprocess it can restart (state lost), moto's
S3 server behind a TCP proxy (``proxy.TcpProxy``) so the store can be unreachable without losing its
objects, and real ``celery worker`` processes. Faults (``KINDS``): SIGKILL of shard workers and of the
aggregator (a replacement starts at once), the store unreachable for a while, Redis restarted mid-job
(the job is resumed with ``Client.resume``, which rebuilds it from the object store), a shard worker
stopped (SIGSTOP) for longer than the visibility timeout and then continued, and a second aggregator
racing the first on the same round, and user code that never returns (a fault point armed for one
task: the worker's hard time limit ends it). Liveness, the poison cap and the rest are the defaults; only
the run's own timeouts (visibility timeout, task time limit) are shortened. Each fault is timed from its
injection to the job's next committed version. Every job is checked (``audit``) against the exactly-once contract
and against a fault-free run of the same spec: weights equal within 1e-6.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
for p in (str(REPO), str(Path(__file__).resolve().parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

from proxy import TcpProxy  # noqa: E402

from pipeline.client.processes import MotoS3Server, ProcessGroup, free_port, worker_argv  # noqa: E402
from storage import keys  # noqa: E402
from workers.app import QUEUE_AGGREGATE, QUEUE_SHARDS  # noqa: E402

KINDS = ("shard_kill", "aggregator_kill", "store_pause", "redis_restart", "hang", "user_hang", "two_aggregators")
HANG_POINT = "shard.before_upload"  # where a user_hang fault makes one shard task sleep forever
RABBITMQ_URL = os.environ.get("AAS_CHAOS_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672/aas-chaos")
BUCKET = "chaos"
ACCESS, SECRET = "chaos-access", "chaos-secret"


class RedisServer:
    """``redis-server`` on a loopback port, no persistence: ``restart()`` loses every key."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait(lambda: _redis_ping(self.url), 15, "redis-server")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def _redis_ping(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def _http_ok(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1)
        return True
    except OSError:
        return False


def _wait(ok: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ok():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not come up within {timeout_s} s")


@dataclass
class Cluster:
    """Redis (its own, or `redis_url`), moto behind a proxy, and named shard and aggregator workers."""

    workdir: Path
    redis_url: str | None = None  # None: start (and own) a redis-server, which makes redis_restart possible
    visibility_timeout_s: int = 6
    slow_factor: float = 3.0  # stretches shard compute (a sleep), so a kill or a stop lands mid-task
    watchdog_stall_s: float | None = None  # the last-resort watchdog (None: its default, VT + time limit)
    task_time_limit_s: int = 20  # a hung task ends its worker at this + AAS_HARD_EXIT_GRACE_S (5 s)
    broker_url: str | None = None  # None: Redis is the broker too
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.redis = RedisServer(self.workdir / "redis") if self.redis_url is None else None
        self.moto = MotoS3Server()
        self.proxy: TcpProxy | None = None
        self.group: ProcessGroup | None = None
        self.roles: dict[str, str] = {}  # worker name → "shard" | "aggregate"
        self.stopped: set[str] = set()  # workers we have SIGSTOPped
        self._n = 0

    # ------------------------------------------------------------ lifecycle

    def start(self, shard_workers: int = 2, aggregators: int = 1) -> Cluster:
        if self.redis is not None:
            self.redis.start()
            self.redis_url = self.redis.url
        self.moto.start()
        self.proxy = TcpProxy(("127.0.0.1", self.moto.port)).start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AAS_")}
        env.update(self.worker_env())
        self.group = ProcessGroup(env=env, cwd=REPO, logdir=self.workdir / "logs")
        for _ in range(shard_workers):
            self.start_worker("shard")
        for _ in range(aggregators):
            self.start_worker("aggregate")
        return self

    def close(self) -> None:
        if self.group is not None:
            for name in self.stopped:
                self.signal(name, signal.SIGCONT)
            self.group.close()
        if self.proxy is not None:
            self.proxy.close()
        self.moto.stop()
        if self.redis is not None:
            self.redis.stop()

    def worker_env(self) -> dict[str, str]:
        assert self.proxy is not None
        return {
            "PYTHONPATH": str(REPO), "AAS_REDIS_URL": str(self.redis_url), "AAS_S3_ENDPOINT": self.proxy.endpoint,
            "AAS_S3_ACCESS_KEY": ACCESS, "AAS_S3_SECRET_KEY": SECRET, "AAS_S3_BUCKET": BUCKET, "AAS_DEVICE": "cpu",
            "AAS_INSECURE_DEV": "1",  # a fault-injection run on loopback: unsigned on purpose
            "AAS_VISIBILITY_TIMEOUT_S": str(self.visibility_timeout_s), "AAS_RETRY_BACKOFF_S": "0.5",
            # Retries outlast the longest store outage (30 s): 0.5+1+2+4+4+... s over 25 tries.
            "AAS_RETRY_BACKOFF_MAX_S": "4", "AAS_TASK_MAX_RETRIES": "25", "AAS_TORCH_THREADS": "1",
            "AAS_TASK_TIME_LIMIT_S": str(self.task_time_limit_s),
            **({"AAS_WATCHDOG_STALL_S": str(self.watchdog_stall_s)} if self.watchdog_stall_s else {}),
            **({"AAS_BROKER_URL": self.broker_url} if self.broker_url else {}),
            **self.extra_env,
        }  # fmt: skip

    def settings(self) -> Any:
        """Settings for the driver: Redis as the workers see it, the store *directly* (never through the proxy)."""
        from pipeline.settings import Settings

        return Settings(_env_file=None, redis_url=str(self.redis_url), s3_endpoint=self.moto.endpoint,
                        s3_access_key=ACCESS, s3_secret_key=SECRET, s3_bucket=BUCKET,
                        visibility_timeout_s=self.visibility_timeout_s, broker_url=self.broker_url,
                        task_time_limit_s=self.task_time_limit_s, insecure_dev=True)  # as the workers run

    def client(self) -> Any:
        from pipeline.client import Client

        return Client(self.settings())

    # ------------------------------------------------------------ workers

    def start_worker(self, role: str) -> str:
        assert self.group is not None
        name = f"{'shard' if role == 'shard' else 'agg'}-{self._n}"
        self._n += 1
        extra = {"AAS_SLOW_FACTOR": str(self.slow_factor), "AAS_FAULTS": f"{HANG_POINT}=hang-armed"} \
            if role == "shard" else {}
        self.group.start(name, worker_argv(name, QUEUE_AGGREGATE if role == "aggregate" else QUEUE_SHARDS), extra)
        self.roles[name] = role
        return name

    def live(self, role: str) -> list[str]:
        assert self.group is not None
        return sorted(n for n, r in self.roles.items() if r == role and self.group.procs[n].poll() is None)

    def signal(self, name: str, sig: int) -> None:
        assert self.group is not None
        self.group.kill(name, sig)
        if sig == signal.SIGSTOP:
            self.stopped.add(name)
        elif sig == signal.SIGCONT:
            self.stopped.discard(name)

    def kill(self, name: str) -> str:
        """SIGKILL one worker (no cleanup, no ack) and start a replacement in the same role."""
        self.signal(name, signal.SIGKILL)
        self.stopped.discard(name)
        return self.start_worker(self.roles.pop(name))

    def stop_worker(self, name: str) -> None:
        self.signal(name, signal.SIGTERM)
        self.roles.pop(name, None)

    def respawn_dead(self) -> list[tuple[str, int]]:
        """Replace workers that exited on their own (a supervisor's job); returns their names and exit codes.
        A worker that ended a hung task exits with liveness.EXIT_HUNG."""
        assert self.group is not None
        dead = [(n, int(self.group.procs[n].returncode)) for n in self.roles if self.group.procs[n].poll() is not None]
        for n, _ in dead:
            self.start_worker(self.roles.pop(n))
        return dead

    def ready(self, role: str) -> list[str]:
        """Workers of `role` whose heartbeat is in Redis (started, not stopped, not dead)."""
        from storage.leases import LeaseBook

        try:
            beating = {w.split("@", 1)[0] for w in LeaseBook(self.client().redis, 1.0).workers()}
        except Exception:  # noqa: BLE001 - Redis restarting
            return []
        return [n for n in self.live(role) if n in beating and n not in self.stopped]

    def wait_ready(self, timeout_s: float = 90) -> None:
        from pipeline.client.processes import wait_for_workers
        from workers.app import app_for

        wait_for_workers(app_for(self.settings()), sorted(self.roles), timeout_s=timeout_s)


# ---------------------------------------------------------------- the schedule


@dataclass(frozen=True)
class Fault:
    at_version: int  # fire once the job has committed this version ...
    delay_s: float  # ... and this much later (lands inside the next round's shard tasks)
    kind: str
    duration_s: float = 0.0  # store_pause, hang
    pick: int = 0  # which live worker (index modulo the live count)


def plan(rng: random.Random, kinds: list[str], rounds: int, *, pause_s: tuple[float, float] = (10, 30),
         hang_s: tuple[float, float] = (10, 14)) -> list[Fault]:
    """Faults at distinct versions spread over the job (never at its last round: the job must see them)."""
    slots = list(range(1, max(2, rounds - 1)))
    at = sorted(rng.sample(slots, min(len(kinds), len(slots))))
    faults = []
    for v, kind in zip(at, kinds, strict=False):
        span = pause_s if kind == "store_pause" else hang_s if kind == "hang" else (0.0, 0.0)
        faults.append(Fault(v, round(rng.uniform(0.0, 0.4), 3), kind, round(rng.uniform(*span), 1),
                            pick=rng.randrange(1 << 16)))
    return faults


MIX = {"aggregator_kill": 0.1, "hang": 0.1, "user_hang": 0.08, "store_pause": 0.05, "redis_restart": 0.05,
       "two_aggregators": 0.05}  # the rest: shard kills, the common failure


def job_kinds(rng: random.Random, index: int, per_job: int, allowed: tuple[str, ...]) -> list[str]:
    """Shard kills dominate; every other kind in its share of the job's faults (at least one each, in turn)."""
    kinds = []
    for i, (k, share) in enumerate(MIX.items()):
        if k in allowed:
            n = round(share * per_job)
            kinds += [k] * (n if n else int((index + i) % round(1 / share) == 0))
    rng.shuffle(kinds)
    kinds = kinds[:per_job]
    kinds += ["shard_kill"] * (per_job - len(kinds)) if "shard_kill" in allowed else []
    rng.shuffle(kinds)
    return kinds


# ---------------------------------------------------------------- one job under faults


@dataclass
class JobRun:
    """Submit one job, fire its faults as it reaches their versions, track what every version consumed."""

    cluster: Cluster
    client: Any
    spec: dict[str, Any]
    faults: list[Fault]
    timeout_s: float = 300.0
    injected: list[dict[str, Any]] = field(default_factory=list)
    consumed: dict[int, set[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    resumes: int = 0
    stalls: int = 0
    stall_s: float = 60.0  # a backstop: the workers' watchdog should have relaunched a stalled round by then
    watchdog: int = 0  # relaunches by the workers' watchdog (events "watchdog")
    # False (the chaos run): a fault whose moment comes once the job has its last version is not fired (no next
    # version to time it by). True (tests of a few rounds): fired anyway, so every planned fault happens.
    fire_after_last: bool = True

    def __post_init__(self) -> None:
        self._timers: list[tuple[float, str, Any]] = []
        self._extra_aggs: list[str] = []
        self._t0 = 0.0

    def run(self) -> dict[str, Any]:
        from storage.jobstate import TERMINAL

        redelivered0 = self._redelivered()
        self.job_id = self.client.submit(self.spec)
        self._t0 = time.monotonic()
        pending, due, state = list(self.faults), None, None
        last_version, last_progress = -1, self._t0
        while True:
            now = time.monotonic()
            self._fire_timers(now)
            state = self._state() or state
            if state is not None:
                for rec in self.injected:
                    if rec["kind"] == "user_hang" and "_t" not in rec:
                        self._hang_fired(rec, state["version"], now)
                    if "_t" in rec and "progress_s" not in rec and "skipped" not in rec \
                            and state["version"] > rec["version"]:
                        rec["progress_s"] = round(now - rec["_t"], 2)
            if state is not None and pending and state["version"] >= pending[0].at_version and self._may_fire():
                due = due if due is not None else now + pending[0].delay_s
                # A fault that waited for the fleet while the job reached its last version has no next version
                # to be timed by: it is not fired (it stays in "skipped").
                if now >= due and (self.fire_after_last or state["version"] < state["total_rounds"]):
                    self._inject(pending.pop(0), state["version"])
                    due = None
                    continue
            if state is not None and state["status"] in TERMINAL and not self._timers:
                if state["status"] == "failed" and self.resumes < 3:
                    self.notes.append(f"failed at v{state['version']}: {state.get('error')}; resumed")
                    self._resume()
                    continue
                break
            if state is not None and state["status"] not in TERMINAL:
                if state["version"] != last_version:
                    last_version, last_progress = state["version"], now
                elif now - last_progress > self.stall_s and not self._timers:
                    # No progress, every fault restored, and the watchdog did not help: say what the broker
                    # holds, then do what an operator would: resume (relaunches the round from the last version).
                    self.notes.append(f"stalled at v{last_version} for {self.stall_s:.0f} s: {self._broker()}")
                    self.stalls += 1
                    self._resume()
                    last_progress = now
            if now - self._t0 > self.timeout_s:
                self.notes.append(f"timed out after {self.timeout_s:.0f} s at v{state and state['version']}")
                break
            for name, code in self.cluster.respawn_dead():
                from workers.liveness import EXIT_HUNG

                if code != EXIT_HUNG:
                    self.notes.append(f"worker {name} exited on its own ({code}); replaced")
            time.sleep(0.05)
        for rec in self.injected:
            if rec["kind"] == "user_hang" and "_t" not in rec:
                rec["skipped"] = "the armed hang never fired before the job ended"
        self._drain_timers()
        self._count_watchdog()
        for name in self._extra_aggs:
            if name in self.cluster.roles:
                self.cluster.stop_worker(name)
        self._track(final=True)
        return {"job_id": self.job_id, "state": self._state() or state, "wall_s": round(time.monotonic() - self._t0, 1),
                "injected": self.injected, "skipped": [f.kind for f in pending], "resumes": self.resumes,
                "stalls": self.stalls, "watchdog": self.watchdog,
                "redelivered": max(0, self._redelivered() - redelivered0),
                "notes": self.notes, "consumed": self.consumed}

    def _hang_fired(self, rec: dict[str, Any], version: int, now: float) -> None:
        """A user_hang is timed from the moment a shard task reaches the armed point, not from the arming."""
        import redis

        try:
            if self.client.redis.exists(keys.fault_fired(HANG_POINT, self.job_id)):
                rec.update(_t=now, version=version, fired_after_s=round(now - rec["_armed"], 2))
        except redis.RedisError:
            pass

    def _may_fire(self) -> bool:
        """One fault at a time (the previous one has been followed by a version), on a fleet that is up: two
        ready shard workers and an aggregator, as a supervised fleet would be after its restarts."""
        if any("progress_s" not in r and "skipped" not in r for r in self.injected) or self._timers:
            return False
        return len(self.cluster.ready("shard")) >= 2 and len(self.cluster.ready("aggregate")) >= 1

    # ------------------------------------------------------------ state

    def _state(self) -> dict[str, Any] | None:
        import redis

        from storage.jobstate import JobNotFound

        try:
            st: dict[str, Any] = self.client.jobs.get(self.job_id).to_dict()
        except (JobNotFound, redis.RedisError):
            return None
        self._track(version=st["version"])
        return st

    def _track(self, version: int | None = None, final: bool = False) -> None:
        """Copy each committed version's consumed identities out of Redis (which a restart wipes)."""
        import redis

        try:
            top = version if version is not None else self.client.jobs.get(self.job_id).version
            for v in range(1, top + 1):
                if v not in self.consumed:
                    ids = self.client.jobs.consumed(self.job_id, v)
                    if ids:
                        self.consumed[v] = ids
        except (redis.RedisError, KeyError):
            if final:
                raise

    def _count_watchdog(self) -> None:
        """Add the watchdog's relaunches of this job (its events; call before a Redis restart wipes them)."""
        import redis

        try:
            self.watchdog += sum(e["kind"] == "watchdog" for e in self.client.jobs.events(self.job_id, count=10_000))
        except redis.RedisError:
            pass

    def _redelivered(self) -> int:
        """Task messages delivered more than once (the poison-message counters; a Redis restart clears them)."""
        import redis

        try:
            r = self.client.redis
            return sum(int(r.get(k) or 0) > 1 for k in r.scan_iter(match=keys.deliveries_pattern(), count=1000))
        except redis.RedisError:
            return 0

    def _broker(self) -> dict[str, Any]:
        """What kombu's Redis transport holds: queue lengths, unacknowledged messages, the restore mutex."""
        r = self.client.redis
        unacked = []
        for raw in r.hvals("unacked"):
            msg = json.loads(raw)[0]
            unacked.append(f"{msg['headers'].get('task')}{msg['headers'].get('argsrepr')}")
        return {"shards": r.llen("shards"), "aggregate": r.llen("aggregate"), "unacked": unacked,
                "unacked_index": r.zcard("unacked_index"), "unacked_mutex_ttl_s": r.ttl("unacked_mutex")}

    def _resume(self) -> None:
        for attempt in range(20):
            try:
                self.client.resume(self.job_id)
                self.resumes += 1
                return
            except Exception as e:  # noqa: BLE001 - Redis or the workers still coming back: try again
                if attempt == 19:
                    raise
                self.notes.append(f"resume attempt {attempt + 1}: {type(e).__name__}: {e}")
                time.sleep(1.0)

    # ------------------------------------------------------------ faults

    def _fire_timers(self, now: float) -> None:
        for entry in sorted(self._timers):
            if entry[0] <= now:
                self._timers.remove(entry)
                self._restore(entry[1], entry[2])

    def _drain_timers(self) -> None:
        while self._timers:
            self._fire_timers(time.monotonic())
            time.sleep(0.05)

    def _restore(self, what: str, target: Any) -> None:
        if what == "resume_store":
            assert self.cluster.proxy is not None
            self.cluster.proxy.resume()
        elif what == "sigcont" and target in self.cluster.roles:
            self.cluster.signal(target, signal.SIGCONT)

    def _inject(self, f: Fault, version: int) -> None:
        c, now = self.cluster, time.monotonic()
        rec: dict[str, Any] = {"kind": f.kind, "version": version, "t_s": round(now - self._t0, 2), "_t": now}
        shards = [n for n in c.live("shard") if n not in c.stopped]
        if f.kind == "shard_kill" and shards:
            victim = shards[f.pick % len(shards)]
            rec.update(target=victim, replacement=c.kill(victim))
        elif f.kind == "aggregator_kill" and c.live("aggregate"):
            victim = c.live("aggregate")[f.pick % len(c.live("aggregate"))]
            rec.update(target=victim, replacement=c.kill(victim))
        elif f.kind == "store_pause":
            assert c.proxy is not None
            c.proxy.pause()
            self._timers.append((now + f.duration_s, "resume_store", None))
            rec.update(duration_s=f.duration_s)
        elif f.kind == "hang" and len(shards) > 1:
            victim = shards[f.pick % len(shards)]
            c.signal(victim, signal.SIGSTOP)
            self._timers.append((now + f.duration_s, "sigcont", victim))
            rec.update(target=victim, duration_s=f.duration_s)
        elif f.kind == "redis_restart" and c.redis is not None:
            aggs = c.live("aggregate")
            for a in aggs:  # freeze commits while the consumed sets are copied out, so none goes unrecorded
                c.signal(a, signal.SIGSTOP)
            try:
                self._track(final=True)
                self._count_watchdog()
                c.redis.restart()
            finally:
                for a in aggs:
                    c.signal(a, signal.SIGCONT)
            # No resume from here: the workers' liveness monitor notices that Redis lost its state and rebuilds
            # the job from the store by itself (the stall backstop above resumes only if it does not).
        elif f.kind == "user_hang":
            from workers import faults

            faults.arm(self.client.redis, HANG_POINT, self.job_id)  # the next shard task to get there never returns
            rec.update(point=HANG_POINT, _armed=now)
            del rec["_t"]  # timed from when it fires (_hang_fired)
        elif f.kind == "two_aggregators":
            from workers.app import app_for

            name = c.start_worker("aggregate")
            self._extra_aggs.append(name)
            capp = app_for(c.settings())
            for _ in range(2):  # duplicate aggregations of the same round race the round's own
                capp.signature("aas.aggregate", args=([], self.job_id, version)).apply_async()
            rec.update(target=name)
        else:
            rec.update(skipped="no eligible target")
        self.injected.append(rec)


# ---------------------------------------------------------------- checks and the report


def parse_identity(ident: str) -> tuple[int, int, int]:
    """`job/s{shard}/v{base}/a{attempt}` → (shard, base version, attempt)."""
    g = keys.parse_identity(ident)
    return g.shard, g.version, g.attempt


def audit(consumed: dict[int, set[str]], final_version: int, shards: int) -> dict[str, int]:
    """Exactly-once, from what each version recorded consuming.

    duplicates: a shard applied twice within a version, or one (shard, base version) consumed by two
    versions; lost: a version with fewer than `shards` shard identities; unrecorded: a version whose
    record Redis lost (a restart between commit and copy-out), proven right by the weights check only.
    """
    applied = duplicates = lost = unrecorded = wrong_base = 0
    versions_of: dict[tuple[int, int], set[int]] = {}
    for v in range(1, final_version + 1):
        ids = consumed.get(v)
        if not ids:
            unrecorded += 1
            continue
        parsed = [parse_identity(i) for i in ids]
        per_shard = Counter(s for s, _, _ in parsed)
        applied += len(parsed)
        duplicates += sum(n - 1 for n in per_shard.values())
        lost += int(len(per_shard) < shards)
        for s, base, _ in parsed:
            wrong_base += int(base != v - 1)
            versions_of.setdefault((s, base), set()).add(v)
    duplicates += sum(len(vs) - 1 for vs in versions_of.values())
    return {"applied": applied, "duplicates": duplicates, "lost": lost, "unrecorded": unrecorded,
            "wrong_base": wrong_base}


def final_weights(client: Any, job_id: str, version: int) -> tuple[dict[str, Any], float]:
    """The job's checkpoint at `version` (read straight from the store) and its test accuracy."""
    from pipeline.checkpoint import decode_checkpoint
    from pipeline.training import evaluate
    from storage import keys
    from storage.datastore import Manifest, read_split

    ckpt = decode_checkpoint(client.store.get(keys.checkpoint(job_id, version)), f"{job_id} v{version}")
    record = json.loads(client.store.get(keys.job_record(job_id)))
    manifest = Manifest.from_json(client.store.get(record["fields"]["manifest"]))
    x, y, _ = read_split(client.store, manifest.test)
    return ckpt.state, evaluate(ckpt.build("cpu"), x, y, "classify")["accuracy"]


def max_abs_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    if a.keys() != b.keys():
        return float("inf")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def check_job(run: dict[str, Any], client: Any, shards: int, reference: dict[str, Any] | None) -> dict[str, Any]:
    state = run["state"] or {}
    version = int(state.get("version", 0))
    row: dict[str, Any] = {"job_id": run["job_id"], "status": state.get("status"), "version": version,
                           "total_rounds": state.get("total_rounds"), "wall_s": run["wall_s"],
                           "faults": dict(Counter(f["kind"] for f in run["injected"] if "skipped" not in f)),
                           "resumes": run["resumes"], "stalls": run["stalls"], "watchdog": run["watchdog"],
                           "redelivered": run["redelivered"],
                           "notes": run["notes"],
                           "injected": run["injected"]}
    row.update(audit(run["consumed"], version, shards))
    weights, row["accuracy"] = final_weights(client, run["job_id"], version)
    row["_weights"] = weights
    if reference is not None:
        row["max_abs_diff"] = max_abs_diff(weights, reference["_weights"])
        row["accuracy_fault_free"] = reference["accuracy"]
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| job | faults injected | outcome | versions | applied | duplicates | lost | unrecorded | watchdog "
            "| stalls | resumes | max abs Δw vs fault-free | accuracy (fault-free) | wall s |")
    out = [head, "|" + "---|" * 14]
    for r in rows:
        faults = ", ".join(f"{k}×{n}" for k, n in sorted(r["faults"].items())) or "none"
        diff = r.get("max_abs_diff")
        counts = " | ".join(str(r[k]) for k in ("applied", "duplicates", "lost", "unrecorded", "watchdog", "stalls",
                                                 "resumes"))
        out.append(f"| {r['job_id']} | {faults} | {r['status']} | {r['version']}/{r['total_rounds']} | {counts} "
                   f"| {'-' if diff is None else f'{diff:.1e}'} "
                   f"| {r['accuracy']:.4f} ({r.get('accuracy_fault_free', r['accuracy']):.4f}) | {r['wall_s']} |")
    return "\n".join(out)


def kinds_table(rows: list[dict[str, Any]]) -> str:
    total: Counter[str] = Counter()
    for r in rows:
        total.update(r["faults"])
    out = ["| fault | injected |", "|---|---|"] + [f"| {k} | {total[k]} |" for k in KINDS]
    return "\n".join(out + [f"| **total** | **{sum(total.values())}** |"])


# ---------------------------------------------------------------- the run


def percentile(xs: list[float], q: float) -> float:
    """The q-quantile by nearest rank (p99 of fewer than 100 samples is their maximum)."""
    ys = sorted(xs)
    return ys[min(len(ys) - 1, max(0, math.ceil(len(ys) * q) - 1))] if ys else float("nan")


def progress_table(rows: list[dict[str, Any]]) -> tuple[str, dict[str, dict[str, float]]]:
    """Per fault kind: how many, and the time from the fault to the job's next committed version."""
    by: dict[str, list[float]] = {}
    missing: Counter[str] = Counter()
    for r in rows:
        for f in r["injected"]:
            if "skipped" in f:
                continue
            if "progress_s" in f:
                by.setdefault(f["kind"], []).append(float(f["progress_s"]))
            else:
                missing[f["kind"]] += 1
    stats: dict[str, dict[str, float]] = {}
    out = ["| fault | injected | p50 s | p99 s | max s | no progress after it |", "|---|---|---|---|---|---|"]
    for k in KINDS + ("all",):
        xs = [x for v in by.values() for x in v] if k == "all" else by.get(k, [])
        n_missing = sum(missing.values()) if k == "all" else missing[k]
        if not xs and not n_missing:
            continue
        stats[k] = {"n": len(xs) + n_missing, "p50": percentile(xs, 0.5), "p99": percentile(xs, 0.99),
                    "max": max(xs, default=float("nan"))}
        name = "**all**" if k == "all" else k
        out.append(f"| {name} | {len(xs) + n_missing} | {stats[k]['p50']:.1f} | {stats[k]['p99']:.1f} "
                   f"| {stats[k]['max']:.1f} | {n_missing} |")
    return "\n".join(out), stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ops/chaos/run", description=__doc__.splitlines()[0])
    p.add_argument("--broker", choices=("redis", "rabbitmq"), default="redis",
                   help="the Celery broker (rabbitmq: AAS_CHAOS_RABBITMQ, default the aas-chaos vhost on localhost)")
    p.add_argument("--faults", type=int, default=None, help="faults to inject in all (default 200; --quick 8)")
    p.add_argument("--minutes", type=float, default=None, help="start no new job after this many minutes")
    p.add_argument("--per-job", type=int, default=None, help="faults per job (default 40; --quick 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault schedule")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--quick", action="store_true", help="short outages, 1-epoch jobs, a few faults")
    p.add_argument("--keep", action="store_true", help="keep the work folder (worker logs) afterwards")
    args = p.parse_args(argv)
    import shutil
    import tempfile

    quick = args.quick
    target = args.faults if args.faults is not None else (8 if quick else 200)
    per_job = args.per_job or (4 if quick else 40)
    epochs = 1 if quick else max(2, -(-(per_job + 2) // 12))  # 12 rounds an epoch: one fault per version at most
    spec = {"shards": 2, "epochs": epochs, "batch_size": 64, "seed": 7, "publish_every_versions": 0}
    pause_s, vt = (3.0, 6.0), 4 if quick else 6
    hang_s = (vt + 2.0, vt + 3.0) if quick else (vt + 3.0, vt + 6.0)
    broker_url = None
    if args.broker == "rabbitmq":
        broker_url = RABBITMQ_URL
        subprocess.run([str(REPO / "ops" / "ensure-rabbitmq")], env={**os.environ, "AAS_TEST_RABBITMQ": broker_url},
                       check=True)
        _delete_queues(broker_url)
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="aas-chaos-"))
    cluster = Cluster(workdir, visibility_timeout_s=vt, task_time_limit_s=10, broker_url=broker_url)
    rows: list[dict[str, Any]] = []
    t0 = time.monotonic()
    reference: dict[str, Any] = {}
    try:
        print(f"[chaos] broker {args.broker}; starting redis-server, moto behind a proxy, 3 shard workers, "
              f"2 aggregators in {workdir}")
        cluster.start(shard_workers=3, aggregators=2).wait_ready()
        client = cluster.client()
        reference = check_job(JobRun(cluster, client, spec, []).run(), client, spec["shards"], None)
        rounds = int(reference["total_rounds"])
        print(f"[chaos] fault-free reference {reference['job_id']}: {reference['status']} v{reference['version']} "
              f"accuracy {reference['accuracy']:.4f} in {reference['wall_s']} s")
        injected, index = 0, 0
        while injected < target:
            if args.minutes is not None and time.monotonic() - t0 > 60 * args.minutes:
                print(f"[chaos] {args.minutes} minutes are up: no new job")
                break
            kinds = job_kinds(rng, index, min(per_job, target - injected), KINDS)
            faults = plan(rng, kinds, rounds, pause_s=pause_s, hang_s=hang_s)
            run = JobRun(cluster, client, spec, faults, timeout_s=max(300.0, 40.0 * len(faults)),
                         fire_after_last=False).run()
            row = check_job(run, client, spec["shards"], reference)
            rows.append(row)
            injected += sum(row["faults"].values())
            index += 1
            print(f"[chaos] job {index} {row['job_id']}: {row['status']} v{row['version']} faults {row['faults']} "
                  f"dup {row['duplicates']} lost {row['lost']} stalls {row['stalls']} Δw {row['max_abs_diff']:.1e} "
                  f"({row['wall_s']} s)", flush=True)
            if index > 3 * target:  # never loop forever when faults keep being skipped
                break
    finally:
        cluster.close()
    # A resume is what an operator would do (after a stall, or a job that failed): none may be needed.
    ok = bool(rows) and all(r["status"] == "succeeded" and r["duplicates"] == 0 and r["lost"] == 0
                            and r["stalls"] == 0 and r["resumes"] == 0 and r["max_abs_diff"] <= 1e-6 for r in rows)
    ptable, stats = progress_table(rows)
    report = (f"{table(rows)}\n\n{ptable}\n\nfault-free reference: accuracy "
              f"{reference['accuracy']:.4f}, {reference['version']} versions, {reference['wall_s']} s; "
              f"broker {args.broker}; chaos run {time.monotonic() - t0:.0f} s, seed {args.seed}: "
              f"{'PASS' if ok else 'FAIL'}")
    print(report)
    if args.json is not None:
        clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
        for r in clean:
            r["injected"] = [{k: v for k, v in f.items() if not k.startswith("_")} for f in r["injected"]]
        ref = {k: v for k, v in reference.items() if not k.startswith("_")}
        args.json.write_text(json.dumps({"seed": args.seed, "quick": quick, "broker": args.broker, "spec": spec,
                                         "visibility_timeout_s": vt, "task_time_limit_s": cluster.task_time_limit_s,
                                         "reference": ref, "jobs": clean, "progress": stats, "pass": ok,
                                         "wall_s": round(time.monotonic() - t0, 1)}, indent=2, default=str))
    if args.keep or not ok:
        print(f"[chaos] worker logs kept in {workdir / 'logs'}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


def _delete_queues(url: str) -> None:
    """Start the RabbitMQ vhost empty (a previous run's messages would land in this run's jobs)."""
    from kombu import Connection

    from workers.app import QUEUES

    with Connection(url, connect_timeout=5) as conn:
        for q in QUEUES:
            ch = conn.channel()
            try:
                ch.queue_delete(q)
            finally:
                ch.close()


if __name__ == "__main__":
    raise SystemExit(main())
