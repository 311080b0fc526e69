"""The guest's layout: which filesystems are copied, and where each is mounted in the tree
(from the config's mounts, the guest's /etc/fstab as libmount reads it, or the fallback of one
directory per filesystem). Pure: facts in, Mounts out."""

from __future__ import annotations

import os
import re
from dataclasses import replace

from .config import Settings
from .domxml import loses_data
from .errors import InspectError
from .model import DiskFacts, FstabEntry, Filesystem, Mount

FSTAB = "/etc/fstab"
# Signatures that udev on a Dom0 activates or assembles as soon as a device holding one appears.
ASSEMBLED = ("LVM2_member", "linux_raid_member", "zfs_member", "bcache", "drbd", "ceph")
MOUNTABLE = ("ext2", "ext3", "ext4", "xfs", "btrfs", "vfat")
ROOT_TYPES = ("ext2", "ext3", "ext4", "xfs", "btrfs")


SWAP_SKIP, NO_FS_SKIP = "swap is not copied", "no filesystem found"  # reasons that lose no file


def classify(fs: Filesystem) -> Filesystem:
    """Set skip_reason for filesystems that are not copied."""
    if assembled_by_udev(fs.fstype):
        what = "LVM physical volume" if fs.fstype == "LVM2_member" else f"{fs.fstype} (a RAID or cache member)"
        return replace(fs, skip_reason=f"holds a guest {what}: not copied, and its disk is not mapped (udev "
                                       "would activate or assemble the guest's volumes on the Dom0)")
    if fs.fstype == "swap":
        return replace(fs, skip_reason=SWAP_SKIP)
    if not fs.fstype:
        return replace(fs, skip_reason=NO_FS_SKIP)
    if fs.fstype not in MOUNTABLE:
        return replace(fs, skip_reason=f"filesystem type {fs.fstype!r} is not supported")
    return fs


def unmappable(filesystems) -> tuple[Filesystem, ...]:
    """A disk with a guest PV or RAID member is never mapped: its other filesystems are then
    not copied either, with that reason."""
    bad = next((fs for fs in filesystems if assembled_by_udev(fs.fstype)), None)
    if bad is None:
        return tuple(filesystems)
    return tuple(fs if fs is bad or fs.skip_reason else
                 replace(fs, skip_reason=f"not copied: its disk is not mapped ({bad.name} holds a guest {bad.fstype})")
                 for fs in filesystems)


def not_copied(facts: list[DiskFacts], skipped_disks: list[str]) -> list[str]:
    """What of the guest's data a backup of FACTS leaves out ("xvdc: reason"): a run with any
    of these is PARTIAL, not OK. Swap, empty partitions and disks left out on purpose lose nothing."""
    out = [s for s in skipped_disks if loses_data(s.split(": ", 1)[-1])]
    out += [f"{fs.name}: {fs.skip_reason}" for f in facts for fs in f.filesystems
            if fs.skip_reason and fs.skip_reason not in (SWAP_SKIP, NO_FS_SKIP)]
    return out


SMALL_PARTITION = 16 << 20  # a partition without a filesystem this small holds no data (bios_grub, PReP)


def blocks_reason(f: DiskFacts) -> str | None:
    """Why `mode = "auto"` copies disk F as blocks; None when files mode copies all it holds
    (every partition holding data has a filesystem the tool mounts; swap holds none). A
    partition without a filesystem signature may hold raw data (a database's device): it
    counts unless it is flagged bios_grub or is under 16 MiB."""
    reasons = []
    for fs in f.filesystems:
        if fs.skip_reason in (None, SWAP_SKIP):
            continue
        if fs.skip_reason == NO_FS_SKIP:
            part = next((p for p in f.table.partitions if p.number == fs.partition), None)
            if part is None or not ("bios_grub" in part.flags or part.size < SMALL_PARTITION):
                reasons.append(f"{fs.name} has no filesystem signature (it may hold raw data)")
        else:
            reasons.append(f"{fs.name} {fs.skip_reason}")
    # a cause (a guest PV) before its consequences (the disk's other filesystems left unmapped)
    reasons.sort(key=lambda r: "not copied: its disk is not mapped" in r)
    if reasons:
        return reasons[0]
    return None if f.filesystems else "no filesystem found on the disk"


def assembled_by_udev(fstype: str) -> bool:
    return fstype in ASSEMBLED or fstype.endswith("_raid_member")


def mountable(facts: list[DiskFacts]) -> list[Filesystem]:
    return [fs for f in facts for fs in f.filesystems if fs.skip_reason is None]


def root_candidate(facts: list[DiskFacts], settings: Settings) -> Filesystem | None:
    """The filesystem mounted first: the config's "/" or the first Linux filesystem of the first disk."""
    filesystems = mountable(facts)
    for name, mp in settings.mounts:
        if mp == "/":
            return next((fs for fs in filesystems if fs.name == name), None)
    return next((fs for fs in filesystems if fs.fstype in ROOT_TYPES), None)


def mounts_from_config(facts: list[DiskFacts], settings: Settings) -> list[Mount]:
    by_name = {fs.name: fs for fs in mountable(facts)}
    mounts = []
    for name, mp in settings.mounts:
        if name not in by_name:
            raise InspectError(f"config mounts names {name!r}, which is not a mountable filesystem of "
                               f"this DomU (found: {', '.join(sorted(by_name)) or 'none'})")
        mounts.append(Mount(by_name[name], mp))
    return with_unplaced(sort_mounts(mounts), facts)


UNPLACED = "unplaced"  # Mount.tree of a filesystem that the guest's layout does not place


def with_unplaced(mounts: list[Mount], facts: list[DiskFacts]) -> list[Mount]:
    """MOUNTS, then every other filesystem to copy, each at /xvdb3 of the hidden tree
    (tree_root(..., UNPLACED)): nothing found on the disks is left out because the guest's
    fstab (or the config) does not name it."""
    placed = {m.filesystem.name for m in mounts}
    return mounts + [Mount(fs, "/" + fs.name, tree=UNPLACED) for fs in mountable(facts) if fs.name not in placed]


TAGS = ("UUID", "LABEL", "PARTUUID", "PARTLABEL")
BY_PATH = {"by-uuid": "UUID", "by-label": "LABEL", "by-partuuid": "PARTUUID", "by-partlabel": "PARTLABEL"}
GUEST_DISK_PREFIXES = ("xvd", "sd", "vd", "hd")  # a disk that is xvdb in the domain XML may be sdb inside
PSEUDO = ("proc", "sysfs", "tmpfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "securityfs", "debugfs",
          "tracefs", "mqueue", "hugetlbfs", "configfs", "fusectl", "pstore", "bpf", "efivarfs", "autofs",
          "binfmt_misc", "ramfs", "rpc_pipefs", "nfsd", "overlay", "none")
NETWORK = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "9p", "davfs", "fuse.sshfs",
           "sshfs", "afs", "fuse.glusterfs", "lustre")


def spec_tag(spec: str) -> tuple[str, str] | None:
    """(TAG, value) that an fstab spec names, as libmount reads it: TAG=value with the value
    unquoted ("..." or '...'), or /dev/disk/by-*/VALUE with udev's \\xHH escapes decoded;
    None for anything else (a device path, a pseudo filesystem's name)."""
    key, sep, value = spec.partition("=")
    if sep and key in TAGS:
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        return key, value
    head, _, value = spec.rpartition("/")
    if head.startswith("/dev/disk/") and head[len("/dev/disk/"):] in BY_PATH and value:
        return BY_PATH[head[len("/dev/disk/"):]], re.sub(r"\\x([0-9a-fA-F]{2})",
                                                          lambda m: chr(int(m.group(1), 16)), value)
    return None


def guest_device_names(fs: Filesystem) -> set[str]:
    """The /dev names the guest may see for FS: its disk under each naming scheme (xvdb, sdb,
    vdb, hdb) and its partition number as the guest numbers it."""
    prefix = next((p for p in GUEST_DISK_PREFIXES if fs.disk.startswith(p)), None)
    disks = {fs.disk} if prefix is None else {p + fs.disk[len(prefix):] for p in GUEST_DISK_PREFIXES}
    return {d if fs.partition is None else f"{d}{fs.partition}" for d in disks}


def resolve_spec(spec: str, filesystems: list[Filesystem]) -> Filesystem | None:
    """Find the filesystem an fstab spec names: a tag (UUID=, LABEL=, PARTUUID=, PARTLABEL=,
    quoted or not), /dev/disk/by-*/..., or a device name as the guest sees it."""
    tag = spec_tag(spec)
    for fs in filesystems:
        if tag is not None:
            key, value = tag
            mine = {"UUID": fs.uuid, "LABEL": fs.label, "PARTUUID": fs.partuuid, "PARTLABEL": fs.partlabel}[key]
            if value and (mine == value or (key in ("UUID", "PARTUUID") and mine.lower() == value.lower())):
                return fs
        elif spec.startswith("/dev/") and spec[len("/dev/"):] in guest_device_names(fs):
            return fs
    return None


def needs_partition_ids(entries: list[FstabEntry]) -> bool:
    """Whether the fstab names partitions by PARTUUID or PARTLABEL (ids probed only then)."""
    return any((spec_tag(e.spec) or ("",))[0] in ("PARTUUID", "PARTLABEL") for e in entries)


def skipped_line(e: FstabEntry) -> str | None:
    """Why an fstab line places nothing of the DomU's disks (None: it may)."""
    if e.vfstype == "swap" or e.file in ("none", "swap"):
        return "swap"
    if "bind" in e.options or "rbind" in e.options:
        return "a bind mount: its files are copied where they are"
    if e.vfstype in PSEUDO:
        return f"{e.vfstype} is not on a disk"
    if e.vfstype in NETWORK or e.spec.startswith("//") or (":" in e.spec and not e.spec.startswith("/")):
        return "a network filesystem, not on the DomU's disks"
    return None


def mounts_from_fstab(entries: list[FstabEntry], root: Filesystem,
                      facts: list[DiskFacts]) -> tuple[list[Mount], list[str]]:
    """Mounts for the filesystems the guest's fstab names (as mount -a would: of two lines for
    one mount point the later one is on top, so it wins); notes for the lines that place nothing.
    A filesystem it does not place goes to the hidden tree (with_unplaced)."""
    filesystems = mountable(facts)
    at: dict[str, Filesystem] = {}  # mount point -> filesystem, in the order mount -a mounts them
    notes = []
    for e in entries:
        if skipped_line(e) or not e.file.startswith("/"):
            continue
        mp = os.path.normpath(e.file)
        if ".." in mp.split("/"):
            notes.append(f"fstab entry {e.spec} {e.file}: refused ('..' in the mount point)")
            continue
        fs = resolve_spec(e.spec, filesystems)
        if fs is None:
            if spec_tag(e.spec) or e.spec.startswith("/dev/"):
                notes.append(f"fstab entry {e.spec} {e.file}: names no filesystem of this DomU's disks")
            continue
        if mp == "/":
            if fs.name != root.name:
                raise InspectError(
                    f"the guest's /etc/fstab mounts {fs.name} at /, but {root.name} was mounted as root",
                    hint=f'set mounts = {{ {fs.name} = "/" }} in the [domu] section')
            continue
        if fs.name == root.name or fs in at.values():
            notes.append(f"fstab entry {e.spec} {e.file}: {fs.name} is mounted at "
                         f"{'/' if fs.name == root.name else next(m for m, f in at.items() if f == fs)} already")
            continue
        if mp in at:
            notes.append(f"fstab: {at[mp].name} and {fs.name} both at {mp}: {fs.name}, the later line, "
                         "is on top (as mount -a does)")
        at[mp] = fs
    return with_unplaced(sort_mounts([Mount(root, "/")] + [Mount(fs, mp) for mp, fs in at.items()]), facts), notes


def fallback_mounts(facts: list[DiskFacts]) -> list[Mount]:
    """No fstab and no config: every filesystem under a directory named after it (/xvda1, /xvdb)."""
    return [Mount(fs, "/" + fs.name) for fs in mountable(facts)]


def sort_mounts(mounts: list[Mount]) -> list[Mount]:
    """Parents before children: "/" first, then by depth, then by path."""
    return sorted(mounts, key=lambda m: (0 if m.mountpoint == "/" else m.mountpoint.count("/"), m.mountpoint))
