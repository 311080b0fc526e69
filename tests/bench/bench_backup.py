#!/usr/bin/env python3
"""Benchmark of `domubackup run` in the lab (issue 5). Prints figures; not a test.

web1 gets a tree of about 1 GiB in 10,000 files under /srv. Then, in one run of this script:
 (a) `domubackup run web1` against a plain shell script doing the same commands the
     xen-backup.sh way (lvcreate, kpartx, mounts, one ssh session for the peer's mounts,
     rsync, one for the peer's teardown, local teardown): median of REPEAT runs each, ratio;
     and the same run with dom0b restricting dom0a's key to `domubackup serve` (issue 19)
     against the plain root key: ratio;
 (b) `domubackup run` against a bare rsync of the already-mounted trees (the same rsync
     argv, timed while domubackup holds the trees open at its transfer step): ratio, and the
     seconds of everything but rsync;
 (c) bytes sent by a run after 1 % of the files were rewritten, against the bytes changed.

Usage: python3 tests/bench/bench_backup.py [--repeat N] [--keep] [--reuse]   (as root; brings the lab up)
  --keep: leave the lab's disks as they are at the end (no reset), with the tree and the seeded replica;
  --reuse: skip making the tree and the first run when a --keep run left them.
"""

import argparse
import json
import time

from benchlib import Lab, change, domubackup, gen, line, median, release, start_paused, timed, tree
import labvm  # noqa: E402 (benchlib puts tests/lab on the path)

FILES, DIRS, SIZE = 10_000, 100, 100 * 1024

GEN, CHANGE = gen(FILES, DIRS, SIZE), change(DIRS, SIZE)

XEN_BACKUP_SH = r"""#!/bin/bash
# The same job the xen-backup.sh way: plain commands, one ssh session per remote batch.
set -e
S=/mnt/xb/source; T=/mnt/xb/target
lvcreate -q --snapshot --size 256M --name web1-disk-snap /dev/vg0/web1-disk
lvcreate -q --snapshot --size 256M --name web1-srv-snap /dev/vg0/web1-srv
kpartx -a -s -p p /dev/vg0/web1-disk-snap; udevadm settle
mkdir -p $S
mount -o ro,nodev,nosuid,noexec /dev/mapper/vg0-web1--disk--snapp1 $S
mount -o ro,nodev,nosuid,noexec /dev/vg0/web1-srv-snap $S/srv
mount -o ro,nodev,nosuid,noexec,nouuid /dev/mapper/vg0-web1--disk--snapp5 $S/var
ssh -T dom0b "kpartx -a -s -p p /dev/vg0/web1-disk && udevadm settle && mkdir -p $T &&
  mount /dev/mapper/vg0-web1--diskp1 $T && mount /dev/vg0/web1-srv $T/srv &&
  mount /dev/mapper/vg0-web1--diskp5 $T/var"
rsync -aHAX --numeric-ids --delete -e ssh $S/ dom0b:$T/
ssh -T dom0b "umount $T/var $T/srv $T && rmdir $T && kpartx -d -p p /dev/vg0/web1-disk"
umount $S/var $S/srv $S; rmdir $S
kpartx -d -p p /dev/vg0/web1-disk-snap
lvremove -q -f /dev/vg0/web1-srv-snap /dev/vg0/web1-disk-snap
"""


def run_ok(lab, *args):
    r = domubackup(lab, *args, timeout=3600)
    if r.returncode:
        raise SystemExit(f"domubackup {' '.join(args)} failed:\n{r.stdout}{r.stderr}")
    return r


def last_run(lab):
    return json.loads(domubackup(lab, "history", "--json", "--limit", "1", "web1").stdout)[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="no lab reset at the end")
    ap.add_argument("--reuse", action="store_true", help="reuse the tree a --keep run left")
    ap.add_argument("--only-a", action="store_true", help="measure (a) alone")
    args = ap.parse_args()
    lab = Lab()
    with lab.session_lock():
        lab.up()
        if args.reuse and has_tree(lab):
            line("tree and first run", "reused")
        else:
            lab.reset()
            make_tree(lab)
        lab.ssh("dom0a", "cat > /root/xen-backup.sh && chmod 755 /root/xen-backup.sh", input=XEN_BACKUP_SH)
        measure(lab, args)
        if not args.keep:
            lab.reset()


def has_tree(lab) -> bool:
    """The tree is in web1's /srv (looked up with debugfs, nothing mounted) and was copied."""
    r = lab.ssh("dom0a", ["debugfs", "-R", "ls /bench/d099", "/dev/vg0/web1-srv"], check=False)
    return "f0099" in r.stdout and domubackup(lab, "history", "--limit", "1", "web1").returncode == 0 \
        and last_run(lab)["status"] == "OK"


def make_tree(lab):
    tree(lab, "dom0a", "mount")
    try:
        t, _ = timed(lab.ssh, "dom0a", ["python3", "-c", GEN], timeout=3600)
    finally:
        tree(lab, "dom0a", "umount")
    line(f"tree made in the guest ({FILES} files x {SIZE // 1024} KiB)", f"{t:.1f} s")
    t, _ = timed(run_ok, lab, "run", "web1")
    first = last_run(lab)
    line("first run (full copy)", f"{t:.1f} s, {first['bytes_sent'] / 2**20:.0f} MiB sent, "
                                  f"{first['files']} files")


def restricted(lab, on):
    """dom0b runs dom0a's key only through `domubackup serve` (ON) or as a root shell. Its
    [serve] grant and web1's replica tags stay in both (the plain key ignores them)."""
    labvm.push_files("dom0b", {"/root/.ssh/authorized_keys": (labvm.authorized_keys("dom0b", serve=on), 0o600)})


def measure(lab, args):
    # (a) domubackup vs the shell script, and through serve, alternating, nothing changed in between
    lab.ssh("dom0b", "lvchange -q --addtag dbk:domu:web1 vg0/web1-disk vg0/web1-srv; "
                     "grep -q '^\\[serve\\]' /etc/domubackup/domubackup.toml || "
                     "printf '\\n[serve]\\nclients = { dom0a = [\"web1\"] }\\n' >> /etc/domubackup/domubackup.toml")
    ours, served, theirs = [], [], []
    for i in range(args.repeat):  # plain, script, serve; then serve, script, plain: no mode always first
        for step in ("plain", "script", "serve")[::-1 if i % 2 else 1]:
            if step == "script":
                theirs.append(timed(lab.ssh, "dom0a", ["/root/xen-backup.sh"], timeout=3600)[0])
                continue
            restricted(lab, step == "serve")
            try:
                (served if step == "serve" else ours).append(timed(run_ok, lab, "run", "web1")[0])
            finally:
                restricted(lab, False)
    a = median(ours) / median(theirs)
    line("(a) domubackup run, median", f"{median(ours):.1f} s  ({', '.join(f'{x:.1f}' for x in ours)})")
    line("(a) xen-backup.sh-style script, median", f"{median(theirs):.1f} s  ({', '.join(f'{x:.1f}' for x in theirs)})")
    line("(a) ratio domubackup / script (target <= 1.10)", f"{a:.2f}")
    line("(a) domubackup run through serve, median", f"{median(served):.1f} s  ({', '.join(f'{x:.1f}' for x in served)})")
    line("(a) ratio through serve / plain root key (target <= 1.05)", f"{median(served) / median(ours):.3f}")
    if args.only_a:
        return

    # (b) the bare rsync of the mounted trees, timed inside a held run
    bare = []
    for _ in range(args.repeat):
        pid = start_paused(lab, "transfer")
        rsync = ["rsync", "-aHAX", "--numeric-ids", "--delete", "--stats", "-e",
                 "ssh -i /root/.ssh/id_ed25519 -o UserKnownHostsFile=/etc/domubackup/known_hosts "
                 "-o StrictHostKeyChecking=yes -o BatchMode=yes",
                 "/mnt/domubackup/source/web1/", "dom0b:/mnt/domubackup/target/web1/"]
        bare.append(timed(lab.ssh, "dom0a", rsync, timeout=3600)[0])
        release(lab, "transfer", pid)
    b = median(ours) / median(bare)
    line("(b) bare rsync of the mounted trees, median", f"{median(bare):.1f} s")
    line("(b) ratio domubackup run / bare rsync", f"{b:.2f}")
    line("(b) seconds of everything but rsync (median run - median rsync)", f"{median(ours) - median(bare):.1f} s")
    line("(b) the same for the script", f"{median(theirs) - median(bare):.1f} s")

    # (c) bytes sent after 1 % of the files changed
    tree(lab, "dom0a", "mount")
    try:
        changed = int(lab.ssh("dom0a", ["python3", "-c", CHANGE]).stdout)
    finally:
        tree(lab, "dom0a", "umount")
    run_ok(lab, "run", "web1")
    sent = last_run(lab)["bytes_sent"]
    line("(c) bytes changed (1 % of the files rewritten)", f"{changed}")
    line("(c) bytes sent by the next run", f"{sent}")
    line("(c) ratio sent / changed (target <= 1.2)", f"{sent / changed:.3f}")


if __name__ == "__main__":
    t0 = time.monotonic()
    main()
    line("benchmark wall time", f"{time.monotonic() - t0:.0f} s")
