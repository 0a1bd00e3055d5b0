"""The one builder of shared service objects from settings: Redis, the object store, the job store,
the model registry, the signing key and the compute device. Everything else receives them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis

from pipeline.settings import Settings, get_settings
from storage.jobstate import JobStore
from storage.objectstore import ObjectStore, open_store
from storage.registry import Registry
from storage.retention import Retention

if TYPE_CHECKING:
    import torch


class ServiceUnavailable(RuntimeError):
    """Redis or the object store cannot be reached. One line, naming the endpoint."""


@dataclass
class Services:
    settings: Settings
    redis: redis.Redis
    store: ObjectStore
    jobs: JobStore

    @property
    def signing_key(self) -> bytes | None:
        return self.settings.signing_key_bytes()

    def registry(self) -> Registry:
        return Registry(self.redis, self.store, signing_key=self.signing_key)

    def device(self) -> torch.device:
        """``AAS_DEVICE``, or ``cuda`` when a GPU is visible (``auto``), else ``cpu``."""
        import torch

        want = self.settings.device
        if want == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(want)
        # One process per GPU: each worker names its own (AAS_DEVICE=cuda:1). A device this process cannot
        # see fails here, by name, rather than deep inside the first tensor copy.
        if dev.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0 or (dev.index or 0) >= count:
                raise ValueError(f"AAS_DEVICE={want}: this process sees {count} CUDA device(s) "
                                 f"(torch {torch.__version__}; check CUDA_VISIBLE_DEVICES)")
        return dev


def redis_client(settings: Settings, *, socket_timeout_s: float | None = 30.0) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=socket_timeout_s)


def build_services(settings: Settings | None = None, *, redis_conn: redis.Redis | None = None,
                   store: ObjectStore | None = None) -> Services:
    s = settings or get_settings()
    r = redis_conn if redis_conn is not None else redis_client(s)
    retention = Retention(finished_ttl_s=s.finished_job_ttl_s, keep_jobs=s.keep_finished_jobs)
    return Services(settings=s, redis=r, store=store if store is not None else open_store(s),
                    jobs=JobStore(r, retention))
