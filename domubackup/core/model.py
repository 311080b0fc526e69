"""The model: frozen dataclasses, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

LOCAL = "local"  # the lane of this host in a plan and a journal (config refuses a Dom0 of that name)
PEER = "peer"  # the peer's lane in journals of older versions


@dataclass(frozen=True)
class Disk:
    """One <disk> of a domain's XML."""
    type: str  # block, file, network, volume, ...
    device: str  # disk, cdrom, floppy, lun
    source: str | None  # dev= or file= (or network name=)
    target: str  # xvda, vda, hda, ...
    bus: str | None = None
    driver_name: str | None = None  # phy, qemu, tap, ...
    driver_type: str | None = None  # raw, qcow2, ...
    protocol: str | None = None  # for network disks: rbd, iscsi, nbd, ...
    skip_reason: str | None = None  # set when this disk cannot be backed up


@dataclass(frozen=True)
class Domain:
    name: str
    state: str  # running, paused, shutoff, ...
    state_reason: int = 0
    hypervisor: str | None = None  # xen, kvm, test
    disks: tuple[Disk, ...] = ()
    xml: str = field(default="", repr=False, compare=False)  # as libvirt gave it (kept beside each restore point)


@dataclass(frozen=True)
class LogicalVolume:
    vg: str
    lv: str
    size: int  # bytes
    attr: str = ""  # lv_attr, e.g. -wi-ao----
    origin: str = ""  # non-empty for a snapshot
    snap_percent: float | None = None
    vg_free: int | None = None  # bytes free in the VG
    path: str = ""
    tags: frozenset[str] = frozenset()

    @property
    def is_snapshot(self) -> bool:
        return bool(self.origin) or self.attr[:1] in ("s", "S")

    @property
    def is_open(self) -> bool:
        return len(self.attr) > 5 and self.attr[5] == "o"

    @property
    def is_thin(self) -> bool:
        """A thin volume (of a thin pool; thin snapshots included)."""
        return self.attr[:1] == "V"


@dataclass(frozen=True)
class Partition:
    number: int
    start: int  # bytes
    end: int  # bytes, inclusive as parted prints it
    size: int  # bytes
    fs: str = ""  # parted's guess, may be empty
    name: str = ""
    flags: tuple[str, ...] = ()

    @property
    def is_extended(self) -> bool:
        # parted -m shows an msdos extended partition with no fs and flag "lba" or nothing;
        # the parser marks it explicitly.
        return "extended" in self.flags


@dataclass(frozen=True)
class PartitionTable:
    label: str  # msdos, gpt, loop (a filesystem on the whole disk), unknown
    size: int  # bytes of the device
    partitions: tuple[Partition, ...] = ()


@dataclass(frozen=True)
class Filesystem:
    """A filesystem found on a disk: a partition, or the whole disk (partition None)."""
    disk: str  # target dev of the disk, e.g. xvda
    partition: int | None
    fstype: str  # ext4, xfs, swap, vfat, LVM2_member, ...
    uuid: str = ""
    label: str = ""
    skip_reason: str | None = None
    partuuid: str = ""  # from the partition table (partx), filled in only when the fstab names one
    partlabel: str = ""

    @property
    def name(self) -> str:
        """The guest-style name: xvda1 for a partition, xvdb for a whole disk."""
        return self.disk if self.partition is None else f"{self.disk}{self.partition}"


@dataclass(frozen=True)
class DiskFacts:
    """What the read-only probes found out about one disk."""
    disk: Disk
    lv: LogicalVolume
    table: PartitionTable
    filesystems: tuple[Filesystem, ...] = ()

    @property
    def partitioned(self) -> bool:
        return self.table.label not in ("loop",)


@dataclass(frozen=True)
class Mount:
    filesystem: Filesystem
    mountpoint: str  # path inside the guest, "/" for root
    options: tuple[str, ...] = ()
    tree: str = ""  # "" the guest's tree; "unplaced": the tree of what the guest's layout does not place


@dataclass(frozen=True)
class Step:
    """One step of a plan, on one host's lane (executor.py runs it).

    A command (``argv``) and the command that undoes it (``undo``, journaled before the
    step runs), or, with ``check`` and no argv, a check by name (and its words) that the job
    carries out with its own read-only probes. ``waits``: marks of other steps (of any lane)
    that must be reached first; ``mark``: the mark this step reaches. ``then``: the name of
    the job's callback that judges the result (the exit code is not checked then) and may
    return further steps: a decision (the guest's fstab read says what is mounted next)."""
    phase: str  # check, snapshot, map, mount, peer-map, peer-mount, inspect, transfer, freeze, ...
    host: str  # LOCAL, or a peer's name
    argv: tuple[str, ...]
    undo: tuple[str, ...] | None = None
    note: str = ""
    check: tuple[str, ...] = ()
    waits: tuple[str, ...] = ()
    mark: str = ""
    then: str = ""
    closes: tuple[str, ...] | None = None  # argv of an earlier step whose undo this runs now
    timeout: float | None = None
    about: tuple[str, ...] = ()  # what a `then` step is about, for its callback: (peer, tree), (disk,)

    def to_json(self) -> dict:
        d = {"phase": self.phase, "host": self.host, "argv": list(self.argv),
             "undo": list(self.undo) if self.undo is not None else None, "note": self.note}
        for key in ("check", "waits", "mark", "then", "closes", "about"):
            if getattr(self, key):
                d[key] = list(getattr(self, key)) if key != "mark" and key != "then" else getattr(self, key)
        return d


@dataclass(frozen=True)
class FstabEntry:
    spec: str
    file: str
    vfstype: str
    options: tuple[str, ...] = ()
    freq: int = 0
    passno: int = 0


@dataclass(frozen=True)
class MountInfo:
    """One line of findmnt."""
    target: str
    source: str
    fstype: str
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class SnapshotUse:
    """One snapshot's fill level from device-mapper: sectors used of total, or a broken state."""
    name: str  # device-mapper name
    used: int
    total: int
    state: str = "valid"  # valid | invalid | overflow | merge failed | unknown

    @property
    def percent(self) -> float:
        return 100.0 if self.state != "valid" or not self.total else self.used * 100.0 / self.total


@dataclass(frozen=True)
class Space:
    """What a mounted filesystem holds and has room for, as `domubackup mount-in` tells it."""
    size: int  # bytes
    used: int
    free: int  # bytes free for root (rsync writes as root)
    inodes: int = 0  # 0: no fixed number (btrfs, vfat)
    inodes_used: int = 0


@dataclass(frozen=True)
class RsyncStats:
    files: int = 0  # Number of files
    files_transferred: int = 0  # Number of regular files transferred
    total_size: int = 0  # Total file size
    transferred_size: int = 0  # Total transferred file size
    bytes_sent: int = 0
    bytes_received: int = 0
    deleted: int = 0
    blocks_read: int = 0  # blocks mode: 4 MiB blocks read from the snapshots
    blocks_changed: int = 0  # of those, the ones sent to a replica


@dataclass(frozen=True)
class Result:
    """What one command did."""
    host: str
    argv: tuple[str, ...]
    exit_code: int
    stdout: str = ""
    stderr: str = ""
    duration: float = 0.0


@dataclass
class RunRecord:
    domu: str
    peer: str = ""
    status: str = "RUNNING"  # RUNNING, OK, ERROR, CORRUPT
    consistency: str = "crash"
    freeze_window_ms: int | None = None
    bytes_sent: int = 0
    files: int = 0
    total_size: int = 0
    snapshot_peak: float | None = None
    error: str = ""
    extra: dict = field(default_factory=dict)


# --- the catalog's records (catalog.py stores them, report.py shows them) -----------------

BACKUP, VERIFY, SEED = "backup", "verify", "seed"
# The commands on restore points that are recorded too (none of them makes a backup).
PRUNE, ROLLBACK, RESTORE, FAILOVER = "prune", "rollback", "restore", "failover"
KINDS = (BACKUP, VERIFY, SEED, PRUNE, ROLLBACK, RESTORE, FAILOVER)
# Kinds that leave a replica on the peer: what "last success" means for metrics.
REPLICA_KINDS = (BACKUP, SEED)

RUNNING, OK, PARTIAL, ERROR, CORRUPT = "RUNNING", "OK", "PARTIAL", "ERROR", "CORRUPT"
FINAL_STATUSES = (OK, PARTIAL, ERROR, CORRUPT)
STATUSES = (RUNNING, *FINAL_STATUSES)

CONSISTENCY_LEVELS = ("crash", "filesystem", "application")


@dataclass(frozen=True)
class RunRow:
    """One record of the catalog."""
    id: int
    kind: str
    domu: str
    peer: str
    host: str
    pid: int
    pid_start: int | None
    started: float
    ended: float | None
    status: str
    consistency: str | None
    freeze_window_ms: int | None
    bytes_sent: int
    files: int
    total_size: int
    snapshot_peak: float | None
    error: str
    log_path: str | None
    blocks_read: int = 0
    blocks_changed: int = 0

    @property
    def duration(self) -> float | None:
        """Seconds from start to end; None while running or when the end is unknown."""
        if self.ended is None:
            return None
        return self.ended - self.started


@dataclass(frozen=True)
class PointsRow:
    """The restore points of a DomU on a host, as the catalog last heard of them."""
    domu: str
    host: str
    points: int
    good: int
    newest_good: float | None  # the newest GOOD point's time, UTC epoch seconds; None: no good point
    updated: float  # when this was recorded
