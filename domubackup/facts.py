"""Read-only probes of a disk through a runner: lvs, parted, blkid. Parsing lives in parsers."""

from __future__ import annotations

from dataclasses import replace

import re

from . import parsers
from .commands import dm_name
from .errors import CommandError, InspectError
from .model import Disk, DiskFacts, Filesystem, LogicalVolume, PartitionTable
from .plan import classify

_VG_LV_PATH = re.compile(r"/dev/(?!mapper/)([A-Za-z0-9+_.-]+)/([A-Za-z0-9+_.-]+)")
_DM_PATH = re.compile(r"/dev/mapper/((?:[A-Za-z0-9+_.]|--)+)-(?:[A-Za-z0-9+_.]|--)+")


def vg_of_path(path: str) -> str | None:
    """The VG named by an LV path of the form /dev/VG/LV or /dev/mapper/VG-LV, else None."""
    m = _VG_LV_PATH.fullmatch(path)
    if m:
        return m.group(1)
    m = _DM_PATH.fullmatch(path)
    return m.group(1).replace("--", "-") if m else None


def list_lvs(runner, paths) -> list[LogicalVolume] | None:
    """Every LV of the VGs the paths name, with ONE `lvs VG...` (each command costs, and the
    same list answers the stale-snapshot check). None when a path names no VG or lvs fails:
    the caller then asks lvs about each path."""
    vgs = [vg_of_path(p) for p in paths]
    if not vgs or None in vgs:
        return None
    res = runner.run(parsers.lvs_argv(*dict.fromkeys(vgs)), check=False)
    return parsers.parse_lvs(res.stdout) if res.exit_code == 0 else None


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
    lvs = parsers.parse_lvs(res.stdout)
    if len(lvs) != 1:
        raise InspectError(f"{what}: lvs on {path} returned {len(lvs)} volumes, expected 1")
    return lvs[0]


def probe_table(runner, dev: str, size: int) -> PartitionTable:
    res = runner.run(parsers.parted_argv(dev), check=False)
    if res.exit_code == 0:
        return parsers.parse_parted(res.stdout)
    if "unrecognised disk label" in res.stderr or "unrecognized disk label" in res.stderr:
        return PartitionTable("unknown", size)
    raise CommandError(runner.host, res.argv, res.exit_code, res.stderr)


def probe_fs(runner, dev: str, disk: str, number: int | None, offset: int | None, size: int | None) -> Filesystem:
    res = runner.run(parsers.blkid_argv(dev, offset, size), ok_codes=(0, 2))
    fstype, uuid, label = parsers.fs_of(parsers.parse_blkid(res.stdout)) if res.exit_code == 0 else ("", "", "")
    return classify(Filesystem(disk=disk, partition=number, fstype=fstype, uuid=uuid, label=label))


def probe_disk(runner, disk: Disk, *, path: str | None = None, lvs=None) -> DiskFacts:
    """Facts of one disk: its LV, partition table and the filesystem in each partition.

    `path` overrides the disk's source (the peer probes its replica LV of the same name);
    `lvs`: a list_lvs() answer to look the LV up in before asking lvs about the path."""
    path = path or disk.source
    lv = find_lv(lvs, path) or probe_lv(runner, path, disk.target)
    if lv.is_snapshot:
        raise InspectError(f"{disk.target}: {path} is itself an LVM snapshot (of {lv.origin or 'another LV'})",
                           hint="back up the origin volume, not a snapshot")
    dev = lv.path or path
    table = probe_table(runner, dev, lv.size)
    filesystems = []
    if table.label in ("loop", "unknown"):
        filesystems.append(probe_fs(runner, dev, disk.target, None, None, None))
        table = replace(table, label="loop")
    else:
        for p in table.partitions:
            if p.is_extended:
                continue
            filesystems.append(probe_fs(runner, dev, disk.target, p.number, p.start, p.size))
    return DiskFacts(disk=disk, lv=lv, table=table, filesystems=tuple(filesystems))


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
