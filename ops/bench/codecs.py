"""Benchmark: gradient codec throughput and size on a ~10M-parameter set of tensors.

For every codec in ``pipeline.codecs.CODECS``: encode and decode throughput (MB/s of fp32 gradient in),
payload bytes and ratio against fp32, the size after the blob envelope with zstd, and the relative L2
error of one decoded step (topk's error is what error feedback carries to the next step).

    python ops/bench/codecs.py [--quick] [--json FILE] [--device cpu|cuda] [--density 0.01]

``run(quick)`` returns the rows as dicts so another script can call it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from pipeline import blobs  # noqa: E402
from pipeline.codecs import CODECS, CodecConfig, decode, encode, encoded_nbytes  # noqa: E402

# A transformer-block-like mix of shapes: 9.96M parameters (≈40 MB fp32).
SHAPES_FULL: dict[str, tuple[int, ...]] = {
    "embed.weight": (4096, 1024),
    "mlp.up.weight": (4096, 1024),
    "attn.qkv.weight": (1024, 1024),
    "attn.out.weight": (512, 1024),
    "mlp.up.bias": (4096,),
    "norm.weight": (1024,),
}
# --quick: the same kinds of tensors at a quarter of the rows (≈2.5M parameters).
SHAPES_QUICK = {k: (s[0] // 4, *s[1:]) for k, s in SHAPES_FULL.items()}


def make_grads(shapes: dict[str, tuple[int, ...]], device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Gaussian gradients with a few large outliers per tensor, as real gradients have."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        g = torch.randn(shape, generator=gen) * 1e-3
        flat = g.view(-1)
        spikes = torch.randint(0, flat.numel(), (max(1, flat.numel() // 10_000),), generator=gen)
        flat[spikes] *= 50
        out[name] = g.to(device)
    return out


def timed(fn: Callable[[], Any], reps: int, device: str) -> tuple[float, Any]:
    """Median wall seconds of ``fn`` over ``reps`` calls (after one warm-up call), and its last result."""
    result = fn()
    times = []
    for _ in range(reps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def bench_codec(name: str, grads: dict[str, torch.Tensor], density: float, reps: int, device: str) -> dict[str, Any]:
    cfg = CodecConfig(name, density=density)
    shapes = {k: tuple(v.shape) for k, v in grads.items()}
    params = sum(v.numel() for v in grads.values())
    fp32_bytes = params * 4
    t_enc, enc = timed(lambda: encode(grads, cfg), reps, device)
    cpu_tensors = {k: v.cpu() for k, v in enc.tensors.items()}  # decode reads what came out of a blob
    t_dec, out = timed(lambda: decode(cpu_tensors, enc.meta, "bench", expected_shapes=shapes), reps, device)
    blob = blobs.encode(cpu_tensors, {"codec": enc.meta}, compress=True)
    num = sum(float((out[k] - grads[k].cpu()).pow(2).sum()) for k in grads)
    den = sum(float(grads[k].cpu().pow(2).sum()) for k in grads)
    payload = encoded_nbytes(enc)
    return {
        "codec": name,
        "params": params,
        "fp32_bytes": fp32_bytes,
        "payload_bytes": payload,
        "ratio": fp32_bytes / payload,
        "blob_zstd_bytes": len(blob),
        "zstd_ratio": fp32_bytes / len(blob),
        "encode_mb_s": fp32_bytes / 1e6 / t_enc,
        "decode_mb_s": fp32_bytes / 1e6 / t_dec,
        "rel_l2_error": (num / den) ** 0.5,
        "device": device,
        "threads": torch.get_num_threads(),
    }


def run(quick: bool, device: str = "cpu", density: float = 0.01) -> list[dict[str, Any]]:
    """One row per codec: throughput (MB/s of fp32 input), bytes, ratios and error on ~10M (quick: ~2.5M)
    parameters."""
    grads = make_grads(SHAPES_QUICK if quick else SHAPES_FULL, device)
    reps = 3 if quick else 5
    return [bench_codec(name, grads, density, reps, device) for name in CODECS]


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| codec | payload MB | ratio vs fp32 | blob+zstd MB | ratio (zstd) | encode MB/s | decode MB/s "
            "| rel. L2 error |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['codec']} | {r['payload_bytes'] / 1e6:.2f} | {r['ratio']:.1f}× | {r['blob_zstd_bytes'] / 1e6:.2f} "
            f"| {r['zstd_ratio']:.1f}× | {r['encode_mb_s']:.0f} | {r['decode_mb_s']:.0f} | {r['rel_l2_error']:.2e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="~2.5M parameters, three timed repetitions")
    p.add_argument("--json", type=Path, help="write the rows to this file as JSON")
    p.add_argument("--device", default="cpu", help="torch device for encode (cpu, cuda, cuda:1)")
    p.add_argument("--density", type=float, default=0.01, help="topk: fraction kept per tensor")
    args = p.parse_args(argv)
    rows = run(args.quick, device=args.device, density=args.density)
    r0 = rows[0]
    print(f"{r0['params'] / 1e6:.2f}M parameters ({r0['fp32_bytes'] / 1e6:.1f} MB fp32), device {args.device}, "
          f"{r0['threads']} torch threads, topk density {args.density}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
