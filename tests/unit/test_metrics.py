"""Prometheus textfile rendering (pure) and its atomic write."""

from __future__ import annotations

import re
import os
import stat
import time

import pytest

from domubackup.hosts.catalog import Catalog, RunRow
from domubackup.core.model import PointsRow
from domubackup.hosts.metrics import escape_label_value, render_metrics, write_metrics, write_textfile

T0 = 1_790_000_000.0


def _row(**kw) -> RunRow:
    base = dict(id=1, kind="backup", domu="web1", peer="dom0b", host="dom0a", pid=100,
                pid_start=None, started=T0, ended=T0 + 62.5, status="OK",
                consistency="filesystem", freeze_window_ms=840, bytes_sent=36_700_160,
                files=1200, total_size=1_288_490_189, snapshot_peak=12.5, error="",
                log_path=None)
    base.update(kw)
    return RunRow(**base)


ROWS = {
    "web1": [_row(id=3)],
    # the newest finished run failed; the OK one is older; a RUNNING one is ignored
    'db"1\\x\n': [
        _row(id=9, domu='db"1\\x\n', started=T0 + 9000, ended=None, status="RUNNING"),
        _row(id=7, domu='db"1\\x\n', peer="dom0c", started=T0 + 3600, ended=T0 + 3700,
             status="ERROR", consistency="crash", freeze_window_ms=None, bytes_sent=0),
        _row(id=5, domu='db"1\\x\n', peer="dom0c", started=T0 - 86400, ended=T0 - 86000),
    ],
    "only-running": [_row(id=11, domu="only-running", ended=None, status="RUNNING")],
}

EXPECTED = """\
# HELP domubackup_last_run_status Whether the last finished run of the DomU succeeded (1), was partial (0.5: something of the guest could not be copied) or failed (0).
# TYPE domubackup_last_run_status gauge
domubackup_last_run_status{domu="db\\"1\\\\x\\n",peer="dom0c"} 0
domubackup_last_run_status{domu="web1",peer="dom0b"} 1
# HELP domubackup_last_run_start_timestamp_seconds Start of the last finished run, seconds since the epoch.
# TYPE domubackup_last_run_start_timestamp_seconds gauge
domubackup_last_run_start_timestamp_seconds{domu="db\\"1\\\\x\\n",peer="dom0c"} 1790003600
domubackup_last_run_start_timestamp_seconds{domu="web1",peer="dom0b"} 1790000000
# HELP domubackup_last_run_duration_seconds Duration of the last finished run (absent when the run died and its end is unknown).
# TYPE domubackup_last_run_duration_seconds gauge
domubackup_last_run_duration_seconds{domu="db\\"1\\\\x\\n",peer="dom0c"} 100
domubackup_last_run_duration_seconds{domu="web1",peer="dom0b"} 62.5
# HELP domubackup_last_run_bytes_sent Bytes rsync sent to the peer during the last finished run.
# TYPE domubackup_last_run_bytes_sent gauge
domubackup_last_run_bytes_sent{domu="db\\"1\\\\x\\n",peer="dom0c"} 0
domubackup_last_run_bytes_sent{domu="web1",peer="dom0b"} 36700160
# HELP domubackup_last_run_blocks_read Blocks mode: 4 MiB blocks read from the snapshots in the last finished run.
# TYPE domubackup_last_run_blocks_read gauge
domubackup_last_run_blocks_read{domu="db\\"1\\\\x\\n",peer="dom0c"} 0
domubackup_last_run_blocks_read{domu="web1",peer="dom0b"} 0
# HELP domubackup_last_run_blocks_changed Blocks mode: of those, the blocks sent to a replica because they changed.
# TYPE domubackup_last_run_blocks_changed gauge
domubackup_last_run_blocks_changed{domu="db\\"1\\\\x\\n",peer="dom0c"} 0
domubackup_last_run_blocks_changed{domu="web1",peer="dom0b"} 0
# HELP domubackup_last_run_freeze_window_seconds How long the guest's filesystems stayed frozen in the last finished run (0: not frozen).
# TYPE domubackup_last_run_freeze_window_seconds gauge
domubackup_last_run_freeze_window_seconds{domu="db\\"1\\\\x\\n",peer="dom0c"} 0
domubackup_last_run_freeze_window_seconds{domu="web1",peer="dom0b"} 0.84
# HELP domubackup_last_success_timestamp_seconds End of the last successful run, seconds since the epoch (0: never succeeded).
# TYPE domubackup_last_success_timestamp_seconds gauge
domubackup_last_success_timestamp_seconds{domu="db\\"1\\\\x\\n",peer="dom0c"} 1789914000
domubackup_last_success_timestamp_seconds{domu="web1",peer="dom0b"} 1790000062.5
# HELP domubackup_last_ok_age_seconds Seconds from the end of the DomU's newest OK run on this Dom0 to the writing of this file (+Inf: none here). Every configured DomU has one on every Dom0: the min over the Dom0s is how long since any backed it up.
# TYPE domubackup_last_ok_age_seconds gauge
domubackup_last_ok_age_seconds{domu="db\\"1\\\\x\\n",peer="dom0c"} 96000
domubackup_last_ok_age_seconds{domu="elsewhere",peer=""} +Inf
domubackup_last_ok_age_seconds{domu="web1",peer="dom0b"} 9937.5
# HELP domubackup_restore_points Restore points of the DomU on the host after its last OK run here (or prune).
# TYPE domubackup_restore_points gauge
# HELP domubackup_restore_points_good Of those, the GOOD ones (complete and valid).
# TYPE domubackup_restore_points_good gauge
# HELP domubackup_newest_good_point_age_seconds Seconds from the newest GOOD restore point of the DomU on the host to the writing of this file (absent: no good point).
# TYPE domubackup_newest_good_point_age_seconds gauge
"""


def test_render_exact():
    # "elsewhere" is configured, never backed up here: only its age, +Inf ("only-running" is not configured)
    assert render_metrics(ROWS, domus=["web1", "elsewhere"], now=T0 + 10000) == EXPECTED


def test_escape_label_value():
    assert escape_label_value('a\\b"c\nd') == 'a\\\\b\\"c\\nd'


def test_never_succeeded_and_died_run():
    text = render_metrics({"w": [_row(domu="w", status="ERROR", ended=None)]})
    assert 'domubackup_last_success_timestamp_seconds{domu="w",peer="dom0b"} 0\n' in text
    assert 'domubackup_last_run_duration_seconds{' not in text  # end unknown: no sample
    assert 'domubackup_last_run_status{domu="w",peer="dom0b"} 0\n' in text


def test_empty():
    text = render_metrics({})
    assert text.count("# TYPE") == 12 and "{" not in text


def _listing(d):
    return sorted(os.listdir(d))


def test_atomic_write_mode_and_no_temp(tmp_path):
    target = tmp_path / "domubackup.prom"
    old_umask = os.umask(0o077)  # the mode must not depend on the umask
    try:
        write_textfile(target, "first\n")
        write_textfile(target, EXPECTED)
    finally:
        os.umask(old_umask)
    assert target.read_text() == EXPECTED
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert _listing(tmp_path) == ["domubackup.prom"]


def test_failed_write_keeps_old_file_and_no_temp(tmp_path):
    target = tmp_path / "domubackup.prom"
    write_textfile(target, "old\n")
    with pytest.raises(UnicodeEncodeError):
        write_textfile(target, "bad \udcff surrogate\n")
    assert target.read_text() == "old\n"
    assert _listing(tmp_path) == ["domubackup.prom"]


def test_write_metrics_from_catalog(tmp_path):
    clock = iter([T0, T0 + 10]).__next__
    with Catalog(tmp_path / "catalog.sqlite", clock=clock) as cat:
        cat.finish(cat.start("backup", "web1", "dom0b", os.getpid()), "OK", bytes_sent=42)
        text = write_metrics(cat, tmp_path / "m.prom")
    assert (tmp_path / "m.prom").read_text() == text
    assert 'domubackup_last_run_bytes_sent{domu="web1",peer="dom0b"} 42\n' in text
    assert 'domubackup_last_success_timestamp_seconds{domu="web1",peer="dom0b"} 1790000010\n' in text


def test_the_example_alert_rules_use_the_metrics_that_exist(fixtures):
    from domubackup.hosts.metrics import METRICS

    rules = (fixtures.parent / "conf" / "domubackup.rules.yml").read_text()
    names = {n for n, _ in METRICS}
    used = set(re.findall(r"domubackup_[a-z_]+", rules))
    assert used and used <= names
    assert "domubackup_last_run_status != 1" in rules
    assert "min by (domu) (domubackup_last_ok_age_seconds) > 2 * 86400" in rules


def test_restore_points_per_domu_and_host():
    points = [PointsRow("web1", "dom0c", 1, 0, None, T0),
              PointsRow('db"1', "dom0b", 2, 2, T0 - 90, T0),
              PointsRow("web1", "dom0b", 3, 2, T0 - 3600.5, T0)]
    text = render_metrics({"web1": [_row(id=3)]}, now=T0 + 10, points=points)
    assert text.split("domubackup_last_ok_age_seconds{", 1)[1].split("\n", 1)[1] == """\
# HELP domubackup_restore_points Restore points of the DomU on the host after its last OK run here (or prune).
# TYPE domubackup_restore_points gauge
domubackup_restore_points{domu="db\\"1",host="dom0b"} 2
domubackup_restore_points{domu="web1",host="dom0b"} 3
domubackup_restore_points{domu="web1",host="dom0c"} 1
# HELP domubackup_restore_points_good Of those, the GOOD ones (complete and valid).
# TYPE domubackup_restore_points_good gauge
domubackup_restore_points_good{domu="db\\"1",host="dom0b"} 2
domubackup_restore_points_good{domu="web1",host="dom0b"} 2
domubackup_restore_points_good{domu="web1",host="dom0c"} 0
# HELP domubackup_newest_good_point_age_seconds Seconds from the newest GOOD restore point of the DomU on the host to the writing of this file (absent: no good point).
# TYPE domubackup_newest_good_point_age_seconds gauge
domubackup_newest_good_point_age_seconds{domu="db\\"1",host="dom0b"} 100
domubackup_newest_good_point_age_seconds{domu="web1",host="dom0b"} 3610.5
"""
    # a DomU with points but no run here has only its points series
    assert 'domu="db\\"1",peer' not in text


def test_write_metrics_tells_the_catalogs_restore_points(tmp_path):
    with Catalog(tmp_path / "catalog.sqlite") as cat:
        cat.record_points("web1", "dom0b", points=2, good=1, newest_good=time.time() - 86400)
        text = write_metrics(cat, tmp_path / "m.prom")
    assert 'domubackup_restore_points{domu="web1",host="dom0b"} 2\n' in text
    assert 'domubackup_restore_points_good{domu="web1",host="dom0b"} 1\n' in text
    age = float(re.search(r'domubackup_newest_good_point_age_seconds\{domu="web1",host="dom0b"\} (\S+)', text)[1])
    assert 86400 <= age < 86400 + 600  # written at the real clock's now
