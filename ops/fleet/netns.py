"""A multi-host network on one machine: one network namespace per host, joined by a bridge.

    ┌──────────── aasf<pid>-sw (the switch) ────────────┐
    │  br0 ── v-redis ── v-s3 ── v-agg ── v-shard0 ...  │   each v-<host> is one end of a veth pair;
    └────────┬─────────┬───────┬────────┬───────────────┘   its other end is eth0 in aasf<pid>-<host>
          redis      s3      agg     shard0  ...            with an address in SUBNET

A link's bandwidth is a token bucket (``tc qdisc tbf``) on both ends of its veth pair: eth0's egress
limits what the host sends, v-<host>'s egress what it receives (netem is not used: it may be absent).
A link goes down and up with ``ip link set v-<host> down|up`` on the switch side.

Nothing is created in the caller's namespace: the veth pairs are made inside the switch namespace,
and every address lives inside the namespaces this run made, on a private subnet that exists only
there. ``Fleet.close`` (also on error, Ctrl-C and SIGTERM through ``handle_signals``) kills the
processes left in the namespaces and deletes them, which removes every veth and the bridge with
them. A run killed with SIGKILL leaves its namespaces behind; the next run removes those whose
owning process is gone (``sweep_stale``).

Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and iproute2's ``ip`` and ``tc``.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from typing import Any

PREFIX = "aasf"  # namespace names: aasf<owner pid>-<host>
SUBNET = "10.213.0"  # /24, used only inside this run's namespaces
CLONE_NEWNET = 0x40000000
CMD_TIMEOUT_S = 20.0


class FleetError(RuntimeError):
    """The fleet's network could not be made or changed (the message names the command)."""


def rate_bits(text: str | int | float) -> int:
    """'100mbit', '1gbit', '20mbit', '500kbit' or a number of bit/s → bit/s."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmg]?)(bit|bps)?\s*", text.lower())
    if not m:
        raise ValueError(f"bandwidth {text!r}: expected e.g. 1gbit, 100mbit, 20mbit, 500kbit")
    scale = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000}[m.group(2)]
    value = float(m.group(1)) * scale * (8 if m.group(3) == "bps" else 1)  # bps: bytes per second
    if value < 8_000:
        raise ValueError(f"bandwidth {text!r} is below 8 kbit/s")
    return int(value)


def human_rate(bits: int) -> str:
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:g} {unit}"
    return f"{bits} bit/s"


def run_cmd(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise FleetError(f"{' '.join(argv)}: no answer within {CMD_TIMEOUT_S:g} s") from None
    if check and p.returncode != 0:
        raise FleetError(f"{' '.join(argv)}: exit {p.returncode}: {p.stderr.strip() or p.stdout.strip()}")
    return p


def available() -> str | None:
    """None when namespaces can be made here, else why not (not root, no ip/tc, no netns support)."""
    if os.geteuid() != 0:
        return "not root: network namespaces and tc need CAP_NET_ADMIN/CAP_SYS_ADMIN"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"iproute2's {tool!r} is not on PATH"
    probe = f"{PREFIX}{os.getpid()}-probe"
    p = run_cmd(["ip", "netns", "add", probe], check=False)
    if p.returncode != 0:
        return f"'ip netns add' fails here: {p.stderr.strip()}"
    try:
        q = run_cmd(["ip", "-n", probe, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1"], check=False)
        if q.returncode != 0:
            return f"veth pairs cannot be made: {q.stderr.strip()}"
        t = run_cmd(["tc", "-n", probe, "qdisc", "add", "dev", "probe0", "root", "tbf", "rate", "1mbit",
                     "burst", "64kb", "limit", "128kb"], check=False)
        if t.returncode != 0:
            return f"tc tbf is not available: {t.stderr.strip()}"
    finally:
        run_cmd(["ip", "netns", "del", probe], check=False)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_namespaces() -> list[str]:
    out = run_cmd(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def kill_namespace_processes(ns: str) -> None:
    pids = run_cmd(["ip", "netns", "pids", ns], check=False).stdout.split()
    for pid in pids:
        if pid == str(os.getpid()):
            continue  # this process (its main thread is back home; a thread it started there may not be)
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def sweep_stale() -> list[str]:
    """Delete namespaces of earlier fleet runs whose owning process is gone (a SIGKILLed run's leftovers)."""
    removed = []
    for ns in list_namespaces():
        m = re.fullmatch(rf"{PREFIX}(\d+)-[a-z0-9]+", ns)
        if m and not _pid_alive(int(m.group(1))):
            kill_namespace_processes(ns)
            run_cmd(["ip", "netns", "del", ns], check=False)
            removed.append(ns)
    return removed


@dataclass
class Host:
    name: str
    addr: str
    rate_bits: int | None  # None: no limit

    @property
    def switch_port(self) -> str:
        return f"v-{self.name}"[:15]  # Linux interface names: at most 15 characters


@dataclass
class Fleet:
    """Hosts on a bridge, each in its own namespace. Use as a context manager; ``close`` undoes everything."""

    hosts: dict[str, Host] = field(default_factory=dict)
    owner: int = field(default_factory=os.getpid)
    created: list[str] = field(default_factory=list)
    _home_fd: int | None = None

    def ns(self, host: str) -> str:
        return f"{PREFIX}{self.owner}-{host}"

    @property
    def switch(self) -> str:
        return self.ns("sw")

    def up(self, hosts: list[tuple[str, int | None]]) -> Fleet:
        """Make the switch and one namespace per (name, rate in bit/s or None) with a limited link to it."""
        if not 1 <= len(hosts) <= 240:
            raise FleetError(f"{len(hosts)} hosts: between 1 and 240 fit the /24")
        sweep_stale()
        self._add_ns(self.switch)
        sw = ["ip", "-n", self.switch]
        run_cmd([*sw, "link", "set", "lo", "up"])
        run_cmd([*sw, "link", "add", "br0", "type", "bridge"])
        run_cmd([*sw, "link", "set", "br0", "up"])
        for i, (name, rate) in enumerate(hosts):
            if not re.fullmatch(r"[a-z][a-z0-9]{0,11}", name) or name == "sw" or name in self.hosts:
                raise FleetError(f"host name {name!r}: lowercase letters and digits, ≤ 12, unique, not 'sw'")
            host = Host(name, f"{SUBNET}.{i + 2}", rate)
            ns = self.ns(name)
            self._add_ns(ns)
            run_cmd([*sw, "link", "add", host.switch_port, "type", "veth", "peer", "name", "eth0", "netns", ns])
            run_cmd([*sw, "link", "set", host.switch_port, "master", "br0"])
            run_cmd([*sw, "link", "set", host.switch_port, "up"])
            hn = ["ip", "-n", ns]
            run_cmd([*hn, "link", "set", "lo", "up"])
            run_cmd([*hn, "addr", "add", f"{host.addr}/24", "dev", "eth0"])
            run_cmd([*hn, "link", "set", "eth0", "up"])
            self.hosts[name] = host
            self.set_rate(name, rate)
        return self

    def _add_ns(self, ns: str) -> None:
        run_cmd(["ip", "netns", "add", ns])
        self.created.append(ns)

    def addr(self, host: str) -> str:
        return self.hosts[host].addr

    def set_rate(self, host: str, rate: int | None) -> None:
        """Limit the host's link to `rate` bit/s each way (None: remove the limit)."""
        h = self.hosts[host]
        h.rate_bits = rate
        for ns, dev in ((self.ns(host), "eth0"), (self.switch, h.switch_port)):
            if rate is None:
                run_cmd(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)
                continue
            # Burst: ≥ 64 KiB (one GSO segment from veth must fit) and ≥ 10 ms at the rate; queue: 50 ms more.
            burst = max(64 * 1024, rate // 8 // 100)
            limit = burst + rate // 8 // 20
            run_cmd(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate}bit",
                     "burst", str(burst), "limit", str(limit)])

    def set_link(self, host: str, up: bool) -> None:
        """Take the host's link down (its packets are dropped; TCP retransmits) or bring it back."""
        run_cmd(["ip", "-n", self.switch, "link", "set", self.hosts[host].switch_port, "up" if up else "down"])

    def link_bytes(self, host: str) -> tuple[int, int]:
        """(bytes sent, bytes received) on the host's eth0 since it was made."""
        out = run_cmd(["ip", "-n", self.ns(host), "-j", "-s", "link", "show", "dev", "eth0"]).stdout
        stats: dict[str, Any] = json.loads(out)[0]["stats64"]
        return int(stats["tx"]["bytes"]), int(stats["rx"]["bytes"])

    def argv(self, host: str, argv: list[str]) -> list[str]:
        """A command line that runs `argv` inside the host's namespace."""
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def enter(self, host: str) -> None:
        """Move this process's main thread into the host's namespace (sockets it opens from now on live there).

        Call it before any thread that opens sockets is started: setns(2) moves only the calling thread,
        and threads inherit the namespace of the thread that starts them.
        """
        libc = ctypes.CDLL(None, use_errno=True)
        if self._home_fd is None:
            self._home_fd = os.open("/proc/self/ns/net", os.O_RDONLY)
        fd = os.open(f"/run/netns/{self.ns(host)}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise FleetError(f"setns into {self.ns(host)}: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(fd)

    def leave(self) -> None:
        if self._home_fd is None:
            return
        libc = ctypes.CDLL(None, use_errno=True)
        libc.setns(self._home_fd, CLONE_NEWNET)
        os.close(self._home_fd)
        self._home_fd = None

    def close(self) -> None:
        """Kill what still runs in the namespaces and delete them (veths and bridge go with them)."""
        self.leave()
        for ns in reversed(self.created):
            kill_namespace_processes(ns)
        for ns in reversed(self.created):
            run_cmd(["ip", "netns", "del", ns], check=False)
        self.created.clear()
        self.hosts.clear()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def handle_signals() -> None:
    """SIGTERM and SIGHUP end the run like Ctrl-C does, so that ``finally`` blocks tear the fleet down."""

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
