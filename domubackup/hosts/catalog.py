"""The run catalog: one sqlite file in the state directory recording every run.

Like benji's versions, a run is recorded ``RUNNING`` when it starts and promoted to a final
status (``OK``, ``PARTIAL``: done but something of the guest could not be copied, ``ERROR``,
``CORRUPT``) only when it ends; a run whose process died leaves a ``RUNNING`` record that
:meth:`Catalog.reap_dead` later turns into ``ERROR``.

It also keeps, per DomU and host, the restore points last known there (:meth:`Catalog.record_points`,
after each OK run's points phase): one row each, replaced every time.

Concurrency: the file is in WAL mode, every write is one short ``BEGIN IMMEDIATE`` transaction,
and sqlite's busy timeout makes a second process (backing up another DomU) wait for the lock
instead of failing. Open one :class:`Catalog` per process (never share one across ``fork``)."""

from __future__ import annotations

import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from ..core.errors import DomuBackupError
from ..core.model import (CONSISTENCY_LEVELS, ERROR, FINAL_STATUSES, KINDS, OK, REPLICA_KINDS, RUNNING, STATUSES,
                          PointsRow, RunRow)

CATALOG_NAME = "catalog.sqlite"
SCHEMA_VERSION = 4  # 2: status PARTIAL; 3: kinds prune, rollback, restore, failover; table points;
# 4: blocks_read, blocks_changed (blocks mode)


DIED_MESSAGE = "run died (killed or host crashed) before it finished"

# Figures finish() accepts (named like model.RunRecord), besides the status.
FIGURES = ("consistency", "freeze_window_ms", "bytes_sent", "files", "total_size",
           "snapshot_peak", "error", "log_path", "blocks_read", "blocks_changed")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    kind             TEXT    NOT NULL CHECK (kind IN {KINDS!r}),
    domu             TEXT    NOT NULL,
    peer             TEXT    NOT NULL DEFAULT '',
    host             TEXT    NOT NULL DEFAULT '',
    pid              INTEGER NOT NULL,
    pid_start        INTEGER,            -- /proc/PID/stat field 22 (clock ticks after boot)
    started          REAL    NOT NULL,   -- UTC epoch seconds
    ended            REAL,
    status           TEXT    NOT NULL DEFAULT 'RUNNING' CHECK (status IN {STATUSES!r}),
    consistency      TEXT    CHECK (consistency IS NULL OR consistency IN {CONSISTENCY_LEVELS!r}),
    freeze_window_ms INTEGER,
    bytes_sent       INTEGER NOT NULL DEFAULT 0,
    files            INTEGER NOT NULL DEFAULT 0,
    total_size       INTEGER NOT NULL DEFAULT 0,
    snapshot_peak    REAL,               -- highest snapshot fill seen, percent
    error            TEXT    NOT NULL DEFAULT '',
    log_path         TEXT,
    blocks_read      INTEGER NOT NULL DEFAULT 0,  -- blocks mode: 4 MiB blocks read from the snapshots
    blocks_changed   INTEGER NOT NULL DEFAULT 0   -- of those, the ones written to a replica
);
CREATE INDEX IF NOT EXISTS runs_domu_started ON runs (domu, started);
CREATE INDEX IF NOT EXISTS runs_status ON runs (status);
CREATE TABLE IF NOT EXISTS points (
    domu        TEXT    NOT NULL,
    host        TEXT    NOT NULL,       -- the host that holds the points (a peer, or this one)
    points      INTEGER NOT NULL,
    good        INTEGER NOT NULL CHECK (good BETWEEN 0 AND points),
    newest_good REAL,                   -- the newest GOOD point's time, UTC epoch seconds
    updated     REAL    NOT NULL,
    PRIMARY KEY (domu, host)
);
"""


class CatalogError(DomuBackupError):
    """The run catalog cannot be opened, is locked for too long, or has an unknown schema."""


_COLUMNS = tuple(RunRow.__dataclass_fields__)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM runs"


def process_start_ticks(pid: int) -> int | None:
    """Field 22 (starttime) of /proc/PID/stat, or None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces and ')'.
    rest = data[data.rfind(")") + 2:].split()
    try:
        if rest[0] == "Z":  # a zombie has finished: not alive for us
            return None
        return int(rest[19])  # rest[0] is field 3
    except (IndexError, ValueError):
        return None


def process_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether ``pid`` is a live process, and the same one when its start time is known.

    Uses /proc when it exists (also catching zombies and a reused pid), else ``os.kill(pid, 0)``."""
    if pid <= 0:
        return False
    if os.path.isdir("/proc/self"):
        ticks = process_start_ticks(pid)
        if ticks is None:
            return False
        return start_ticks is None or ticks == start_ticks
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class Catalog:
    """The catalog file at ``path`` (created with its parent directory on first use)."""

    def __init__(self, path: str | os.PathLike, *, busy_timeout: float = 30.0,
                 clock: Callable[[], float] = time.time, host: str | None = None):
        self.path, self.clock = Path(path), clock
        self.host = host if host is not None else socket.gethostname()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: no implicit transactions; _write() opens its own.
            self._db = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None)
        except (OSError, sqlite3.Error) as e:
            raise CatalogError(f"cannot open the run catalog {self.path}: {e}") from e
        try:
            self._setup()
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def in_state_dir(cls, state_dir: str | os.PathLike, **kwargs) -> Catalog:
        """The catalog of a state directory: ``STATE_DIR/catalog.sqlite``."""
        return cls(Path(state_dir) / CATALOG_NAME, **kwargs)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing --

    def _setup(self) -> None:
        try:
            # Persistent in the file; a no-op once the file is in WAL mode.
            self._db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as e:
            raise CatalogError(f"cannot open the run catalog {self.path}: {e}",
                               hint="is it an sqlite file?") from e
        if self._check_version(self._db) == SCHEMA_VERSION:
            return  # the usual case: no write lock needed to open the catalog
        with self._write() as db:
            # Checked again under the write lock: another process may have just created it.
            version = self._check_version(db)
            if version < SCHEMA_VERSION:
                # Version 0 is a new file. 1 -> 2: the status CHECK gains PARTIAL; 2 -> 3: the kind
                # CHECK gains prune, rollback, restore, failover (and the table points is new);
                # 3 -> 4: the columns blocks_read and blocks_changed (0 in older rows).
                # sqlite cannot alter a CHECK, so the runs table is rebuilt under the same name,
                # its id sequence kept (ids are never reused).
                if version > 0:
                    db.execute("ALTER TABLE runs RENAME TO runs_old")
                    db.execute("DROP INDEX IF EXISTS runs_domu_started")
                    db.execute("DROP INDEX IF EXISTS runs_status")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                if version > 0:
                    old = [r[1] for r in db.execute("PRAGMA table_info(runs_old)")]
                    db.execute(f"INSERT INTO runs ({', '.join(old)}) SELECT {', '.join(old)} FROM runs_old")
                    db.execute("DELETE FROM sqlite_sequence WHERE name = 'runs'")
                    db.execute("INSERT INTO sqlite_sequence (name, seq)"
                               " SELECT 'runs', seq FROM sqlite_sequence WHERE name = 'runs_old'")
                    db.execute("DROP TABLE runs_old")
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _check_version(self, db: sqlite3.Connection) -> int:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise CatalogError(
                f"the run catalog {self.path} has schema version {version}, newer than "
                f"this domubackup understands ({SCHEMA_VERSION})", hint="upgrade domubackup")
        return version

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction, taking the write lock up front (waits busy_timeout)."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise CatalogError(f"cannot write the run catalog {self.path}: {e}",
                               hint="another domubackup holds it for too long?") from e
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            self._db.execute("ROLLBACK")
            raise CatalogError(f"cannot write the run catalog {self.path}: {e}") from e

    def _select(self, where: str = "", params: tuple = (), tail: str = "") -> list[RunRow]:
        sql = _SELECT + (f" WHERE {where}" if where else "") + " " + tail
        try:
            return [RunRow(*r) for r in self._db.execute(sql, params)]
        except sqlite3.Error as e:
            raise CatalogError(f"cannot read the run catalog {self.path}: {e}") from e

    # -- runs --

    def start(self, kind: str, domu: str, peer: str, pid: int, log_path: str | None = None) -> int:
        """Record a new run as RUNNING and return its id (ids are never reused, even after prune)."""
        if kind not in KINDS:
            raise ValueError(f"unknown run kind {kind!r} (expected one of {', '.join(KINDS)})")
        with self._write() as db:
            cur = db.execute(
                "INSERT INTO runs (kind, domu, peer, host, pid, pid_start, started, log_path)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (kind, domu, peer or "", self.host, pid, process_start_ticks(pid), self.clock(),
                 None if log_path is None else str(log_path)))
            return cur.lastrowid

    def finish(self, run_id: int, status: str, **figures) -> RunRow:
        """Promote a RUNNING run to ``status`` (OK, ERROR or CORRUPT) with its figures.
        ``figures`` are any of: consistency, freeze_window_ms, bytes_sent, files, total_size,
        snapshot_peak, error, log_path, blocks_read, blocks_changed. Any transition other than RUNNING -> final raises
        ValueError (finishing twice, an unknown run, a non-final status)."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"cannot finish run {run_id} as {status!r}: "
                             f"expected one of {', '.join(FINAL_STATUSES)}")
        unknown = sorted(set(figures) - set(FIGURES))
        if unknown:
            raise TypeError(f"finish() got unknown figures: {', '.join(unknown)}")
        consistency = figures.get("consistency")
        if consistency is not None and consistency not in CONSISTENCY_LEVELS:
            raise ValueError(f"unknown consistency level {consistency!r} "
                             f"(expected one of {', '.join(CONSISTENCY_LEVELS)})")
        if "log_path" in figures and figures["log_path"] is not None:
            figures["log_path"] = str(figures["log_path"])
        if figures.get("error") is None:
            figures.pop("error", None)
        sets = ", ".join(f"{k} = ?" for k in figures)
        with self._write() as db:
            cur = db.execute(
                f"UPDATE runs SET status = ?, ended = ?{', ' + sets if sets else ''}"
                " WHERE id = ? AND status = ?",
                (status, self.clock(), *figures.values(), run_id, RUNNING))
            if cur.rowcount != 1:
                row = db.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
                if row is None:
                    raise ValueError(f"no run {run_id} in the catalog")
                raise ValueError(f"run {run_id} is already {row[0]}: cannot finish it as {status}")
        return self.get(run_id)

    def finish_record(self, run_id: int, record) -> RunRow:
        """finish() from a :class:`domubackup.model.RunRecord` (its status and figures)."""
        return self.finish(run_id, record.status, consistency=record.consistency,
                           freeze_window_ms=record.freeze_window_ms, bytes_sent=record.bytes_sent,
                           files=record.files, total_size=record.total_size,
                           snapshot_peak=record.snapshot_peak, error=record.error)

    def reap_dead(self, is_alive: Callable[[int], bool] | None = None) -> list[int]:
        """Turn RUNNING runs of this host whose process is gone into ERROR; return their ids.
        By default a process counts as alive when /proc/PID exists, is not a zombie, and has the
        start time recorded by start() (so a reused pid is not mistaken for the run). Runs
        recorded by another host are left alone: their pid means nothing here. A reaped run
        keeps ``ended`` NULL: when it died is not known."""
        running = self._select("status = ? AND host = ?", (RUNNING, self.host), "ORDER BY id")
        dead = [row.id for row in running
                if not (process_alive(row.pid, row.pid_start) if is_alive is None else is_alive(row.pid))]
        reaped = []
        with self._write() as db:
            for run_id in dead:
                # "AND status" so a run that finished meanwhile is not overwritten.
                cur = db.execute("UPDATE runs SET status = ?, error = ? WHERE id = ? AND status = ?",
                                 (ERROR, DIED_MESSAGE, run_id, RUNNING))
                if cur.rowcount == 1:
                    reaped.append(run_id)
        return reaped

    def get(self, run_id: int) -> RunRow | None:
        rows = self._select("id = ?", (run_id,))
        return rows[0] if rows else None

    def runs(self, domu: str | None = None, since: float | datetime | None = None,
             limit: int | None = None, kind: str | None = None) -> list[RunRow]:
        """Runs newest first (by start time), optionally of one DomU / kind, started at or after
        ``since`` (epoch seconds or an aware datetime), at most ``limit`` of them."""
        if since is not None:
            since = since.timestamp() if isinstance(since, datetime) else float(since)
        terms = [(t, v) for t, v in (("domu = ?", domu), ("kind = ?", kind), ("started >= ?", since)) if v is not None]
        where, params = [t for t, _ in terms], [v for _, v in terms]
        tail = "ORDER BY started DESC, id DESC"
        if limit is not None:
            tail += " LIMIT ?"
            params.append(int(limit))
        return self._select(" AND ".join(where), tuple(params), tail)

    def last_ok(self, domu: str, kinds: tuple[str, ...] = REPLICA_KINDS) -> RunRow | None:
        """The newest OK run of ``domu`` among ``kinds`` (default: backup and seed)."""
        marks = ", ".join("?" * len(kinds))
        rows = self._select(f"domu = ? AND status = ? AND kind IN ({marks})",
                            (domu, OK, *kinds), "ORDER BY started DESC, id DESC LIMIT 1")
        return rows[0] if rows else None

    def latest_per_domu(self, kinds: tuple[str, ...] = REPLICA_KINDS) -> dict[str, list[RunRow]]:
        """What metrics need, per DomU (sorted): its newest finished run, followed by its newest
        OK run when that is another one. RUNNING runs are ignored; DomUs with only RUNNING runs
        are absent. Only ``kinds`` count (default: backup and seed)."""
        marks = ", ".join("?" * len(kinds))
        rows = self._select(
            f"id IN (SELECT id FROM (SELECT id, ROW_NUMBER() OVER ("
            f"  PARTITION BY domu ORDER BY started DESC, id DESC) AS n"
            f"  FROM runs WHERE status != ? AND kind IN ({marks})) WHERE n = 1)"
            f" OR id IN (SELECT id FROM (SELECT id, ROW_NUMBER() OVER ("
            f"  PARTITION BY domu ORDER BY started DESC, id DESC) AS n"
            f"  FROM runs WHERE status = ? AND kind IN ({marks})) WHERE n = 1)",
            (RUNNING, *kinds, OK, *kinds), "ORDER BY domu, started DESC, id DESC")
        out: dict[str, list[RunRow]] = {}
        for row in rows:
            out.setdefault(row.domu, []).append(row)
        return out

    def prune(self, older_than_days: float, now: float | None = None) -> int:
        """Delete runs started more than ``older_than_days`` before ``now``; return how many.
        Never deletes a RUNNING run (reap_dead() first), and always keeps the newest OK run of
        each DomU and kind, however old, so "when did this DomU last succeed" survives pruning.
        Log files named by deleted runs are not touched."""
        if older_than_days < 0:
            raise ValueError(f"older_than_days must be >= 0, not {older_than_days}")
        cutoff = (self.clock() if now is None else now) - older_than_days * 86400
        with self._write() as db:
            cur = db.execute(
                "DELETE FROM runs WHERE started < ? AND status != ? AND id NOT IN ("
                " SELECT id FROM (SELECT id, ROW_NUMBER() OVER ("
                "  PARTITION BY domu, kind ORDER BY started DESC, id DESC) AS n"
                "  FROM runs WHERE status = ?) WHERE n = 1)",
                (cutoff, RUNNING, OK))
            return cur.rowcount

    # -- restore points --

    def record_points(self, domu: str, host: str, *, points: int, good: int, newest_good: float | None) -> None:
        """What is known of DOMU's restore points on HOST now: how many, how many GOOD, the newest
        GOOD one's time (UTC epoch seconds; None when none is good). Replaces the last record."""
        if not 0 <= good <= points:
            raise ValueError(f"{domu} on {host}: {good} good points of {points}?")
        if (newest_good is None) != (good == 0):
            raise ValueError(f"{domu} on {host}: newest_good {newest_good!r} with {good} good points")
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO points (domu, host, points, good, newest_good, updated)"
                       " VALUES (?, ?, ?, ?, ?, ?)",
                       (domu, host, points, good, None if newest_good is None else float(newest_good), self.clock()))

    def points(self, domu: str | None = None) -> list[PointsRow]:
        """The last record of each (DomU, host), of one DomU or all, sorted by DomU and host."""
        sql = "SELECT domu, host, points, good, newest_good, updated FROM points"
        try:
            rows = self._db.execute(sql + (" WHERE domu = ?" if domu is not None else "") + " ORDER BY domu, host",
                                    () if domu is None else (domu,))
            return [PointsRow(*r) for r in rows]
        except sqlite3.Error as e:
            raise CatalogError(f"cannot read the run catalog {self.path}: {e}") from e
