"""Benchmark: bytes moved and accuracy (or perplexity) for every gradient codec, serving artifacts, and distillation.

On digits (``--model digits-cnn``, the default) or char-lm (``--model char-lm``), same seed and epoch budget in
every row, 2 shard workers + 1 aggregator as real processes (an embedded Redis and a local-folder store,
``training.Cluster``):

* every gradient codec, alone (H=1) and with DiLoCo local steps (H=8): bytes uploaded per training
  sample, ratio against per-step fp32 (codec ``none``, H=1), final test accuracy and its change (char-lm: also
  the test perplexity and its change in percent);
* digits only: serving artifacts derived from the fp32 run's final checkpoint by several chains: stored bytes,
  ratio against fp32 safetensors, test accuracy of the served (dequantised) model;
* digits only: knowledge distillation of ``digits-cnn-small`` from the fp32 run's registered model;
* codec speed (encode + decode MB/s on ~10M parameters) from ``ops/bench/codecs.py``.

    ops/bench/run compression [--model digits-cnn|char-lm] [--quick] [--json FILE] [--seeds 0,1]
                              [--codecs none,topk,topk-dgc] [--local-steps 1] [--epochs N] [--no-distill]
                              [--no-speed] [--no-artifacts] [--spec JSON] [--plot PNG]

Codec rows are a codec name or a variant in ``VARIANTS`` (the DGC top-k rows: momentum correction with
momentum-factor masking, a 1-epoch density warm-up, the server's momentum moved to the workers), optionally
with ``@H``: that row runs only with H local steps (``none@8``, ``topk+q4-dgc-3%@8``); rows without it run once
per ``--local-steps`` value. Every row is compared with ``none`` at H=1 of the same seed.

The issue-14 budget is ``--epochs 24``: fp32 sync has converged there (97.8% / 98.3% on seeds 0 / 1, the same as
at 10-20 epochs), and 24 × 23 batches per epoch is a multiple of 8, so H=8 rows process exactly the samples of
H=1 rows (at 5 or 20 epochs they process 0.3-0.9% more).

char-lm takes ``training.budget_for("char-lm", quick)``: the byte-level transformer on ``chars``, 2 shards × batch 32,
1 epoch (146 steps), SGD lr 0.1 momentum 0.9 (``--quick``: 60k chars, batch 16). 146 is not a multiple of 8: H=8
rows run 19 rounds, 152 steps, 4% more samples than H=1 (``samples_vs_fp32`` in each row).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compression_report import markdown, plot  # noqa: E402  (sibling bench module)
from training import Budget, Cluster, budget_for  # noqa: E402  (sibling bench module)

CODECS = ["none", "fp16", "bf16", "int8", "topk", "topk+int8", "topk+q8", "topk+q4", "topk+q2"]
QUICK_CODECS = ["none", "int8", "topk", "topk+int8"]
CHAINS = ["zstd", "fp16,zstd", "int8,zstd", "prune:0.5,int8,zstd", "prune:0.7,int8,zstd", "prune:0.9,int8,zstd",
          "int4,zstd", "int4:32,zstd", "prune:0.5,int4,zstd", "prune:0.5,int4:32,zstd", "prune:0.6,int4,zstd",
          "prune:0.7,int4,zstd"]
_ADAMW_AVG = {"inner_optimizer": "adamw", "inner_lr": 0.001, "inner_state": "keep", "outer_lr": 1.0,
              "outer_momentum": 0.0}
# Local SGD with momentum (SlowMo's inner loop): each shard's momentum buffer kept from its round to its next, plain
# averaging. Inner lr 0.035 ~ sync's 0.05/sqrt(2): each shard's inner step sees half the batch a sync step does (the
# square-root scaling rule); at 0.05 char-lm's seed 1 ended +6.6% above fp32 sync at 64 epochs, at 0.035 +0.2%
# (inner plain SGD and AdamW: 4-98% above it; docs/benchmarks.md).
_SGDM_AVG = {"inner_optimizer": "sgd", "inner_momentum": 0.9, "inner_lr": 0.035, "inner_state": "keep",
             "outer_lr": 1.0, "outer_momentum": 0.0}
_DGC = {"codec_momentum": 0.9, "momentum": 0.0, "codec_warmup_epochs": 1, "codec_state": "store"}
VARIANTS: dict[str, dict[str, Any]] = {
    "topk-dgc": {"codec": "topk", **_DGC},
    "topk+int8-dgc": {"codec": "topk+int8", **_DGC},
    "topk+int8-dgc-0.5%": {"codec": "topk+int8", "codec_density": 0.005, **_DGC},
    "topk-store": {"codec": "topk", "codec_state": "store"},  # the error-feedback state kept in the object store
    "topk-process": {"codec": "topk", "codec_state": "process"},
    # Compressed outer gradients for local steps (SparseLoCo-like: top-k of the pseudo-gradient in 4 or 2 bits with
    # error feedback). The outer Nesterov momentum moves to the workers as DGC momentum correction, in the
    # residual's own units: with exact state (the store, or an in-process replay) 3% + 4 bits held the fp32
    # accuracy on digits where outer momentum on sparse pseudo-gradients lost 1-2 points. With the state in the
    # worker process a shard that moves continues from a stale velocity: -2 to +1 points from run to run.
    "topk+q4-dgc-3%": {"codec": "topk+q4", "codec_density": 0.03, "codec_momentum": 0.9, "momentum": 0.0},
    "topk+q2-dgc-3%": {"codec": "topk+q2", "codec_density": 0.03, "codec_momentum": 0.9, "momentum": 0.0},
    "topk+q2-dgc-5%": {"codec": "topk+q2", "codec_density": 0.05, "codec_momentum": 0.9, "momentum": 0.0},
    # DGC momentum correction + masking at H=1, state in the worker process (no warm-up, no state bytes); "-dense":
    # biases and norm gains (tensors of ≤ 1024 elements) sent whole. On char-lm these hold fp32 sync's perplexity
    # at 1% density where plain top-k with server momentum is 20-40% worse (docs/benchmarks.md).
    "topk+q4-dgc": {"codec": "topk+q4", "codec_momentum": 0.9, "momentum": 0.0},
    "topk+q4-dgc-dense": {"codec": "topk+q4", "codec_momentum": 0.9, "momentum": 0.0, "codec_dense_below": 1024},
    # ... with DGC's density warm-up over the first quarter epoch (25% falling to 1%): on char-lm at 4 epochs it
    # took seed 1 from +13% to below fp32 sync's perplexity, at ~1.2x the bytes of the row without it
    "topk+q4-dgc-dense-warm": {"codec": "topk+q4", "codec_momentum": 0.9, "momentum": 0.0, "codec_dense_below": 1024,
                               "codec_warmup_epochs": 0.25},
    # Local steps as DiLoCo trains them (inner AdamW at 1e-3, its state kept from each shard's round to the next)
    # with plain averaging of the pseudo-gradients (outer lr 1, no outer momentum): H=8 alone, and its
    # pseudo-gradient top-k'd to 8% in 2 bits with error feedback (small tensors whole), ~440x fewer bytes than
    # fp32 sync. On char-lm the outer Nesterov step on a top-k'd pseudo-gradient cost +84% perplexity at 3%; AdamW
    # at 3e-3 reset every round was 24% above fp32 sync at 4 epochs; at 1e-3 kept, H=8 alone is 31-33% below it and
    # the 2-bit top-k 29-31% below (docs/benchmarks.md). "-reset": the inner state reset every round (the default).
    "none-adamw-avg-reset": {"codec": "none", **_ADAMW_AVG, "inner_state": "reset"},
    "none-adamw-avg": {"codec": "none", **_ADAMW_AVG},
    "topk+q2-8%-adamw-avg": {"codec": "topk+q2", "codec_density": 0.08, "codec_dense_below": 1024, **_ADAMW_AVG},
    "topk+q4-5%-adamw-avg": {"codec": "topk+q4", "codec_density": 0.05, "codec_dense_below": 1024, **_ADAMW_AVG},
    "none-sgdm-avg": {"codec": "none", **_SGDM_AVG},
    "topk+q2-8%-sgdm-avg": {"codec": "topk+q2", "codec_density": 0.08, "codec_dense_below": 1024, **_SGDM_AVG},
    "topk+q4-5%-sgdm-avg": {"codec": "topk+q4", "codec_density": 0.05, "codec_dense_below": 1024, **_SGDM_AVG},
    # the same with the state in the store: exact whichever worker runs the shard, at the price of its bytes
    "topk+q4-dgc-3%-store": {"codec": "topk+q4", "codec_density": 0.03, "codec_momentum": 0.9, "momentum": 0.0,
                             "codec_state": "store"},
}


def parse_row(text: str, hs: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """``codec`` → (codec, every H); ``codec@H`` → (codec, (H,)). Raises ValueError for an unknown row."""
    name, sep, h = text.partition("@")
    if name not in CODECS and name not in VARIANTS:
        raise ValueError(f"unknown codec row {name!r} (known: {', '.join([*CODECS, *VARIANTS])})")
    if sep and not (h.isdigit() and int(h) >= 1):
        raise ValueError(f"codec row {text!r}: H after '@' must be an integer ≥ 1")
    return name, (int(h),) if sep else hs


def last_job(cluster: Cluster) -> dict[str, Any]:
    """The job the cluster ran last (its id, bytes, version and data manifest)."""
    from pipeline.client import Client

    return Client(cluster.settings).list(1)[0]


def codec_rows(cluster: Cluster, b: Budget, codecs: list[str],
               hs: tuple[int, ...] = (1, 8)) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    fp32_job: dict[str, Any] = {}
    plan = [(codec, h) for text in codecs for codec, row_hs in [parse_row(text, hs)] for h in row_hs]
    for codec, h in sorted(plan, key=lambda ch: (ch[1], ch[0] != "none")):  # fp32 H=1 first: the artifacts' base
        label = f"{codec} H={h}"
        spec = b.spec(codec=codec, local_steps=h, publish_every_versions=0,
                      promote="production" if (codec == "none" and h == 1) else None,
                      register_as=b.model if (codec == "none" and h == 1) else None)
        if codec in VARIANTS:
            spec = {**spec, **VARIANTS[codec]}
        try:
            r = cluster.run(spec, b.row_timeout_s)
        except Exception as e:  # noqa: BLE001 - a failing row is reported, not fatal
            rows.append({"row": label, "error": f"{type(e).__name__}: {e}"})
            continue
        job = last_job(cluster)
        up = int(job["bytes_up"])
        state = int(job.get("bytes_state", 0))
        rows.append({"row": label, "codec": codec, "H": h, "bytes_up": up, "samples": r["samples"],
                     "bytes_per_sample": up / max(1, r["samples"]), "accuracy": r["accuracy"],
                     "state_bytes_per_sample": state / max(1, r["samples"]), "seed": b.seed,
                     "wall_s": r["wall_s"]})
        if r.get("perplexity") is not None:  # lm tasks: the metric the rows are judged by
            rows[-1]["perplexity"] = r["perplexity"]
        if "state_local" in job or "state_moved" in job:  # top-k tasks that found their state in-process, or not
            rows[-1] |= {"state_local": int(job.get("state_local", 0)), "state_moved": int(job.get("state_moved", 0))}
        if codec == "none" and h == 1:
            fp32_job = job
    base = next((r for r in rows if r.get("codec") == "none" and r.get("H") == 1), None)
    for r in rows:
        if base and "bytes_per_sample" in r:
            r["samples_vs_fp32"] = r["samples"] / max(1, base["samples"])
            r["ratio_vs_fp32_step"] = base["bytes_per_sample"] / r["bytes_per_sample"]
            r["accuracy_delta_pts"] = 100 * (r["accuracy"] - base["accuracy"])
            if "perplexity" in r and "perplexity" in base:
                r["perplexity_delta_pct"] = 100 * (r["perplexity"] / base["perplexity"] - 1)
    return rows, fp32_job


def artifact_rows(cluster: Cluster, job: dict[str, Any]) -> list[dict[str, Any]]:
    from safetensors.torch import save

    from pipeline.artifacts import ArtifactChain, build_artifact, load_artifact
    from pipeline.checkpoint import decode_checkpoint
    from pipeline.training import evaluate
    from storage import keys
    from storage.datastore import Manifest, read_split
    from storage.objectstore import open_store

    store = open_store(cluster.settings)
    ckpt = decode_checkpoint(store.get(keys.checkpoint(job["job_id"], job["version"])), "final")
    manifest = Manifest.from_json(store.get(job["manifest"]))
    xt, yt, _ = read_split(store, manifest.test)
    fp32_bytes = len(save({k: v.float().contiguous() for k, v in ckpt.state.items()}))
    base_acc = evaluate(ckpt.build(), xt, yt, "classify")["accuracy"]
    rows = []
    for text in CHAINS:
        data, stats = build_artifact(ckpt.model, ckpt.model_args, ckpt.state, chain=ArtifactChain.parse(text))
        acc = evaluate(load_artifact(data).model, xt, yt, "classify")["accuracy"]
        rows.append({"chain": text, "stored_bytes": len(data), "fp32_safetensors_bytes": fp32_bytes,
                     "ratio": fp32_bytes / len(data), "accuracy": acc, "accuracy_drop_pts": 100 * (base_acc - acc),
                     "sparsity": stats.get("sparsity")})
    return rows


def distill_row(cluster: Cluster, b: Budget, teacher_acc: float) -> dict[str, Any]:
    from pipeline.models import build_model, count_parameters

    # The 8x smaller student is fragile: at the teacher's lr 0.05/momentum 0.9 budget it stalls (17%
    # measured); lr 0.1, momentum 0.5 and twice the teacher's epochs reach within 2 points (96.1% in a
    # single-process check against a 97.5% teacher).
    spec = b.spec(kind="distill", model="digits-cnn-small", teacher="digits-cnn@production", lr=0.1,
                  momentum=0.5, epochs=2 * b.epochs, temperature=4.0, alpha=0.7, promote=None)
    r = cluster.run(spec, b.row_timeout_s)
    t, s = count_parameters(build_model("digits-cnn")), count_parameters(build_model("digits-cnn-small"))
    return {"teacher_params": t, "student_params": s, "param_ratio": t / s, "teacher_accuracy": teacher_acc,
            "student_accuracy": r["accuracy"], "accuracy_drop_pts": 100 * (teacher_acc - r["accuracy"])}


def blob_anatomy(rows: list[str], density: float = 0.01, model: str = "digits-cnn",
                 model_args: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """What one gradient blob of ``model`` is made of, per codec: the envelope's prelude + JSON header (the codec's
    own part of it apart) and the payload (safetensors, zstd'd for every codec but ``none``), on a random
    gradient with the shard worker's meta (a 32-hex job id, step 1000, unsigned as in this bench)."""
    import torch

    from pipeline import blobs, codecs
    from pipeline.models import build_model

    params = dict(build_model(model, model_args).named_parameters())
    gen = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(tuple(p.shape), generator=gen) for n, p in params.items()}
    out = []
    for text in rows:
        name, _ = parse_row(text, (1,))
        v = VARIANTS.get(name, {"codec": name})
        cfg = codecs.CodecConfig(v["codec"], density=v.get("codec_density", density),
                                 dense_below=v.get("codec_dense_below", 0))
        enc = codecs.encode(grads, cfg)
        meta = {"kind": "gradient", "job": "0" * 32, "shard": 1, "base_version": 1000, "step": 1000, "attempt": 0,
                "samples": 32, "loss": 0.12345678901234567, "codec": enc.meta}
        data = blobs.encode(enc.tensors, meta, compress=cfg.name != "none")
        header, payload = blobs.read_header(data)
        codec_meta = len(json.dumps(enc.meta, sort_keys=True, separators=(",", ":")))
        out.append({"row": name, "blob_bytes": len(data), "header_bytes": len(data) - len(payload),
                    "codec_meta_bytes": codec_meta, "payload_bytes": len(payload)})
    return out


def budget(model: str, quick: bool, seed: int, epochs: int | None, spec: dict[str, Any] | None = None) -> Budget:
    """Every row's budget: digits as issue 14 set it (5 epochs, 2 quick), any other model the training bench's;
    ``spec`` (``--spec``) is set on every row, under a variant's own fields."""
    if model == "digits-cnn":
        return Budget("digits-cnn", {}, "digits", {}, "classify", batch_size=32, epochs=epochs or (2 if quick else 5),
                      lr=0.05, seed=seed, row_timeout_s=300 if quick else 900 * max(1, (epochs or 5) // 5),
                      common_spec=spec or {})
    b = budget_for(model, quick)
    return replace(b, epochs=epochs or b.epochs, seed=seed, row_timeout_s=b.row_timeout_s * (epochs or b.epochs),
                   common_spec=spec or {})


def run(quick: bool, seeds: tuple[int, ...] = (0,), codecs: list[str] | None = None, hs: tuple[int, ...] = (1, 8),
        distill: bool = True, speed: bool = True, epochs: int | None = None,
        artifacts: bool = True, model: str = "digits-cnn", spec: dict[str, Any] | None = None) -> dict[str, Any]:
    rows_wanted = codecs or (QUICK_CODECS if quick else CODECS)
    anatomy_rows = list(dict.fromkeys(parse_row(text, hs)[0] for text in rows_wanted))
    if model != "digits-cnn":  # the artifact and distillation rows evaluate digits classifiers
        artifacts = distill = False
    b0 = budget(model, quick, seeds[0], epochs, spec)
    result: dict[str, Any] = {"codecs": [], "artifacts": [],
                              "anatomy": blob_anatomy(anatomy_rows, model=b0.model, model_args=b0.model_args)}
    for seed in seeds:
        b = budget(model, quick, seed, epochs, spec)
        result["budget"] = {"epochs": b.epochs, "shards": b.shards, "batch_size": b.batch_size, "seeds": list(seeds),
                            "spec": b.common_spec}
        if model != "digits-cnn":
            result["budget"] |= {"model": b.model, "dataset": b.dataset, "dataset_args": b.dataset_args, "lr": b.lr,
                                 "momentum": b.momentum}
        with tempfile.TemporaryDirectory(prefix="aas-bench-compression-") as tmp, Cluster(Path(tmp), b.shards) as c:
            rows, fp32_job = codec_rows(c, b, rows_wanted, hs)
            result["codecs"] += rows
            if fp32_job and artifacts:
                result["artifacts"] += [{**a, "seed": seed} for a in artifact_rows(c, fp32_job)]
            if fp32_job and distill and seed == seeds[0]:
                try:
                    teacher_acc = next(r["accuracy"] for r in rows if r.get("codec") == "none")
                    result["distill"] = distill_row(c, b, teacher_acc)
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    result["distill"] = {"error": f"{type(e).__name__}: {e}"}
    if not speed:
        return result
    try:
        import importlib.util

        spec = importlib.util.spec_from_file_location("aas_codecs_bench", Path(__file__).with_name("codecs.py"))
        mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
        result["codec_speed"] = mod.run(quick=True)
    except Exception as e:  # noqa: BLE001
        result["codec_speed"] = {"error": f"{type(e).__name__}: {e}"}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits-cnn", choices=["digits-cnn", "char-lm"],
                   help="digits-cnn (default) or char-lm (rows also report perplexity; no artifact or distillation "
                        "rows: they are digits-specific)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; every row runs once per seed")
    # argparse formats help with %: the variants' "3%" must be escaped
    p.add_argument("--codecs", help=f"comma-separated codecs or variants ({', '.join([*CODECS, *VARIANTS])})"
                   .replace("%", "%%"))
    p.add_argument("--local-steps", default="1,8", help="comma-separated H values")
    p.add_argument("--no-distill", action="store_true",
                   help="skip the distillation row (always skipped for char-lm)")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--no-artifacts", action="store_true",
                   help="skip the serving-artifact rows (always skipped for char-lm)")
    p.add_argument("--epochs", type=int, help="epoch budget of every row (digits: default 5, --quick 2, issue 14: 24; "
                                                "char-lm: default 1)")
    p.add_argument("--spec", default="{}", type=json.loads, metavar="JSON",
                   help="spec fields set on every row, under a variant's own (e.g. '{\"lr_schedule\": \"cosine\"}')")
    p.add_argument("--plot", metavar="PNG",
                   help="accuracy (char-lm: perplexity) against bytes per sample for every codec row")
    args = p.parse_args(argv)
    codecs = args.codecs.split(",") if args.codecs else None
    hs = tuple(int(x) for x in args.local_steps.split(","))
    for text in codecs or []:
        try:
            parse_row(text, hs)
        except ValueError as e:
            p.error(str(e))
    result = run(args.quick, tuple(int(x) for x in args.seeds.split(",")), codecs, hs, not args.no_distill,
                 not args.no_speed, args.epochs, not args.no_artifacts, args.model, args.spec)
    if args.json:  # first: a failing plot must not lose an hour of training
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    print(markdown(result))
    if args.plot:
        print(f"plot: {plot(result, args.plot)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
