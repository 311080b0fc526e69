"""Block streams and copies of whole devices, and the helpers that run them (entry.py):

- `domubackup receive-blocks DEV SIZE` reads a `BlockStream` on standard input and writes it to
  the first SIZE bytes of DEV (O_DIRECT where it can), fsyncs, takes DEV's write token, then
  reads back from the device everything it wrote and prints the checksum of DEV, then
  ``token T``: what seed, blocks mode and a restore run on the receiving host.
- `domubackup block-digests DEV SIZE TOKEN` prints ``same`` without reading DEV when its write
  token is still TOKEN (nothing wrote to it since that receive), else one hex digest per block:
  blocks mode's view of a replica.
- `domubackup send-blocks DEV SIZE` writes DEV's `BlockStream` to standard output and its
  checksum to standard error last, as ``checksum HEX`` (a restore's sending end).
- `domubackup copy-blocks SRC DST SIZE`: the first SIZE bytes of DST become SRC's, by 4 MiB
  blocks, writing only the blocks that differ, and of those only the 4 KiB pages that differ
  (where both are zeros a thin DST stays thin); DST is fsynced, then every block written is
  read back from the device (its cached pages dropped first) and compared with SRC's. Prints
  "BLOCKS WRITTEN". A helper of `rollback`, on the host that holds both LVs.
Each exits 1 with the reason on standard error when it fails, 2 on a bad command line.

The digest of a block is its xxh64 (python-xxhash: the C library; scalar code, so it runs at
memory speed on any CPU: 2.8 GB/s under the lab's TCG emulation, where xxh3's SIMD code
manages 0.28 GB/s and SHA-256 less; a block's digest is only ever compared with the digest of
the same block elsewhere, so 64 bits leave a corruption unseen with odds of 2^-64); a disk's
checksum is the SHA-256 of its blocks' digests. A guest that crafts xxh64 collisions can only
leave its own replica stale, and `verify` reads both ends whole.

The write token of a block device is ``BOOT_ID/MAJ:MIN/WS,DS``: the kernel's counts of
sectors written and discarded on that device (/sys/dev/block/MAJ:MIN/stat). Not the counts of
write requests: an empty flush counts as a write request of 0 sectors there (each fsync of the
device, at times after the receiver ended: a kept token was stale by 2 requests in the lab),
and changes nothing; every write of data adds its sectors, write-zeroes included. Any
write to the device (files mode's rsync through a partition on it, a rollback, an admin's dd),
a reboot or a re-activation changes it; reads, LV tags and snapshots of the LV do not (measured
in the lab). A regular file's token (tests) is its inode, mtime and size."""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import queue
import stat
import struct
import sys
import threading
import time
import zlib

import xxhash

from ..core.errors import SnapshotError

CHUNK = 4 << 20
PAGE = 4096  # the smallest chunk of an LVM snapshot
DIGEST = 8  # bytes of a block's digest (xxh64)
HEADER = struct.Struct(">cQI")  # kind (D data / C zlib data / Z zeros / S same: its digest), offset, length
ZERO = bytes(CHUNK)
_ZERO_DIGESTS: dict[int, bytes] = {}


def block_count(size: int) -> int:
    """How many 4 MiB blocks (the last one maybe short) SIZE bytes are."""
    return -(-size // CHUNK)


def digest(block) -> bytes:
    """The xxh64 of BLOCK (bytes or a memoryview)."""
    return xxhash.xxh64_digest(block)


def zero_digest(n: int) -> bytes:
    """The digest of N zero bytes, computed once per length: a block whose digest it is, is
    zeros (a guest that crafts an xxh64 collision with zeros only gets zeros on its own replica)."""
    return _ZERO_DIGESTS.get(n) or _ZERO_DIGESTS.setdefault(n, digest(ZERO[:n]))


def checksum(digests) -> str:
    """A disk's checksum: the SHA-256 of its blocks' digests, in order."""
    total = hashlib.sha256()
    for d in digests:
        total.update(d)
    return total.hexdigest()


def device_token(path: str) -> str:
    """PATH's write token (the module's docstring); "-" for what has none (never the same)."""
    st = os.stat(path)
    if stat.S_ISREG(st.st_mode):
        return f"file/{st.st_dev}:{st.st_ino}/{st.st_mtime_ns},{st.st_size}"
    if not stat.S_ISBLK(st.st_mode):
        return "-"
    dev = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    with open(f"/sys/dev/block/{dev}/stat") as f:
        fields = f.read().split() + ["0"] * 17
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    return f"{boot}/{dev}/{fields[6]},{fields[13]}"


class Reader:
    """Reads a device by 4 MiB blocks into one page-aligned buffer, with O_DIRECT where the
    device takes it (what is read is the device's, not what a page cache remembers, and the
    page cache is neither copied through nor filled). A block is a view of the buffer: valid
    until the next one is read."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            self.fd = os.open(path, os.O_RDONLY)
        self.buf = mmap.mmap(-1, CHUNK)

    def block(self, offset: int, n: int) -> bytes:
        view = memoryview(self.buf)[:n]
        try:
            got = os.preadv(self.fd, [view], offset)
        except OSError:  # O_DIRECT refused this size or offset: the rest without it
            os.close(self.fd)
            self.fd = os.open(self.path, os.O_RDONLY)
            got = os.preadv(self.fd, [view], offset)
        if got != n:
            raise SnapshotError(f"{self.path}: read ended at {offset + got} of {offset + n} bytes")
        return view

    def close(self) -> None:
        os.close(self.fd)


def device_digests(path: str, size: int) -> list[bytes]:
    r = Reader(path)
    try:
        return [digest(r.block(off, min(CHUNK, size - off))) for off in range(0, size, CHUNK)]
    finally:
        r.close()


class BlockStream:
    """Iterates framed chunks of the block device `path`; .checksum is then its checksum (the
    receiver computes the same of the replica). SAME: the replica's block digests (bytes, by
    block): a block whose digest is there is not sent (the changed blocks of a blocks-mode
    run). ONLY: the indexes of the blocks that may have changed (thin_delta's): the others are
    not even read, their digest in SAME stands for them. .blocks, .read and .changed count
    the blocks, those read and those sent; .digests are every block's. The device is read with
    O_DIRECT (Reader) and a data record's payload is a view of the reader's buffer, yielded
    apart from its header: each chunk must be written before the next is asked for (what
    every consumer does: a pipe's writer, paramiko's sendall, stdout)."""

    def __init__(self, path: str, size: int, progress=None, same=None, only=None, compress=True):
        self.path, self.size, self.progress, self.same, self.only = path, size, progress, same, only
        self.compress = compress
        self.checksum = None
        self.digests: list[bytes] = []
        self.blocks = self.read = self.changed = self.sent = 0

    def __iter__(self):
        sent = 0
        r = Reader(self.path)
        try:
            for offset in range(0, self.size, CHUNK):
                n = min(CHUNK, self.size - offset)
                if self.only is not None and self.blocks not in self.only:
                    d = self.same[self.blocks]
                    block = None
                else:
                    block = r.block(offset, n)
                    d = digest(block)
                    self.read += 1
                self.digests.append(d)
                if block is None or (self.same is not None and self.blocks < len(self.same)
                                     and self.same[self.blocks] == d):
                    yield HEADER.pack(b"S", offset, DIGEST) + d  # not written, not read back there
                else:
                    self.changed += 1
                    if d == zero_digest(n):
                        yield HEADER.pack(b"Z", offset, n)
                    else:
                        packed = compressed(block) if self.compress else None
                        if packed is None:
                            yield HEADER.pack(b"D", offset, n)
                            yield block  # not copied: written out before the next block is read
                        else:
                            yield HEADER.pack(b"C", offset, len(packed)) + packed
                        sent += n if packed is None else len(packed)
                self.blocks += 1
                if self.progress:
                    self.progress(offset + n, self.size, sent)
        finally:
            r.close()
        self.checksum = checksum(self.digests)
        self.sent = sent


def throttled(chunks, rate: int | None, clock=time.monotonic, sleep=time.sleep):
    """CHUNKS, at no more than RATE bytes per second on average (None: as they come)."""
    if not rate:
        yield from chunks
        return
    start, sent = clock(), 0
    for chunk in chunks:
        yield chunk
        sent += len(chunk)
        ahead = sent / rate - (clock() - start)
        if ahead > 0:
            sleep(ahead)


def compressed(block: bytes) -> bytes | None:
    """zlib level 1 of a block worth compressing, else None. A 64 KiB sample decides first,
    so that incompressible data costs little CPU (what borg's `auto` compression does)."""
    if len(zlib.compress(block[:65536], 1)) > 32768:
        return None
    packed = zlib.compress(block, 1)
    return packed if len(packed) < len(block) * 9 // 10 else None


class Stop(Exception):
    """A helper's failure: its message goes to standard error, exit 1."""


def _read(inp, n: int) -> bytes:
    b = bytearray(n)
    _read_into(inp, memoryview(b))
    return bytes(b)


def _read_into(inp, view) -> None:
    """Fill VIEW from INP (a raw or buffered binary stream)."""
    while view:
        got = inp.readinto(view)
        if not got:
            raise Stop("the stream ended early")
        view = view[got:]


def _write_all(fd: int, view, off: int) -> None:
    """All of VIEW at OFF of FD (a write may be short)."""
    while view:
        done = os.pwritev(fd, [view], off)
        view, off = view[done:], off + done


def _zero_out(fd: int, off: int, n: int) -> None:
    try:  # BLKZEROOUT: the device zeroes the range (write-zeroes offload, or the kernel writes)
        fcntl.ioctl(fd, 0x127F, struct.pack("QQ", off, n))
    except OSError:
        os.pwrite(fd, ZERO[:n], off)


class Writer:
    """Writes at offsets of a device through one page-aligned buffer with O_DIRECT (the peer's
    page cache is not filled with replica data), plainly where the device refuses that."""

    def __init__(self, path: str):
        self.path, self.plain = path, os.open(path, os.O_WRONLY)
        try:
            self.direct = os.open(path, os.O_WRONLY | os.O_DIRECT)
        except OSError:
            self.direct = None
        self.buf = mmap.mmap(-1, CHUNK)

    def fill(self, inp, n: int) -> memoryview:
        """The next N bytes of INP, read straight into the buffer (no copy on the way)."""
        view = memoryview(self.buf)[:n]
        _read_into(inp, view)
        return view

    def write(self, data, off: int) -> None:
        if self.direct is not None and len(data) <= CHUNK:
            if not (isinstance(data, memoryview) and data.obj is self.buf):
                self.buf[:len(data)] = data
                data = memoryview(self.buf)[:len(data)]
            try:
                _write_all(self.direct, data, off)
                return
            except OSError:  # an unaligned length or offset: written plainly
                pass
        _write_all(self.plain, memoryview(data), off)

    def close(self) -> None:
        """fsync and close (again: nothing)."""
        if self.plain is None:
            return
        fds, self.plain, self.direct = [self.direct, self.plain], None, None
        try:
            for fd in fds:
                if fd is not None:
                    os.fsync(fd)
        finally:
            for fd in fds:
                if fd is not None:
                    os.close(fd)


class ReadBack(threading.Thread):
    """Reads back (O_DIRECT) and digests the blocks the receiver wrote whole, each once its
    write returned, while the stream goes on arriving: the read-back waits on the device
    beside the writes instead of after them."""

    def __init__(self, dev: str):
        super().__init__(daemon=True, name="read-back")
        self.reader, self.queue, self.digests, self.error = Reader(dev), queue.SimpleQueue(), {}, None
        self.start()

    def run(self) -> None:
        try:
            while (item := self.queue.get()) is not None:
                if self.error is None:
                    self.digests[item[0]] = digest(self.reader.block(*item))
        except BaseException as e:  # noqa: BLE001 - raised by finish()
            self.error = e
            while self.queue.get() is not None:
                pass

    def finish(self) -> dict:
        self.queue.put(None)
        self.join()
        self.reader.close()
        if self.error is not None:
            raise self.error
        return self.digests


def receive(dev: str, size: int, inp) -> tuple[str, str]:
    """`receive-blocks`: (checksum, token) of DEV once INP's stream is written to it. Each
    block is read back from the device: one a record wrote whole by ReadBack, beside the
    stream; any other (written in parts, or more than once: not what BlockStream sends)
    once the stream ended. An unchanged one (an S record) counts with the sender's digest."""
    w, back, known, seen = Writer(dev), ReadBack(dev), {}, {}
    r = None
    try:
        while True:
            h = inp.read(HEADER.size)
            if not h:
                break
            if len(h) < HEADER.size:
                h += _read(inp, HEADER.size - len(h))
            kind, off, n = HEADER.unpack(h)
            if kind == b"S":
                if n != DIGEST or off % CHUNK or off >= size:
                    raise Stop("a bad unchanged-block record")
                known[off] = _read(inp, n)
                seen[off] = seen.get(off, 0) + 1
                continue
            if off + n > size:
                raise Stop("write past the end of the replica")
            if kind in (b"D", b"C") and n > CHUNK:
                raise Stop("a record larger than a block")
            if kind == b"D":
                w.write(w.fill(inp, n), off)
            elif kind == b"C":
                data = zlib.decompressobj().decompress(_read(inp, n), CHUNK + 1)  # no more than a block
                if off + len(data) > size or len(data) > CHUNK:
                    raise Stop("write past the end of the replica")
                w.write(data, off)
                n = len(data)
            elif kind == b"Z":
                _zero_out(w.plain, off, n)
            else:
                raise Stop(f"an unknown record kind {kind!r}")
            for b in range(off - off % CHUNK, off + n, CHUNK):
                seen[b] = seen.get(b, 0) + 1
            if off % CHUNK == 0 and n == min(CHUNK, size - off):
                back.queue.put((off, n))
        w.close()
        token = device_token(dev)
        read = back.finish()
        r = Reader(dev)
        total = checksum((known if off in known else read)[off] if seen.get(off) == 1 and (off in known or off in read)
                         else digest(r.block(off, min(CHUNK, size - off))) for off in range(0, size, CHUNK))
    finally:
        if back.is_alive():
            back.queue.put(None)
        if r is not None:
            r.close()
        w.close()
    return total, token


def cache_path(state_dir: str, domu: str, peer: str, vg: str, lv: str) -> str:
    """Where this host keeps the block digests of DOMU's replica VG/LV on PEER (blocks mode)."""
    return os.path.join(state_dir, "digests", domu, peer, f"{vg}+{lv}")


def load_digests(path: str, size: int) -> tuple[str, list[bytes], str] | None:
    """(the replica's write token, its block digests, the generation of the thin base they
    are of, or "-") saved at PATH for a replica of SIZE bytes; None when there is none, or it
    is of another size or unreadable."""
    try:
        with open(path, "rb") as f:
            head, _, body = f.read().partition(b"\n")
    except FileNotFoundError:
        return None
    parts = head.decode("ascii", "replace").split()
    if (len(parts) != 5 or parts[:2] != ["domubackup-digests", "3"] or parts[2] != str(size)
            or len(body) != block_count(size) * DIGEST):
        return None
    return parts[3], [body[i:i + DIGEST] for i in range(0, len(body), DIGEST)], parts[4]


def save_digests(path: str, size: int, token: str, digests: list[bytes], base: str = "-") -> None:
    """Saved atomically (a crash leaves the old file or the new one); no token, no file."""
    if token == "-":
        drop_digests(path)
        return
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(f"domubackup-digests 3 {size} {token} {base}\n".encode() + b"".join(digests))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def drop_digests(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def read_exactly(fd: int, n: int, offset: int, name: str) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise OSError(f"{name}: read ended at {offset + len(data)}, expected {offset + n}")
    return data

def differing(new: bytes, old: bytes, page: int = PAGE):
    """The (start, end) runs of whole pages where NEW and OLD differ: what is written of a
    block, so that each thick snapshot of the target copies only the pages that change (and
    a rollback writes no more than the point's own copy-on-write data)."""
    a, b = memoryview(new), memoryview(old)
    start = None
    for at in range(0, len(new), page):
        if a[at:at + page] != b[at:at + page]:
            start = at if start is None else start
        elif start is not None:
            yield start, at
            start = None
    if start is not None:
        yield start, len(new)


def copy_blocks(src: str, dst: str, size: int) -> tuple[int, int]:
    written = []
    s = os.open(src, os.O_RDONLY)
    d = os.open(dst, os.O_RDWR)
    try:
        for offset in range(0, size, CHUNK):
            n = min(CHUNK, size - offset)
            block = read_exactly(s, n, offset, src)
            old = read_exactly(d, n, offset, dst)
            if block != old:
                for start, end in differing(block, old):
                    os.pwrite(d, block[start:end], offset + start)
                written.append(offset)
        os.fsync(d)
        os.posix_fadvise(d, 0, 0, os.POSIX_FADV_DONTNEED)
        for offset in written:
            n = min(CHUNK, size - offset)
            if read_exactly(d, n, offset, dst) != read_exactly(s, n, offset, src):
                raise OSError(f"{dst}: the block at {offset} differs from {src} after it was written")
    finally:
        os.close(s)
        os.close(d)
    return block_count(size), len(written)


def send(dev: str, size: int) -> None:
    stream = BlockStream(dev, size)
    out = sys.stdout.buffer
    for chunk in stream:
        out.write(chunk)
    out.flush()
    print(f"checksum {stream.checksum}", file=sys.stderr)


USAGE = {"copy-blocks": "SRC DST SIZE", "send-blocks": "DEV SIZE", "receive-blocks": "DEV SIZE",
         "block-digests": "DEV SIZE TOKEN"}
COMMANDS = tuple(USAGE)


def main(argv: list[str]) -> int:
    """ARGV: one of COMMANDS and its arguments (USAGE)."""
    command, args = argv[0], argv[1:]
    size_at = 2 if command == "copy-blocks" else 1
    if len(args) != len(USAGE[command].split()) or not args[size_at].isdigit():
        print(f"usage: domubackup {command} {USAGE[command]}", file=sys.stderr)
        return 2
    size = int(args[size_at])
    try:
        if command == "send-blocks":
            send(args[0], size)
        elif command == "receive-blocks":
            try:  # a 1 MiB pipe from sshd: the stream goes on arriving while a block is written
                fcntl.fcntl(0, fcntl.F_SETPIPE_SZ, 1 << 20)
            except OSError:
                pass
            total, token = receive(args[0], size, sys.stdin.buffer)
            print(total)
            print(f"token {token}")
        elif command == "block-digests":
            if args[2] != "-" and device_token(args[0]) == args[2]:
                print("same")
            else:
                print("\n".join(d.hex() for d in device_digests(args[0], size)))
        else:
            print(*copy_blocks(args[0], args[1], size))
    except (OSError, SnapshotError, Stop, zlib.error) as e:
        print(f"{command}: {getattr(e, 'strerror', None) and f'{e.filename}: {e.strerror}' or e}", file=sys.stderr)
        return 1
    return 0
