"""How every ``aas`` command talks: strict JSON for scripts, readable lines for people, one error style,
one exit-code scheme.

Exit codes (README, "Exit codes"):

    0    done
    1    the job (or the demo's job) ended, but not as succeeded: failed or cancelled
    2    the request was wrong: usage, an invalid spec, an unknown job, model or version, a refusal
    3    a service did not answer: Redis or the object store (retrying later may help)
    124  ``aas wait --timeout`` ran out before the job ended (as timeout(1))
    130  interrupted (Ctrl-C, SIGTERM, SIGHUP)
    141  the reader of our output went away (``aas status | head``): quiet, as with SIGPIPE

Errors print one line on stderr, ``aas: <what is wrong and what to do>``, never a traceback.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

TIME_FIELDS = ("created_at", "started_at", "finished_at", "progress_at", "t")


def fail(message: str, code: int = EXIT_USAGE) -> int:
    """Print ``aas: message`` on stderr; return `code` (the caller returns it as the exit status)."""
    print(f"aas: {message}", file=sys.stderr)
    return code


def iso_time(t: Any) -> Any:
    """An epoch time in seconds as ISO 8601 UTC (``2026-11-29T23:48:02Z``); anything else unchanged."""
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        return t
    return dt.datetime.fromtimestamp(float(t), tz=dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def with_iso_times(obj: Any) -> Any:
    """`obj` with every ``*_at`` (and ``t``) field in every nested dict as ISO 8601 text."""
    if isinstance(obj, dict):
        return {k: iso_time(v) if k in TIME_FIELDS else with_iso_times(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [with_iso_times(v) for v in obj]
    return obj


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN or Infinity: a diverged loss reads as null
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def dumps(obj: Any, *, indent: int | None = None) -> str:
    """Strict JSON (RFC 8259): NaN and ±Infinity become null, times ISO 8601; never a bare NaN."""
    return json.dumps(_finite(with_iso_times(obj)), allow_nan=False, indent=indent, sort_keys=indent is not None)


def print_json(obj: Any, *, indent: int | None = None, file: TextIO | None = None) -> None:
    print(dumps(obj, indent=indent), file=file or sys.stdout)


def fmt(v: Any, digits: int = 4) -> str:
    """A value for people: floats to `digits` significant places, NaN as 'nan', None as '-'."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}g}"
    return str(v)


def progress_printer(total: int | None = None, file: TextIO | None = None
                     ) -> Callable[[dict[str, Any], list[dict[str, Any]]], None]:
    """An ``on_progress`` for ``Client.wait``: one line per new version on stderr (stdout stays for the
    result a script reads)."""
    out = file or sys.stderr

    def show(state: dict[str, Any], new: list[dict[str, Any]]) -> None:
        last = new[-1]
        of = f"/{total or state.get('total_rounds')}" if (total or state.get("total_rounds")) else ""
        parts = [f"v{last.get('version', state.get('version'))}{of}", f"loss {fmt(last.get('loss'))}"]
        if last.get("accuracy") is not None:
            parts.append(f"acc {fmt(last.get('accuracy'))}")
        if last.get("perplexity") is not None:
            parts.append(f"ppl {fmt(last.get('perplexity'))}")
        print(f"[{state.get('job_id', '')}] {state.get('status', '')}  " + "  ".join(parts), file=out, flush=True)

    return show


def quiet_broken_pipe() -> int:
    """After a BrokenPipeError on stdout: point stdout at /dev/null (so the interpreter's final flush
    does not raise again) and return the exit status."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE
