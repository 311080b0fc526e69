"""Which restore points of a backup to keep: Proxmox Backup Server's prune rules. Pure.

The algorithm copies PBS's ``compute_prune_info`` / ``mark_selections`` /
``remove_incomplete_snapshots`` (proxmox-backup, pbs-datastore/src/prune.rs). Its documentation
(docs/maintenance.rst "Pruning", docs/backup-client.rst) describes it this way:

- Sort the points newest first.
- Points that are not good (failed or unfinished) take no part in the selection. The newest point
  is kept if it is not good, because it is newer than any good point ("the last failed backup is
  retained"). Every other point that is not good is pruned, even one that is newer than the
  newest good point: PBS keeps only the first one it finds.
- Then the options run in this order: keep_last, keep_hourly, keep_daily, keep_weekly,
  keep_monthly, keep_yearly. Each one puts the points into periods: one point each for
  keep_last, or the hour, day, ISO week (``%G/%V``), month or year of the point in the local time
  of ``tz``. Going from newest to oldest, an option keeps the newest unmarked point of each new
  period until it has N periods. It marks the older points of those periods as pruned, and then
  stops. Later options skip every point an earlier option marked, whether kept or pruned.
- A period that already holds a point kept by an earlier option does not count towards N. Its
  unmarked points are skipped and left unmarked, so a later option with other periods can still
  keep one of them: weeks do not nest in months, for example. "The next option does not take
  care of already covered backups. It will only consider older backups."
- Points that no option marks are pruned. An option set to 0 or None is off. PBS gives an
  option set to 0 the same result.

Our rules on top of PBS's:

- A configuration that keeps nothing is refused (ConfigError). PBS would keep everything.
- The newest good point is never removed. This follows from the above: it is the first point
  the first active option sees, and that option has at least one period free.

The caller passes the clock's timezone (``tz``), so nothing here reads the clock or the system's
timezone.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime, timezone, tzinfo

from .errors import ConfigError

# Each option and how it puts a point's local time into a period (PBS's strftime_local formats).
PERIODS = {
    "keep_last": None,  # each point is its own period
    "keep_hourly": lambda t: (t.year, t.month, t.day, t.hour),  # %Y/%m/%d/%H
    "keep_daily": lambda t: (t.year, t.month, t.day),  # %Y/%m/%d
    "keep_weekly": lambda t: tuple(t.isocalendar())[:2],  # %G/%V: ISO year and week
    "keep_monthly": lambda t: (t.year, t.month),  # %Y/%m
    "keep_yearly": lambda t: t.year,  # %Y
}
KEPT_BY = {option: option.replace("_", "-") for option in PERIODS}  # the reasons: "keep-daily", ...
UNFINISHED = "newest point, not good (newer than any good point)"
PRUNED = "pruned"


@dataclass(frozen=True)
class Point:
    """One restore point. prune() accepts any object with these three attributes."""

    name: str
    time: datetime  # aware
    good: bool = True


@dataclass(frozen=True)
class Retention:
    """How many points to keep per option (0 or None: the option is off)."""

    keep_last: int | None = 0
    keep_hourly: int | None = 0
    keep_daily: int | None = 0
    keep_weekly: int | None = 0
    keep_monthly: int | None = 0
    keep_yearly: int | None = 0

    @classmethod
    def from_mapping(cls, d) -> Retention:
        """From config keys with these exact names. Unknown keys and bad values are refused."""
        unknown = sorted(set(d) - set(PERIODS))
        if unknown:
            raise ConfigError(f"retention: unknown key(s) {', '.join(map(str, unknown))}",
                              hint=f"the keys are {', '.join(PERIODS)}")
        rules = cls(**d)
        rules.validate()
        return rules

    def validate(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (type(value) is not int or value < 0):
                raise ConfigError(f"retention: {f.name} = {value!r} is not a whole number >= 0",
                                  hint=f"set {f.name} to a count such as 7, or to 0 to turn it off")
        if not any(getattr(self, f.name) for f in fields(self)):
            raise ConfigError("retention keeps nothing: every keep_* option is 0 or unset",
                              hint=f"set at least one of {', '.join(PERIODS)} (e.g. keep_last = 7)")


def prune(points, rules: Retention, tz: tzinfo = timezone.utc) -> list[tuple[object, bool, str]]:
    """Return ``(point, keep, reason)`` for every point, newest first. Read the module docstring
    for the rules."""
    rules.validate()
    if any(p.time.utcoffset() is None for p in points):
        raise ValueError("restore point times must be timezone-aware")
    order = sorted(points, key=lambda p: (p.time, p.name), reverse=True)
    marks: dict[int, str] = {}  # index in order -> reason

    keep_unfinished = True  # PBS remove_incomplete_snapshots
    for i, p in enumerate(order):
        if not p.good:
            marks[i] = UNFINISHED if keep_unfinished else PRUNED
        keep_unfinished = False

    for option, period in PERIODS.items():  # PBS mark_selections, once per option
        count = getattr(rules, option) or 0
        if not count:
            continue
        ids = [i if period is None else period(p.time.astimezone(tz)) for i, p in enumerate(order)]
        already = {ids[i] for i, reason in marks.items() if reason in KEPT_BY.values()}
        chosen = set()
        for i in range(len(order)):
            if i in marks or ids[i] in already:
                continue
            if ids[i] not in chosen:
                if len(chosen) >= count:
                    break
                chosen.add(ids[i])
                marks[i] = KEPT_BY[option]
            else:
                marks[i] = PRUNED

    return [(p, marks.get(i, PRUNED) != PRUNED, marks.get(i, PRUNED)) for i, p in enumerate(order)]
