#!/usr/bin/env python3
"""Benchmark of restore points in the lab (issue 16). Prints figures; not a test.

web1 gets a tree of FILES files under /srv; each measured run follows a change of 1 % of them
(rewritten whole), so every run writes the same amount into the replica on dom0b.
 (a) web1's replicas thin LVs on dom0b: runs that make a thin point (keep_last = 3)
     against runs that make none (no [retention]), alternating: medians and their ratio
     (target <= 1.05);
 (b) web1-srv's replica thick (as the lab makes it): runs with 0, 1 and 3 thick points of
     the replicas kept on dom0b (keep_last = 1 and 3; each run also makes one and prunes
     one, and gives each thick point room first): the median run for each, as a ratio to 0.

Usage: python3 tests/bench/bench_points.py [--repeat N] [--files N]   (as root; brings the lab up,
resets it before and after)
"""

import argparse
import json
import time

from benchlib import Lab, change, domubackup, gen, line, median, timed, tree

CONF = "/etc/domubackup/domubackup.toml"


def run_ok(lab):
    r = domubackup(lab, "run", "web1", timeout=3600)
    if r.returncode:
        raise SystemExit(f"domubackup run web1 failed:\n{r.stdout}{r.stderr}")


def points(lab):
    return json.loads(domubackup(lab, "points", "--json", "web1").stdout)


def retention(lab, keep):
    """keep_last = KEEP in dom0a's configuration, or no [retention] (None): no points."""
    lab.ssh("dom0a", f"sed -i '/^\\[retention\\]/,$d' {CONF}")
    if keep is not None:
        lab.ssh("dom0a", f"printf '[retention]\\nkeep_last = {keep}\\n' >> {CONF}")


class Bench:
    def __init__(self, lab, files, size=100 * 1024):
        self.lab, self.files, self.dirs, self.size, self.seed = lab, files, files // 100, size, 10

    def changed_run(self):
        """1 % of the files rewritten in the guest, then a timed run."""
        self.seed += 1
        tree(self.lab, "dom0a", "mount")
        try:
            self.lab.ssh("dom0a", ["python3", "-c", change(self.dirs, self.size, self.seed)])
        finally:
            tree(self.lab, "dom0a", "umount")
        return timed(run_ok, self.lab)[0]

    def seed_tree(self):
        tree(self.lab, "dom0a", "mount")
        try:
            t, _ = timed(self.lab.ssh, "dom0a", ["python3", "-c", gen(self.files, self.dirs, self.size)], timeout=3600)
        finally:
            tree(self.lab, "dom0a", "umount")
        line(f"tree made in the guest ({self.files} files x {self.size // 1024} KiB)", f"{t:.1f} s")
        t = timed(run_ok, self.lab)[0]
        line("first run (full copy)", f"{t:.1f} s")


def thin_replicas(lab):
    """dom0b: both replicas of web1 become thin LVs of one pool (same content)."""
    lab.ssh("dom0b", "lvcreate -q -y --type thin-pool -L 3G -n pool vg0")
    for lv, size in (("web1-disk", "1200M"), ("web1-srv", "1536M")):
        lab.ssh("dom0b", f"lvrename -q vg0/{lv} {lv}-thick && lvcreate -q -y -V {size} --thin -n {lv} vg0/pool "
                         f"&& dd if=/dev/vg0/{lv}-thick of=/dev/vg0/{lv} bs=4M conv=fsync,sparse status=none "
                         f"&& lvremove -q -f vg0/{lv}-thick")


def measure_thin(bench, repeat):
    lab = bench.lab
    with_points, without = [], []
    retention(lab, 3)
    bench.changed_run()  # warm: one point exists before the measured runs
    for _ in range(repeat):
        retention(lab, None)
        without.append(bench.changed_run())
        retention(lab, 3)
        with_points.append(bench.changed_run())
    kinds = {p["kind"] for p in points(lab)}
    line("(a) run without points, median", f"{median(without):.1f} s  ({', '.join(f'{x:.1f}' for x in without)})")
    line(f"(a) run making a point ({'/'.join(sorted(kinds))}), median",
         f"{median(with_points):.1f} s  ({', '.join(f'{x:.1f}' for x in with_points)})")
    line("(a) ratio with thin points / without (target <= 1.05)", f"{median(with_points) / median(without):.2f}")


def measure_thick(bench, repeat):
    lab = bench.lab
    lab.ssh("dom0a", f"sed -i '1i point_size = \"64M\"' {CONF}")
    base = None
    for k in (0, 1, 3):
        retention(lab, k or None)
        for _ in range(k):  # before each measured run, K thick points are kept
            bench.changed_run()
        times = [bench.changed_run() for _ in range(repeat)]
        kept = [p for p in points(lab) if p["status"] == "GOOD"]
        base = base or median(times)
        line(f"(b) {k} thick point(s) kept ({len(kept)} after), median run",
             f"{median(times):.1f} s  ({', '.join(f'{x:.1f}' for x in times)})  ratio {median(times) / base:.2f}")
    sizes = lab.ssh("dom0b", "lvs --noheadings --units m -o lv_name,lv_size,snap_percent @dbk:point").stdout
    line("(b) thick points at the end (name, size, fill %)", " ".join(sizes.split()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--files", type=int, default=2000, help="a multiple of 100")
    ap.add_argument("--only", choices=("a", "b"), help="measure (a) or (b) alone")
    args = ap.parse_args()
    lab = Lab()
    with lab.session_lock():
        lab.up()
        for part in {"a": [measure_thin], "b": [measure_thick]}.get(args.only, [measure_thin, measure_thick]):
            lab.reset()
            if part is measure_thin:
                thin_replicas(lab)
            bench = Bench(lab, args.files)
            bench.seed_tree()
            try:
                part(bench, args.repeat)
            finally:
                lab.ssh("dom0b", "lvremove -q -f @dbk:point; lvremove -q -f vg0/pool", check=False)  # reset remakes the LVs
        lab.reset()


if __name__ == "__main__":
    t0 = time.monotonic()
    main()
    line("benchmark wall time", f"{time.monotonic() - t0:.0f} s")
