"""Issue 5 in the lab: a cut link mid-transfer, seeding the replica."""

from e2ehelp import domubackup, manifest, release, start_paused


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
        for _ in range(30):  # the link comes back
            if lab.ssh("dom0a", ["ping", "-c1", "-W1", "dom0b"], check=False).returncode == 0:
                break
        r = domubackup(lab, "cleanup", "web1")
        assert r.returncode == 0, r.stderr
    rc, text = lab.leftovers()
    assert rc == 0, text
    assert domubackup(lab, "run", "web1").returncode == 0


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
