"""Issue 7 in the lab: verify finds exactly what differs; check names the fault."""

from e2ehelp import domubackup, tree

# through the restricted peer (conftest: `domubackup serve` as each key's forced command): verify's itemized rsync dry run
LAB_SERVE = True


def test_verify_clean_then_finds_a_changed_file_then_run_repairs_then_fsck_finds_damage(fresh):
    lab = fresh
    assert domubackup(lab, "run", "web1").returncode == 0
    v = domubackup(lab, "verify", "--fsck", "web1")
    assert v.returncode == 0, v.stdout + v.stderr
    assert v.stdout.splitlines() == ["web1: fsck OK: every replica filesystem is clean",
                                     "web1: verify OK: the replica matches the snapshot (39 files compared by checksum)"]
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
    # zero the group descriptors of the replica's /srv behind the tool's back: e2fsck -n must notice
    lab.ssh("dom0b", "dd if=/dev/zero of=/dev/vg0/web1-srv bs=4096 seek=1 count=1 conv=notrunc,fsync status=none")
    v = domubackup(lab, "verify", "--fsck", "web1")
    assert v.returncode == 1
    assert "web1: fsck: dom0b: xvdb (ext4): `e2fsck -n -f /dev/vg0/web1-srv` exited" in v.stdout, v.stdout


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


def test_lifecycle_hook_phases_and_a_refusing_backup_start(fresh):
    lab = fresh
    lab.ssh("dom0a", "cat > /etc/domubackup/job-hook && chmod 755 /etc/domubackup/job-hook && "
                     "sed -i '1i job_hook = \"/etc/domubackup/job-hook\"' /etc/domubackup/domubackup.toml",
            input='#!/bin/sh\necho "$1 domu=$DOMUBACKUP_DOMU peer=$DOMUBACKUP_PEER status=$DOMUBACKUP_STATUS" '
                  '>> /tmp/job-hook.log\n[ -e /tmp/refuse ] && [ "$1" = backup-start ] && exit 1\nexit 0\n')
    try:
        lab.ssh("dom0a", ["rm", "-f", "/tmp/job-hook.log", "/tmp/refuse"])
        assert domubackup(lab, "run", "web1").returncode == 0
        assert lab.ssh("dom0a", ["cat", "/tmp/job-hook.log"]).stdout.splitlines() == [
            "job-start domu= peer= status=", "backup-start domu=web1 peer=dom0b status=",
            "backup-end domu=web1 peer=dom0b status=OK", "job-end domu=web1 peer= status=OK"]
        lab.ssh("dom0a", "rm -f /tmp/job-hook.log; touch /tmp/refuse")
        r = domubackup(lab, "run", "web1")
        assert r.returncode == 1
        assert "web1: the backup-start hook refused the backup" in r.stderr
        assert "backup-abort domu=web1 peer=dom0b status=ERROR" in lab.ssh("dom0a", ["cat", "/tmp/job-hook.log"]).stdout
    finally:
        lab.ssh("dom0a", ["rm", "-f", "/tmp/refuse", "/etc/domubackup/job-hook"])
