"""Benchmark: the inference worker's peak memory while receiving the largest request it accepts, and
while refusing one 10x larger (issue 13: a 57 MiB predict request used to take it from 350 MB to 3.2 GB).

Each case starts a fresh ``python -m workers.inference`` (digits-cnn, default limits) on loopback, with
a registered version on real Redis (db 14 unless AAS_BENCH_REDIS_URL says otherwise; flushed before and
after) and a local-folder store; sends one warm-up predict, then the case's request, and reads the
process's peak RSS (VmHWM in /proc/<pid>/status). Linux only.

    python ops/bench/request_memory.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from pipeline.artifacts import build_artifact
from pipeline.models import build_model, default_args
from pipeline.settings import Settings
from storage.objectstore import LocalStore
from storage.registry import Registry
from workers.inference import BODY_OVERHEAD_BYTES, BYTES_PER_VALUE

REPO = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("AAS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
M = "digits-cnn"
MiB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/<pid>/status (Linux only)")


def numbers_body(values: int, per_row: int) -> bytes:
    """A predict body of `values` full-precision floats (the longest text a float32 prints to), `per_row` per row."""
    rnd = random.Random(0)
    rows = [[-rnd.random() / 7 for _ in range(per_row)] for _ in range(values // per_row)]
    return json.dumps({"inputs": rows}).encode()


def send_raw(port: int, body: bytes, *, chunked: bool, declared: int | None = None) -> int:
    """POST body (chunked, or with Content-Length `declared`, sending at most what the server reads)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    length = f"Content-Length: {declared if declared is not None else len(body)}\r\n"
    head = (f"POST /v1/models/{M}/predict HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
            + ("Transfer-Encoding: chunked\r\n" if chunked else length) + "\r\n")
    sock.sendall(head.encode())
    sock.settimeout(2)
    try:
        for i in range(0, len(body), MiB):
            part = body[i : i + MiB]
            sock.sendall((f"{len(part):x}\r\n".encode() + part + b"\r\n") if chunked else part)
        if chunked:
            sock.sendall(b"0\r\n\r\n")
    except (TimeoutError, BrokenPipeError, ConnectionResetError):
        pass  # the server stopped reading
    sock.settimeout(120)
    raw = b""
    while b"\r\n" not in raw:
        chunk = sock.recv(4096)
        if not chunk:
            break
        raw += chunk
    sock.close()
    return int(raw.split(b" ", 2)[1]) if raw else 0


def run_case(name: str, store: Path, logs: Path, send: Any) -> dict[str, Any]:
    port = free_port()
    env = {**os.environ, "AAS_REDIS_URL": REDIS_URL, "AAS_STORE_ROOT": str(store), "AAS_TORCH_THREADS": "1",
           "AAS_INSECURE_DEV": "1", "PYTHONPATH": str(REPO)}  # a benchmark on loopback: unsigned on purpose
    cmd = [sys.executable, "-m", "workers.inference", "--model", M, "--port", str(port), "--log-level", "warning"]
    with (logs / f"{name}.log").open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"worker did not start; see {logs / (name + '.log')}")
            time.sleep(0.2)
        httpx.post(f"http://127.0.0.1:{port}/v1/models/{M}/predict", json={"inputs": [[0.0] * 64]}, timeout=10)
        idle = peak_rss_mib(proc.pid)
        t0 = time.perf_counter()
        status, sent = send(port)
        wall = time.perf_counter() - t0
        time.sleep(0.2)
        peak = peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return {"case": name, "body_mib": round(sent / MiB, 2), "status": status, "idle_peak_mib": round(idle, 1),
            "peak_mib": round(peak, 1), "growth_mib": round(peak - idle, 1), "wall_s": round(wall, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = p.parse_args(argv)
    s = Settings(_env_file=None)
    cap = BYTES_PER_VALUE * s.max_predict_values + BODY_OVERHEAD_BYTES
    answered = numbers_body(s.max_predict_batch * 64, 64)  # the largest batch it answers (1024 × 8×8)
    # The most values it parses (rows of 4096: read, parsed, counted, then refused 422 for their shape).
    at_cap = numbers_body(s.max_predict_values - 64 * 64, 64 * 64)
    assert len(at_cap) <= cap, (len(at_cap), cap)
    tenfold = b" " * (10 * cap)  # 10x the byte cap
    cases = [
        ("largest answered: 1024 rows x 64", lambda port: (send_raw(port, answered, chunked=False), len(answered))),
        ("largest parsed: value cap", lambda port: (send_raw(port, at_cap, chunked=False), len(at_cap))),
        ("10x cap, Content-Length", lambda port: (send_raw(port, tenfold, chunked=False), len(tenfold))),
        ("10x cap, chunked", lambda port: (send_raw(port, tenfold, chunked=True), len(tenfold))),
    ]
    r = redis.Redis.from_url(REDIS_URL)
    r.flushdb()
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="aas-bench-mem-") as tmp:
            store, logs = Path(tmp) / "store", Path(tmp) / "logs"
            logs.mkdir()
            reg = Registry(r, LocalStore(store))
            data, _ = build_artifact(M, default_args(M), build_model(M).state_dict())
            rec = reg.register(M, data, codec="fp32+zstd", metrics={"accuracy": 0.5}, lineage={"job": "bench"})
            reg.set_alias(M, "production", rec.version)
            for name, send in cases:
                rows.append(run_case(name, store, logs, send))
    finally:
        r.flushdb()
    print(f"inference worker, digits-cnn, body cap {cap / MiB:.2f} MiB, {s.max_predict_values} values per request")
    print(f"{'case':36} {'request MiB':>11} {'status':>6} {'idle MiB':>9} {'peak MiB':>9} "
          f"{'growth MiB':>10} {'wall s':>7}")
    for row in rows:
        print(f"{row['case']:36} {row['body_mib']:>11} {row['status']:>6} {row['idle_peak_mib']:>9} "
              f"{row['peak_mib']:>9} {row['growth_mib']:>10} {row['wall_s']:>7}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
