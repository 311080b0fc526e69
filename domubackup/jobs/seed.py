"""`domubackup seed DOMU`: the first full copy of each disk to the replica LV on the peer.

Create the replica LV if missing (same VG/LV name and size), snapshot the origin, stream the
snapshot block for block over the peer's SSH connection into its `receive-blocks` (a zero
block is sent as a 13-byte header, not as data, and zeroed there with BLKZEROOUT; a
compressible one travels zlib-compressed), then compare a checksum of both ends: the SHA-256
of the xxh64 digests of every 4 MiB block, read back from the replica device
(hosts/blockcopy.py). The digests and the replica's write token are kept here, so that the
first blocks-mode run after a seed reads nothing of the replica: a seed is that mode's first,
full, run. The snapshots are journaled like a backup's, so a crash is cleaned by `cleanup`."""

from __future__ import annotations

import logging
import time

from dataclasses import replace

from ..core import commands as cmd, parsers, plan as planner
from ..core.errors import CommandError, PeerError, SnapshotError
from .executor import Executor
from .frame import run_job, ssh_runner
from ..hosts.journal import Journal
from ..core.model import RsyncStats
from ..hosts.blockcopy import BlockStream
from .blocks import keep_digests

log = logging.getLogger("domubackup")


def vg_free(runner, vg: str) -> int:
    res = runner.run(["vgs", "--noheadings", "--nosuffix", "--units", "b", "-o", "vg_free", vg], check=False)
    if res.exit_code != 0:
        raise PeerError(f"volume group {vg} does not exist on {runner.host}",
                        hint=f"create {vg} on {runner.host} first (the replica uses the same VG/LV names)")
    return int(float(res.stdout.strip()))


def prepare_replica(runner, f, domu: str, *, force: bool) -> str:
    """Make sure the replica LV of disk facts `f` exists (created tagged ``dbk:domu:DOMU``: a
    restricted peer's serve knows it as DOMU's from then on), is closed, big enough, and may be
    overwritten. Returns what was done, for the log."""
    vg, lv, size = f.lv.vg, f.lv.lv, f.lv.size
    path = cmd.lv_path(vg, lv)
    res = runner.run(parsers.lvs_argv(path), check=False)
    if res.exit_code != 0:
        free = vg_free(runner, vg)
        if free < size:
            raise PeerError(f"volume group {vg} on {runner.host} has {free} bytes free, the replica of "
                            f"{vg}/{lv} needs {size}: {size - free} bytes missing",
                            hint=f"free space in {vg} on {runner.host}")
        runner.run(["lvcreate", "--yes", "--size", f"{size}b", "--name", lv, "--addtag", f"dbk:domu:{domu}", vg])
        return f"created {path} ({size} bytes) on {runner.host}"
    replica = parsers.parse_lvs(res.stdout)[0]
    if replica.is_open:
        raise PeerError(f"replica {path} is open on {runner.host} (a running guest or a mount)",
                        hint="stop whatever uses it first")
    if replica.size < size:
        raise PeerError(f"replica {path} on {runner.host} has {replica.size} bytes, the origin {size}",
                        hint=f"lvextend it to at least {size} bytes, or remove it and seed again")
    probe = runner.run(["blkid", "-p", "-o", "export", path], ok_codes=(0, 2))
    if probe.exit_code == 0 and not force:
        found = parsers.parse_blkid(probe.stdout)
        what = found.get("TYPE") or found.get("PTTYPE") or "data"
        raise PeerError(f"replica {path} on {runner.host} exists and is not empty (it holds {what})",
                        hint="seed overwrites it whole: pass --force if that is what you want")
    return f"overwriting {path} on {runner.host}"


def plan_seed(domu: str, facts, settings, peers) -> planner.Plan:
    """On each peer: the DomU not running there, each replica LV ready (created when missing:
    it stays, it is the replica); then this host's snapshots; then each disk streamed to each
    peer (judged by the "seed" callback: the checksums of both ends)."""
    lanes = []
    for peer in peers:
        lane = [planner.check(peer, "peer-state", note=f"{domu} is not running on {peer}")]
        lane += [planner.check(peer, "replica", f.disk.target,
                               note=f"{f.disk.target}: the replica {cmd.lv_path(f.lv.vg, f.lv.lv)} on {peer} exists "
                                    "(made when missing), is closed, big enough, and empty unless --force")
                 for f in facts]
        lanes.append(planner._mark_last(lane, f"prepared:{peer}"))
        for i, f in enumerate(facts):
            snap = cmd.lv_path(f.lv.vg, planner.snapshot_name(settings, f.lv.lv))
            target = cmd.lv_path(f.lv.vg, f.lv.lv)
            lanes[-1].append(planner.Step("seed", peer, cmd.receive_blocks(target, f.lv.size), None, then="seed",
                                          note=f"{f.disk.target}: {snap} -> {peer}:{target}", timeout=24 * 3600,
                                          waits=("snapshots",) if i == 0 else (), about=(f.disk.target,)))
    snaps = planner._mark_last(planner.snapshot_steps(facts, settings), "snapshots")
    snaps[0] = replace(snaps[0], waits=tuple(f"prepared:{p}" for p in peers))
    return planner.Plan(domu, steps=snaps + [s for lane in lanes for s in lane])


def seed(config, domu: str, conn, local, *, force=False, bars=None, catalog=None, log_path=None,
         factory=None):
    """`domubackup seed DOMU` as a job (jobs.run_job): its outcome's report has a line per
    replica prepared and per disk copied. ``bars`` (a progress.Progress, on a terminal) draws
    a bar per disk and peer."""
    return run_job(config, domu, "seed", conn, local, lambda job: Seed(job, force=force, bars=bars).run(),
                   factory=factory or ssh_runner, catalog=catalog, log_path=log_path)


class Seed:
    def __init__(self, job, *, force=False, bars=None):
        self.job, self.force, self.bars = job, force, bars
        self.streams: dict = {}  # seed step -> (BlockStream, meter, start)

    def run(self) -> None:
        job = self.job
        ex = Executor(Journal.create(job.config.state_dir, job.domu, ",".join(job.insp.peers)), job.runners,
                      timeout=job.settings.command_timeout, feed=self._feed, callbacks={"seed": self._seeded},
                      checks={"peer-state": job.check_peer_state, "replica": self._replica})
        try:
            with ex.closing():
                ex.run(plan_seed(job.domu, job.insp.facts, job.settings, job.insp.peers).steps)
        finally:
            for _, meter, _ in self.streams.values():
                if meter is not None:
                    meter.close()
        job.out.stats = RsyncStats(total_size=sum(f.lv.size for f in job.insp.facts))
        job.out.status, job.out.exit_code = "OK", 0

    def _disk(self, target: str):
        return next(f for f in self.job.insp.facts if f.disk.target == target)

    def _replica(self, step) -> None:
        self.job.out.report.append(prepare_replica(self.job.runners[step.host], self._disk(step.check[1]),
                                                   self.job.domu, force=self.force))

    def _feed(self, step):
        if step.phase != "seed":
            return None
        f = self._disk(step.about[0])
        snap = cmd.lv_path(f.lv.vg, planner.snapshot_name(self.job.settings, f.lv.lv))
        meter = self.bars.meter(f"seed {snap} -> {step.host}", f.lv.size) if self.bars else None
        last = [0.0]

        def progress(done, total, sent):
            if meter:
                meter.to(done, total)
            if done == total or time.monotonic() - last[0] > 5:
                last[0] = time.monotonic()
                log.info("seed %s: %d%% (%d MiB sent)", step.note.split(": ", 1)[1], done * 100 // total, sent >> 20)

        blocks = BlockStream(snap, f.lv.size, progress)
        self.streams[step] = (blocks, meter, time.monotonic())
        return blocks

    def _seeded(self, step, res) -> None:
        blocks, meter, start = self.streams.pop(step)
        if meter is not None:
            meter.close()
        if res.exit_code != 0:
            raise CommandError(step.host, step.argv, res.exit_code, res.stderr)
        try:
            ours = keep_digests(self.job.config.state_dir, self.job.domu, step.host, self._disk(step.about[0]),
                                res.stdout, blocks)
        except SnapshotError as e:
            raise SnapshotError(f"seed: {e.message}", hint="seed again") from None
        self.job.out.report.append(f"{step.note}: {step.argv[-1]} bytes in {time.monotonic() - start:.1f}s, "
                                   f"checksum {ours[:16]}... matches")
