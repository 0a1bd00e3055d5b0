"""`aas demo` stopped by a signal leaves nothing behind: no process, no folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _marked(mark: str) -> dict[int, str]:
    """Processes whose environment carries `mark` (every process the demo starts inherits it)."""
    found = {}
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            if mark.encode() in (pid_dir / "environ").read_bytes():
                found[int(pid_dir.name)] = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
        except OSError:
            continue
    return found


def _run_and_stop(sig: str, after_s: int, tmp_path: Path) -> tuple[dict[int, str], subprocess.Popen[str], str]:
    """`timeout -s SIG after_s aas demo`; returns what it started (seen while it ran), itself, its stderr."""
    mark = f"AAS_TEST_MARK_{uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AAS_")}
    env.update({"PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path), mark: "1"})
    demo = subprocess.Popen(["timeout", "-s", sig, str(after_s), sys.executable, "-m", "pipeline.client.cli", "demo",
                             "--workers", "1", "--no-serve", "--epochs", "200"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[int, str] = {}
    while demo.poll() is None:
        seen.update({pid: cmd for pid, cmd in _marked(mark).items() if pid != demo.pid})
        time.sleep(0.2)
    _, err = demo.communicate(timeout=60)
    time.sleep(1)
    left = _marked(mark)
    for pid in left:  # clean up before failing, so one failure does not leave workers training
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"processes left behind after SIG{sig} at {after_s} s: {left}\n{err[-2000:]}"
    assert not list(tmp_path.glob("aas-demo-*")), f"folder left behind: {list(tmp_path.iterdir())}"
    assert "Traceback" not in err, err[-3000:]
    return seen, demo, err


@pytest.mark.parametrize("sig", ["TERM", "HUP"])
def test_timeout_with_a_signal_stops_every_process_of_the_demo_and_removes_its_folder(
        sig: str, tmp_path: Path) -> None:
    if not Path("/proc/self/environ").exists():
        pytest.skip("needs /proc to find processes")
    # 10 s as an operator would; on a loaded machine the demo may still be importing torch then (nothing
    # started yet, nothing to leave), so it runs again with time to start its Redis and workers.
    for after_s in (10, 30):
        seen, demo, err = _run_and_stop(sig, after_s, tmp_path)
        if demo.returncode != 0 and any("celery" in cmd and "worker" in cmd for cmd in seen.values()):
            assert demo.returncode in (124, 130), (demo.returncode, err[-2000:])
            assert "aas: interrupted" in err, err[-2000:]
            return
    raise AssertionError(f"no worker had started when SIG{sig} came; nothing was tested:\n{err[-2000:]}")
