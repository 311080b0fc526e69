"""facts: output that a parser refuses (it may carry the guest's labels and names) is an
InspectError naming the disk or device and the host, never a bare ValueError."""

import pathlib
import sys

import pytest

from domubackup.hosts import facts
from domubackup.core import parsers
from domubackup.core.errors import InspectError
from domubackup.core.model import Disk

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from replay import ReplayRunner  # noqa: E402

DEV = "/dev/vg0/web1-srv"
LVS_OK = f"  vg0|web1-srv|134217728|-wi-ao----|||2147483648|{DEV}\n"
PARTED_BAD = f"BYT;\n{DEV}:134217728B:dm:512:512:gpt::;\n1:17408B:huge:1B:ext4:root:;\n"


def error_of(fn, table):
    with pytest.raises(InspectError) as e:
        fn(ReplayRunner(table, host="dom0b"))
    return str(e.value)


def test_lvs_of_the_vgs():
    table = {tuple(parsers.lvs_argv("vg0")): (0, "  vg0|web1\n", "")}
    assert error_of(lambda r: facts.list_lvs(r, [DEV]), table) == (
        "cannot read the output of `lvs` for vg0 on dom0b: malformed lvs line '  vg0|web1': expected 9 fields, got 2")


def test_lvs_of_one_lv():
    table = {tuple(parsers.lvs_argv(DEV)): (0, "  vg0|web1\n", "")}
    assert error_of(lambda r: facts.probe_lv(r, DEV, "xvdb"), table) == (
        f"xvdb: cannot read the output of `lvs` for {DEV} on dom0b: malformed lvs line '  vg0|web1': "
        "expected 9 fields, got 2")


def test_parted():
    table = {tuple(parsers.parted_argv(DEV)): (0, PARTED_BAD, "")}
    assert error_of(lambda r: facts.probe_table(r, DEV, 134217728), table) == (
        f"cannot read the output of `parted` for {DEV} on dom0b: malformed parted line "
        "'1:17408B:huge:1B:ext4:root:;': not a byte value 'huge' (use 'unit B')")


@pytest.mark.parametrize("offset, size, at", [(None, None, ""), (1048576, 104857600, " at offset 1048576")])
def test_blkid(offset, size, at):
    table = {tuple(parsers.blkid_argv(DEV, offset, size)): (0, "garbage line\n", "")}
    assert error_of(lambda r: facts.probe_fs(r, DEV, "xvdb", 1 if offset else None, offset, size), table) == (
        f"xvdb: cannot read the output of `blkid` for {DEV}{at} on dom0b: malformed blkid line 'garbage line': "
        "expected KEY=value")


def test_probe_disk_passes_the_error_on():
    table = {tuple(parsers.lvs_argv(DEV)): (0, LVS_OK, ""), tuple(parsers.parted_argv(DEV)): (0, PARTED_BAD, "")}
    disk = Disk(type="block", device="disk", source=DEV, target="xvdb")
    with pytest.raises(InspectError, match=r"^cannot read the output of `parted` for /dev/vg0/web1-srv on dom0b: "):
        facts.probe_disk(ReplayRunner(table, host="dom0b"), disk)


def web1_disk_facts(fixtures):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "integration"))
    from test_plan_cli import web1_probes
    runner = ReplayRunner(web1_probes(fixtures))
    disk = Disk("block", "disk", "/dev/vg0/web1-disk", "xvda", "xen", "phy")
    return facts.probe_disk(runner, disk), web1_probes(fixtures)


SNAP = "/dev/vg0/web1-disk-snap"
# what kpartx -l prints for the layout of fixtures/tools/parted-msdos-logical.txt
KPARTX = (f"vg0-web1--disk--snapp1 : 0 204800 {SNAP} 2048\nvg0-web1--disk--snapp2 : 0 2 {SNAP} 206848\n"
          "vg0-web1--disk--snapp5 : 0 815104 /dev/dm-9 2048\nvg0-web1--disk--snapp6 : 0 202752 /dev/dm-9 819200\n")


def snap_table(probes, **changes):
    """The origin's probes, as the snapshot's: same outputs, with CHANGES (argv suffix -> output)."""
    table = {tuple(a.replace("web1-disk", "web1-disk-snap") for a in k): v for k, v in probes.items()}
    table[("kpartx", "-l", "-p", "p", "/dev/vg0/web1-disk-snap")] = (0, changes.pop("kpartx", KPARTX), "")
    return table


def test_the_snapshot_must_hold_what_was_probed(fixtures):
    f, probes = web1_disk_facts(fixtures)
    snap = "/dev/vg0/web1-disk-snap"
    facts.check_snapshot(ReplayRunner(snap_table(probes)), f, snap, "vg0-web1--disk--snap", "p")  # unchanged
    facts.check_mappable(ReplayRunner(snap_table(probes)), f, snap, "vg0-web1--disk--snap", "p")
    # the guest made its /var partition an LVM PV after the probe: refused before any mapping
    table = snap_table(probes)
    table[tuple(parsers.blkid_argv(snap, 106954752, 417333248))] = (0, "TYPE=LVM2_member\nUSAGE=raid\n", "")
    with pytest.raises(InspectError, match="the disk changed between the probe and its snapshot .*xvda5 LVM2_member"):
        facts.check_snapshot(ReplayRunner(table), f, snap, "vg0-web1--disk--snap", "p")
    table[tuple(parsers.blkid_argv(snap, 106954752, 417333248))] = (0, "TYPE=ext4\n", "")
    with pytest.raises(InspectError, match="xvda: the disk changed between the probe and its snapshot"):
        facts.check_snapshot(ReplayRunner(table), f, snap, "vg0-web1--disk--snap", "p")


def test_kpartx_must_not_map_more_than_was_probed(fixtures):
    # a BSD label nested in a partition: kpartx would map its slices, which udev then probes
    f, probes = web1_disk_facts(fixtures)
    nested = KPARTX + "vg0-web1--disk--snapp7 : 0 1024 /dev/vg0/web1-disk-snap 4096\n"
    with pytest.raises(InspectError, match="kpartx would map vg0-web1--disk--snapp7 on dom0a, which the partition table that was probed does not show.*not mapped"):
        facts.check_mappable(ReplayRunner(snap_table(probes, kpartx=nested)), f, "/dev/vg0/web1-disk-snap",
                             "vg0-web1--disk--snap", "p")


def test_partition_ids_are_read_from_the_snapshot_when_the_fstab_needs_them(fixtures):
    f, probes = web1_disk_facts(fixtures)
    snap = "/dev/vg0/web1-disk-snap"
    runner = ReplayRunner({tuple(parsers.partx_argv(snap)): (0, "1 0a1b2c3d-01 \n2 0a1b2c3d-02 \n5 0a1b2c3d-05 \n"
                                                                 "6 0a1b2c3d-06 \n", "")})
    [g] = facts.with_partition_ids(runner, [f], [snap])
    assert [(fs.name, fs.partuuid) for fs in g.filesystems] == [("xvda1", "0a1b2c3d-01"), ("xvda5", "0a1b2c3d-05"),
                                                                ("xvda6", "0a1b2c3d-06")]
    from domubackup.core.layout import resolve_spec
    assert resolve_spec("PARTUUID=0A1B2C3D-05", list(g.filesystems)).name == "xvda5"


def test_a_partition_moved_since_the_probe_is_not_mapped(fixtures):
    f, probes = web1_disk_facts(fixtures)
    moved = KPARTX.replace("0 815104 /dev/dm-9 2048", "0 815104 /dev/dm-9 4096")
    with pytest.raises(InspectError, match="the partition table of /dev/vg0/web1-disk-snap on dom0a is not the one "
                                           r"that was probed \(vg0-web1--disk--snapp5 differ\): not mapped"):
        facts.check_snapshot(ReplayRunner(snap_table(probes, kpartx=moved)), f, SNAP, "vg0-web1--disk--snap", "p")


def test_a_disk_that_a_restore_left_half_written_is_not_backed_up():
    lvs = parsers.parse_lvs(f"  vg0|web1-srv|134217728|-wi-ao----|||2147483648|{DEV}|dbk:domu:web1,dbk:restoring\n")
    assert lvs[0].tags == {"dbk:domu:web1", "dbk:restoring"}
    assert error_of(lambda r: facts.probe_disk(r, Disk("block", "disk", DEV, "xvdb"), lvs=lvs), {}) == (
        f"xvdb: {DEV} is marked dbk:restoring: a `domubackup restore` into it did not end (it may be half-written) (run the restore again until it ends OK)")
