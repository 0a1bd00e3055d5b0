"""Benchmark: the fsync'd checkpoint write of a job's commit path, with its update blobs kept or deleted.

An async job on the local-folder store writes, per version, the shards' update blobs (not fsync'd: a blob lost to a
power cut is recomputed) and the version's weights and optimizer state (each fsync'd before the commit). This
replays that pattern at a fixed rate of versions with files of a given size, twice, in the same run: once keeping
every blob (as the pipeline did before spent blobs were deleted) and once deleting each version's blobs after its
checkpoint is written (``workers/async_agg.drop_applied``; a sync job deletes a round's one round later,
``workers/aggregator.drop_spent_round``). Kept, the blobs' write-back to disk competes with the checkpoints'
fsyncs; deleted before the kernel writes them back (``vm.dirty_expire_centisecs``, 30 s by default), they never
reach the disk. Prints the mean fsync'd write per version in each window and the page cache's dirty bytes.

    ops/bench/run writeback [--seconds 240] [--rate 5.8] [--mb 3.43] [--blobs 2] [--dir DIR] [--json FILE]

Defaults: char-lm's quick async job (860k parameters: 3.43 MB fp32 per blob, weights file and optimizer file;
2 blobs per version) at the 5.8 versions/s it reaches on a fast machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from storage.objectstore import LocalStore

WINDOW_S = 30.0


def dirty_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Dirty:"):
            return int(line.split()[1]) // 1024
    return -1


def replay(folder: Path, *, keep: bool, seconds: float, rate: float, data: bytes, blobs: int) -> dict[str, Any]:
    """Versions at `rate` per second for `seconds`; per window: mean fsync'd write (ms) and dirty MB at its end."""
    store = LocalStore(folder)  # the local-folder store's own writes: temporary file, fsync where durable, rename
    t0 = last = time.monotonic()
    v, writes, windows = 0, [], []
    while time.monotonic() - t0 < seconds:
        start = time.monotonic()
        spent = [f"grads/v{v:06d}/s{b:05d}" for b in range(blobs)]
        for key in spent:
            store.put(key, data, durable=False)
        w = time.perf_counter()
        store.put(f"ckpt/v{v:06d}.opt", data)
        store.put(f"ckpt/v{v:06d}", data)
        writes.append(time.perf_counter() - w)
        if not keep:
            for key in spent:
                store.delete(key)
        v += 1
        time.sleep(max(0.0, 1 / rate - (time.monotonic() - start)))
        if time.monotonic() - last >= WINDOW_S:
            windows.append({"at_s": round(time.monotonic() - t0), "versions": v,
                            "write_ms": round(1000 * sum(writes) / len(writes), 1), "dirty_mb": dirty_mb()})
            print(f"[writeback] {'kept' if keep else 'deleted'}: {windows[-1]}", file=sys.stderr, flush=True)
            writes, last = [], time.monotonic()
    shutil.rmtree(folder)
    return {"blobs": "kept" if keep else "deleted", "versions": v, "windows": windows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=240.0, help="per mode (default 240)")
    ap.add_argument("--rate", type=float, default=5.8, help="versions per second (default 5.8)")
    ap.add_argument("--mb", type=float, default=3.43, help="MB per blob, weights file and optimizer file")
    ap.add_argument("--blobs", type=int, default=2, help="update blobs per version (default 2)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder in /var/tmp)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    data = os.urandom(int(args.mb * 1e6))
    root = Path(tempfile.mkdtemp(prefix="aas-writeback-", dir=args.dir or "/var/tmp"))
    try:
        runs = [replay(root / mode, keep=mode == "kept", seconds=args.seconds, rate=args.rate, data=data,
                       blobs=args.blobs) for mode in ("kept", "deleted")]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{args.blobs} blobs + weights + optimizer state of {args.mb} MB per version, {args.rate} versions/s, "
          f"{args.seconds:.0f} s each; fsync'd write per version (ms) and dirty MB, per {WINDOW_S:.0f} s window\n")
    print("| update blobs | " + " | ".join(f"{w['at_s']} s" for w in runs[0]["windows"]) + " |")
    print("|---|" + "---:|" * len(runs[0]["windows"]))
    for r in runs:
        print(f"| {r['blobs']} | " + " | ".join(f"{w['write_ms']} ms ({w['dirty_mb']} MB)" for w in r["windows"])
              + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
