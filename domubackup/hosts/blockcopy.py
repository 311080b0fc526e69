"""`domubackup copy-blocks SRC DST SIZE`: the first SIZE bytes of block device DST become SRC's,
by 4 MiB blocks, writing only the blocks that differ (where both are zeros a thin DST stays
thin); DST is fsynced, then every block written is read back from the device (its cached pages
dropped first) and compared with SRC's. Prints "BLOCKS WRITTEN"; exit 1 with the reason
otherwise. A helper (entry.py) of `rollback`, on the host that holds both LVs."""

from __future__ import annotations

import os
import sys

CHUNK = 4 << 20


def read_exactly(fd: int, n: int, offset: int, name: str) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise OSError(f"{name}: read ended at {offset + len(data)}, expected {offset + n}")
    return data


def copy_blocks(src: str, dst: str, size: int) -> tuple[int, int]:
    written = []
    s = os.open(src, os.O_RDONLY)
    d = os.open(dst, os.O_RDWR)
    try:
        for offset in range(0, size, CHUNK):
            n = min(CHUNK, size - offset)
            block = read_exactly(s, n, offset, src)
            if block != read_exactly(d, n, offset, dst):
                os.pwrite(d, block, offset)
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


def main(argv: list[str]) -> int:
    if len(argv) != 3 or not argv[2].isdigit():
        print("usage: domubackup copy-blocks SRC DST SIZE", file=sys.stderr)
        return 2
    try:
        blocks, written = copy_blocks(argv[0], argv[1], int(argv[2]))
    except OSError as e:
        print(f"copy-blocks: {e.strerror and f'{e.filename}: {e.strerror}' or e}", file=sys.stderr)
        return 1
    print(blocks, written)
    return 0
