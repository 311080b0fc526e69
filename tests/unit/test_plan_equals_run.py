"""What `plan` prints is what `run` does: for several layouts, the commands that open and close
something (and the reads and transfers between them), run on each host by a backup against
scripted hosts, equal the plan's steps and teardown for that host, in order, once the plan
is given what the run decided (the mounts it read from the guest's fstab)."""

import json
from dataclasses import replace

import pytest

from domubackup.jobs import frame, backup as backup_job
from domubackup.core import plan as planner
from domubackup.core import points as pts
from domubackup.core.config import parse_config
from domubackup.core.model import LOCAL
from domubackup.hosts.safepath import EXIT_MISSING

import test_pipeline
from test_pipeline import FSTAB, Host, _inspect, items, setup

PROBES = {"virsh", "lvs", "blkid", "parted", "dmsetup", "findmnt", "partx"}  # read-only facts


def effects(log, host):
    """What the run did on HOST, probes left out; `lvremove -f A B` counts as A's then B's."""
    out = []
    for h, argv in log:
        if h != host or argv[0] in PROBES or argv[:2] == ("kpartx", "-l"):
            continue
        out += [argv[:2] + (lv,) for lv in argv[2:]] if argv[0] == "lvremove" else [argv]
    return out


def planned(plan, host):
    """The plan's commands on HOST (its label in the plan: LOCAL or the peer's name), then its
    teardown there as `plan` prints it; a safepath helper step as the command it stands for
    (test_pipeline.items). Check steps and decisions that read a probe (the points' `lvs`) run
    read-only probes only (left out of `effects`)."""
    opens = [a for s in plan.steps if s.host == host and not s.check and s.argv[0] not in PROBES
             for a in items(s.argv)]
    undos = [a for h, undo in planner.teardown_order(plan.steps) if h == host for a in items(undo)]
    return opens + undos


def decided_plan(config, local, peers, fstab, **kw):
    """`plan` as the run decided it: given the fstab the run read (or MISSING, or False when
    there is nothing to decide)."""
    insp = _inspect(config, "web1", local)
    return planner.plan_backup("web1", insp.facts, config.settings_for("web1"), peers, skipped=insp.skipped,
                               fstab=fstab, **kw)


CAT = ("cat", "--", "/mnt/domubackup/source/web1/etc/fstab")


@pytest.mark.parametrize("layout", ["fstab", "fstab-unplaced", "no-fstab", "config-mounts", "freeze", "two-peers",
                                    "verify", "points"])
def test_each_host_runs_exactly_the_plan(tmp_path, fixtures, monkeypatch, layout):
    config, local, peer, log = setup(tmp_path, fixtures)
    peers = ("dom0b",)
    text = FSTAB
    if layout == "fstab-unplaced":
        text = FSTAB.replace("LABEL=whole /srv", "#")
    if layout == "config-mounts":
        config = parse_config(f'dom0s = ["dom0a", "dom0b"]\nstate_dir = "{tmp_path}"\nsnapshot_size = "256M"\n'
                              '[domu.web1]\nmounts = { xvda1 = "/", xvda5 = "/var", xvdb = "/srv" }\n',
                              hostname="dom0a", default_uri="test:///x")
    if layout == "freeze":
        hooks = tmp_path / "freeze.d"
        hooks.mkdir()
        config = parse_config(f'dom0s = ["dom0a", "dom0b"]\nstate_dir = "{tmp_path}"\nsnapshot_size = "256M"\n'
                              f'consistency = "hooks"\nfreeze_hook_dir = "{hooks}"\n',
                              hostname="dom0a", default_uri="test:///x")
    if layout == "two-peers":
        config = parse_config(f'dom0s = ["dom0a", "dom0b", "dom0c"]\nstate_dir = "{tmp_path}"\n'
                              'snapshot_size = "256M"\n', hostname="dom0a", default_uri="test:///x")
        third = Host("dom0c", peer.probes, log=log)
        peers = ("dom0b", "dom0c")
        monkeypatch.setattr(test_pipeline, "_inspect", lambda c, n, r, on_eligible=None: replace(
            _inspect(c, n, r, on_eligible), peers=peers))
    if layout == "points":  # a restore point after the run; keep_last = 1 prunes the older one
        config = parse_config(f'dom0s = ["dom0a", "dom0b"]\nstate_dir = "{tmp_path}"\nsnapshot_size = "256M"\n'
                              '[retention]\nkeep_last = 1\n', hostname="dom0a", default_uri="test:///x")
        old = "20261101T031500Z"
        rows = [{"vg_name": "vg0", "lv_name": lv, "origin": "", "pool_lv": "", "lv_attr": "owi-a-s---",
                 "lv_size": "1073741824", "snap_percent": "", "lv_tags": "dbk:domu:web1", "vg_free": str(8 << 30)}
                for lv in ("web1-disk", "web1-srv")]
        rows += [dict(r, lv_name=f"{r['lv_name']}.{old}", origin=r["lv_name"], lv_attr="swi-a-s---", snap_percent="2.0",
                      lv_size=str(64 << 20), lv_tags=f"dbk:point,dbk:domu:web1,dbk:time:{old},dbk:disks:2,"
                                                     "dbk:state:good") for r in rows]
        peer.probes[pts.lvs_of("web1")] = (0, json.dumps({"report": [{"lv": rows}]}), "")
    local.probes[CAT] = (EXIT_MISSING, "", "read-in: no such file\n") if layout == "no-fstab" else (0, text, "")
    hosts = {"dom0b": peer, "dom0c": third} if layout == "two-peers" else {"dom0b": peer}
    monkeypatch.setattr(frame, "inspect", lambda c, n, conn, r, on_eligible=None: test_pipeline._inspect(
        c, n, r, on_eligible))
    out = backup_job.backup(config, "web1", None, local, factory=lambda host, ssh: hosts[host],
                          verify=layout == "verify")
    assert (out.status, out.exit_code) == ("OK", 0), out.summary()
    fstab = {"no-fstab": planner.MISSING, "config-mounts": False}.get(layout, text)
    plan = decided_plan(config, local, peers, fstab, frozen=layout == "freeze", verify=layout == "verify")
    after = []
    if layout == "points":  # then, torn down: the point phase's listing decided these
        lvs = pts.parse_lvs(peer.probes[pts.lvs_of("web1")][1])
        replicas = [lv for lv in lvs if pts.POINT not in lv.tags]
        after = [s.argv for s in pts.point_steps("web1", "dom0b", replicas, out.point, disks=["xvda", "xvdb"],
                                                 size="20%ORIGIN", consistency="crash")
                 + [pts.keep_xml("dom0b", f"{tmp_path}/points/web1", out.point)]
                 + pts.prune_steps("dom0b", pts.points_of(lvs), f"{tmp_path}/points/web1")]
        after = [x for a in after for x in ([a[:2] + (lv,) for lv in a[2:]] if a[0] == "lvremove" else [a])]
        assert [s.then for s in plan.after] == ["points"] and out.point
    elif layout == "verify":
        assert plan.after == [] and not out.point
    else:  # a mirror: once OK, the replicas' mark is cleared
        after = [s.argv for s in plan.after if s.host == "dom0b"]
        assert after == [("lvchange", "--deltag", pts.WRITING, "/dev/vg0/web1-disk", "/dev/vg0/web1-srv")]
        assert not out.point
    for host in (LOCAL, *peers):
        expected = planned(plan, host)
        if layout == "points" and host == "dom0b":  # the point-size decision: its thick points grew there
            grown = [a for a in effects(log, host) if a[0] == "lvextend"]
            assert [a[-1] for a in grown] == [f"/dev/vg0/{lv}.{old}" for lv in ("web1-disk", "web1-srv")]
            at = len([a for s in plan.steps if s.host == host and not s.check and s.argv[0] not in PROBES
                      for a in items(s.argv)])
            expected[at:at] = grown
        assert effects(log, host if host != LOCAL else "dom0a") == expected + (
            after if host == "dom0b" else [s.argv for s in plan.after if s.host == host]), host
    if layout != "config-mounts":  # the run mounted the root and read the fstab: a decision
        assert [s.then for s in plan.steps if s.phase == "inspect"] == ["fstab"]


def test_the_catalog_records_the_points_left_on_the_peer(tmp_path, fixtures, monkeypatch):
    """After an OK run's points phase: the points on the peer once the new one is made and the
    retention rules applied (keep_last = 2: the old good point stays, the pending one goes)."""
    from domubackup.hosts.catalog import Catalog

    config, local, peer, log = setup(tmp_path, fixtures)
    config = parse_config(f'dom0s = ["dom0a", "dom0b"]\nstate_dir = "{tmp_path}"\nsnapshot_size = "256M"\n'
                          '[retention]\nkeep_last = 2\n', hostname="dom0a", default_uri="test:///x")
    rows = [{"vg_name": "vg0", "lv_name": lv, "origin": "", "pool_lv": "", "lv_attr": "owi-a-s---",
             "lv_size": "1073741824", "snap_percent": "", "lv_tags": "dbk:domu:web1"} for lv in ("web1-disk", "web1-srv")]
    for old, state in (("20261101T031500Z", "good"), ("20261001T031500Z", "pending")):
        rows += [dict(r, lv_name=f"{r['lv_name']}.{old}", origin=r["lv_name"], lv_attr="Vwi---tz-k", pool_lv="pool",
                      lv_tags=f"dbk:point,dbk:domu:web1,dbk:time:{old},dbk:disks:2,dbk:state:{state}") for r in rows[:2]]
    peer.probes[pts.lvs_of("web1")] = (0, json.dumps({"report": [{"lv": rows}]}), "")
    local.probes[CAT] = (0, FSTAB, "")
    monkeypatch.setattr(frame, "inspect", lambda c, n, conn, r, on_eligible=None: test_pipeline._inspect(
        c, n, r, on_eligible))
    with Catalog(tmp_path / "catalog.sqlite", host="dom0a") as cat:
        out = backup_job.backup(config, "web1", None, local, factory=lambda host, ssh: peer, catalog=cat)
        assert out.status == "OK" and out.point
        assert [(r.domu, r.host, r.points, r.good, r.newest_good) for r in cat.points()] == [
            ("web1", "dom0b", 2, 2, pts.stamp_time(out.point).timestamp())]
        assert [(r.kind, r.status) for r in cat.runs()] == [("backup", "OK")]
    assert [a for a in effects(log, "dom0b") if a[0] == "lvremove"] == [
        ("lvremove", "-f", f"/dev/vg0/{lv}.20261001T031500Z") for lv in ("web1-disk", "web1-srv")]
