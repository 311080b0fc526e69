"""Shared by the lab benchmarks: the lab, timing, medians."""

import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "lab"))
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from labapi import Lab  # noqa: E402,F401
from e2ehelp import domubackup, release, start_paused, tree  # noqa: E402,F401


def timed(fn, *args, **kw):
    t0 = time.monotonic()
    result = fn(*args, **kw)
    return time.monotonic() - t0, result


def median(xs):
    return statistics.median(xs)


def line(label, value):
    print(f"{label:<58} {value}", flush=True)
