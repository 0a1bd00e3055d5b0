"""Async mode: which data steps to compute next, and which results a job still awaits. Pure functions.

A job's data is `shards` streams of steps (shard s, step k·H → a fixed mini-batch, ``pipeline/data.py``).
In async mode the steps are computed in one global order, round by round — (shard 0, step 0), (shard 1,
step 0), …, (shard 0, step H), … — and the first `shards` steps not yet accepted (no more than there are
live shard workers) are in flight at once, on whichever workers are free. A fast worker therefore also
computes the steps of a shard whose previous step a slow worker still holds: every shard's data is consumed
at the same pace whatever the workers' speeds, and no worker waits while a step is left.

A shard whose codec keeps error-feedback state between its steps (top-k) computes its steps one at a time,
in order (``lookahead=False``): the residual of step k is an input of step k+H.

Results may then arrive out of order. The job records, per shard, its `mark` (every step below it accepted)
and the steps accepted above it (`ahead`); a result is awaited iff its step is at or above the mark and not
ahead — so a redelivered or recomputed result is never accepted twice (``accept``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping


def window_for(shards: int, workers: int = 0) -> int:
    """Steps in flight at once: one per shard, and no more than there are shard workers (when known). A step
    queued for the next worker to come free would be started before that worker's previous result is applied,
    one version staler (measured on char-lm with a 3×-slow worker: mean staleness 0.99 against 0.50, perplexity
    +30–60% for a few % of speed)."""
    return max(1, min(shards, workers) if workers > 0 else shards)


def frontier(marks: Mapping[int, int], ahead: Collection[tuple[int, int]], *, shards: int, local_steps: int,
             steps_per_shard: int, lookahead: bool, workers: int = 0) -> list[tuple[int, int]]:
    """The (shard, step) pairs that should be in flight now, in the global order (`workers`: the live shard
    workers, 0 when unknown).

    `marks`: shard → its first step not accepted (0 when absent); `ahead`: (shard, step) accepted above the
    mark; `steps_per_shard`: the budget of data steps per shard (a multiple of `local_steps`), reached by
    every shard in lookahead mode. Without lookahead, each shard's mark alone (the shard's budget is then the
    job's total, as before: a fast shard may run past it while a slow one lags).
    """
    h = max(1, local_steps)
    if not lookahead:
        return [(s, int(marks.get(s, 0))) for s in range(shards)]
    out: list[tuple[int, int]] = []
    want = window_for(shards, workers)
    done = set(ahead)
    k = min((int(marks.get(s, 0)) for s in range(shards)), default=0) // h
    while len(out) < want and k * h < steps_per_shard:
        for s in range(shards):
            step = k * h
            if step >= int(marks.get(s, 0)) and (s, step) not in done:
                out.append((s, step))
                if len(out) == want:
                    break
        k += 1
    return out


def awaited(mark: int, ahead: Collection[int], step: int) -> bool:
    """Whether a shard whose first unaccepted step is `mark`, with steps `ahead` accepted above it, still awaits
    `step`'s result."""
    return step >= mark and step not in ahead


def accept(mark: int, ahead: Collection[int], step: int, local_steps: int) -> tuple[int, set[int]]:
    """The shard's (mark, ahead) once `step` is accepted (it must be awaited): the mark moves past every
    consecutive accepted step."""
    h = max(1, local_steps)
    rest = set(ahead) | {step}
    while mark in rest:
        rest.discard(mark)
        mark += h
    return mark, rest


def marks_after(accepted: int, shards: int, local_steps: int) -> dict[int, int]:
    """Every shard's mark once the first `accepted` steps of the global order are accepted (rebuilding a job
    whose Redis state was lost from its newest checkpoint: a version records how many updates it holds)."""
    h = max(1, local_steps)
    return {s: max(0, -(-(accepted - s) // shards)) * h for s in range(shards)}
