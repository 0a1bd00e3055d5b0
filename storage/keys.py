"""Every Redis key and object-store key layout in one place (the whole on-store layout, readable here)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

PREFIX = "aas"

# ---------------------------------------------------------------- Redis keys


def job(job_id: str) -> str:
    """Hash: the job's durable state (spec, status, version, counters, error)."""
    return f"{PREFIX}:job:{job_id}"


def job_metrics(job_id: str) -> str:
    """List of JSON objects, one per published version: loss, accuracy, bytes, wall time."""
    return f"{PREFIX}:job:{job_id}:metrics"


def job_events(job_id: str) -> str:
    """Stream: everything notable that happened to the job (rejections, retries, failures)."""
    return f"{PREFIX}:job:{job_id}:events"


def job_consumed(job_id: str, version: int) -> str:
    """Set: identities of the gradient blobs that produced `version` (recorded with the version bump)."""
    return f"{PREFIX}:job:{job_id}:consumed:v{version}"


def job_launched(job_id: str, version: int) -> str:
    """String: set once the round computing on `version` has been enqueued (idempotent relaunch)."""
    return f"{PREFIX}:job:{job_id}:launched:v{version}"


def job_consumed_pattern(job_id: str) -> str:
    """SCAN pattern over every ``job_consumed`` set of a job (retention expires them when it ends)."""
    return f"{PREFIX}:job:{job_id}:consumed:v*"


def job_publish_requested(job_id: str, version: int) -> str:
    """String: set once the evaluation and publication of `version` has been enqueued (once per version)."""
    return f"{PREFIX}:job:{job_id}:publish:v{version}"


def job_publish_pattern(job_id: str) -> str:
    """SCAN pattern over every ``job_publish_requested`` marker of a job."""
    return f"{PREFIX}:job:{job_id}:publish:v*"


def job_launched_pattern(job_id: str) -> str:
    """SCAN pattern over every ``job_launched`` marker of a job."""
    return f"{PREFIX}:job:{job_id}:launched:v*"


def jobs_index() -> str:
    """Sorted set: job ids by creation time."""
    return f"{PREFIX}:jobs"


def watchdog_lock() -> str:
    """Lock: one watchdog sweep at a time across every worker."""
    return f"{PREFIX}:watchdog:lock"


def deliveries(task_id: str) -> str:
    """Counter: how many times a task message was delivered (poison-message cap)."""
    return f"{PREFIX}:deliveries:{task_id}"


def deliveries_pattern() -> str:
    """SCAN pattern over every delivery counter."""
    return f"{PREFIX}:deliveries:*"


# ---- liveness (storage/leases.py, workers/liveness.py)
# A worker process renews its heartbeat and the leases of the tasks it runs; both are TTL keys, so a process that
# dies or is stopped simply stops existing in Redis. A "slot" names one piece of a job's work that must be done
# (a sync round's shard or its aggregation; an async shard's data step); see slot_* below.


def worker_heartbeat(worker: str) -> str:
    """String with a TTL (JSON: host, pid, queues, broker, the task it runs): the worker process is alive."""
    return f"{PREFIX}:worker:{worker}"


def worker_heartbeat_pattern() -> str:
    """SCAN pattern over every live worker's heartbeat."""
    return f"{PREFIX}:worker:*"


def lease(task_id: str) -> str:
    """String with a TTL: the task message `task_id` is being run (or held for a retry) by a live worker."""
    return f"{PREFIX}:lease:{task_id}"


def job_leases(job_id: str) -> str:
    """Hash task id → JSON {slot, worker, what, started, state}: the leases taken for the job's tasks. An entry
    whose ``lease`` key expired is a lost lease (its worker died or stopped mid-task)."""
    return f"{PREFIX}:job:{job_id}:leases"


def job_done(job_id: str, version: int) -> str:
    """Set: shards whose blob for the round computing on `version` is uploaded (sync)."""
    return f"{PREFIX}:job:{job_id}:done:v{version}"


def job_results(job_id: str, version: int) -> str:
    """Hash shard → JSON result of its task (blob key, digest, numbers) for the round computing on `version`:
    what the shard that completes the round hands to the aggregation (the round's fan-in; no Celery chord)."""
    return f"{PREFIX}:job:{job_id}:results:v{version}"


def job_orphans(job_id: str) -> str:
    """Hash slot → when the monitor first saw it neither done, queued nor leased (relaunched after a grace)."""
    return f"{PREFIX}:job:{job_id}:orphans"


def job_lost(job_id: str) -> str:
    """Hash slot → how many times a worker died or hung while running it (the poison-message count)."""
    return f"{PREFIX}:job:{job_id}:lost"


def job_affinity(job_id: str) -> str:
    """Hash shard → JSON {worker, queue, step}: the worker process that holds the shard's codec state (top-k
    error feedback) and the data step it follows; its queue is where the shard's next task goes
    (workers/affinity.py). A hint: expires with the job."""
    return f"{PREFIX}:job:{job_id}:affinity"


def liveness_lock() -> str:
    """Lock: one liveness sweep at a time across every worker."""
    return f"{PREFIX}:liveness:lock"


def liveness_epoch() -> str:
    """String: set by the first sweep on this Redis; its absence means Redis lost its state (restart)."""
    return f"{PREFIX}:liveness:epoch"


def liveness_recovering() -> str:
    """Lock: one process rebuilds the jobs Redis lost, the others wait for it."""
    return f"{PREFIX}:liveness:recovering"


def slot_shard(version: int, shard: int) -> str:
    """Sync: shard `shard` of the round computing on `version`."""
    return f"v{version}:s{shard}"


def slot_aggregate(version: int) -> str:
    """Sync: the aggregation of the round computing on `version`."""
    return f"v{version}:agg"


def slot_publish(version: int) -> str:
    """Both modes: the evaluation and publication of committed `version`."""
    return f"v{version}:pub"


def slot_step(shard: int, step: int) -> str:
    """Async: shard `shard`'s data step `step` (its shard task and the application of its result)."""
    return f"s{shard}:t{step}"


@dataclass(frozen=True)
class Slot:
    kind: str  # "shard" | "aggregate" | "publish" | "step"
    version: int = -1  # sync kinds
    shard: int = -1  # shard, step
    step: int = -1  # step


_SLOT = re.compile(r"^(?:v(?P<v>\d+):(?:s(?P<s>\d+)|(?P<agg>agg)|(?P<pub>pub))|s(?P<as>\d+):t(?P<t>\d+))$")


def parse_slot(slot: str) -> Slot:
    """Inverse of ``slot_shard``, ``slot_aggregate``, ``slot_publish`` and ``slot_step``; ValueError for
    anything else."""
    m = _SLOT.match(slot)
    if not m:
        raise ValueError(f"not a slot: {slot!r} (expected v<version>:s<shard>, v<version>:agg, v<version>:pub "
                         "or s<shard>:t<step>)")
    if m["agg"]:
        return Slot("aggregate", version=int(m["v"]))
    if m["pub"]:
        return Slot("publish", version=int(m["v"]))
    if m["v"] is not None:
        return Slot("shard", version=int(m["v"]), shard=int(m["s"]))
    return Slot("step", shard=int(m["as"]), step=int(m["t"]))


def fault_armed(point: str, scope: str) -> str:
    """String: an ``=armed`` fault point may fire once for `scope` (a chaos run arms it when it chooses)."""
    return f"{PREFIX}:fault-armed:{point}:{scope}"


def fault_fired(point: str, scope: str) -> str:
    """String: set once an armed fault point fired for `scope` (a job), so it fires once (tests, chaos)."""
    return f"{PREFIX}:fault:{point}:{scope}"


# ---------------------------------------------------------------- object keys


def live_jobs() -> str:
    """JSON: the ids of the jobs running when the liveness monitor last looked. After Redis lost its state the
    monitor rebuilds these jobs from their records and checkpoints and relaunches them."""
    return "ops/live-jobs.json"


def live_marker_prefix() -> str:
    return "ops/live/"


def live_marker(job_id: str) -> str:
    """Empty: written when a job is submitted, before Redis knows it, and removed once it ended. The list above
    lags the monitor's last sweep; a job submitted in that gap is found here after Redis lost its state."""
    return f"{live_marker_prefix()}{job_id}"


def dataset_prefix(dataset_id: str) -> str:
    return f"datasets/{dataset_id}"


def dataset_manifest(dataset_id: str) -> str:
    """JSON: shard keys, sample counts and sha256 of every shard, plus the test split."""
    return f"datasets/{dataset_id}/manifest.json"


def dataset_shard(dataset_id: str, shard: int) -> str:
    return f"datasets/{dataset_id}/shard-{shard:05d}.aast"


def dataset_test(dataset_id: str) -> str:
    return f"datasets/{dataset_id}/test.aast"


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/"


def job_record(job_id: str) -> str:
    """JSON: the job's spec and staging facts, so a job survives the loss of Redis (aas resume)."""
    return f"jobs/{job_id}/job.json"


def checkpoint_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/ckpt/"


def checkpoint(job_id: str, version: int) -> str:
    """Training checkpoint: fp32 weights + optimizer state + model arguments + step."""
    return f"jobs/{job_id}/ckpt/v{version:06d}.aast"


_CHECKPOINT = re.compile(r"^jobs/(?P<job>[^/]+)/ckpt/v(?P<version>\d+)\.aast$")


def parse_checkpoint(key: str) -> int | None:
    """The version a checkpoint key names; None for any other key (optimizer state included)."""
    m = _CHECKPOINT.match(key)
    return int(m["version"]) if m else None


def checkpoint_versions(listed: Iterable[str]) -> list[int]:
    """The versions among listed object keys that are checkpoints, sorted."""
    return sorted(v for k in listed if (v := parse_checkpoint(k)) is not None)


def version_recipe(job_id: str, version: int, part: int | None = None) -> str:
    """A version stored between full checkpoints (``checkpoint_every_versions``): its recipe, from which it is
    rebuilt (workers/rebuild.py); its checkpoint key then names no object. With `part`: the recipe of that
    parameter range of a version aggregated in parts (its checkpoint part names no object)."""
    return recipe_of(checkpoint(job_id, version) if part is None else checkpoint_part(job_id, version, part))


def recipe_of(checkpoint_key: str) -> str:
    """The recipe stored in place of a checkpoint (or checkpoint part) between full checkpoints."""
    return checkpoint_key.removesuffix(".aast") + ".recipe.aast"


_RECIPE = re.compile(r"^jobs/(?P<job>[^/]+)/ckpt/v(?P<version>\d+)\.recipe\.aast$")


def recipe_versions(listed: Iterable[str]) -> list[int]:
    """The versions among listed object keys that are stored as recipes, sorted."""
    return sorted(int(m["version"]) for k in listed if (m := _RECIPE.match(k)))


def checkpoint_part(job_id: str, version: int, part: int) -> str:
    """Parameter range `part` of a version aggregated in parts (its checkpoint key holds the list of parts)."""
    return f"jobs/{job_id}/ckpt/v{version:06d}.p{part:03d}.aast"


_PART = re.compile(r"^jobs/(?P<job>[^/]+)/ckpt/v(?P<version>\d+)\.p(?P<part>\d+)\.aast$")


def parse_version_key(key: str) -> tuple[int, int | None] | None:
    """(version, part) a checkpoint key (part None) or a checkpoint part's key names; None for any other key."""
    if (v := parse_checkpoint(key)) is not None:
        return v, None
    m = _PART.match(key)
    return (int(m["version"]), int(m["part"])) if m else None


def job_parts(job_id: str, version: int) -> str:
    """Hash part → what that aggregation part of round `version` consumed; the last part to finish commits."""
    return f"{PREFIX}:job:{job_id}:parts:v{version}"


def job_part_claims(job_id: str, version: int) -> str:
    """Hash range → the aggregator process that took that parameter range of round `version`."""
    return f"{PREFIX}:job:{job_id}:parts:v{version}:claims"


def job_parts_pattern(job_id: str) -> str:
    """SCAN pattern over a job's ``job_parts`` and ``job_part_claims`` hashes (retention expires them)."""
    return f"{PREFIX}:job:{job_id}:parts:v*"


def optimizer_state(checkpoint_key: str) -> str:
    """The optimizer state written beside a checkpoint's weights (shard workers read its momentum buffers only to
    replay versions and for async weight prediction)."""
    return checkpoint_key.removesuffix(".aast") + ".opt.aast"


def gradient(job_id: str, version: int, shard: int, attempt: int, part: int | None = None) -> str:
    """A gradient (or pseudo-gradient) blob; its identity is (job, shard, base version, attempt). With
    ``aggregation_parts`` > 1 a shard writes one blob per parameter range, `part` 0..K-1."""
    return f"{gradient_attempts(job_id, version, shard)}{attempt}{'' if part is None else f'.p{part:03d}'}.aast"


def gradients_prefix(job_id: str) -> str:
    """Every gradient blob of a job lies under this prefix (a shard result may name nothing else)."""
    return f"jobs/{job_id}/grads/"


def gradients_of_round(job_id: str, version: int) -> str:
    """The prefix of every blob computed on base version `version` (a sync round's, every shard and attempt)."""
    return f"{gradients_prefix(job_id)}v{version:06d}/"


def gradient_attempts(job_id: str, version: int, shard: int) -> str:
    """The prefix shared by every attempt of one shard's blob for one base version."""
    return f"{gradients_of_round(job_id, version)}s{shard:05d}-a"


def codec_states_prefix(job_id: str) -> str:
    """Every codec state of a job (``codec_state="store"``) lies under this prefix."""
    return f"jobs/{job_id}/codec-state/"


def codec_state(job_id: str, shard: int, step: int) -> str:
    """A shard's top-k error-feedback state (residual, velocity) after its task at data step ``step``; the task
    at step s reads the one its shard wrote at s − H, so a redelivery reads the same state."""
    return f"{codec_states_prefix(job_id)}s{shard:05d}/t{step:09d}.aast"


@dataclass(frozen=True)
class GradientKey:
    job: str
    version: int
    shard: int
    attempt: int
    part: int | None = None  # the parameter range, when the job aggregates in parts


_GRADIENT = re.compile(r"^jobs/(?P<job>[^/]+)/grads/v(?P<version>\d+)/s(?P<shard>\d+)-a(?P<attempt>\d+)"
                       r"(?:\.p(?P<part>\d+))?\.aast$")


def parse_gradient(key: str) -> GradientKey | None:
    """The parts of a gradient blob's key; None for any other key."""
    m = _GRADIENT.match(key)
    if not m:
        return None
    part = int(m["part"]) if m["part"] is not None else None
    return GradientKey(m["job"], int(m["version"]), int(m["shard"]), int(m["attempt"]), part)


def artifact(model: str, version: int) -> str:
    """A serving artifact registered in the model registry."""
    return f"models/{model}/v{version:06d}.aast"


def gradient_identity(job_id: str, shard: int, version: int, attempt: int) -> str:
    """A blob's identity as the version bump records it: ``job/s{shard}/v{base version}/a{attempt}``."""
    return f"{job_id}/s{shard}/v{version}/a{attempt}"


_IDENTITY = re.compile(r"^(?P<job>[^/]+)/s(?P<shard>\d+)/v(?P<version>\d+)/a(?P<attempt>\d+)$")


def parse_identity(identity: str) -> GradientKey:
    """Inverse of ``gradient_identity``; ValueError for anything else."""
    m = _IDENTITY.match(identity)
    if not m:
        raise ValueError(f"not a gradient identity: {identity!r} (expected job/s<shard>/v<version>/a<attempt>)")
    return GradientKey(m["job"], int(m["version"]), int(m["shard"]), int(m["attempt"]))


# ---- registry
# Records live in Redis as JSON; artifacts live in the object store at ``artifact(model, version)``.
# Model names never contain ':' (the registry validates them), so these keys cannot collide.


def registry_models() -> str:
    """Set: names of every model that has had at least one committed version."""
    return f"{PREFIX}:registry:models"


def registry_version_counter(model: str) -> str:
    """Counter: the last version number handed out for `model` (INCR; numbers are never reused)."""
    return f"{PREFIX}:registry:model:{model}:counter"


def registry_versions(model: str) -> str:
    """Hash: version number → VersionRecord JSON. A field appears only once its artifact is verified."""
    return f"{PREFIX}:registry:model:{model}:versions"


def registry_aliases(model: str) -> str:
    """Hash: alias name → version number."""
    return f"{PREFIX}:registry:model:{model}:aliases"


def registry_alias_history(model: str, alias: str) -> str:
    """List: versions `alias` pointed to before, newest first (what a rollback returns to)."""
    return f"{PREFIX}:registry:model:{model}:history:{alias}"


def registry_idempotency(model: str) -> str:
    """Hash: idempotency key (the aggregator's ``job:version``) → version number it registered."""
    return f"{PREFIX}:registry:model:{model}:idempotency"


def registry_model_info(model: str) -> str:
    """Hash, written once when `model` gets its first version: owner (the job that created it, "" for a
    token holder), eval_set (JSON: the test split every later version is compared on for promotion)."""
    return f"{PREFIX}:registry:model:{model}:info"


def registry_events() -> str:
    """Stream: every registry change {type: registered|alias|deleted, model, version, alias}."""
    return f"{PREFIX}:registry:events"


def registry_wakeup() -> str:
    """Pub/sub channel: a best-effort nudge after each change (the stream is the durable record)."""
    return f"{PREFIX}:registry:wakeup"


# ---- async mode


def job_pending(job_id: str) -> str:
    """List of JSON entries: accepted async updates not yet folded into a published version."""
    return f"{PREFIX}:job:{job_id}:pending"


def job_progress(job_id: str) -> str:
    """Hash shard → next data step the job expects from that shard (async mode's exactly-once guard)."""
    return f"{PREFIX}:job:{job_id}:progress"


def job_ahead(job_id: str) -> str:
    """Set of "shard:step": async steps accepted above their shard's mark (results that arrived out of order)."""
    return f"{PREFIX}:job:{job_id}:ahead"


def job_issued(job_id: str) -> str:
    """Hash "shard@step" → attempt of each async shard task in flight (idempotent issue), and "shard:n" → the
    shard's count of attempts issued (each task's blob gets a key of its own)."""
    return f"{PREFIX}:job:{job_id}:issued"


def job_lock(job_id: str) -> str:
    """Lock: one aggregation at a time per job."""
    return f"{PREFIX}:job:{job_id}:lock"


# ---- ops
# Beat schedules live in RedBeat's own records under ``redbeat_prefix()``; what a schedule has seen and
# done lives under ``aas:schedule:<name>:*``. Schedule names never contain ':' (validated).


def redbeat_prefix() -> str:
    """RedBeat's key prefix: its entries (hash per schedule), its due-time zset and its beat lock."""
    return f"{PREFIX}:beat:"


def schedule_seen(name: str) -> str:
    """Set: object keys under the schedule's dataset prefix already handed to a retrain job."""
    return f"{PREFIX}:schedule:{name}:seen"


def schedule_runs(name: str) -> str:
    """Stream: one entry per firing of the schedule {outcome: submitted|skipped|failed, reason, job}."""
    return f"{PREFIX}:schedule:{name}:runs"


def schedule_fired(name: str) -> str:
    """Counter: how many times the schedule's retrain task ran (each beat firing runs it once)."""
    return f"{PREFIX}:schedule:{name}:fired"


def schedule_lock(name: str) -> str:
    """Lock: one retrain of a schedule at a time (two overlapping firings never submit the same data)."""
    return f"{PREFIX}:schedule:{name}:lock"


def schedule_firing(name: str, firing_id: str) -> str:
    """String, set once per firing (the retrain task's id): a redelivered firing does not run twice."""
    return f"{PREFIX}:schedule:{name}:firing:{firing_id}"
