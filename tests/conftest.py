"""Shared fixtures: real services for integration tests, fakes for unit tests.

Integration tests use the machine's Redis (a dedicated db, flushed before and after) and an S3 server
(moto's, a subprocess on a loopback port) through the same `minio` client code as production. A
missing service skips locally and fails under CI=true.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REDIS_BASE = os.environ.get("AAS_TEST_REDIS", "redis://127.0.0.1:6379")
# Its own vhost, so nothing else on the broker is touched (ops/ensure-rabbitmq creates it).
RABBITMQ_URL = os.environ.get("AAS_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672/aas-test")


def missing(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"required service missing under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture
def fake_redis():
    import fakeredis

    return fakeredis.FakeRedis()


@pytest.fixture
def local_store(tmp_path: Path):
    from storage.objectstore import LocalStore

    return LocalStore(tmp_path / "store")


@pytest.fixture
def unit_ctx(fake_redis, local_store):
    """A worker Context on fakeredis and a local folder: the shard and aggregator code, no services.
    Work it would enqueue is recorded in ``unit_ctx.dispatch`` (a StubDispatcher)."""
    from pipeline.settings import Settings
    from storage.jobstate import JobStore
    from workers.context import Context
    from workers.dispatch import StubDispatcher

    return Context(settings=Settings(redis_url="redis://fake", store_root=local_store.root), redis=fake_redis,
                   store=local_store, jobs=JobStore(fake_redis), dispatch=StubDispatcher())


# ---------------------------------------------------------------- real services


@pytest.fixture
def run_published() -> Callable[..., list[dict]]:
    """``run_published(ctx)``: see ``_run_published``."""
    return _run_published


def _run_published(ctx) -> list[dict]:
    """Run the evaluation/publication tasks a StubDispatcher recorded and not yet run (as the ``publish``
    queue's worker would: evaluate, register, then advance the job), until none is left."""
    from workers.lifecycle import advance
    from workers.publish import evaluate_and_publish

    out: list[dict] = []
    done = getattr(ctx.dispatch, "_published", set())
    ctx.dispatch._published = done
    while todo := [(i, m) for i, (k, m) in enumerate(ctx.dispatch.sent) if k == "publish" and i not in done]:
        for i, m in todo:
            done.add(i)
            out.append(evaluate_and_publish(ctx, m["job_id"], m["version"]))
            advance(ctx, m["job_id"])
    return out


def _db_for_worker() -> int:
    # Each pytest-xdist worker (gw0, gw1, ...) flushes a db of its own, counting down from 14, or from
    # AAS_TEST_REDIS_DB (for two suites side by side on one Redis, give each its own range).
    top = int(os.environ.get("AAS_TEST_REDIS_DB", "14"))
    db = top - int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    if db < 0:
        pytest.fail(f"no Redis db left for xdist worker {os.environ.get('PYTEST_XDIST_WORKER')}: "
                    f"AAS_TEST_REDIS_DB={top} leaves dbs {top}..0; run fewer workers (-n) or raise it")
    return db


@pytest.fixture
def redis_url() -> Iterator[str]:
    import redis

    url = f"{REDIS_BASE}/{_db_for_worker()}"
    r = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        r.ping()
    except redis.RedisError as e:
        missing(f"Redis at {url} not answering ({e})")
    r.flushdb()
    yield url
    r.flushdb()
    r.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The RabbitMQ tests share one vhost and delete this system's queues in it: under pytest-xdist
    # (`--dist loadgroup`, as ops/test runs) they all go to one worker, one after another.
    for item in items:
        if "rabbitmq_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("rabbitmq"))


@pytest.fixture
def rabbitmq_url() -> Iterator[str]:
    """A RabbitMQ vhost for the broker, with this system's queues deleted before and after."""
    from kombu import Connection

    from workers.app import QUEUES

    conn = Connection(RABBITMQ_URL, connect_timeout=3)
    try:
        conn.ensure_connection(max_retries=1)
    except Exception as e:  # noqa: BLE001 - any failure to connect means: no broker here
        missing(f"RabbitMQ at {RABBITMQ_URL.split('@')[-1]} not answering ({e}); ops/ensure-rabbitmq starts one")

    def delete_queues() -> None:
        for q in QUEUES:
            ch = conn.channel()
            try:
                ch.queue_delete(q)
            finally:
                ch.close()

    delete_queues()
    yield RABBITMQ_URL
    delete_queues()
    conn.release()


@pytest.fixture
def s3_server() -> Iterator[object]:
    try:
        import moto.server  # noqa: F401
    except ImportError:
        missing("moto[server] is not installed")
    from pipeline.client.processes import MotoS3Server

    server = MotoS3Server()
    try:
        server.start()
    except TimeoutError as e:
        missing(str(e))
    yield server
    server.stop()


@pytest.fixture
def services_env(redis_url: str, s3_server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """AAS_* settings for real Redis + S3, applied to this process and handed to worker processes."""
    env = {
        "AAS_REDIS_URL": redis_url,
        "AAS_S3_ENDPOINT": s3_server.endpoint,
        "AAS_S3_ACCESS_KEY": "testing",
        "AAS_S3_SECRET_KEY": "testing",
        "AAS_S3_BUCKET": "aas-test",
        "AAS_VISIBILITY_TIMEOUT_S": "5",
        "AAS_RETRY_BACKOFF_S": "0.2",
        "AAS_RETRY_BACKOFF_MAX_S": "1",
        "AAS_TASK_MAX_RETRIES": "3",
        "AAS_INSECURE_DEV": "1",  # workers run unsigned unless a test sets AAS_SIGNING_KEY
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    from pipeline.settings import get_settings

    get_settings.cache_clear()
    yield env
    get_settings.cache_clear()


@pytest.fixture
def workers(services_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., object]]:
    """Factory: start real `celery worker` processes; every one is stopped at teardown."""
    from pipeline.client.processes import ProcessGroup, wait_for_workers
    from pipeline.settings import Settings
    from workers.app import app_for

    env = {**os.environ, **services_env, "PYTHONPATH": str(REPO)}
    group = ProcessGroup(env=env, cwd=REPO, logdir=tmp_path / "logs")

    def start(name: str, queue: str = "shards", extra_env: dict[str, str] | None = None, wait: bool = True,
              supervise: bool = False):
        group.start_worker(name, queue, extra_env, supervise=supervise)
        if wait:
            wait_for_workers(app_for(Settings()), [name], timeout_s=90)
        return group

    start.group = group  # type: ignore[attr-defined]
    yield start
    group.close()
    for log in sorted((tmp_path / "logs").glob("*.log")) if (tmp_path / "logs").exists() else []:
        text = log.read_text(errors="replace")
        if "Traceback" in text:
            print(f"--- {log.name} (tail)\n{text[-3000:]}")


# ---------------------------------------------------------------- tools from Debian packages


def debian_tool(names: tuple[str, ...], package: str) -> str:
    """The path of the first of `names` on PATH. Missing: under CI=true install Debian's `package` with
    apt-get (the CI image runs as root), else skip."""
    import shutil
    import subprocess

    def find() -> str | None:
        return next((p for n in names if (p := shutil.which(n))), None)

    found = find()
    if found is None and IN_CI and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", package], check=False,
                       capture_output=True, timeout=1200, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = find()
    if found is None:
        missing(f"{' or '.join(names)} not installed (apt-get install {package})")
    return str(found)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's headless-capable Chromium."""
    return debian_tool(("chromium", "chromium-browser", "google-chrome"), "chromium")


@pytest.fixture(scope="session")
def promtool() -> str:
    """Prometheus's metrics linter (Debian's `prometheus` package)."""
    return debian_tool(("promtool",), "prometheus")


# ---------------------------------------------------------------- metrics endpoints


def metrics_endpoints() -> dict[str, str]:
    """The /metrics text of every kind of process, as each serves it at start-up: a shard worker, an
    aggregator (with its Redis state read from an empty fakeredis) and an inference worker."""
    import fakeredis
    from prometheus_client import generate_latest

    from storage.objectstore import LocalStore
    from storage.registry import Registry
    from workers.inference import Metrics
    from workers.metrics import ROLE_AGGREGATOR, ROLE_SHARD, StateCollector, registry_for

    r = fakeredis.FakeRedis()

    class _Services:
        redis = r

        def registry(self) -> Registry:
            import tempfile

            return Registry(r, LocalStore(Path(tempfile.mkdtemp(prefix="aas-metrics-"))))

    state = StateCollector(lambda: _Services(), ("shards", "aggregate", "predict", "beat"))
    return {
        "shard-worker": generate_latest(registry_for({ROLE_SHARD})).decode(),
        "aggregator": generate_latest(registry_for({ROLE_AGGREGATOR}, state=state)).decode(),
        "inference": generate_latest(Metrics().registry).decode(),
    }


def exposed_names(text: str) -> set[str]:
    """Every series name an exposition offers to a query: sample names, and the family name of a
    family with no sample yet (a labelled gauge before its first label set)."""
    from prometheus_client.parser import text_string_to_metric_families

    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names |= {s.name for s in family.samples}
        if not family.samples:
            names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


# ---------------------------------------------------------------- benchmark modules


BENCH = REPO / "ops" / "bench"


def load_bench(name: str) -> Any:
    """ops/bench/<name>.py as a fresh module (its siblings importable while it loads): the benchmarks are scripts,
    not a package."""
    import importlib.util
    import sys

    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"aas_bench_{name}", BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[spec.name] = mod  # type: ignore[union-attr]  # a dataclass looks its module up while defined
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
        return mod
    finally:
        sys.path.remove(str(BENCH))
