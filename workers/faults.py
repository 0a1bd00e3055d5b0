"""Fault injection for tests and chaos runs: kill (or hang) this process at a named point, once per job.

``AAS_FAULTS="aggregator.after_read,aggregator.after_checkpoint"`` arms points. A point fires once
(guarded by a Redis SET NX marker, so the restarted process runs on), with SIGKILL: no cleanup, no
ack, exactly like a machine dying. ``point=hang`` sleeps forever instead, like user code that never
returns (the worker's hard time limit ends it). ``point=armed`` / ``point=hang-armed`` fire only once
someone arms them for a job (``arm``; a chaos run chooses the moment). Unarmed points cost one
set-membership test.
"""

from __future__ import annotations

import os
import signal
import time

import redis

from storage import keys

ACTIONS = ("kill", "hang", "armed", "hang-armed")


def _parse(text: str) -> dict[str, str]:
    out = {}
    for item in (p.strip() for p in text.split(",")):
        if item:
            name, _, action = item.partition("=")
            out[name] = action or "kill"
    return out


_ARMED = _parse(os.environ.get("AAS_FAULTS", ""))


def arm(r: redis.Redis, name: str, scope: str) -> None:
    """Let an ``=armed`` or ``=hang-armed`` point fire once more for `scope` (a job)."""
    r.delete(keys.fault_fired(name, scope))
    r.set(keys.fault_armed(name, scope), 1, ex=3600)


def point(name: str, r: redis.Redis, scope: str) -> None:
    action = _ARMED.get(name)
    if action is None:
        return
    if action.endswith("armed") and not r.delete(keys.fault_armed(name, scope)):
        return
    if r.set(keys.fault_fired(name, scope), os.getpid(), nx=True, ex=3600):
        if action.startswith("hang"):
            while True:  # user code that never returns
                time.sleep(3600)
        os.kill(os.getpid(), signal.SIGKILL)
