"""The job frame: one DomU's job (backup, verify, seed, fsck) from its eligibility to its
catalog record. Settings resolved once; this host in dom0s, the DomU running here, its peers;
the DomU's lock; a dead run's journal undone first; the peers' runners (reached in the
background while this host probes); the catalog record (RUNNING, then final, and the restore
points a backup left on its peers); the lifecycle hooks of a backup. The job's body builds its
plan and runs it with the executor."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

from ..hosts import virt
from ..core.config import Config, check_domu_name
from ..core.errors import (EXIT_BUSY, EXIT_FAILED, EXIT_NOT_ELIGIBLE, CommandError, DomuBackupError, InspectError,
                           NotEligibleError, NotHereError)
from ..core.layout import blocks_reason
from ..core.plan import is_blocks
from ..hosts.facts import disk_lv, list_lvs, probe_disk
from ..hosts.journal import Journal
from ..hosts.lock import DomuLock
from ..core.report import human_bytes
from .checks import check_peer_state
from ..core.model import LOCAL, Domain, DiskFacts, RsyncStats

log = logging.getLogger("domubackup")


@dataclass
class Inspection:
    domain: Domain
    facts: list[DiskFacts]
    skipped: list[str]
    peers: tuple[str, ...]
    lvs: list | None = None  # every LV of the disks' VGs (list_lvs), None when not known
    digests: dict = field(default_factory=dict)  # blocks mode: {(peer, disk): (token, digests)} kept here
    modes: dict = field(default_factory=dict)  # {disk: (files or blocks, why)}
    bases: dict = field(default_factory=dict)  # blocks mode: {thin disk: the generation of its usable base}


def check_host(config: Config) -> None:
    if config.this_host not in config.dom0s:
        raise NotEligibleError(f"this host {config.this_host!r} is not in dom0s {list(config.dom0s)} of {config.path}",
                               hint="add it to dom0s, or set this_host to its name there")


def inspect(config: Config, name: str, conn, runner, on_eligible=None) -> Inspection:
    """Eligibility (defined here, running, this host in DOM0S, a peer) and read-only facts.
    ``on_eligible()`` is called once the DomU is known to be eligible, before the probes."""
    check_host(config)
    settings = config.settings_for(name)
    domain = virt.describe(virt.lookup(conn, name), include=settings.disks, exclude=settings.exclude_disks)
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
    facts, modes = [], {}
    for d in disks:
        f, modes[d.target] = disk_facts(runner, d, lvs, settings.mode_of(d.target))
        facts.append(f)
    if not facts:
        raise NotEligibleError(f"{name}: no disk that can be backed up", hint="; ".join(skipped) or None)
    from .blocks import kept_digests, thin_bases

    kept = kept_digests(config.state_dir, name, [f for f in facts if is_blocks(f)], peers)
    return Inspection(domain, facts, skipped, peers, lvs, kept, modes, thin_bases(facts, lvs, kept))


def disk_facts(runner, d, lvs, mode: str):
    """(facts, (mode, why)) of disk D configured with MODE (files, blocks, auto). In blocks mode
    nothing on the disk is read, only its LV; `auto` probes its layout (as files mode does)
    and takes blocks where files mode would leave data out (layout.blocks_reason) or cannot
    read the layout."""
    from .blocks import blocks_facts

    lv = disk_lv(runner, d, d.source, lvs)  # not an LV, a snapshot, being restored: an error in every mode
    if mode == "blocks":
        return blocks_facts(d, lv), ("blocks", "configured")
    try:
        f = probe_disk(runner, d, lvs=lvs)
    except (InspectError, CommandError) as e:
        if mode == "files":
            raise
        return blocks_facts(d, lv), ("blocks", f"auto: its layout could not be read: {e}")
    why = blocks_reason(f) if mode == "auto" else None
    if why:
        return blocks_facts(d, lv), ("blocks", f"auto: {why}")
    return f, ("files", "configured" if mode == "files" else
               "auto: every partition holding data has a filesystem the tool mounts")


@dataclass
class Outcome:
    domu: str
    status: str = "ERROR"  # OK, ERROR, CORRUPT, SKIPPED, BUSY
    exit_code: int = EXIT_FAILED
    duration: float = 0.0
    stats: RsyncStats = field(default_factory=RsyncStats)
    snapshot_peak: float | None = None
    error: str = ""
    undone: list[str] = field(default_factory=list)
    freeze: object = None  # freeze report, when a freeze mode is configured
    differences: list[str] = field(default_factory=list)  # verify: rsync itemize lines
    not_here: bool = False  # not defined / not running on this host (another Dom0's job)
    not_copied: list[str] = field(default_factory=list)  # PARTIAL: what of the guest was left out, why
    report: list[str] = field(default_factory=list)  # what the job tells: seed's lines, fsck's problems
    point: str = ""  # the restore point this run made on its peers
    points_known: dict = field(default_factory=dict)  # {peer: its points after the run} (points.figures)

    def summary(self) -> str:
        line = f"{self.domu}: {self.status} in {self.duration:.1f}s"
        if self.status in ("OK", "PARTIAL", "CORRUPT", "ERROR") and self.stats.files:
            line += (f", {self.stats.files} files, {human_bytes(self.stats.total_size)} total, "
                     f"{human_bytes(self.stats.bytes_sent)} sent")
        if self.status in ("OK", "PARTIAL", "CORRUPT", "ERROR") and self.stats.blocks_read:
            line += (f", {self.stats.blocks_changed} of {self.stats.blocks_read} blocks read changed"
                     + ("" if self.stats.files else f", {human_bytes(self.stats.bytes_sent)} sent"))
        if self.snapshot_peak:
            line += f", snapshot peak {self.snapshot_peak:.1f}%"
        if self.freeze is not None and self.freeze.mode != "none":
            line += f"; {self.freeze.summary.split(': ', 1)[1]}"
        if self.point:
            line += f"; restore point {self.point}"
        if self.not_copied:
            line += "; not copied: " + "; ".join(self.not_copied)
        if self.error:
            line += f": {self.error}"
        return line


def peer_runners(config, domu: str, peers, factory):
    ssh = config.settings_for(domu).ssh
    return {p: factory(p, ssh) for p in peers}


def ssh_runner(host, ssh):
    from ..hosts.ssh import SSHRunner

    return SSHRunner.for_host(host, ssh)


def recover(config, domu: str, local, factory=ssh_runner) -> list[str]:
    """Finish the teardown of a journal left by a dead run (the caller holds the lock)."""
    for tmp in Journal.sweep(config.state_dir, domu):
        log.warning("%s: removed %s, a journal write that a killed run left unfinished", domu, tmp)
    journal = Journal.load(config.state_dir, domu)
    if journal is None:
        return []
    journal.unseen()  # a dead run's mounts may be gone for good reasons (a reboot): not a failure
    undos = journal.undos()
    runners = {LOCAL: local, **peer_runners(config, domu, {h for h, _ in undos if h != LOCAL}, factory)}
    undone = [f"{h}: {' '.join(u)}" for h, u in undos]
    log.warning("%s: found the journal of a dead run (PID %s, started %s): undoing %d step(s)",
                domu, journal.pid, journal.started, len(undone))
    try:
        journal.teardown(runners)
    finally:
        close_peers(runners, local)
    return undone


def close_peers(runners, local) -> None:
    for r in runners.values():
        if r is not local:
            r.close()


def lifecycle_hook(settings, phase: str, runner, *, domu="", peer="", status="", log_path="") -> None:
    """Run the configured job_hook as `HOOK PHASE` (vzdump's phase names: job-start, backup-start,
    backup-end, backup-abort, job-end) with the DomU, peer, status and log file in its
    environment. Raises CommandError when it fails."""
    if not settings.job_hook:
        return
    env = {"DOMUBACKUP_PHASE": phase, "DOMUBACKUP_DOMU": domu, "DOMUBACKUP_PEER": peer,
           "DOMUBACKUP_STATUS": status, "DOMUBACKUP_LOGFILE": log_path or ""}
    res = runner.run([settings.job_hook, phase], env=env, timeout=settings.freeze_hook_timeout * 10)
    for line in (res.stdout + res.stderr).splitlines():
        log.info("%s hook: %s", phase, line)


def hook_or_warn(settings, phase: str, runner, **env) -> None:
    """lifecycle_hook, whose failure is only logged (the job's outcome stands)."""
    try:
        lifecycle_hook(settings, phase, runner, **env)
    except DomuBackupError as e:
        log.warning("%s hook failed: %s", phase, e)


class Warmup:
    """Connects to the peers in the background while this host still probes (paramiko's imports
    and the handshake: seconds under emulation); the plan's first step there finds the
    connection open. A failure is kept for that step to raise (no second connect timeout)."""

    def __init__(self, runners):
        self.peers = {h: r for h, r in runners.items() if h != LOCAL and hasattr(r, "connect")}
        self.errors: dict[str, BaseException] = {}
        self._thread = None

    def start(self) -> None:
        if self._thread is None and self.peers:
            self._thread = threading.Thread(target=self._connect, name="warmup", daemon=True)
            self._thread.start()

    def _connect(self):
        for host, runner in self.peers.items():
            try:
                runner.connect()
            except BaseException as e:  # noqa: BLE001 - raised by the peer's first step
                self.errors[host] = e

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def raise_for(self, host: str) -> None:
        if host in self.errors:
            raise self.errors.pop(host)


@dataclass
class Job:
    """What a job's body gets: the DomU, its settings, what was found, the hosts' runners."""
    config: Config
    domu: str
    settings: object
    insp: Inspection
    runners: dict
    out: Outcome
    warm: Warmup

    def check_peer_state(self, step) -> None:
        """Check step "peer-state": the DomU does not run on that peer."""
        self.warm.raise_for(step.host)
        check_peer_state(self.domu, self.settings, step.host, self.runners[step.host])


def run_job(config, domu: str, kind: str, conn, local, body, *, factory=ssh_runner, catalog=None,
            log_path=None, warm_early=True) -> Outcome:
    """One DomU's job of KIND; ``body(job)`` does the work and fills ``job.out``. Never raises
    DomuBackupError: the outcome says what happened. A DomU that is not eligible here or whose
    lock is held leaves no catalog record; every other job is recorded RUNNING, then final.
    ``warm_early``: reach the peers while this host still probes (not before a freeze: nothing
    of ours may compete with it)."""
    out = Outcome(domu)
    start = time.monotonic()
    run_id, hooked = None, False
    settings = config.settings_for(domu)
    peers = ",".join(config.peers_for(domu))
    try:
        check_domu_name(domu)  # a name from libvirt (backup_all_running) names files and mounts
        with DomuLock(config.state_dir, domu):
            out.undone = recover(config, domu, local, factory)
            runners = {LOCAL: local, **peer_runners(config, domu, config.peers_for(domu), factory)}
            warm = Warmup(runners)
            try:
                insp = inspect(config, domu, conn, local, on_eligible=warm.start if warm_early else None)
                if catalog is not None:
                    run_id = catalog.start(kind, domu, peers, os.getpid(), log_path)
                if kind == "backup":
                    hooked = True  # backup-end or backup-abort follows, even when backup-start fails
                    try:
                        lifecycle_hook(settings, "backup-start", local, domu=domu, peer=peers, log_path=log_path)
                    except CommandError as e:
                        raise DomuBackupError(f"{domu}: the backup-start hook refused the backup: {e}",
                                              hint=f"see {settings.job_hook}") from None
                warm.join()
                body(Job(config, domu, settings, insp, runners, out, warm))
            finally:
                warm.join()
                close_peers(runners, local)
    except Exception as e:
        if isinstance(e, DomuBackupError):
            out.error, out.exit_code = str(e), e.exit_code
            out.not_here = isinstance(e, NotHereError)
            log.log(logging.INFO if out.not_here else logging.ERROR, "%s", e)
        else:  # a bug, or guest data that a parser did not expect: this DomU only
            # (everything it opened is closed by the `finally`s above: lock, peers, journal)
            where = f"the traceback is in {log_path}" if log_path else "no log file could be written: the traceback is not kept"
            out.error, out.exit_code = f"{domu}: internal error: {type(e).__name__}: {e}; {where}", EXIT_FAILED
            log.error("%s", out.error, exc_info=True)  # the traceback goes to the run log file only
        if out.status != "CORRUPT":
            out.status = {EXIT_BUSY: "BUSY", EXIT_NOT_ELIGIBLE: "SKIPPED"}.get(out.exit_code, "ERROR")
    out.duration = time.monotonic() - start
    if hooked:
        hook_or_warn(settings, "backup-end" if out.status in ("OK", "PARTIAL") else "backup-abort", local,
                     domu=domu, peer=peers, status=out.status, log_path=log_path)
    if catalog is not None and out.status in ("OK", "PARTIAL", "ERROR", "CORRUPT"):
        if run_id is None:
            run_id = catalog.start(kind, domu, peers, os.getpid(), log_path)
        report = out.freeze
        catalog.finish(run_id, out.status, bytes_sent=out.stats.bytes_sent, files=out.stats.files,
                       total_size=out.stats.total_size, snapshot_peak=out.snapshot_peak,
                       blocks_read=out.stats.blocks_read, blocks_changed=out.stats.blocks_changed,
                       error=(out.error or "; ".join(f"not copied: {w}" for w in out.not_copied))[:2000],
                       consistency=getattr(report, "level", None) or "crash",
                       freeze_window_ms=getattr(report, "window_ms", None))
        for host, known in out.points_known.items():
            catalog.record_points(domu, host, **known)
    return out
