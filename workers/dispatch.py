"""Enqueueing Celery work behind a small interface, so the job lifecycle can be driven without a broker.

``CeleryDispatcher`` sends real messages; ``StubDispatcher`` records them in memory for unit tests (the
way dramatiq's ``StubBroker`` stands in for a broker). Tests inject it into a Context instead of
patching dotted paths.

Shard tasks go to the shared ``shards`` queue unless the caller names another: the queue of the worker that
holds a shard's codec state (``workers/affinity.py`` decides; relaunches never name one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline.settings import Settings


class Dispatcher(Protocol):
    def round(self, job_id: str, version: int, shards: int, step: int, *, queues: dict[int, str] | None = None
              ) -> None:
        """Sync: one shard task per shard on `version`; the shard that completes the round sends the aggregation
        (``liveness.shard_finished``). Shard s goes to ``queues[s]`` where given (a worker's own queue), else to
        the shared queue."""

    def shard(self, job_id: str, shard: int, version: int, step: int, attempt: int, *, apply: bool,
              queue: str | None = None) -> None:
        """One shard task, to `queue` (a worker's own) or the shared queue; with `apply` (async mode) its result
        is applied on arrival."""

    def aggregate(self, job_id: str, version: int) -> None:
        """Sync: the aggregation of round `version` (it reads the results its shards recorded, else finds their
        blobs in the store)."""

    def publish(self, job_id: str, version: int) -> None:
        """Evaluate committed `version` and register it (off the commit path, on the ``publish`` queue)."""

    def aggregate_parts(self, job_id: str, version: int, parts: int, results: list[Any]) -> None:
        """Sync, aggregation in parameter ranges: one task per range, run by as many aggregators as there are."""


class CeleryDispatcher:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def _app(self) -> Any:
        from workers.app import app_for

        return app_for(self.settings)

    def _routed(self, capp: Any, sig: Any, queue: str | None) -> Any:
        from workers.app import ensure_affinity_queue

        return sig.set(queue=ensure_affinity_queue(capp, self.settings, queue)) if queue else sig

    def round(self, job_id: str, version: int, shards: int, step: int, *, queues: dict[int, str] | None = None
              ) -> None:
        from celery import group

        from workers.app import shard_signature

        capp = self._app()
        queues = queues or {}
        # No result stored: the shard records its result for the round itself (liveness.shard_finished).
        group(self._routed(capp, shard_signature(capp, job_id, s, version, step, 0), queues.get(s))
              .set(ignore_result=True) for s in range(shards)).apply_async()

    def shard(self, job_id: str, shard: int, version: int, step: int, attempt: int, *, apply: bool,
              queue: str | None = None) -> None:
        from workers.app import TASK_APPLY_UPDATE, shard_signature

        capp = self._app()
        link = capp.signature(TASK_APPLY_UPDATE, kwargs={"job_id": job_id}) if apply else None
        # A sync shard records its result for the round itself; an async one's result is stored (what benches read).
        sig = shard_signature(capp, job_id, shard, version, step, attempt, link=link)
        self._routed(capp, sig, queue).apply_async(ignore_result=not apply)

    def aggregate(self, job_id: str, version: int) -> None:
        from workers.app import TASK_AGGREGATE

        # No result stored: the commit is the job's own record (and Flower's task events show the return value).
        self._app().signature(TASK_AGGREGATE, args=([],),
                              kwargs={"job_id": job_id, "version": version}).apply_async(ignore_result=True)

    def publish(self, job_id: str, version: int) -> None:
        from workers.app import TASK_PUBLISH

        self._app().signature(TASK_PUBLISH, kwargs={"job_id": job_id, "version": version}).apply_async()

    def aggregate_parts(self, job_id: str, version: int, parts: int, results: list[Any]) -> None:
        from workers.app import TASK_AGGREGATE_PART

        capp = self._app()
        for part in range(parts):
            capp.signature(TASK_AGGREGATE_PART, args=(results,),
                           kwargs={"job_id": job_id, "version": version, "part": part}).apply_async()


@dataclass
class StubDispatcher:
    """Records what would have been enqueued: ("round", {...}), ("shard", {...}), ("aggregate", {...}) in order.
    A round's or shard's record names its queues (``queues`` / ``queue``) only when some go to a worker's own
    queue: a record without them is all on the shared queue."""

    sent: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def round(self, job_id: str, version: int, shards: int, step: int, *, queues: dict[int, str] | None = None
              ) -> None:
        routed = {"queues": dict(queues)} if queues else {}
        self.sent.append(("round", {"job_id": job_id, "version": version, "shards": shards, "step": step, **routed}))

    def shard(self, job_id: str, shard: int, version: int, step: int, attempt: int, *, apply: bool,
              queue: str | None = None) -> None:
        routed = {"queue": queue} if queue else {}
        self.sent.append(("shard", {"job_id": job_id, "shard": shard, "version": version, "step": step,
                                    "attempt": attempt, "apply": apply, **routed}))

    def aggregate(self, job_id: str, version: int) -> None:
        self.sent.append(("aggregate", {"job_id": job_id, "version": version}))

    def publish(self, job_id: str, version: int) -> None:
        self.sent.append(("publish", {"job_id": job_id, "version": version}))

    def aggregate_parts(self, job_id: str, version: int, parts: int, results: list[Any]) -> None:
        self.sent.append(("aggregate_parts", {"job_id": job_id, "version": version, "parts": parts,
                                              "results": results}))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [m for k, m in self.sent if k == kind]
