"""Blocks mode (`mode = "blocks"`): each disk is copied as blocks, whatever is on it, and nothing
of the guest is mapped, mounted or parsed on either Dom0.

A run: the peer's DomU-state check; the replica LVs exist there, are closed and as large as
the origins (lvs only); this host's snapshots (the freeze window as in files mode); the
peer's `block-digests` of each replica: ``same`` without reading it when its write token is
the one this host kept with the replica's digests at the last OK run (state_dir/digests/,
blocksync-fast's way), else the xxh64 of each 4 MiB block read there (bdsync's way: a
missing or stale digest file costs a read of the replica, never a skipped block); this host
reads the snapshot, and streams only the blocks whose digest differs (an unchanged one as its
digest) into the peer's `receive-blocks`, which writes them, fsyncs and reads back what it
wrote: its checksum of the whole replica must equal the snapshot's, and then the digests and
the replica's new token are kept here for the next run. Then, as in files mode, the
replicas' mark is cleared or a restore point made, and the teardown (hosts/blockcopy.py)."""

from __future__ import annotations

import logging
import time

from ..core import commands as cmd, parsers, plan as planner, points as pts
from ..core.errors import CommandError, DomuBackupError, PeerError, SnapshotError
from ..core.model import LOCAL, DiskFacts, PartitionTable, RsyncStats
from ..core.config import rate_bytes
from ..hosts.blockcopy import CHUNK, BlockStream, block_count, cache_path, drop_digests, load_digests, save_digests, throttled
from ..hosts.journal import Journal
from .checks import SnapshotWatch, check_no_stale, check_vg_space
from .executor import Executor

log = logging.getLogger("domubackup")

def blocks_facts(disk, lv) -> DiskFacts:
    """A disk in blocks mode: its LV, nothing read of what is on it."""
    return DiskFacts(disk=disk, lv=lv, table=PartitionTable(label=planner.BLOCKS, size=lv.size, partitions=()))


def kept_digests(state_dir: str, domu: str, facts, peers) -> dict:
    """{(peer, disk): (token, digests)} kept here by the last OK run (or seed) of each replica."""
    kept = {}
    for peer in peers:
        for f in facts:
            got = load_digests(cache_path(state_dir, domu, peer, f.lv.vg, f.lv.lv), f.lv.size)
            if got is not None:
                kept[(peer, f.disk.target)] = got
    return kept


def thin_bases(facts, lvs, kept) -> dict:
    """{disk: generation} of the thin blocks-mode disks of FACTS whose base LV (LVS: the VG's
    LVs) exists and is the one the digests kept for at least one replica were made from."""
    from ..hosts.thin import BASE_TAG

    bases = {}
    for f in facts:
        if not planner.thin_blocks(f):
            continue
        base = next((lv for lv in lvs or () if (lv.vg, lv.lv) == (f.lv.vg, planner.base_name(f.lv.lv))), None)
        gens = sorted(t[len(BASE_TAG):] for t in base.tags if t.startswith(BASE_TAG)) if base else []
        if gens and any(k[2] == gens[-1] for (_, disk), k in kept.items() if disk == f.disk.target):
            bases[f.disk.target] = gens[-1]
    return bases


def changed_blocks(text: str) -> set[int]:
    """The 4 MiB blocks that `thin-delta`'s ranges (OFFSET LENGTH lines) touch."""
    out = set()
    for line in text.splitlines():
        offset, length = map(int, line.split())
        out.update(range(offset // CHUNK, (offset + length - 1) // CHUNK + 1))
    return out


def keep_digests(state_dir: str, domu: str, peer: str, f, received: str, stream) -> str:
    """After a receive-blocks whose output is RECEIVED: (theirs, the replica's token) checked
    against STREAM's checksum; the digests are kept for the next run. Returns the checksum;
    SnapshotError (and nothing kept) when the two ends differ."""
    theirs, token = parsers.parse_received(received)
    path = cache_path(state_dir, domu, peer, f.lv.vg, f.lv.lv)
    if theirs != stream.checksum:
        drop_digests(path)
        raise SnapshotError(f"{domu}: {f.disk.target}: the checksum of {peer}:{cmd.lv_path(f.lv.vg, f.lv.lv)} "
                            f"differs after the copy (here {stream.checksum}, there {theirs or 'none'})",
                            hint="run again: the next run compares every block anew")
    save_digests(path, f.lv.size, token, stream.digests)
    return theirs


def plan_blocks(domu: str, facts, settings, peers, *, frozen=False, tokens=None, bases=None) -> planner.Plan:
    """Every disk in blocks mode. TOKENS: {(peer, disk): the write token kept with that replica's
    digests here}; BASES: {disk: the generation of its thin base} (planner.thin_steps)."""
    plan = planner.Plan(domu, notes=["mode blocks: each disk is copied as its changed 4 MiB blocks; nothing of "
                                     "the guest is mapped or mounted on either host"])
    waits = ("snapshots",) if frozen else ("checked",)
    replicas = [(f.lv.vg, f.lv.lv) for f in facts]
    lanes = []
    for peer in peers:
        check, *copies = planner.block_steps(domu, peer, facts, settings, waits=waits, tokens=tokens, bases=bases)
        lanes += [planner.check(peer, "peer-state", note=f"{domu} is not running on {peer}",
                                waits=waits if frozen else ()),
                  check, pts.mark_writing(domu, peer, replicas), *copies]
    plan.after = planner.after_ok(domu, settings, peers, replicas)
    plan.steps = planner.snapshots_checked(facts, settings) + planner.thin_steps(facts, settings, peers, bases) + lanes
    return plan


def plan_blocks_verify(domu: str, facts, settings, peers) -> planner.Plan:
    """`verify` with every disk in blocks mode (planner.block_verify_steps)."""
    plan = planner.Plan(domu, notes=["mode blocks: the digest of every 4 MiB block of each replica is compared "
                                     "with its snapshot's; nothing is written"])
    states = [planner.check(peer, "peer-state", note=f"{domu} is not running on {peer}") for peer in peers]
    plan.steps = planner.snapshots_checked(facts, settings) + states + planner.block_verify_steps(domu, facts,
                                                                                                  settings, peers)
    return plan


GROWN = 4 << 20  # a replica larger than its origin by this much (an LVM extent) means a shrunk origin


def check_block_replicas(domu, facts, host, runner, *, extend=False) -> str:
    """Check step "block-replicas" (and `check`): each replica LV exists on HOST, is closed, is
    no snapshot, and holds its origin's bytes (lvs only: nothing on it is read). A replica
    smaller than its origin (the disk grew) is extended there first when EXTEND (a run; `check`
    only says so); one larger by an extent or more (the origin shrank) is refused."""
    grown = []
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
        if replica.size >= f.lv.size + GROWN:
            raise PeerError(f"{domu}: replica {path} on {host} has {replica.size} bytes, more than its origin "
                            f"({f.lv.size}): was the origin shrunk?",
                            hint=f"a shrink is not copied: lvreduce the replica to {f.lv.size} bytes there if "
                                 "the guest's data fits, or seed again")
        if replica.size < f.lv.size:
            if extend:
                runner.run(["lvextend", "--size", f"{f.lv.size}b", path])
                log.info("%s: the disk grew: replica %s on %s extended from %d to %d bytes", domu, path, host,
                         replica.size, f.lv.size)
            grown.append(f"{path} {'extended' if extend else 'to be extended'} from {replica.size} to "
                         f"{f.lv.size} bytes")
    return "present, closed, large enough (blocks mode)" + (f"; {'; '.join(grown)}" if grown else "")


class Blocks:
    """One blocks-mode backup of a job's DomU (the Backup job's outcome and points phase)."""

    def __init__(self, backup):
        self.b = backup
        self.job, self.settings, self.domu = backup.job, backup.settings, backup.domu
        self.digests: dict[tuple[str, str], list[bytes]] = {}  # (peer, disk) -> the replica's block digests
        self.whence: dict[tuple[str, str], str] = {}  # (peer, disk) -> where they came from, for the report
        self.kept_used: set[tuple[str, str]] = set()  # (peer, disk) whose kept digests the peer confirmed
        self.streams: dict = {}  # blocks step -> (BlockStream, start, its progress bar or None)
        self.read: dict[tuple[str, str], list[bytes]] = {}  # verify: (host, disk) -> the digests read there
        self.only: dict[str, set[int]] = {}  # thin disk -> the blocks thin_delta says may have changed
        self.sent = self.blocks_read = self.blocks_changed = 0

    def run(self, plan) -> None:
        """PLAN: plan_blocks' (Backup.run made it)."""
        b, job, settings = self.b, self.job, self.settings
        b.journal = Journal.create(job.config.state_dir, self.domu, ",".join(job.insp.peers))
        snaps = [cmd.lv_path(f.lv.vg, planner.snapshot_name(settings, f.lv.lv)) for f in job.insp.facts
                 if not planner.thin_blocks(f)]  # a thin snapshot has no fill level of its own
        b.watch = SnapshotWatch(job.runners[LOCAL], snaps, settings, on_abort=getattr(job.runners[LOCAL], "cancel", None))
        ex = Executor(b.journal, job.runners, timeout=settings.command_timeout, feed=self.feed,
                      checks={"vg-space": lambda s: check_vg_space(
                                  [f for f in job.insp.facts if not planner.thin_blocks(f)], settings),
                              "no-stale": lambda s: check_no_stale(job.insp, settings, job.runners[LOCAL], self.domu),
                              "peer-state": job.check_peer_state, **self.checks()},
                      callbacks=self.callbacks(),
                      freeze=b.freeze, on_mark={"snapshots": lambda: b._snapshots(ex)})
        with ex.closing():
            try:
                ex.run(plan.steps)
            finally:
                b.out.freeze = ex.freeze_report
                b.watch.stop()
                self.close_meters()
            problem = b.watch.problem or b.watch.check(final=True)
            b.out.snapshot_peak = b.watch.peak
            if problem:
                raise SnapshotError(f"{self.domu}: {problem}", hint="raise snapshot_size, or back up at a quieter time")
        b.out.stats = RsyncStats(total_size=sum(f.lv.size for f in job.insp.facts) * len(job.insp.peers),
                                 bytes_sent=self.sent, blocks_read=self.blocks_read, blocks_changed=self.blocks_changed)
        if b.out.differences:
            raise DomuBackupError(f"{self.domu}: the replica differs from the snapshot in {len(b.out.differences)} "
                                  "place(s): " + "; ".join(b.out.differences[:20])
                                  + (" ..." if len(b.out.differences) > 20 else ""),
                                  hint="the next `domubackup run` repairs it")
        b.out.status, b.out.exit_code = "OK", 0
        if plan.after:
            b._point(plan.after)

    def close_meters(self) -> None:
        """The progress bars of streams that did not end (a failed run)."""
        for _, _, meter in self.streams.values():
            if meter is not None:
                meter.close()

    def checks(self) -> dict:
        """The executor's checks of the blocks-mode disks (also those of a mixed DomU's run)."""
        facts = [f for f in self.job.insp.facts if planner.is_blocks(f)]
        return {"block-replicas": lambda s: check_block_replicas(self.domu, facts, s.host, self.job.runners[s.host],
                                                                 extend=True)}

    def callbacks(self) -> dict:
        return {"digests": self._digested, "blocks": self._received, "compare": self._compare,
                "delta": self._delta, "based": self._based}

    def _delta(self, step, res):
        if res.exit_code != 0:
            raise CommandError(step.host, step.argv, res.exit_code, res.stderr,
                               hint="remove the base LV to fall back to reading the whole disk")
        try:
            self.only[step.about[0]] = changed_blocks(res.stdout)
        except ValueError:
            raise DomuBackupError(f"{self.domu}: {step.note}: cannot read its output: {res.stdout[:200]!r}") from None

    def _based(self, step, res):
        """The new thin base exists: the digests kept for each replica of the disk are of it."""
        if res.exit_code != 0:
            raise CommandError(step.host, step.argv, res.exit_code, res.stderr)
        gen, f = res.stdout.strip(), self._fact(step.about[0])
        for peer in self.job.insp.peers:
            path = cache_path(self.job.config.state_dir, self.domu, peer, f.lv.vg, f.lv.lv)
            kept = load_digests(path, f.lv.size)
            if kept is not None:
                save_digests(path, f.lv.size, kept[0], kept[1], gen)

    def _fact(self, disk):
        return next(f for f in self.job.insp.facts if f.disk.target == disk)

    def _digested(self, step, res):
        if res.exit_code != 0:
            raise CommandError(step.host, step.argv, res.exit_code, res.stderr)
        key, kept = (step.host, step.about[0]), self.job.insp.digests.get((step.host, step.about[0]))
        try:
            got = parsers.parse_digests(res.stdout, block_count(self._fact(step.about[0]).lv.size))
        except ValueError as e:
            raise PeerError(f"{self.domu}: {step.note}: {e}", hint="check the replica on the peer") from None
        if got is None and kept is None:
            raise PeerError(f"{self.domu}: {step.note}: `same` from {step.host}, but no digests are kept here")
        self.digests[key] = kept[1] if got is None else got
        if got is None:
            self.kept_used.add(key)
        self.whence[key] = ("kept here (nothing wrote to the replica since)" if got is None else
                            "read there" + (" (the replica was written since the last run, or its host restarted)"
                                            if kept else ""))

    def _compare(self, step, res):
        """Verify: the digests of a snapshot (here) or a replica (a peer); once a disk's
        snapshot and a replica are both known, every block that differs is a difference."""
        if res.exit_code != 0:
            raise CommandError(step.host, step.argv, res.exit_code, res.stderr)
        disk = step.about[0]
        size = self._fact(disk).lv.size
        try:
            self.read[(step.host, disk)] = parsers.parse_digests(res.stdout, block_count(size))
        except ValueError as e:
            raise DomuBackupError(f"{self.domu}: {step.note}: {e}") from None
        ours = self.read.get((LOCAL, disk))
        for peer in self.job.insp.peers if step.host == LOCAL else (step.host,):
            theirs = self.read.get((peer, disk)) if ours is not None else None
            if theirs is None:
                continue
            bad = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
            self.b.out.differences += [f"{peer}: {disk}: the 4 MiB block at {i * CHUNK} differs" for i in bad]
            self.job.out.report.append(f"{disk}: {len(ours) - len(bad)} of {len(ours)} blocks of 4 MiB equal on "
                                       f"{peer}")

    def feed(self, step):
        if step.phase != "blocks":
            return None
        f = self._fact(step.about[0])
        snap = cmd.lv_path(f.lv.vg, planner.snapshot_name(self.settings, f.lv.lv))
        key = (step.host, step.about[0])
        kept = self.job.insp.digests.get(key)
        # thin_delta's blocks only when the replica holds what the base held: its digests were
        # kept here (nothing wrote to it since) and made from that base
        only = (self.only.get(step.about[0]) if key in self.kept_used
                and kept[2] == self.job.insp.bases.get(step.about[0]) else None)
        meter = self.b.progress.meter(f"blocks {snap} -> {step.host}", f.lv.size) if self.b.progress else None
        blocks = BlockStream(snap, f.lv.size, same=self.digests.pop(key), only=only,
                             compress=self.settings.rsync.compress,
                             progress=(lambda done, total, sent: meter.to(done, total)) if meter else None)
        self.streams[step] = (blocks, time.monotonic(), meter)
        stream = throttled(blocks, rate_bytes(self.settings.rsync.bwlimit))
        if only is not None and not only:
            # thin_delta names no block: the stream is its S records (a few KiB), given whole
            # (bytes) to the runner, which sends them over its open connection instead of a
            # new OpenSSH one (a handshake: ~2 s under the lab's emulation)
            return b"".join(bytes(chunk) for chunk in stream)
        return stream

    def _received(self, step, res):
        blocks, start, meter = self.streams.pop(step)
        if meter is not None:
            meter.close()
        if res.exit_code != 0:
            raise CommandError(step.host, step.argv, res.exit_code, res.stderr)
        ours = keep_digests(self.job.config.state_dir, self.domu, step.host, self._fact(step.about[0]), res.stdout,
                            blocks)
        self.sent += blocks.sent
        self.blocks_read += blocks.read
        self.blocks_changed += blocks.changed
        line = (f"{step.note}: {blocks.changed} of {blocks.blocks} blocks of 4 MiB changed, {blocks.read} read"
                f"{' (thin_delta)' if blocks.only is not None else ''}, {blocks.sent} bytes "
                f"sent in {time.monotonic() - start:.1f}s, checksum {ours[:16]}... matches; the replica's digests "
                f"{self.whence.pop((step.host, step.about[0]), 'unknown')}")
        self.job.out.report.append(line)
        log.info("%s: %s", self.domu, line)
