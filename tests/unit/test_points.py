"""Restore points: the peer's listing read back into points, their status, and the steps that
make and prune them (core/points.py)."""

import json

import pytest

from domubackup.core import points as pts
from domubackup.core.errors import UsageError


def row(name, tags, *, vg="vg0", origin="", pool="", attr="-wi-a-----", size=1 << 30, pct=""):
    return {"vg_name": vg, "lv_name": name, "origin": origin, "pool_lv": pool, "lv_attr": attr,
            "lv_size": str(size), "snap_percent": pct, "lv_tags": ",".join(tags)}


def member(lv, point, disk, state=pts.GOOD, disks=2, **kw):
    tags = [pts.POINT, "dbk:domu:web1", f"dbk:time:{point}", f"dbk:disks:{disks}", "dbk:consistency:crash",
            f"dbk:disk:{disk}", state]
    return row(f"{lv}.{point}", tags, origin=lv, **kw)


def listing(*rows):
    return json.dumps({"report": [{"lv": list(rows)}]})


P1, P2, P3 = "20261201T031500Z", "20261202T031500Z", "20261203T031500Z"


def test_points_from_the_listing_newest_first_with_their_status():
    text = listing(row("web1-disk", ["dbk:domu:web1"]), row("web1-srv", ["dbk:domu:web1", pts.WRITING]),
                   member("web1-disk", P1, "xvda", attr="swi-a-s---", pct="12.50"),
                   member("web1-srv", P1, "xvdb", attr="swi-a-s---", pct="3.00"),
                   member("web1-disk", P2, "xvda", pool="pool", attr="Vwi---tz-k"),
                   member("web1-srv", P2, "xvdb", state=pts.PENDING, pool="pool", attr="Vwi---tz-k"),
                   member("web1-disk", P3, "xvda", attr="swi-I-s---", pct="100.00"),
                   member("web1-srv", P3, "xvdb", attr="swi-a-s---", pct="1.00"),
                   member("web1-disk", "20261130T031500Z", "xvda"))
    lvs = pts.parse_lvs(text)
    points = pts.points_of(lvs)
    assert [(p.name, p.status) for p in points] == [(P3, "INVALID"), (P2, "PENDING"), (P1, "GOOD"),
                                                     ("20261130T031500Z", "INCOMPLETE")]
    assert [p.good for p in points] == [False, False, True, False]
    j = points[2].to_json()
    assert j == {"name": P1, "time": "2026-12-01T03:15:00Z", "status": "GOOD", "consistency": "crash",
                 "kind": "thick", "size": 2 << 30, "fill": 12.5,
                 "members": [f"vg0/web1-disk.{P1}", f"vg0/web1-srv.{P1}"]}
    assert points[1].to_json()["kind"] == "thin" and points[1].to_json()["fill"] is None
    assert pts.being_written(lvs) == ["/dev/vg0/web1-srv"]


def test_a_point_name_is_a_utc_time():
    assert pts.stamp_time(P1).isoformat() == "2026-12-01T03:15:00+00:00"
    for bad in ("latest", "../x", "20261301T000000Z"):
        with pytest.raises(UsageError, match="not a restore point name"):
            pts.stamp_time(bad)


def test_point_steps_thin_and_thick():
    lvs = pts.parse_lvs(listing(row("web1-disk", ["dbk:domu:web1"], pool="pool", attr="Vwi-a-tz--"),
                                row("web1-srv", ["dbk:domu:web1"])))
    steps = pts.point_steps("web1", "dom0b", lvs, P1, disks=["xvda", "xvdb"], size="20%ORIGIN", consistency="fs")
    assert steps[0].argv == ("lvchange", "--deltag", pts.WRITING, "/dev/vg0/web1-disk", "/dev/vg0/web1-srv")
    thin, thick = steps[1], steps[2]
    assert thin.argv[:4] == ("lvcreate", "--snapshot", "--name", f"web1-disk.{P1}") and thin.argv[-1] == "/dev/vg0/web1-disk"
    assert thick.argv[:6] == ("lvcreate", "--snapshot", "--extents", "20%ORIGIN", "--name", f"web1-srv.{P1}")
    tags = [thick.argv[i + 1] for i, w in enumerate(thick.argv) if w == "--addtag"]
    assert tags == [pts.POINT, "dbk:domu:web1", f"dbk:time:{P1}", "dbk:disks:2", "dbk:consistency:fs", pts.PENDING,
                    "dbk:disk:xvdb"]
    assert thick.undo == ("lvremove", "-f", f"/dev/vg0/web1-srv.{P1}")  # journaled: a killed run leaves no half point
    commits = steps[3:]
    assert [c.closes for c in commits] == [thin.argv, thick.argv]  # marked good: the point stays
    assert all(c.argv[:5] == ("lvchange", "--deltag", pts.PENDING, "--addtag", pts.GOOD) for c in commits)
    assert all(s.host == "dom0b" for s in steps)


def test_prune_steps_remove_every_member_and_the_xml():
    lvs = pts.parse_lvs(listing(member("web1-disk", P1, "xvda"), member("web1-srv", P1, "xvdb")))
    mark, rm, lv = pts.prune_steps("dom0b", pts.points_of(lvs), "/var/lib/domubackup/points/web1")
    members = (f"/dev/vg0/web1-disk.{P1}", f"/dev/vg0/web1-srv.{P1}")
    # marked first, journaled with the removal as its undo: a killed prune is finished by cleanup
    assert mark.argv == ("lvchange", "--addtag", pts.PRUNING, *members) and mark.undo == ("lvremove", "-f", *members)
    assert rm.argv == ("rm", "-f", "--", f"/var/lib/domubackup/points/web1/{P1}.xml")
    assert lv.argv == ("lvremove", "-f", *members) and lv.closes == mark.argv and lv.undo is None
    # a point part-way through is PRUNING: never good
    half = pts.points_of(pts.parse_lvs(listing(member("web1-disk", P1, "xvda"),
                                               member("web1-srv", P1, "xvdb", state=pts.PRUNING))))
    assert [(p.status, p.good) for p in half] == [("PRUNING", False)]
    assert pts.prune_steps("dom0b", [], "/x") == []


def test_write_bound_is_what_the_sources_hold_plus_the_replicas_metadata():
    from domubackup.core.model import Space
    gib = 1 << 30
    src = [Space(size=2 * gib, used=300 << 20, free=0), Space(size=gib, used=100 << 20, free=0)]
    rep = [Space(size=int(1.5 * gib), used=0, free=0), Space(size=gib, used=0, free=0)]
    # 400 MiB of files, and the 3 GiB LV holds 0.5 GiB beyond the replicas' filesystems
    assert pts.write_bound(3 * gib, src, rep) == (400 << 20) + gib // 2
    assert pts.write_bound(300 << 20, src, rep) == 300 << 20  # never more than the LV
    assert pts.write_bound(3 * gib, [src[0], None], rep) == 3 * gib  # a figure unknown: the whole LV
    assert pts.write_bound(3 * gib, [], []) == 0  # nothing mounted on it: nothing written


def test_size_points_gives_thick_points_room_newest_first_while_the_vg_has_it():
    mib = 1 << 20
    free = {"vg_free": str(100 * mib)}
    lvs = pts.parse_lvs(listing(
        dict(row("web1-disk", ["dbk:domu:web1"]), **free), dict(row("web1-srv", ["dbk:domu:web1"]), **free),
        dict(member("web1-disk", P1, "xvda", attr="swi-a-s---", size=64 * mib, pct="50.00"), **free),
        dict(member("web1-disk", P2, "xvda", attr="swi-a-s---", size=64 * mib, pct="25.00"), **free),
        dict(member("web1-disk", P3, "xvda", attr="swi-I-s---", size=64 * mib, pct="100.00"), **free),
        dict(member("web1-srv", P2, "xvdb", pool="pool", attr="Vwi---tz-k"), **free)))
    bounds = {"/dev/vg0/web1-disk": 60 * mib, "/dev/vg0/web1-srv": 1 << 30}
    steps, warnings = pts.size_points("dom0b", lvs, bounds)
    # P2 (newest not INVALID): 16 MiB used + 60 MiB, +0.5 % +4 MiB, less its 64 MiB: 16.38 -> 20 MiB;
    # P1 then needs 32 + 60 -> 36 MiB, the VG has 80 left: both; P3 is invalid; thin members never grow
    assert [s.argv for s in steps] == [("lvextend", "--size", f"+{20 * 1024}k", f"/dev/vg0/web1-disk.{P2}"),
                                       ("lvextend", "--size", f"+{36 * 1024}k", f"/dev/vg0/web1-disk.{P1}")]
    assert warnings == [] and all(s.host == "dom0b" and s.undo is None for s in steps)
    # a rollback to P2 leaves P2 as it is (it writes back what P2 holds)
    steps, _ = pts.size_points("dom0b", lvs, bounds, skip=P2)
    assert [s.argv[-1] for s in steps] == [f"/dev/vg0/web1-disk.{P1}"]
    # a VG with less room: the newest gets it, the older one is warned of, nothing is extended past it
    steps, warnings = pts.size_points("dom0b", lvs, {"/dev/vg0/web1-disk": 90 * mib})
    assert [s.argv for s in steps] == [("lvextend", "--size", f"+{48 * 1024}k", f"/dev/vg0/web1-disk.{P2}")]
    assert warnings == [f"restore point {P1} on dom0b (vg0/web1-disk.{P1}) may overflow during this run: it needs "
                        "64 MiB more, vg0 has 52 MiB free (if it overflows it becomes INVALID)"]
    # the origin's size caps the room: a point already as large as its origin (and margin) stays
    big = pts.parse_lvs(listing(dict(row("web1-disk", ["dbk:domu:web1"], size=64 * mib), **free),
                                dict(member("web1-disk", P1, "xvda", attr="swi-a-s---", size=70 * mib, pct="1.00"),
                                     **free)))
    assert pts.size_points("dom0b", big, {"/dev/vg0/web1-disk": 1 << 30}) == ([], [])
    assert pts.size_points("dom0b", lvs, {}) == ([], [])
