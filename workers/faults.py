"""Fault injection for tests and chaos runs: kill this process at a named point, once per job.

``AAS_FAULTS="aggregator.after_read,aggregator.after_checkpoint"`` arms points. A point fires once
(guarded by a Redis SET NX marker, so the restarted process runs on), with SIGKILL: no cleanup, no
ack, exactly like a machine dying. Unarmed points cost one set-membership test.
"""

from __future__ import annotations

import os
import signal

import redis

from storage import keys

_ARMED = frozenset(p.strip() for p in os.environ.get("AAS_FAULTS", "").split(",") if p.strip())


def point(name: str, r: redis.Redis, scope: str) -> None:
    if name not in _ARMED:
        return
    if r.set(keys.fault_fired(name, scope), os.getpid(), nx=True, ex=3600):
        os.kill(os.getpid(), signal.SIGKILL)
