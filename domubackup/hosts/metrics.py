"""Prometheus metrics for node_exporter's textfile collector.

``render_metrics`` is pure; ``write_textfile`` replaces the file atomically (node_exporter reads
only ``*.prom`` files of its ``--collector.textfile.directory``, so the temporary file it writes
first is named ``.NAME.*.tmp`` and never half-read). Every series of a DomU's runs carries the
labels of its newest finished run (``domu``, ``peer``); the restore points series carry ``domu``
and ``host``, the host that holds the points (as the catalog last heard of them)."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence

from .journal import atomic_write
from ..core.model import OK, PARTIAL, RUNNING, PointsRow, RunRow
from .catalog import Catalog

# (name, help); all gauges, rendered in this order.
METRICS = (
    ("domubackup_last_run_status",
     "Whether the last finished run of the DomU succeeded (1), was partial (0.5: something of the "
     "guest could not be copied) or failed (0)."),
    ("domubackup_last_run_start_timestamp_seconds",
     "Start of the last finished run, seconds since the epoch."),
    ("domubackup_last_run_duration_seconds",
     "Duration of the last finished run (absent when the run died and its end is unknown)."),
    ("domubackup_last_run_bytes_sent",
     "Bytes rsync sent to the peer during the last finished run."),
    ("domubackup_last_run_blocks_read",
     "Blocks mode: 4 MiB blocks read from the snapshots in the last finished run."),
    ("domubackup_last_run_blocks_changed",
     "Blocks mode: of those, the blocks sent to a replica because they changed."),
    ("domubackup_last_run_freeze_window_seconds",
     "How long the guest's filesystems stayed frozen in the last finished run (0: not frozen)."),
    ("domubackup_last_success_timestamp_seconds",
     "End of the last successful run, seconds since the epoch (0: never succeeded)."),
    ("domubackup_last_ok_age_seconds",
     "Seconds from the end of the DomU's newest OK run on this Dom0 to the writing of this file "
     "(+Inf: none here). Every configured DomU has one on every Dom0: the min over the Dom0s is "
     "how long since any backed it up."),
    ("domubackup_restore_points",
     "Restore points of the DomU on the host after its last OK run here (or prune)."),
    ("domubackup_restore_points_good",
     "Of those, the GOOD ones (complete and valid)."),
    ("domubackup_newest_good_point_age_seconds",
     "Seconds from the newest GOOD restore point of the DomU on the host to the writing of this "
     "file (absent: no good point)."),
)


def escape_label_value(value: str) -> str:
    """Escape a label value per the text exposition format: backslash, double quote, newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float | int) -> str:
    if value == float("inf"):
        return "+Inf"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def _newest(rows: Sequence[RunRow], ok_only: bool) -> RunRow | None:
    return max((r for r in rows if r.status != RUNNING and (r.status == OK or not ok_only)),
               key=lambda r: (r.started, r.id), default=None)


def _ok_age(rows: Sequence[RunRow], now: float) -> float:
    ok = _newest(rows, ok_only=True)
    return float("inf") if ok is None else now - (ok.ended if ok.ended is not None else ok.started)


def _values(rows: Sequence[RunRow], now: float) -> dict[str, float | int]:
    last = _newest(rows, ok_only=False)
    if last is None:
        return {"domubackup_last_ok_age_seconds": float("inf")}
    ok = _newest(rows, ok_only=True)
    values = {
        "domubackup_last_run_status": 1 if last.status == OK else 0.5 if last.status == PARTIAL else 0,
        "domubackup_last_run_start_timestamp_seconds": last.started,
        "domubackup_last_run_bytes_sent": last.bytes_sent,
        "domubackup_last_run_blocks_read": last.blocks_read,
        "domubackup_last_run_blocks_changed": last.blocks_changed,
        "domubackup_last_run_freeze_window_seconds": (last.freeze_window_ms or 0) / 1000,
        # A success with no end time cannot exist (finish() sets it); fall back to its start.
        "domubackup_last_success_timestamp_seconds":
            0 if ok is None else (ok.ended if ok.ended is not None else ok.started),
        "domubackup_last_ok_age_seconds": _ok_age(rows, now),
    }
    if last.duration is not None:
        values["domubackup_last_run_duration_seconds"] = last.duration
    return values


def _point_values(row: PointsRow, now: float) -> dict[str, float | int]:
    values = {"domubackup_restore_points": row.points, "domubackup_restore_points_good": row.good}
    if row.newest_good is not None:
        values["domubackup_newest_good_point_age_seconds"] = now - row.newest_good
    return values


def render_metrics(rows_by_domu: Mapping[str, Sequence[RunRow]], domus: Sequence[str] = (),
                   now: float | None = None, points: Sequence[PointsRow] = ()) -> str:
    """The textfile for ``{domu: rows}`` (e.g. ``Catalog.latest_per_domu()``) and the configured
    ``domus``, at ``now`` (default: the clock).
    For each DomU, its newest finished row gives the ``last_run`` series and its newest OK row
    the ``last_success`` one (0 when there is none, so a "too long since success" alert fires)
    and ``last_ok_age`` (+Inf when there is none). RUNNING rows are ignored; a DomU without a
    finished row has only ``last_ok_age`` (+Inf, ``peer=""``), and only when in ``domus``.
    ``points`` (``Catalog.points()``) give the restore points series, one per DomU and host.
    DomUs (and hosts) are sorted."""
    now = time.time() if now is None else now
    series = []
    for domu in sorted(set(rows_by_domu) | set(domus)):
        rows = rows_by_domu.get(domu, ())
        last = _newest(rows, ok_only=False)
        if last is None and domu not in domus:
            continue
        labels = f'domu="{escape_label_value(domu)}",peer="{escape_label_value(last.peer if last else "")}"'
        series.append((labels, _values(rows, now)))
    for row in sorted(points, key=lambda r: (r.domu, r.host)):
        labels = f'domu="{escape_label_value(row.domu)}",host="{escape_label_value(row.host)}"'
        series.append((labels, _point_values(row, now)))
    lines = []
    for name, help_text in METRICS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        for labels, values in series:
            if name in values:
                lines.append(f"{name}{{{labels}}} {_number(values[name])}")
    return "\n".join(lines) + "\n"


def write_textfile(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` atomically: temp file in the same directory, fsync,
    mode 0644, rename, fsync of the directory. The temp file is removed on failure."""
    atomic_write(os.fspath(path), text, mode=0o644)


def write_metrics(catalog: Catalog, path: str | os.PathLike, domus: Sequence[str] = ()) -> str:
    """Render the catalog's latest backup/seed runs (and the configured ``domus``) and its
    restore points into ``path``; return the text written."""
    text = render_metrics(catalog.latest_per_domu(), domus, points=catalog.points())
    write_textfile(path, text)
    return text
