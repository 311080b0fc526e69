"""The backup job (and verify, and fsck of the replicas): the body that jobs.run_job runs for
them, its plan (plan.py) run by the executor, and the checks and decisions that plan names."""

from __future__ import annotations

import logging
import os
from dataclasses import astuple, replace

from ..core import commands as cmd, layout, parsers, plan as planner, points as pts, rsyncout
from ..hosts import virt
from .checks import SnapshotWatch, check_no_stale, check_replicas, check_room, check_vg_space
from ..core.errors import EXIT_PARTIAL, CommandError, DomuBackupError, InspectError, PeerError, SnapshotError
from .executor import Executor
from ..hosts.facts import check_mappable, check_snapshot, with_partition_ids
from .frame import Outcome, run_job, ssh_runner
from .freeze import FreezeSettings, freeze_window
from ..hosts.journal import Journal
from ..core.model import LOCAL, RsyncStats
from ..hosts.safepath import EXIT_MISSING

log = logging.getLogger("domubackup")


def make_plan(config, insp, *, progress=False, verify=False, frozen=False) -> planner.Plan:
    """The plan of a backup (or verify) of INSP's DomU: every disk in blocks mode (blocks.py),
    or files mode with any blocks-mode disks beside (planner.plan_backup); the notes say each
    disk's mode and why."""
    settings = config.settings_for(insp.domain.name)
    tokens = {key: token for key, (token, *_) in insp.digests.items()}
    if all(planner.is_blocks(f) for f in insp.facts):
        from .blocks import plan_blocks, plan_blocks_verify

        plan = (plan_blocks_verify(insp.domain.name, insp.facts, settings, insp.peers) if verify else
                plan_blocks(insp.domain.name, insp.facts, settings, insp.peers, frozen=frozen, tokens=tokens,
                            bases=insp.bases))
    else:
        plan = planner.plan_backup(insp.domain.name, insp.facts, settings, insp.peers, skipped=insp.skipped,
                                   progress=progress, verify=verify, frozen=frozen, tokens=tokens, bases=insp.bases)
    plan.notes += [f"{disk}: mode {mode} ({why})" for disk, (mode, why) in sorted(insp.modes.items())]
    return plan


def make_freeze(settings, domu, conn, local):
    """The freeze window of the configured consistency mode: freeze, snapshot_fn(), thaw."""
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
    """Back up (or verify) one DomU: see jobs.run_job. ``progress`` (a progress.Progress, on a
    terminal) draws a bar per transfer."""
    settings = config.settings_for(domu)
    if freeze is None and settings.consistency != "none" and not verify:
        freeze = make_freeze(settings, domu, conn, local)
    body = lambda job: Backup(job, verify=verify, progress=progress, freeze=None if verify else freeze).run()  # noqa: E731
    return run_job(config, domu, "verify" if verify else "backup", conn, local, body, factory=factory,
                   catalog=catalog, log_path=log_path, warm_early=freeze is None or verify)


class Backup:
    """One backup (or verify) of a job's DomU: its plan, and the checks and decisions it names."""

    def __init__(self, job, *, verify=False, progress=None, freeze=None):
        self.job, self.config, self.domu, self.settings = job, job.config, job.domu, job.settings
        self.insp, self.runners, self.out, self.facts = job.insp, job.runners, job.out, job.insp.facts
        self.verify, self.progress, self.freeze = verify, progress, freeze
        self.mounts = None  # once known: from the config, the fallback, or the guest's fstab
        self.stats, self.watch = RsyncStats(), None
        self._meter = None  # the progress bar of the transfer running now

    def run(self) -> None:
        settings, domu, out = self.settings, self.domu, self.out
        plan = make_plan(self.config, self.insp, progress=self.progress is not None, verify=self.verify,
                         frozen=self.freeze is not None)
        from .blocks import Blocks

        blocks = Blocks(self) if any(planner.is_blocks(f) for f in self.facts) else None
        if blocks is not None and all(planner.is_blocks(f) for f in self.facts):
            return blocks.run(plan)
        self.mounts = plan.mounts
        self.journal = Journal.create(self.config.state_dir, domu, ",".join(self.insp.peers))
        snaps = [cmd.lv_path(f.lv.vg, planner.snapshot_name(settings, f.lv.lv)) for f in self.facts
                 if not planner.thin_blocks(f)]  # a thin snapshot has no fill level of its own
        self.watch = SnapshotWatch(self.runners[LOCAL], snaps, settings,
                                   on_abort=getattr(self.runners[LOCAL], "cancel", None))
        ex = Executor(self.journal, self.runners, timeout=settings.command_timeout,
                      checks={"vg-space": lambda s: check_vg_space([f for f in self.facts if not planner.thin_blocks(f)],
                                                                   settings),
                              "no-stale": lambda s: check_no_stale(self.insp, settings, self.runners[LOCAL], domu),
                              "snapshot": self._check_snapshot, "peer-state": self.job.check_peer_state,
                              "replicas": lambda s: check_replica_maps(self.job, s),
                              "room": lambda s: check_room(ex.space, self.mounts, settings, domu, self.insp.peers),
                              **(blocks.checks() if blocks else {})},  # a mixed DomU: its blocks-mode disks'
                      callbacks={"fstab": self._decide_fstab, "transfer": self._transferred,
                                 "point-size": lambda s, r: self._size_points(ex, s, r),
                                 **(blocks.callbacks() if blocks else {})},
                      feed=blocks.feed if blocks else None, freeze=self.freeze, on_output=self._display, on_mark={"snapshots": lambda: self._snapshots(ex)})
        if self.mounts is not None:
            self._tell_unplaced()
        with ex.closing():
            try:
                ex.run(plan.steps)
            except CommandError:
                if not self.watch.problem:
                    raise  # a real failure; a cancelled command after a snapshot problem is reported below
            finally:
                out.freeze = ex.freeze_report
                self.watch.stop()
                if self._meter is not None:  # a transfer that failed
                    self._meter.close()
                if blocks is not None:
                    blocks.close_meters()
            if blocks is not None:
                self.stats = replace(self.stats, total_size=self.stats.total_size + sum(
                    f.lv.size for f in self.facts if planner.is_blocks(f)), bytes_sent=self.stats.bytes_sent + blocks.sent,
                    blocks_read=blocks.blocks_read, blocks_changed=blocks.blocks_changed)
            self._judge()
        if plan.after and out.status == "OK":
            self._point(plan.after)

    def _point(self, steps) -> None:
        """The replicas are complete and nothing is mounted: make this run's restore point (or,
        without [retention], clear their mark)."""
        from .points import PointsPhase

        phase = PointsPhase(self.job, getattr(self.out.freeze, "level", None) or "crash")
        try:
            phase.run(steps)
        except DomuBackupError as e:
            if self.settings.retention is None:
                raise DomuBackupError(f"{self.domu}: the replica is complete, but its mark {pts.WRITING} was not "
                                      f"cleared: {e}", hint="the next OK run clears it") from e
            raise DomuBackupError(f"{self.domu}: the replica is complete, but its restore point {phase.point} "
                                  f"was not made: {e}", hint="`domubackup points` shows what there is") from e
        if self.settings.retention is None:
            return
        self.out.point, self.out.points_known = phase.point, phase.known
        log.info("%s: restore point %s made on %s%s", self.domu, phase.point, ", ".join(self.insp.peers),
                 f"; pruned {', '.join(phase.pruned)}" if phase.pruned else "")

    def _snapshots(self, ex) -> None:
        """The snapshots exist (and the guest is thawed): watch their fill level until the end."""
        if ex.freeze_report is not None:
            log.info("%s", ex.freeze_report.summary)
        self.watch.start()

    def _tell_unplaced(self) -> None:
        where = "the config's mounts" if self.settings.mounts else "the guest's /etc/fstab"
        for m in self.mounts:
            if m.tree == layout.UNPLACED:
                log.warning("%s: %s (%s) is not in %s: copied to %s on the peer", self.domu, m.filesystem.name,
                            m.filesystem.fstype, where,
                            planner.tree_root(self.settings, self.domu, self.insp.peers[0], m.tree) + m.mountpoint)

    # --- checks ---------------------------------------------------------------------------

    def _check_snapshot(self, step) -> None:
        f = next(f for f in self.facts if f.disk.target == step.check[1])
        snap = planner.snapshot_name(self.settings, f.lv.lv)
        check_snapshot(self.runners[LOCAL], f, cmd.lv_path(f.lv.vg, snap), cmd.dm_name(f.lv.vg, snap),
                       self.settings.kpartx_separator)

    # --- decisions and results --------------------------------------------------------------

    def _decide_fstab(self, step, res):
        """The guest's fstab (read from the mounted root) says what is mounted next."""
        domu, settings = self.domu, self.settings
        root = layout.root_candidate(self.facts, settings)
        more = dict(progress=self.progress is not None, verify=self.verify)
        if res.exit_code == EXIT_MISSING:
            log.warning("%s: %s has no /etc/fstab: each filesystem goes under /<disk><partition>", domu, root.name)
            self.mounts = layout.fallback_mounts(self.facts)
            return planner.after_fstab(self.mounts, self.facts, settings, domu, self.insp.peers, missing=True, **more)
        hint = f"set mounts in [domu.{domu}] to say where each filesystem goes"
        if res.exit_code != 0:
            raise InspectError(f"{domu}: the guest's /etc/fstab (on {root.name}) cannot be read safely: "
                               f"{res.stderr.strip() or f'read-in exited {res.exit_code}'}", hint=hint)
        try:
            if "\ufffd" in res.stdout:  # the runner decodes with errors="replace"
                raise ValueError("it is not valid UTF-8")
            entries = parsers.parse_fstab(res.stdout)
        except ValueError as e:
            raise InspectError(f"{domu}: the guest's /etc/fstab (on {root.name}) is not usable: {e}",
                               hint=hint) from None
        facts = self.facts
        if layout.needs_partition_ids(entries):
            facts = with_partition_ids(self.runners[LOCAL], facts, [
                cmd.lv_path(f.lv.vg, planner.snapshot_name(settings, f.lv.lv)) for f in facts])
        self.mounts, notes = layout.mounts_from_fstab(entries, root, facts)
        for n in notes:
            log.warning("%s: %s", domu, n)
        self._tell_unplaced()
        return planner.after_fstab(self.mounts, self.facts, settings, domu, self.insp.peers, missing=False, **more)

    def _size_points(self, ex, step, res):
        """Decision "point-size": the thick points on the step's peer get room for the most
        this run may write into each replica (its mounts' figures, here and there)."""
        if res.exit_code != 0:
            raise PeerError(f"{step.host}: cannot list the restore points of {self.domu}: {res.stderr.strip()}",
                            hint="nothing was written; check LVM on the peer")
        lvs = pts.parse_lvs(res.stdout)
        sizes = {lv.path: lv.size for lv in lvs}

        def space(host, mounts):
            return [ex.space.get((host, planner.tree_root(self.settings, self.domu, host, m.tree), m.mountpoint))
                    for m in mounts]
        bounds = {}
        for f in self.facts:
            path = cmd.lv_path(f.lv.vg, f.lv.lv)
            on_disk = [m for m in self.mounts if m.filesystem.disk == f.disk.target]
            if path in sizes:
                bounds[path] = pts.write_bound(sizes[path], space(LOCAL, on_disk), space(step.host, on_disk))
        steps, warnings = pts.size_points(step.host, lvs, bounds)
        for w in warnings:
            log.warning("%s: %s", self.domu, w)
        return steps

    def _display(self, step):
        if step.phase != "transfer" or self.progress is None or self.verify:
            return None
        peer, tree = step.about
        self._meter = self.progress.meter(f"{self.domu} -> {peer}" + (f" ({tree})" if tree else ""))
        return self._meter.follow_rsync()

    def _transferred(self, step, res):
        meter, self._meter = self._meter, None
        if meter is not None:
            meter.close(complete=res.exit_code == 0)
        if res.exit_code != 0:
            raise CommandError(step.host, step.argv, res.exit_code, res.stderr, hint=rsync_hint(res.exit_code))
        s = rsyncout.parse_rsync_stats(res.stdout)
        peer, tree = step.about
        if self.verify:
            prefix = f"{os.path.basename(planner.tree_root(self.settings, self.domu, peer, tree))}/" if tree else ""
            self.out.differences += [f"{peer}: {code} {prefix}{path}"
                                     for code, path in rsyncout.parse_rsync_itemize(res.stdout, link_targets=False)]
        first = peer == self.insp.peers[0]  # files and total_size are the guest's: its trees, counted once
        self.stats = RsyncStats(*(a + b * (first or k not in ("files", "total_size"))
                                  for k, a, b in zip(RsyncStats.__dataclass_fields__, astuple(self.stats), astuple(s))))
        return None

    def _judge(self) -> None:
        """The outcome, from the snapshots' last look, the differences and what was not copied."""
        domu, out = self.domu, self.out
        problem = self.watch.problem or self.watch.check(final=True)
        out.snapshot_peak, out.stats = self.watch.peak, self.stats
        if problem:
            if "invalid" in problem:
                out.status = "CORRUPT"
                # LVM's dmeventd unmounts the filesystems of a snapshot that became invalid (seen in
                # the lab): their "not mounted" at teardown is then no one else's doing.
                self.journal.unseen(LOCAL, (cmd.HELPER, "umount-in"))
            raise SnapshotError(f"{domu}: {problem}", hint="raise snapshot_size, or back up at a quieter time")
        out.not_copied = layout.not_copied(self.facts, self.insp.skipped)
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


def check_replica_maps(job, step) -> None:
    """Check step "replicas": the replica LVs on the step's peer match, and can be mapped."""
    runner = job.runners[step.host]
    for f in check_replicas(job.domu, [f for f in job.insp.facts if not planner.is_blocks(f)], step.host, runner):
        if planner.mapped(f):
            check_mappable(runner, f, cmd.lv_path(f.lv.vg, f.lv.lv), cmd.dm_name(f.lv.vg, f.lv.lv),
                           job.settings.kpartx_separator)


def rsync_hint(code) -> str | None:
    return {24: "files vanished from a snapshot, which cannot happen: something else changed the source tree",
            23: "some files could not be transferred: see rsync's messages above",
            12: "the connection or the peer's rsync failed",
            255: "ssh failed: check the peer, its host key and the identity file"}.get(code)


def fsck_replicas(config, domu: str, conn, local, *, factory=ssh_runner) -> list[str]:
    """Check the replica's filesystems read-only on each peer while they are not mounted
    (plan.plan_fsck): map the replica's partitions, `e2fsck -n -f` / `xfs_repair -n` each
    filesystem, unmap. Returns the problems found (empty: clean)."""
    def body(job):
        def fscked(step, res):
            if res.exit_code:
                tail = " | ".join((res.stdout + res.stderr).strip().splitlines()[-3:])
                job.out.report.append(f"{step.host}: {step.note}: `{' '.join(step.argv)}` exited {res.exit_code}: "
                                      f"{tail}")
            else:
                log.info("%s: %s: clean", step.host, step.note)

        ex = Executor(Journal.create(config.state_dir, domu, ",".join(job.insp.peers)), job.runners,
                      timeout=job.settings.command_timeout, callbacks={"fsck": fscked},
                      checks={"peer-state": job.check_peer_state, "replicas": lambda s: check_replica_maps(job, s)})
        with ex.closing():
            ex.run(planner.plan_fsck(domu, job.insp.facts, job.settings, job.insp.peers).steps)
        job.out.status, job.out.exit_code = "OK", 0

    out = run_job(config, domu, "fsck", conn, local, body, factory=factory)
    if out.status != "OK":
        error = DomuBackupError(out.error)
        error.exit_code = out.exit_code
        raise error
    return out.report
