"""The ways back (jobs/wayback.py): the block copy's argv and plan, its checksum judgement, the
choice of point and the refusals that come before anything is written."""

import json

import pytest

from domubackup.core import commands as cmd, points as pts
from domubackup.core.config import parse_config
from domubackup.core.errors import DomuBackupError, PeerError, UsageError
from domubackup.core.model import LOCAL, Result
from domubackup.jobs import wayback
from replay import ReplayRunner

P1, P2 = "20261201T031500Z", "20261202T031500Z"


def row(name, tags, *, origin="", pool="", attr="-wi-a-----", size=1 << 30):
    thick = attr.startswith("s")
    return {"vg_name": "vg0", "lv_name": name, "origin": origin, "pool_lv": pool, "lv_attr": attr,
            "lv_size": str(160 << 20 if thick else size), "origin_size": str(size if thick else 0),
            "snap_percent": "", "lv_tags": ",".join(tags)}


def member(lv, point, disk, state=pts.GOOD, **kw):
    return row(f"{lv}.{point}", [pts.POINT, "dbk:domu:web1", f"dbk:time:{point}", "dbk:disks:2",
                                 "dbk:consistency:crash", f"dbk:disk:{disk}", state], origin=lv, **kw)


def listing(replica_attr="-wi-a-----"):
    rows = [row("web1-disk", ["dbk:domu:web1"], attr=replica_attr), row("web1-srv", ["dbk:domu:web1"], pool="pool"),
            member("web1-disk", P1, "xvda", attr="swi-a-s---"), member("web1-srv", P1, "xvdb", pool="pool"),
            member("web1-disk", P2, "xvda", attr="swi-a-s---"),
            member("web1-srv", P2, "xvdb", state=pts.PENDING, pool="pool")]
    return json.dumps({"report": [{"lv": rows}]})


def runner(text, state="shut off\n"):
    return ReplayRunner({pts.lvs_of("web1"): (0, text, ""),
                         cmd.virsh_domstate("test:///default", "web1"): (0, state, "")}, host="dom0b")


def config(tmp_path):
    return parse_config(f'dom0s = ["dom0a", "dom0b"]\nstate_dir = "{tmp_path}"\nlibvirt_uri = "test:///default"\n'
                        '[domu.web1]\npeers = ["dom0a"]\n', hostname="dom0b")


def test_a_good_point_pairs_each_member_with_its_replica_and_disk():
    replicas, point = wayback.held(runner(listing()), "web1", P1)
    assert [r.name for r in replicas] == ["web1-disk", "web1-srv"]
    found = wayback.sources("web1", replicas, point, "dom0b")
    assert [(m.name, r.name, d) for m, r, d in found] == [(f"web1-disk.{P1}", "web1-disk", "xvda"),
                                                          (f"web1-srv.{P1}", "web1-srv", "xvdb")]
    # a thick member's device holds its origin's bytes, not its copy-on-write size
    assert [(m.size, m.data_size) for m, _, _ in found] == [(160 << 20, 1 << 30), (1 << 30, 1 << 30)]
    # only the thin member is activated (a thick snapshot is active), and deactivated at teardown
    steps = wayback.activation(LOCAL, [m for m, _, _ in found])
    assert [(s.argv, s.undo) for s in steps] == [
        (("lvchange", "--activate", "y", "--ignoreactivationskip", f"/dev/vg0/web1-srv.{P1}"),
         ("lvchange", "--activate", "n", f"/dev/vg0/web1-srv.{P1}"))]


def test_a_point_that_is_not_good_or_not_there_or_not_a_name_is_refused():
    with pytest.raises(DomuBackupError, match=f"restore point {P2} on dom0b is PENDING: it is not used"):
        wayback.held(runner(listing()), "web1", P2)
    with pytest.raises(UsageError, match="no restore point 20261130T031500Z on dom0b"):
        wayback.held(runner(listing()), "web1", "20261130T031500Z")
    with pytest.raises(UsageError, match="is not a restore point name"):
        wayback.held(runner(listing()), "web1", "../../etc")
    with pytest.raises(DomuBackupError, match="dom0b holds no replica of it"):
        wayback.held(runner(json.dumps({"report": [{"lv": []}]})), "web1", None)


def test_rollback_is_refused_while_the_domu_runs_here_or_its_replica_is_open(tmp_path):
    with pytest.raises(PeerError, match="web1 is running on dom0b: refusing to overwrite"):
        wayback.rollback(config(tmp_path), "web1", runner(listing(), state="running\n"), P1)
    with pytest.raises(DomuBackupError, match="vg0/web1-disk is open on dom0b"):
        wayback.rollback(config(tmp_path), "web1", runner(listing(replica_attr="-wi-ao----")), P1)
    assert not (tmp_path / "journal" / "web1.json").exists()  # nothing was started


def test_copy_blocks_writes_only_the_blocks_that_differ(tmp_path):
    from domubackup.hosts import blockcopy

    size = 3 * blockcopy.CHUNK + 100
    src, dst = tmp_path / "src", tmp_path / "dst"
    data = bytearray(size)
    data[blockcopy.CHUNK + 5] = 1
    data[-1] = 2
    src.write_bytes(bytes(data))
    dst.write_bytes(bytes(size))
    assert blockcopy.copy_blocks(str(src), str(dst), size) == (4, 2)
    assert dst.read_bytes() == src.read_bytes()
    assert blockcopy.copy_blocks(str(src), str(dst), size) == (4, 0)
    assert blockcopy.main(["copy-blocks", str(src), str(tmp_path / "missing"), str(size)]) == 1


def test_of_a_block_that_differs_only_the_pages_that_differ_are_written():
    from domubackup.hosts import blockcopy

    old = bytes(6 * 4096 + 100)
    new = bytearray(old)
    new[4096 + 7] = 1  # page 1
    new[3 * 4096] = new[4 * 4096 + 4095] = 2  # pages 3 and 4: one run
    new[-1] = 3  # the short last page
    assert list(blockcopy.differing(bytes(new), old)) == [(4096, 8192), (12288, 20480), (6 * 4096, 6 * 4096 + 100)]
    assert list(blockcopy.differing(old, old)) == []


def test_a_rollback_copies_here_and_untags_after_the_last_copy():
    steps = wayback.copy_steps([("xvda", "/dev/vg0/d.P", 10, "/dev/vg0/d")], source_host=LOCAL, tag=pts.WRITING,
                               note="n")
    assert [s.argv for s in steps] == [("lvchange", "--addtag", "dbk:writing", "/dev/vg0/d"),
                                       ("domubackup", "copy-blocks", "/dev/vg0/d.P", "/dev/vg0/d", "10"),
                                       ("lvchange", "--deltag", "dbk:writing", "/dev/vg0/d")]


def test_a_restore_streams_each_member_from_the_peer_into_the_receiver_and_compares_checksums():
    pairs = [("xvda", "/dev/vg0/d.P", 10, "/dev/vg0/d"), ("xvdb", "/dev/vg0/s.P", 20, "/dev/vg0/s")]
    steps = wayback.copy_steps(pairs, source_host="dom0b", tag=wayback.RESTORING, note="n", ready="active")
    assert steps[0].argv == ("lvchange", "--addtag", "dbk:restoring", "/dev/vg0/d", "/dev/vg0/s")
    copies = steps[1:3]
    assert [s.argv[-2:] for s in copies] == [("/dev/vg0/d", "10"), ("/dev/vg0/s", "20")]
    assert [s.waits for s in copies] == [("active",), ()] and steps[-1].argv[:2] == ("lvchange", "--deltag")

    class Peer:
        def stream(self, argv, timeout):
            self.argv = argv
            return type("S", (), {"exit_code": 0, "stderr": "checksum " + "a" * 64 + "\n"})()

    peer = Peer()
    copy = wayback.Copy({"dom0b": peer})
    assert copy.feed(copies[0]) is not None and peer.argv == ("domubackup", "send-blocks", "/dev/vg0/d.P", "10")
    copy.copied(copies[0], Result(LOCAL, copies[0].argv, 0, "a" * 64 + "\ntoken -\n"))
    assert copy.report == [f"xvda: dom0b:/dev/vg0/d.P -> /dev/vg0/d: checksum of the blocks {'a' * 16}... matches on both ends"]
    copy.feed(copies[1])
    with pytest.raises(DomuBackupError, match="xvdb: dom0b:/dev/vg0/s.P -> /dev/vg0/s: the copy is not whole"):
        copy.copied(copies[1], Result(LOCAL, copies[1].argv, 0, "b" * 64 + "\n"))


def test_a_mount_of_a_point_replays_no_journal():
    assert wayback.mount_options("ext4")[0] == "ro" and "noload" in wayback.mount_options("ext4")
    assert {"norecovery", "nouuid"} <= set(wayback.mount_options("xfs"))
    assert cmd.kpartx_add("/dev/vg0/a", "p", read_only=True) == ("kpartx", "-a", "-r", "-s", "-p", "p", "/dev/vg0/a")
