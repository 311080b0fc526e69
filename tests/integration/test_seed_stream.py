"""The seed's block stream and its receiver (the program the peer runs), on files here: what
arrives is exactly the source, zero blocks travel as headers only, and both ends compute the
same checksum, the SHA-256 of every 4 MiB block's SHA-256."""

import hashlib
import os
import subprocess
import sys

from domubackup.hosts.blockcopy import CHUNK, HEADER, BlockStream
from domubackup.jobs.seed import RECEIVER


def test_stream_and_receiver_copy_exactly_and_agree_on_the_checksum(tmp_path):
    blocks = [os.urandom(CHUNK), bytes(CHUNK), b"\1" + bytes(CHUNK - 1), bytes(CHUNK),
              b"web1 " * (CHUNK // 5) + b"x" * (CHUNK % 5),
              os.urandom(1000) + bytes(CHUNK // 2)]  # the last block is a short one
    src, dst = tmp_path / "snap", tmp_path / "replica"
    src.write_bytes(b"".join(blocks))
    size = src.stat().st_size
    dst.write_bytes(os.urandom(size))  # old content everywhere, zeros included: all overwritten
    stream = BlockStream(str(src), size)
    frames = list(stream)
    data = b"".join(frames)
    # zero blocks travel as headers only; the compressible ones zlib-packed; random data raw
    assert [f[:1] for f in frames] == [b"D", b"Z", b"C", b"Z", b"C", b"C"]
    assert len(frames[0]) == HEADER.size + CHUNK and len(frames[2]) < 100_000 and len(frames[4]) < 100_000
    r = subprocess.run([sys.executable, "-c", RECEIVER, str(dst), str(size)], input=data,
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert dst.read_bytes() == src.read_bytes()
    expected = hashlib.sha256(b"".join(hashlib.sha256(b).digest() for b in blocks)).hexdigest()
    assert stream.sha256 == expected == r.stdout.decode().strip()


def test_receiver_refuses_a_write_past_the_end(tmp_path):
    dst = tmp_path / "replica"
    dst.write_bytes(bytes(4096))
    r = subprocess.run([sys.executable, "-c", RECEIVER, str(dst), "4096"],
                       input=HEADER.pack(b"Z", 4096, 512), capture_output=True, timeout=60)
    assert r.returncode == 1 and b"write past the end of the replica" in r.stderr
    r = subprocess.run([sys.executable, "-c", RECEIVER, str(dst), "4096"],
                       input=HEADER.pack(b"S", 4096, 32) + bytes(32), capture_output=True, timeout=60)
    assert r.returncode == 1 and b"a bad unchanged-block record" in r.stderr


def test_blocks_mode_sends_only_the_blocks_whose_digest_the_replica_lacks(tmp_path):
    """Blocks mode, on files here: the peer's DIGESTS of its replica, this host's stream of only
    the blocks that differ (a zeroed block as a header), the receiver: equal, same checksum."""
    from domubackup.jobs.blocks import DIGESTS

    old = [os.urandom(CHUNK) for _ in range(5)] + [os.urandom(1000)]
    new = list(old)
    new[1] = os.urandom(CHUNK)  # changed
    new[3] = bytes(CHUNK)  # zeroed
    src, dst = tmp_path / "snap", tmp_path / "replica"
    src.write_bytes(b"".join(new))
    dst.write_bytes(b"".join(old))
    size = src.stat().st_size
    r = subprocess.run([sys.executable, "-c", DIGESTS, str(dst), str(size)], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    same = r.stdout.decode().split()
    assert same == [hashlib.sha256(b).hexdigest() for b in old]
    stream = BlockStream(str(src), size, same=same)
    frames = list(stream)
    # an unchanged block as its digest only (the receiver neither writes nor reads it back)
    assert [(f[:1], HEADER.unpack(f[:HEADER.size])[1]) for f in frames] == [
        (b"S", 0), (b"D", CHUNK), (b"S", 2 * CHUNK), (b"Z", 3 * CHUNK), (b"S", 4 * CHUNK), (b"S", 5 * CHUNK)]
    assert frames[0][HEADER.size:] == hashlib.sha256(old[0]).digest()
    assert (stream.blocks, stream.changed, stream.sent) == (6, 2, CHUNK)
    r = subprocess.run([sys.executable, "-c", RECEIVER, str(dst), str(size)], input=b"".join(frames),
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert dst.read_bytes() == src.read_bytes()
    assert stream.sha256 == r.stdout.decode().strip() == hashlib.sha256(
        b"".join(hashlib.sha256(b).digest() for b in new)).hexdigest()
    # nothing changed since: nothing is sent
    again = BlockStream(str(src), size, same=[hashlib.sha256(b).hexdigest() for b in new])
    assert {f[:1] for f in again} == {b"S"} and again.sha256 == stream.sha256 and again.sent == 0
    # the receiver takes an unchanged block's digest as given: a replica that differs there
    # (changed after DIGESTS read it) is not caught by this run, but by the next one's DIGESTS
    r = subprocess.run([sys.executable, "-c", RECEIVER, str(dst), str(size)], input=b"".join(BlockStream(
        str(src), size, same=[hashlib.sha256(b).hexdigest() for b in new])), capture_output=True, timeout=60)
    assert r.returncode == 0 and r.stdout.decode().strip() == stream.sha256, r.stderr
