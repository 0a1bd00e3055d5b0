"""The Celery app. Every setting that matters for correctness is set here, explicitly.

Start workers with::

    celery -A workers.app worker -Q shards --pool=solo -E        # one shard worker per process/GPU
    celery -A workers.app worker -Q aggregate --pool=solo -E -c 1  # the aggregator

Each shard worker also consumes a queue of its own, ``shards.<node name>`` (unless AAS_SHARD_AFFINITY=false):
the queue a shard's task goes to when this worker holds the shard's codec state (``workers/affinity.py``).

GPU workers must use ``--pool=solo`` (or threads): a prefork child that inherits an initialised CUDA
context fails ("Cannot re-initialize CUDA in forked subprocess"). CPU workers may use prefork; each
process sets torch's thread count from ``AAS_TORCH_THREADS`` when it starts.

The broker is Redis (``AAS_REDIS_URL``) unless ``AAS_BROKER_URL`` names RabbitMQ; Redis always holds the results,
job state, registry and events. On RabbitMQ every queue is a quorum queue (replicated, durable) with a
delivery limit, so a message that keeps killing its consumer is dropped by the broker too.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import celeryd_after_setup, worker_init, worker_process_init
from kombu import Exchange, Queue

from pipeline.settings import Settings, get_settings

# Queue and task names: written here and nowhere else.
QUEUE_SHARDS = "shards"
QUEUE_AGGREGATE = "aggregate"
QUEUE_PREDICT = "predict"
QUEUE_BEAT = "beat"  # scheduled retraining; a light worker (or the aggregator) consumes it
# Evaluation and registration of committed versions, off the commit path. Aggregators consume it too unless
# AAS_AGGREGATOR_PUBLISHES=false (then run `-Q publish` workers of their own).
QUEUE_PUBLISH = "publish"
QUEUES = (QUEUE_SHARDS, QUEUE_AGGREGATE, QUEUE_PUBLISH, QUEUE_PREDICT, QUEUE_BEAT)

TASK_TRAIN_SHARD = "aas.train_shard"
TASK_AGGREGATE = "aas.aggregate"
TASK_AGGREGATE_PART = "aas.aggregate_part"
TASK_APPLY_UPDATE = "aas.apply_update"
TASK_PUBLISH = "aas.publish"
TASK_PREDICT = "aas.predict"
TASK_RETRAIN = "aas.retrain"
TASK_WATCHDOG = "aas.watchdog"


# A worker's own shard queue that nobody consumes (its worker is gone, under another name) is deleted by RabbitMQ
# after this long unused (ms). Its messages were relaunched to the shared queue once the worker's heartbeat ended.
AFFINITY_QUEUE_EXPIRES_MS = 24 * 3600 * 1000


def _rabbitmq_queue(s: Settings, name: str, **extra: int) -> Queue:
    args = {"x-queue-type": "quorum", "x-delivery-limit": max(0, s.max_deliveries - 1), **extra}
    return Queue(name, Exchange(name, type="topic", durable=True), routing_key=name, durable=True,
                 queue_arguments=args)


def rabbitmq_queues(s: Settings) -> list[Queue]:
    """Quorum queues, each on its own topic exchange (Celery's native delayed delivery, which carries retry
    countdowns on quorum queues, binds topic exchanges only). A message delivered `max_deliveries` times is
    dropped by the broker (``x-delivery-limit`` counts redeliveries: the first delivery is not one)."""
    return [_rabbitmq_queue(s, q) for q in QUEUES]


def affinity_queue_name(node: str) -> str:
    """The shard queue of one worker node (its Celery node name, ``shard0@host``)."""
    return f"{QUEUE_SHARDS}.{node}"


def node_of_affinity_queue(name: str) -> str | None:
    """Inverse of ``affinity_queue_name``; None for any other queue."""
    prefix = f"{QUEUE_SHARDS}."
    return name[len(prefix):] if name.startswith(prefix) and len(name) > len(prefix) else None


def affinity_queue(s: Settings, name: str) -> Queue:
    """A worker's own shard queue, declared as its other queues are: on RabbitMQ a quorum queue on its own topic
    exchange (expiring once unused for a day), on Redis a plain list. The worker and every sender declare it
    with exactly these arguments (RabbitMQ refuses a declaration whose arguments differ)."""
    if s.broker_kind() == "rabbitmq":
        return _rabbitmq_queue(s, name, **{"x-expires": AFFINITY_QUEUE_EXPIRES_MS})
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def ensure_affinity_queue(capp: Celery, s: Settings, name: str) -> str:
    """Make `name` (a worker's own shard queue) known to this sender's app, so a task can be routed to it by
    name on either broker (RabbitMQ here does not create missing queues); returns the name."""
    if node_of_affinity_queue(name) is None:
        raise ValueError(f"not a worker's shard queue: {name!r} (expected {affinity_queue_name('<node>')!r})")
    queues = capp.amqp.queues
    if name not in queues:
        queues.add(affinity_queue(s, name))  # known for routing; consumed only by the worker that selected it
    return name


def make_app(settings: Settings | None = None) -> Celery:
    s = settings or get_settings()
    app = Celery("aas", broker=s.broker(), backend=s.redis_url,
                 include=["workers.tasks", "workers.beat", "workers.metrics", "workers.health"])
    transport = {
        # Redis redelivers a task not acknowledged within this window, even while it still runs.
        "visibility_timeout": s.visibility_timeout_s,
        # How often workers sweep for abandoned (unacked, timed-out) messages. kombu's default sweep
        # period is interval × throttle = 100 s; a dead worker's task should come back soon after its
        # visibility timeout, so sweep every quarter timeout (1..10 s) without a throttle.
        "unacked_restore_interval": max(1, min(10, s.visibility_timeout_s // 4)),
        "unacked_restore_throttle": 1,
    }
    app.conf.update(
        # No pickle: JSON only, in both directions.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # At-least-once delivery; every task's effect is idempotent.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_time_limit=s.task_time_limit_s,
        task_soft_time_limit=max(1, s.task_time_limit_s - 10),
        # Results are a convenience (async shard tasks' link callbacks take theirs; sync rounds record their own,
        # storage/leases.py); job state lives in its own keys.
        result_expires=24 * 3600,
        result_extended=True,
        task_track_started=True,
        # Flower needs events and readable task names.
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_routes={
            TASK_TRAIN_SHARD: {"queue": QUEUE_SHARDS},
            TASK_AGGREGATE: {"queue": QUEUE_AGGREGATE},
            TASK_AGGREGATE_PART: {"queue": QUEUE_AGGREGATE},
            TASK_APPLY_UPDATE: {"queue": QUEUE_AGGREGATE},
            TASK_PUBLISH: {"queue": QUEUE_PUBLISH},
            TASK_PREDICT: {"queue": QUEUE_PREDICT},
            TASK_RETRAIN: {"queue": QUEUE_BEAT},
            TASK_WATCHDOG: {"queue": QUEUE_AGGREGATE},
        },
        task_default_queue=QUEUE_SHARDS,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_hijack_root_logger=False,
        # Flower sends several control requests at once while its event reader holds a connection too;
        # a small pool starves it (no tasks shown). Connections are cheap next to that.
        broker_pool_limit=32,
    )
    if s.broker_kind() == "rabbitmq":
        app.conf.update(
            task_queues=rabbitmq_queues(s),
            task_create_missing_queues=False,
            # Quorum queues have no global QoS; Celery detects them and uses per-consumer prefetch.
            worker_detect_quorum_queues=True,
            broker_native_delayed_delivery_queue_type="quorum",
            # A SIGSTOPped consumer's messages come back when the broker drops its connection: AMQP heartbeats
            # every 10 s (Celery's default is 120 s). The broker's consumer_timeout (30 min by default; set it
            # above the task limit) is the last resort for a consumer that is alive but never acknowledges.
            broker_heartbeat=10,
            broker_transport_options={"confirm_publish": True},
        )
    return app


app = make_app()
_app_backend = get_settings().redis_url
_apps: dict[str, Celery] = {}


def app_for(settings: Settings) -> Celery:
    """The app for these settings: the process-wide one, or (a client pointed elsewhere) its own."""
    key = f"{settings.broker()} {settings.redis_url}"
    if settings.broker() == app.conf.broker_url and settings.redis_url == _app_backend:
        return app
    if key not in _apps:
        _apps[key] = make_app(settings)
    return _apps[key]


def shard_signature(capp: Celery, job_id: str, shard: int, version: int, step: int, attempt: int,
                    link: Any = None) -> Any:
    """The message of one shard task (a version of -1 means "the newest when the task starts").

    Named arguments, job id first: Flower and ``celery inspect`` show ``{'job_id': ..., 'shard_id': ...,
    'version': ...}`` rather than an unnamed tuple (the task function still accepts them positionally).
    """
    kwargs = {"job_id": job_id, "shard_id": shard, "version": version, "step": step, "attempt": attempt}
    return capp.signature(TASK_TRAIN_SHARD, kwargs=kwargs, link=link)


@worker_init.connect
def _declare_rabbitmq_queues(sender: Any = None, **_: object) -> None:
    """RabbitMQ: declare every queue and its exchange before the consumer starts, also those this worker does
    not consume: Celery's native delayed delivery (retry countdowns on quorum queues) binds all of them."""
    capp = getattr(sender, "app", None) or app
    if not str(capp.conf.broker_url).startswith(("amqp", "pyamqp")):
        return
    with capp.connection_for_write() as conn:
        for q in capp.conf.task_queues or ():
            q.bind(conn.default_channel).declare()


_own_queue: dict[str, str] = {}  # "node", "queue": this worker's own shard queue (set at start, kept by forks)


def own_shard_queue() -> tuple[str, str] | None:
    """(node name, queue) of this worker process's own shard queue; None outside a shard worker with affinity."""
    return (_own_queue["node"], _own_queue["queue"]) if _own_queue else None


@celeryd_after_setup.connect
def _consume_own_shard_queue(sender: Any = None, instance: Any = None, **_: object) -> None:
    """A worker consuming ``shards`` also consumes ``shards.<node name>``: the tasks of the shards whose codec
    state it holds (``workers/affinity.py``). Celery's ``worker_direct`` queue is not used: it is an auto-delete
    queue on its own exchange, where a dead worker's messages vanish, and RabbitMQ here wants quorum queues."""
    capp = getattr(instance, "app", None)
    queues = getattr(getattr(capp, "amqp", None), "queues", None)
    s = get_settings()
    if queues is None or not sender or not s.shard_affinity:
        return
    if QUEUE_SHARDS not in set(queues.consume_from or queues):
        return
    name = affinity_queue_name(str(sender))
    queues.select_add(affinity_queue(s, name))
    _own_queue.update(node=str(sender), queue=name)


@celeryd_after_setup.connect
def _aggregators_publish(sender: Any = None, instance: Any = None, **_: object) -> None:
    """A worker consuming ``aggregate`` also consumes ``publish`` (unless AAS_AGGREGATOR_PUBLISHES=false): the
    evaluation of version N then runs on the aggregator while the shards compute round N."""
    queues = getattr(getattr(getattr(instance, "app", None), "amqp", None), "queues", None)
    if queues is None or not get_settings().aggregator_publishes:
        return
    consumed = set(queues.consume_from or queues)
    if QUEUE_AGGREGATE in consumed and QUEUE_PUBLISH not in consumed:
        # The declared queue where there is one (RabbitMQ: a quorum queue on its topic exchange), else the one
        # Celery makes for a missing queue (as routing a task to it does).
        queues.select_add(queues[QUEUE_PUBLISH])


@worker_process_init.connect
def _limit_torch_threads(**_: object) -> None:
    import torch

    torch.set_num_threads(get_settings().torch_threads)


@worker_init.connect
def _refuse_without_signing_key(**_: object) -> None:
    """A worker that would trust unsigned blobs does not start (unless AAS_INSECURE_DEV says development)."""
    import sys

    from pipeline.security import InsecureConfig, require_signing_key

    try:
        require_signing_key(get_settings(), "this worker")
    except InsecureConfig as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None  # SystemExit passes through Celery's signal dispatch; an Exception would not
