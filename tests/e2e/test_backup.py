"""The main job in the lab: `domubackup run web1` on dom0a mirrors web1 into dom0b's replica."""

from e2ehelp import domubackup, manifest, tree

# through the restricted peer (conftest: `domubackup serve` as each key's forced command): the main job's scenarios
LAB_SERVE = True


def test_run_mirrors_guest_tree_exactly(fresh):
    lab = fresh
    tree(lab, "dom0a", "mount")
    try:
        tree(lab, "dom0a", "change")
    finally:
        tree(lab, "dom0a", "umount")
    r = domubackup(lab, "-v", "run", "web1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("web1: OK in "), r.stdout
    # a mirror (no [retention]): the replicas are tagged as web1's, and no longer as being written
    tags = lab.ssh("dom0b", ["lvs", "--noheadings", "-o", "lv_tags", "vg0/web1-disk", "vg0/web1-srv"]).stdout.split()
    assert tags == ["dbk:domu:web1", "dbk:domu:web1"], tags
    a, b = manifest(lab, "dom0a"), manifest(lab, "dom0b")
    assert "var/lib/lab/state" not in b  # deleted in the guest, deleted on the replica
    assert b["srv/new dir/hardlink.txt"]["hardlink"] == "srv/new dir/added.txt"
    assert b["srv/new dir/link-to-index"]["target"] == "../www/index.html"
    assert b["srv/xattr.txt"]["xattrs"] == {"user.domubackup": b"kept".hex()}
    assert (b["var/owned-by-4242"]["uid"], b["var/owned-by-4242"]["gid"]) == (4242, 4343)
    assert b["srv/sparse.img"]["size"] == 64 * 1024 * 1024 and b["srv/sparse.img"]["sparse"] is True
    assert a == b


def test_second_run_sends_little_and_quiet_without_v(fresh):
    lab = fresh
    # A person at a terminal (script(1) gives the run a pty) sees a bar per transfer.
    tree(lab, "dom0a", "mount")
    try:
        tree(lab, "dom0a", "change")
    finally:
        tree(lab, "dom0a", "umount")
    r = lab.ssh("dom0a", ["script", "-qec", "domubackup run web1", "/dev/null"], check=False, timeout=900)
    assert r.returncode == 0, r.stdout
    last = r.stdout.replace("\r", "\n").strip().splitlines()[-1]  # the bar as it was left
    assert last.startswith("web1 -> dom0b: 100%") and "(unplaced)" not in r.stdout, r.stdout
    r = domubackup(lab, "run", "web1")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")  # quiet, no bars: cron mails only failures


def test_refused_when_domu_runs_on_peer(fresh):
    lab = fresh
    lab.ssh("dom0b", ["sed", "-i", "s|<test:runstate>5</test:runstate>|<test:runstate>1</test:runstate>|",
                      "/etc/domubackup/lab-node.xml"])
    r = domubackup(lab, "run", "web1")
    assert r.returncode == 1
    assert "web1 is running on dom0b: refusing to overwrite the disks of a live DomU" in r.stderr
    assert "web1: ERROR" in r.stdout


def test_refused_when_replica_layout_differs(fresh):
    lab = fresh
    lab.ssh("dom0b", ["wipefs", "-a", "-q", "/dev/vg0/web1-srv"])
    r = domubackup(lab, "run", "web1")
    assert r.returncode == 1
    assert "the replica on dom0b does not match: xvdb: ext4 here, no filesystem on the replica" in r.stderr
    assert "domubackup seed web1" in r.stderr


def test_unknown_peer_host_key_refused(fresh):
    lab = fresh
    lab.ssh("dom0a", ["sed", "-i", "/^dom0b/d;/^10\\./d", "/etc/domubackup/known_hosts"])
    r = domubackup(lab, "run", "web1")
    assert r.returncode == 1
    assert "the host key of dom0b is unknown" in r.stderr


def test_two_concurrent_runs_one_exits_75(fresh):
    lab = fresh
    script = ("domubackup run web1 > /tmp/first.out 2>&1 & first=$!; sleep 0.5; "
              "domubackup run web1; echo second=$?; wait $first; echo first=$?")
    r = lab.ssh("dom0a", script, check=False, timeout=900)
    assert "second=75" in r.stdout, r.stdout + r.stderr
    assert "web1 is already being backed up by PID" in r.stderr
    assert "first=0" in r.stdout


def test_kill_9_then_cleanup_clears_both_hosts(fresh):
    lab = fresh
    # SIGKILL the run (only its own process, as an admin would) while rsync is copying 8 MiB at
    # 256 KiB/s, then clean up at once. rsync runs in its own session: it must end with the run
    # (else it holds both hosts' mounts busy and every umount of the cleanup fails).
    tree(lab, "dom0a", "mount")
    try:
        lab.ssh("dom0a", "head -c 8M /dev/urandom > /mnt/guest/srv/big.bin && sync")
    finally:
        tree(lab, "dom0a", "umount")
    lab.ssh("dom0a", "printf '\\n[rsync]\\nbwlimit = \"256K\"\\n' >> /etc/domubackup/domubackup.toml")
    script = ("domubackup run web1 & pid=$!; "
              "for i in $(seq 1 600); do pgrep -x rsync >/dev/null && break; sleep 0.1; done; "
              "sleep 2; kill -9 $pid; wait $pid; echo killed=$?; domubackup cleanup web1; echo cleanup=$?")
    r = lab.ssh("dom0a", script, check=False, timeout=900)
    assert "killed=137" in r.stdout and "cleanup=0" in r.stdout, r.stdout + r.stderr
    assert "web1: undid 12 step(s)" in r.stdout
    for vm in ("dom0a", "dom0b"):
        assert lab.ssh(vm, ["pgrep", "-a", "rsync"], check=False).stdout == "", vm
    rc, text = lab.leftovers()
    assert rc == 0, text
    lab.ssh("dom0a", "sed -i '/^bwlimit/d' /etc/domubackup/domubackup.toml")
    assert domubackup(lab, "run", "web1").returncode == 0
    assert manifest(lab, "dom0a") == manifest(lab, "dom0b")
