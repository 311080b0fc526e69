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


def gen(files, dirs, size):
    """Python run on dom0a (the guest's disks mounted under /mnt/guest by e2ehelp.tree): FILES
    files of SIZE random bytes in DIRS directories under /srv/bench."""
    return f"""
import os, random
rnd = random.Random(1)
for d in range({dirs}):
    p = f"/mnt/guest/srv/bench/d{{d:03d}}"
    os.makedirs(p, exist_ok=True)
    for i in range({files // dirs}):
        with open(f"{{p}}/f{{i:04d}}", "wb") as f:
            f.write(rnd.randbytes({size}))
os.sync()
"""


def change(dirs, size, seed=2):
    """One file per directory of gen()'s tree rewritten whole (1 % with 100 files in each);
    prints the bytes changed."""
    return f"""
import os, random
rnd = random.Random({seed})
for d in range({dirs}):
    with open(f"/mnt/guest/srv/bench/d{{d:03d}}/f0000", "wb") as f:
        f.write(rnd.randbytes({size}))
os.sync()
print({dirs} * {size})
"""
