"""Evaluating a committed version and publishing it to the model registry (the ``publish`` queue).

Off the commit path: the aggregator commits version N and launches round N at once; this task then
evaluates N on the test split and registers its serving artifact while the shards compute. Only the
versions ``publish_every_versions`` asks for are evaluated (every Nth, 0: the last only) — every version
when the job has a ``target_accuracy`` (its stop rule reads the test accuracy), and always the last. Of
those, only the newest: a task for N finding a newer due version committed leaves it to that one's task.
Evaluation costs CPU the shards could use (on a small machine it is most of the aggregator's time), so a job
that registers only its final version is evaluated only then. The registry's idempotency key
``{job}:{version}`` makes the registration happen once, whatever crashes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pipeline.artifacts import ArtifactChain, build_artifact, load_artifact
from pipeline.checkpoint import Checkpoint
from pipeline.names import registry_name
from pipeline.security import holds_registry_right
from pipeline.spec import JobSpec
from pipeline.training import evaluate
from storage import keys
from storage.jobstate import TERMINAL, JobState
from workers.context import Context

log = logging.getLogger(__name__)


def model_name(spec: JobSpec) -> str:
    return registry_name(spec.model, spec.register_as)


def evaluation_due(spec: JobSpec, version: int, total_rounds: int) -> bool:
    """Whether committed `version` is to be evaluated (and, when due there too, registered)."""
    if version <= 0:
        return False
    if version >= total_rounds or spec.target_accuracy is not None:
        return True
    n = spec.publish_every_versions
    return n > 0 and version % n == 0


def newer_due(spec: JobSpec, version: int, newest: int, total_rounds: int) -> bool:
    """Whether a version after `version`, up to the newest committed one, is due for evaluation."""
    if newest <= version:
        return False
    if evaluation_due(spec, newest, total_rounds):
        return True
    n = spec.publish_every_versions  # else the last multiple of n before `newest`, if after `version`
    return n > 0 and (newest // n) * n > version


def evaluate_and_publish(ctx: Context, job_id: str, version: int) -> dict[str, Any]:
    """Evaluate committed `version` (unless a newer due one is committed) and register it when due."""
    job = ctx.jobs.get(job_id)
    if job.status in TERMINAL or version > job.version or version <= 0:
        return {"job": job_id, "version": version, "skipped": job.status if job.status in TERMINAL else "not committed"}
    if newer_due(JobSpec.model_validate(job.spec), version, job.version, job.total_rounds):
        return {"job": job_id, "version": version, "skipped": f"v{job.version} is newer"}
    ckpt = ctx.checkpoint(keys.checkpoint(job_id, version), job_id)
    manifest = ctx.manifest(job.fields["manifest"])
    xt, yt = ctx.split(manifest.test, job_id)
    t0 = time.perf_counter()
    # The checkpoint's own tensors, not a copy: evaluation only reads them, and nothing else runs in this
    # process meanwhile (workers use the solo pool).
    metrics = evaluate(ckpt.build("cpu", copy=False), xt, yt, str(manifest.meta.get("task", "classify")))
    metrics["eval_s"] = round(time.perf_counter() - t0, 4)
    ctx.jobs.record_evaluation(job_id, version, metrics)
    rec = publish_version(ctx, job, version, ckpt, metrics)
    return {"job": job_id, "version": version, "metrics": metrics, "registered": rec}


def publish_version(ctx: Context, job: JobState, version: int, ckpt: Checkpoint, metrics: dict[str, Any]
                    ) -> dict[str, Any] | None:
    """Register `version` of `job` (once), with its test `metrics`. Returns the version record, or None if
    nothing to do (not due under ``publish_every_versions``, or registered already)."""
    spec = JobSpec.model_validate(job.spec)
    final = version >= job.total_rounds
    if spec.publish_every_versions == 0 and not final:
        return None
    if spec.publish_every_versions > 1 and version % spec.publish_every_versions and not final:
        return None
    reg = ctx.registry()
    name = model_name(spec)
    idem = f"{job.job_id}:{version}"
    done = ctx.redis.hget(keys.registry_idempotency(name), idem)
    if done is not None:
        return None
    chain = ArtifactChain.parse(spec.artifact_chain)
    parts, stats = build_artifact(ckpt.model, ckpt.model_args, ckpt.state, chain=chain, as_parts=True,
                                  meta={"job": job.job_id, "version": version}, signing_key=ctx.signing_key)
    # Accuracy after compression: evaluate what the inference workers will actually serve. A lossless
    # chain (fp32, sparse storage of exact zeros, zstd) serves the very weights just evaluated.
    lossless = chain.quantize == "none" and chain.prune_threshold is None and chain.prune_sparsity is None
    if lossless and metrics.get("accuracy") is not None:
        after = {k: metrics[k] for k in ("loss", "accuracy", "perplexity") if k in metrics}
    else:
        served = load_artifact(b"".join(parts), f"artifact of {idem}", signing_key=ctx.signing_key).model
        manifest = ctx.manifest(job.fields["manifest"])
        xt, yt = ctx.split(manifest.test, job.job_id)
        after = evaluate(served, xt, yt, str(manifest.meta.get("task", "classify")))
    authorized = holds_registry_right(ctx.settings, job.job_id, name, job.fields.get("registry_grant"))
    manifest = ctx.manifest(job.fields["manifest"])
    own_eval = {"split": manifest.test, "task": str(manifest.meta.get("task", "classify"))}
    eval_set = reg.model_info(name).get("eval_set") or own_eval
    if eval_set == own_eval:
        eval_accuracy = after["accuracy"]
    else:  # the model's own evaluation set, never the one this job brought
        eval_accuracy = _accuracy_on(ctx, job.job_id, b"".join(parts), idem, eval_set)
    rec = reg.register(
        name, parts, codec=chain.describe(),
        metrics={
            "loss": metrics.get("loss"), "accuracy_before": metrics.get("accuracy"),
            "accuracy": after["accuracy"], "loss_after": after["loss"], "eval_accuracy": eval_accuracy,
            **({"perplexity": after["perplexity"]} if "perplexity" in after else {}),
            "raw_bytes": stats["raw_bytes"], "stored_bytes": stats["stored_bytes"], "ratio": stats["ratio"],
        },
        lineage={
            "job": job.job_id, "round": version, "parent_version": job.fields.get("registered_version"),
            "data_manifest": job.fields["manifest"], "teacher": job.fields.get("teacher"), "model": spec.model,
        },
        idempotency_key=idem,
        promote_if_better=spec.promote,
        owner=job.job_id,
        authorized=authorized,
        eval_set=own_eval,
        decoded_by_caller=True,  # built above from the weights just evaluated: verified by digest, not decoded
    )
    ctx.jobs.set_fields(job.job_id, registered_model=name, registered_version=rec.version)
    if ctx.settings.registry_keep_versions > 0:  # versions no alias (or rollback) needs, beyond the newest N
        reg.apply_retention(name, ctx.settings.registry_keep_versions)
    return rec.to_dict()


def _accuracy_on(ctx: Context, job_id: str, artifact: bytes, where: str, eval_set: dict[str, Any]) -> float | None:
    """The served artifact's accuracy on a model's recorded evaluation set; None when it cannot run on it."""
    try:
        served = load_artifact(artifact, f"artifact of {where}", signing_key=ctx.signing_key).model
        xt, yt = ctx.split(eval_set["split"], job_id)
        return float(evaluate(served, xt, yt, str(eval_set.get("task", "classify")))["accuracy"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        log.warning("%s cannot be evaluated on the model's evaluation set: %s", where, e)
        return None
