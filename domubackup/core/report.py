"""Pure formatting of catalog rows and run outcomes (the history table, their JSON) and ``--since``
parsing. Times in the table are local (honouring TZ); in JSON, UTC ISO 8601 with a ``Z``."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from datetime import datetime, timezone

from .model import OK, REPLICA_KINDS, RUNNING, RunRow
from .config import parse_age

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def human_bytes(n: int | float) -> str:
    """Binary units with one decimal: ``512 B``, ``1.0 KiB``, ``1.2 GiB``."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n < 1024:
        return f"{sign}{int(n)} B"
    value = float(n)
    for unit in _UNITS[1:]:
        value /= 1024
        if round(value, 1) < 1024 or unit == _UNITS[-1]:
            return f"{sign}{value:.1f} {unit}"
    raise AssertionError("unreachable")


def human_duration(seconds: float | None) -> str:
    """``45s``, ``1m02s``, ``1h02m03s``, ``2d03h04m`` (rounded to the second); ``-`` for None."""
    if seconds is None:
        return "-"
    s = max(0, round(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m{s:02d}s"
    if minutes:
        return f"{minutes}m{s:02d}s"
    return f"{s}s"


def _local(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _size(row: RunRow) -> str:
    if row.status == RUNNING or (row.status != OK and not row.total_size and not row.bytes_sent):
        return "-"
    return f"{human_bytes(row.total_size)} ({human_bytes(row.bytes_sent)} sent)"


def _duration(row: RunRow, now: float) -> str:
    return human_duration(now - row.started if row.status == RUNNING else row.duration)


HISTORY_COLUMNS = ("START", "DOMU", "PEER", "KIND", "MODE", "DURATION", "SIZE", "STATUS")
_RIGHT = {"DURATION", "SIZE"}


def format_history(rows: Iterable[RunRow], now: float | None = None) -> str:
    """A ``pg_rman show``-like table of runs, in the order given (the catalog gives newest first).
    START is local time; DURATION of a RUNNING run counts up to ``now`` (default: the clock);
    SIZE is the total size of the replicated files and, in parentheses, the bytes sent.
    Ends with a newline."""
    now = time.time() if now is None else now
    table = [HISTORY_COLUMNS] + [(_local(r.started), r.domu, r.peer or "-", r.kind, r.consistency or "-",
                                  _duration(r, now), _size(r), r.status) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HISTORY_COLUMNS))]

    def fmt(line) -> str:
        cells = (cell.rjust(w) if name in _RIGHT else cell.ljust(w)
                 for name, cell, w in zip(HISTORY_COLUMNS, line, widths))
        return "  ".join(cells).rstrip()

    rule = "=" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([rule, fmt(table[0]), rule] + [fmt(line) for line in table[1:]]) + "\n"


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def history_json(rows: Iterable[RunRow]) -> list[dict]:
    """Rows as JSON-ready dicts: UTC ISO 8601 times (to the second), raw numbers, None as null."""
    return [{"id": r.id, "kind": r.kind, "domu": r.domu, "peer": r.peer, "host": r.host, "pid": r.pid,
             "status": r.status, "started": _iso(r.started), "ended": _iso(r.ended), "duration_seconds": r.duration,
             "consistency": r.consistency, "freeze_window_ms": r.freeze_window_ms, "bytes_sent": r.bytes_sent,
             "blocks_read": r.blocks_read, "blocks_changed": r.blocks_changed,
             "files": r.files, "total_size": r.total_size, "snapshot_peak_percent": r.snapshot_peak,
             "error": r.error, "log_path": r.log_path} for r in rows]


def outcome_json(out, started: float, ended: float, log_path: str | None) -> dict:
    """One DomU's run (a frame.Outcome) as a JSON-ready dict, for `run --json` and `verify
    --json`: the keys of ``history_json`` where they mean the same, plus ``exit_code`` and
    ``not_copied``. ``started`` and ``ended`` are epoch seconds."""
    return {"domu": out.domu, "status": out.status, "exit_code": out.exit_code, "started": _iso(started),
            "ended": _iso(ended), "duration_seconds": round(out.duration, 3), "bytes_sent": out.stats.bytes_sent,
            "blocks_read": out.stats.blocks_read, "blocks_changed": out.stats.blocks_changed,
            "files": out.stats.files, "total_size": out.stats.total_size, "snapshot_peak_percent": out.snapshot_peak,
            "not_copied": list(out.not_copied), "error": out.error, "log_path": log_path, "point": out.point or None}


_DATE = re.compile(r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2})?)?(?:Z|[+-]\d{2}:\d{2})?")


def age_text(seconds: float) -> str:
    """``2d``, ``36h`` for whole days or hours (max_age), else as ``human_duration``."""
    for unit, size in (("d", 86400), ("h", 3600)):
        if seconds and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return human_duration(seconds)


def newest_ok_per_domu(history) -> dict[str, float]:
    """Each DomU's newest OK backup or seed (its end, epoch seconds) in a ``history --json``
    answer (a peer's). ValueError when the answer is not such a list."""
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        raise ValueError("not a list of runs")
    out: dict[str, float] = {}
    for r in history:
        if r.get("status") == OK and r.get("kind") in REPLICA_KINDS:
            try:
                when = datetime.fromisoformat(str(r.get("ended") or r["started"]).replace("Z", "+00:00")).timestamp()
            except (KeyError, ValueError) as e:
                raise ValueError(f"run {r.get('id')!r}: bad time: {e}") from None
            out[str(r["domu"])] = max(when, out.get(str(r["domu"]), when))
    return out


def last_ok_text(newest: tuple[float, str] | None, now: float, max_age: float) -> tuple[bool, str]:
    """(whether the newest OK run, (end, host) or None, is within ``max_age`` of ``now``, what to
    say about it): the one wording of `check`, the run's summary and the metrics' help."""
    if newest is None:
        return False, f"no OK backup within {age_text(max_age)}: none recorded"
    when, host = newest
    age = now - when
    text = f"newest OK {human_duration(age)} ago ({_iso(when)}, on {host})"
    if age > max_age:
        return False, f"no OK backup within {age_text(max_age)}: {text}"
    return True, text


def parse_since(text: str, now: float) -> float:
    """A ``--since`` value to epoch seconds.
    Accepts an age before ``now`` (``24h``, ``7d``, ``2w``), a date (``2026-11-20``, local
    midnight) or a date and time (``2026-11-20T10:00``, local unless it ends in ``Z`` or an
    offset like ``+01:00``; seconds optional). Anything else raises ValueError."""
    value = text.strip()
    age = parse_age(value)
    if age is not None:
        return now - age
    if _DATE.fullmatch(value):
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as e:
            raise ValueError(f"invalid date in since value {text!r}: {e}") from None
        return when.timestamp()  # naive -> local time
    raise ValueError(f"invalid since value {text!r}: expected a date (2026-11-20), a date and "
                     f"time (2026-11-20T10:00) or an age in hours, days or weeks (24h, 7d, 2w)")
