"""Issue 16 in the lab: restore points on the peer (a thin replica and a thick one), retention,
the peer's own listing and prune, a run killed while it makes a point, a thick point that
overflows."""

import json

from e2ehelp import STATE, domubackup, kill9, start_paused

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


def test_points_retention_peer_listing_prune_kill_and_overflow(fresh):
    lab = fresh
    # dom0b: web1-srv's replica becomes a thin LV (same content), web1-disk stays thick
    lab.ssh("dom0b", "lvcreate -q -y --type thin-pool -L 1700M -n pool vg0 && lvrename -q vg0/web1-srv web1-srv-thick "
                     "&& lvcreate -q -y -V 1536M --thin -n web1-srv vg0/pool "
                     "&& dd if=/dev/vg0/web1-srv-thick of=/dev/vg0/web1-srv bs=4M conv=fsync status=none "
                     "&& lvremove -q -f vg0/web1-srv-thick")
    lab.ssh("dom0a", "sed -i '1i point_size = \"160M\"' /etc/domubackup/domubackup.toml && "
                     "printf '\\n[retention]\\nkeep_last = 2\\n' >> /etc/domubackup/domubackup.toml")
    try:
        plan = domubackup(lab, "plan", "web1").stdout
        assert "lvchange --addtag dbk:writing --addtag dbk:domu:web1 /dev/vg0/web1-disk /dev/vg0/web1-srv" in plan
        assert "[points] lvs" in plan and "decides: points" in plan, plan

        made = []
        for change in ("true", f"echo two > {SRV_FILE}", f"rm {SRV_FILE}"):
            guest_srv(lab, change)
            r = domubackup(lab, "run", "web1")
            assert r.returncode == 0, r.stdout + r.stderr
            made.append(points(lab)[0]["name"])
            assert "dbk:writing" not in tags(lab, "web1-disk") + tags(lab, "web1-srv")
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

        # the peer alone knows its points (the source may be gone): dom0b lists them itself
        assert [(p["name"], p["host"]) for p in points(lab, vm="dom0b")] == [(made[2], "dom0b"), (made[1], "dom0b")]
        r = domubackup(lab, "prune", "web1", vm="dom0b")
        assert r.returncode == 78 and "no [retention] for web1" in r.stderr, r.stdout + r.stderr
        lab.ssh("dom0b", "printf '\\n[retention]\\nkeep_last = 1\\n' >> /etc/domubackup/domubackup.toml")
        r = domubackup(lab, "prune", "--dry-run", "web1", vm="dom0b")
        assert r.returncode == 0 and f"would remove {made[1]}" in r.stdout, r.stdout + r.stderr
        assert len(points(lab)) == 2
        r = domubackup(lab, "prune", "web1", vm="dom0b")
        assert r.returncode == 0 and f"removed {made[1]}" in r.stdout, r.stdout + r.stderr
        assert [p["name"] for p in points(lab)] == [made[2]]

        # kill -9 while the point is made (its members exist, not yet good), then cleanup
        pid = start_paused(lab, "point-commit")
        pending = points(lab)
        assert [p["status"] for p in pending] == ["PENDING", "GOOD"], pending
        kill9(lab, pid)
        assert domubackup(lab, "cleanup", "web1").returncode == 0
        assert [(p["name"], p["status"]) for p in points(lab)] == [(made[2], "GOOD")]
        assert "dbk:state:pending" not in lab.ssh("dom0b", ["lvs", "-o", "lv_tags", "@dbk:point"]).stdout

        # a thick point that overflows: written past its 160 MiB behind the tool's back
        lab.ssh("dom0b", "dd if=/dev/urandom of=/dev/vg0/web1-disk bs=1M seek=600 count=200 conv=fsync status=none")
        listed = points(lab)
        assert listed[0]["name"] == made[2] and listed[0]["status"] == "INVALID", listed
        text = domubackup(lab, "points", "web1").stdout
        assert made[2] in text and "INVALID" in text
    finally:
        lab.ssh("dom0b", "lvremove -q -f @dbk:point; lvremove -q -f vg0/web1-srv vg0/pool", check=False)
        lab.reset()
