"""Issue 5 in the lab: a cut link mid-transfer, seeding the replica."""

import time

from domubackup.core.serve import SESSION_IDLE
from e2ehelp import STATE, domubackup, manifest, release, start_paused, tree


def cleanup_once_the_link_is_back(lab):
    for _ in range(30):
        if lab.ssh("dom0a", ["ping", "-c1", "-W1", "dom0b"], check=False).returncode == 0:
            break
    r = domubackup(lab, "cleanup", "web1")
    assert r.returncode == 0, r.stderr

def test_link_cut_during_transfer_then_cleanup_clears_both_hosts(fresh):
    lab = fresh
    pid = start_paused(lab, "transfer")
    lab.ssh("dom0b", ["ip", "link", "set", "eth1", "down"])  # the Dom0-to-Dom0 link only
    try:
        out = release(lab, "transfer", pid)
    finally:
        lab.ssh("dom0b", ["ip", "link", "set", "eth1", "up"])
    status = lab.ssh("dom0a", "cat /tmp/paused.out; echo").stdout
    assert "web1: ERROR" in out or "teardown of web1" in out, status
    assert "dom0b" in out
    # this host was cleaned; what could not be undone on the peer stays in the journal
    j = lab.ssh("dom0a", ["cat", "/var/lib/domubackup/journal/web1.json"], check=False)
    if j.returncode == 0:
        assert '"host": "dom0b"' in j.stdout and '"host": "local"' not in j.stdout
        cleanup_once_the_link_is_back(lab)
    # the run's serve session on dom0b never saw its connection end (the FIN was lost with the
    # link): it ends by itself once idle for core.serve.SESSION_IDLE seconds
    for _ in range(SESSION_IDLE + 10):
        if lab.ssh("dom0b", ["pgrep", "-f", "domubackup serve-session"], check=False).returncode:
            break
        time.sleep(1)
    rc, text = lab.leftovers()
    assert rc == 0, text
    assert domubackup(lab, "run", "web1").returncode == 0


def test_peer_dead_mid_transfer_ends_rsync_by_keepalive_then_cleanup_clears_both(fresh):
    """The peer stops answering while rsync sends (its link goes down, no FIN, no RST): rsync's ssh
    keepalives (ssh.alive_interval) end the transfer after ~3 x the interval. Without them rsync
    waits for TCP to give up (~15 min) or for ever when it is the one waiting to read. The
    peer's rsync ends after rsync.io_timeout, and `cleanup` then clears both hosts."""
    lab = fresh
    tree(lab, "dom0a", "mount")  # 16 MiB to send at 256 KiB/s: the transfer lasts ~60 s
    try:
        lab.ssh("dom0a", "head -c 16M /dev/urandom > /mnt/guest/srv/big.bin && sync")
    finally:
        tree(lab, "dom0a", "umount")
    lab.ssh("dom0a", "sed -i 's/^connect_timeout = 10$/&\\nalive_interval = 2/' /etc/domubackup/domubackup.toml && "
                     "printf '\\n[rsync]\\nbwlimit = \"256K\"\\nio_timeout = 15\\n' >> /etc/domubackup/domubackup.toml")
    pid = start_paused(lab, "transfer")
    lab.ssh("dom0a", ["rm", "-f", f"{STATE}/pause/web1.transfer"])
    for _ in range(120):  # rsync's server runs on the peer: the data flows
        if lab.ssh("dom0b", ["pgrep", "-x", "rsync"], check=False).returncode == 0:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("rsync never started on dom0b: " + lab.ssh("dom0a", "cat /tmp/paused.out").stdout)
    time.sleep(2)
    lab.ssh("dom0b", ["ip", "link", "set", "eth1", "down"])
    cut = time.monotonic()
    try:
        while lab.ssh("dom0a", ["kill", "-0", str(pid)], check=False).returncode == 0:
            assert time.monotonic() - cut < 240, "the run still waits for the dead peer"
            time.sleep(0.5)
    finally:
        lab.ssh("dom0b", ["ip", "link", "set", "eth1", "up"])
    ended = time.monotonic() - cut
    out = lab.ssh("dom0a", "cat /tmp/paused.out").stdout
    print(f"the run ended {ended:.1f} s after the cut")
    assert ended < 90, out  # keepalives ~6 s, one connect timeout (10 s) for the peer's teardown
    summary = out[out.index("web1: ERROR"):]  # the summary names what is left and why the run failed
    assert "undo step(s) failed" in summary and "dom0b: `kpartx -d -p p /dev/vg0/web1-disk` not run: dom0b unreachable" in summary
    assert "the run had failed before its teardown: " in summary and "Timeout, server dom0b not responding" in summary
    # The peer's rsync, cut off from its sender, ends by itself (rsync.io_timeout): it would
    # otherwise keep the replica busy (unmountable) for as long as its sshd keeps the TCP session.
    while lab.ssh("dom0b", ["pgrep", "-x", "rsync"], check=False).returncode == 0:
        assert time.monotonic() - cut < 90, "the peer's rsync outlives the cut link"
        time.sleep(1)
    cleanup_once_the_link_is_back(lab)
    rc, text = lab.leftovers()
    assert rc == 0, text
    lab.ssh("dom0a", "sed -i '/^bwlimit/d' /etc/domubackup/domubackup.toml")
    assert domubackup(lab, "run", "web1").returncode == 0
    assert manifest(lab, "dom0a") == manifest(lab, "dom0b")


def test_seed_creates_the_replica_then_run_mirrors(fresh):
    lab = fresh
    lab.ssh("dom0b", ["lvremove", "-q", "-f", "vg0/web1-disk", "vg0/web1-srv"])
    r = domubackup(lab, "-v", "seed", "web1", timeout=1800)
    assert r.returncode == 0, r.stderr
    assert "web1: created /dev/vg0/web1-disk (1258291200 bytes) on dom0b" in r.stdout
    assert r.stdout.count("matches") == 2
    assert lab.ssh("dom0b", ["blkid", "-s", "UUID", "-o", "value", "/dev/vg0/web1-srv"]).stdout == \
        lab.ssh("dom0a", ["blkid", "-s", "UUID", "-o", "value", "/dev/vg0/web1-srv"]).stdout
    again = domubackup(lab, "seed", "web1")
    assert again.returncode == 1
    assert "replica /dev/vg0/web1-disk on dom0b exists and is not empty (it holds dos)" in again.stderr
    assert "pass --force" in again.stderr
    assert domubackup(lab, "run", "web1").returncode == 0
    assert manifest(lab, "dom0a") == manifest(lab, "dom0b")
