"""Issue 16 in the lab: restore points on the peer (a thin replica and a thick one), retention,
the peer's own listing and prune, a run killed while it makes a point, a thick point that
overflows."""

import json
import os

from e2ehelp import STATE, XXH, domubackup, kill9, start_paused

SRV_FILE = "points-test.txt"


def guest_srv(lab, command):
    """Change web1's /srv on dom0a's origin LV (whole-disk ext4), as the guest would."""
    lab.ssh("dom0a", f"mkdir -p /mnt/psrv && mount /dev/vg0/web1-srv /mnt/psrv && cd /mnt/psrv && {command}; "
                     "cd / && umount /mnt/psrv")


def points(lab, vm="dom0a"):
    r = domubackup(lab, "points", "--json", "web1", vm=vm)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def tags(lab, lv):
    return lab.ssh("dom0b", ["lvs", "--noheadings", "-o", "lv_tags", f"vg0/{lv}"]).stdout.strip().split(",")


def srv_file_in_point(lab, point):
    """The test file in the thin point of /srv (activated by hand, read-only), or None."""
    member = f"vg0/web1-srv.{point}"
    lab.ssh("dom0b", ["lvchange", "-q", "-ay", "-K", member])
    try:
        r = lab.ssh("dom0b", f"mkdir -p /mnt/ppt && mount -o ro,noload /dev/{member} /mnt/ppt && "
                             f"(cat /mnt/ppt/{SRV_FILE} 2>/dev/null || echo MISSING); umount /mnt/ppt")
    finally:
        lab.ssh("dom0b", ["lvchange", "-q", "-an", member])
    return None if r.stdout.strip() == "MISSING" else r.stdout


def thin_point(lv):
    return lv.startswith("web1-srv.")


def digest(lab, vm, lv):
    """The xxh64 of a whole LV on VM (fast under emulation, unlike sha256sum); a thin point
    activated for it, and deactivated."""
    thin = thin_point(lv) and vm == "dom0b"
    if thin:
        lab.ssh(vm, ["lvchange", "-q", "-ay", "-K", f"vg0/{lv}"])
    try:
        return lab.ssh(vm, ["python3", "-c", XXH, f"/dev/vg0/{lv}"]).stdout.strip()
    finally:
        if thin:
            lab.ssh(vm, ["lvchange", "-q", "-an", f"vg0/{lv}"])


def same(lab, a, b):
    """Whether LVs A and B of dom0b hold the same bytes (cmp; B a point, activated for it)."""
    if thin_point(b):
        lab.ssh("dom0b", ["lvchange", "-q", "-ay", "-K", f"vg0/{b}"])
    try:
        return lab.ssh("dom0b", ["cmp", f"/dev/vg0/{a}", f"/dev/vg0/{b}"], check=False).returncode == 0
    finally:
        if thin_point(b):
            lab.ssh("dom0b", ["lvchange", "-q", "-an", f"vg0/{b}"])


def mounted(lab, where):
    """{mount point: options} of what is mounted at or under WHERE on dom0b."""
    out = lab.ssh("dom0b", ["findmnt", "-rn", "-R", "-o", "TARGET,OPTIONS", where], check=False).stdout
    return dict(line.split() for line in out.splitlines())


def ways_back(lab, made):
    """mount (a point, the replica), rollback on dom0b; restore on dom0a. Points 2 and 3 exist;
    the test file is in point 2 only."""
    p2 = made[1]
    lab.ssh("dom0b", "mkdir -p /mnt/p2")
    r = domubackup(lab, "mount", "web1", "--point", p2, "/mnt/p2", vm="dom0b")
    assert r.returncode == 0 and "mounted read-only at /mnt/p2" in r.stdout, r.stdout + r.stderr
    assert lab.ssh("dom0b", ["cat", f"/mnt/p2/srv/{SRV_FILE}"]).stdout == "two\n"
    found = mounted(lab, "/mnt/p2")
    assert set(found) == {"/mnt/p2", "/mnt/p2/srv", "/mnt/p2/var"}, found
    assert all(o.split(",")[0] == "ro" and "nosymfollow" in o and "nodev" in o for o in found.values()), found
    assert lab.ssh("dom0b", ["touch", "/mnt/p2/srv/new"], check=False).returncode != 0
    r = domubackup(lab, "mount", "web1", "/mnt/p2", vm="dom0b")
    assert r.returncode == 1 and "mounted already" in r.stderr, r.stdout + r.stderr
    r = domubackup(lab, "umount", "web1", vm="dom0b")
    assert r.returncode == 0 and "unmounted" in r.stdout, r.stdout + r.stderr
    assert mounted(lab, "/mnt/p2") == {}
    active = lab.ssh("dom0b", ["lvs", "--noheadings", "-o", "lv_active", f"vg0/web1-srv.{p2}"]).stdout.strip()
    assert active == "", active
    # the replica itself (run 3: the file is gone); rollback is refused while it is mounted
    r = domubackup(lab, "mount", "web1", "/mnt/p2", vm="dom0b")
    assert r.returncode == 0, r.stdout + r.stderr
    assert lab.ssh("dom0b", ["test", "-e", f"/mnt/p2/srv/{SRV_FILE}"], check=False).returncode == 1
    r = domubackup(lab, "rollback", "web1", "--point", p2, vm="dom0b")
    assert r.returncode == 1 and "is open on dom0b" in r.stderr, r.stdout + r.stderr
    assert domubackup(lab, "umount", "web1", vm="dom0b").returncode == 0

    # kill -9 before the rollback's first write: cleanup deactivates the point; the replica
    # stays marked as being written (it may be half-written) until a rollback or a run ends OK
    pid = start_paused(lab, "copy", args=f"rollback web1 --point {p2}", vm="dom0b")
    kill9(lab, pid, vm="dom0b")
    r = domubackup(lab, "cleanup", "web1", vm="dom0b")
    assert r.returncode == 0 and "lvchange --activate n" in r.stdout, r.stdout + r.stderr
    assert lab.ssh("dom0b", ["lvs", "--noheadings", "-o", "lv_active", f"vg0/web1-srv.{p2}"]).stdout.strip() == ""
    assert "dbk:writing" in tags(lab, "web1-disk") and "dbk:writing" in tags(lab, "web1-srv")
    text = domubackup(lab, "points", "web1", vm="dom0b").stdout
    assert "the replica /dev/vg0/web1-disk is being written" in text and p2 in text, text
    # rollback to point 2: the replica equals it block for block, and is not marked as written
    r = domubackup(lab, "rollback", "web1", "--point", p2, vm="dom0b")
    assert r.returncode == 0 and f"is now restore point {p2}" in r.stdout, r.stdout + r.stderr
    assert r.stdout.count("written and read back") == 2, r.stdout
    for lv in ("web1-disk", "web1-srv"):
        assert same(lab, lv, f"{lv}.{p2}"), lv
        assert "dbk:writing" not in tags(lab, lv)

    if os.environ.get("DOMUBACKUP_E2E_RESTORE") == "1":  # ~5 min under TCG: kept out of CI's 90 min for now
        restore(lab, p2)
    hostile_point(lab, made[2])


def restore(lab, p2):
    """On dom0a: refused while web1 runs there; shut off, point 2 comes back into its LVs."""
    r = domubackup(lab, "restore", "web1", "--point", p2)
    assert r.returncode == 1 and "web1 is running on dom0a: refusing" in r.stderr, r.stdout + r.stderr
    node = "/etc/domubackup/lab-node.xml"
    lab.ssh("dom0a", f"cp {node} /tmp/node.keep && sed -i 's|<test:runstate>1<|<test:runstate>5<|' {node}")
    try:
        guest_srv(lab, "echo after > later.txt")  # the origin moved on since point 2
        # kill -9 before the first block comes back: cleanup deactivates the point on dom0b, the
        # origins stay marked as being restored (half-written) until a restore ends OK
        pid = start_paused(lab, "copy", args=f"restore web1 --point {p2}")
        kill9(lab, pid)
        r = domubackup(lab, "cleanup", "web1")
        assert r.returncode == 0 and "dom0b: lvchange --activate n" in r.stdout, r.stdout + r.stderr
        assert "dbk:restoring" in lab.ssh("dom0a", ["lvs", "-o", "lv_tags", "vg0/web1-disk"]).stdout
        assert lab.ssh("dom0b", ["lvs", "--noheadings", "-o", "lv_active", f"vg0/web1-srv.{p2}"]).stdout.strip() == ""
        r = domubackup(lab, "restore", "web1", "--point", p2)
        assert r.returncode == 0 and f"now hold restore point {p2} of dom0b" in r.stdout, r.stdout + r.stderr
    finally:
        lab.ssh("dom0a", f"mv /tmp/node.keep {node}")
    for lv in ("web1-disk", "web1-srv"):
        assert digest(lab, "dom0a", lv) == digest(lab, "dom0b", f"{lv}.{p2}"), lv
    assert "dbk:restoring" not in lab.ssh("dom0a", ["lvs", "-o", "lv_tags", "vg0"]).stdout


def hostile_point(lab, p3):
    """/srv in point 3's root became a symlink to the Dom0's /etc: the mount is refused,
    nothing of it stays, /etc is untouched."""
    dm = f"/dev/mapper/vg0-web1--disk.{p3}p1"
    lab.ssh("dom0b", f"kpartx -a -s -p p /dev/vg0/web1-disk.{p3} && mkdir -p /mnt/h && mount {dm} /mnt/h && "
                     "rmdir /mnt/h/srv && ln -s /etc /mnt/h/srv; umount /mnt/h; "
                     f"kpartx -d -p p /dev/vg0/web1-disk.{p3}")
    etc = lab.ssh("dom0b", "ls -la --time-style=full-iso /etc | sha256sum").stdout
    r = domubackup(lab, "mount", "web1", "--point", p3, "/mnt/p2", vm="dom0b")
    assert r.returncode == 1 and "'/mnt/p2/srv' is a symbolic link (to '/etc'): not followed" in r.stderr, r.stdout + r.stderr
    assert mounted(lab, "/mnt/p2") == {}
    assert lab.ssh("dom0b", "ls -la --time-style=full-iso /etc | sha256sum").stdout == etc
    assert lab.ssh("dom0b", ["test", "-e", f"{STATE}/mounts/web1.json"], check=False).returncode == 1


def failover(lab, newest):
    """On dom0b: refused while dom0a runs web1; with dom0a unreachable, web1 is defined from the
    XML kept with the newest good point and started through libvirt (the test driver)."""
    r = domubackup(lab, "failover", "web1", vm="dom0b")
    assert r.returncode == 1 and "web1 is running on dom0a" in r.stderr, r.stdout + r.stderr
    conf = "/etc/domubackup/domubackup.toml"
    lab.ssh("dom0b", f"cp {conf} /tmp/conf.keep && printf '\\n[dom0.dom0a]\\naddress = \"127.0.0.1\"\\nport = 9\\n' >> {conf}")
    try:
        r = domubackup(lab, "failover", "web1", vm="dom0b")
    finally:
        lab.ssh("dom0b", f"mv /tmp/conf.keep {conf}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "dom0a: does not answer" in r.stdout and "taken as down" in r.stdout, r.stdout
    assert f"defined from {STATE}/points/web1/{newest}.xml and started (libvirt: running)" in r.stdout, r.stdout


def test_points_retention_peer_listing_prune_kill_and_overflow(fresh):
    lab = fresh
    # dom0b: web1-srv's replica becomes a thin LV (same content), web1-disk stays thick
    # (tagged with its DomU as an administrator tags a replica made by hand: see "Restricted peer")
    # (direct I/O and sparse: 1.5 GiB through the page cache of a 1 GiB VM once stalled its kernel)
    lab.ssh("dom0b", "lvcreate -q -y --type thin-pool -L 1700M -n pool vg0 && lvrename -q vg0/web1-srv web1-srv-thick "
                     "&& lvcreate -q -y -V 1536M --thin -n web1-srv --addtag dbk:domu:web1 vg0/pool "
                     "&& dd if=/dev/vg0/web1-srv-thick of=/dev/vg0/web1-srv bs=4M iflag=direct oflag=direct conv=sparse,fsync status=none "
                     "&& lvremove -q -f vg0/web1-srv-thick")
    lab.ssh("dom0a", "sed -i '1i point_size = \"24M\"' /etc/domubackup/domubackup.toml && "
                     "printf '\\n[retention]\\nkeep_last = 2\\n' >> /etc/domubackup/domubackup.toml")
    try:
        plan = domubackup(lab, "plan", "web1").stdout
        assert "lvchange --addtag dbk:writing --addtag dbk:domu:web1 /dev/vg0/web1-disk /dev/vg0/web1-srv" in plan
        assert "[points] lvs" in plan and "decides: points" in plan, plan

        made = []
        for change in ("true", f"echo two > {SRV_FILE}", f"rm {SRV_FILE}"):
            guest_srv(lab, change)
            if len(made) == 1:  # 30 MiB more on the root (thick replica web1-disk): point 1 has 24M
                lab.ssh("dom0a", "kpartx -a -s -p p /dev/vg0/web1-disk && mkdir -p /mnt/g && "
                                 "mount /dev/mapper/vg0-web1--diskp1 /mnt/g && "
                                 "head -c 30M /dev/urandom > /mnt/g/root/points-big; "
                                 "umount /mnt/g; kpartx -d -p p /dev/vg0/web1-disk")
            r = domubackup(lab, "run", "web1")
            assert r.returncode == 0, r.stdout + r.stderr
            made.append(points(lab)[0]["name"])
            assert "dbk:writing" not in tags(lab, "web1-disk") + tags(lab, "web1-srv")
            if len(made) == 2:  # the run gave point 1 room first: it holds the 30 MiB and stays good
                size = lab.ssh("dom0b", ["lvs", "--noheadings", "--units", "m", "--nosuffix", "-o",
                                         "lv_size,snap_percent", f"vg0/web1-disk.{made[0]}"]).stdout.split()
                assert float(size[0]) > 54 and float(size[1]) < 100, size
                assert points(lab)[1]["status"] == "GOOD" and "may overflow" not in r.stderr, r.stderr
        listed = points(lab)
        # keep_last = 2: the first point is pruned, with its domain XML
        assert [(p["name"], p["host"], p["status"]) for p in listed] == [(made[2], "dom0b", "GOOD"),
                                                                         (made[1], "dom0b", "GOOD")]
        assert {p["kind"] for p in listed} == {"mixed"}
        assert listed[0]["consistency"] == "crash" and listed[0]["time"].endswith("Z")
        xml = lab.ssh("dom0b", ["ls", f"{STATE}/points/web1"]).stdout.split()
        assert xml == [f"{made[1]}.xml", f"{made[2]}.xml"]
        assert "<name>web1</name>" in lab.ssh("dom0b", ["cat", f"{STATE}/points/web1/{made[2]}.xml"]).stdout
        # the file deleted before run 3 is still in point 2, byte-equal, and not in point 3
        assert srv_file_in_point(lab, made[1]) == "two\n"
        assert srv_file_in_point(lab, made[2]) is None
        ways_back(lab, made)

        # the peer alone knows its points (the source may be gone): dom0b lists them itself
        assert [(p["name"], p["host"]) for p in points(lab, vm="dom0b")] == [(made[2], "dom0b"), (made[1], "dom0b")]
        r = domubackup(lab, "prune", "web1", vm="dom0b")
        assert r.returncode == 78 and "no [retention] for web1" in r.stderr, r.stdout + r.stderr
        lab.ssh("dom0b", "printf '\\n[retention]\\nkeep_last = 1\\n' >> /etc/domubackup/domubackup.toml")
        r = domubackup(lab, "prune", "--dry-run", "web1", vm="dom0b")
        assert r.returncode == 0 and f"would remove {made[1]}" in r.stdout, r.stdout + r.stderr
        assert len(points(lab)) == 2
        # kill -9 once its members are marked: the point is PRUNING (never good), cleanup finishes it
        pid = start_paused(lab, "prune", args="prune web1", vm="dom0b")
        assert [(p["name"], p["status"]) for p in points(lab)] == [(made[2], "GOOD"), (made[1], "PRUNING")]
        kill9(lab, pid, vm="dom0b")
        r = domubackup(lab, "cleanup", "web1", vm="dom0b")
        assert r.returncode == 0 and "lvremove -f" in r.stdout, r.stdout + r.stderr
        assert [p["name"] for p in points(lab)] == [made[2]]
        r = domubackup(lab, "prune", "web1", vm="dom0b")
        assert r.returncode == 0 and f"keeps {made[2]}" in r.stdout, r.stdout + r.stderr
        assert lab.ssh("dom0b", ["ls", f"{STATE}/points/web1"]).stdout.split() == [f"{made[2]}.xml"]

        # kill -9 while the point is made (its members exist, not yet good), then cleanup
        pid = start_paused(lab, "point-commit")
        pending = points(lab)
        assert [p["status"] for p in pending] == ["PENDING", "GOOD"], pending
        kill9(lab, pid)
        assert domubackup(lab, "cleanup", "web1").returncode == 0
        assert [(p["name"], p["status"]) for p in points(lab)] == [(made[2], "GOOD")]
        assert "dbk:state:pending" not in lab.ssh("dom0b", ["lvs", "-o", "lv_tags", "@dbk:point"]).stdout

        failover(lab, made[2])
        # a thick point that overflows: written past its size (24 MiB, and the room the rollback
        # gave it) behind the tool's back
        size = float(lab.ssh("dom0b", ["lvs", "--noheadings", "--units", "m", "--nosuffix", "-o", "lv_size",
                                       f"vg0/web1-disk.{made[2]}"]).stdout)
        lab.ssh("dom0b", f"dd if=/dev/urandom of=/dev/vg0/web1-disk bs=1M seek=8 count={int(size) + 16} "
                         "conv=fsync status=none")
        listed = points(lab)
        assert listed[0]["name"] == made[2] and listed[0]["status"] == "INVALID", listed
        text = domubackup(lab, "points", "web1").stdout
        assert made[2] in text and "INVALID" in text
    finally:
        lab.ssh("dom0b", "lvremove -q -f @dbk:point; lvremove -q -f vg0/web1-srv vg0/pool", check=False)
        lab.reset()
