"""The job spec: what to train, on what, how. Validated at submit; an invalid spec enqueues nothing."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.codecs import CODECS, ERROR_FEEDBACK, PACKED_BITS
from pipeline.data import DataError, check_dataset_name
from pipeline.imports import ImportRefused, check_import
from pipeline.models import BUILTIN as BUILTIN_MODELS
from pipeline.models import ModelError, get_factory
from pipeline.names import BadName, check_alias, check_name

MAX_ARGS_JSON = 16 * 1024  # bytes of model_args / dataset_args as JSON
MAX_SEED = 2**63 - 1  # torch.manual_seed takes 64 bits; hash_seed keeps 63


class SpecError(ValueError):
    """An invalid job spec. The message names the field and the problem."""


class JobSpec(BaseModel):
    """One training job. Every field has a default that trains digits-cnn to ≥95% test accuracy."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # lr=inf would train to NaN

    kind: Literal["train", "distill"] = "train"
    model: str = Field(default="digits-cnn", max_length=300)  # built-in or "module:factory"
    model_args: dict[str, Any] = Field(default_factory=dict)
    dataset: str = Field(default="digits", max_length=300)  # built-in or "module:function"
    dataset_args: dict[str, Any] = Field(default_factory=dict)
    shards: int = Field(default=2, ge=1, le=100_000)
    mode: Literal["sync", "async"] = "sync"
    local_steps: int = Field(default=1, ge=1, le=10_000)  # H inner steps per round (DiLoCo when > 1)
    # Sync: K aggregation tasks, each owning a contiguous range of the parameters (ps-lite's servers); shards
    # upload one blob per range, the K tasks run in parallel, the last one commits the version.
    aggregation_parts: int = Field(default=1, ge=1, le=64)
    # Sync: a full checkpoint (weights + optimizer state) every K versions and for the last; each version between
    # is stored as its recipe (the update blobs it folded, the optimizer's settings, a checksum of the result; one per
    # parameter range with aggregation_parts), from which any reader rebuilds it exactly (workers/rebuild.py).
    # 1: every version whole.
    checkpoint_every_versions: int = Field(default=1, ge=1, le=10_000)
    batch_size: int = Field(default=32, ge=1, le=65_536)  # per shard and step
    epochs: int = Field(default=5, ge=1, le=100_000)
    optimizer: Literal["sgd"] = "sgd"  # the aggregator's optimizer (outer optimizer when local_steps > 1)
    lr: float = Field(default=0.05, gt=0, le=100)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    # The learning rate over the job: "constant", or "cosine" from its value down towards 0 at the job's last
    # version (torch's CosineAnnealingLR over the job's versions), after a linear warm-up over the first
    # lr_warmup_versions (pipeline/aggregate.py lr_factor). It schedules the aggregator's lr (sync and async), and
    # with local_steps > 1 the inner lr (DiLoCo's inner cosine; the outer lr stays constant, as in the paper).
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_warmup_versions: int = Field(default=0, ge=0, le=1_000_000)
    inner_optimizer: Literal["sgd", "adamw"] = "sgd"  # used when local_steps > 1
    inner_lr: float = Field(default=0.05, gt=0, le=100)
    # Inner SGD's momentum (0: plain SGD, stateless). With inner_state "keep" each shard's momentum buffer goes from
    # its round to its next (local SGD with momentum: SlowMo, Wang et al. 2020; Lin et al. 2020), as sync
    # training's buffer goes from step to step.
    inner_momentum: float = Field(default=0.0, ge=0, lt=1)
    outer_lr: float = Field(default=0.7, gt=0, le=100)
    outer_momentum: float = Field(default=0.9, ge=0, lt=1)
    # A stateful inner optimizer (AdamW) at H>1: "reset" it every round (the default), or "keep" its state from each
    # shard's round to the shard's next, as DiLoCo's workers do (Douillard et al. 2023; held and routed like top-k's
    # error feedback, see codec_state). Measured (docs/benchmarks.md): on char-lm at 4 epochs (H=8, 73 outer steps,
    # AdamW 1e-3, plain averaging) kept 4.31 against 5.16 reset (fp32 sync 6.28); on the fleet workload (a 13x
    # larger char-lm) kept was worse: 11.81 against 10.29 at H=32, 11.23 against 8.59 at H=8. SGD has no state.
    inner_state: Literal["keep", "reset"] = "reset"
    max_staleness: int = Field(default=4, ge=0, le=10_000)  # async: drop updates older than this many versions
    staleness_rule: Literal["inverse", "constant"] = "inverse"  # async: η/(1+s) or η
    # async: delay compensation's λ0 (DC-ASGD-a, Zheng et al. 2017; 0: none), applied to every stale update. Off by
    # default: on char-lm at its longest budget measured then (quick corpus, 16 epochs, lr 0.1, cosine) it made
    # async worse in every measurement (ops/bench/run async_sim: +25% perplexity against sync at λ0 2 and 32, +13%
    # without; the pipeline at λ0 32 collapsed to a unigram-level model, +64% and +72%), and on digits at 24
    # epochs it changed nothing (docs/benchmarks.md).
    delay_compensation: float = Field(default=0.0, ge=0, le=100)
    # async: the fraction of asynchrony's implicit momentum, s̄/(1+s̄) for updates s̄ versions stale on average
    # (Mitliagkas et al. 2016, "Asynchrony begets momentum"), taken off the momentum of each version's step (0:
    # none, 1: all of it, the default without weight prediction; with it, 0). Measured with one 3×-slow worker:
    # char-lm at lr 0.1 (16 epochs of the quick corpus, cosine) 12.4–14.9 perplexity on every seed, −5.1% of sync
    # averaged over four seeds (sync's own seeds: 11.1–16.8; the old defaults, 0 with λ0 32: +64% and +72%, a
    # collapse); digits at 24 epochs equal to sync. It lowers the step's effective rate lr/(1−μ), so it learns
    # slower: digits at 5 epochs lost 5-9 points, and char-lm at lr 0.05, where sync is stable, ends ~20% above
    # sync (weight_prediction does better there; at lr 0.1, on the edge of sync's own stability, only this keeps
    # async from collapsing).
    staleness_momentum: float = Field(default=1.0, ge=0, le=1)
    # async: weight prediction (pipeline/aggregate.py predict_weights_): each shard task computes its gradient on
    # the weights this many versions ahead of the newest, each step repeating the last one (w − k·lr·momentum),
    # so an update applied late was computed near the weights it is applied to (SpecTrain, Chen et al. 2018). 0:
    # none. Needs momentum (the last step's direction); a shard worker reads the version's momentum buffers once
    # and holds them beside the weights, and each task trains a copy of the weights (memory: ~3× the model's).
    # An async job that gives none gets 1 where it has momentum and one SGD step per version (_default_prediction).
    weight_prediction: float = Field(default=0.0, ge=0, le=16)
    # async: a version every K accepted updates, one step on their mean (default for async jobs: `shards`)
    publish_every: int = Field(default=1, ge=1, le=100_000)
    codec: str = "none"
    codec_density: float = Field(default=0.01, gt=0, le=1)  # topk: fraction kept
    # topk, Deep Gradient Compression (Lin et al. 2018): worker-side momentum with momentum-factor masking
    # (the aggregator then runs plain SGD: momentum defaults to 0 and must be 0), and a density warm-up from
    # 25% to codec_density over this many epochs (exponential; 0: none).
    codec_momentum: float = Field(default=0.0, ge=0, lt=1)
    codec_warmup_epochs: float = Field(default=0.0, ge=0, le=1000)
    # topk: tensors of at most this many elements (biases, norm gains) are sent whole (0: every tensor top-k)
    codec_dense_below: int = Field(default=0, ge=0, le=1 << 30)
    # topk: DGC local gradient clipping at this L2 norm, as sync training would clip the summed gradient; each of
    # the N shards clips its own at norm · N^-1/2, before its velocity and residual (0: none). Off by default: on
    # char-lm at 4 epochs a norm of 1.0 (about the sync gradient's own) cost +12% perplexity against the same job
    codec_clip_norm: float = Field(default=0.0, ge=0, le=1e6)
    # topk error feedback and a kept inner optimizer state: where a shard's state lives between steps. "store": in
    # the object store, keyed by (job, shard, step), so a shard that moves to another worker (or a redelivered
    # task) continues exactly; "process": only in the worker process's memory (no extra bytes; lost when the
    # shard moves). The default: storing the dense state costs ~50-100x the top-k gradient's bytes and bought no
    # accuracy in docs/benchmarks.md's runs (the store and process rows differ by less than the seed-to-seed spread).
    codec_state: Literal["store", "process"] = "process"
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    target_accuracy: float | None = Field(default=None, gt=0, le=1)  # stop rule: stop once reached
    register_as: str | None = None  # registry model name; defaults to the job's model name
    # Register every Nth version (0: only the final one).
    publish_every_versions: int = Field(default=1, ge=0, le=100_000)
    promote: str | None = "production"  # alias moved to a new version when its accuracy ≥ the current one's
    artifact_chain: str = Field(default="zstd", max_length=200)  # serving artifact packing, e.g. "prune:0.5,int8,zstd"
    teacher: str | None = Field(default=None, max_length=300)  # distill: "registry-model@version-or-alias"
    # Fine-tune: start from a registered version ("model@alias" or "model@7").
    init_from: str | None = Field(default=None, max_length=300)
    temperature: float = Field(default=4.0, gt=0, le=1000)
    alpha: float = Field(default=0.7, ge=0, le=1)
    # Big models on the workers: a batch too large for the device runs in micro-batches of this many rows
    # (the same gradient, one slice's activations in memory); "auto" precision is bf16 autocast on CUDA,
    # fp32 on the CPU (pipeline/training.py autocast_dtype).
    micro_batch_size: int | None = Field(default=None, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"

    # User code is never imported while fields are checked: the field validators check the name's shape and
    # the allowlist only; the import happens in _consistent, which pydantic runs only once every field passed.
    @field_validator("model")
    @classmethod
    def _model_allowed(cls, v: str) -> str:
        if v in BUILTIN_MODELS:
            return v
        if ":" not in v:
            known = ", ".join(sorted(BUILTIN_MODELS))
            raise ValueError(f"unknown model {v!r} (built-in: {known}; or 'module:factory')")
        try:
            check_import(v, "model")
        except ImportRefused as e:
            raise ValueError(str(e)) from None
        return v

    @field_validator("dataset")
    @classmethod
    def _dataset_allowed(cls, v: str) -> str:
        try:
            check_dataset_name(v, import_it=False)
        except DataError as e:
            raise ValueError(str(e)) from None
        return v

    @field_validator("model_args", "dataset_args")
    @classmethod
    def _args_bounded(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:
            size = len(json.dumps(v, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise ValueError(f"must be JSON values ({e})") from None
        if size > MAX_ARGS_JSON:
            raise ValueError(f"{size} bytes of JSON exceeds the limit of {MAX_ARGS_JSON}")
        return v

    @field_validator("register_as")
    @classmethod
    def _register_as_is_a_name(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                check_name(v)
            except BadName as e:
                raise ValueError(str(e)) from None
        return v

    @field_validator("teacher", "init_from")
    @classmethod
    def _registry_ref(cls, v: str | None) -> str | None:
        if v is not None:
            name, _, ref = v.partition("@")
            try:
                check_name(name)
                if ref:
                    check_name(ref, "version or alias")
            except BadName as e:
                raise ValueError(f"{e} (expected 'model', 'model@alias' or 'model@version')") from None
        return v

    @field_validator("artifact_chain")
    @classmethod
    def _chain_parses(cls, v: str) -> str:
        from pipeline.artifacts import ArtifactChain, ChainError

        try:
            ArtifactChain.parse(v)
        except ChainError as e:
            raise ValueError(str(e)) from None
        return v

    @field_validator("promote")
    @classmethod
    def _promote_is_an_alias(cls, v: str | None) -> str | None:
        # Checked at submit: a bad alias would otherwise fail the job only when it publishes, after training.
        if v is not None:
            try:
                check_alias(v)
            except BadName as e:
                raise ValueError(str(e)) from None
        return v

    @field_validator("codec")
    @classmethod
    def _codec_known(cls, v: str) -> str:
        if v not in CODECS:
            raise ValueError(f"unknown codec {v!r} (known: {', '.join(CODECS)})")
        return v

    @model_validator(mode="before")
    @classmethod
    def _async_defaults(cls, data: Any) -> Any:
        # Async publishes a version every `shards` accepted updates by default: one optimizer step on their
        # mean, as a sync round takes (FedBuff's buffer; workers/async_agg.py), so lr and momentum mean the
        # same in both modes and need no retuning. Explicit values always win.
        if isinstance(data, dict) and data.get("mode") == "async":
            data = {"publish_every": data.get("shards", 2), **data}
        if isinstance(data, dict) and data.get("codec_momentum"):  # DGC: the momentum moves to the workers
            # (with local steps the aggregator's momentum is the outer one: it moves too, unless set)
            data = {"momentum": 0.0, "outer_momentum": 0.0, **data}
        if isinstance(data, dict) and data.get("mode") == "async" and "weight_prediction" not in data:
            data = {"weight_prediction": cls._default_prediction(data), **data}
        if isinstance(data, dict) and data.get("weight_prediction"):
            # The gradient is taken where the update lands: the staleness the momentum was lowered for is gone.
            data = {"staleness_momentum": 0.0, **data}
        return data

    @classmethod
    def _default_prediction(cls, data: dict[str, Any]) -> float:
        """An async job's weight_prediction when it gives none: one step ahead where there is a last step to repeat
        (momentum above 0, one SGD step per version), else none. Measured with one 3×-slow worker at the default lr
        (docs/benchmarks.md): char-lm at 64 epochs 5.08–5.24 against sync's 5.65 / 4.95, where the staleness
        momentum alone ended 51% above sync at 32 epochs; digits at 5 epochs −1.1 to +0.8 points against sync, where
        it lost 5–8. At an lr on the edge of sync's own stability (char-lm at 0.1) the prediction diverges: set
        weight_prediction 0 there, and the staleness momentum (its default then 1) holds async instead."""
        fields = cls.model_fields
        momentum = data.get("momentum", fields["momentum"].default)
        steps = data.get("local_steps", fields["local_steps"].default)
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (momentum, steps))
        return 1.0 if numbers and momentum > 0 and steps == 1 else 0.0

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        if self.aggregation_parts > 1 and self.mode != "sync":
            raise ValueError("aggregation_parts: parameter-range aggregation is for sync jobs (async applies each "
                             "update on arrival)")
        if self.aggregation_parts > 1 and self.codec in PACKED_BITS:
            raise ValueError(f"aggregation_parts: codec {self.codec!r} packs the whole update into one payload, "
                             "which cannot be split by parameter range; use topk or topk+int8")
        if self.checkpoint_every_versions > 1 and self.mode != "sync":
            raise ValueError("checkpoint_every_versions: versions between full checkpoints are rebuilt from their "
                             f"round's update blobs, which only sync jobs have (mode {self.mode!r})")
        if self.weight_prediction and self.mode != "async":
            raise ValueError(f"weight_prediction: predicts the weights an async update is applied to; a {self.mode} "
                             "job's updates are applied to the weights they were computed on")
        if self.weight_prediction and self.local_steps > 1:
            raise ValueError("weight_prediction: predicts one SGD step per version; with local_steps > 1 a version "
                             "is an outer (Nesterov) step")
        if self.weight_prediction and not self.momentum:
            raise ValueError("weight_prediction: repeats the last step, read from the momentum buffers; set momentum "
                             "above 0")
        if self.inner_momentum and self.inner_optimizer != "sgd":
            raise ValueError(f"inner_momentum: is inner SGD's momentum; inner_optimizer {self.inner_optimizer!r} "
                             "keeps its own moments")
        if self.kind == "distill" and not self.teacher:
            raise ValueError("teacher: a distill job needs a teacher ('model@version' or 'model@alias')")
        if self.codec_dense_below and self.codec not in ERROR_FEEDBACK:
            raise ValueError(f"codec_dense_below: sends small tensors whole under a top-k codec "
                             f"({', '.join(ERROR_FEEDBACK)}), not {self.codec!r}")
        if self.codec_clip_norm and self.codec not in ERROR_FEEDBACK:
            raise ValueError(f"codec_clip_norm: local gradient clipping comes with a top-k codec "
                             f"({', '.join(ERROR_FEEDBACK)}), not {self.codec!r}")
        if self.codec_momentum and self.codec not in ERROR_FEEDBACK:
            raise ValueError(f"codec_momentum: momentum correction needs a top-k codec ({', '.join(ERROR_FEEDBACK)}), "
                             f"not {self.codec!r}")
        if self.codec_momentum and self.momentum:
            raise ValueError("codec_momentum: momentum correction moves the momentum to the workers; "
                             f"set momentum to 0 (it is {self.momentum})")
        # Every field passed, the allowlist included: only now may a user module be imported.
        try:
            get_factory(self.model)
        except ModelError as e:
            raise ValueError(f"model: {e}") from None
        try:
            check_dataset_name(self.dataset)
        except DataError as e:
            raise ValueError(f"dataset: {e}") from None
        return self

    @property
    def keeps_inner_state(self) -> bool:
        """Local steps with a stateful inner optimizer whose state goes from a shard's round to its next."""
        stateful = self.inner_optimizer == "adamw" or self.inner_momentum > 0
        return self.local_steps > 1 and stateful and self.inner_state == "keep"

    @property
    def shard_state(self) -> bool:
        """Whether a shard's task at step k leaves state its task at k + H starts from (top-k's error feedback, a
        kept inner optimizer): the shard's steps then run in order, on the worker holding it where one lives."""
        return self.codec in ERROR_FEEDBACK or self.keeps_inner_state

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        return parse_spec(json.loads(text))


def parse_spec(data: dict[str, Any]) -> JobSpec:
    """Validate a dict into a JobSpec; SpecError names each bad field."""
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if not field and msg.partition(":")[0] in JobSpec.model_fields:  # a whole-spec check naming its field
                problems.append(msg)
            else:
                problems.append(f"{field or 'spec'}: {msg}")
        raise SpecError("invalid job spec: " + "; ".join(problems)) from None
