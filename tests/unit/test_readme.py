"""The README's shell blocks, as pasted: each runs here, or says visibly why not.

Every ```bash block is preceded by ``<!-- readme-test: run -->`` or ``<!-- readme-test: skip: REASON -->``.
Run blocks execute in bash (-e, -o pipefail) with `aas` on PATH (this checkout's CLI) against the test
Redis db; a skipped block must name its reason (and, where one exists, the test that covers it).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MARK = re.compile(r"<!-- readme-test: (run|skip: (?P<reason>.+?)) -->\s*$")


def shell_blocks() -> list[tuple[int, str, str | None, str]]:
    """(line, mode, skip reason, code) of every ```bash block in README.md."""
    lines = (REPO / "README.md").read_text().splitlines()
    out = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            start = i
            m = MARK.match(lines[i - 1].strip()) if i else None
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            mode = "none" if m is None else ("run" if m.group(1) == "run" else "skip")
            out.append((start + 1, mode, m.group("reason") if m else None, "\n".join(lines[i + 1:j])))
            i = j
        i += 1
    return out


def test_every_shell_block_is_run_or_says_why_not() -> None:
    blocks = shell_blocks()
    assert blocks
    unmarked = [line for line, mode, _, _ in blocks if mode == "none"]
    assert not unmarked, f"README shell blocks without a readme-test marker at lines {unmarked}"
    assert all(reason and len(reason) > 10 for _, mode, reason, _ in blocks if mode == "skip")
    assert any(mode == "run" for _, mode, _, _ in blocks)


@pytest.mark.parametrize("line,code", [(line, code) for line, mode, _, code in shell_blocks() if mode == "run"])
def test_readme_block_runs_as_pasted(line: int, code: str, redis_url: str, tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "aas"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m pipeline.client.cli "$@"\n')
    shim.chmod(0o755)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AAS_")}, "AAS_REDIS_URL": redis_url,
           "AAS_STORE_ROOT": str(tmp_path / "store"), "PYTHONPATH": str(REPO),
           "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"README.md line {line}:\n{code}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
