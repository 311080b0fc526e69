#!/usr/bin/env python3
"""Benchmark of blocks mode in the lab (issue 17). Prints figures; not a test.

web1 in blocks mode; its web1-srv disk (1.5 GiB) filled with random data first, so that no
figure gains from zero blocks.
 (a) thick full scan: a snapshot of web1-srv read and hashed by domubackup's BlockStream (the
     source side of a run: read, xxh64, framing; every block unchanged) vs
     `dd bs=4M iflag=direct if=SNAP | xxh64sum`, each from a cold cache: the ratio of the
     throughputs (target >= 0.8);
 (b) incremental: 1 % of web1-srv's blocks rewritten with random data, then a run: bytes sent /
     bytes changed (target <= 1.05, plus 1 MiB);
 (c) full copy: `domubackup seed web1 --force` of web1-srv (`disks = ["xvdb"]`) vs `dd bs=4M |
     ssh dom0b dd oflag=direct` of the same LV: the ratio of the throughputs (target >= 0.9);
 (d) web1-srv a thin LV, web1 limited to that disk (`disks = ["xvdb"]`): after 1 % of its
     blocks changed, the bytes read from the thin pool during the run / bytes changed (target
     <= 1.1; the run's own overhead, an unchanged run's reads, printed beside); and unchanged
     runs in blocks mode (thin_delta against the base) vs unchanged runs in files mode of the
     same disk: the ratio of the median times (target <= 1.0).

Usage: python3 tests/bench/bench_blocks.py [--repeat N] [--only d|abc]   (as root; brings the lab up, resets it
before and after)
"""

import argparse
import re
import time

from benchlib import Lab, domubackup, line, median, timed

CONF = "/etc/domubackup/domubackup.toml"
SRV, SNAP = "/dev/vg0/web1-srv", "/dev/vg0/bench-snap"
DROP = "sync; echo 3 > /proc/sys/vm/drop_caches"
SCAN = """
import sys
from domubackup.hosts.blockcopy import BlockStream
dev, size = sys.argv[1], int(sys.argv[2])
first = BlockStream(dev, size)
for _ in first:
    pass
open("/proc/sys/vm/drop_caches", "w").write("3")
import time
t = time.monotonic()
again = BlockStream(dev, size, same=first.digests)
assert sum(1 for _ in again) == again.blocks and again.changed == 0
print(time.monotonic() - t)
"""


def size_of(lab, lv):
    return int(lab.ssh("dom0a", ["blockdev", "--getsize64", lv]).stdout)


def full_scan(lab, repeat):
    lab.ssh("dom0a", f"lvcreate -q -s -L 256M -n bench-snap {SRV}")
    try:
        size = size_of(lab, SNAP)
        ours, theirs = [], []
        for _ in range(repeat):
            ours.append(float(lab.ssh("dom0a", ["python3", "-c", SCAN, SNAP, str(size)], timeout=3600).stdout))
            lab.ssh("dom0a", DROP)
            theirs.append(timed(lab.ssh, "dom0a", f"dd if={SNAP} bs=4M iflag=direct status=none | xxh64sum",
                                timeout=3600)[0])
    finally:
        lab.ssh("dom0a", f"lvremove -q -f {SNAP}")
    mib = size / 2**20
    line("(a) scan: domubackup MiB/s (median)", f"{mib / median(ours):.1f}")
    line("(a) scan: dd | xxh64sum MiB/s (median, with ssh's start)", f"{mib / median(theirs):.1f}")
    line("(a) ratio domubackup / dd|xxh64sum (target >= 0.8)", f"{median(theirs) / median(ours):.2f}")


def sent_of(out, disk):
    m = re.search(rf"{disk}: the changed blocks of \S+ -> \S+: (\d+) of (\d+) blocks of 4 MiB changed, .*?(\d+) bytes sent",
                  out)
    if not m:
        raise SystemExit(f"no figures for {disk} in:\n{out}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def incremental(lab):
    blocks = size_of(lab, SRV) // (4 << 20)
    n = max(1, blocks // 100)
    for i in range(n):  # scattered, each a whole 4 MiB block of new random data
        lab.ssh("dom0a", f"dd if=/dev/urandom of={SRV} bs=4M seek={1 + i * (blocks // n)} count=1 conv=fsync status=none")
    r = domubackup(lab, "-v", "run", "web1", timeout=3600)
    if r.returncode:
        raise SystemExit(f"run failed:\n{r.stdout}{r.stderr}")
    changed, total, sent = sent_of(r.stdout + r.stderr, "xvdb")
    line("(b) blocks rewritten / changed / of", f"{n} / {changed} / {total}")
    line("(b) bytes sent / bytes changed (target <= 1.05 + 1 MiB)",
         f"{sent / (n * (4 << 20)):.3f} ({sent} of {n * (4 << 20)})")


def full_copy(lab, repeat):
    lvs = [SRV]
    total = sum(size_of(lab, lv) for lv in lvs)
    ours, theirs = [], []
    for _ in range(repeat):
        lab.ssh("dom0a", DROP)
        t, r = timed(domubackup, lab, "seed", "--force", "web1", timeout=3600)
        if r.returncode:
            raise SystemExit(f"seed failed:\n{r.stdout}{r.stderr}")
        ours.append(t)
        lab.ssh("dom0a", DROP)
        theirs.append(timed(lab.ssh, "dom0a", "; ".join(
            f"dd if={lv} bs=4M status=none | ssh -o BatchMode=yes -o UserKnownHostsFile=/etc/domubackup/known_hosts "
            f"root@dom0b dd of={lv} bs=4M oflag=direct iflag=fullblock status=none" for lv in lvs), timeout=3600)[0])
    mib = total / 2**20
    line("(c) full copy: domubackup seed MiB/s (median)", f"{mib / median(ours):.1f}")
    line("(c) full copy: dd | ssh dd MiB/s (median)", f"{mib / median(theirs):.1f}")
    line("(c) ratio seed / dd|ssh dd (target >= 0.9)", f"{median(theirs) / median(ours):.2f}")


THIN = ("set -e; lvcreate -q -y -L 1700M -T vg0/pool; lvcreate -q -y -V 1536M -T vg0/pool -n web1-srv.thin; "
        "dd if=/dev/vg0/web1-srv of=/dev/vg0/web1-srv.thin bs=4M conv=sparse,fsync status=none; "
        "lvrename -q vg0 web1-srv web1-srv.thick; lvrename -q vg0 web1-srv.thin web1-srv")


def run_ok(lab, *args):
    r = domubackup(lab, "-v", "run", "web1", *args, timeout=3600)
    if r.returncode:
        raise SystemExit(f"run failed:\n{r.stdout}{r.stderr}")
    return r.stdout + r.stderr


def thin(lab, repeat):
    lab.ssh("dom0a", THIN)
    lab.ssh("dom0a", f"sed -i '/^\\[domu.web1\\]/a disks = [\"xvdb\"]' {CONF}; sed -i '1i mode = \"blocks\"' {CONF}")
    pool = lab.ssh("dom0a", ["lsblk", "-dno", "MAJ:MIN", "/dev/mapper/vg0-pool-tpool"]).stdout.strip()

    def reads():
        return int(lab.ssh("dom0a", ["cat", f"/sys/dev/block/{pool}/stat"]).stdout.split()[2]) * 512

    run_ok(lab)  # reads the disk whole, keeps the base
    blocks_mode = []
    for _ in range(repeat):
        before = reads()
        t, out = timed(run_ok, lab)
        blocks_mode.append(t)
        idle = reads() - before
    blocks = size_of(lab, SRV) // (4 << 20)
    n = max(1, blocks // 100)
    for i in range(n):
        lab.ssh("dom0a", f"dd if=/dev/urandom of={SRV} bs=4M seek={1 + i * (blocks // n)} count=1 conv=fsync status=none")
    before = reads()
    out = run_ok(lab)
    read = reads() - before
    changed, total, sent = sent_of(out, "xvdb")
    line("(d) thin: blocks rewritten / changed / of", f"{n} / {changed} / {total}")
    line("(d) thin: bytes read from the pool / bytes changed (target <= 1.1)",
         f"{read / (n * (4 << 20)):.3f} ({read} of {n * (4 << 20)}; an unchanged run reads {idle})")
    lab.ssh("dom0a", f"sed -i '/^mode = \"blocks\"$/d' {CONF}; sed -i '1i mode = \"files\"' {CONF}")
    run_ok(lab)  # the first files-mode run
    files_mode = [timed(run_ok, lab)[0] for _ in range(repeat)]
    line("(d) unchanged run, blocks (thin_delta) s (median)", f"{median(blocks_mode):.1f}")
    line("(d) unchanged run, files s (median)", f"{median(files_mode):.1f}")
    line("(d) ratio blocks / files (target <= 1.0)", f"{median(blocks_mode) / median(files_mode):.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", choices=("d", "abc"), help="measure (d) alone, or (a), (b) and (c)")
    args = ap.parse_args()
    lab = Lab()
    with lab.session_lock():
        lab.up()
        lab.reset()
        try:
            if args.only != "abc":
                try:
                    thin(lab, args.repeat)
                finally:  # the reset does not remove a thin pool
                    lab.ssh("dom0a", "lvremove -q -f vg0/web1-srv vg0/web1-srv.dbkbase vg0/pool; "
                                     "lvrename -q vg0 web1-srv.thick web1-srv", check=False)
                lab.reset()
            if args.only == "d":
                return
            lab.ssh("dom0a", f"sed -i '1i mode = \"blocks\"' {CONF}; "  # web1-srv only: (c) copies 1.5 GiB
                             f"sed -i '/^\\[domu.web1\\]/a disks = [\"xvdb\"]' {CONF}")
            t, _ = timed(lab.ssh, "dom0a", f"dd if=/dev/urandom of={SRV} bs=4M conv=fsync status=none", check=False,
                         timeout=3600)
            line("setup: web1-srv filled with random data (s)", f"{t:.1f}")
            full_copy(lab, args.repeat)  # also makes the replicas equal and keeps their digests
            full_scan(lab, args.repeat)
            incremental(lab)
        finally:
            lab.reset()


if __name__ == "__main__":
    t0 = time.monotonic()
    main()
    line("total (s)", f"{time.monotonic() - t0:.0f}")
