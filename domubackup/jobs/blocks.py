"""Blocks mode (`mode = "blocks"`): each disk is copied as blocks, whatever is on it, and nothing
of the guest is mapped, mounted or parsed on either Dom0.

A run: the peer's DomU-state check; the replica LVs exist there, are closed and as large as
the origins (lvs only); this host's snapshots (the freeze window as in files mode); the
peer reads its replica and prints the SHA-256 of each 4 MiB block (DIGESTS, bdsync's way:
no state is kept between runs, so nothing can be stale); this host reads the snapshot, and
streams only the blocks whose digest differs (an unchanged one as its digest) into seed's
RECEIVER there, which writes them, fsyncs and reads back what it wrote: its checksum of the
whole replica must equal the snapshot's. Then, as in
files mode, the replicas' mark is cleared or a restore point made, and the teardown."""

from __future__ import annotations

import logging
import time

from ..core import commands as cmd, parsers, plan as planner, points as pts
from ..core.errors import CommandError, PeerError, SnapshotError
from ..core.model import LOCAL, DiskFacts, PartitionTable, RsyncStats, Step
from ..hosts.blockcopy import BlockStream
from ..hosts.journal import Journal
from .checks import SnapshotWatch, check_no_stale, check_vg_space
from .executor import Executor
from .seed import receive_argv

log = logging.getLogger("domubackup")

# Runs on the peer as `python3 -c DIGESTS DEV SIZE`: one hex SHA-256 per 4 MiB block of DEV.
DIGESTS = r"""
import hashlib, os, sys
dev, size = sys.argv[1], int(sys.argv[2])
CHUNK = 4 << 20
zero = bytes(CHUNK)
zd = {}
fd = os.open(dev, os.O_RDONLY)
out, off = [], 0
while off < size:
    b = os.pread(fd, min(CHUNK, size - off), off)
    if not b:
        sys.exit(f"{dev}: read ended at {off} of {size} bytes")
    if b == zero[:len(b)]:
        out.append(zd.get(len(b)) or zd.setdefault(len(b), hashlib.sha256(b).hexdigest()))
    else:
        out.append(hashlib.sha256(b).hexdigest())
    off += len(b)
print("\n".join(out))
"""


def digests_argv(dev: str, size: int) -> tuple[str, ...]:
    return ("python3", "-c", DIGESTS, dev, str(size))


def blocks_facts(disk, lv) -> DiskFacts:
    """A disk in blocks mode: its LV, nothing read of what is on it."""
    return DiskFacts(disk=disk, lv=lv, table=PartitionTable(label="blocks", size=lv.size, partitions=()))


def plan_blocks(domu: str, facts, settings, peers, *, frozen=False) -> planner.Plan:
    plan = planner.Plan(domu, notes=["mode blocks: each disk is copied as its changed 4 MiB blocks; nothing of "
                                     "the guest is mapped or mounted on either host"])
    local = planner.snapshots_checked(facts, settings)
    waits = ("snapshots",) if frozen else ("checked",)
    replicas = [(f.lv.vg, f.lv.lv) for f in facts]
    lanes = []
    for peer in peers:
        lanes += [planner.check(peer, "peer-state", note=f"{domu} is not running on {peer}",
                                waits=waits if frozen else ()),
                  planner.check(peer, "block-replicas", waits=waits,
                                note=f"the replica LVs on {peer} exist, are closed and as large as the origins"),
                  pts.mark_writing(domu, peer, replicas)]
        for i, f in enumerate(facts):
            target, size = cmd.lv_path(f.lv.vg, f.lv.lv), f.lv.size
            snap = cmd.lv_path(f.lv.vg, planner.snapshot_name(settings, f.lv.lv))
            lanes += [Step("digests", peer, digests_argv(target, size), None, then="digests", timeout=24 * 3600,
                           about=(f.disk.target,), note=f"{f.disk.target}: the digest of each block of {target}"),
                      Step("blocks", peer, receive_argv(target, size), None, then="blocks", timeout=24 * 3600,
                           waits=("snapshots",) if i == 0 else (), about=(f.disk.target,),
                           note=f"{f.disk.target}: the changed blocks of {snap} -> {peer}:{target}")]
    plan.after = planner.after_ok(domu, settings, peers, replicas)
    plan.steps = local + lanes
    return plan


def check_block_replicas(domu, facts, host, runner) -> str:
    """Check step "block-replicas" (and `check`): each replica LV exists on HOST, is closed, is
    no snapshot, and holds at least its origin's bytes (lvs only: nothing on it is read)."""
    for f in facts:
        path = cmd.lv_path(f.lv.vg, f.lv.lv)
        res = runner.run(parsers.lvs_argv(path), check=False)
        if res.exit_code != 0:
            raise PeerError(f"{domu}: replica {path} does not exist on {host}",
                            hint=f"create and seed it: `domubackup seed {domu}`")
        replica = parsers.parse_lvs(res.stdout)[0]
        if replica.is_open:
            raise PeerError(f"{domu}: replica {path} is open on {host} (in use by a guest or a mount)",
                            hint="find the user with `lsblk` / `dmsetup info` there")
        if replica.is_snapshot:
            raise PeerError(f"{domu}: replica {path} on {host} is an LVM snapshot",
                            hint="the replica is an LV of its own (`domubackup seed` makes it)")
        if replica.size < f.lv.size:
            raise PeerError(f"{domu}: replica {path} on {host} has {replica.size} bytes, the origin {f.lv.size}",
                            hint=f"lvextend it to at least {f.lv.size} bytes there")
    return "present, closed, large enough (blocks mode)"


class Blocks:
    """One blocks-mode backup of a job's DomU (the Backup job's outcome and points phase)."""

    def __init__(self, backup):
        self.b = backup
        self.job, self.settings, self.domu = backup.job, backup.settings, backup.domu
        self.digests: dict[tuple[str, str], list[str]] = {}  # (peer, disk) -> the replica's block digests
        self.streams: dict = {}  # blocks step -> (BlockStream, start)
        self.sent = 0

    def run(self, plan) -> None:
        """PLAN: plan_blocks' (Backup.run made it)."""
        b, job, settings = self.b, self.job, self.settings
        b.journal = Journal.create(job.config.state_dir, self.domu, ",".join(job.insp.peers))
        snaps = [cmd.lv_path(f.lv.vg, planner.snapshot_name(settings, f.lv.lv)) for f in job.insp.facts]
        b.watch = SnapshotWatch(job.runners[LOCAL], snaps, settings, on_abort=getattr(job.runners[LOCAL], "cancel", None))
        ex = Executor(b.journal, job.runners, timeout=settings.command_timeout, feed=self._feed,
                      checks={"vg-space": lambda s: check_vg_space(job.insp.facts, settings),
                              "no-stale": lambda s: check_no_stale(job.insp, settings, job.runners[LOCAL], self.domu),
                              "peer-state": job.check_peer_state,
                              "block-replicas": lambda s: check_block_replicas(
                                  self.domu, job.insp.facts, s.host, job.runners[s.host])},
                      callbacks={"digests": self._digested, "blocks": self._received},
                      freeze=b.freeze, on_mark={"snapshots": lambda: b._snapshots(ex)})
        with ex.closing():
            try:
                ex.run(plan.steps)
            finally:
                b.out.freeze = ex.freeze_report
                b.watch.stop()
            problem = b.watch.problem or b.watch.check(final=True)
            b.out.snapshot_peak = b.watch.peak
            if problem:
                raise SnapshotError(f"{self.domu}: {problem}", hint="raise snapshot_size, or back up at a quieter time")
        b.out.stats = RsyncStats(total_size=sum(f.lv.size for f in job.insp.facts) * len(job.insp.peers),
                                 bytes_sent=self.sent)
        b.out.status, b.out.exit_code = "OK", 0
        if plan.after:
            b._point(plan.after)

    def _digested(self, step, res):
        if res.exit_code != 0:
            raise CommandError(step.host, step.argv, res.exit_code, res.stderr)
        self.digests[(step.host, step.about[0])] = res.stdout.split()

    def _feed(self, step):
        if step.phase != "blocks":
            return None
        f = next(f for f in self.job.insp.facts if f.disk.target == step.about[0])
        snap = cmd.lv_path(f.lv.vg, planner.snapshot_name(self.settings, f.lv.lv))
        blocks = BlockStream(snap, f.lv.size, same=self.digests.pop((step.host, step.about[0])))
        self.streams[step] = (blocks, time.monotonic())
        return blocks

    def _received(self, step, res):
        blocks, start = self.streams.pop(step)
        if res.exit_code != 0:
            raise CommandError(step.host, step.argv, res.exit_code, res.stderr)
        theirs, ours = res.stdout.strip(), blocks.sha256
        if theirs != ours:
            raise SnapshotError(f"{step.note}: the replica's checksum differs after the copy (here {ours}, there "
                                f"{theirs})", hint="run again: the next run compares every block anew")
        self.sent += blocks.sent
        line = (f"{step.note}: {blocks.changed} of {blocks.blocks} blocks of 4 MiB changed, {blocks.sent} bytes "
                f"sent in {time.monotonic() - start:.1f}s, sha256 {ours[:16]}... matches")
        self.job.out.report.append(line)
        log.info("%s: %s", self.domu, line)
