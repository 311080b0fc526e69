"""Retention: PBS's prune rules. The PBS cases come from proxmox-backup's tests/prune.rs and
docs/backup-client.rst, with the same dates and the same expected results."""

from datetime import datetime, timedelta, timezone

import pytest

from domubackup.core.errors import ConfigError
from domubackup.core.retention import Point, Retention, prune


def points(*stamps, bad=()):
    return [Point(s, datetime.fromisoformat(s.replace("Z", "+00:00")), s not in bad) for s in stamps]


def kept(pts, tz=timezone.utc, **keep):
    return [p.name for p, keep_it, _ in prune(pts, Retention(**keep), tz) if keep_it]


def removed(pts, **keep):
    return [p.name for p, keep_it, _ in prune(pts, Retention(**keep)) if not keep_it]


# PBS tests/prune.rs test_prune_simple. PBS lists results oldest first; ours are newest first.
SIMPLE = points("2019-12-02T11:59:15Z", "2019-12-03T11:59:15Z", "2019-12-04T11:59:15Z",
                "2019-12-04T12:59:15Z")


@pytest.mark.parametrize("keep, expect_removed", [
    (dict(keep_last=4), []),
    (dict(keep_last=3), ["2019-12-02T11:59:15Z"]),
    (dict(keep_last=2), ["2019-12-03T11:59:15Z", "2019-12-02T11:59:15Z"]),
    (dict(keep_last=1), ["2019-12-04T11:59:15Z", "2019-12-03T11:59:15Z", "2019-12-02T11:59:15Z"]),
    (dict(keep_last=2, keep_daily=2), []),
    (dict(keep_daily=3), ["2019-12-04T11:59:15Z"]),
    (dict(keep_daily=2), ["2019-12-04T11:59:15Z", "2019-12-02T11:59:15Z"]),
    (dict(keep_weekly=5), ["2019-12-04T11:59:15Z", "2019-12-03T11:59:15Z", "2019-12-02T11:59:15Z"]),
    (dict(keep_daily=1, keep_weekly=5), ["2019-12-04T11:59:15Z", "2019-12-03T11:59:15Z", "2019-12-02T11:59:15Z"]),
    (dict(keep_monthly=6), ["2019-12-04T11:59:15Z", "2019-12-03T11:59:15Z", "2019-12-02T11:59:15Z"]),
    (dict(keep_yearly=7), ["2019-12-04T11:59:15Z", "2019-12-03T11:59:15Z", "2019-12-02T11:59:15Z"]),
    (dict(keep_weekly=5, keep_monthly=6, keep_yearly=7),
     ["2019-12-04T11:59:15Z", "2019-12-03T11:59:15Z", "2019-12-02T11:59:15Z"]),
])
def test_pbs_prune_simple(keep, expect_removed):
    assert removed(SIMPLE, **keep) == expect_removed


# PBS tests/prune.rs test_prune_simple2
SIMPLE2 = points("2018-11-15T11:59:15Z", "2019-11-15T11:59:15Z", "2019-11-21T11:59:15Z",
                 "2019-11-22T11:59:15Z", "2019-11-29T11:59:15Z", "2019-12-01T11:59:15Z",
                 "2019-12-02T11:59:15Z", "2019-12-03T11:59:15Z", "2019-12-04T11:59:15Z")


@pytest.mark.parametrize("keep, expect_kept", [
    (dict(keep_daily=1), ["2019-12-04T11:59:15Z"]),
    # the day that keep-last already covers does not count: keep-daily=1 keeps the day before
    (dict(keep_last=1, keep_daily=1), ["2019-12-04T11:59:15Z", "2019-12-03T11:59:15Z"]),
    (dict(keep_daily=1, keep_weekly=1), ["2019-12-04T11:59:15Z", "2019-12-01T11:59:15Z"]),
    # keep-weekly marked 11-29 (ISO week 48, as 12-01) as pruned, so keep-monthly takes 11-22
    (dict(keep_daily=1, keep_weekly=1, keep_monthly=1),
     ["2019-12-04T11:59:15Z", "2019-12-01T11:59:15Z", "2019-11-22T11:59:15Z"]),
    (dict(keep_monthly=1, keep_yearly=1), ["2019-12-04T11:59:15Z", "2018-11-15T11:59:15Z"]),
])
def test_pbs_prune_simple2(keep, expect_kept):
    assert kept(SIMPLE2, **keep) == expect_kept


# PBS tests/prune.rs test_prune_hourly
HOURLY = points("2019-11-15T09:39:15Z", "2019-11-15T10:49:15Z", "2019-11-15T10:59:15Z",
                "2019-11-15T11:39:15Z", "2019-11-15T11:49:15Z", "2019-11-15T11:59:15Z")


def test_pbs_prune_hourly():
    assert removed(HOURLY, keep_hourly=3) == [
        "2019-11-15T11:49:15Z", "2019-11-15T11:39:15Z", "2019-11-15T10:49:15Z"]
    assert kept(HOURLY, keep_hourly=2) == ["2019-11-15T11:59:15Z", "2019-11-15T10:59:15Z"]


def test_pbs_docs_dry_run_example():
    # docs/backup-client.rst: prune host/elsa --dry-run --keep-daily 1 --keep-weekly 3
    pts = points("2019-12-04T13:20:37Z", "2019-12-03T09:35:01Z", "2019-11-22T11:54:47Z",
                 "2019-11-21T12:36:25Z", "2019-11-10T10:42:20Z")
    result = prune(pts, Retention(keep_daily=1, keep_weekly=3))
    assert [(p.name, keep, why) for p, keep, why in result] == [
        ("2019-12-04T13:20:37Z", True, "keep-daily"),
        ("2019-12-03T09:35:01Z", False, "pruned"),
        ("2019-11-22T11:54:47Z", True, "keep-weekly"),
        ("2019-11-21T12:36:25Z", False, "pruned"),
        ("2019-11-10T10:42:20Z", True, "keep-weekly"),
    ]


def test_keep_last_only_and_output_newest_first_whatever_the_input_order():
    pts = points("2024-01-02T00:00:00Z", "2024-01-05T00:00:00Z", "2024-01-01T00:00:00Z",
                 "2024-01-04T00:00:00Z", "2024-01-03T00:00:00Z")
    result = prune(pts, Retention(keep_last=2))
    assert [(p.name[:10], keep) for p, keep, _ in result] == [
        ("2024-01-05", True), ("2024-01-04", True), ("2024-01-03", False),
        ("2024-01-02", False), ("2024-01-01", False)]


def test_keep_daily_keeps_the_newest_point_of_each_day():
    pts = points("2024-05-01T01:00:00Z", "2024-05-01T13:00:00Z", "2024-05-01T22:00:00Z",
                 "2024-05-02T03:00:00Z", "2024-05-02T04:00:00Z",
                 "2024-05-03T09:00:00Z", "2024-05-03T10:00:00Z")
    assert kept(pts, keep_daily=2) == ["2024-05-03T10:00:00Z", "2024-05-02T04:00:00Z"]
    assert kept(pts, keep_daily=9) == [
        "2024-05-03T10:00:00Z", "2024-05-02T04:00:00Z", "2024-05-01T22:00:00Z"]


def test_the_injected_timezone_decides_the_day_of_a_point():
    pts = points("2024-03-10T23:30:00Z", "2024-03-10T20:00:00Z", "2024-03-09T20:00:00Z")
    # UTC: both points of 03-10 fall on one day
    assert kept(pts, keep_daily=2) == ["2024-03-10T23:30:00Z", "2024-03-09T20:00:00Z"]
    # UTC+1: 23:30Z is 00:30 on 03-11, so 20:00Z is the newest point of 03-10
    plus1 = timezone(timedelta(hours=1))
    assert kept(pts, tz=plus1, keep_daily=2) == ["2024-03-10T23:30:00Z", "2024-03-10T20:00:00Z"]


def test_weeks_are_iso_weeks_across_the_new_year():
    # 2024-12-30 (Mon) and 2025-01-05 (Sun) are both in ISO week 2025-W01; 2024-12-29 is 2024-W52
    pts = points("2025-01-05T12:00:00Z", "2024-12-30T12:00:00Z", "2024-12-29T12:00:00Z")
    assert kept(pts, keep_weekly=2) == ["2025-01-05T12:00:00Z", "2024-12-29T12:00:00Z"]


@pytest.mark.parametrize("option", ["keep_last", "keep_hourly", "keep_daily", "keep_weekly",
                                    "keep_monthly", "keep_yearly"])
def test_the_newest_good_point_is_kept_by_any_configuration(option):
    pts = points("2020-01-01T00:00:00Z", "2023-06-01T10:00:00Z", "2023-06-01T11:00:00Z",
                 "2023-06-01T12:00:00Z", bad=("2023-06-01T12:00:00Z",))
    result = prune(pts, Retention(**{option: 1}))
    assert [p.name for p, keep, _ in result if keep] == ["2023-06-01T12:00:00Z", "2023-06-01T11:00:00Z"]
    assert result[1][2] == option.replace("_", "-")


def test_only_the_newest_not_good_point_is_kept_as_pbs_does():
    pts = points("2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z", "2024-01-03T00:00:00Z",
                 "2024-01-04T00:00:00Z", "2024-01-05T00:00:00Z",
                 bad=("2024-01-02T00:00:00Z", "2024-01-04T00:00:00Z", "2024-01-05T00:00:00Z"))
    result = prune(pts, Retention(keep_last=2))
    assert [(p.name[:10], keep, why) for p, keep, why in result] == [
        ("2024-01-05", True, "newest point, not good (newer than any good point)"),
        ("2024-01-04", False, "pruned"),  # newer than the newest good point too, but not the newest
        ("2024-01-03", True, "keep-last"),
        ("2024-01-02", False, "pruned"),  # not good points are not counted by keep-last
        ("2024-01-01", True, "keep-last"),
    ]


def test_with_no_good_point_only_the_newest_is_kept():
    pts = points("2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z",
                 bad=("2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z"))
    assert kept(pts, keep_last=5) == ["2024-01-02T00:00:00Z"]


def test_no_points():
    assert prune([], Retention(keep_last=1)) == []


def test_naive_times_are_refused():
    with pytest.raises(ValueError):
        prune([Point("x", datetime(2024, 1, 1))], Retention(keep_last=1))


@pytest.mark.parametrize("rules", [Retention(), Retention(keep_last=0, keep_daily=None)])
def test_a_configuration_that_keeps_nothing_is_refused(rules):
    with pytest.raises(ConfigError) as e:
        prune(points("2024-01-01T00:00:00Z"), rules)
    assert e.value.exit_code == 78
    assert "retention keeps nothing" in str(e.value)
    assert "keep_last = 7" in str(e.value)
    with pytest.raises(ConfigError):
        Retention.from_mapping({"keep_daily": 0})


@pytest.mark.parametrize("key, value", [("keep_daily", -1), ("keep_weekly", "7"),
                                        ("keep_monthly", 1.5), ("keep_yearly", True)])
def test_bad_values_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError) as e:
        Retention.from_mapping({"keep_last": 3, key: value})
    assert str(e.value).startswith(f"retention: {key} = {value!r} is not a whole number >= 0")


def test_from_mapping():
    assert Retention.from_mapping({"keep_last": 3, "keep_daily": 7, "keep_hourly": None}) == \
        Retention(keep_last=3, keep_daily=7, keep_hourly=None)
    with pytest.raises(ConfigError) as e:
        Retention.from_mapping({"keep_dayly": 7})
    assert "unknown key(s) keep_dayly" in str(e.value)
