"""Issue 7 in the lab: verify finds exactly what differs; check names the fault."""

import pytest

from e2ehelp import domubackup, tree


@pytest.fixture
def fresh(lab):
    lab.reset()
    return lab


def test_verify_clean_then_finds_a_changed_file_then_run_repairs(fresh):
    lab = fresh
    assert domubackup(lab, "run", "web1").returncode == 0
    v = domubackup(lab, "verify", "web1")
    assert v.returncode == 0, v.stderr
    assert v.stdout.startswith("web1: verify OK: the replica matches the snapshot")
    tree(lab, "dom0b", "mount")
    try:
        lab.ssh("dom0b", "echo tampered >> '/mnt/guest/srv/www/sub dir/file with spaces.txt'")
    finally:
        tree(lab, "dom0b", "umount")
    v = domubackup(lab, "verify", "web1")
    assert v.returncode == 1
    diffs = [line for line in v.stdout.splitlines() if "differs:" in line]
    assert len(diffs) == 1 and diffs[0].endswith("srv/www/sub dir/file with spaces.txt"), v.stdout
    h = domubackup(lab, "history", "--json", "web1").stdout
    import json
    runs = json.loads(h)
    assert [(r["kind"], r["status"]) for r in runs[:3]] == [("verify", "ERROR"), ("verify", "OK"), ("backup", "OK")]
    assert domubackup(lab, "run", "web1").returncode == 0
    assert domubackup(lab, "verify", "web1").returncode == 0


def test_check_passes_then_names_each_fault(fresh):
    lab = fresh
    ok = domubackup(lab, "check")
    assert ok.returncode == 0, ok.stdout
    assert "FAIL" not in ok.stdout and "check: " in ok.stdout
    # no VG space for the snapshots
    free = int(lab.ssh("dom0a", ["vgs", "--noheadings", "--nosuffix", "--units", "m", "-o", "vg_free", "vg0"]).stdout.strip().split(".")[0])
    lab.ssh("dom0a", ["lvcreate", "-q", "-y", "-L", f"{free - 100}m", "-n", "filler", "vg0"])
    try:
        r = domubackup(lab, "check")
    finally:
        lab.ssh("dom0a", ["lvremove", "-q", "-f", "vg0/filler"])
    assert r.returncode == 1
    assert "FAIL web1: VG space for snapshots of 256M: volume group vg0 has" in r.stdout
    # missing replica LV
    lab.ssh("dom0b", ["lvremove", "-q", "-f", "vg0/web1-srv"])
    r = domubackup(lab, "check")
    assert r.returncode == 1
    assert "FAIL web1: replica on dom0b" in r.stdout and "/dev/vg0/web1-srv" in r.stdout
    # unknown host key
    lab.ssh("dom0a", ["sed", "-i", "/^dom0b/d", "/etc/domubackup/known_hosts"])
    r = domubackup(lab, "check")
    assert "FAIL ssh to dom0b" in r.stdout and "host key of dom0b is unknown" in r.stdout
