"""The planner: facts + settings -> ordered Steps, each with its undo. Pure.

A backup opens, in this order: snapshots of every disk (the freeze window covers only these),
partition mappings, read-only mounts under SOURCE_PREFIX/DOMU (root first, parents before
children), then on each peer the same mappings and read-write mounts of the replica LVs under
TARGET_PREFIX/DOMU, then one rsync per peer. Teardown runs the undos in exact reverse."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field, replace

from . import commands as cmd
from . import points as pts
from .config import Settings
from .errors import InspectError
from .layout import FSTAB, UNPLACED, fallback_mounts, mountable, mounts_from_config, mounts_from_fstab, root_candidate, sort_mounts
from .model import LOCAL, DiskFacts, Filesystem, Mount, Step
from .parsers import parse_fstab

LOCAL_OPTIONS = ("ro", "nodev", "nosuid", "noexec", "nosymfollow")
PEER_OPTIONS = ("rw", "nodev", "nosuid", "noexec", "nosymfollow")


@dataclass
class Plan:
    domu: str
    steps: list[Step] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "xvdc: reason"
    notes: list[str] = field(default_factory=list)
    mounts: list[Mount] | None = None  # where each filesystem goes; None: decided by the guest's fstab
    after: list[Step] = field(default_factory=list)  # once the run ended OK and was torn down: the points phase

    def to_json(self) -> list[dict]:
        return [s.to_json() for s in self.steps] + [dict(s.to_json(), after_teardown=True) for s in self.after]


# --- steps --------------------------------------------------------------------------------

def snapshot_name(settings: Settings, lv: str) -> str:
    return lv + settings.snapshot_suffix


def snapshot_steps(facts: list[DiskFacts], settings: Settings) -> list[Step]:
    """A thick snapshot of each disk; of a thin disk in blocks mode a thin one (thin_steps)."""
    return [Step("snapshot", LOCAL, cmd.lvcreate_thin_snapshot(f.lv.vg, f.lv.lv, snapshot_name(settings, f.lv.lv))
                 if thin_blocks(f) else cmd.lvcreate_snapshot(f.lv.vg, f.lv.lv, snapshot_name(settings, f.lv.lv),
                                                              settings.snapshot_size),
                 cmd.lvremove(f.lv.vg, snapshot_name(settings, f.lv.lv)),
                 note=f"{f.disk.target}: {'thin ' if thin_blocks(f) else ''}snapshot of {f.lv.path or f.lv.lv}")
            for f in facts]


def _lv_name(f: DiskFacts, settings: Settings, snapshot: bool) -> str:
    return snapshot_name(settings, f.lv.lv) if snapshot else f.lv.lv


def mapped(f: DiskFacts) -> bool:
    """A disk's partitions are mapped when it has a partition table and a filesystem to copy."""
    return f.partitioned and any(fs.skip_reason is None for fs in f.filesystems)


def map_steps(facts: list[DiskFacts], settings: Settings, host: str, *, snapshot: bool) -> list[Step]:
    steps = []
    phase = "map" if host == LOCAL else "peer-map"
    for f in facts:
        if not mapped(f):
            continue
        dev = cmd.lv_path(f.lv.vg, _lv_name(f, settings, snapshot))
        sep = settings.kpartx_separator
        steps.append(Step(phase, host, cmd.kpartx_add(dev, sep), cmd.kpartx_delete(dev, sep),
                          note=f"{f.disk.target}: map partitions of {dev}"))
    return steps  # `kpartx -s` returns once udev has made the devices: no `udevadm settle`


def device_of(fs: Filesystem, facts: list[DiskFacts], settings: Settings, *, snapshot: bool) -> str:
    f = next(f for f in facts if f.disk.target == fs.disk)
    lv = _lv_name(f, settings, snapshot)
    if fs.partition is None:
        return cmd.lv_path(f.lv.vg, lv)
    return cmd.partition_device(f.lv.vg, lv, settings.kpartx_separator, fs.partition)


def tree_root(settings: Settings, domu: str, host: str, tree: str = "") -> str:
    """Where DOMU's tree is on HOST: PREFIX/DOMU, or for the unplaced filesystems the hidden
    PREFIX/.DOMU.unplaced beside it (a DomU name never starts with a dot)."""
    prefix = settings.source_prefix if host == LOCAL else settings.target_prefix
    return os.path.join(prefix, f".{domu}.{tree}" if tree else domu)


def mount_options(fstype: str, *, local: bool, read_only: bool = False) -> tuple[str, ...]:
    """Options of every guest and replica mount: a filesystem the guest made cannot bring
    devices, setuid programs, executables or symlinks into the Dom0's path lookups, and an
    ext2/3/4 superblock set to errors=panic does not panic the Dom0 (errors=remount-ro wins
    over the superblock's setting; xfs has no such option: it shuts the filesystem down on
    corruption, and panics only if the Dom0's own sysctl fs.xfs.panic_mask asks for it)."""
    options = LOCAL_OPTIONS if local or read_only else PEER_OPTIONS
    if fstype in ("ext2", "ext3", "ext4"):
        options += ("errors=remount-ro",)
    if fstype == "xfs" and local:
        options += ("nouuid",)  # a snapshot shares its origin's UUID
    return options


def mount_steps(mounts: list[Mount], facts: list[DiskFacts], settings: Settings, domu: str, host: str,
                *, with_root_dir: bool = True, read_only: bool = False, tree: str = "") -> list[Step]:
    """mkdir of the tree root (undo rmdir), then one mount per filesystem in the given order,
    each mount point resolved inside the tree without following symlinks (safepath); on the
    peer a missing mount point directory is made (the guest may have made it since the last
    night: rsync brings it only after the mount)."""
    local = host == LOCAL
    root = tree_root(settings, domu, host, tree)
    phase = "mount" if local else "peer-mount"
    steps = []
    if with_root_dir:
        steps.append(Step(phase, host, cmd.mkdir(root), cmd.rmdir(root), note=f"tree root of {domu}"))
    for m in mounts:
        fstype = m.filesystem.fstype
        dev = device_of(m.filesystem, facts, settings, snapshot=local)
        options = mount_options(fstype, local=local, read_only=read_only)
        steps.append(Step(phase, host, cmd.mount_in(root, m.mountpoint, dev, fstype, options, mkdir=not local),
                          cmd.umount_in(root, m.mountpoint, dev),
                          note=f"{m.filesystem.name} ({fstype}) at {m.mountpoint}"))
    return steps


def trees(mounts: list[Mount]) -> tuple[str, ...]:
    """The trees MOUNTS fill: the guest's (""), and the unplaced one when it has a filesystem."""
    return ("",) + ((UNPLACED,) if any(m.tree == UNPLACED for m in mounts) else ())


def transfer_steps(settings: Settings, domu: str, peers: tuple[str, ...], *, progress=False,
                   extra: tuple[str, ...] = (), trees: tuple[str, ...] = ("",)) -> list[Step]:
    """One rsync per peer and tree; the job's "transfer" callback judges each."""
    return [Step("transfer", LOCAL, cmd.rsync(tree_root(settings, domu, LOCAL, tree), peer,
                                              tree_root(settings, domu, peer, tree), settings.rsync, settings.ssh,
                                              progress=progress, extra=extra), None,
                 note=f"mirror to {peer}" + (" the filesystems the guest's layout does not place" if tree else ""),
                 then="transfer", timeout=settings.rsync.timeout or 7 * 24 * 3600, about=(peer, tree))
            for peer in peers for tree in trees]


VERIFY_ARGS = ("--dry-run", "--checksum", "--out-format=%i %n")
MISSING = None  # the guest's fstab, when the root filesystem has none


def check(host: str, name: str, *words: str, note: str, waits: tuple[str, ...] = (), mark: str = "") -> Step:
    return Step("check", host, (), note=note, check=(name, *words), waits=waits, mark=mark)


def _mark_last(steps: list[Step], mark: str) -> list[Step]:
    return steps[:-1] + [replace(steps[-1], mark=mark)] if steps else steps


BLOCKS = "blocks"  # the table label of a disk copied as blocks (jobs/blocks.py blocks_facts)


def is_blocks(f: DiskFacts) -> bool:
    return f.table.label == BLOCKS


def thin_blocks(f: DiskFacts) -> bool:
    """A thin disk in blocks mode: thin snapshots, and thin_delta against a kept base."""
    return is_blocks(f) and f.lv.is_thin


def base_name(lv: str) -> str:
    """The thin snapshot of a thin disk kept from its last OK blocks-mode run (hosts/thin.py)."""
    return f"{lv}.dbkbase"


def thin_steps(facts: list[DiskFacts], settings: Settings, peers, bases) -> list[Step]:
    """This host's steps for the thin disks of FACTS in blocks mode: with a base (BASES: {disk:
    its generation}, known to match the digests kept for a replica) `thin-delta` tells the
    ranges that changed since it (the "delta" callback: only those blocks are read); once
    every peer received the disk, `thin-base` makes this run's snapshot the next base (the
    step closes the snapshot's: no lvremove of it in the teardown)."""
    steps = []
    for f in facts:
        if not thin_blocks(f):
            continue
        disk, snap, base = f.disk.target, f"{f.lv.vg}/{snapshot_name(settings, f.lv.lv)}", f"{f.lv.vg}/{base_name(f.lv.lv)}"
        if disk in (bases or {}):
            steps.append(Step("delta", LOCAL, cmd.thin_delta(base, snap), None, then="delta", waits=("snapshots",),
                              mark=f"delta:{disk}", about=(disk,),
                              note=f"{disk}: the ranges of {snap} that differ from the base {base} (thin_delta)"))
        steps.append(Step("base", LOCAL, cmd.thin_base(snap, base), None, then="based", about=(disk,),
                          waits=tuple(f"sent:{disk}:{p}" for p in peers),
                          closes=cmd.lvcreate_thin_snapshot(f.lv.vg, f.lv.lv, snapshot_name(settings, f.lv.lv)),
                          note=f"{disk}: {snap} becomes {base}, the base of the next run (it stays)"))
    return steps


def block_steps(domu: str, peer: str, facts: list[DiskFacts], settings: Settings, *, waits=(), tokens=None,
                bases=None) -> list[Step]:
    """On PEER for the blocks-mode disks FACTS: their replicas checked (once WAITS are
    reached), then for each disk the digests of its replica (``same`` when its write token is
    still the one TOKENS {(peer, disk): token} kept here) and its changed blocks streamed into
    `receive-blocks` (the first once the snapshots exist; a thin disk's once thin_steps' delta
    is known). The job's callbacks "digests" and "blocks" judge them, its feed streams the
    snapshot (jobs/blocks.py)."""
    steps = [check(peer, "block-replicas", waits=waits,
                   note=f"the blocks-mode replica LVs on {peer} exist, are closed and as large as the origins "
                        "(one whose disk grew is extended first)")]
    for i, f in enumerate(facts):
        target, size = cmd.lv_path(f.lv.vg, f.lv.lv), f.lv.size
        snap = cmd.lv_path(f.lv.vg, snapshot_name(settings, f.lv.lv))
        token = (tokens or {}).get((peer, f.disk.target))
        steps += [Step("digests", peer, cmd.block_digests(target, size, token), None, then="digests",
                       timeout=24 * 3600, about=(f.disk.target,),
                       note=f"{f.disk.target}: the digest of each block of {target}" + (
                           ", or `same` if nothing wrote to it since the last run" if token else
                           " (none kept here from an earlier run)")),
                  Step("blocks", peer, cmd.receive_blocks(target, size), None, then="blocks", timeout=24 * 3600,
                       waits=(("snapshots",) if i == 0 else ()) + ((f"delta:{f.disk.target}",)
                                                                   if f.disk.target in (bases or {}) else ()),
                       mark=f"sent:{f.disk.target}:{peer}" if thin_blocks(f) else "", about=(f.disk.target,),
                       note=f"{f.disk.target}: the changed blocks of {snap} -> {peer}:{target}")]
    return steps


def block_verify_steps(domu: str, facts: list[DiskFacts], settings: Settings, peers) -> list[Step]:
    """`verify` of blocks-mode disks: each snapshot here and each replica on its peer read
    whole (`block-digests` without a token: nothing kept is trusted), compared block by block
    by the job's "compare" callback; nothing is written."""
    steps = []
    for i, f in enumerate(facts):
        snap = cmd.lv_path(f.lv.vg, snapshot_name(settings, f.lv.lv))
        steps.append(Step("digests", LOCAL, cmd.block_digests(snap, f.lv.size, None), None, then="compare",
                          timeout=24 * 3600, waits=("snapshots",) if i == 0 else (), about=(f.disk.target,),
                          note=f"{f.disk.target}: the digest of each block of {snap}"))
    for peer in peers:
        steps.append(check(peer, "block-replicas", waits=("checked",),
                           note=f"the blocks-mode replica LVs on {peer} exist, are closed and as large as the origins"))
        steps += [Step("digests", peer, cmd.block_digests(cmd.lv_path(f.lv.vg, f.lv.lv), f.lv.size, None), None,
                       then="compare", timeout=24 * 3600, about=(f.disk.target,),
                       note=f"{f.disk.target}: the digest of each block of {cmd.lv_path(f.lv.vg, f.lv.lv)}")
                  for f in facts]
    return steps


def plan_backup(domu: str, facts: list[DiskFacts], settings: Settings, peers: tuple[str, ...], *,
                mounts: list[Mount] | None = None, skipped: list[str] = (), progress=False,
                verify=False, frozen=False, fstab: str | None | bool = False, tokens=None, bases=None) -> Plan:
    """The whole backup (or verify) as lanes: this host's (LOCAL) and each peer's.
    Without `mounts` (and without config mounts) the plan mounts the root candidate and its
    "inspect" step reads the guest's /etc/fstab: a decision, whose steps (the other mounts on
    both hosts, the transfers) follow at run time (`after_fstab`). Given ``fstab`` (its text,
    or MISSING) the plan holds them too: the plan as the run decided it. The disks of FACTS
    in blocks mode (a mixed DomU) are snapshotted with the others, and copied by block_steps
    in each peer's lane (TOKENS: theirs)."""
    blocks = [f for f in facts if is_blocks(f)]
    plan = Plan(domu, skipped=[*skipped, *(f"{fs.name}: {fs.skip_reason}" for f in facts for fs in f.filesystems
                                           if fs.skip_reason)])
    if not mountable(facts):
        raise InspectError(f"{domu}: no filesystem to copy on any disk",
                           hint="check the disks in the plan's skipped list")
    local = snapshots_checked(facts, settings)
    local += [check(LOCAL, "snapshot", f.disk.target, note=f"{f.disk.target}: the snapshot holds what was probed")
              for f in facts if mapped(f) or (not f.partitioned and mountable([f]))]
    local += map_steps(facts, settings, LOCAL, snapshot=True)
    # On a peer nothing is opened before this host's checks passed ("checked"); with a freeze
    # window, nothing of ours competes with it: the peer waits for the snapshots.
    waits = ("snapshots",) if frozen else ("checked",)
    replicas = [(f.lv.vg, f.lv.lv) for f in facts]
    lanes = [s for peer in peers for s in (peer_checks(domu, peer, waits=waits, frozen=frozen)
                                           + ([] if verify else [pts.mark_writing(domu, peer, replicas)])
                                           + map_steps(facts, settings, peer, snapshot=False)
                                           + (block_steps(domu, peer, blocks, settings, waits=waits, tokens=tokens,
                                                          bases=bases) if blocks and not verify else []))]
    if blocks and not verify:
        lanes += thin_steps(blocks, settings, peers, bases)
    if blocks and verify:
        lanes += block_verify_steps(domu, blocks, settings, peers)
    if not verify:
        plan.after = after_ok(domu, settings, peers, replicas)
    if mounts is None and settings.mounts:
        mounts = mounts_from_config(facts, settings)
    root = root_candidate(facts, settings) if mounts is None else None
    if mounts is None and root is None:
        mounts = fallback_mounts(facts)
        plan.notes.append("no Linux root filesystem found: each filesystem goes under a directory "
                          "named after its disk and partition")
    plan.mounts = mounts
    if mounts is not None:
        local += tree_steps(mounts, facts, settings, domu, LOCAL)
        rest = after_mounts(mounts, facts, settings, domu, peers, progress=progress, verify=verify)
    else:
        local += mount_steps([Mount(root, "/")], facts, settings, domu, LOCAL)
        local.append(Step("inspect", LOCAL, cmd.read_in(tree_root(settings, domu, LOCAL), FSTAB), None,
                          note="read the guest's /etc/fstab: the other mounts on both hosts follow from it",
                          then="fstab"))
        others = [fs.name + f" ({fs.fstype})" for fs in mountable(facts) if fs.name != root.name]
        plan.notes.append(f"root candidate {root.name} ({root.fstype}); mount points of "
                          f"{', '.join(others) or 'no other filesystem'} come from the guest's /etc/fstab "
                          "at run time (without one, each goes under /<disk><partition>)")
        rest = []
        if fstab is not False:
            decided = fallback_mounts(facts) if fstab is MISSING else mounts_from_fstab(parse_fstab(fstab), root,
                                                                                         facts)[0]
            rest = after_fstab(decided, facts, settings, domu, peers, missing=fstab is MISSING,
                               progress=progress, verify=verify)
    plan.steps = local + lanes + rest
    return plan


def snapshots_checked(facts, settings) -> list[Step]:
    """This host's checks (reaching "checked"), then the snapshots (reaching "snapshots")."""
    return [check(LOCAL, "vg-space", note="the volume groups have room for the snapshots"),
            check(LOCAL, "no-stale", note="no snapshot or mount left from an earlier run", mark="checked"),
            *_mark_last(snapshot_steps(facts, settings), "snapshots")]


def after_ok(domu, settings, peers, replicas) -> list[Step]:
    """Once a run ended OK and was torn down: on each peer a restore point of the complete
    replicas (with [retention]), or, for a mirror, only their `dbk:writing` mark cleared."""
    return [pts.listing(domu, peer) if settings.retention is not None else pts.unmark_writing(peer, replicas)
            for peer in peers]


def after_fstab(mounts, facts, settings, domu, peers, *, missing: bool, progress=False, verify=False) -> list[Step]:
    """The steps that follow from the guest's fstab once the root is mounted and the fstab
    read: the other mounts here (without an fstab: the root mount taken back, each filesystem
    under /<disk><partition>), then `after_mounts`."""
    if missing:
        root_mount = mount_steps([Mount(root_candidate(facts, settings), "/")], facts, settings, domu, LOCAL,
                                 with_root_dir=False)[0]
        local = [Step("mount", LOCAL, root_mount.undo, None, note="no /etc/fstab: take the root mount back",
                      closes=root_mount.argv)]
        local += tree_steps(mounts, facts, settings, domu, LOCAL)[1:]  # the tree root is there already
    else:
        local = (mount_steps([m for m in mounts[1:] if m.tree != UNPLACED], facts, settings, domu, LOCAL,
                             with_root_dir=False)
                 + unplaced_steps(mounts, facts, settings, domu, LOCAL))
    return local + after_mounts(mounts, facts, settings, domu, peers, progress=progress, verify=verify)


def after_mounts(mounts, facts, settings, domu, peers, *, progress=False, verify=False) -> list[Step]:
    """Once the mounts are known: each peer mounts its replica (read-only for a verify), this
    host checks that the replicas have room, with restore points each peer gives its thick
    points room for what the run may write (a decision: points.size_points), then one rsync
    per peer and tree."""
    sized = settings.retention is not None and not verify
    steps = []
    for peer in peers:
        steps += _mark_last(tree_steps(mounts, facts, settings, domu, peer, read_only=verify), f"ready:{peer}")
        if sized:  # once the room is known, before the first rsync: thick restore points get room
            steps.append(Step("point-size", peer, pts.lvs_of(domu), None, then="point-size", waits=("room",),
                              mark=f"sized:{peer}", note=f"thick restore points on {peer} get room for what this "
                                                         "run may write (decided from the mounts' figures)"))
    local = [] if verify else [check(LOCAL, "room", note="each replica filesystem can hold what its source holds",
                                     waits=tuple(f"ready:{p}" for p in peers), mark="room" if sized else "")]
    local += transfer_steps(settings, domu, peers, progress=progress and not verify,
                            extra=VERIFY_ARGS if verify else (), trees=trees(mounts))
    if verify:  # every peer mounted
        local[0] = replace(local[0], waits=tuple(f"ready:{p}" for p in peers))
    elif sized:  # and its points sized
        local[1] = replace(local[1], waits=tuple(f"sized:{p}" for p in peers))
    return steps + local


def peer_checks(domu: str, peer: str, *, waits: tuple[str, ...] = (), frozen=False) -> list[Step]:
    """The DomU does not run on the peer (asked at once: it overlaps this host's work, unless
    FROZEN), then, once WAITS are reached, the replicas are checked (what follows may open
    something)."""
    return [check(peer, "peer-state", note=f"{domu} is not running on {peer}", waits=waits if frozen else ()),
            check(peer, "replicas", note=f"the replica LVs on {peer} exist, are closed and match", waits=waits)]


def plan_fsck(domu: str, facts: list[DiskFacts], settings: Settings, peers: tuple[str, ...]) -> Plan:
    """On each peer: its checks, the replica's partitions mapped, a read-only check of each
    filesystem (judged by the job's "fsck" callback), unmapped at teardown."""
    plan = Plan(domu)
    for peer in peers:
        plan.steps += peer_checks(domu, peer) + map_steps(facts, settings, peer, snapshot=False)
        for fs in mountable(facts):
            argv = cmd.fsck_readonly(fs.fstype, device_of(fs, facts, settings, snapshot=False))
            if argv is not None:
                plan.steps.append(Step("fsck", peer, argv, None, note=f"{fs.name} ({fs.fstype})", then="fsck"))
    return plan


def tree_steps(mounts, facts, settings, domu, host, read_only=False) -> list[Step]:
    """Mounts with a root fs go straight into the tree root; fallback mounts get their own dirs;
    then the unplaced filesystems, each in its own directory of the hidden tree."""
    guest = [m for m in mounts if m.tree != UNPLACED]
    steps = [] if not guest else (
        mount_steps(sort_mounts(guest), facts, settings, domu, host, read_only=read_only)
        if any(m.mountpoint == "/" for m in guest) else _dir_steps(guest, facts, settings, domu, host, read_only, ""))
    return steps + unplaced_steps(mounts, facts, settings, domu, host, read_only)


def unplaced_steps(mounts, facts, settings, domu, host, read_only=False) -> list[Step]:
    unplaced = [m for m in mounts if m.tree == UNPLACED]
    return _dir_steps(unplaced, facts, settings, domu, host, read_only, UNPLACED) if unplaced else []


def _dir_steps(mounts, facts, settings, domu, host, read_only, tree) -> list[Step]:
    """The tree root, then for each mount a directory of its own (undo rmdir) and the mount."""
    root = tree_root(settings, domu, host, tree)
    steps = [Step("mount" if host == LOCAL else "peer-mount", host, cmd.mkdir(root), cmd.rmdir(root),
                  note=f"tree root of {domu}" + (" for the filesystems its layout does not place" if tree else ""))]
    for m in sort_mounts(mounts):
        d = root + m.mountpoint
        steps.append(Step(steps[0].phase, host, cmd.mkdir(d), cmd.rmdir(d), note=f"directory for {m.filesystem.name}"))
        steps += mount_steps([m], facts, settings, domu, host, with_root_dir=False, read_only=read_only, tree=tree)
    return steps


def teardown_order(steps: list[Step]) -> list[tuple[str, tuple[str, ...]]]:
    """(host, undo argv) in the order teardown runs them on each host: exact reverse of the
    open steps, but for a step that a later step closed already (Step.closes)."""
    closed = {(s.host, s.closes) for s in steps if s.closes is not None}
    return [(s.host, s.undo) for s in reversed(steps) if s.undo is not None and (s.host, s.argv) not in closed]


def describe(plan: Plan) -> str:
    """The plan for a person: each host's lane in order (the lanes run at the same time; a step
    that waits for a mark starts once a step of any lane reached it)."""
    lines = [f"Plan for {plan.domu}:"]
    for host in dict.fromkeys(s.host for s in plan.steps):
        lines.append(f"  on {host}:")
        for i, s in enumerate((s for s in plan.steps if s.host == host), 1):
            what = "check " + " ".join(s.check) if s.check else shlex.join(s.argv)
            lines.append(f"{i:5}. [{s.phase}] {what}" + (f"   (after {', '.join(s.waits)})" if s.waits else ""))
            for label, value in (("#", s.note), ("undo:", s.undo and shlex.join(s.undo)),
                                 ("decides:", s.then if s.then in ("fstab", "points", "point-size") else ""),
                                 ("reaches:", s.mark)):
                if value:
                    lines.append(f"         {label} {value}")
    for s in plan.skipped:
        lines.append(f"  skipped: {s}")
    for n in plan.notes:
        lines.append(f"  note: {n}")
    undo = teardown_order(plan.steps)
    if undo:
        lines.append("Teardown (each host in reverse order, the hosts at once):")
        for host, u in undo:
            lines.append(f"     on {host}: {shlex.join(u)}")
    if plan.after:
        lines.append("Then, once the run ended OK and nothing is mounted"
                     + (" (restore points, [retention]):" if any(s.then for s in plan.after) else ":"))
        for s in plan.after:
            lines += [f"     on {s.host}: [{s.phase}] {shlex.join(s.argv)}", f"         # {s.note}"]
            lines += [f"         decides: {s.then}"] if s.then else []
    return "\n".join(lines)
