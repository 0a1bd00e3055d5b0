"""The model registry: models → versions → aliases, records in Redis, artifacts in the object store.

The commit point of a version is its record: ``register`` uploads the artifact, re-reads it and checks
its sha256 (and that it decodes) *before* writing the record, so a version is visible only once its
artifact is complete. Every change is written together with an event on one Redis Stream in a single
MULTI/EXEC, so a follower that reads the stream from its last id never misses a change.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from pipeline import names
from pipeline.blobs import BlobError, sha256_hex
from storage import keys
from storage.objectstore import ObjectNotFound, ObjectStore, as_parts, parts_size

log = logging.getLogger(__name__)

HISTORY_MAX = 100  # alias history entries kept per alias (rollback depth)
EVENTS_MAXLEN = 100_000  # approximate stream length; a follower further behind resyncs from aliases


class RegistryError(Exception):
    """Base of every registry error; the message names the model/version/alias and what to do."""


class InvalidName(RegistryError):
    pass


class UnknownModel(RegistryError):
    pass


class UnknownVersion(RegistryError):
    pass


class AliasError(RegistryError):
    """An alias cannot be moved as asked (e.g. a rollback with nothing to roll back to)."""


class UnknownAlias(AliasError):
    pass


class VersionInUse(RegistryError):
    """A version cannot be deleted while an alias points at it."""


class InvalidArtifact(RegistryError):
    """``register`` refused bytes that do not decode as a serving artifact, or whose upload did not verify."""


class RegistryForbidden(RegistryError):
    """The caller lacks the right to register into (or promote in) a model another job created."""


class ArtifactCorrupt(RegistryError):
    """The stored artifact is missing or does not match its record's sha256/size."""


@dataclass(frozen=True)
class VersionRecord:
    """One registered version. ``lineage`` holds job, round, parent_version, data_manifest, teacher."""

    model: str
    version: int
    artifact_key: str
    sha256: str
    size: int
    codec: str
    metrics: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0  # unix seconds

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, raw: str | bytes) -> VersionRecord:
        try:
            return cls(**json.loads(raw))
        except (ValueError, TypeError) as e:
            raise RegistryError(f"corrupt version record in Redis ({e}); re-register the version") from None


@dataclass(frozen=True)
class RegistryEvent:
    id: str
    type: str  # registered | alias | deleted
    model: str
    version: int
    alias: str = ""
    previous: int | None = None  # the alias's target before an alias event
    at: float = 0.0  # unix seconds



def _digest(parts: list[Any]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()

def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _clean(obj: Any, what: str) -> Any:
    """JSON-safe copy: non-finite floats become None (a diverged loss must not break the HTTP API)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v, what) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v, what) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise RegistryError(f"{what} must be JSON values; got {type(obj).__name__} {obj!r}")


def check_name(name: str, what: str = "model") -> str:
    try:
        return names.check_name(name, what)
    except names.BadName as e:
        raise InvalidName(str(e)) from None


def check_alias(alias: str) -> str:
    try:
        return names.check_alias(alias)
    except names.BadName as e:
        raise InvalidName(str(e)) from None


PROMOTION_METRIC = "eval_accuracy"  # accuracy on the model's own recorded evaluation set (see publish.py)


def promotion_score(metrics: dict[str, Any]) -> float | None:
    """What promotion compares: accuracy on the model's evaluation set; plain ``accuracy`` for records
    registered directly by a token holder (no evaluation set of their own)."""
    acc = metrics.get(PROMOTION_METRIC, metrics.get("accuracy"))
    return float(acc) if isinstance(acc, (int, float)) and not isinstance(acc, bool) else None


def _accuracy(rec_json: Any) -> float | None:
    if rec_json is None:
        return None
    return promotion_score(json.loads(rec_json).get("metrics", {}))


class Registry:
    """Models, versions and aliases. Thread-safe as far as the redis client is (redis-py's is)."""

    def __init__(self, redis: redis.Redis, store: ObjectStore, *, signing_key: bytes | None = None) -> None:
        self.redis = redis
        self.store = store
        self.signing_key = signing_key

    # ------------------------------------------------------------------ writes

    def register(
        self,
        model: str,
        artifact: bytes | list[bytes | memoryview],
        *,
        codec: str,
        metrics: dict[str, Any],
        lineage: dict[str, Any],
        tags: dict[str, str] | None = None,
        idempotency_key: str | None = None,
        promote_if_better: str | None = None,
        owner: str | None = None,
        authorized: bool = True,
        eval_set: dict[str, Any] | None = None,
        decoded_by_caller: bool = False,
    ) -> VersionRecord:
        """Upload, verify, then commit a new version (and its event) atomically. Idempotent per key.

        The artifact is decoded once before upload (a malformed one is refused) unless `decoded_by_caller`:
        the pipeline's own publisher, which built it from weights it holds. Either way the stored bytes are
        read back and checked against the digest before the version becomes visible.

        Rights: a new model records `owner` and `eval_set` at creation. Into an existing model, a caller
        that is not `authorized` (a token holder) may register, and auto-promote, only as its owner.
        """
        check_name(model)
        if promote_if_better is not None:
            check_alias(promote_if_better)
        metrics, lineage = _clean(metrics, "metrics"), _clean(lineage, "lineage")
        tags = {str(k): str(v) for k, v in (tags or {}).items()}
        if idempotency_key is not None:
            done = self.redis.hget(keys.registry_idempotency(model), idempotency_key)
            if done is not None:
                return self._replay(model, idempotency_key, int(done))
        if not authorized:
            self._check_owner(self.redis, model, owner)
        if not decoded_by_caller:
            self._check_decodes(model, artifact if isinstance(artifact, bytes) else b"".join(artifact))

        version = int(self.redis.incr(keys.registry_version_counter(model)))
        key = keys.artifact(model, version)
        parts = as_parts(artifact)
        digest, size = _digest(parts), parts_size(parts)
        self.store.put(key, parts)
        try:
            back_digest, back_size = self._stored_digest(key)
            if back_size != size or not hmac.compare_digest(back_digest, digest):
                raise InvalidArtifact(
                    f"artifact {key} read back from {self.store.describe()} does not match what was uploaded "
                    f"({back_size} vs {size} bytes); nothing registered, retry the upload"
                )
            rec = VersionRecord(
                model=model, version=version, artifact_key=key, sha256=digest, size=size, codec=codec,
                metrics=metrics, lineage=lineage, tags=tags, created_at=time.time(),
            )  # fmt: skip
        except BaseException:
            self._discard(key)
            raise
        try:
            committed, existing = self._commit_version(rec, idempotency_key, promote_if_better,
                                                       None if authorized else owner, owner, eval_set)
        except BaseException:
            # The EXEC may have run even if its reply was lost: discard only what is provably uncommitted.
            if self._uncommitted(model, version):
                self._discard(key)
            raise
        if not committed:
            # Lost a race with a concurrent delivery of the same idempotency key: keep theirs.
            self._discard(key)
            return self._replay(model, str(idempotency_key), existing)
        return rec

    def _stored_digest(self, key: str) -> tuple[str, int]:
        """sha256 and size of what the store holds at `key`, read as a stream (one piece in memory)."""
        h, n = hashlib.sha256(), 0
        buf = bytearray(8 << 20)
        with self.store.reader(key) as r:
            while got := r.readinto(memoryview(buf)):
                h.update(memoryview(buf)[:got])
                n += got
        return h.hexdigest(), n

    def _check_decodes(self, model: str, artifact: bytes) -> None:
        from pipeline.artifacts import load_artifact  # lazy: keeps torch out of registry-only readers

        try:
            load_artifact(artifact, f"artifact for {model}", signing_key=self.signing_key)
        except BlobError as e:
            raise InvalidArtifact(f"refusing to register {model}: {e}") from None

    def _replay(self, model: str, idempotency_key: str, version: int) -> VersionRecord:
        try:
            return self.get(model, version)
        except UnknownVersion:
            raise UnknownVersion(
                f"idempotency key {idempotency_key!r} already registered {model} v{version}, which has since been "
                "deleted; nothing registered (use a new key to register again)"
            ) from None

    def _check_owner(self, client: Any, model: str, owner: str | None) -> None:
        if not client.sismember(keys.registry_models(), model):
            return  # a new model: the caller becomes its owner
        recorded = client.hget(keys.registry_model_info(model), "owner")
        if owner is None or recorded is None or _s(recorded) != owner:
            raise RegistryForbidden(
                f"model {model!r} exists and was not created by {owner or 'this caller'}: registering into it or "
                "promoting in it needs the registry token (AAS_REGISTRY_TOKEN at submit); or register under a new name"
            )

    def model_info(self, model: str) -> dict[str, Any]:
        """Owner and evaluation set recorded when `model` was created ({} for a new or older model)."""
        raw = {_s(k): _s(v) for k, v in self.redis.hgetall(keys.registry_model_info(check_name(model))).items()}
        return {"owner": raw.get("owner"), "eval_set": json.loads(raw["eval_set"]) if raw.get("eval_set") else None}

    def _commit_version(self, rec: VersionRecord, idempotency_key: str | None, promote: str | None,
                        must_own: str | None = None, owner: str | None = None,
                        eval_set: dict[str, Any] | None = None) -> tuple[bool, int]:
        m = rec.model
        idem, versions, aliases = keys.registry_idempotency(m), keys.registry_versions(m), keys.registry_aliases(m)
        history = keys.registry_alias_history(m, promote) if promote else None
        info = keys.registry_model_info(m)

        def tx(pipe: Any) -> tuple[bool, int]:
            if idempotency_key is not None:
                done = pipe.hget(idem, idempotency_key)
                if done is not None:
                    return False, int(done)
            if must_own is not None:
                self._check_owner(pipe, m, must_own)
            # Recorded once: a model whose versions were all deleted keeps its owner and evaluation set.
            record_info = not pipe.sismember(keys.registry_models(), m) and not pipe.exists(info)
            move, current = False, None
            if promote:
                raw = pipe.hget(aliases, promote)
                current = int(raw) if raw is not None else None
                cur_acc = _accuracy(pipe.hget(versions, current)) if current is not None else None
                new_acc = promotion_score(rec.metrics)
                move = current is None or (
                    isinstance(new_acc, (int, float)) and (cur_acc is None or float(new_acc) >= cur_acc)
                )
            pipe.multi()
            if record_info:
                pipe.hset(info, mapping={"owner": owner or "", "eval_set": json.dumps(eval_set) if eval_set else "",
                                         "created_at": repr(time.time())})
            pipe.hset(versions, str(rec.version), rec.to_json())
            pipe.sadd(keys.registry_models(), m)
            if idempotency_key is not None:
                pipe.hset(idem, idempotency_key, rec.version)
            self._queue_event(pipe, "registered", m, rec.version)
            if move and promote:
                self._queue_alias_move(pipe, m, promote, rec.version, current)
            return True, rec.version

        watch = [idem, versions, aliases, info, keys.registry_models()] + ([history] if history else [])
        return self._transact(tx, *watch)

    def set_alias(self, model: str, alias: str, version: int) -> VersionRecord:
        """Point `alias` at `version` (promote). The previous target goes onto the alias history."""
        check_name(model)
        check_alias(alias)
        version = int(version)

        def tx(pipe: Any) -> None:
            if not pipe.hexists(keys.registry_versions(model), str(version)):
                raise self._unknown(pipe, model, version)
            raw = pipe.hget(keys.registry_aliases(model), alias)
            current = int(raw) if raw is not None else None
            if current == version:
                return
            pipe.multi()
            self._queue_alias_move(pipe, model, alias, version, current)

        self._transact(tx, keys.registry_versions(model), keys.registry_aliases(model))
        return self.get(model, version)

    def rollback(self, model: str, alias: str) -> VersionRecord:
        """Move `alias` back to the version it pointed to before; repeated rollbacks walk further back."""
        check_name(model)
        check_alias(alias)
        hkey = keys.registry_alias_history(model, alias)

        def tx(pipe: Any) -> int:
            raw = pipe.hget(keys.registry_aliases(model), alias)
            if raw is None:
                if not pipe.sismember(keys.registry_models(), model):
                    raise UnknownModel(f"unknown model {model!r}; register a version of it first")
                raise UnknownAlias(f"model {model!r} has no alias {alias!r}; set it first (promote)")
            for i, v in enumerate(pipe.lrange(hkey, 0, -1)):
                if pipe.hexists(keys.registry_versions(model), _s(v)):
                    target = int(v)
                    pipe.multi()
                    pipe.ltrim(hkey, i + 1, -1)
                    pipe.hset(keys.registry_aliases(model), alias, target)
                    self._queue_event(pipe, "alias", model, target, alias=alias, previous=int(raw))
                    return target
            raise AliasError(
                f"cannot roll back {model}@{alias} (at v{int(raw)}): it has no earlier version in its history; "
                "promote a version explicitly instead"
            )

        target = self._transact(tx, keys.registry_aliases(model), keys.registry_versions(model), hkey)
        return self.get(model, target)

    def delete_version(self, model: str, version: int) -> None:
        """Delete a version's record and its artifact. Refused while any alias points at it."""
        check_name(model)
        version = int(version)
        rec = self.get(model, version)

        def tx(pipe: Any) -> None:
            if not pipe.hexists(keys.registry_versions(model), str(version)):
                raise self._unknown(pipe, model, version)
            aliases = {_s(a): int(v) for a, v in pipe.hgetall(keys.registry_aliases(model)).items()}
            using = sorted(a for a, v in aliases.items() if v == version)
            if using:
                raise VersionInUse(
                    f"{model} v{version} is the target of alias(es) {', '.join(using)}; "
                    "move or roll back those aliases before deleting it"
                )
            pipe.multi()
            pipe.hdel(keys.registry_versions(model), str(version))
            for a in aliases:
                pipe.lrem(keys.registry_alias_history(model, a), 0, version)
            self._queue_event(pipe, "deleted", model, version)

        self._transact(tx, keys.registry_versions(model), keys.registry_aliases(model))
        # After the commit: the record no longer points at the object, so removing it cannot break a reader
        # that resolved through the registry (one that already fetched it keeps its bytes).
        self._discard(rec.artifact_key)

    def apply_retention(self, model: str, keep_last: int) -> list[int]:
        """Delete all but the newest `keep_last` versions, sparing aliased versions and rollback targets."""
        if keep_last < 1:
            raise RegistryError(f"keep_last must be at least 1, got {keep_last}")
        versions = [r.version for r in self.list_versions(model)]
        keep = set(versions[-keep_last:]) | set(self.aliases(model).values())
        for alias in self.aliases(model):
            keep.update(self.alias_history(model, alias)[:1])  # so one rollback always works
        deleted = []
        for v in versions:
            if v in keep:
                continue
            try:
                self.delete_version(model, v)
                deleted.append(v)
            except (VersionInUse, UnknownVersion) as e:  # an alias moved meanwhile: keep it
                log.info("retention kept %s v%d: %s", model, v, e)
        return deleted

    # ------------------------------------------------------------------ reads

    def list_models(self) -> list[str]:
        return sorted(_s(m) for m in self.redis.smembers(keys.registry_models()))

    def list_versions(self, model: str) -> list[VersionRecord]:
        self._require_model(model)
        raw = self.redis.hgetall(keys.registry_versions(model))
        return sorted((VersionRecord.from_json(v) for v in raw.values()), key=lambda r: r.version)

    def get(self, model: str, version: int) -> VersionRecord:
        check_name(model)
        raw = self.redis.hget(keys.registry_versions(model), str(int(version)))
        if raw is None:
            raise self._unknown(self.redis, model, int(version))
        return VersionRecord.from_json(raw)

    def aliases(self, model: str) -> dict[str, int]:
        check_name(model)
        return {_s(a): int(v) for a, v in sorted(self.redis.hgetall(keys.registry_aliases(model)).items())}

    def alias_history(self, model: str, alias: str) -> list[int]:
        """Earlier targets of `alias`, newest first."""
        return [int(v) for v in self.redis.lrange(keys.registry_alias_history(model, alias), 0, -1)]

    def resolve(self, model: str, alias_or_version: str | int) -> VersionRecord:
        """A version number, ``latest``, or an alias name → the version record."""
        ref = str(alias_or_version)
        if ref.isascii() and ref.isdigit():  # "²".isdigit() is True but int("²") fails
            return self.get(model, int(ref))
        if ref == "latest":
            versions = self.list_versions(model)
            if not versions:
                raise UnknownVersion(f"model {model!r} has no versions left; register one")
            return versions[-1]
        check_name(model)
        raw = self.redis.hget(keys.registry_aliases(model), ref)
        if raw is None:
            self._require_model(model)
            known = ", ".join(self.aliases(model)) or "none"
            raise UnknownAlias(f"model {model!r} has no alias {ref!r} (aliases: {known}); promote a version to it")
        return self.get(model, int(raw))

    def fetch_artifact(self, model: str, version: int) -> bytes:
        """The artifact's bytes, verified against the record's size and sha256 (ArtifactCorrupt otherwise)."""
        rec = self.get(model, version)
        try:
            data = self.store.get(rec.artifact_key)
        except ObjectNotFound:
            raise ArtifactCorrupt(
                f"artifact {rec.artifact_key} of {model} v{rec.version} is missing from {self.store.describe()}"
            ) from None
        if len(data) != rec.size or not hmac.compare_digest(sha256_hex(data), rec.sha256):
            raise ArtifactCorrupt(
                f"artifact {rec.artifact_key} of {model} v{rec.version} does not match its record "
                f"(sha256/size mismatch, {len(data)} bytes vs {rec.size}); refusing it — register a new version"
            )
        return data

    # ------------------------------------------------------------------ events

    def events_since(
        self, last_id: str = "0-0", *, block_ms: int | None = None, count: int = 100
    ) -> list[RegistryEvent]:
        """Events after `last_id` (oldest first). With `block_ms`, wait that long for the first one."""
        resp = self.redis.xread({keys.registry_events(): last_id}, count=count, block=block_ms)
        out = []
        for _stream, entries in resp or []:
            for eid, fields in entries:
                f = {_s(k): _s(v) for k, v in fields.items()}
                prev = f.get("previous", "")
                out.append(RegistryEvent(
                    id=_s(eid), type=f.get("type", ""), model=f.get("model", ""), version=int(f.get("version", 0)),
                    alias=f.get("alias", ""), previous=int(prev) if prev else None, at=float(f.get("at", 0.0)),
                ))  # fmt: skip
        return out

    def latest_event_id(self) -> str:
        """The id of the newest event ("0-0" when there is none): start following from here."""
        last = self.redis.xrevrange(keys.registry_events(), count=1)
        return _s(last[0][0]) if last else "0-0"

    # ------------------------------------------------------------------ helpers

    def _transact(self, fn: Callable[[Any], Any], *watch: str) -> Any:
        return self.redis.transaction(fn, *watch, value_from_callable=True)

    def _queue_event(
        self, pipe: Any, type_: str, model: str, version: int, *, alias: str = "", previous: int | None = None
    ) -> None:
        ev = {"type": type_, "model": model, "version": str(version), "alias": alias,
              "previous": "" if previous is None else str(previous), "at": repr(time.time())}  # fmt: skip
        pipe.xadd(keys.registry_events(), ev, maxlen=EVENTS_MAXLEN, approximate=True)
        pipe.publish(keys.registry_wakeup(), json.dumps(ev))

    def _queue_alias_move(self, pipe: Any, model: str, alias: str, version: int, current: int | None) -> None:
        pipe.hset(keys.registry_aliases(model), alias, version)
        if current is not None and current != version:
            hkey = keys.registry_alias_history(model, alias)
            pipe.lpush(hkey, current)
            pipe.ltrim(hkey, 0, HISTORY_MAX - 1)
        self._queue_event(pipe, "alias", model, version, alias=alias, previous=current)

    def _require_model(self, model: str) -> None:
        check_name(model)
        if not self.redis.sismember(keys.registry_models(), model):
            raise UnknownModel(f"unknown model {model!r} (registered: {', '.join(self.list_models()) or 'none'})")

    def _unknown(self, client: Any, model: str, version: int) -> RegistryError:
        """The error for a missing version: UnknownModel or UnknownVersion, naming what exists."""
        if not client.sismember(keys.registry_models(), model):
            return UnknownModel(f"unknown model {model!r}; register a version of it first")
        have = sorted(int(v) for v in client.hkeys(keys.registry_versions(model)))
        span = f"v{have[0]}..v{have[-1]}" if have else "none"
        return UnknownVersion(f"model {model!r} has no version {version} (versions: {span})")

    def _uncommitted(self, model: str, version: int) -> bool:
        try:
            return not self.redis.hexists(keys.registry_versions(model), str(version))
        except redis.RedisError:
            return False  # cannot tell: leave an orphan rather than break a committed version

    def _discard(self, key: str) -> None:
        try:
            self.store.delete(key)
        except Exception as e:  # noqa: BLE001 - an orphaned object is harmless: no record points at it
            log.warning("could not delete %s from %s: %s", key, self.store.describe(), e)
