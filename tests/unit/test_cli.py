"""The `aas` command as people and scripts use it: help, version, JSON, errors, exit codes, pipes."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def _parsers(p: argparse.ArgumentParser, path: str = "aas") -> list[tuple[str, argparse.ArgumentParser]]:
    out = [(path, p)]
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _parsers(sub, f"{path} {name}")
    return out


def test_every_option_and_argument_of_every_command_has_help() -> None:
    from pipeline.client.cli import build_parser

    missing = []
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"options without help: {missing}"


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.client.cli import main, version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"aas {version()}"


def test_json_is_strict_nan_becomes_null_and_times_are_iso() -> None:
    from pipeline.client.output import dumps

    text = dumps({"loss": float("nan"), "acc": math.inf, "created_at": 0.0, "metrics": [{"t": 1e9, "x": 1.5}]})
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert data["loss"] is None and data["acc"] is None
    assert data["created_at"] == "1970-01-01T00:00:00Z" and data["metrics"][0]["t"] == "2001-09-09T01:46:40Z"


def test_progress_lines_name_the_version_loss_and_accuracy(capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.client.output import progress_printer

    show = progress_printer()
    show({"job_id": "j1", "status": "running", "total_rounds": 9}, [{"version": 3, "loss": 0.5, "accuracy": 0.91}])
    err = capsys.readouterr().err
    assert "[j1] running" in err and "v3/9" in err and "loss 0.5" in err and "acc 0.91" in err


def _aas(*argv: str, env: dict[str, str] | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.client.cli", *argv], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, **kw)


def test_an_unreachable_redis_is_one_line_and_exit_3(tmp_path: Path) -> None:
    from pipeline.client.processes import free_port

    env = {"AAS_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "AAS_STORE_ROOT": str(tmp_path)}
    for argv in (["status", "abc"], ["models", "list"], ["schedule", "list"]):
        p = _aas(*argv, env=env)
        assert p.returncode == 3, (argv, p.stderr)
        assert p.stderr.startswith("aas: ") and "Traceback" not in p.stderr, (argv, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1, (argv, p.stderr)


def test_a_bad_request_is_exit_2_in_one_style(tmp_path: Path) -> None:
    p = _aas("submit", "--set", "novalue", env={"AAS_STORE_ROOT": str(tmp_path)})
    assert p.returncode == 2 and p.stderr.startswith("aas: --set 'novalue'"), p.stderr


def test_a_closed_pipe_ends_quietly(redis_url: str) -> None:
    import redis

    r = redis.Redis.from_url(redis_url)
    for i in range(400):
        r.zadd("aas:jobs", {f"job{i:04d}": i})
        r.hset(f"aas:job:job{i:04d}", mapping={"spec": "{}", "status": "succeeded", "version": 3,
                                               "total_rounds": 3, "created_at": 1e9})
    p = subprocess.run(f"{sys.executable} -m pipeline.client.cli status --limit 400 | head -1", shell=True,
                       capture_output=True, text=True, timeout=60, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO), "AAS_REDIS_URL": redis_url})
    assert p.stdout.startswith("job0399"), p.stdout
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr
