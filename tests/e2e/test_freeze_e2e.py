"""Issue 6 in the lab: a freeze hook makes the replica hold every record written before the freeze."""

import re

import pytest

from e2ehelp import domubackup, kill9, start_paused

HOOK = """#!/bin/sh
# e2e: freeze the guest writer's filesystems (the origin mounts under /mnt/guest) for real.
case "$1" in
freeze)
    for m in /mnt/guest /mnt/guest/var /mnt/guest/srv; do fsfreeze -f "$m" || exit 1; done
    # Never read the frozen files here: on XFS a read can wait behind a writer that itself
    # waits for the thaw, and the hook hangs until its timeout. The writer notes each
    # completed record in /run; once it is blocked (state D) that note is final.
    w=$(cat /run/lab-guest-writer.pid); n=0
    while [ "$(cut -d' ' -f3 /proc/$w/stat)" != D ] && [ $n -lt 100 ]; do sleep 0.05; n=$((n+1)); done
    cp /run/lab-writer.seq /run/e2e-frozen-seq ;;
thaw)
    # In reverse, one after the other (on a one-CPU Dom0 background jobs only add forks);
    # exit 0 also when nothing is frozen (cleanup runs the thaw again).
    for m in /mnt/guest/srv /mnt/guest/var /mnt/guest; do fsfreeze -u "$m" 2>/dev/null; done
    exit 0 ;;
esac
"""
FILES = ["root/lab-writer.log", "var/log/lab-writer.log", "srv/lab-writer.log"]


@pytest.fixture
def writer(lab):
    lab.reset()
    lab.ssh("dom0a", "mkdir -p /etc/domubackup/freeze.d && cat > /etc/domubackup/freeze.d/10-guest-fsfreeze "
                     "&& chmod 755 /etc/domubackup/freeze.d/10-guest-fsfreeze", input=HOOK)
    lab.writer("start")
    yield lab
    lab.ssh("dom0a", "for m in /mnt/guest/srv /mnt/guest/var /mnt/guest; do fsfreeze -u $m 2>/dev/null; done; true")
    lab.writer("stop")
    lab.ssh("dom0a", ["rm", "-rf", "/etc/domubackup/freeze.d"])


def set_consistency(lab, mode):
    lab.ssh("dom0a", f"sed -i '/^consistency/d;/^freeze_max_window/d' /etc/domubackup/domubackup.toml && "
                     f"sed -i '1i consistency = \"{mode}\"\\nfreeze_max_window = 30.0' /etc/domubackup/domubackup.toml")


def replica_records(lab):
    lab.ssh("dom0b", "kpartx -a -s -p p /dev/vg0/web1-disk && udevadm settle && mkdir -p /mnt/guest && "
                     "mount -o ro /dev/mapper/vg0-web1--diskp1 /mnt/guest && "
                     "mount -o ro,nouuid /dev/mapper/vg0-web1--diskp5 /mnt/guest/var && "
                     "mount -o ro /dev/vg0/web1-srv /mnt/guest/srv")
    try:
        return lab.ssh("dom0b", ["lab-guest", "writer", "verify", *[f"/mnt/guest/{f}" for f in FILES]],
                       check=False).stdout
    finally:
        lab.ssh("dom0b", "umount /mnt/guest/srv /mnt/guest/var /mnt/guest; kpartx -d -p p /dev/vg0/web1-disk")


def test_hook_freeze_gives_an_application_consistent_replica(writer):
    lab = writer
    set_consistency(lab, "hooks")
    r = domubackup(lab, "-v", "run", "web1")
    assert r.returncode == 0, r.stderr
    assert "application-consistent (mode hooks: 1 hook(s)), frozen " in r.stdout
    frozen_at = [int(x) for x in lab.ssh("dom0a", ["cat", "/run/e2e-frozen-seq"]).stdout.split()]
    report = replica_records(lab)
    for f, seq in zip(FILES, frozen_at):
        line = next(line for line in report.splitlines() if line.startswith(f"/mnt/guest/{f}:"))
        assert "bad=0" in line and "torn_tail=False" in line, line
        assert int(re.search(r"last_seq=(\d+)", line).group(1)) == seq, (line, seq)
    window = int(re.search(r"frozen (\d+) ms", r.stdout).group(1))
    assert window < 30000
    history = domubackup(lab, "history", "--json", "web1").stdout
    assert '"consistency": "application"' in history


def test_without_hook_the_replica_is_crash_consistent(writer):
    lab = writer
    r = domubackup(lab, "-v", "run", "web1")
    assert r.returncode == 0, r.stderr
    report = replica_records(lab)
    print("crash-consistent replica of the writer's files:\n" + report)
    assert report.count("bad=0") == 3  # every fsync'd record is whole; a torn tail may exist


def test_kill_9_while_frozen_thaws_at_once_and_cleanup_finishes(writer):
    lab = writer
    set_consistency(lab, "hooks")
    pid = start_paused(lab, "snapshot")  # frozen: held before the first lvcreate
    assert frozen(lab)
    kill9(lab, pid)
    # The thaw hook was forked before the freeze and waits on a pipe that only the run holds
    # open: the run's death releases it, the guest is thawed without anyone's help...
    assert not frozen(lab)
    c = domubackup(lab, "cleanup", "web1")
    assert c.returncode == 0, c.stderr
    assert "10-guest-fsfreeze thaw" in c.stdout  # ...and cleanup still runs the journaled thaw
    assert not frozen(lab)


def frozen(lab) -> bool:
    """A write to /srv still blocked after 2 s means the filesystem is frozen (the blocked
    writer finishes by itself at the thaw)."""
    r = lab.ssh("dom0a", "touch /mnt/guest/srv/probe >/dev/null 2>&1 & p=$!; sleep 2; "
                         "if kill -0 $p 2>/dev/null; then echo frozen; else echo thawed; fi")
    return r.stdout.strip() == "frozen"
