"""Read-only probes of a disk through a runner: lvs, parted, blkid. Parsing lives in parsers."""

from __future__ import annotations

from dataclasses import replace

import re

from ..core import parsers
from ..core.commands import dm_name, kpartx_list as cmd_kpartx_list
from ..core.errors import CommandError, InspectError
from ..core.model import Disk, DiskFacts, Filesystem, LogicalVolume, PartitionTable
from ..core.layout import classify, unmappable
from ..core.points import RESTORING

_VG_LV_PATH = re.compile(r"/dev/(?!mapper/)([A-Za-z0-9+_.-]+)/([A-Za-z0-9+_.-]+)")
_DM_PATH = re.compile(r"/dev/mapper/((?:[A-Za-z0-9+_.]|--)+)-(?:[A-Za-z0-9+_.]|--)+")


def vg_of_path(path: str) -> str | None:
    """The VG named by an LV path of the form /dev/VG/LV or /dev/mapper/VG-LV, else None."""
    m = _VG_LV_PATH.fullmatch(path)
    if m:
        return m.group(1)
    m = _DM_PATH.fullmatch(path)
    return m.group(1).replace("--", "-") if m else None


def _parsed(parse, runner, res, what: str):
    """``parse(res.stdout)``; a ValueError (output the parser does not know, which may come
    from the guest's data: labels, GPT names) becomes an InspectError naming WHAT and the host."""
    try:
        return parse(res.stdout)
    except ValueError as e:
        raise InspectError(f"{what} on {runner.host}: {e}") from None


def list_lvs(runner, paths) -> list[LogicalVolume] | None:
    """Every LV of the VGs the paths name, with ONE `lvs VG...` (each command costs, and the
    same list answers the stale-snapshot check). None when a path names no VG or lvs fails:
    the caller then asks lvs about each path."""
    vgs = [vg_of_path(p) for p in paths]
    if not vgs or None in vgs:
        return None
    res = runner.run(parsers.lvs_argv(*dict.fromkeys(vgs)), check=False)
    if res.exit_code != 0:
        return None
    return _parsed(parsers.parse_lvs, runner, res,
                   f"cannot read the output of `lvs` for {', '.join(dict.fromkeys(vgs))}")


def find_lv(lvs, path: str) -> LogicalVolume | None:
    for lv in lvs or ():
        if path in (lv.path, f"/dev/{lv.vg}/{lv.lv}", f"/dev/mapper/{dm_name(lv.vg, lv.lv)}"):
            return lv
    return None


def probe_lv(runner, path: str, what: str):
    res = runner.run(parsers.lvs_argv(path), check=False)
    if res.exit_code != 0:
        raise InspectError(f"{what}: {path} on {runner.host} is not an LVM logical volume "
                           f"({res.stderr.strip().splitlines()[-1] if res.stderr.strip() else 'lvs failed'})",
                           hint="only LV-backed disks can be snapshotted; exclude the disk with exclude_disks")
    lvs = _parsed(parsers.parse_lvs, runner, res, f"{what}: cannot read the output of `lvs` for {path}")
    if len(lvs) != 1:
        raise InspectError(f"{what}: lvs on {path} returned {len(lvs)} volumes, expected 1")
    return lvs[0]


def probe_table(runner, dev: str, size: int) -> PartitionTable:
    res = runner.run(parsers.parted_argv(dev), check=False)
    if res.exit_code == 0:
        return _parsed(parsers.parse_parted, runner, res, f"cannot read the output of `parted` for {dev}")
    if "unrecognised disk label" in res.stderr or "unrecognized disk label" in res.stderr:
        return PartitionTable("unknown", size)
    raise CommandError(runner.host, res.argv, res.exit_code, res.stderr)


def probe_fs(runner, dev: str, disk: str, number: int | None, offset: int | None, size: int | None) -> Filesystem:
    res = runner.run(parsers.blkid_argv(dev, offset, size), ok_codes=(0, 2))
    fstype, uuid, label = "", "", ""
    if res.exit_code == 0:
        at = f" at offset {offset}" if offset is not None else ""
        fstype, uuid, label = _parsed(lambda out: parsers.fs_of(parsers.parse_blkid(out)), runner, res,
                                      f"{disk}: cannot read the output of `blkid` for {dev}{at}")
    return classify(Filesystem(disk=disk, partition=number, fstype=fstype, uuid=uuid, label=label))


def probe_disk(runner, disk: Disk, *, path: str | None = None, lvs=None, point: bool = False) -> DiskFacts:
    """Facts of one disk: its LV, partition table and the filesystem in each partition.

    `path` overrides the disk's source (the peer probes its replica LV of the same name);
    `lvs`: a list_lvs() answer to look the LV up in before asking lvs about the path; `point`:
    the path is a restore point's member (a snapshot, and that is expected)."""
    path = path or disk.source
    lv = disk_lv(runner, disk, path, lvs, point=point)
    table, filesystems = probe_layout(runner, lv.path or path, disk.target, lv.size)
    return DiskFacts(disk=disk, lv=lv, table=table, filesystems=filesystems)


def disk_lv(runner, disk: Disk, path: str, lvs=None, *, point: bool = False) -> LogicalVolume:
    """The LV of a disk (at PATH), refused when it is a snapshot (but for a point's member) or
    a restore into it did not end."""
    lv = find_lv(lvs, path) or probe_lv(runner, path, disk.target)
    if lv.is_snapshot and not point:
        raise InspectError(f"{disk.target}: {path} is itself an LVM snapshot (of {lv.origin or 'another LV'})",
                           hint="back up the origin volume, not a snapshot")
    if RESTORING in lv.tags:
        raise InspectError(f"{disk.target}: {path} is marked {RESTORING}: a `domubackup restore` into it did not "
                           "end (it may be half-written)", hint="run the restore again until it ends OK")
    return lv


def probe_layout(runner, dev: str, target: str, size: int) -> tuple[PartitionTable, tuple[Filesystem, ...]]:
    """The partition table of DEV and the filesystem in each partition (or on the whole device)."""
    table = probe_table(runner, dev, size)
    if table.label in ("loop", "unknown"):
        table = replace(table, label="loop")
    return table, probe_filesystems(runner, dev, target, table)


def probe_filesystems(runner, dev: str, target: str, table: PartitionTable) -> tuple[Filesystem, ...]:
    if table.label == "loop":
        return unmappable([probe_fs(runner, dev, target, None, None, None)])
    return unmappable([probe_fs(runner, dev, target, p.number, p.start, p.size)
                       for p in table.partitions if not p.is_extended])


def check_snapshot(runner, f: DiskFacts, dev: str, dm_prefix: str, sep: str) -> None:
    """The snapshot DEV of disk F must hold what the probe of the origin found: the guest
    can write between the probe and the snapshot, and what gets mapped and mounted is the
    snapshot. Its partition table is read with `kpartx -l` (check_mappable, which also refuses
    what kpartx would map beyond the table); then each filesystem is probed again (a guest
    LVM PV that appears there is caught before any mapping)."""
    if f.partitioned:
        check_mappable(runner, f, dev, dm_prefix, sep)
    filesystems = probe_filesystems(runner, dev, f.disk.target, f.table)
    if filesystems != f.filesystems:
        was = ", ".join(f"{fs.name} {fs.fstype or '-'}" for fs in f.filesystems)
        now = ", ".join(f"{fs.name} {fs.fstype or '-'}" for fs in filesystems)
        raise InspectError(f"{f.disk.target}: the disk changed between the probe and its snapshot "
                           f"(probed {was}; snapshot {now})", hint="run the backup again")


def check_mappable(runner, f: DiskFacts, dev: str, dm_prefix: str, sep: str) -> None:
    """kpartx maps every partition it can find, which may be more than parted shows (a BSD,
    Solaris or UnixWare label nested in a partition): each mapped device would be probed by
    udev on the Dom0, and a guest LVM PV or RAID member in it assembled. Refuse unless
    `kpartx -l` lists exactly the partitions that were probed, where they were probed."""
    res = runner.run(cmd_kpartx_list(dev, sep))
    entries = _parsed(parsers.parse_kpartx_list, runner, res, f"{f.disk.target}: cannot read `kpartx -l` of {dev}")
    ext = next((p for p in f.table.partitions if p.is_extended), None)
    found = {name: (offset if parent == dev or ext is None else ext.start // 512 + offset, sectors)
             for name, sectors, parent, offset in entries}
    expected = {f"{dm_prefix}{sep}{p.number}": (p.start // 512, p.size // 512) for p in f.table.partitions}
    extra = sorted(set(found) - set(expected))
    if extra:
        raise InspectError(f"{f.disk.target}: kpartx would map {', '.join(extra)} on {runner.host}, "
                           f"which the partition table that was probed does not show (a nested "
                           f"partition label?): not mapped",
                           hint="exclude this disk with exclude_disks")
    extended = f"{dm_prefix}{sep}{ext.number}" if ext else None  # kpartx maps it as 2 sectors
    moved = sorted(name for name, (start, size) in expected.items() if name not in found
                   or found[name][0] != start or (found[name][1] != size and name != extended))
    if moved:
        raise InspectError(f"{f.disk.target}: the partition table of {dev} on {runner.host} is not the one "
                           f"that was probed ({', '.join(moved)} differ): not mapped", hint="run the backup again")


def layout_differences(local: DiskFacts, peer: DiskFacts) -> list[str]:
    """What differs between the snapshot's layout and the replica's (empty when they match)."""
    t = local.disk.target
    diffs = []
    if peer.lv.size < local.lv.size:
        diffs.append(f"{t}: replica is smaller ({peer.lv.size} bytes) than the origin ({local.lv.size} bytes)")
    if local.table.label != peer.table.label:
        diffs.append(f"{t}: partition table {peer.table.label!r} on the replica, {local.table.label!r} here")
        return diffs
    lp = {(p.number, p.start, p.size) for p in local.table.partitions}
    pp = {(p.number, p.start, p.size) for p in peer.table.partitions}
    if local.table.label != "loop" and lp != pp:
        diffs.append(f"{t}: partitions differ (here {sorted(lp)}, replica {sorted(pp)})")
    lf = {fs.name: fs.fstype for fs in local.filesystems if fs.skip_reason is None}
    pf = {fs.name: fs.fstype for fs in peer.filesystems}
    for name, fstype in sorted(lf.items()):
        if pf.get(name) != fstype:
            diffs.append(f"{name}: {fstype} here, {pf.get(name) or 'no filesystem'} on the replica")
    return diffs


def with_partition_ids(runner, facts: list[DiskFacts], devices: list[str]) -> list[DiskFacts]:
    """FACTS with each partition's PARTUUID and PARTLABEL (one `partx` per partitioned disk,
    DEVICES[i] being the device of FACTS[i]), for an fstab that names partitions that way."""
    out = []
    for f, dev in zip(facts, devices):
        if f.partitioned:
            res = runner.run(parsers.partx_argv(dev))
            ids = _parsed(parsers.parse_partx, runner, res, f"{f.disk.target}: cannot read the output of `partx` for {dev}")
            f = replace(f, filesystems=tuple(replace(fs, partuuid=ids.get(fs.partition, ("", ""))[0],
                                                     partlabel=ids.get(fs.partition, ("", ""))[1])
                                             for fs in f.filesystems))
        out.append(f)
    return out
