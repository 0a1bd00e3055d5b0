"""Typed configuration, built once from the environment (prefix ``AAS_``, ``.env`` supported)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the system. Secrets are ``SecretStr`` and never appear in logs or reprs."""

    model_config = SettingsConfigDict(env_prefix="AAS_", env_file=".env", extra="ignore")

    # Redis: job state, results, registry, events (and the broker unless broker_url names another).
    redis_url: str = "redis://127.0.0.1:6379/0"
    # The Celery broker: None uses redis_url; "amqp://user:pass@host:5672/vhost" uses RabbitMQ with quorum
    # queues (no loss window between delivery and the unacked record; see docs/reliability.md).
    broker_url: SecretStr | None = None

    # Object store. With s3_endpoint set, S3/MinIO is used; otherwise a local folder.
    s3_endpoint: str | None = None  # host:port, e.g. "minio:9000"
    s3_access_key: SecretStr = SecretStr("minioadmin")  # documented development default
    s3_secret_key: SecretStr = SecretStr("minioadmin")  # documented development default
    s3_bucket: str = "aas"
    s3_secure: bool = False
    s3_region: str = "us-east-1"
    store_root: Path = Path("var/store")

    # Workers.
    device: str = "auto"  # "auto" picks cuda when available; "cpu", "cuda", "cuda:1" force one
    torch_threads: int = Field(default=1, ge=1)  # per CPU worker process
    # A worker consuming the aggregate queue also evaluates and publishes committed versions (queue "publish").
    aggregator_publishes: bool = True
    slow_factor: float = Field(default=1.0, ge=1.0)  # tests/benchmarks only: stretch each task's compute time
    # Shard-to-worker affinity (workers/affinity.py): a shard whose codec keeps error-feedback state in the worker
    # process (top-k) is sent to the queue of the worker that holds its state, while that worker's heartbeat lives;
    # else, and for relaunches, to the shared ``shards`` queue. Each shard worker also consumes a queue of its own.
    shard_affinity: bool = True
    # A shard worker holding version N builds N+1 from the round's update blobs (workers/replay.py) when they are
    # fewer bytes than N+1's weights (compressed updates), checked against the aggregator's digest of N+1; off:
    # always download the weights.
    replay_versions: bool = True

    # Celery reliability. The visibility timeout must exceed the longest task, or Redis redelivers
    # a running task to a second worker; tasks are idempotent regardless.
    visibility_timeout_s: int = Field(default=600, ge=1)
    task_time_limit_s: int = Field(default=300, ge=1)
    task_max_retries: int = Field(default=5, ge=0)
    retry_backoff_s: float = Field(default=1.0, gt=0)
    retry_backoff_max_s: float = Field(default=30.0, gt=0)
    max_deliveries: int = Field(default=5, ge=1)  # poison-message cap: deliveries of one task before it is failed
    # Watchdog: a running job whose version has not moved for this long gets its round (sync) or its shards'
    # current steps (async) enqueued again. kombu's Redis transport can lose a message taken by a consumer
    # killed between BRPOP and recording it as unacked; relaunching is harmless (work is idempotent).
    # Default (None): visibility timeout + task time limit. watchdog_interval_s = 0 turns it off.
    watchdog_stall_s: float | None = Field(default=None, gt=0)
    watchdog_interval_s: float = Field(default=30.0, ge=0)
    # Liveness (workers/liveness.py): every worker process renews its heartbeat and the lease of the task it runs
    # every heartbeat_interval_s; a lease not renewed for lease_ttl_s is lost (the worker died or is stopped). The
    # monitor sweeps every liveness_interval_s (0: off) and relaunches the missing work of a round: at once for a
    # lost lease, after relaunch_grace_s for work that is neither queued nor leased (a message the broker lost).
    heartbeat_interval_s: float = Field(default=1.0, gt=0)
    lease_ttl_s: float = Field(default=5.0, gt=0)
    liveness_interval_s: float = Field(default=1.0, ge=0)
    relaunch_grace_s: float = Field(default=2.0, ge=0)
    # A task still running this long past task_time_limit_s ends its worker process (os._exit) on any pool, solo
    # included (which does not enforce Celery's time limits); the supervisor restarts the worker.
    hard_exit_grace_s: float = Field(default=5.0, ge=0)

    # Limits on what is accepted.
    max_blob_bytes: int = Field(default=2 * 1024**3, ge=1)
    # The blob format this process writes: 3 (BLAKE3 digests) or 2 (SHA-256), what a release before format 3 reads.
    # Every release reads both; set 2 on the upgraded processes while older ones still run (a rolling upgrade).
    blob_format: int = Field(default=3, ge=2, le=3)
    signing_key: SecretStr | None = None  # HMAC-SHA256 key for blobs and artifacts; required unless insecure_dev
    # Development only: run workers and inference without a signing key, and publish into registry models without
    # the registry's rights (see SECURITY.md). `aas demo` and the test fixtures turn it on explicitly.
    insecure_dev: bool = False
    # User code allowed to be imported ("module:factory" models, "module:function" data sets): comma-separated
    # module prefixes ("mylab.models,mylab.data"); "*" allows any module. Empty: built-in models and data sets only.
    allowed_imports: str = ""

    # Registry / serving.
    registry_token: SecretStr | None = None
    max_predict_batch: int = Field(default=1024, ge=1)
    max_predict_values: int = Field(default=262_144, ge=1)  # numbers per predict request (1024 rows of 8x8 = 65,536)
    request_read_timeout_s: float = Field(default=10.0, gt=0)  # a request body must arrive within this long

    # Flower.
    flower_user: str | None = None
    flower_password: SecretStr | None = None

    # Grafana (compose only: the admin login of the provisioned dashboards).
    grafana_user: str | None = None
    grafana_password: SecretStr | None = None

    # Operations: beat schedules and Prometheus metrics.
    schedules_json: str | None = None  # JSON list of schedules installed when beat starts (see pipeline/schedules.py)
    beat_lock_timeout_s: int = Field(default=60, ge=2)  # RedBeat lock: a dead beat's lock frees after this long
    metrics_port: int | None = Field(default=None, ge=1, le=65535)  # worker /metrics port; None: not served
    metrics_host: str = "127.0.0.1"  # interface for /metrics ("0.0.0.0" in containers)
    health_file: Path | None = None  # worker heartbeat file (workers/health.py); None: no heartbeat

    # Retention (storage/retention.py): Redis state of finished jobs, registry versions no alias points to.
    finished_job_ttl_s: int = Field(default=24 * 3600, ge=0)  # per-version keys of an ended job; 0: delete at once
    keep_finished_jobs: int = Field(default=200, ge=0)  # ended jobs kept in Redis, newest first; 0: all
    registry_keep_versions: int = Field(default=50, ge=0)  # newest versions kept per model (aliased ones too); 0: all

    def signing_key_bytes(self) -> bytes | None:
        """The HMAC key for blobs and artifacts as bytes (the one place it is derived), or None when unset."""
        return self.signing_key.get_secret_value().encode() if self.signing_key else None

    def store_kind(self) -> str:
        return "s3" if self.s3_endpoint else "local"

    def broker(self) -> str:
        """The Celery broker URL (Redis unless AAS_BROKER_URL names another)."""
        url = self.broker_url.get_secret_value() if self.broker_url else ""
        return url or self.redis_url  # an empty AAS_BROKER_URL (compose's default) means Redis

    def broker_kind(self) -> str:
        """The broker's kind: "redis", or "rabbitmq" for any amqp URL."""
        return "rabbitmq" if self.broker().split("://", 1)[0] in ("amqp", "amqps", "pyamqp") else "redis"

    def broker_display(self) -> str:
        """The broker URL without a password, safe to print."""
        return _without_password(self.broker())

    def redis_display(self) -> str:
        """The Redis URL without a password, safe to print."""
        return _without_password(self.redis_url)


def _without_password(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
