"""The run catalog on real sqlite files under tmp_path, and its pure formatting."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import threading
import time

import pytest

from domubackup.hosts.catalog import (DIED_MESSAGE, SCHEMA_VERSION, Catalog, CatalogError, RunRow,
                                process_alive, process_start_ticks)
from domubackup.core.model import RunRecord
from domubackup.core.report import (format_history, history_json, human_bytes, human_duration,
                               parse_since)

T0 = 1_790_000_000.0  # 2026-09-21T14:13:20Z


class Clock:
    """A settable clock: catalog times are exact in tests."""

    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def cat(tmp_path, clock):
    with Catalog(tmp_path / "state" / "catalog.sqlite", clock=clock, host="dom0a") as c:
        yield c


def _set_tz(tz):
    if tz is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = tz
    time.tzset()


@pytest.fixture
def tz():
    """Set TZ for a test; restored (and tzset again) afterwards."""
    old = os.environ.get("TZ")
    yield _set_tz
    _set_tz(old)


# --- file, schema ------------------------------------------------------------------------------

def test_created_on_first_use_with_schema_version_and_wal(tmp_path):
    path = tmp_path / "state" / "catalog.sqlite"
    Catalog.in_state_dir(tmp_path / "state").close()
    assert path.exists()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    Catalog(path).close()  # reopening an existing catalog is fine


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "catalog.sqlite"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(CatalogError, match="schema version 99"):
        Catalog(path)


def test_not_a_database_is_a_catalog_error(tmp_path):
    path = tmp_path / "catalog.sqlite"
    path.write_bytes(b"this is not sqlite, just some text long enough to have a header" * 20)
    with pytest.raises(CatalogError, match="catalog"):
        Catalog(path)


# --- transitions -------------------------------------------------------------------------------

def test_start_records_running(cat):
    run = cat.start("backup", "web1", "dom0b", os.getpid(), log_path="/var/log/x.log")
    row = cat.get(run)
    assert (row.kind, row.domu, row.peer, row.pid, row.host) == (
        "backup", "web1", "dom0b", os.getpid(), "dom0a")
    assert row.status == "RUNNING" and row.started == T0 and row.ended is None
    assert row.log_path == "/var/log/x.log" and row.duration is None
    assert row.pid_start == process_start_ticks(os.getpid()) is not None


@pytest.mark.parametrize("status", ["OK", "ERROR", "CORRUPT"])
def test_running_to_final(cat, clock, status):
    run = cat.start("backup", "web1", "dom0b", os.getpid())
    clock.t = T0 + 62.5
    row = cat.finish(run, status, consistency="filesystem", freeze_window_ms=840,
                     bytes_sent=1234, files=56, total_size=7890, snapshot_peak=12.5,
                     error="" if status == "OK" else "boom")
    assert row.status == status and row.ended == T0 + 62.5 and row.duration == 62.5
    assert (row.consistency, row.freeze_window_ms, row.bytes_sent, row.files, row.total_size,
            row.snapshot_peak) == ("filesystem", 840, 1234, 56, 7890, 12.5)
    assert cat.get(run) == row


def test_finishing_twice_raises_and_keeps_first(cat):
    run = cat.start("backup", "web1", "dom0b", os.getpid())
    cat.finish(run, "OK", bytes_sent=10)
    with pytest.raises(ValueError, match=f"run {run} is already OK"):
        cat.finish(run, "ERROR", error="late")
    row = cat.get(run)
    assert row.status == "OK" and row.error == "" and row.bytes_sent == 10


@pytest.mark.parametrize("status", ["RUNNING", "ok", "FAILED"])
def test_finish_to_non_final_status_raises(cat, status):
    run = cat.start("backup", "web1", "dom0b", os.getpid())
    with pytest.raises(ValueError):
        cat.finish(run, status)
    assert cat.get(run).status == "RUNNING"


def test_finish_validation(cat):
    run = cat.start("verify", "web1", "dom0b", os.getpid())
    with pytest.raises(ValueError, match="no run 999"):
        cat.finish(999, "OK")
    with pytest.raises(TypeError, match="colour"):
        cat.finish(run, "OK", colour="blue")
    with pytest.raises(ValueError, match="consistency"):
        cat.finish(run, "OK", consistency="perfect")
    with pytest.raises(ValueError, match="kind"):
        cat.start("frobnicate", "web1", "dom0b", os.getpid())
    assert cat.get(run).status == "RUNNING"


def test_finish_record_from_model(cat):
    run = cat.start("backup", "web1", "dom0b", os.getpid())
    rec = RunRecord(domu="web1", peer="dom0b", status="CORRUPT", consistency="crash",
                    bytes_sent=5, files=1, total_size=9, snapshot_peak=100.0,
                    error="snapshot invalid")
    row = cat.finish_record(run, rec)
    assert (row.status, row.snapshot_peak, row.error) == ("CORRUPT", 100.0, "snapshot invalid")


# --- reaping -----------------------------------------------------------------------------------

def test_reap_dead_pid_but_not_live_one(cat):
    child = subprocess.Popen(["sleep", "30"])
    try:
        dead_run = cat.start("backup", "web1", "dom0b", child.pid)
        assert cat.get(dead_run).pid_start is not None
    finally:
        child.kill()
        child.wait()
    live_run = cat.start("backup", "web2", "dom0b", os.getpid())
    assert not process_alive(child.pid, cat.get(dead_run).pid_start)

    assert cat.reap_dead() == [dead_run]
    dead = cat.get(dead_run)
    assert dead.status == "ERROR" and dead.error == DIED_MESSAGE and dead.ended is None
    assert cat.get(live_run).status == "RUNNING"
    assert cat.reap_dead() == []  # idempotent
    # a reaped run is final: the run cannot come back and finish it
    with pytest.raises(ValueError):
        cat.finish(dead_run, "OK")


def test_reap_reused_pid(cat):
    """Our own pid, but recorded with another start time: a reused pid, so the run is dead."""
    run = cat.start("backup", "web1", "dom0b", os.getpid())
    db = sqlite3.connect(cat.path)
    db.execute("UPDATE runs SET pid_start = pid_start - 1 WHERE id = ?", (run,))
    db.commit()
    db.close()
    assert cat.reap_dead() == [run]


def test_reap_with_injected_liveness_and_only_this_host(tmp_path, clock):
    path = tmp_path / "catalog.sqlite"
    here = Catalog(path, clock=clock, host="dom0a")
    other = Catalog(path, clock=clock, host="dom0b")
    mine = here.start("backup", "web1", "dom0b", 4242)
    theirs = other.start("backup", "db1", "dom0a", 4242)
    done = here.start("backup", "web2", "dom0b", 4242)
    here.finish(done, "OK")
    asked = []
    reaped = here.reap_dead(lambda pid: asked.append(pid) or False)
    assert reaped == [mine] and asked == [4242]
    assert other.get(theirs).status == "RUNNING"
    assert here.get(done).status == "OK"
    assert here.reap_dead(lambda pid: True) == []
    here.close()
    other.close()


# --- queries -----------------------------------------------------------------------------------

def _history(cat, clock):
    """web1 OK at T0, db1 ERROR at T0+10, web1 OK at T0+20, web1 RUNNING at T0+30."""
    ids = []
    for dt, domu, status in ((0, "web1", "OK"), (10, "db1", "ERROR"), (20, "web1", "OK"),
                             (30, "web1", None)):
        clock.t = T0 + dt
        run = cat.start("backup", domu, "dom0b", os.getpid())
        if status:
            clock.t += 5
            cat.finish(run, status)
        ids.append(run)
    return ids


def test_runs_newest_first_and_filters(cat, clock):
    a, b, c, d = _history(cat, clock)
    assert [r.id for r in cat.runs()] == [d, c, b, a]
    assert [r.id for r in cat.runs(domu="web1")] == [d, c, a]
    assert [r.id for r in cat.runs(domu="db1")] == [b]
    assert [r.id for r in cat.runs(since=T0 + 10)] == [d, c, b]
    assert [r.id for r in cat.runs(domu="web1", since=T0 + 10, limit=1)] == [d]
    assert cat.runs(domu="nope") == []
    assert [r.id for r in cat.runs(kind="verify")] == []


def test_last_ok_and_latest_per_domu(cat, clock):
    a, b, c, d = _history(cat, clock)
    assert cat.last_ok("web1").id == c
    assert cat.last_ok("db1") is None
    latest = cat.latest_per_domu()
    assert list(latest) == ["db1", "web1"]
    assert [r.id for r in latest["db1"]] == [b]
    assert [r.id for r in latest["web1"]] == [c]  # newest finished is also newest OK
    clock.t = T0 + 100
    cat.finish(d, "ERROR", error="x")
    assert [r.id for r in cat.latest_per_domu()["web1"]] == [d, c]


def test_prune_keeps_running_and_last_ok(cat, clock):
    a, b, c, d = _history(cat, clock)
    clock.t = T0 + 40
    e = cat.start("verify", "web1", "dom0b", os.getpid())
    cat.finish(e, "OK")
    now = T0 + 30 * 86400
    # everything is older than 7 days: only the last OK of each (DomU, kind) and RUNNING stay
    assert cat.prune(7, now=now) == 2  # a (superseded OK) and b (ERROR)
    assert sorted(r.id for r in cat.runs()) == [c, d, e]
    assert cat.prune(7, now=now) == 0
    with pytest.raises(ValueError):
        cat.prune(-1, now=now)


def test_prune_keeps_recent(cat, clock):
    a, b, c, d = _history(cat, clock)
    assert cat.prune(1, now=T0 + 86400 + 15) == 2  # a (T0) and b (T0+10) are older than a day
    assert sorted(r.id for r in cat.runs()) == [c, d]
    # ids are not reused after a prune
    assert cat.start("backup", "x", "p", 1) > d


# --- concurrency -------------------------------------------------------------------------------

def test_two_catalogs_on_one_file_interleave(tmp_path):
    path = tmp_path / "catalog.sqlite"
    one, two = Catalog(path, host="h"), Catalog(path, host="h")
    r1 = one.start("backup", "web1", "dom0b", os.getpid())
    r2 = two.start("backup", "db1", "dom0b", os.getpid())
    assert r1 != r2
    assert {r.id for r in one.runs()} == {r1, r2} == {r.id for r in two.runs()}
    two.finish(r1, "OK", bytes_sent=1)
    one.finish(r2, "ERROR", error="x")
    with pytest.raises(ValueError):
        one.finish(r1, "OK")
    assert one.get(r1).status == "OK" and two.get(r2).status == "ERROR"
    one.close()
    two.close()


def test_two_writers_in_parallel(tmp_path):
    path = tmp_path / "catalog.sqlite"
    Catalog(path).close()
    errors = []

    def work(domu):
        try:
            with Catalog(path) as c:
                for _ in range(25):
                    c.finish(c.start("backup", domu, "p", os.getpid()), "OK")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(d,)) for d in ("web1", "db1")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with Catalog(path) as c:
        rows = c.runs()
    assert len(rows) == 50 and {r.status for r in rows} == {"OK"}


def test_writer_waits_for_lock_within_busy_timeout(tmp_path):
    path = tmp_path / "catalog.sqlite"
    Catalog(path).close()
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    with Catalog(path, busy_timeout=0.05) as impatient:
        with pytest.raises(CatalogError, match="locked"):
            impatient.start("backup", "web1", "p", os.getpid())
    timer = threading.Timer(0.2, lambda: holder.execute("COMMIT"))
    timer.start()
    with Catalog(path, busy_timeout=5) as patient:
        run = patient.start("backup", "web1", "p", os.getpid())
        assert patient.get(run).status == "RUNNING"
    timer.join()
    holder.close()


# --- formatting (pure) -------------------------------------------------------------------------

def _row(**kw) -> RunRow:
    base = dict(id=1, kind="backup", domu="web1", peer="dom0b", host="dom0a", pid=100,
                pid_start=None, started=T0, ended=T0 + 62, status="OK",
                consistency="filesystem", freeze_window_ms=840, bytes_sent=36_700_160,
                files=1200, total_size=1_288_490_189, snapshot_peak=12.5, error="",
                log_path=None)
    base.update(kw)
    return RunRow(**base)


ROWS = [
    _row(id=4, domu="web1", started=T0 + 7200, ended=None, status="RUNNING", consistency=None,
         freeze_window_ms=None, bytes_sent=0, total_size=0, files=0),
    _row(id=3, domu="database-01", started=T0 + 3600, ended=T0 + 3600 + 3723, status="ERROR",
         consistency="application", bytes_sent=0, total_size=0, error="rsync exited 23"),
    _row(id=2, domu="web1", kind="verify", started=T0 + 60, ended=T0 + 105, status="CORRUPT",
         consistency="crash", bytes_sent=512, total_size=2048),
    _row(id=1),
]


def test_format_history_exact(tz):
    tz("UTC")
    text = format_history(ROWS, now=T0 + 7200 + 75)
    assert text == (
        "========================================================================================================\n"
        "START                DOMU         PEER   KIND    MODE         DURATION                     SIZE  STATUS\n"
        "========================================================================================================\n"
        "2026-09-21 16:13:20  web1         dom0b  backup  -               1m15s                        -  RUNNING\n"
        "2026-09-21 15:13:20  database-01  dom0b  backup  application  1h02m03s                        -  ERROR\n"
        "2026-09-21 14:14:20  web1         dom0b  verify  crash             45s     2.0 KiB (512 B sent)  CORRUPT\n"
        "2026-09-21 14:13:20  web1         dom0b  backup  filesystem      1m02s  1.2 GiB (35.0 MiB sent)  OK\n"
    )


def test_format_history_local_time_and_empty(tz):
    tz("XXX-2")  # POSIX: UTC+2, no tz database needed
    assert format_history([ROWS[3]], now=T0).splitlines()[3].startswith("2026-09-21 16:13:20  ")
    assert format_history([], now=T0).splitlines()[1].split() == [
        "START", "DOMU", "PEER", "KIND", "MODE", "DURATION", "SIZE", "STATUS"]


def test_history_json():
    data = history_json([ROWS[0], ROWS[3]])
    assert data[0]["started"] == "2026-09-21T16:13:20Z" and data[0]["ended"] is None
    assert data[0]["status"] == "RUNNING" and data[0]["duration_seconds"] is None
    assert data[1] == {
        "id": 1, "kind": "backup", "domu": "web1", "peer": "dom0b", "host": "dom0a", "pid": 100,
        "status": "OK", "started": "2026-09-21T14:13:20Z", "ended": "2026-09-21T14:14:22Z",
        "duration_seconds": 62.0, "consistency": "filesystem", "freeze_window_ms": 840,
        "bytes_sent": 36_700_160, "blocks_read": 0, "blocks_changed": 0, "files": 1200, "total_size": 1_288_490_189,
        "snapshot_peak_percent": 12.5, "error": "", "log_path": None,
    }


@pytest.mark.parametrize("n,text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (1_288_490_189, "1.2 GiB"), (1024**2 - 1, "1.0 MiB"), (5 * 1024**4, "5.0 TiB"),
])
def test_human_bytes(n, text):
    assert human_bytes(n) == text


@pytest.mark.parametrize("s,text", [
    (None, "-"), (0, "0s"), (0.4, "0s"), (45, "45s"), (59.6, "1m00s"), (62, "1m02s"),
    (3723, "1h02m03s"), (2 * 86400 + 3 * 3600 + 4 * 60 + 5, "2d03h04m"), (-3, "0s"),
])
def test_human_duration(s, text):
    assert human_duration(s) == text


NOW = 1_795_000_000.0  # 2026-11-18T08:26:40Z


@pytest.mark.parametrize("text,expected", [
    ("24h", NOW - 86400), ("7d", NOW - 7 * 86400), ("2w", NOW - 14 * 86400), ("0h", NOW),
    (" 7d ", NOW - 7 * 86400),
    ("2026-11-20", 1_795_132_800.0),  # midnight UTC (TZ=UTC)
    ("2026-11-20T10:00", 1_795_132_800.0 + 36000),
    ("2026-11-20 10:00:30", 1_795_132_800.0 + 36030),
    ("2026-11-20T10:00Z", 1_795_132_800.0 + 36000),
    ("2026-11-20T10:00+01:00", 1_795_132_800.0 + 32400),
])
def test_parse_since(tz, text, expected):
    tz("UTC")
    assert parse_since(text, NOW) == expected


def test_parse_since_is_local_time(tz):
    tz("XXX-2")  # UTC+2: local midnight is 22:00 UTC the day before
    assert parse_since("2026-11-20", NOW) == 1_795_132_800.0 - 7200


@pytest.mark.parametrize("text", ["", "yesterday", "7", "7m", "3y", "-2d", "1.5d", "2026-11",
                                  "20261120", "2026-11-20T10", "2026-13-01", "2026-02-30"])
def test_parse_since_errors(text):
    with pytest.raises(ValueError, match="since value"):
        parse_since(text, NOW)


def test_a_version_1_catalog_is_migrated_and_keeps_its_runs(tmp_path):
    # the schema of version 1, as written by domubackup before PARTIAL existed
    import sqlite3
    from domubackup.hosts import catalog as C
    old = C._SCHEMA.replace("'PARTIAL', ", "")
    assert "PARTIAL" not in old
    db = sqlite3.connect(tmp_path / C.CATALOG_NAME)
    db.executescript(old)
    db.execute("INSERT INTO runs (kind, domu, pid, started, ended, status) VALUES ('backup', 'web1', 1, 10, 20, 'OK')")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    cat = Catalog.in_state_dir(tmp_path)
    try:
        assert [(r.domu, r.status) for r in cat.runs()] == [("web1", "OK")]
        run = cat.start("backup", "web1", "dom0b", os.getpid())
        assert cat.finish(run, "PARTIAL", error="not copied: xvda3: filesystem type 'ntfs' is not supported").status == "PARTIAL"
    finally:
        cat.close()
    db = sqlite3.connect(tmp_path / C.CATALOG_NAME)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 4
    assert [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")] == [
        "points", "runs", "sqlite_sequence"]


def _version_2(path):
    """A catalog file as domubackup wrote it at schema version 2 (before the kinds of the ways
    back and the table points)."""
    from domubackup.hosts import catalog as C
    from domubackup.core.model import KINDS
    old = C._SCHEMA.replace(repr(KINDS), repr(("backup", "verify", "seed")))
    old = old[:old.index("CREATE TABLE IF NOT EXISTS points")]
    assert "restore" not in old and "points" not in old
    db = sqlite3.connect(path)
    db.executescript(old)
    for i, (kind, status) in enumerate((("backup", "OK"), ("verify", "CORRUPT"), ("seed", "PARTIAL")), 1):
        db.execute("INSERT INTO runs (kind, domu, peer, pid, started, ended, status, bytes_sent)"
                   " VALUES (?, 'web1', 'dom0b', 1, ?, ?, ?, 7)", (kind, T0 + i, T0 + i + 1, status))
    db.execute("INSERT INTO runs (kind, domu, pid, started, status) VALUES ('backup', 'gone', 1, 5, 'ERROR')")
    db.execute("DELETE FROM runs WHERE domu = 'gone'")  # id 4, pruned: never to be reused
    db.execute("PRAGMA user_version = 2")
    db.commit()
    db.close()


def test_a_version_2_catalog_is_migrated_keeps_its_runs_and_their_ids(tmp_path, clock):
    path = tmp_path / "catalog.sqlite"
    _version_2(path)
    with Catalog(path, clock=clock, host="dom0a") as cat:
        assert [(r.id, r.kind, r.status, r.bytes_sent, r.ended) for r in cat.runs()] == [
            (3, "seed", "PARTIAL", 7, T0 + 4), (2, "verify", "CORRUPT", 7, T0 + 3), (1, "backup", "OK", 7, T0 + 2)]
        run = cat.start("restore", "web1", "dom0b", os.getpid())
        assert run == 5  # the id sequence survived the rebuild
        assert cat.finish(run, "OK").kind == "restore"
        assert cat.last_ok("web1").id == 1
        cat.record_points("web1", "dom0b", points=1, good=1, newest_good=T0)
        assert len(cat.points()) == 1
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")] == [
        "points", "runs", "sqlite_sequence"]
    assert sorted(r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'"
                                           " AND name NOT LIKE 'sqlite_%'")) == ["runs_domu_started", "runs_status"]
    db.close()
    Catalog(path).close()  # opened again: nothing more to migrate


# --- the ways back and prune as runs ---------------------------------------------------------------

@pytest.mark.parametrize("kind", ["prune", "rollback", "restore", "failover"])
def test_the_commands_on_points_are_runs_but_not_backups(cat, clock, kind):
    ok = cat.start("backup", "web1", "dom0b", os.getpid())
    cat.finish(ok, "OK")
    clock.t = T0 + 60
    for status in ("OK", "ERROR"):
        run = cat.start(kind, "web1", "dom0b", os.getpid())
        clock.t += 5
        assert (cat.finish(run, status, error="" if status == "OK" else "no good point").kind, cat.get(run).status) == (
            kind, status)
    assert [r.kind for r in cat.runs()] == [kind, kind, "backup"]
    assert [r.kind for r in cat.runs(kind=kind)] == [kind, kind]
    # a restore is not a backup: the newest OK backup and the metrics' runs do not see them
    assert cat.last_ok("web1").id == ok
    assert [r.id for r in cat.latest_per_domu()["web1"]] == [ok]
    assert cat.last_ok("web1", kinds=(kind,)).kind == kind
    lines = format_history(cat.runs(), now=clock.t).splitlines()
    assert [line.split()[4] for line in lines[3:]] == [kind, kind, "backup"]
    assert [r["kind"] for r in history_json(cat.runs())] == [kind, kind, "backup"]


def test_newest_ok_per_domu_counts_backups_only():
    from domubackup.core.report import newest_ok_per_domu

    rows = history_json([_row(id=2, kind="restore", started=T0 + 100, ended=T0 + 200), _row(id=1)])
    assert newest_ok_per_domu(rows) == {"web1": T0 + 62}


# --- restore points ---------------------------------------------------------------------------------

def test_record_points_replaces_the_row_of_its_domu_and_host(cat, clock):
    assert cat.points() == []
    cat.record_points("web1", "dom0b", points=3, good=2, newest_good=T0 - 3600)
    cat.record_points("web1", "dom0c", points=1, good=0, newest_good=None)
    cat.record_points("db1", "dom0b", points=1, good=1, newest_good=T0 - 60)
    clock.t = T0 + 86400
    cat.record_points("web1", "dom0b", points=4, good=4, newest_good=T0 + 86000)
    assert [(r.domu, r.host, r.points, r.good, r.newest_good, r.updated) for r in cat.points()] == [
        ("db1", "dom0b", 1, 1, T0 - 60, T0),
        ("web1", "dom0b", 4, 4, T0 + 86000, T0 + 86400),
        ("web1", "dom0c", 1, 0, None, T0),
    ]
    assert [r.host for r in cat.points("web1")] == ["dom0b", "dom0c"]
    assert cat.points("nope") == []


@pytest.mark.parametrize("points, good, newest_good", [(1, 2, T0), (1, -1, None), (2, 1, None), (2, 0, T0)])
def test_record_points_refuses_figures_that_cannot_be(cat, points, good, newest_good):
    with pytest.raises(ValueError):
        cat.record_points("web1", "dom0b", points=points, good=good, newest_good=newest_good)
    assert cat.points() == []


def test_points_survive_pruning_the_runs(cat, clock):
    cat.record_points("web1", "dom0b", points=2, good=2, newest_good=T0)
    _history(cat, clock)
    cat.prune(0, now=T0 + 365 * 86400)
    assert len(cat.points()) == 1
