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
    lv, rm = pts.prune_steps("dom0b", pts.points_of(lvs), "/var/lib/domubackup/points/web1")
    assert lv.argv == ("lvremove", "-f", f"/dev/vg0/web1-disk.{P1}", f"/dev/vg0/web1-srv.{P1}")
    assert rm.argv == ("rm", "-f", "--", f"/var/lib/domubackup/points/web1/{P1}.xml")
    assert pts.prune_steps("dom0b", [], "/x") == []


class PointsHost:
    """A peer with web1's replica vg0/web1-srv (thick, 1 GiB) and a thick point of it at
    PERCENT full (256 MiB of copy-on-write space; FREE bytes left in vg0): lvs, dmsetup,
    lvextend and lvchange only."""

    def __init__(self, percent, free, state="valid"):
        self.percent, self.free, self.state, self.calls = percent, free, state, []
        self.size = 256 << 20

    def run(self, argv, check=True, timeout=None, **kw):
        from domubackup.core.model import Result
        argv = tuple(argv)
        self.calls.append(argv)
        out = ""
        if argv == pts.lvs_of("web1"):
            out = listing(row("web1-srv", [pts.TAG + "domu:web1"]),
                          member("web1-srv", P1, "xvdb", disks=1, attr="swi-a-s---", size=self.size, pct="85.00"))
        elif argv[0] == "dmsetup":
            used = 524288 * self.percent // 100
            out = (f"vg0-web1--srv.{P1}: 0 2097152 snapshot {used}/524288 16\n" if self.state == "valid"
                   else f"vg0-web1--srv.{P1}: 0 2097152 snapshot Invalid\n")
        elif argv[0] == "lvs":
            name = argv[-1].split("/")[-1]
            size = self.size if "." in name else 1 << 30
            out = f"  vg0|{name}|{size}|swi-a-s---|{'web1-srv' if '.' in name else ''}|85.00|{self.free}|{argv[-1]}\n"
        elif argv[0] not in ("lvextend", "lvchange"):
            raise AssertionError(argv)
        return Result("dom0b", argv, 0, out)


@pytest.mark.parametrize("percent, free, state, extended, tagged, told", [
    (85, 4 << 30, "valid", True, False, False),    # room: extended by snapshot_extend_by
    (85, 1 << 20, "valid", False, False, True),    # no room: told once, the run goes on
    (100, 4 << 30, "invalid", False, True, True),  # overflowed: tagged INVALID, no longer watched
    (50, 4 << 30, "valid", False, False, False),   # below snapshot_extend_at: nothing
])
def test_the_point_watch_extends_thick_points_or_marks_them_invalid(percent, free, state, extended, tagged, told,
                                                                    caplog):
    from domubackup.core.config import parse_config
    from domubackup.jobs.checks import PointWatch
    settings = parse_config('dom0s = ["dom0a", "dom0b"]\n', hostname="dom0b",
                            default_uri="test:///x").settings_for("web1")
    host = PointsHost(percent, free, state)
    watch = PointWatch(host, "web1", settings, "dom0b", interval=0.01)
    watch.start()
    import time
    deadline = time.monotonic() + 5
    while not any(a[0] == "dmsetup" for a in host.calls) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    watch.stop()
    member_path = f"/dev/vg0/web1-srv.{P1}"
    assert watch.problem is None
    assert (("lvextend", "--size", "+256M", member_path) in host.calls) == extended
    assert (("lvchange", "--addtag", pts.INVALID, member_path) in host.calls) == tagged
    assert (watch.invalid == [member_path]) == tagged and (watch.paths == []) == tagged
    warnings = [r.getMessage() for r in caplog.records if f"restore point member {member_path}" in r.getMessage()]
    assert len(warnings) == told  # once, however many looks
    if tagged:
        assert "overflowed: the point is INVALID" in warnings[0]
    elif told:
        assert "has no room to extend it by 256M" in warnings[0]


def test_a_member_tagged_invalid_makes_its_point_invalid():
    m = member("web1-srv", P1, "xvdb", disks=1, attr="swi-a-s---", pct="40.00")
    m["lv_tags"] += "," + pts.INVALID  # the watch saw it overflow; LVM's own mark may be gone
    (p,) = pts.points_of(pts.parse_lvs(listing(m)))
    assert (p.status, p.good) == ("INVALID", False)
