"""Restore points: the points phase of an OK backup (one more plan, run by the executor), and
the `points` and `prune` commands. Names, tags and steps are in core/points.py."""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone

from ..core import points as pts
from ..core import retention
from ..core.errors import DomuBackupError
from ..core.model import LOCAL
from ..hosts.journal import Journal
from ..hosts.lock import DomuLock
from .executor import Executor

log = logging.getLogger("domubackup")


def xml_dir(config, domu: str) -> str:
    """Where the peer keeps the domain XML of each point (its own state_dir: the same file)."""
    return os.path.join(config.state_dir, "points", domu)


def figures(points) -> dict:
    """What the catalog records of a host's POINTS (Catalog.record_points): how many, how many
    good, the newest good one's time (epoch seconds, None when none is good)."""
    good = [p.time.timestamp() for p in points if p.good]
    return {"points": len(points), "good": len(good), "newest_good": max(good, default=None)}


class PointsPhase:
    """After an OK backup, with nothing of the replicas mounted: on each peer the replicas are
    marked complete, a point of them is made (and the domain XML kept beside it), and the
    points the retention rules do not keep are pruned. ``known``: each peer's points once the
    phase has run (figures()), for the catalog."""

    def __init__(self, job, consistency: str, now: datetime | None = None):
        self.job, self.settings, self.domu = job, job.settings, job.domu
        self.point = pts.stamp(now or datetime.now(timezone.utc))
        self.consistency = consistency
        self.pruned: list[str] = []
        self.known: dict[str, dict] = {}

    def run(self, steps) -> None:
        """STEPS: the plan's points phase (plan.after: each peer's listing, a decision)."""
        journal = Journal.create(self.job.config.state_dir, self.domu, ",".join(self.job.insp.peers))
        ex = Executor(journal, self.job.runners, timeout=self.settings.command_timeout,
                      callbacks={"points": self._decide}, feed=self._feed)
        with ex.closing():
            ex.run(steps)

    def _feed(self, step):
        if step.argv[:1] == ("install",):
            return self.job.insp.domain.xml.encode()
        return None

    def _decide(self, step, res):
        if res.exit_code != 0:
            raise DomuBackupError(f"{step.host}: cannot list the replicas of {self.domu}: {res.stderr.strip()}")
        lvs = pts.parse_lvs(res.stdout)
        by_path = {lv.path: lv for lv in lvs}
        replicas, disks = [], []
        for f in self.job.insp.facts:
            lv = by_path.get(f"/dev/{f.lv.vg}/{f.lv.lv}")
            if lv is None:
                raise DomuBackupError(f"{step.host}: the replica {f.lv.vg}/{f.lv.lv} of {self.domu} is not tagged "
                                      f"{pts.TAG}domu:{self.domu}: no restore point made",
                                      hint="the run marks its replicas before writing: was it written by another tool?")
            replicas.append(lv)
            disks.append(f.disk.target)
        existing = pts.points_of(lvs)
        for p in existing:
            if p.status == "INVALID":
                log.warning("%s: restore point %s on %s is INVALID (a thick point overflowed): it is pruned",
                            self.domu, p.name, step.host)
        new = retention.Point(self.point, pts.stamp_time(self.point), good=True)  # what the steps below make
        decided = retention.prune([*existing, new], self.settings.retention)
        doomed = [p for p, keep, _ in decided if not keep and p.name != self.point]
        if doomed and step.host in self.job.config.append_only:
            log.info("%s: %s keeps its restore points append-only: its own `domubackup prune` removes %s",
                     self.domu, step.host, ", ".join(p.name for p in doomed))
            doomed = []
        self.pruned += [f"{step.host}:{p.name}" for p in doomed]
        gone = {p.name for p in doomed}
        self.known[step.host] = figures([new, *(p for p in existing if p.name not in gone | {new.name})])
        return (pts.point_steps(self.domu, step.host, replicas, self.point, disks=disks,
                                size=self.settings.point_size, consistency=self.consistency)
                + [pts.keep_xml(step.host, xml_dir(self.job.config, self.domu), self.point)]
                + pts.prune_steps(step.host, doomed, xml_dir(self.job.config, self.domu)))


def host_points(runner, domu: str) -> tuple[list[pts.Point], list[str]]:
    """The points of DOMU on the host of RUNNER, newest first, and its replicas being written."""
    lvs = pts.parse_lvs(runner.run(pts.lvs_of(domu)).stdout)
    return pts.points_of(lvs), pts.being_written(lvs)


def on_hosts(config, names, local, factory, work):
    """``work(domu, host, runner)`` for each DomU (default: the configured ones) on each host
    that may hold its points: this one (where it is the peer) and its peers. Yields (domu,
    host, result, error): a host that cannot be reached is an error of its own, the others
    still answer."""
    runners = {LOCAL: local}
    try:
        for domu in names or list(config.domus):
            for host in (LOCAL, *config.peers_for(domu)):
                try:
                    if host not in runners:
                        runners[host] = factory(host, config.settings_for(domu).ssh)
                    yield domu, config.this_host if host == LOCAL else host, work(domu, host, runners[host]), None
                except DomuBackupError as e:
                    yield domu, config.this_host if host == LOCAL else host, None, e
    finally:
        for host, r in runners.items():
            if host != LOCAL and hasattr(r, "close"):
                r.close()


def prune_host(config, domu: str, host: str, runner, *, dry_run: bool) -> tuple[list[tuple[str, bool, str]], dict]:
    """Apply DOMU's retention rules to its points on HOST; returns [(point, keep, reason)] and
    the figures() of the points kept."""
    with DomuLock(config.state_dir, domu):
        points, _ = host_points(runner, domu)
        decided = retention.prune(points, config.settings_for(domu).retention)
        doomed = [p for p, keep, _ in decided if not keep]
        if doomed and not dry_run:  # journaled: a killed prune is finished by `cleanup`
            ex = Executor(Journal.create(config.state_dir, domu, "" if host == LOCAL else host), {host: runner},
                          timeout=config.settings_for(domu).command_timeout)
            with ex.closing():
                ex.run(pts.prune_steps(host, doomed, xml_dir(config, domu)))
    return [(p.name, keep, why) for p, keep, why in decided], figures([p for p, keep, _ in decided if keep])


def format_points(rows: list[dict]) -> str:
    if not rows:
        return "no restore points"
    lines = [f"{'DOMU':<16} {'HOST':<12} {'POINT':<17} {'STATUS':<10} {'CONSISTENCY':<11} {'KIND':<6} {'SIZE':>9}  FILL"]
    for r in rows:
        fill = "" if r["fill"] is None else f"{r['fill']:.0f}%"
        lines.append(f"{r['domu']:<16} {r['host']:<12} {r['name']:<17} {r['status']:<10} {r['consistency'] or '':<11} "
                     f"{r['kind']:<6} {r['size'] / 2**30:>7.2f}Gi  {fill}")
    return "\n".join(lines)
