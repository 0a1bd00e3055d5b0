"""The commit path, shared by sync rounds and async publishing: checkpoint version N+1 and commit it
atomically with the identities of the updates it consumed.

Everything before ``commit_version`` is deterministic and idempotent (the checkpoint for N+1 is the
same bytes however often it is written), so a crash anywhere followed by redelivery commits once.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.checkpoint import Checkpoint
from storage import keys
from storage.jobstate import JobState
from workers import faults
from workers.context import Context
from workers.metrics import observe_round


@dataclass(frozen=True)
class Commit:
    committed: bool
    version: int
    metrics: dict[str, Any]
    job: JobState | None = None  # the job's state as the commit left it (None: not committed)


def commit_next_version(ctx: Context, job: JobState, base: Checkpoint, state: dict[str, torch.Tensor],
                        momentum: dict[str, torch.Tensor], identities: list[str], *, mode: str, started: float,
                        extra_metrics: dict[str, Any], pending_consumed: int = 0,
                        staleness: list[int] | None = None,
                        extra_opt: dict[str, dict[str, torch.Tensor]] | None = None,
                        recipe: dict[str, Any] | None = None) -> Commit:
    """Write and commit version ``job.version + 1`` with these weights and momentum buffers (and any other
    optimizer slots in `extra_opt`, e.g. async delay compensation's mean square). `recipe`: how a shard worker
    holding ``job.version`` builds the new version from the round's update blobs (``workers/replay.py``),
    committed with it; a sync round without one clears the previous version's ({}).

    Nothing else sits on this path: the evaluation and the registry run afterwards, on the ``publish``
    queue (``workers/publish.py``), while the next round computes.
    """
    job_id, version = job.job_id, job.version
    opt = {**({"momentum": momentum} if momentum else {}), **{k: v for k, v in (extra_opt or {}).items() if v}}
    new = Checkpoint(base.model, base.model_args, version + 1, state, opt, {"job": job_id})
    ckey = keys.checkpoint(job_id, version + 1)
    t_write = time.perf_counter()
    ctx.store_version(ckey, new, recipe)
    t_write = time.perf_counter() - t_write
    faults.point("aggregator.after_checkpoint", ctx.redis, job_id)
    metrics: dict[str, Any] = {
        **extra_metrics, "write_s": round(t_write, 4),
        "t": time.time(), "round_s": round(time.perf_counter() - started, 4),
    }
    # One round trip checks the base version and reads the bytes moved (into `metrics`); one transaction
    # commits the version, its identities, metrics and its event.
    down = ctx.take_unsent_down(job_id)  # the updates this round read
    after = ctx.jobs.commit_version(job_id, base_version=version, new_version=version + 1, checkpoint_key=ckey,
                                    identities=identities, metrics=metrics, pending_consumed=pending_consumed,
                                    count_bytes=True, add_bytes_down=down,
                                    fields=None if recipe is None else {"recipe": json.dumps(recipe) if recipe else ""},
                                    event={"version": version + 1, "train_loss": metrics.get("train_loss")})
    committed = after is not None
    if not committed and down:
        ctx.jobs.add_bytes(job_id, down=down)  # a duplicate aggregation still read them
    observe_round(duration_s=time.perf_counter() - started, applied=len(identities) if committed else 0, mode=mode,
                  published=committed, staleness=staleness or ())
    if committed:
        faults.point("aggregator.after_commit", ctx.redis, job_id)
    return Commit(committed, version + 1, metrics, after)
