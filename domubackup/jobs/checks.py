"""The checks of a run, each a fact read with read-only probes (raises when it fails), and the
snapshot watch that polls the snapshots' fill level during the transfer."""

from __future__ import annotations

import logging
import re
import threading

from ..core import commands as cmd, layout, parsers, plan as planner
from ..core.errors import InspectError, PeerError, SnapshotError
from ..hosts.facts import layout_differences, list_lvs, probe_disk
from ..core.model import LOCAL

log = logging.getLogger("domubackup")

UNITS = {"b": 1, "s": 512, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5, "e": 1024**6}


def size_bytes(size: str, origin: int, vg_size: int | None = None) -> int:
    """Bytes that `lvcreate --size SIZE` (default unit MiB) or `--extents N%ORIGIN` takes."""
    m = re.fullmatch(r"(\d+)%ORIGIN", size)
    if m:
        return origin * int(m.group(1)) // 100
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([bBsSkKmMgGtTpPeE]?)", size)
    if not m:  # %VG / %FREE: LVM checks the space itself
        return 0
    return int(float(m.group(1)) * UNITS[(m.group(2) or "m").lower()])


def mib(n: int) -> str:
    return f"{n / 1024**2:.1f} MiB"


def check_vg_space(facts, settings) -> None:
    need: dict[str, int] = {}
    for f in facts:
        need[f.lv.vg] = need.get(f.lv.vg, 0) + size_bytes(settings.snapshot_size, f.lv.size)
    free = {f.lv.vg: f.lv.vg_free for f in facts if f.lv.vg_free is not None}
    for vg, n in need.items():
        if vg in free and free[vg] < n:
            raise SnapshotError(f"volume group {vg} has {mib(free[vg])} free, the snapshots need {mib(n)}: "
                                f"{mib(n - free[vg])} missing",
                                hint="free space in the VG or lower snapshot_size")


def check_room(space, mounts, settings, domu, peers) -> None:
    """Before the transfer: each replica filesystem must be able to hold what its source holds
    (bytes and inodes, as the mounts told them: session.space), else nothing is written."""
    problems = []
    for m in mounts:
        src = space.get((LOCAL, planner.tree_root(settings, domu, LOCAL, m.tree), m.mountpoint))
        for peer in peers:
            dst = space.get((peer, planner.tree_root(settings, domu, peer, m.tree), m.mountpoint))
            if src is None or dst is None:
                continue  # not told (a helper that tells no figures)
            what = f"{m.filesystem.name} ({m.filesystem.fstype}, {m.mountpoint}) on {peer}"
            if src.used > dst.used + dst.free:
                problems.append(f"the replica of {what} has room for {mib(dst.used + dst.free)} "
                                f"({mib(dst.free)} free now), the source holds {mib(src.used)}")
            if dst.inodes and src.inodes_used > dst.inodes:
                problems.append(f"the replica of {what} has {dst.inodes} inodes, the source uses {src.inodes_used}")
    if problems:
        raise PeerError(f"{domu}: the replica is too small, nothing was written: " + "; ".join(problems),
                        hint=f"grow the replica filesystem on the peer, or re-seed it (`domubackup seed {domu}`)")


def check_no_stale(insp, settings, local, domu) -> None:
    known = {(lv.vg, lv.lv) for lv in insp.lvs} if insp.lvs is not None else None
    for f in insp.facts:
        name = planner.snapshot_name(settings, f.lv.lv)
        snap = cmd.lv_path(f.lv.vg, name)
        exists = ((f.lv.vg, name) in known if known is not None  # the inspection listed every LV of this VG
                  else local.run(parsers.lvs_argv(snap), check=False).exit_code == 0)
        if exists:
            raise SnapshotError(f"{domu}: a snapshot {snap} already exists and no journal explains it",
                                hint=f"check it is not in use, then remove it with `lvremove {snap}`")
    roots = [planner.tree_root(settings, domu, LOCAL, tree) for tree in ("", layout.UNPLACED)]
    mounted = [m.target for m in parsers.parse_findmnt(local.run(parsers.findmnt_argv()).stdout)
               if any(m.target == root or m.target.startswith(root + "/") for root in roots)]
    if mounted:
        raise InspectError(f"{domu}: something is already mounted under {' or '.join(roots)}: {', '.join(mounted)}",
                           hint=f"unmount it or run `domubackup cleanup {domu}`")


def check_peer_state(domu, settings, peer, runner) -> None:
    """The DomU must not run on the peer (asks the peer's libvirt)."""
    res = runner.run(cmd.virsh_domstate(settings.libvirt_uri, domu), check=False)
    state = res.stdout.strip()
    if res.exit_code == 0 and state not in ("shut off", "crashed"):
        raise PeerError(f"{domu} is {state} on {peer}: refusing to overwrite the disks of a live DomU",
                        hint=f"make sure {domu} runs on one Dom0 only")


def check_replicas(domu, facts, peer, runner) -> list:
    """The replica LVs on the peer must exist, be closed and match ``facts`` (this host's)."""
    peer_facts, diffs = [], []
    lvs = list_lvs(runner, [cmd.lv_path(f.lv.vg, f.lv.lv) for f in facts])
    for f in facts:
        path = cmd.lv_path(f.lv.vg, f.lv.lv)
        try:
            pf = probe_disk(runner, f.disk, path=path, lvs=lvs)
        except InspectError as e:
            raise PeerError(f"{domu}: replica {path} on {peer}: {e.message}",
                            hint=f"create and seed it: `domubackup seed {domu}`") from None
        if pf.lv.is_open:
            raise PeerError(f"{domu}: replica {path} is open on {peer} (in use by a guest or a mount)",
                            hint="find the user with `lsblk` / `dmsetup info` there")
        diffs += layout_differences(f, pf)
        peer_facts.append(pf)
    if diffs:
        raise PeerError(f"{domu}: the replica on {peer} does not match: " + "; ".join(diffs),
                        hint=f"re-seed it with `domubackup seed {domu}`")
    return peer_facts


def next_poll(delay: float, before: float | None, now: float, extend_at: float,
              base: float = 2.0, most: float = 10.0) -> float:
    """Seconds until the next look at the snapshots, from the last two fill levels (%): twice
    as long while the fill does not grow (at most ``most``, like LVM's own dmeventd monitor),
    else a quarter of the time the fill needs to reach ``extend_at`` at its last rate (at
    least ``base``)."""
    if before is None or now <= before:
        return min(delay * 2, most)
    rate = (now - before) / delay
    return max(base, min(most, (extend_at - now) / rate / 4))


class SnapshotWatch:
    """Polls the snapshots' fill level while the transfer runs (see next_poll: less often while
    it does not grow, each poll being a process that competes with the transfer); extends them
    or stops the run."""

    def __init__(self, runner, paths, settings, interval=2.0, on_abort=None):
        self.runner, self.paths, self.settings = runner, paths, settings
        self.interval, self.on_abort = interval, on_abort
        self.peak = 0.0
        self.fill: float | None = None  # the fullest snapshot at the last look, %
        self.extended = False  # the last look extended a snapshot
        self.problem: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join()

    def check(self, final: bool = False):
        """One look at every snapshot (one `dmsetup status` for all); returns a problem or None.
        `final` (after the transfer): only an invalid snapshot is a problem, there is nothing
        left to protect by extending."""
        res = self.runner.run(parsers.dm_snapshot_status_argv(), check=False, timeout=60)
        status = parsers.parse_dm_snapshot_status(res.stdout) if res.exit_code == 0 else {}
        self.fill, self.extended = 0.0, False
        for path in self.paths:
            vg, name = path.split("/")[-2:]
            use = status.get(cmd.dm_name(vg, name))
            if use is None:
                why = res.stderr.strip() or "not in `dmsetup status`"
                return f"snapshot {path} disappeared ({why})"
            self.peak = max(self.peak, use.percent)
            self.fill = max(self.fill, use.percent)
            if use.state != "valid" or use.percent >= 100.0:
                return f"snapshot {path} became invalid (100% full): its copy cannot be trusted"
            if use.percent >= self.settings.snapshot_extend_at and not final:
                problem = self.extend(path, use.percent)
                if problem:
                    return problem
        return None

    def _lv(self, path):
        """The LV at ``path`` (lvs), or why it cannot be known."""
        res = self.runner.run(parsers.lvs_argv(path), check=False, timeout=60)
        if res.exit_code != 0:
            return f"{path} disappeared ({res.stderr.strip()})"
        try:
            return parsers.parse_lvs(res.stdout)[0]
        except (ValueError, IndexError) as e:
            return f"cannot read the output of `lvs` for {path}: {e or 'no LV'}"

    def extend(self, path, pct) -> str | None:
        """Extend the snapshot by snapshot_extend_by; a problem when the VG has no room or the
        snapshot would grow past snapshot_extend_max (a size, or a share of its origin's)."""
        lv = self._lv(path)
        if isinstance(lv, str):
            return f"snapshot {lv}"
        need = size_bytes(self.settings.snapshot_extend_by, lv.size)
        most = self.settings.snapshot_extend_max
        origin = 0
        if most.endswith("%ORIGIN"):
            origin = self._lv(cmd.lv_path(lv.vg, lv.origin)) if lv.origin else f"{path} names no origin"
            if isinstance(origin, str):
                return f"snapshot {path} is {pct:.1f}% full and its origin's size is not known: {origin}"
            origin = origin.size
        cap = size_bytes(most, origin)
        if lv.size + need > cap:
            return (f"snapshot {path} is {pct:.1f}% full and has reached snapshot_extend_max ({most}"
                    + (f" = {mib(cap)}" if most.endswith("%ORIGIN") else "")
                    + f"): the guest writes faster than the snapshot may grow ({mib(lv.size)} now, "
                    f"{self.settings.snapshot_extend_by} more would pass it)")
        if lv.vg_free is None or lv.vg_free < need:
            return (f"snapshot {path} is {pct:.1f}% full and volume group {lv.vg} has no room "
                    f"to extend it by {self.settings.snapshot_extend_by}")
        log.warning("snapshot %s is %.1f%% full: extending by %s", path, pct, self.settings.snapshot_extend_by)
        self.runner.run(cmd.lvextend(lv.vg, lv.lv, self.settings.snapshot_extend_by), timeout=120)
        self.extended = True
        return None

    def _loop(self):
        delay, before = self.interval, None
        while not self._stop.wait(delay):
            try:
                problem = self.check()
                if self.extended:  # it grew fast enough to need more room: look again soon
                    delay, before = self.interval, None
                else:
                    delay, before = next_poll(delay, before, self.fill, self.settings.snapshot_extend_at,
                                              base=self.interval), self.fill
            except Exception as e:  # noqa: BLE001 - a watch that dies silently would leave the run unwatched
                problem = f"cannot watch the snapshots: {e}"
            if problem:
                self.problem = problem
                if self.on_abort:
                    self.on_abort()
                return
