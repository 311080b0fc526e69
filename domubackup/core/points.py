"""Restore points on the peer: their names and tags, the listing's parser, the steps that make
and prune them. Pure.

A point is one LVM snapshot of each replica LV of a DomU, made on the peer once a run ended OK
and nothing of the replica is mounted any more: a thin snapshot where the replica is a thin LV
(no size, instant, inactive until used), a sized one (`point_size`) where it is thick. Its
members are named ``LV.STAMP`` (STAMP the run's UTC time, ``20261202T031500Z``: what
``--point`` takes) and carry LV tags, so that the peer alone knows its points (the source Dom0
may be gone): ``dbk:point``, ``dbk:domu:D``, ``dbk:time:STAMP``, ``dbk:disk:T``, ``dbk:disks:N``,
``dbk:consistency:C``, and ``dbk:state:pending`` while it is made, ``dbk:state:good`` once every
member of the point exists. A point is good only when all N members are there, good, and no
thick member overflowed (LVM marks it invalid). The replica LVs themselves carry ``dbk:domu:D``
and, from before the first write of a run until it ended OK, ``dbk:writing``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone

from . import commands as cmd
from .errors import UsageError
from .model import Step

TAG = "dbk:"
POINT, WRITING = "dbk:point", "dbk:writing"
RESTORING = "dbk:restoring"  # an origin LV that a restore writes into, until it is whole
PENDING, GOOD, PRUNING = "dbk:state:pending", "dbk:state:good", "dbk:state:pruning"
STAMP_FORMAT = "%Y%m%dT%H%M%SZ"
MIB = 2**20
FIELDS = "vg_name,lv_name,origin,pool_lv,lv_attr,lv_size,origin_size,snap_percent,lv_tags,vg_free"


def stamp(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime(STAMP_FORMAT)


def stamp_time(text: str) -> datetime:
    """The time a point's name tells; UsageError when it is not a point name."""
    try:
        return datetime.strptime(text, STAMP_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError:
        raise UsageError(f"{text!r} is not a restore point name: expected a UTC time like 20261202T031500Z",
                         hint="`domubackup points DOMU` lists them") from None


def member_name(lv: str, point: str) -> str:
    return f"{lv}.{point}"


@dataclass(frozen=True)
class LV:
    """One row of `lvs_of`: a replica LV or a point's member."""

    vg: str
    name: str
    origin: str
    pool: str
    attr: str
    size: int  # a thick snapshot's: its own (copy-on-write) space
    percent: float | None  # a thick snapshot's fill
    tags: frozenset[str]
    origin_size: int = 0
    vg_free: int = 0  # its volume group's free bytes (when listed)

    @property
    def cow_used(self) -> int:
        """A thick snapshot's copy-on-write bytes in use (0 for any other LV)."""
        return int(self.size * (self.percent or 0) / 100)

    @property
    def data_size(self) -> int:
        """The bytes its device holds (a thick snapshot's are its origin's)."""
        return self.origin_size if self.attr[:1] == "s" and self.origin_size else self.size

    def tag(self, key: str) -> str | None:
        prefix = f"{TAG}{key}:"
        return next((t[len(prefix):] for t in self.tags if t.startswith(prefix)), None)

    @property
    def path(self) -> str:
        return cmd.lv_path(self.vg, self.name)

    @property
    def invalid(self) -> bool:
        """A thick snapshot that overflowed: LVM dropped it (attr state I, or 100 % full)."""
        return self.attr[:1] == "s" and (self.attr[4:5] == "I" or (self.percent or 0) >= 100)


@dataclass
class Point:
    name: str
    time: datetime
    members: list[LV] = field(default_factory=list)

    @property
    def disks(self) -> int:
        counts = {m.tag("disks") for m in self.members}
        return int(counts.pop()) if len(counts) == 1 and None not in counts and next(iter(counts)).isdigit() else 0

    @property
    def status(self) -> str:
        if any(PRUNING in m.tags for m in self.members):
            return "PRUNING"
        if any(m.invalid for m in self.members):
            return "INVALID"
        if any(PENDING in m.tags or GOOD not in m.tags for m in self.members):
            return "PENDING"
        return "GOOD" if len(self.members) == self.disks else "INCOMPLETE"

    @property
    def good(self) -> bool:
        return self.status == "GOOD"

    def to_json(self) -> dict:
        thick = [m.percent for m in self.members if m.attr[:1] == "s"]
        kind = "thin" if not thick else "thick" if len(thick) == len(self.members) else "mixed"
        return {"name": self.name, "time": self.time.strftime("%Y-%m-%dT%H:%M:%SZ"), "status": self.status,
                "consistency": self.members[0].tag("consistency") if self.members else None,
                "kind": kind, "size": sum(m.size for m in self.members),
                "fill": max(thick) if thick and None not in thick else None,
                "members": sorted(f"{m.vg}/{m.name}" for m in self.members)}


def lvs_of(domu: str) -> tuple[str, ...]:
    """Every LV tagged as DOMU's (its replicas and its points' members), as JSON."""
    return ("lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", FIELDS, f"@{TAG}domu:{domu}")


def parse_lvs(text: str) -> list[LV]:
    rows = []
    for report in json.loads(text or '{"report": []}')["report"]:
        for r in report.get("lv", ()):
            pct = r.get("snap_percent") or ""
            rows.append(LV(r["vg_name"], r["lv_name"], r.get("origin", ""), r.get("pool_lv", ""), r.get("lv_attr", ""),
                           int(r.get("lv_size") or 0), float(pct) if pct else None,
                           frozenset(t for t in r.get("lv_tags", "").split(",") if t), int(r.get("origin_size") or 0),
                           int(r.get("vg_free") or 0)))
    return rows


def points_of(lvs: list[LV]) -> list[Point]:
    """The points these rows hold, newest first."""
    points: dict[str, Point] = {}
    for lv in lvs:
        name = lv.tag("time")
        if POINT in lv.tags and name:
            try:
                t = datetime.strptime(name, STAMP_FORMAT).replace(tzinfo=timezone.utc)
            except ValueError:
                continue  # not one of ours
            points.setdefault(name, Point(name, t)).members.append(lv)
    return sorted(points.values(), key=lambda p: p.time, reverse=True)


def being_written(lvs: list[LV]) -> list[str]:
    """The replica LVs that a run is writing, or that a run which did not end OK left half-written."""
    return sorted(lv.path for lv in lvs if WRITING in lv.tags)


# --- steps ----------------------------------------------------------------------------------

def mark_writing(domu: str, peer: str, replicas: list[tuple[str, str]]) -> Step:
    """Before the first write of a run (the replica's read-write mount replays its journal)."""
    return Step("peer-mark", peer, ("lvchange", "--addtag", WRITING, "--addtag", f"{TAG}domu:{domu}",
                                    *(cmd.lv_path(vg, lv) for vg, lv in replicas)), None,
                note="the replicas are marked as being written until the run ends OK")


def unmark_writing(peer: str, replicas: list[tuple[str, str]]) -> Step:
    """Without restore points: once the run ended OK, the replicas are complete again."""
    return Step("complete", peer, ("lvchange", "--deltag", WRITING, *(cmd.lv_path(vg, lv) for vg, lv in replicas)),
                None, note="the replicas are complete")


def listing(domu: str, peer: str) -> Step:
    """The decision of the points phase: what the peer holds of DOMU (Point steps follow)."""
    return Step("points", peer, lvs_of(domu), None, then="points",
                note=f"{domu}'s replicas and restore points on {peer}: the new point and the prune follow")


def point_steps(domu: str, peer: str, replicas: list[LV], point: str, *, disks: list[str], size: str,
                consistency: str) -> list[Step]:
    """The replicas are complete (their `dbk:writing` goes), then one snapshot per replica
    (journaled: a run killed before the point is whole removes its members), then each member
    is marked good (which closes its journal entry: the point stays)."""
    steps = [Step("point", peer, ("lvchange", "--deltag", WRITING, *(r.path for r in replicas)), None,
                  note="the replicas are complete")]
    tags = [POINT, f"{TAG}domu:{domu}", f"{TAG}time:{point}", f"{TAG}disks:{len(replicas)}",
            f"{TAG}consistency:{consistency}", PENDING]
    made = []
    for r, disk in zip(replicas, disks):
        name = member_name(r.name, point)
        sizing = () if r.pool else (("--extents", size) if "%" in size else ("--size", size))
        argv = ("lvcreate", "--snapshot", *sizing, "--name", name,
                *(w for t in tags + [f"{TAG}disk:{disk}"] for w in ("--addtag", t)), r.path)
        steps.append(Step("point", peer, argv, cmd.lvremove(r.vg, name),
                          note=f"{disk}: {'thin' if r.pool else 'thick'} restore point {point} of {r.vg}/{r.name}"))
        made.append((r.vg, name, argv))
    for vg, name, argv in made:
        steps.append(Step("point-commit", peer, ("lvchange", "--deltag", PENDING, "--addtag", GOOD, cmd.lv_path(vg, name)),
                          None, note=f"{name} is part of a whole point", closes=argv))
    return steps


def write_bound(replica_size: int, sources, replicas) -> int:
    """The most a run may write into one replica LV (whose filesystems' Space, as their mounts
    told them, are SOURCES here and REPLICAS on the peer, in the same order): rsync rewrites at
    most every file the sources hold, plus the filesystems' own metadata (inode tables, bitmaps,
    journal: what the LV holds beyond the replicas' data blocks). Unknown figures: the whole LV;
    nothing mounted: nothing written."""
    if not sources:
        return 0
    if any(s is None for s in (*sources, *replicas)):
        return replica_size
    return min(replica_size, sum(s.used for s in sources) + max(0, replica_size - sum(r.size for r in replicas)))


def size_points(peer: str, lvs: list[LV], bounds: dict[str, int], *, skip: str = "",
                where: str = "") -> tuple[list[Step], list[str]]:
    """Before a run writes into its replicas: each thick member of a point that is not INVALID
    is extended so that its free copy-on-write space holds BOUNDS[its replica's path] (what the
    run may write there: write_bound), newest points first while the volume group has room.
    A thick point fills when its origin is written, and in the peer's page cache a run's writes
    reach the LV all at once (at writeback or unmount): watching the fill cannot keep up, room
    made before can. Returns the steps and a warning for each point that may overflow (LVM
    then marks it invalid: INVALID, never offered as good). SKIP: a point left as it is;
    WHERE: the host's name in the warnings (PEER is its lane)."""
    replicas = {lv.name: lv for lv in lvs if POINT not in lv.tags}
    vg_free = {lv.vg: lv.vg_free for lv in lvs}
    steps, warnings = [], []
    for p in points_of(lvs):
        if p.status == "INVALID" or p.name == skip:
            continue
        for m in p.members:
            origin = replicas.get(m.origin)
            if m.attr[:1] != "s" or origin is None or origin.path not in bounds:
                continue
            used = m.cow_used
            # + the exception store's own metadata (16 bytes per 4 KiB chunk) and a margin; a
            # snapshot as large as its origin (and that metadata) can never overflow
            deficit = min(used + bounds[origin.path], origin.size) * 201 // 200 + 4 * MIB - m.size
            if deficit <= 0:
                continue
            grow = -(-deficit // (4 * MIB)) * 4 * MIB  # whole extents of 4 MiB (LVM's default)
            if grow > vg_free.get(m.vg, 0):
                warnings.append(f"restore point {p.name} on {where or peer} ({m.vg}/{m.name}) may overflow during this run: "
                                f"it needs {grow // MIB} MiB more, {m.vg} has {vg_free.get(m.vg, 0) // MIB} MiB free "
                                "(if it overflows it becomes INVALID)")
                continue
            vg_free[m.vg] -= grow
            steps.append(Step("point-size", peer, cmd.lvextend(m.vg, m.name, f"{grow // 1024}k"), None,
                              note=f"thick restore point {p.name} ({m.vg}/{m.name}) gets room for what this run "
                                   f"may write ({grow // MIB} MiB more)"))
    return steps, warnings


def prune_steps(peer: str, doomed: list[Point], xml_dir: str) -> list[Step]:
    """Every member of the DOOMED points is first tagged PRUNING (journaled: the undo that
    cleanup runs after a kill is the removal itself), then their domain XML goes, then the
    members: a point part-way through is PRUNING, never good, and `cleanup` finishes it (a
    kill between the tag and the `rm` leaves only the XML file, which nothing reads)."""
    members = tuple(m.path for p in doomed for m in p.members)
    if not members:
        return []
    mark = Step("prune-mark", peer, ("lvchange", "--addtag", PRUNING, *members), ("lvremove", "-f", *members),
                note="to be pruned: " + ", ".join(f"{p.name} ({p.status.lower()})" for p in doomed))
    return [mark,
            Step("prune-mark", peer, ("rm", "-f", "--", *(xml_path(xml_dir, p.name) for p in doomed)), None,
                 note="their domain XML"),
            Step("prune", peer, ("lvremove", "-f", *members), None, closes=mark.argv, note="pruned")]


def xml_path(xml_dir: str, point: str) -> str:
    return f"{xml_dir}/{point}.xml"


def keep_xml(peer: str, xml_dir: str, point: str) -> Step:
    """The DomU's domain XML of this run, beside its point (failover defines the DomU from it);
    the job feeds it on standard input."""
    return Step("point", peer, ("install", "-D", "-m", "0600", "/dev/stdin", xml_path(xml_dir, point)), None,
                note="the domain XML of this run")
