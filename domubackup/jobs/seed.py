"""`domubackup seed DOMU`: the first full copy of each disk to the replica LV on the peer.

Create the replica LV if missing (same VG/LV name and size), snapshot the origin, stream the
snapshot block for block over the peer's SSH connection (a zero block is sent as a 13-byte
header, not as data, and zeroed there with BLKZEROOUT; a compressible one travels
zlib-compressed), then compare a checksum of both ends: the SHA-256 of the SHA-256 digests of
every 4 MiB block, read back from the replica device (a block of zeros is recognised by a
compare and gets the digest of zeros without hashing it: a mostly empty disk is cheap to check,
every byte is still read and compared). The snapshots are journaled like a backup's, so a crash
is cleaned by `cleanup`."""

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

log = logging.getLogger("domubackup")


# The SHA-256 of the SHA-256 digests of the 4 MiB blocks of the first SIZE bytes of DEV, read
# back from the device itself (O_DIRECT where it can): BlockStream computes the same while it
# reads (seed, restore).
READBACK = r"""
# read back from the device itself (O_DIRECT: not what the page cache remembers)
total, zd = hashlib.sha256(), {}
try:
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
except OSError:
    fd = os.open(dev, os.O_RDONLY)
buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT wants
off = 0
while off < size:
    if off in known:  # a block the sender found unchanged: the digest this host sent it
        total.update(known[off])
        off += min(CHUNK, size - off)
        continue
    try:
        got = os.preadv(fd, [memoryview(buf)[:min(CHUNK, size - off)]], off)
    except OSError:  # O_DIRECT refused this size: the rest without it
        os.close(fd)
        fd = os.open(dev, os.O_RDONLY)
        got = os.preadv(fd, [memoryview(buf)[:min(CHUNK, size - off)]], off)
    if not got:
        break
    b = buf[:got]
    if b == zero[:got]:
        total.update(zd.setdefault(got, hashlib.sha256(b).digest()))
    else:
        total.update(hashlib.sha256(b).digest())
    off += got
print(total.hexdigest())
"""
# Runs on the peer as `python3 -c RECEIVER DEV SIZE`: writes what arrives on stdin at its
# offsets, fsyncs, then prints READBACK's checksum of DEV. An S record (blocks mode) carries
# the SHA-256 that this host's DIGESTS gave the block, unchanged: it is not read back.
RECEIVER = r"""
import fcntl, hashlib, mmap, os, struct, sys, zlib
dev, size = sys.argv[1], int(sys.argv[2])
H = struct.Struct(">cQI")
CHUNK = 4 << 20
zero = bytes(CHUNK)
inp = sys.stdin.buffer
def read(n):
    b = bytearray()
    while len(b) < n:
        part = inp.read(n - len(b))
        if not part:
            sys.exit("stream ended early")
        b += part
    return bytes(b)
def zero_out(fd, off, n):
    try:  # BLKZEROOUT: the device zeroes the range (write-zeroes offload, or the kernel writes)
        fcntl.ioctl(fd, 0x127F, struct.pack("QQ", off, n))
    except OSError:
        os.pwrite(fd, zero[:n], off)
fd = os.open(dev, os.O_WRONLY)
known = {}
while True:
    h = inp.read(H.size)
    if not h:
        break
    if len(h) < H.size:
        h += read(H.size - len(h))
    kind, off, n = H.unpack(h)
    if off + n > size and kind != b"S":
        sys.exit("write past the end of the replica")
    if kind == b"S":
        if n != 32 or off % CHUNK or off >= size:
            sys.exit("a bad unchanged-block record")
        known[off] = read(n)
    elif kind == b"D":
        os.pwrite(fd, read(n), off)
    elif kind == b"C":
        data = zlib.decompress(read(n))
        if off + len(data) > size or len(data) > CHUNK:
            sys.exit("write past the end of the replica")
        os.pwrite(fd, data, off)
    else:
        zero_out(fd, off, n)
os.fsync(fd)
os.close(fd)""" + READBACK


def vg_free(runner, vg: str) -> int:
    res = runner.run(["vgs", "--noheadings", "--nosuffix", "--units", "b", "-o", "vg_free", vg], check=False)
    if res.exit_code != 0:
        raise PeerError(f"volume group {vg} does not exist on {runner.host}",
                        hint=f"create {vg} on {runner.host} first (the replica uses the same VG/LV names)")
    return int(float(res.stdout.strip()))


def prepare_replica(runner, f, *, force: bool) -> str:
    """Make sure the replica LV of disk facts `f` exists, is closed, big enough, and may be
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
        runner.run(["lvcreate", "--yes", "--size", f"{size}b", "--name", lv, vg])
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


def receive_argv(target: str, size: int) -> tuple[str, ...]:
    return ("python3", "-c", RECEIVER, target, str(size))



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
            lanes[-1].append(planner.Step("seed", peer, receive_argv(target, f.lv.size), None, then="seed",
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
                                                   force=self.force))

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
        theirs, ours = res.stdout.strip(), blocks.sha256
        target = step.argv[-2]
        if theirs != ours:
            raise SnapshotError(f"seed of {target} on {step.host}: checksum differs "
                                f"(here {ours}, there {theirs})", hint="seed again")
        self.job.out.report.append(f"{step.note}: {step.argv[-1]} bytes in {time.monotonic() - start:.1f}s, "
                                   f"sha256 {ours[:16]}... matches")
