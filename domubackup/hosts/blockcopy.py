"""Block streams and copies of whole devices. `BlockStream` frames a device's blocks (seed
sends it to the peer's RECEIVER; `domubackup send-blocks DEV SIZE` writes it to standard
output for a restore, and its checksum to standard error last, as ``sha256 HEX``).

`domubackup copy-blocks SRC DST SIZE`: the first SIZE bytes of block device DST become SRC's,
by 4 MiB blocks, writing only the blocks that differ, and of those only the 4 KiB pages that
differ (where both are zeros a thin DST stays thin); DST is fsynced, then every block written is read back from the device (its cached pages
dropped first) and compared with SRC's. Prints "BLOCKS WRITTEN"; exit 1 with the reason
otherwise. A helper (entry.py) of `rollback`, on the host that holds both LVs."""

from __future__ import annotations

import hashlib
import os
import struct
import sys
import zlib

from ..core.errors import SnapshotError

CHUNK = 4 << 20
PAGE = 4096  # the smallest chunk of an LVM snapshot
HEADER = struct.Struct(">cQI")  # kind (D data / C zlib data / Z zeros / S same: its SHA-256), offset, length
ZERO = bytes(CHUNK)


def compressed(block: bytes) -> bytes | None:
    """zlib level 1 of a block worth compressing, else None. A 64 KiB sample decides first,
    so that incompressible data costs little CPU (what borg's `auto` compression does)."""
    if len(zlib.compress(block[:65536], 1)) > 32768:
        return None
    packed = zlib.compress(block, 1)
    return packed if len(packed) < len(block) * 9 // 10 else None



class BlockStream:
    """Iterates framed chunks of the block device `path`; .sha256 is then the SHA-256 of the
    SHA-256 digests of its 4 MiB blocks (RECEIVER computes the same of the replica). SAME: the
    replica's block digests (hex, by block): a block whose digest is there is not sent (the
    changed blocks of a blocks-mode run); .blocks and .changed count what was read and sent."""

    def __init__(self, path: str, size: int, progress=None, same=None):
        self.path, self.size, self.progress, self.same = path, size, progress, same
        self.sha256 = None
        self.blocks = self.changed = self.sent = 0

    def __iter__(self):
        total, zero_digests = hashlib.sha256(), {}
        sent = offset = 0
        with open(self.path, "rb", buffering=0) as dev:
            while offset < self.size:
                block = dev.read(min(CHUNK, self.size - offset))
                if not block:
                    raise SnapshotError(f"{self.path}: read ended at {offset} of {self.size} bytes")
                zero = block == ZERO[:len(block)]
                if zero:  # the digest of zeros is computed once per length
                    digest = zero_digests.get(len(block)) or zero_digests.setdefault(
                        len(block), hashlib.sha256(block).digest())
                else:
                    digest = hashlib.sha256(block).digest()
                total.update(digest)
                if self.same is not None and self.blocks < len(self.same) and self.same[self.blocks] == digest.hex():
                    yield HEADER.pack(b"S", offset, len(digest)) + digest  # not written, not read back there
                else:
                    self.changed += 1
                    if zero:
                        yield HEADER.pack(b"Z", offset, len(block))
                    else:
                        packed = compressed(block)
                        kind, data = (b"D", block) if packed is None else (b"C", packed)
                        yield HEADER.pack(kind, offset, len(data)) + data
                        sent += len(data)
                self.blocks += 1
                offset += len(block)
                if self.progress:
                    self.progress(offset, self.size, sent)
        self.sha256 = total.hexdigest()
        self.sent = sent


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
    return (size + CHUNK - 1) // CHUNK, len(written)


def send(dev: str, size: int) -> None:
    stream = BlockStream(dev, size)
    out = sys.stdout.buffer
    for chunk in stream:
        out.write(chunk)
    out.flush()
    print(f"sha256 {stream.sha256}", file=sys.stderr)


def main(argv: list[str]) -> int:
    """ARGV: copy-blocks SRC DST SIZE, or send-blocks DEV SIZE."""
    command, args = argv[0], argv[1:]
    if len(args) != (3 if command == "copy-blocks" else 2) or not args[-1].isdigit():
        print("usage: domubackup copy-blocks SRC DST SIZE | send-blocks DEV SIZE", file=sys.stderr)
        return 2
    try:
        if command == "send-blocks":
            send(args[0], int(args[1]))
            return 0
        blocks, written = copy_blocks(args[0], args[1], int(args[2]))
    except (OSError, SnapshotError) as e:
        print(f"{command}: {getattr(e, 'strerror', None) and f'{e.filename}: {e.strerror}' or e}", file=sys.stderr)
        return 1
    print(blocks, written)
    return 0
