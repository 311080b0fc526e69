"""Pure parsers of what rsync prints: its ``--stats`` block, its itemized changes (verify),
and its ``--info=progress2`` records (a progress bar). See parsers.py for the conventions."""

from __future__ import annotations

import re

from .model import RsyncStats
from .parsers import _bad, _nonblank, _unescape_bytes

_RSYNC_KEYS = {"Number of files": "files", "Number of regular files transferred": "files_transferred",
               "Number of files transferred": "files_transferred",  # rsync < 3.1
               "Total file size": "total_size", "Total transferred file size": "transferred_size",
               "Total bytes sent": "bytes_sent", "Total bytes received": "bytes_received",
               "Number of deleted files": "deleted"}
_RSYNC_REQUIRED = ("files", "total_size", "bytes_sent", "bytes_received")


def parse_rsync_stats(text: str) -> RsyncStats:
    """Parse the ``--stats`` block of rsync's stdout (other lines -- itemize lines, the
    "sent ... received ..." summary -- are ignored).
    Numbers may carry thousands commas (rsync >= 3.1 default) or not (``--no-h``).  Numbers
    with a unit suffix or decimals (``-h``: "2.01M bytes") are lossy and raise ValueError:
    run rsync without -h (or with --no-h).  "Number of deleted files" is absent before rsync
    3.1 and then defaults to 0."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(": ")
        field = _RSYNC_KEYS.get(key) if sep else None
        if field is None:
            continue
        m = re.fullmatch(r"(\d{1,3}(?:,\d{3})+|\d+)(?: bytes)?(?: \(.*\))?", rest.strip())
        if not m:
            raise _bad("rsync --stats", line, "number not plain (rsync -h output? use --no-h)")
        if field in values:
            raise _bad("rsync --stats", line, "repeated")
        values[field] = int(m.group(1).replace(",", ""))
    missing = [k for k in _RSYNC_REQUIRED if k not in values]
    if missing:
        first = next((ln for ln in text.splitlines() if ln.strip()), "")
        raise ValueError(f"no complete rsync --stats block (missing {', '.join(missing)}); "
                         f"first line {first!r}")
    return RsyncStats(**values)


_PROGRESS2 = re.compile(r"\r *(\d{1,3}(?:,\d{3})+|\d+) +(\d{1,3})% ")


def parse_progress2(text: str) -> tuple[int, int] | None:
    """The last record of rsync's ``--info=progress2`` in ``text`` (each record starts with a
    CR): (bytes so far, percent of the whole transfer), or None when there is none yet. A
    record cut short at the end of ``text`` is not taken (it needs its "% ")."""
    found = None
    for found in _PROGRESS2.finditer(text):
        pass
    return (int(found.group(1).replace(",", "")), int(found.group(2))) if found else None


_ITEM = re.compile(r"([<>ch.][fdLDS][ .+?a-zA-Z]{9}) (.*)")
_ITEM_MSG = re.compile(r"(\*[a-z]+) +(.*)")
_RSYNC_ESC = re.compile(r"\\#([0-7]{3})")
_RSYNC_INFO = ("sending incremental file list", "receiving incremental file list",
               "building file list", "created directory ")


def parse_rsync_itemize(text: str, link_targets: bool = True) -> list[tuple[str, str]]:
    """(code, path) pairs from ``rsync -i`` (``--itemize-changes``) stdout.
    code is the 11-char %i field (">f.st......", "cd+++++++++", ".d..t......") or the message
    ("*deleting"); path is as rsync prints it, relative to the transfer root, directories
    with a trailing "/", non-printable bytes' \\#ooo escapes decoded.
    With link_targets, the " -> target" that -i appends to a symlink (code[1] == "L") and
    the " => target" of a hard link (code[0] == "h") are cut at their last occurrence (a
    name containing " -> " is ambiguous; use --out-format='%i %n' and link_targets=False to
    avoid it).  Parsing stops at a --stats block or at rsync's "sent ... bytes" summary; the
    "sending incremental file list"/"created directory" lines of -v are skipped; any other
    line raises ValueError.  An empty output (a clean --dry-run --checksum) gives []."""
    out = []
    for line in _nonblank(text):
        if line.startswith(("Number of files: ", "sent ")) and not _ITEM.fullmatch(line):
            break
        m = _ITEM.fullmatch(line)
        if m:
            code, path = m.group(1), m.group(2)
            if link_targets and code[1] == "L" and " -> " in path:
                path = path.rsplit(" -> ", 1)[0]
            elif link_targets and code[0] == "h" and " => " in path:
                path = path.rsplit(" => ", 1)[0]
        else:
            m = _ITEM_MSG.fullmatch(line)
            if not m:
                if line.startswith(_RSYNC_INFO):
                    continue
                raise _bad("rsync itemize", line)
            code, path = m.group(1), m.group(2)
        if not path:
            raise _bad("rsync itemize", line, "empty path")
        out.append((code, _unescape_bytes(path, _RSYNC_ESC, 8)))
    return out
