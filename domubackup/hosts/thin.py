"""The thin-pool helpers of blocks mode (entry.py), run on the DomU's own Dom0:

- `domubackup thin-delta VG/BASE VG/SNAP`: the ranges where thin snapshot SNAP differs from
  thin snapshot BASE of the same pool, one ``OFFSET LENGTH`` (bytes) per line. It reserves a
  metadata snapshot of the pool (`dmsetup message POOL-tpool 0 reserve_metadata_snap`, which
  does not suspend the pool; one left by a killed helper is released first), reads it with
  `thin_delta -m --snap1 ID --snap2 ID`, and releases it whatever happened.
- `domubackup thin-base VG/SNAP VG/BASE`: the run's snapshot SNAP becomes BASE: tagged
  ``dbk:base:GEN`` with a new generation GEN (which it prints) and deactivated with LVM's
  activation skip, then the old BASE removed and SNAP renamed (the plan's step closes SNAP's
  journal entry: it is not removed in the teardown). Killed before the rename, `cleanup`
  removes SNAP and the next run, without a base, reads the disk whole. The kept digests of
  the replicas name GEN (jobs/blocks.py): a base that is not the one they were made from is
  never used.
Each exits 1 with the reason on standard error when it fails, 2 on a bad command line."""

from __future__ import annotations

import subprocess
import sys
import time

from ..core import commands as cmd

BASE_TAG = "dbk:base:"


def run(argv, check=True) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=3600)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {res.returncode}: {res.stderr.strip()[-500:]}")
    return res


def thin_lvs(*paths: str) -> list[tuple[str, str, str, int]]:
    """(vg, lv, pool, thin id) of each thin LV VG/LV of PATHS (one `lvs`: each costs ~0.3 s
    under the lab's emulation)."""
    rows = {}
    for line in run(["lvs", "--noheadings", "--separator", "|", "-o", "vg_name,lv_name,pool_lv,thin_id",
                     *paths]).stdout.splitlines():
        out = [x.strip() for x in line.split("|")]
        if len(out) == 4:
            rows[f"{out[0]}/{out[1]}"] = out
    found = []
    for path in paths:
        out = rows.get(path, [])
        if len(out) != 4 or not out[2] or not out[3].isdigit():
            raise RuntimeError(f"{path} is not a thin volume (lvs: {'|'.join(out)})")
        found.append((out[0], out[1], out[2], int(out[3])))
    return found


def delta(base: str, snap: str) -> list[tuple[int, int]]:
    (bvg, _, bpool, bid), (svg, _, spool, sid) = thin_lvs(base, snap)
    if (bvg, bpool) != (svg, spool):
        raise RuntimeError(f"{base} and {snap} are not in one thin pool")
    tpool = f"/dev/mapper/{cmd.dm_name(svg, spool)}-tpool"
    tmeta = f"/dev/mapper/{cmd.dm_name(svg, spool + '_tmeta')}"
    run(["dmsetup", "message", tpool, "0", "release_metadata_snap"], check=False)  # one a killed helper left
    run(["dmsetup", "message", tpool, "0", "reserve_metadata_snap"])
    try:
        xml = run(["thin_delta", "-m", "--snap1", str(bid), "--snap2", str(sid), tmeta]).stdout
    finally:
        run(["dmsetup", "message", tpool, "0", "release_metadata_snap"], check=False)
    from ..core import parsers  # here: thin-base starts without it (and lxml)

    return parsers.parse_thin_delta(xml)


def make_base(snap: str, base: str) -> str:
    vg, _, name = base.rpartition("/")
    names = run(["lvs", "--noheadings", "-o", "lv_name", vg]).stdout.split()
    gen = str(time.time_ns())
    # deactivated before the rename (an active LV's rename reloads its device: 0.7 s in the lab);
    # metadata first, then the activation (LVM warns that combining them "is not advised")
    run(["lvchange", "--setactivationskip", "y", "--addtag", BASE_TAG + gen, "--activate", "n", snap])
    for old in (f"{name}.new", name):  # .new: what a killed helper of an earlier version left
        if old in names:
            run(["lvremove", "-f", f"{vg}/{old}"])
    run(["lvrename", vg, snap.rpartition("/")[2], name])
    return gen


def main(argv: list[str]) -> int:
    command, args = argv[0], argv[1:]
    if len(args) != 2 or not all(a.count("/") == 1 for a in args):
        print(f"usage: domubackup {command} VG/LV VG/LV", file=sys.stderr)
        return 2
    try:
        if command == "thin-delta":
            for offset, length in delta(*args):
                print(offset, length)
        else:
            print(make_base(*args))
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as e:
        print(f"{command}: {e}", file=sys.stderr)
        return 1
    return 0
