"""Benchmark helper: one job run round by round in this process, with the real shard and aggregator code.

For codec and optimizer experiments that need many epochs: no Celery, no services (fakeredis, a local folder),
so a run costs its compute. Each round runs every shard's task (``workers.shard.train_shard``) then the
aggregation (``workers.aggregator.aggregate_round``) on one Context, which holds every shard's error-feedback
state (as shard-to-worker affinity keeps it in the real fleet). Sync jobs only. Prints one JSON line: the final
test perplexity (or accuracy), the bytes uploaded per sample and the wall time.

    ops/bench/run inprocess --spec '{"codec": "topk+q4", "codec_momentum": 0.9, "momentum": 0}' [--epochs 4]
        [--model char-lm|digits-cnn] [--quick] [--seed S] [--json FILE]

The budget is the training benchmark's (``training.budget_for(model, quick)``: the full one, or with ``--quick``
the quick one, whose char-lm corpus is 60k characters); `--spec` fields override it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from training import budget_for  # noqa: E402  (sibling bench module)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="char-lm", choices=["char-lm", "digits-cnn"])
    ap.add_argument("--spec", default="{}", type=json.loads, help="spec fields over the budget's")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="the training bench's quick budget (char-lm: 60k characters)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--label", help="the row's name in `compression_report` (default: its codec)")
    a = ap.parse_args(argv)

    import fakeredis
    import torch

    from pipeline.checkpoint import decode_checkpoint
    from pipeline.client import Client
    from pipeline.settings import Settings
    from pipeline.training import evaluate
    from storage import keys
    from storage.jobstate import JobStore
    from storage.objectstore import LocalStore
    from workers import aggregator, shard
    from workers.context import Context
    from workers.dispatch import StubDispatcher

    torch.set_num_threads(a.threads)
    b = budget_for(a.model, quick=a.quick)
    spec = b.spec(**{"mode": "sync", "epochs": a.epochs, "seed": a.seed, **a.spec})  # --spec's fields win
    if spec.get("mode", "sync") != "sync":
        raise SystemExit("--spec: sync jobs only")
    with tempfile.TemporaryDirectory(prefix="aas-inprocess-") as d:
        r, store = fakeredis.FakeRedis(), LocalStore(d)
        ctx = Context(settings=Settings(redis_url="redis://fake", store_root=store.root, insecure_dev=True), redis=r,
                      store=store, jobs=JobStore(r), dispatch=StubDispatcher())
        job_id = Client(ctx.settings, store=store, redis_client=r, dispatch=ctx.dispatch).stage(spec)
        h, shards = int(spec.get("local_steps", 1)), int(spec["shards"])
        total = ctx.jobs.get(job_id).total_rounds
        t0, up, samples = time.time(), 0, 0
        for v in range(total):
            results = [shard.train_shard(ctx, job_id, s, v, v * h, 0) for s in range(shards)]
            up += sum(int(x["bytes"]) for x in results)
            samples += sum(int(x["samples"]) for x in results)
            if not aggregator.aggregate_round(ctx, job_id, v, results).committed:
                raise SystemExit(f"round {v} was not committed")
            if (v + 1) % max(1, total // 10) == 0:
                print(f"[inprocess] round {v + 1}/{total}", file=sys.stderr, flush=True)
        job = ctx.jobs.get(job_id)
        final = decode_checkpoint(store.get(keys.checkpoint(job_id, job.version)), "final")
        manifest = ctx.manifest(job.fields["manifest"])
        xt, yt = ctx.split(manifest.test, job_id)
        metrics = evaluate(final.build("cpu"), xt, yt, b.task)
    out = {"model": a.model, "quick": a.quick, "spec": a.spec, **({"label": a.label} if a.label else {}),
           "epochs": a.epochs, "seed": a.seed, "rounds": total,
           "samples": samples, "bytes_up_per_sample": up / max(1, samples), **metrics,
           "wall_s": round(time.time() - t0, 1)}
    print(json.dumps(out))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
