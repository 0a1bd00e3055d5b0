"""The Python client: submit a job, follow it, cancel or resume it.

    from pipeline import Client, JobSpec
    client = Client()
    job_id = client.submit(JobSpec(model="digits-cnn", shards=2, epochs=4))
    state = client.wait(job_id, timeout=600)

Submit validates everything it can before it writes anything: the spec, the services, the data set
against the shard count, the model against a sample. A rejected job enqueues nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import redis

from pipeline.settings import Settings, get_settings
from pipeline.spec import JobSpec
from storage import keys
from storage.jobstate import TERMINAL, JobNotFound
from storage.leases import LeaseBook
from storage.objectstore import ObjectStore, StoreError
from storage.services import ServiceUnavailable, build_services
from workers.context import Context
from workers.dispatch import Dispatcher
from workers.lifecycle import relaunch
from workers.staging import rebuild_job, stage_job, submit_job

__all__ = ["Client", "ServiceUnavailable"]


class Client:
    def __init__(self, settings: Settings | None = None, *, store: ObjectStore | None = None,
                 redis_client: redis.Redis | None = None, dispatch: Dispatcher | None = None) -> None:
        """Services from `settings` (default: the AAS_* environment); `dispatch` enqueues work (default: Celery)."""
        self.dispatch = dispatch
        self.services = build_services(settings or get_settings(), redis_conn=redis_client, store=store)
        self.settings = self.services.settings
        self.redis = self.services.redis
        self.store = self.services.store
        self.jobs = self.services.jobs

    # ------------------------------------------------------------------ checks

    def check_services(self) -> None:
        try:
            self.redis.ping()
        except redis.RedisError as e:
            raise ServiceUnavailable(
                f"cannot reach Redis at {self.settings.redis_display()}: {e.__class__.__name__}: {e}"
                " (set AAS_REDIS_URL or start Redis)"
            ) from None
        try:
            self.store.check()
        except StoreError as e:
            raise ServiceUnavailable(f"object store unavailable: {e}") from None

    def _context(self) -> Context:
        return Context(settings=self.settings, redis=self.redis, store=self.store, jobs=self.jobs,
                       dispatch=self.dispatch)  # type: ignore[arg-type]  # None: Context picks Celery

    # ------------------------------------------------------------------ jobs

    def submit(self, spec: JobSpec | dict[str, Any]) -> str:
        """Validate, stage data and version 0, enqueue round 0; return the job id."""
        self.check_services()
        return submit_job(self._context(), spec)

    def stage(self, spec: JobSpec | dict[str, Any]) -> str:
        """Validate the spec against its data, write shards and version 0, record the job; enqueue nothing."""
        return stage_job(self.services, spec)

    def status(self, job_id: str) -> dict[str, Any]:
        state = self.jobs.get(job_id)
        out = state.to_dict()
        out["liveness"] = self._liveness(state.job_id, state.status, state.fields)
        out["metrics"] = self.jobs.metrics(job_id)
        out["spec"] = state.spec
        return out

    def list(self, limit: int = 20) -> list[dict[str, Any]]:
        out = []
        for j in self.jobs.list(limit):
            state = self.jobs.get(j)
            out.append({**state.to_dict(), "liveness": self._liveness(j, state.status, state.fields)})
        return out

    def _liveness(self, job_id: str, status: str, fields: dict[str, str]) -> dict[str, Any]:
        """Seconds since the job's last progress, its relaunches, and which tasks run where (running jobs)."""
        summary = LeaseBook(self.redis, self.settings.lease_ttl_s).summary(job_id, fields)
        if status != "running":
            return {"relaunches": summary["relaunches"]}
        return summary

    def events(self, job_id: str, count: int = 100) -> list[dict[str, str]]:
        """The job's newest `count` events, oldest first: status changes, versions, retries, rejections,
        lost leases, relaunches, hung tasks, resumes."""
        self.jobs.get(job_id)
        return self.jobs.events(job_id, count=count)

    def wait(self, job_id: str, timeout: float | None = None, *, poll_s: float = 0.2,
             on_progress: Callable[[dict[str, Any], list[dict[str, Any]]], None] | None = None) -> dict[str, Any]:
        """Block until the job ends; call on_progress(state, new_metrics) as versions arrive."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = 0
        while True:
            state = self.jobs.get(job_id).to_dict()
            if on_progress is not None:
                new = self.redis.lrange(keys.job_metrics(job_id), seen, -1)
                if new:
                    seen += len(new)
                    on_progress(state, [json.loads(m) for m in new])
            if state["status"] in TERMINAL:
                return self.status(job_id)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state['status']} at version {state['version']} "
                                   f"after {timeout} s")
            time.sleep(poll_s)

    def cancel(self, job_id: str) -> bool:
        self.jobs.get(job_id)
        return self.jobs.set_status(job_id, "cancelled", error="cancelled by user")

    def resume(self, job_id: str) -> dict[str, Any]:
        """Re-enqueue a job from its last committed version (after a crash, a failure or a Redis restart).

        With its Redis state gone, the job is rebuilt from what the object store keeps: the job record
        (spec, data set) and the newest checkpoint. Metrics of earlier versions are not recoverable, and
        an async job's per-shard data positions restart from an even split of the updates applied.
        """
        try:
            state = self.jobs.get(job_id)
        except JobNotFound:
            state = rebuild_job(self.services, job_id)
        if state.status in ("succeeded", "cancelled"):
            return state.to_dict()
        self.redis.hset(keys.job(job_id), mapping={"status": "running", "error": ""})
        relaunch(self._context(), job_id)
        self.jobs.event(job_id, "resumed", version=self.jobs.get(job_id).version)
        return self.jobs.get(job_id).to_dict()
