"""The block stream and the helpers that run on the receiving host (`domubackup
receive-blocks`, `block-digests`), on files here: what arrives is exactly the source, zero
blocks travel as headers only, both ends compute the same checksum (the SHA-256 of every
4 MiB block's xxh64), and a replica's write token says whether it was written since."""

import hashlib
import os
import subprocess
import sys

import xxhash

from domubackup.core.parsers import parse_digests, parse_received
from domubackup.hosts.blockcopy import CHUNK, DIGEST, HEADER, BlockStream, load_digests, save_digests


def helper(*argv, data=b""):
    return subprocess.run([sys.executable, "-m", "domubackup", *map(str, argv)], input=data,
                          capture_output=True, timeout=120)


def frames_of(stream):
    """STREAM's records, each header with its payload, copied as they come: a data record's
    payload is a view of the reader's buffer, valid until the next chunk is asked for."""
    frames = []
    for chunk in stream:
        if frames and frames[-1][:1] == b"D" and len(frames[-1]) == HEADER.size:
            frames[-1] += chunk
        else:
            frames.append(bytes(chunk))
    return frames


def checksum_of(blocks):
    return hashlib.sha256(b"".join(xxhash.xxh64_digest(b) for b in blocks)).hexdigest()


def test_stream_and_receiver_copy_exactly_and_agree_on_the_checksum(tmp_path):
    blocks = [os.urandom(CHUNK), bytes(CHUNK), b"\1" + bytes(CHUNK - 1), bytes(CHUNK),
              b"web1 " * (CHUNK // 5) + b"x" * (CHUNK % 5),
              os.urandom(1000) + bytes(CHUNK // 2)]  # the last block is a short one
    src, dst = tmp_path / "snap", tmp_path / "replica"
    src.write_bytes(b"".join(blocks))
    size = src.stat().st_size
    dst.write_bytes(os.urandom(size))  # old content everywhere, zeros included: all overwritten
    stream = BlockStream(str(src), size)
    frames = frames_of(stream)
    data = b"".join(frames)
    # zero blocks travel as headers only; the compressible ones zlib-packed; random data raw
    assert [f[:1] for f in frames] == [b"D", b"Z", b"C", b"Z", b"C", b"C"]
    assert len(frames[0]) == HEADER.size + CHUNK and len(frames[2]) < 100_000 and len(frames[4]) < 100_000
    r = helper("receive-blocks", dst, size, data=data)
    assert r.returncode == 0, r.stderr
    assert dst.read_bytes() == src.read_bytes()
    theirs, token = parse_received(r.stdout.decode())
    assert stream.checksum == checksum_of(blocks) == theirs
    st = dst.stat()
    assert token == f"file/{st.st_dev}:{st.st_ino}/{st.st_mtime_ns},{st.st_size}"


def test_receiver_refuses_what_a_stream_must_not_hold(tmp_path):
    dst = tmp_path / "replica"
    dst.write_bytes(bytes(4096))
    for record, error in [(HEADER.pack(b"Z", 4096, 512), b"write past the end of the replica"),
                          (HEADER.pack(b"S", 4096, DIGEST) + bytes(DIGEST), b"a bad unchanged-block record"),
                          (HEADER.pack(b"S", 0, 32) + bytes(32), b"a bad unchanged-block record"),
                          (HEADER.pack(b"D", 0, 4096) + bytes(10), b"the stream ended early"),
                          (HEADER.pack(b"X", 0, 1), b"an unknown record kind"),
                          (HEADER.pack(b"C", 0, 4) + b"junk", b"receive-blocks: Error -")]:  # zlib's error
        r = helper("receive-blocks", dst, 4096, data=record)
        assert r.returncode == 1 and error in r.stderr, (record, r.stderr)
    import zlib

    bomb = zlib.compress(bytes(64 * CHUNK), 9)  # 256 MiB of zeros in about 250 KiB: cut at a block
    assert len(bomb) < CHUNK
    big = tmp_path / "big"
    big.write_bytes(bytes(2 * CHUNK))
    r = helper("receive-blocks", big, 2 * CHUNK, data=HEADER.pack(b"C", 0, len(bomb)) + bomb)
    assert r.returncode == 1 and b"write past the end of the replica" in r.stderr, r.stderr
    r = helper("receive-blocks", big, 2 * CHUNK, data=HEADER.pack(b"D", 0, CHUNK + 1))
    assert r.returncode == 1 and b"a record larger than a block" in r.stderr, r.stderr
    assert big.read_bytes() == bytes(2 * CHUNK)
    assert helper("receive-blocks", big, "12x").returncode == 2


def test_blocks_mode_sends_only_the_blocks_whose_digest_the_replica_lacks(tmp_path):
    """Blocks mode, on files here: the peer's block-digests of its replica, this host's stream
    of only the blocks that differ (a zeroed block as a header), the receiver: equal, same
    checksum; then the replica's token makes block-digests answer `same` without reading it,
    and any write to it makes it read again."""
    old = [os.urandom(CHUNK) for _ in range(5)] + [os.urandom(1000)]
    new = list(old)
    new[1] = os.urandom(CHUNK)  # changed
    new[3] = bytes(CHUNK)  # zeroed
    src, dst = tmp_path / "snap", tmp_path / "replica"
    src.write_bytes(b"".join(new))
    dst.write_bytes(b"".join(old))
    size = src.stat().st_size
    r = helper("block-digests", dst, size, "-")
    assert r.returncode == 0, r.stderr
    same = parse_digests(r.stdout.decode(), 6)
    assert same == [xxhash.xxh64_digest(b) for b in old]
    stream = BlockStream(str(src), size, same=same)
    frames = frames_of(stream)
    # an unchanged block as its digest only (the receiver neither writes nor reads it back)
    assert [(f[:1], HEADER.unpack(f[:HEADER.size])[1]) for f in frames] == [
        (b"S", 0), (b"D", CHUNK), (b"S", 2 * CHUNK), (b"Z", 3 * CHUNK), (b"S", 4 * CHUNK), (b"S", 5 * CHUNK)]
    assert frames[0][HEADER.size:] == xxhash.xxh64_digest(old[0])
    assert (stream.blocks, stream.changed, stream.sent) == (6, 2, CHUNK)
    r = helper("receive-blocks", dst, size, data=b"".join(frames))
    assert r.returncode == 0, r.stderr
    assert dst.read_bytes() == src.read_bytes()
    theirs, token = parse_received(r.stdout.decode())
    assert stream.checksum == theirs == checksum_of(new)
    assert stream.digests == [xxhash.xxh64_digest(b) for b in new]
    # the digests kept with that token: block-digests says `same` while nothing writes there
    kept = tmp_path / "state" / "digests" / "web1" / "dom0b" / "vg0+web1-srv"
    save_digests(str(kept), size, token, stream.digests)
    assert load_digests(str(kept), size) == (token, stream.digests, "-")
    save_digests(str(kept), size, token, stream.digests, "17")  # of the thin base of generation 17
    assert load_digests(str(kept), size) == (token, stream.digests, "17")
    assert load_digests(str(kept), size + CHUNK) is None  # a disk that grew: read the replica again
    r = helper("block-digests", dst, size, token)
    assert r.returncode == 0 and r.stdout == b"same\n", r.stdout[:100]
    assert parse_digests(r.stdout.decode(), 6) is None
    # nothing changed since: nothing is sent
    again = BlockStream(str(src), size, same=stream.digests)
    assert {f[:1] for f in frames_of(again)} == {b"S"} and again.checksum == stream.checksum and again.sent == 0
    # a write behind the tool's back changes the token: the replica is read again, and the
    # block written there shows as changed
    with open(dst, "r+b") as f:
        f.seek(2 * CHUNK)
        f.write(b"admin")
    r = helper("block-digests", dst, size, token)
    got = parse_digests(r.stdout.decode(), 6)
    assert got is not None and got[2] != stream.digests[2] and got[:2] == stream.digests[:2]
    fixed = BlockStream(str(src), size, same=got)
    assert sum(f[:1] != b"S" for f in frames_of(fixed)) == 1
    # thin_delta's blocks only: the others are not read, their kept digest stands for them
    only = BlockStream(str(src), size, same=stream.digests, only={1})
    frames = frames_of(only)
    assert (only.read, only.changed, only.digests, only.checksum) == (1, 0, stream.digests, stream.checksum)
    assert [f[:1] for f in frames] == [b"S"] * 6


def test_a_block_written_in_parts_is_read_back_once_whole(tmp_path):
    """The receiver reads a block back right after a record that wrote it whole; one written by
    several records (not what BlockStream sends, but a valid stream) once the stream ended."""
    dst = tmp_path / "replica"
    dst.write_bytes(bytes(2 * CHUNK))
    one, two = os.urandom(CHUNK), os.urandom(4096)
    data = (HEADER.pack(b"D", 0, CHUNK) + one + HEADER.pack(b"D", CHUNK + 4096, 4096) + two
            + HEADER.pack(b"D", 0, 4096) + two)  # block 0 written whole, then a page of it again
    r = helper("receive-blocks", dst, 2 * CHUNK, data=data)
    assert r.returncode == 0, r.stderr
    want = [two + one[4096:], bytes(4096) + two + bytes(CHUNK - 8192)]
    assert dst.read_bytes() == b"".join(want)
    assert parse_received(r.stdout.decode())[0] == checksum_of(want)
