"""Benchmark scripts (not tests): each times qwen-jax and its baseline in the same run, prints a table
and writes JSON with the machine, versions and date."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable


def environment() -> dict:
    import jax
    import jaxlib
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind, "cpu": platform.processor() or platform.machine()}
    info["cpu_count"] = os.cpu_count()
    info["commit"] = _commit()
    return info


def _commit() -> str | None:
    """The checkout's commit (with ``+`` where its tracked files differ from it), or None outside a git checkout."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")


KERNEL_WARMUP_S = 0.5   # the kernel benchmarks call each kernel this long (after its compiling call) before timing it


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1, warmup_s: float = 0.0) -> float:
    """Median wall time of ``fn`` (which must block until its work is done) after ``warmup`` calls, and more until
    ``warmup_s`` seconds have passed after the first (its compilation leaves the GPU idle): a sub-millisecond
    kernel's first calls find the card not yet warm (an H200's 128K decode: 0.283 ms a call over its first dozen
    calls, 0.174 once warm)."""
    done, start = 0, None
    while done < warmup or (warmup_s > 0 and (start is None or time.perf_counter() - start < warmup_s)):
        fn()
        done += 1
        start = time.perf_counter() if start is None else start
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)


def report(args, rows: list[dict], env: dict | None = None, columns: list[str] | None = None, **extra) -> None:
    """A benchmark's ending: the machine as one JSON line, the rows as a table (``columns``: by default every key
    of the rows, in order of appearance), and ``args.json`` (if given) with the machine, the arguments, the rows
    and ``extra``."""
    env = env or environment()
    print(json.dumps(env))
    print_table(rows, columns or list(dict.fromkeys(key for row in rows for key in row)))
    write_json(args.json, {"env": env, "args": vars(args), "rows": rows, **extra})


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))


def output_problem(path: str | None, flag: str = "--json") -> str | None:
    """Why ``path`` could not be written at the end of a long run (a missing folder, a folder), or None:
    checked before the run, not after it."""
    if not path:
        return None
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"{flag} {path}: is a folder; give a file name"
    if not os.path.isdir(parent):
        return f"{flag} {path}: the folder {parent} does not exist"
    return None


def below_one(args, *names: str) -> str | None:
    """The first of the counts ``names`` (argparse dests) that is under 1, as a one-line reason, or None."""
    for name in names:
        value = getattr(args, name)
        if value < 1:
            return f"--{name.replace('_', '-')} {value}: must be at least 1"
    return None
