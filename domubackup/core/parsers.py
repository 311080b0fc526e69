"""Pure parsers of tool output, and the argv builders that go with them.

A "fact" here is an argv plus a pure parser of its stdout (pyinfra style): the caller runs
the argv (with LC_ALL=C), checks the exit code, and hands stdout to the parser.  Nothing in
this module does I/O.  Malformed input raises ``ValueError`` whose message contains the
offending line (``repr``), for the caller to wrap.

The formats were checked against real captures in ``fixtures/tools/`` (see its README)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import replace

from .model import FstabEntry, LogicalVolume, MountInfo, Partition, PartitionTable, SnapshotUse, Space


def _bad(what: str, line: str, why: str = "") -> ValueError:
    return ValueError(f"malformed {what} line {line!r}" + (f": {why}" if why else ""))


def _nonblank(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _unescape_bytes(text: str, pattern: re.Pattern[str], base: int) -> str:
    """Replace escapes matched by pattern (group 1 = the number) by the raw byte, then decode.

    Escapes encode bytes (an UTF-8 "é" is two escapes), so work on bytes; undecodable bytes
    survive as surrogates (surrogateescape), like os.fsdecode."""
    if "\\" not in text:
        return text
    raw = text.encode("utf-8", "surrogateescape")
    raw = re.compile(pattern.pattern.encode()).sub(lambda m: bytes([int(m.group(1), base)]), raw)
    return raw.decode("utf-8", "surrogateescape")


LVS_FIELDS: tuple[str, ...] = ("vg_name", "lv_name", "lv_size", "lv_attr", "origin", "snap_percent", "vg_free",
                               "lv_path", "lv_tags")
LVS_SEPARATOR = "|"  # not allowed in VG/LV names ([A-Za-z0-9+_.-])


def lvs_argv(*paths: str) -> list[str]:
    """argv of ``lvs`` whose output parse_lvs reads; each path: "vg", "vg/lv" or "/dev/vg/lv".

    lvs exits 5 when a named VG/LV does not exist ("Failed to find logical volume" on stderr)."""
    return ["lvs", "--noheadings", "--nosuffix", "--units", "b", "--separator", LVS_SEPARATOR,
            "-o", ",".join(LVS_FIELDS), *paths]


def _int_bytes(value: str, line: str, what: str) -> int:
    # --units b --nosuffix prints plain integers; tolerate "123.00" from other LVM versions.
    m = re.fullmatch(r"(\d+)(?:\.0+)?", value)
    if not m:
        raise _bad(what, line, f"not a byte count: {value!r}")
    return int(m.group(1))


def parse_lvs(text: str) -> list[LogicalVolume]:
    """Parse the output of ``lvs_argv()``: one LV per non-blank line, fields stripped."""
    out = []
    for line in _nonblank(text):
        fields = [f.strip() for f in line.split(LVS_SEPARATOR)]
        if len(fields) == len(LVS_FIELDS) - 1:  # captured before lv_tags was asked for: no tags
            fields.append("")
        if len(fields) != len(LVS_FIELDS):
            raise _bad("lvs", line, f"expected {len(LVS_FIELDS)} fields, got {len(fields)}")
        vg, lv, size, attr, origin, snap, vg_free, path, tags = fields
        if not vg or not lv:
            raise _bad("lvs", line, "empty vg_name or lv_name")
        try:
            snap_percent = float(snap) if snap else None
        except ValueError:
            raise _bad("lvs", line, f"bad snap_percent {snap!r}") from None
        out.append(LogicalVolume(vg=vg, lv=lv, size=_int_bytes(size, line, "lvs"), attr=attr, origin=origin,
                                 snap_percent=snap_percent, path=path, tags=frozenset(t for t in tags.split(",") if t),
                                 vg_free=_int_bytes(vg_free, line, "lvs") if vg_free else None))
    return out


def parted_argv(dev: str) -> list[str]:
    """argv of parted's machine-readable print in bytes.

    Exit codes seen (parted 3.5): 0 ok; 1 with "Error: DEV: unrecognised disk label" on stderr
    for a blank disk or a whole-disk LVM PV -- stdout still holds "BYT;" and the device line
    with label "unknown", which parse_parted reads.  Warnings (e.g. GPT not using all of a
    grown disk) go to stderr with exit 0."""
    return ["parted", "-s", "-m", dev, "unit", "B", "print"]


def parted_human_argv(dev: str) -> list[str]:
    """argv of the human print whose Type column (primary/extended/logical) parse_parted_types
    reads: the only place parted names an msdos extended partition."""
    return ["parted", "-s", dev, "unit", "B", "print"]


def parted_unrecognised(stderr: str) -> bool:
    """True when parted's stderr says the disk has no partition table it knows."""
    return "unrecognised disk label" in stderr


def _split_machine(body: str) -> list[str]:
    """Split a parted -m record (trailing ';' already removed) on ':' not escaped by '\\'.

    parted escapes ':' and '\\' in strings with a backslash; ';' is not escaped."""
    fields, cur, it = [], [], iter(body)
    for ch in it:
        if ch == "\\":
            nxt = next(it, None)
            if nxt is None:
                raise ValueError("dangling backslash")
            cur.append(nxt)
        elif ch == ":":
            fields.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    fields.append("".join(cur))
    return fields


def _bytes_field(value: str, line: str) -> int:
    m = re.fullmatch(r"(\d+)B", value)
    if not m:
        raise _bad("parted", line, f"not a byte value {value!r} (use 'unit B')")
    return int(m.group(1))


def parse_parted_types(text: str) -> dict[int, str]:
    """Partition number -> Type ("primary"/"extended"/"logical") from parted's human print
    (``parted_human_argv``); {} for labels without a Type column (gpt, loop)."""
    types: dict[int, str] = {}
    for line in text.splitlines():
        m = re.match(r"\s*(\d+)\s+\d+B\s+\d+B\s+\d+B\s+(primary|extended|logical)\b", line)
        if m:
            types[int(m.group(1))] = m.group(2)
    return types


def parse_parted(text: str, types: Mapping[int, str] | None = None) -> PartitionTable:
    """Parse ``parted -s -m DEV unit B print`` stdout.

    Labels: msdos, gpt, ..., "loop" (a filesystem on the whole disk: one partition 1 from 0B)
    and "unknown" (no table; parted exits 1 but still prints the device line). parted -m never
    says "extended": an msdos extended partition shows up with an empty fs and flags "lba"
    (type 0x0f, what parted itself creates) or nothing (type 0x05).  It is marked by adding
    "extended" to its flags when a logical partition (number >= 5) lies inside it, or when
    ``types`` (from parse_parted_types) says so -- needed for one holding no logical partition."""
    lines = _nonblank(text)
    if not lines:
        raise ValueError("empty parted output")
    if lines[0].strip() != "BYT;":
        raise _bad("parted", lines[0], "expected 'BYT;' (machine mode, unit B)")
    if len(lines) < 2:
        raise ValueError("parted output has no device line")
    records = []
    for line in lines[1:]:
        body = line.rstrip()
        if not body.endswith(";"):
            raise _bad("parted", line, "record does not end with ';'")
        try:
            records.append((line, _split_machine(body[:-1])))
        except ValueError as e:
            raise _bad("parted", line, str(e)) from None

    dline, dev = records[0]
    if len(dev) < 8:
        raise _bad("parted", dline, "device line needs 8 fields")
    size, label = _bytes_field(dev[1], dline), dev[5]
    if not label:
        raise _bad("parted", dline, "empty disk label")

    parts = []
    for line, f in records[1:]:
        if len(f) == 5 and f[4] == "free":  # only with "print free"
            continue
        if len(f) != 7 or not f[0].isdigit():
            raise _bad("parted", line, "expected num:start:end:size:fs:name:flags")
        flags = tuple(x.strip() for x in f[6].split(",") if x.strip())
        parts.append(Partition(number=int(f[0]), start=_bytes_field(f[1], line),
                               end=_bytes_field(f[2], line), size=_bytes_field(f[3], line),
                               fs=f[4], name=f[5], flags=flags))

    if label == "msdos":
        types = types or {}
        marked = []
        for p in parts:
            ext = types.get(p.number) == "extended" or (p.number <= 4 and any(
                q.number >= 5 and p.start <= q.start and q.end <= p.end for q in parts))
            if ext and "extended" not in p.flags:
                p = replace(p, flags=p.flags + ("extended",))
            marked.append(p)
        parts = marked
    return PartitionTable(label=label, size=size, partitions=tuple(parts))


def blkid_argv(dev: str, offset: int | None = None, size: int | None = None) -> list[str]:
    """argv of a low-level probe of DEV, or of the range [offset, offset+size) of it.

    ``-d`` (--no-encoding) makes blkid print values raw: without it ``-o export`` escapes
    shell characters with a backslash ("LABEL=data\\ vol") and non-ASCII bytes in cat -v
    notation ("M-CM-)" for "é"), which cannot be undone (a literal "M-A" is not escaped).
    The raw form only breaks on a label containing a newline, which parse_blkid rejects.
    Exit codes: 0 found; 2 nothing found (empty stdout); 8 ambivalent result (several
    signatures); 4 usage/other error.  The caller handles them."""
    argv = ["blkid", "-p", "-d", "-o", "export"]
    if offset is not None:
        argv += ["-O", str(offset)]
    if size is not None:
        argv += ["-S", str(size)]
    argv.append(dev)
    return argv


_BLKID_ESCAPE = re.compile(r"\\(.)", re.S)


def parse_blkid(text: str, escaped: bool = False) -> dict[str, str]:
    """Parse ``blkid -p -o export`` output: KEY=value lines -> dict.

    Empty text gives {}: that is what ``blkid -p`` prints when it finds nothing (exit 2).
    Keys seen: TYPE, UUID, LABEL, VERSION, BLOCK_SIZE, USAGE (filesystem/other/raid), SEC_TYPE,
    LABEL_FATBOOT, DEVNAME; PTTYPE/PTUUID when the range holds a partition table (an msdos
    extended partition probes as PTTYPE=dos).
    escaped=True undoes the backslash escaping of output made without ``-d`` (M-x notation
    for non-ASCII bytes is left as is: it is ambiguous)."""
    out: dict[str, str] = {}
    for line in text.split("\n"):  # values are raw with -d: only "\n" ends a line
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
            raise _bad("blkid", line, "expected KEY=value")
        if key in out:
            raise _bad("blkid", line, f"duplicate key {key}")
        out[key] = _BLKID_ESCAPE.sub(r"\1", value) if escaped else value
    return out


def fs_of(probe: Mapping[str, str]) -> tuple[str, str, str]:
    """(fstype, uuid, label) of a parse_blkid result; "" for what is missing.

    fstype is blkid's TYPE: ext4, xfs, vfat, swap, LVM2_member, ...; "" when nothing was found
    or the range holds a partition table (PTTYPE) rather than a filesystem."""
    return probe.get("TYPE", ""), probe.get("UUID", ""), probe.get("LABEL", "")


_OCTAL = re.compile(r"\\([0-7]{3})")
FSTAB_LINE_MAX = 8192  # two PATH_MAX fields and options: anything longer is not an fstab line


def parse_fstab(text: str) -> list[FstabEntry]:
    """Parse an fstab(5) as libmount does.

    Blank lines and lines whose first non-blank char is '#' are skipped; fields are split on
    spaces/tabs; octal escapes (\\040 space, \\011 tab, \\134 backslash, \\043 '#') are decoded
    in every field; missing options -> (), missing freq/passno -> 0; fields after passno are
    ignored (libmount does too).  Fewer than 3 fields or a non-numeric freq/passno raise
    ValueError.  Specs are kept as written (UUID=..., LABEL=..., PARTUUID=..., /dev/...);
    swap entries have vfstype "swap" and file "none" or "swap"."""
    out = []
    for line in text.split("\n"):  # as libmount: "\n" ends a line, other controls do not
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if "\0" in s:
            raise _bad("fstab", line[:200], "NUL byte")
        if len(s) > FSTAB_LINE_MAX:
            raise _bad("fstab", line[:200] + "...", f"longer than {FSTAB_LINE_MAX} characters")
        f = [_unescape_bytes(x, _OCTAL, 8) for x in s.split()]
        if len(f) < 3:
            raise _bad("fstab", line, "needs at least spec, file and vfstype")
        for x in f[4:6]:
            if not x.isdigit():
                raise _bad("fstab", line, f"freq/passno not a number: {x!r}")
        nums = [int(x) for x in f[4:6]] + [0] * (2 - len(f[4:6]))
        options = tuple(o for o in f[3].split(",") if o) if len(f) > 3 else ()
        out.append(FstabEntry(spec=f[0], file=f[1], vfstype=f[2], options=options,
                              freq=nums[0], passno=nums[1]))
    return out


FINDMNT_COLUMNS = ("TARGET", "SOURCE", "FSTYPE", "OPTIONS")
_HEX = re.compile(r"\\x([0-9a-fA-F]{2})")


def dm_snapshot_status_argv() -> list[str]:
    """Fill level of every snapshot on the host in one cheap call (no VG scan, unlike lvs)."""
    return ["dmsetup", "status", "--target", "snapshot"]


def parse_dm_snapshot_status(text: str) -> dict[str, SnapshotUse]:
    """``NAME: START LEN snapshot USED/TOTAL META`` per line, or ``... snapshot Invalid``
    (also ``Overflow``, ``Merge failed``, ``Unknown``); "No devices found" gives {}."""
    out = {}
    for line in text.splitlines():
        if not line.strip() or line.strip() == "No devices found":
            continue
        name, sep, rest = line.partition(": ")
        words = rest.split()
        if not sep or len(words) < 4 or words[2] != "snapshot":
            raise _bad("dmsetup status", line, "expected NAME: START LENGTH snapshot STATUS")
        m = re.fullmatch(r"(\d+)/(\d+)", words[3])
        out[name] = SnapshotUse(name, int(m.group(1)), int(m.group(2)), "valid") if m else \
            SnapshotUse(name, 0, 0, " ".join(words[3:]).lower())
    return out


def findmnt_argv(*, json_output: bool = False) -> list[str]:
    """argv listing all mounts, one per line (-r: raw; spaces, tabs, backslashes and
    non-ASCII bytes escaped as \\xHH, so a line splits on single spaces into exactly 4 fields).

    The -r form is the default: it exists in every findmnt; -J needs util-linux >= 2.27.
    parse_findmnt reads both.  findmnt exits 1 when nothing matches (with -M/-T/-t filters)."""
    cols = ",".join(FINDMNT_COLUMNS)
    if json_output:
        return ["findmnt", "-J", "-l", "-o", cols]
    return ["findmnt", "-rn", "-o", cols]


def _mountinfo(target: str, source: str, fstype: str, options: str) -> MountInfo:
    return MountInfo(target=target, source=source, fstype=fstype,
                     options=tuple(o for o in options.split(",") if o))


def _findmnt_json(text: str) -> list[MountInfo]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        line = text.splitlines()[e.lineno - 1] if e.lineno - 1 < len(text.splitlines()) else ""
        raise _bad("findmnt JSON", line, str(e)) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("filesystems"), list):
        raise ValueError(f"findmnt JSON without a 'filesystems' list: {text[:80]!r}")
    out: list[MountInfo] = []

    def walk(fss: list) -> None:  # tree output (without -l) nests "children"
        for fs in fss:
            try:
                out.append(_mountinfo(fs["target"], fs["source"] or "", fs["fstype"] or "",
                                      fs["options"] or ""))
            except (KeyError, TypeError, AttributeError):
                raise _bad("findmnt JSON", json.dumps(fs), "needs target, source, fstype, "
                           "options") from None
            walk(fs.get("children", []))

    walk(doc["filesystems"])
    return out


def parse_findmnt(text: str) -> list[MountInfo]:
    """Parse the output of ``findmnt_argv()`` (-rn, \\xHH escapes decoded) or of its JSON form."""
    if text.lstrip().startswith("{"):
        return _findmnt_json(text)
    out = []
    for line in _nonblank(text):
        f = line.split(" ")
        if len(f) != len(FINDMNT_COLUMNS):
            raise _bad("findmnt", line, f"expected {len(FINDMNT_COLUMNS)} space-separated fields")
        target, source, fstype, options = (_unescape_bytes(x, _HEX, 16) for x in f)
        if not target:
            raise _bad("findmnt", line, "empty TARGET")
        out.append(_mountinfo(target, source, fstype, options))
    return out


def partx_argv(dev: str) -> list[str]:
    """argv of the partition table's ids: number, PARTUUID and PARTLABEL of each partition
    (msdos: "DISKID-NN", no label; gpt: the partition GUID and name), what fstab's PARTUUID=
    and PARTLABEL= name."""
    return ["partx", "-g", "-r", "-o", "NR,UUID,NAME", dev]


def parse_partx(text: str) -> dict[int, tuple[str, str]]:
    """Partition number -> (PARTUUID, PARTLABEL) from ``partx_argv`` output: -r escapes spaces,
    backslashes and other unsafe bytes as \\xHH, so fields split on single spaces."""
    out = {}
    for line in _nonblank(text):
        f = line.split(" ")
        if len(f) != 3 or not f[0].isdigit():
            raise _bad("partx", line, "expected NR UUID NAME")
        out[int(f[0])] = (_unescape_bytes(f[1], _HEX, 16), _unescape_bytes(f[2], _HEX, 16))
    return out


def parse_kpartx_list(text: str) -> list[tuple[str, int, str, int]]:
    """(device-mapper name, sectors, parent device, start sector in the parent) of each
    mapping ``kpartx -l -p SEP DEV`` would create, in order: one line ``NAME : 0 SECTORS PARENT
    OFFSET`` per partition (logical ones relative to their extended partition, whose parent
    kpartx names by a guess); nothing for a device without a partition table."""
    out = []
    for line in _nonblank(text):
        m = re.fullmatch(r"(\S+) : 0 (\d+) (\S+) (\d+)", line.strip())
        if not m:
            raise _bad("kpartx -l", line)
        out.append((m.group(1), int(m.group(2)), m.group(3), int(m.group(4))))
    return out


def parse_mount_space(text: str, paths) -> list[Space | None]:
    """The figures `domubackup mount-in` told for the mounts of PATHS, in order: each item is
    told as "space SIZE USED FREE INODES INODES_USED\n" then "mounted PATH\n" (PATH is read as
    the exact text expected: it may hold any character, newlines too). None for an item told
    without figures; the list stops where the output does."""
    out, pos = [], 0
    for path in paths:
        space = None
        if text.startswith("space ", pos):
            end = text.find("\n", pos)
            words = text[pos:end].split(" ") if end >= 0 else []
            if len(words) != 6 or not all(w.isdigit() for w in words[1:]):
                raise ValueError(f"malformed mount-in output at {text[pos:pos + 200]!r}")
            space, pos = Space(*map(int, words[1:])), end + 1
        if not text.startswith(f"mounted {path}\n", pos):
            if space is not None or pos < len(text):
                raise ValueError(f"malformed mount-in output at {text[pos:pos + 200]!r}")
            break
        out.append(space)
        pos += len(f"mounted {path}\n")
    return out


def parse_received(text: str) -> tuple[str, str]:
    """`receive-blocks` output: (the replica's checksum, its write token); "" / "-" when absent."""
    words = text.split()
    token = words[2] if len(words) == 3 and words[1] == "token" else "-"
    return (words[0] if words else ""), token


def parse_digests(text: str, blocks: int) -> list[bytes] | None:
    """`block-digests` output: None for ``same``, else BLOCKS digests (ValueError otherwise)."""
    lines = text.split()
    if lines == ["same"]:
        return None
    if len(lines) != blocks:
        raise ValueError(f"{len(lines)} block digests, {blocks} expected")
    if any(len(line) != 16 for line in lines):  # xxh64: 8 bytes (a peer of another version)
        raise ValueError("block digests that are not xxh64 (another domubackup version there?)")
    return [bytes.fromhex(line) for line in lines]


def parse_thin_delta(xml: str) -> list[tuple[int, int]]:
    """`thin_delta` output (thin-provisioning-tools 0.9): the (offset, length) in bytes of
    every range where the two thin devices differ (`different`, `left_only`, `right_only`;
    `same` is left out). ValueError when it is not that XML."""
    from lxml import etree

    try:
        root = etree.fromstring(xml.encode())
    except etree.XMLSyntaxError as e:
        raise ValueError(f"not thin_delta's XML: {e}") from None
    if root.tag != "superblock" or root.find("diff") is None:
        raise ValueError("not thin_delta's XML: no <superblock><diff>")
    unit = int(root.get("data_block_size")) * 512  # sectors per data block
    return [(int(r.get("begin")) * unit, int(r.get("length")) * unit)
            for r in root.find("diff") if r.tag in ("different", "left_only", "right_only")]
