"""`aas demo`: the whole pipeline on one machine, with no services to configure.

Starts an embedded Redis (unless AAS_REDIS_URL is set) and a local-folder store (unless
AAS_S3_ENDPOINT is set), real `celery worker` processes (N shard workers, 1 aggregator), submits a
job, shows progress per version, prints a summary, and stops everything it started: on success, on
an error, on Ctrl-C, and on SIGTERM or SIGHUP (handled as Ctrl-C).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DemoOptions:
    workers: int = 2
    shards: int = 2
    epochs: int | None = None  # default: 5 for digits-cnn, 1 for char-lm
    mode: str = "sync"
    local_steps: int = 1
    model: str = "digits-cnn"
    dataset: str | None = None
    codec: str = "none"
    as_json: bool = False
    keep: bool = False
    timeout_s: float = 1800.0
    serve: bool = True  # run an inference worker that follows the `production` alias during training
    spec_overrides: tuple[tuple[str, Any], ...] = ()


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # handled as Ctrl-C is: the `finally` below stops everything


def run_demo(opts: DemoOptions) -> dict[str, Any]:
    previous = {sig: signal.signal(sig, _interrupt) for sig in STOP_SIGNALS}
    previous[signal.SIGINT] = signal.getsignal(signal.SIGINT)
    workdir = Path(tempfile.mkdtemp(prefix="aas-demo-"))
    embedded = None
    group = None
    out = sys.stderr
    try:
        env = dict(os.environ)
        if not env.get("AAS_REDIS_URL"):
            from pipeline.client.processes import EmbeddedRedis

            embedded = EmbeddedRedis(workdir / "redis")
            env["AAS_REDIS_URL"] = embedded.url
            print(f"[demo] embedded Redis on {embedded.url}", file=out)
        if not env.get("AAS_S3_ENDPOINT"):
            env["AAS_STORE_ROOT"] = str(workdir / "store")
            print(f"[demo] local object store in {workdir / 'store'}", file=out)
        env.setdefault("AAS_VISIBILITY_TIMEOUT_S", "60")
        if not env.get("AAS_SIGNING_KEY"):  # the demo is a development run on one machine: unsigned, and says so
            env["AAS_INSECURE_DEV"] = "1"
            print("[demo] AAS_INSECURE_DEV=1: unsigned development mode (set AAS_SIGNING_KEY to sign)", file=out)
        os.environ.update({k: v for k, v in env.items() if k.startswith("AAS_")})
        from pipeline.settings import get_settings

        get_settings.cache_clear()
        settings = get_settings()

        from pipeline.client import Client
        from pipeline.client.processes import ProcessGroup, wait_for_workers
        from pipeline.spec import parse_spec
        from workers.app import QUEUE_AGGREGATE, QUEUE_SHARDS, app_for

        lm = opts.model == "char-lm"
        spec_dict: dict[str, Any] = {
            "model": opts.model, "shards": opts.shards, "epochs": opts.epochs or (1 if lm else 5),
            "mode": opts.mode, "local_steps": opts.local_steps, "codec": opts.codec,
        }
        if opts.dataset:
            spec_dict["dataset"] = opts.dataset
        elif lm:  # a 100k-character slice of the standard library's sources: a few minutes on 2 cores
            spec_dict.update(dataset="chars", dataset_args={"max_chars": 100_000})
        spec_dict.update(dict(opts.spec_overrides))
        spec = parse_spec(spec_dict)  # fail before starting anything

        group = ProcessGroup(env=env, cwd=Path.cwd(), logdir=workdir / "logs")
        names = [f"shard{i}" for i in range(opts.workers)] + ["aggregator"]
        for n in names[:-1]:
            group.start_worker(n, QUEUE_SHARDS)
        group.start_worker("aggregator", QUEUE_AGGREGATE)
        print(f"[demo] starting {opts.workers} shard workers and 1 aggregator (logs: {workdir / 'logs'})", file=out)
        wait_for_workers(app_for(settings), names, timeout_s=120)

        watcher = None
        from pipeline.models import model_task

        if opts.serve and model_task(spec.model) == "classify":
            from pipeline.client.processes import free_port
            from workers.publish import model_name

            port = free_port()
            group.start("inference", [sys.executable, "-m", "workers.inference", "--model", model_name(spec),
                                      "--alias", "production", "--port", str(port), "--log-level", "warning"])
            watcher = ServedWatcher(f"http://127.0.0.1:{port}", model_name(spec), spec.dataset, spec.dataset_args)
            print(f"[demo] inference worker on http://127.0.0.1:{port} follows {model_name(spec)}@production",
                  file=out)

        client = Client(settings)
        t0 = time.monotonic()
        job_id = client.submit(spec)
        total = client.jobs.get(job_id).total_rounds
        print(f"[demo] job {job_id}: {spec.model} on {spec.dataset}, {spec.shards} shards, {spec.mode} mode, "
              f"{total} versions", file=out)
        if watcher is not None:
            watcher.start()
        final = _follow(client, job_id, total, opts.timeout_s, quiet=opts.as_json, watcher=watcher)
        wall = time.monotonic() - t0
        summary = _summary(final, wall)
        if watcher is not None:
            summary.update(watcher.finish(client, final))
        if final["status"] != "succeeded":
            summary["error"] = final.get("error")
        return summary
    finally:
        # A second signal must not cut the clean-up short (it is bounded: TERM, a grace period, KILL).
        for sig in (*STOP_SIGNALS, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        try:
            if group is not None:
                group.close()
            if embedded is not None:
                embedded.close()
            if not opts.keep:
                shutil.rmtree(workdir, ignore_errors=True)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class ServedWatcher:
    """Polls the inference worker: which version it serves, and that version's accuracy on the test split."""

    def __init__(self, base_url: str, model: str, dataset: str, dataset_args: dict[str, Any]) -> None:
        import threading

        from pipeline.data import load_dataset

        ds = load_dataset(dataset, dataset_args)
        self.inputs = ds.x_test.tolist()
        self.labels = ds.y_test.tolist()
        self.url, self.model = base_url, model
        self.version: int | None = None
        self.accuracy: float | None = None
        self.versions_seen: set[int] = set()
        self.failed_requests = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="served-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def poll(self) -> None:
        import httpx

        try:
            r = httpx.post(f"{self.url}/v1/models/{self.model}/predict", json={"inputs": self.inputs}, timeout=10)
        except httpx.HTTPError:
            return  # not up yet
        if r.status_code == 503:
            return  # no version loaded yet
        if r.status_code != 200:
            self.failed_requests += 1
            return
        body = r.json()
        self.version = int(body["version"])
        self.versions_seen.add(self.version)
        hits = sum(int(p == y) for p, y in zip(body["predictions"], self.labels, strict=True))
        self.accuracy = hits / len(self.labels)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.poll()

    def finish(self, client: Any, final: dict[str, Any]) -> dict[str, Any]:
        """Stop polling once the worker serves what `production` points at (or after 15 s)."""
        from storage.registry import Registry, RegistryError

        self._stop.set()
        self._thread.join(timeout=15)
        target = None
        try:
            target = Registry(client.redis, client.store).resolve(self.model, "production").version
        except RegistryError:
            pass
        deadline = time.monotonic() + 15
        while target is not None and self.version != target and time.monotonic() < deadline:
            time.sleep(0.3)
            self.poll()
        return {"served_version": self.version, "production_version": target, "served_accuracy": self.accuracy,
                "served_versions_seen": len(self.versions_seen), "failed_predict_requests": self.failed_requests}


def _follow(client: Any, job_id: str, total: int, timeout_s: float, quiet: bool,
            watcher: ServedWatcher | None = None) -> dict[str, Any]:
    from tqdm import tqdm

    bar = tqdm(total=total, unit="version", desc=f"job {job_id}", file=sys.stderr, disable=quiet, dynamic_ncols=True)

    def progress(state: dict[str, Any], new: list[dict[str, Any]]) -> None:
        # Train loss comes with each commit; test numbers with the evaluation, which follows on its own queue.
        last = new[-1]
        post = {"train_loss": f"{float(last.get('train_loss', float('nan'))):.4f}"}
        if state.get("test_accuracy") is not None:
            post["acc"] = f"{float(state['test_accuracy']):.3f}"
        if state.get("perplexity") is not None:
            post["ppl"] = f"{float(state['perplexity']):.2f}"
        if watcher is not None and watcher.version is not None:
            post["served"] = f"v{watcher.version}"
            post["served_acc"] = f"{watcher.accuracy:.3f}"
        bar.set_postfix(post, refresh=False)
        bar.update(len(new))

    try:
        return client.wait(job_id, timeout=timeout_s, on_progress=progress)  # type: ignore[no-any-return]
    finally:
        bar.close()


def _summary(final: dict[str, Any], wall_s: float) -> dict[str, Any]:
    metrics = final.get("metrics") or [{}]
    last = metrics[-1] if metrics else {}
    out = {
        "job_id": final["job_id"],
        "status": final["status"],
        "versions": final["version"],
        "test_accuracy": last.get("accuracy"),
        "test_loss": last.get("loss"),
        "wall_s": round(wall_s, 2),
        "bytes_moved": final["bytes_up"] + final["bytes_down"],
        "bytes_up": final["bytes_up"],
        "bytes_down": final["bytes_down"],
    }
    if "perplexity" in last:
        out["perplexity"] = last["perplexity"]
    return out


def print_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary))
        return
    print()
    print(f"job {summary['job_id']} {summary['status']}: {summary['versions']} versions in {summary['wall_s']} s")
    if summary.get("test_accuracy") is not None:
        print(f"  test accuracy {summary['test_accuracy']:.4f}, test loss {summary['test_loss']:.4f}")
    if summary.get("perplexity") is not None:
        print(f"  perplexity {summary['perplexity']:.2f}")
    print(f"  bytes moved through the object store: {summary['bytes_moved']:,} "
          f"(up {summary['bytes_up']:,}, down {summary['bytes_down']:,})")
    if summary.get("served_version") is not None:
        print(f"  inference worker served {summary['served_versions_seen']} versions while training; now serves "
              f"v{summary['served_version']} (production → v{summary['production_version']}) at "
              f"{summary['served_accuracy']:.4f} test accuracy; failed predict requests: "
              f"{summary['failed_predict_requests']}")
    if summary.get("error"):
        print(f"  error: {summary['error']}")
