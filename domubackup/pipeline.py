"""The only module that knows the order of the stages of a backup."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from . import virt
from .config import Config, check_domu_name
from .errors import NotEligibleError, NotHereError
from .facts import list_lvs, probe_disk
from .model import Domain, DiskFacts
from .plan import Plan, plan_backup

log = logging.getLogger("domubackup")


@dataclass
class Inspection:
    domain: Domain
    facts: list[DiskFacts]
    skipped: list[str]
    peers: tuple[str, ...]
    lvs: list | None = None  # every LV of the disks' VGs (list_lvs), None when not known


def check_host(config: Config) -> None:
    if config.this_host not in config.dom0s:
        raise NotEligibleError(f"this host {config.this_host!r} is not in dom0s {list(config.dom0s)} of {config.path}",
                               hint="add it to dom0s, or set this_host to its name there")


def inspect(config: Config, name: str, conn, runner, on_eligible=None) -> Inspection:
    """Eligibility (defined here, running, this host in DOM0S, a peer) and read-only facts.
    ``on_eligible()`` is called once the DomU is known to be eligible, before the probes."""
    check_host(config)
    settings = config.settings_for(name)
    dom = virt.lookup(conn, name)
    domain = virt.describe(dom, include=settings.disks, exclude=settings.exclude_disks)
    if domain.state not in virt.RUNNING_STATES:
        raise NotHereError(f"{name}: is {domain.state} on {config.this_host}, not running; nothing to back up here",
                               hint="it is backed up by the Dom0 it runs on")
    peers = config.peers_for(name)
    if not peers:
        raise config.no_peer(name)
    if on_eligible is not None:
        on_eligible()
    skipped = [f"{d.target}: {d.skip_reason}" for d in domain.disks if d.skip_reason]
    disks = sorted((d for d in domain.disks if d.skip_reason is None), key=lambda d: d.target)
    lvs = list_lvs(runner, [d.source for d in disks])
    facts = [probe_disk(runner, d, lvs=lvs) for d in disks]
    if not facts:
        raise NotEligibleError(f"{name}: no disk that can be backed up", hint="; ".join(skipped) or None)
    return Inspection(domain, facts, skipped, peers, lvs)


def make_plan(config: Config, insp: Inspection, *, progress=False) -> Plan:
    return plan_backup(insp.domain.name, insp.facts, config.settings_for(insp.domain.name), insp.peers,
                       skipped=insp.skipped, progress=progress)


# --- execution ----------------------------------------------------------------------------

import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import field

from . import commands as cmd
from . import parsers
from . import plan as planner
from .errors import (EXIT_BUSY, EXIT_NOT_ELIGIBLE, EXIT_PARTIAL, CommandError, DomuBackupError, FreezeError,
                     InspectError, PeerError,
                     SnapshotError, TeardownError)
from .facts import check_mappable, check_snapshot, layout_differences, with_partition_ids
from .journal import Journal
from .lock import DomuLock
from .model import LOCAL, RsyncStats, Step
from .safepath import EXIT_MISSING

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


@dataclass
class Outcome:
    domu: str
    status: str = "ERROR"  # OK, ERROR, CORRUPT, SKIPPED, BUSY
    exit_code: int = 1
    duration: float = 0.0
    stats: RsyncStats = field(default_factory=RsyncStats)
    snapshot_peak: float | None = None
    error: str = ""
    undone: list[str] = field(default_factory=list)
    freeze: object = None  # freeze report, when a freeze mode is configured
    differences: list[str] = field(default_factory=list)  # verify: rsync itemize lines
    not_here: bool = False  # not defined / not running on this host (another Dom0's job)
    not_copied: list[str] = field(default_factory=list)  # PARTIAL: what of the guest was left out, why

    def summary(self) -> str:
        from .report import human_bytes

        line = f"{self.domu}: {self.status} in {self.duration:.1f}s"
        if self.status in ("OK", "PARTIAL", "CORRUPT", "ERROR") and self.stats.files:
            line += (f", {self.stats.files} files, {human_bytes(self.stats.total_size)} total, "
                     f"{human_bytes(self.stats.bytes_sent)} sent")
        if self.snapshot_peak:
            line += f", snapshot peak {self.snapshot_peak:.1f}%"
        if self.freeze is not None and self.freeze.mode != "none":
            line += f"; {self.freeze.summary.split(': ', 1)[1]}"
        if self.not_copied:
            line += "; not copied: " + "; ".join(self.not_copied)
        if self.error:
            line += f": {self.error}"
        return line


PAUSE_ENV = "DOMUBACKUP_TEST_PAUSE"


def test_pause(phase: str, journal: Journal, paused: set) -> None:
    """Test-only: with DOMUBACKUP_TEST_PAUSE=PHASE[,PHASE...] the run stops before the first step
    of each named phase, creates STATE_DIR/pause/DOMU.PHASE and waits until that file is removed
    (at most 10 minutes), so that a test can look at, or kill, a run at a step boundary."""
    wanted = os.environ.get(PAUSE_ENV, "").split(",")
    if phase not in wanted or phase in paused:
        return
    paused.add(phase)
    d = os.path.join(os.path.dirname(os.path.dirname(journal.path)), "pause")
    os.makedirs(d, exist_ok=True)
    flag = os.path.join(d, f"{journal.domu}.{phase}")
    with open(flag, "w") as f:
        f.write(f"{os.getpid()}\n")
    log.warning("test pause before %s: waiting for %s to be removed", phase, flag)
    deadline = time.monotonic() + 600
    while os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.1)


class Session:
    """Runs open steps through the journal: recorded pending before they run, done after."""

    def __init__(self, journal: Journal, runners: dict, timeout: float):
        self.journal = journal
        self.runners = runners
        self.timeout = timeout
        self.paused: set[str] = set()
        self.space: dict[tuple[str, str, str], object] = {}  # (host, tree, path) -> Space of a mount made
        self.start_peers = lambda: None  # peer_session: start checking the peers (background)
        self.mount_peers = lambda mounts, read_only=False: None  # peer_session: what to mount there
        self.wait_peers = lambda: None  # peer_session: blocks until the peers are checked

    def open(self, step: Step, *, timeout: float | None = None, on_output=None):
        test_pause(step.phase, self.journal, self.paused)
        runner = self.runners[step.host]
        limit = timeout if timeout is not None else self.timeout
        if step.undo is None:
            return runner.run(step.argv, timeout=limit, on_output=on_output)
        i = self.journal.begin(step)
        result = runner.run(step.argv, timeout=limit, on_output=on_output)
        self.journal.done(i)
        self._note_space(step.host, [step.argv], result.stdout)
        return result

    def open_all(self, steps):
        """Open steps in order; a host's neighbouring safepath mounts of one tree run as one
        helper command (commands.batch_key), journaled before it like a single step."""
        steps, i = list(steps), 0
        while i < len(steps):
            key = cmd.batch_key(steps[i].argv)[0] if steps[i].argv[:2] == (cmd.HELPER, "mount-in") else None
            j = i + 1
            while key is not None and j < len(steps) and steps[j].host == steps[i].host \
                    and cmd.batch_key(steps[j].argv)[0] == key:
                j += 1
            if j - i == 1:
                self.open(steps[i])
            else:
                test_pause(steps[i].phase, self.journal, self.paused)
                recorded = self.journal.begin_many(steps[i:j])
                res = self.runners[steps[i].host].run(cmd.batched([s.argv for s in steps[i:j]]), timeout=self.timeout)
                self.journal.done_many(recorded)
                self._note_space(steps[i].host, [s.argv for s in steps[i:j]], res.stdout)
            i = j

    def _note_space(self, host, argvs, stdout) -> None:
        """Keep what the mounts of ARGVS (mount-in of one tree) said of their filesystems' space."""
        if argvs[0][:2] != (cmd.HELPER, "mount-in"):
            return
        tree, paths = cmd.batch_key(argvs[0])[0][-1], [cmd.batch_key(a)[1][0] for a in argvs]
        try:
            figures = parsers.parse_mount_space(stdout, paths)
        except ValueError as e:
            raise CommandError(host, argvs[0], 0, str(e), hint="the helper on that host is not this version of "
                                                               "domubackup: install the same version there") from None
        for path, space in zip(paths, figures):
            if space is not None:
                self.space[(host, tree, path)] = space

    def open_prerecorded(self, steps) -> None:
        """Open steps whose entries are already in the journal (`journal.begin_many`): only
        the commands run here; the caller marks them done."""
        for step in steps:
            test_pause(step.phase, self.journal, self.paused)
            self.runners[step.host].run(step.argv, timeout=self.timeout)

    def undo_last(self):
        """Undo and forget the newest entry (used to take back a tentative root mount)."""
        entry = self.journal.entries[-1]
        self.runners[entry.host].run(entry.undo, timeout=self.timeout)
        self.journal.entries.pop()
        self.journal._save()


def peer_runners(config, domu: str, peers, factory):
    ssh = config.settings_for(domu).ssh
    return {p: factory(p, ssh) for p in peers}


def ssh_runner(host, ssh):
    from .runner import SSHRunner

    return SSHRunner.for_host(host, ssh)


def recover(config, domu: str, local, factory=ssh_runner) -> list[str]:
    """Finish the teardown of a journal left by a dead run (the caller holds the lock)."""
    for tmp in Journal.sweep(config.state_dir, domu):
        log.warning("%s: removed %s, a journal write that a killed run left unfinished", domu, tmp)
    journal = Journal.load(config.state_dir, domu)
    if journal is None:
        return []
    journal.unseen()  # a dead run's mounts may be gone for good reasons (a reboot): not a failure
    hosts = {e.host for e in journal.entries if e.host != LOCAL}
    runners = {LOCAL: local, **peer_runners(config, domu, hosts, factory)}
    undone = [f"{e.host}: {' '.join(e.undo)}" for e in reversed(journal.entries) if e.undo]
    log.warning("%s: found the journal of a dead run (PID %s, started %s): undoing %d step(s)",
                domu, journal.pid, journal.started, len(undone))
    try:
        journal.teardown(runners)
    finally:
        for r in runners.values():
            if r is not local:
                r.close()
    return undone


def check_vg_space(facts, settings) -> None:
    need: dict[str, int] = {}
    free: dict[str, int] = {}
    for f in facts:
        need[f.lv.vg] = need.get(f.lv.vg, 0) + size_bytes(settings.snapshot_size, f.lv.size)
        if f.lv.vg_free is not None:
            free[f.lv.vg] = f.lv.vg_free
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
        if known is not None:  # the inspection listed every LV of this VG
            exists = (f.lv.vg, name) in known
        else:
            exists = local.run(parsers.lvs_argv(snap), check=False).exit_code == 0
        if exists:
            raise SnapshotError(f"{domu}: a snapshot {snap} already exists and no journal explains it",
                                hint=f"check it is not in use, then remove it with `lvremove {snap}`")
    roots = [planner.tree_root(settings, domu, LOCAL, tree) for tree in ("", planner.UNPLACED)]
    mounted = [m.target for m in parsers.parse_findmnt(local.run(parsers.findmnt_argv()).stdout)
               if any(m.target == root or m.target.startswith(root + "/") for root in roots)]
    if mounted:
        raise InspectError(f"{domu}: something is already mounted under {' or '.join(roots)}: {', '.join(mounted)}",
                           hint=f"unmount it or run `domubackup cleanup {domu}`")


def check_peer(config, domu, facts, settings, peer, runner) -> list:
    """The DomU must not run on the peer; the replica LVs must exist, be closed and match."""
    check_peer_state(domu, settings, peer, runner)
    return check_replicas(domu, facts, peer, runner)


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

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
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


def open_local_tree(session, config, domu, insp, settings, read_only_peers=False):
    """Map and mount the snapshots read-only; return the mounts (decided from fstab if needed).
    The peers are told what to mount (`session.mount_peers`) as soon as that is known."""
    facts = insp.facts
    for f in facts:  # what is mapped and mounted is the snapshot: look at it first
        snap = planner.snapshot_name(settings, f.lv.lv)
        dev = cmd.lv_path(f.lv.vg, snap)
        if planner.mapped(f) or (not f.partitioned and planner.mountable([f])):
            check_snapshot(session.runners[LOCAL], f, dev, cmd.dm_name(f.lv.vg, snap), settings.kpartx_separator)
    session.open_all(planner.map_steps(facts, settings, LOCAL, snapshot=True))
    if settings.mounts:
        mounts = planner.mounts_from_config(facts, settings)
        session.mount_peers(mounts, read_only_peers)
        session.open_all(planner.local_mount_plan(mounts, facts, settings, domu))
        return mounts
    root = planner.root_candidate(facts, settings)
    if root is None:
        mounts = planner.fallback_mounts(facts)
        session.mount_peers(mounts, read_only_peers)
        session.open_all(planner.local_mount_plan(mounts, facts, settings, domu))
        return mounts
    session.open_all(planner.mount_steps([planner.Mount(root, "/")], facts, settings, domu, LOCAL))
    res = session.runners[LOCAL].run(cmd.read_in(planner.tree_root(settings, domu, LOCAL), planner.FSTAB),
                                     check=False)
    if res.exit_code == EXIT_MISSING:
        log.warning("%s: %s has no /etc/fstab: each filesystem goes under /<disk><partition>", domu, root.name)
        session.undo_last()  # the root mount; the tree root directory stays
        mounts = planner.fallback_mounts(facts)
        session.mount_peers(mounts, read_only_peers)
        rest = planner.local_mount_plan(mounts, facts, settings, domu)[1:]  # tree root exists already
        session.open_all(rest)
        return mounts
    if res.exit_code != 0:
        raise InspectError(f"{domu}: the guest's /etc/fstab (on {root.name}) cannot be read safely: "
                           f"{res.stderr.strip() or f'read-in exited {res.exit_code}'}",
                           hint=f"set mounts in [domu.{domu}] to say where each filesystem goes")
    try:
        if "\ufffd" in res.stdout:  # the runner decodes with errors="replace"
            raise ValueError("it is not valid UTF-8")
        entries = parsers.parse_fstab(res.stdout)
    except ValueError as e:
        raise InspectError(f"{domu}: the guest's /etc/fstab (on {root.name}) is not usable: {e}",
                           hint=f"set mounts in [domu.{domu}] to say where each filesystem goes") from None
    if planner.needs_partition_ids(entries):
        facts = with_partition_ids(session.runners[LOCAL], facts, [
            cmd.lv_path(f.lv.vg, planner.snapshot_name(settings, f.lv.lv)) for f in facts])
    mounts, notes = planner.mounts_from_fstab(entries, root, facts)
    for n in notes:
        log.warning("%s: %s", domu, n)
    session.mount_peers(mounts, read_only_peers)
    session.open_all(planner.mount_steps([m for m in mounts[1:] if m.tree != planner.UNPLACED], facts, settings,
                                         domu, LOCAL, with_root_dir=False)
                     + planner.unplaced_steps(mounts, facts, settings, domu, LOCAL))
    return mounts


HOOK_PHASES = ("job-start", "backup-start", "backup-end", "backup-abort", "job-end")


def lifecycle_hook(settings, phase: str, runner, *, domu="", peer="", status="", log_path="") -> None:
    """Run the configured job_hook as `HOOK PHASE` (vzdump's phase names) with the DomU, peer,
    status and log file in its environment. Raises CommandError when it fails."""
    if not settings.job_hook:
        return
    env = {"DOMUBACKUP_PHASE": phase, "DOMUBACKUP_DOMU": domu, "DOMUBACKUP_PEER": peer,
           "DOMUBACKUP_STATUS": status, "DOMUBACKUP_LOGFILE": log_path or ""}
    res = runner.run([settings.job_hook, phase], env=env, timeout=settings.freeze_hook_timeout * 10)
    for line in (res.stdout + res.stderr).splitlines():
        log.info("%s hook: %s", phase, line)


def make_freeze(settings, domu, conn, local):
    """The freeze window of the configured consistency mode: freeze, snapshot_fn(), thaw."""
    from .freeze import FreezeSettings, freeze_window

    fs = FreezeSettings(mode=settings.consistency, hook_dir=settings.freeze_hook_dir,
                        hook_timeout=settings.freeze_hook_timeout, max_window=settings.freeze_max_window,
                        agent_timeout=settings.freeze_agent_timeout, agent_mountpoints=settings.freeze_mountpoints,
                        on_failure=settings.freeze_on_failure)

    def window(snapshot_fn, journal):
        dom = virt.lookup(conn, domu) if fs.uses_agent else None
        return freeze_window(fs, domu, snapshot_fn, runner=local, domain=dom, uri=settings.libvirt_uri,
                             journal=journal)
    return window


def backup(config, domu: str, conn, local, *, factory=ssh_runner, progress=None, freeze=None,
           catalog=None, log_path=None, verify=False) -> Outcome:
    """One DomU: lock, recover, inspect, check, open, transfer, teardown. Never raises
    DomuBackupError: the outcome says what happened. A DomU that is not eligible here or whose
    lock is held leaves no catalog record; every other run is recorded RUNNING, then final.
    ``progress`` (a progress.Progress, on a terminal) draws a bar per transfer."""
    out = Outcome(domu)
    start = time.monotonic()
    run_id = None
    hooked = False
    settings = config.settings_for(domu)
    kind = "verify" if verify else "backup"
    if freeze is None and config.settings_for(domu).consistency != "none":
        freeze = make_freeze(config.settings_for(domu), domu, conn, local)
    peers = ",".join(config.peers_for(domu))
    try:
        check_domu_name(domu)  # a name from libvirt (backup_all_running) names files and mounts
        with DomuLock(config.state_dir, domu):
            out.undone = recover(config, domu, local, factory)
            check = PeerCheck(config, domu, factory)
            try:
                # The peers are asked from the moment the DomU is known to be eligible, unless a
                # freeze is coming: then nothing of ours may compete with it (started after the thaw).
                insp = inspect(config, domu, conn, local,
                               on_eligible=check.start if freeze is None or verify else None)
                if catalog is not None:
                    run_id = catalog.start(kind, domu, peers, os.getpid(), log_path)
                if not verify:
                    hooked = True  # backup-end or backup-abort follows, even when backup-start fails
                    try:
                        lifecycle_hook(settings, "backup-start", local, domu=domu, peer=peers, log_path=log_path)
                    except CommandError as e:
                        raise DomuBackupError(f"{domu}: the backup-start hook refused the backup: {e}",
                                              hint=f"see {settings.job_hook}") from None
                _backup_locked(config, domu, insp, local, check, progress, freeze, out, verify)
            finally:
                check.close()
    except DomuBackupError as e:
        out.error = str(e)
        out.exit_code = e.exit_code
        if out.status != "CORRUPT":
            out.status = {EXIT_BUSY: "BUSY", EXIT_NOT_ELIGIBLE: "SKIPPED"}.get(e.exit_code, "ERROR")
        out.not_here = isinstance(e, NotHereError)
        log.log(logging.INFO if out.not_here else logging.ERROR, "%s", e)
    except Exception as e:  # a bug, or guest data that a parser did not expect: this DomU only
        # (everything it opened is closed by the `finally`s above: lock, peers, journal)
        where = f"the traceback is in {log_path}" if log_path else "no log file could be written: the traceback is not kept"
        out.error = f"{domu}: internal error: {type(e).__name__}: {e}; {where}"
        out.exit_code = 1
        if out.status != "CORRUPT":
            out.status = "ERROR"
        log.error("%s", out.error, exc_info=True)  # the traceback goes to the run log file only
    out.duration = time.monotonic() - start
    if hooked:
        phase = "backup-end" if out.status in ("OK", "PARTIAL") else "backup-abort"
        try:
            lifecycle_hook(settings, phase, local, domu=domu, peer=peers, status=out.status, log_path=log_path)
        except DomuBackupError as e:
            log.warning("%s hook failed: %s", phase, e)
    if catalog is not None and out.status in ("OK", "PARTIAL", "ERROR", "CORRUPT"):
        if run_id is None:
            run_id = catalog.start(kind, domu, peers, os.getpid(), log_path)
        report = out.freeze
        catalog.finish(run_id, out.status, bytes_sent=out.stats.bytes_sent, files=out.stats.files,
                       total_size=out.stats.total_size, snapshot_peak=out.snapshot_peak,
                       error=(out.error or "; ".join(f"not copied: {w}" for w in out.not_copied))[:2000],
                       consistency=getattr(report, "level", None) or "crash",
                       freeze_window_ms=getattr(report, "window_ms", None))
    return out


class PeerCheck(threading.Thread):
    """The peers' side of a run, in the background, so that the ssh handshakes and the peers'
    commands overlap with this host's work: connect and ask each peer's libvirt that the DomU
    is not running there (from `start()`, as soon as the DomU is known to be eligible); once
    `attach()` gave the inspection and the session: check the replicas (present, closed, same
    layout), map their partitions, and, once `mount()` said what (as soon as the snapshot's
    fstab is read), mount them. Nothing is opened on a peer before its checks have passed;
    the main thread touches the peers only after `result()`."""

    def __init__(self, config, domu, factory):
        super().__init__(name=f"peer-check-{domu}", daemon=True)
        self.config, self.domu, self.factory = config, domu, factory
        self.insp = self.session = None
        self.runners: dict = {}
        self.error: BaseException | None = None
        self._attached = threading.Event()
        self._mounts: tuple | None = None  # (mounts, read_only), or None: mount nothing
        self._told = threading.Event()

    def attach(self, insp, session) -> None:
        """Go on past the peers' state check: with the inspection and the session, or with
        None (the run ends early: nothing more on the peers)."""
        if not self._attached.is_set():
            self.insp, self.session = insp, session
            self._attached.set()

    def mount(self, mounts, read_only=False) -> None:
        """What to mount on the peers after the mapping; None: nothing (the run ends early)."""
        if not self._told.is_set():
            self._mounts = None if mounts is None else (mounts, read_only)
            self._told.set()

    def run(self):
        settings = self.config.settings_for(self.domu)
        try:
            for p in self.config.peers_for(self.domu):
                self.runners[p] = self.factory(p, settings.ssh)
                check_peer_state(self.domu, settings, p, self.runners[p])
            self._attached.wait()
            if self.insp is None:
                return
            for p in self.insp.peers:
                for f in check_replicas(self.domu, self.insp.facts, p, self.runners[p]):
                    if planner.mapped(f):
                        check_mappable(self.runners[p], f, cmd.lv_path(f.lv.vg, f.lv.lv),
                                       cmd.dm_name(f.lv.vg, f.lv.lv), settings.kpartx_separator)
            self.session.runners.update(self.runners)
            for p in self.insp.peers:
                self.session.open_all(planner.map_steps(self.insp.facts, settings, p, snapshot=False))
            self._told.wait()
            if self._mounts is not None:
                mounts, read_only = self._mounts
                for p in self.insp.peers:
                    self.session.open_all(planner.peer_mount_plan(mounts, self.insp.facts, settings, self.domu,
                                                                  p, read_only=read_only))
        except BaseException as e:  # noqa: BLE001 - handed to the main thread by result()
            self.error = e

    def start(self) -> None:
        if not self.is_alive() and self.ident is None:
            super().start()

    def stop(self) -> None:
        """Let the thread finish what it is doing, and nothing more; wait for it."""
        self.attach(None, None)
        self.mount(None)
        if self.ident is not None:
            self.join()

    def result(self) -> None:
        self.start()
        self.mount(None)  # nothing said by now: nothing to mount
        self.join()
        if self.error is not None:
            raise self.error

    def close(self):
        self.stop()
        for r in self.runners.values():
            r.close()


@contextmanager
def peer_session(config, domu, insp, local, check: PeerCheck):
    """Yield a Session whose journal is torn down on both hosts at the end, with ``check``
    (a PeerCheck, maybe already started) attached: `session.start_peers()` starts it if it is
    not running yet, `session.mount_peers(mounts)` says what to mount there, and
    `session.wait_peers()` returns once the peers are checked, mapped and mounted (raises
    when a peer refused or failed). The caller closes ``check`` after this."""
    settings = config.settings_for(domu)
    journal = Journal.create(config.state_dir, domu, ",".join(insp.peers))
    session = Session(journal, {LOCAL: local}, settings.command_timeout)
    check.attach(insp, session)
    session.start_peers, session.mount_peers, session.wait_peers = check.start, check.mount, check.result
    failure = None
    try:
        yield session
    except Exception as e:
        failure = e
        raise
    finally:
        check.stop()
        session.runners.update(check.runners)
        try:
            journal.teardown(session.runners)  # a TeardownError is more serious than any other
        except TeardownError as e:
            e.after = str(failure) if failure is not None else None  # ...but its cause is told too
            raise


def _backup_locked(config, domu, insp, local, check, progress, freeze, out, verify=False):
    settings = config.settings_for(domu)
    check_vg_space(insp.facts, settings)
    check_no_stale(insp, settings, local, domu)
    with peer_session(config, domu, insp, local, check) as session:
        _open_and_transfer(session, config, domu, insp, settings, local, progress, freeze, out, verify)


VERIFY_ARGS = ("--dry-run", "--checksum", "--out-format=%i %n")


def _open_and_transfer(session, config, domu, insp, settings, local, progress, freeze, out, verify=False):
    snaps = planner.snapshot_steps(insp.facts, settings)
    if freeze is None or verify:
        session.start_peers()  # the ssh work overlaps with the snapshots
        session.open_all(snaps)
    else:
        # Recorded before the freeze, so that only lvcreate runs while the guest is frozen. A
        # crash leaves pending entries whose lvremove finds nothing: "already gone".
        recorded = session.journal.begin_many(snaps)
        try:
            out.freeze = freeze(lambda: session.open_prerecorded(snaps), session.journal)
        except FreezeError as e:
            out.freeze = getattr(e, "report", None)
            raise
        session.journal.done_many(recorded)
        # Only now: nothing else of ours competes for this host while the guest is frozen.
        session.start_peers()
        log.info("%s", out.freeze.summary)
        for i, e in enumerate(session.journal.entries):  # thawed: the teardown has nothing to thaw
            if e.phase == "freeze" and e.state == "done":
                session.journal.undone(i)
    # From here on the snapshots exist: watch their fill level until the transfer is over.
    snap_paths = [cmd.lv_path(f.lv.vg, planner.snapshot_name(settings, f.lv.lv)) for f in insp.facts]
    watch = SnapshotWatch(local, snap_paths, settings, on_abort=getattr(local, "cancel", None))
    stats = RsyncStats()
    with watch:
        try:
            mounts = open_local_tree(session, config, domu, insp, settings, read_only_peers=verify)
            where = "the config's mounts" if settings.mounts else "the guest's /etc/fstab"
            for m in mounts:
                if m.tree == planner.UNPLACED:
                    log.warning("%s: %s (%s) is not in %s: copied to %s on the peer", domu, m.filesystem.name,
                                m.filesystem.fstype, where,
                                planner.tree_root(settings, domu, insp.peers[0], m.tree) + m.mountpoint)
            out.not_copied = planner.not_copied(insp.facts, insp.skipped)
            session.wait_peers()  # checked, and their replicas mapped and mounted
            if not verify:
                check_room(session.space, mounts, settings, domu, insp.peers)
            trees = planner.trees(mounts)
            bars = progress if not verify else None  # a verify transfers nothing to show
            steps = planner.transfer_steps(settings, domu, insp.peers, progress=bars is not None,
                                           extra=VERIFY_ARGS if verify else (), trees=trees)
            for step, (peer, tree) in zip(steps, [(p, t) for p in insp.peers for t in trees]):
                meter = bars.meter(f"{domu} -> {peer}" + (f" ({tree})" if tree else "")) if bars else None
                try:
                    res = session.open(step, timeout=settings.rsync.timeout or 7 * 24 * 3600,
                                       on_output=meter.follow_rsync() if meter else None)
                except CommandError as e:
                    if watch.problem:
                        raise
                    raise CommandError(e.host, e.argv, e.returncode, e.stderr, timeout=e.timeout,
                                       hint=rsync_hint(e.returncode)) from None
                finally:
                    if meter:
                        meter.close()
                s = parsers.parse_rsync_stats(res.stdout)
                if verify:
                    prefix = f"{os.path.basename(planner.tree_root(settings, domu, peer, tree))}/" if tree else ""
                    out.differences += [f"{peer}: {code} {prefix}{path}"
                                        for code, path in parsers.parse_rsync_itemize(res.stdout, link_targets=False)]
                first = peer == insp.peers[0]  # the files of the guest: its trees, counted once
                stats = RsyncStats(files=stats.files + s.files * first,
                                   files_transferred=stats.files_transferred + s.files_transferred,
                                   total_size=stats.total_size + s.total_size * first,
                                   transferred_size=stats.transferred_size + s.transferred_size,
                                   bytes_sent=stats.bytes_sent + s.bytes_sent,
                                   bytes_received=stats.bytes_received + s.bytes_received,
                                   deleted=stats.deleted + s.deleted)
        except CommandError:
            if not watch.problem:
                raise  # a real failure; a cancelled command after a snapshot problem is reported below
    problem = watch.problem or watch.check(final=True)
    out.snapshot_peak = watch.peak
    out.stats = stats
    if problem:
        if "invalid" in problem:
            out.status = "CORRUPT"
            # LVM's dmeventd unmounts the filesystems of a snapshot that became invalid (seen in
            # the lab): their "not mounted" at teardown is then no one else's doing.
            session.journal.unseen(LOCAL, (cmd.HELPER, "umount-in"))
        raise SnapshotError(f"{domu}: {problem}", hint="raise snapshot_size, or back up at a quieter time")
    if out.differences:
        raise DomuBackupError(f"{domu}: the replica differs from the snapshot in {len(out.differences)} place(s): "
                              + "; ".join(out.differences[:20]) + (" ..." if len(out.differences) > 20 else ""),
                              hint="the next `domubackup run` repairs it")
    if out.not_copied:
        for why in out.not_copied:
            log.warning("%s: %s", domu, why)
        out.status, out.exit_code = "PARTIAL", EXIT_PARTIAL
    else:
        out.status, out.exit_code = "OK", 0


def rsync_hint(code) -> str | None:
    return {24: "files vanished from a snapshot, which cannot happen: something else changed the source tree",
            23: "some files could not be transferred: see rsync's messages above",
            12: "the connection or the peer's rsync failed",
            255: "ssh failed: check the peer, its host key and the identity file",
            }.get(code)


def fsck_replicas(config, domu: str, conn, local, *, factory=ssh_runner) -> list[str]:
    """Check the replica's filesystems read-only on each peer while they are not mounted:
    map the replica's partitions, `e2fsck -n -f` / `xfs_repair -n` each filesystem, unmap.
    Returns the problems found (empty: clean)."""
    settings = config.settings_for(domu)
    problems = []
    with DomuLock(config.state_dir, domu):
        recover(config, domu, local, factory)
        check = PeerCheck(config, domu, factory)
        try:
            insp = inspect(config, domu, conn, local, on_eligible=check.start)
            with peer_session(config, domu, insp, local, check) as session:
                session.wait_peers()  # checked, and their replicas mapped
                for peer in insp.peers:
                    for fs in planner.mountable(insp.facts):
                        argv = cmd.fsck_readonly(fs.fstype, planner.device_of(fs, insp.facts, settings, snapshot=False))
                        if argv is None:
                            continue
                        res = session.runners[peer].run(argv, check=False, timeout=settings.command_timeout)
                        if res.exit_code:
                            tail = " | ".join((res.stdout + res.stderr).strip().splitlines()[-3:])
                            problems.append(f"{peer}: {fs.name} ({fs.fstype}): `{' '.join(argv)}` exited "
                                            f"{res.exit_code}: {tail}")
                        else:
                            log.info("%s: %s (%s): clean", peer, fs.name, fs.fstype)
        finally:
            check.close()
    return problems
