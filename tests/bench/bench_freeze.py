#!/usr/bin/env python3
"""Benchmark of the freeze window in hooks mode (issue 6). Prints figures; not a test.

The guest writer keeps writing to web1's origin filesystems in dom0a; a hook freezes them for
real (fsfreeze). Over RUNS runs: the freeze window (freeze done -> thaw done) median and max,
and the part of it that is not the snapshot commands themselves (window minus the lvcreate
durations of the same run, both from the run's own log). Target: median <= 0.2 s for that part.
Baseline in the same run: the same hook's thaw run from a shell in dom0a on the frozen
filesystems (what the thaw costs without domubackup).

Usage: python3 tests/bench/bench_freeze.py [--runs N]   (as root; brings the lab up)
"""

import argparse
import re

from benchlib import Lab, domubackup, line, median

sys_hook = (__import__("pathlib").Path(__file__).resolve().parents[1] / "e2e" / "test_freeze_e2e.py")
HOOK = re.search(r'HOOK = """(.*?)"""', sys_hook.read_text(), re.S).group(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    lab = Lab()
    with lab.session_lock():
        lab.up()
        lab.reset()
        lab.ssh("dom0a", "mkdir -p /etc/domubackup/freeze.d && cat > /etc/domubackup/freeze.d/10-guest-fsfreeze "
                         "&& chmod 755 /etc/domubackup/freeze.d/10-guest-fsfreeze", input=HOOK)
        lab.ssh("dom0a", "sed -i '1i consistency = \"hooks\"' /etc/domubackup/domubackup.toml")
        lab.writer("start")
        windows, other, snaps, thaws = [], [], [], []
        try:
            for i in range(args.runs):
                r = domubackup(lab, "-vv", "run", "web1")
                if r.returncode:
                    raise SystemExit(r.stdout + r.stderr)
                w = int(re.search(r"frozen (\d+) ms", r.stdout).group(1)) / 1000
                lv = sum(float(x) for x in re.findall(r"`lvcreate --snapshot [^`]*` exit 0 in ([\d.]+)s", r.stderr))
                thaw = sum(float(x) for x in re.findall(r"hook \S+ thaw: end, exit 0 in ([\d.]+) s", r.stderr))
                windows.append(w)
                snaps.append(lv)
                other.append(w - lv)
                thaws.append(thaw)
                line(f"run {i + 1}: window / lvcreate / rest (thaw hook)",
                     f"{w:.3f} s / {lv:.3f} s / {w - lv:.3f} s ({thaw:.3f} s)")
            bare = [bare_thaw(lab) for _ in range(args.runs)]
        finally:
            lab.writer("stop")
            lab.ssh("dom0a", ["rm", "-rf", "/etc/domubackup/freeze.d"])
        line("freeze window median / max", f"{median(windows):.3f} s / {max(windows):.3f} s")
        line("lvcreate --snapshot time in the window, median", f"{median(snaps):.3f} s")
        line("window minus the snapshot commands, median / max (target median <= 0.2 s)",
             f"{median(other):.3f} s / {max(other):.3f} s")
        line("  of which the thaw hook itself (the test hook's fsfreeze -u), median", f"{median(thaws):.3f} s")
        line("  of which domubackup's own work, median", f"{median([o - t for o, t in zip(other, thaws)]):.3f} s")
        line("baseline: the same hook's thaw from a shell, median / max", f"{median(bare):.3f} s / {max(bare):.3f} s")
        line("ratio thaw hook through domubackup / from a shell, median", f"{median(thaws) / median(bare):.2f}")
        line("ratio of the window spent outside lvcreate, median", f"{median([o / w for o, w in zip(other, windows)]):.2f}")
        lab.reset()


def bare_thaw(lab) -> float:
    """Seconds of `HOOK thaw` run from a shell in dom0a, the writer's filesystems frozen."""
    r = lab.ssh("dom0a", "for m in /mnt/guest /mnt/guest/var /mnt/guest/srv; do fsfreeze -f $m; done; "
                         "s=$(date +%s%N); /etc/domubackup/freeze.d/10-guest-fsfreeze thaw; e=$(date +%s%N); "
                         "echo $(( (e - s) / 1000 ))")
    return int(r.stdout.split()[-1]) / 1e6


if __name__ == "__main__":
    main()
