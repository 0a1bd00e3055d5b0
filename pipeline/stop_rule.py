"""When a job is finished: one pure rule for sync and async jobs (the spec's epochs and stop rule)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """What the rule reads of a job. Sync jobs count versions; async jobs count accepted updates."""

    mode: str  # "sync" | "async"
    version: int
    total_rounds: int
    test_accuracy: float | None = None  # of the newest version; None before the first
    target_accuracy: float | None = None
    accepted: int = 0  # async: updates accepted so far
    budget: int = 0  # async: updates the job may accept (as many as sync would apply)
    pending: int = 0  # async: accepted updates not yet folded into a version


def reached_target(p: Progress) -> bool:
    return (p.target_accuracy is not None and p.version > 0 and p.test_accuracy is not None
            and p.test_accuracy >= p.target_accuracy)


def is_finished(p: Progress) -> bool:
    """Sync: every round committed, or the target accuracy reached. Async: the update budget accepted and
    every accepted update published, or the target reached."""
    if reached_target(p):
        return True
    if p.mode == "async":
        return p.accepted >= p.budget and p.pending == 0
    return p.version >= p.total_rounds
