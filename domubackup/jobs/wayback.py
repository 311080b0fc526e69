"""The ways back from restore points: `rollback` and `mount`/`umount` on the peer that holds
them, `restore` on the DomU's own Dom0, `failover` on the peer when that Dom0 is dead. Each is
a short plan run by the executor under the DomU's lock, with its journal (a killed rollback or
restore is undone by `cleanup`: thin points deactivated; the replica or origin it was writing
keeps its tag `dbk:writing` / `dbk:restoring`, which says it is not whole). Each refuses when
the DomU runs where it would be overwritten."""

from __future__ import annotations

import logging
import os
from dataclasses import replace

from ..core import commands as cmd, layout, parsers, plan as planner, points as pts
from ..core.domxml import parse_domain_xml
from ..core.errors import CommandError, DomuBackupError, InspectError, PeerUnreachable, UsageError
from ..core.model import LOCAL, Disk, Mount, Step
from ..hosts import virt
from ..hosts.facts import check_mappable, list_lvs, probe_disk
from ..hosts.journal import Journal
from ..hosts.lock import DomuLock
from ..hosts.safepath import EXIT_MISSING
from .checks import check_peer_state
from .executor import Executor
from .points import xml_dir

log = logging.getLogger("domubackup")
RESTORING = pts.RESTORING
MOUNTS = "mounts"  # the journal kind of `mount`: kept until `umount`


def held(runner, domu: str, name: str | None, lvs=None):
    """(DOMU's replica LVs on RUNNER's host, the GOOD point NAME there or None); LVS: the
    listing of DOMU's LVs there when the caller has it."""
    lvs = pts.parse_lvs(runner.run(pts.lvs_of(domu)).stdout) if lvs is None else lvs
    replicas = [lv for lv in lvs if pts.POINT not in lv.tags]
    if not replicas:
        raise DomuBackupError(f"{domu}: {runner.host} holds no replica of it (no LV tagged {pts.TAG}domu:{domu})",
                              hint="`domubackup points` lists what each host holds")
    if name is None:
        return replicas, None
    pts.stamp_time(name)
    point = next((p for p in pts.points_of(lvs) if p.name == name), None)
    if point is None:
        raise UsageError(f"{domu}: no restore point {name} on {runner.host}", hint=f"`domubackup points {domu}` lists them")
    if not point.good:
        raise DomuBackupError(f"{domu}: restore point {name} on {runner.host} is {point.status}: it is not used",
                              hint=f"choose a GOOD point (`domubackup points {domu}`)")
    return replicas, point


def sources(domu: str, replicas, point, host: str) -> list[tuple[pts.LV, pts.LV, str]]:
    """(what is copied or mounted, the replica it belongs to, its disk) for each disk: the
    point's members, or without a point the replicas themselves."""
    if point is None:
        return [(r, r, r.name) for r in replicas]
    by_name = {(r.vg, r.name): r for r in replicas}
    out = []
    for m in point.members:
        replica = by_name.get((m.vg, m.origin))
        if replica is None:
            raise DomuBackupError(f"{domu}: the replica {m.vg}/{m.origin} of point member {m.vg}/{m.name} is "
                                  f"not on {host}, or not tagged as {domu}'s")
        out.append((m, replica, m.tag("disk") or m.origin))
    return sorted(out, key=lambda t: t[2])


def activation(host: str, lvs) -> list[Step]:
    """A thin point is made inactive (LVM's activation skip): active while it is read."""
    return [Step("activate", host, cmd.lv_activate(lv.path), cmd.lv_deactivate(lv.path),
                 note=f"activate {lv.vg}/{lv.name} while it is used") for lv in lvs if lv.pool and pts.POINT in lv.tags]


class Copy:
    """The executor's feed and callback of a block copy: a restore's streams from the peer, and
    each copy's result."""

    def __init__(self, runners=None):
        self.runners, self.streams, self.report = runners or {}, {}, []

    def feed(self, step):
        if step.phase != "copy" or len(step.about) < 4:
            return None
        _, host, src, size = step.about
        self.streams[step.about] = stream = self.runners[host].stream(cmd.send_blocks(src, int(size)), step.timeout)
        return stream

    def copied(self, step, res):
        if res.exit_code != 0:
            raise CommandError(step.host, step.argv, res.exit_code, res.stderr,
                               hint="the target is not marked whole: run the command again once the cause is fixed")
        if step.argv[:2] == (cmd.HELPER, "copy-blocks"):
            blocks, written = res.stdout.split()
            self.report.append(f"{step.note}: {written} of {blocks} blocks of 4 MiB differed: written and read back")
            return
        stream = self.streams.pop(step.about)
        sent = stream.stderr.strip().splitlines()[-1:] if stream.exit_code == 0 else []
        theirs, ours = (sent[0].split()[-1] if sent else None), parsers.parse_received(res.stdout)[0]
        if theirs != ours:
            raise DomuBackupError(f"{step.note}: the copy is not whole (sender {stream.exit_code=}: "
                                  f"{stream.stderr.strip()[-300:] or 'no checksum'}; read back {ours[:16]}...)",
                                  hint="the target is not marked whole: run the command again")
        self.report.append(f"{step.note}: checksum of the blocks {ours[:16]}... matches on both ends")


def copy_steps(pairs, *, source_host: str, tag: str, note: str, ready: str = "") -> list[Step]:
    """PAIRS: (disk, source path on SOURCE_HOST, its size, target LV here). The target LVs get
    TAG before the first write and lose it once the copy is known whole. Here (a rollback):
    copy-blocks, which reads back what it wrote. From a peer (a restore): the peer's
    `send-blocks` streamed into `receive-blocks` here (the job's feed), whose read-back checksum
    must equal the sender's; the first copy waits for READY (the peer's activations)."""
    targets = tuple(t for _, _, _, t in pairs)
    steps = [Step(tag.split(":")[-1], LOCAL, ("lvchange", "--addtag", tag, *targets), None, note=note)]
    for i, (disk, src, size, target) in enumerate(pairs):
        if source_host == LOCAL:
            steps.append(Step("copy", LOCAL, cmd.copy_blocks(src, target, size), None, note=f"{disk}: {src} -> {target}",
                              then="copied", timeout=7 * 24 * 3600, about=(disk,)))
        else:
            steps.append(Step("copy", LOCAL, cmd.receive_blocks(target, size), None, then="copied", timeout=7 * 24 * 3600,
                              note=f"{disk}: {source_host}:{src} -> {target}", about=(disk, source_host, src, str(size)),
                              waits=(ready,) if ready and i == 0 else ()))
    steps.append(Step("verify", LOCAL, ("lvchange", "--deltag", tag, *targets), None, note="the copy is whole"))
    return steps


def run_plan(config, domu: str, runners, steps, copy: Copy | None = None, *, kind="journal", callbacks=None,
             keep=False) -> None:
    """STEPS by the executor with the DomU's journal; torn down at the end (with KEEP only
    after a failure: a mount stays until `umount`)."""
    journal = Journal.create(config.state_dir, domu, ",".join(h for h in runners if h != LOCAL), kind)
    ex = Executor(journal, runners, timeout=config.settings_for(domu).command_timeout,
                  callbacks={**({"copied": copy.copied} if copy else {}), **(callbacks or {})},
                  feed=copy.feed if copy else None)
    if not keep:
        with ex.closing():
            ex.run(steps)
        return
    try:
        ex.run(steps)
    except BaseException:
        journal.teardown(runners)
        raise


def refuse_running_here(config, domu: str, local) -> None:
    check_peer_state(domu, config.settings_for(domu), config.this_host, local)


def closed(domu: str, lvs, host: str) -> None:
    for lv in lvs:
        if lv.attr[5:6] == "o":
            raise DomuBackupError(f"{domu}: {lv.vg}/{lv.name} is open on {host} (a mount, a running backup or guest)",
                                  hint="wait for the run, or `domubackup umount` it")


def rollback(config, domu: str, local, point: str) -> list[str]:
    """On the peer: the replica becomes POINT (only the blocks that differ are written)."""
    with DomuLock(config.state_dir, domu):
        return _rollback(config, domu, local, point)


def _rollback(config, domu, local, point) -> list[str]:
    refuse_running_here(config, domu, local)
    lvs = pts.parse_lvs(local.run(pts.lvs_of(domu)).stdout)
    replicas, p = held(local, domu, point, lvs)
    found = sources(domu, replicas, p, config.this_host)
    closed(domu, [r for _, r, _ in found], config.this_host)
    pairs = [(disk, m.path, m.data_size, r.path) for m, r, disk in found]
    # copy-blocks writes only the pages that differ from the point: at most its own
    # copy-on-write data, which each other thick point of that replica gets room for first
    room, warnings = pts.size_points(LOCAL, lvs, {r.path: m.cow_used for m, r, _ in found if m.attr[:1] == "s"},
                                     skip=point, where=config.this_host)
    for w in warnings:
        log.warning("%s: %s", domu, w)
    copy = Copy()
    run_plan(config, domu, {LOCAL: local}, room + activation(LOCAL, [m for m, _, _ in found])
             + copy_steps(pairs, source_host=LOCAL, tag=pts.WRITING, note="the replicas are being written"), copy)
    return warnings + copy.report + [f"the replica of {domu} is now restore point {point}"]


def restore(config, domu: str, conn, local, factory, point: str | None) -> list[str]:
    """On the DomU's own Dom0, with the DomU shut off: its origin LVs become POINT (or the
    replica) of its first peer."""
    with DomuLock(config.state_dir, domu):
        settings = config.settings_for(domu)
        domain = virt.describe(virt.lookup(conn, domu), include=settings.disks, exclude=settings.exclude_disks)
        if domain.state not in ("shut off", "crashed"):
            raise DomuBackupError(f"{domu} is {domain.state} on {config.this_host}: refusing to overwrite the disks "
                                  "of a live DomU", hint=f"shut it down first (`virsh shutdown {domu}`)")
        peers = config.peers_for(domu)
        if not peers:
            raise config.no_peer(domu)
        peer = peers[0]
        runner = factory(peer, settings.ssh)
        try:
            replicas, p = held(runner, domu, point)
            found = sources(domu, replicas, p, peer)
            if p is None:
                half = [r.path for r in replicas if pts.WRITING in r.tags]
                if half:
                    raise DomuBackupError(f"{domu}: the replica {', '.join(half)} on {peer} is marked as being written "
                                          "(the last run did not end OK): not restored from it",
                                          hint=f"restore a GOOD point: `domubackup points {domu}`")
            origins = {d.source: d for d in domain.disks if d.source}
            lvs = {f"/dev/{lv.vg}/{lv.lv}": lv for lv in list_lvs(local, list(origins)) or []}
            pairs = []
            for m, r, disk in found:
                origin = lvs.get(r.path)
                if origin is None:
                    raise DomuBackupError(f"{domu}: {r.path} (disk {disk}) is not one of its disks on "
                                          f"{config.this_host}", hint="restore needs the origin LV of the same name")
                if origin.size < m.data_size:
                    raise DomuBackupError(f"{domu}: the origin {r.path} has {origin.size} bytes, {m.vg}/{m.name} "
                                          f"{m.data_size}", hint=f"lvextend {r.path} to {m.data_size} bytes first")
                pairs.append((disk, m.path, m.data_size, r.path))
            copy = Copy({peer: runner})
            active = activation(peer, [m for m, _, _ in found])
            if active:
                active[-1] = replace(active[-1], mark="active")
            run_plan(config, domu, {LOCAL: local, peer: runner},
                     active + copy_steps(pairs, source_host=peer, tag=RESTORING, note="the origins are being restored",
                                         ready="active" if active else ""), copy)
        finally:
            runner.close()
    return copy.report + [f"{domu}: its disks now hold {'restore point ' + point if point else 'the replica'} of {peer}"]


def failover(config, domu: str, conn, local, factory, point: str | None, *, start: bool) -> list[str]:
    """On the peer, when the DomU's Dom0 is dead: refuse if the DomU runs on any Dom0 that
    answers; roll the replica back to POINT if given; define the DomU from the domain XML kept
    with that point (else the newest good one) and start it."""
    lines = []
    settings = config.settings_for(domu)
    with DomuLock(config.state_dir, domu):
        refuse_running_here(config, domu, local)
        for host in config.dom0s:
            if host == config.this_host:
                continue
            runner = factory(host, settings.ssh)
            try:
                check_peer_state(domu, settings, host, runner)
                lines.append(f"{host}: {domu} does not run there")
            except PeerUnreachable as e:
                lines.append(f"{host}: does not answer ({e}): taken as down")
            finally:
                runner.close()
        replicas, p = held(local, domu, point)
        if p is None:
            half = [r.path for r in replicas if pts.WRITING in r.tags]
            if half:
                raise DomuBackupError(f"{domu}: the replica {', '.join(half)} is marked as being written (the last "
                                      "run did not end OK)", hint=f"fail over to a GOOD point: --point P "
                                                                  f"(`domubackup points {domu}`)")
        else:
            lines += _rollback(config, domu, local, point)
        kept = [q for q in pts.points_of(pts.parse_lvs(local.run(pts.lvs_of(domu)).stdout)) if q.good]
        name = point or (kept[0].name if kept else None)
        path = name and pts.xml_path(xml_dir(config, domu), name)
        if not path or not os.path.exists(path):
            raise DomuBackupError(f"{domu}: no domain XML kept on {config.this_host} for "
                                  f"{'point ' + name if name else 'any good point'}: cannot define it",
                                  hint="define it by hand with the replica LVs as its disks")
        with open(path, encoding="utf-8") as f:
            xml = f.read()
        ours = {r.path for r in replicas}
        for d in parse_domain_xml(xml)[2]:
            if d.source and d.source not in ours and d.device == "disk":
                lines.append(f"warning: disk {d.target} ({d.source}) has no replica here: the domain may not start")
        state = virt.define(conn, xml, start=start)
        lines.append(f"{domu}: defined from {path}" + (f" and started (libvirt: {state})" if start else
                                                       f" (libvirt: {state}); start it with `virsh start {domu}`"))
        log.warning("%s: failover on %s%s", domu, config.this_host, f" to point {point}" if point else "")
    return lines


# --- mount / umount ---------------------------------------------------------------------

def mount_options(fstype: str) -> tuple[str, ...]:
    """Read-only, and no journal replay (it would write into the point)."""
    extra = {"ext3": ("noload",), "ext4": ("noload",), "xfs": ("norecovery",)}.get(fstype, ())
    return planner.mount_options(fstype, local=True) + extra


def mount_steps(mounts, facts, settings, directory: str, *, dirs: bool) -> list[Step]:
    steps = []
    for m in layout.sort_mounts(mounts):
        dev = planner.device_of(m.filesystem, facts, settings, snapshot=False)
        where = m.mountpoint
        if dirs:  # no guest root: each filesystem in a directory of its own
            steps.append(Step("mount", LOCAL, cmd.mkdir(directory + where), cmd.rmdir(directory + where),
                              note=f"directory for {m.filesystem.name}"))
        steps.append(Step("mount", LOCAL, cmd.mount_in(directory, where, dev, m.filesystem.fstype,
                                                       mount_options(m.filesystem.fstype)),
                          cmd.umount_in(directory, where, dev), note=f"{m.filesystem.name} ({m.filesystem.fstype}) at {where}"))
    return steps


def mount(config, domu: str, local, point: str | None, directory: str) -> list[str]:
    """On the peer: POINT (or the replica) mounted read-only at DIRECTORY in the guest's layout,
    with the safety rules of a backup's mounts; kept until `umount`."""
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory) or os.path.islink(directory):
        raise UsageError(f"{directory} is not a directory", hint="make an empty directory to mount into")
    settings = config.settings_for(domu)
    with DomuLock(config.state_dir, domu):
        old = Journal.load(config.state_dir, domu, MOUNTS)
        if old is not None:
            raise DomuBackupError(f"{domu}: something of it is mounted already (by PID {old.pid} at {old.started})",
                                  hint=f"`domubackup umount {domu}` first")
        replicas, p = held(local, domu, point)
        found = sources(domu, replicas, p, config.this_host)
        if p is None:
            closed(domu, replicas, config.this_host)
        journal = Journal.create(config.state_dir, domu, "", MOUNTS)
        runners = {LOCAL: local}
        try:
            Executor(journal, runners, timeout=settings.command_timeout).run(activation(LOCAL, [m for m, _, _ in found]))
            lvs = list_lvs(local, [m.path for m, _, _ in found])
            facts = [probe_disk(local, Disk("block", "disk", m.path, disk), path=m.path, lvs=lvs, point=p is not None)
                     for m, _, disk in found]
            sep = settings.kpartx_separator
            steps = []
            for f in facts:
                if planner.mapped(f):
                    dev = cmd.lv_path(f.lv.vg, f.lv.lv)
                    check_mappable(local, f, dev, cmd.dm_name(f.lv.vg, f.lv.lv), sep)
                    steps.append(Step("map", LOCAL, cmd.kpartx_add(dev, sep, read_only=True), cmd.kpartx_delete(dev, sep),
                                      note=f"{f.disk.target}: map partitions of {dev} read-only"))
            told = []
            root = layout.root_candidate(facts, settings)
            if root is None:
                mounts = layout.fallback_mounts(facts)
                steps += mount_steps(mounts, facts, settings, directory, dirs=True)
                decide = {}
            else:
                steps += mount_steps([Mount(root, "/")], facts, settings, directory, dirs=False)
                steps.append(Step("inspect", LOCAL, cmd.read_in(directory, layout.FSTAB), None,
                                  note="the guest's /etc/fstab", then="fstab"))

                def fstab(step, res):
                    if res.exit_code == EXIT_MISSING:
                        told.append(f"{root.name} has no /etc/fstab: only the root is mounted")
                        return None
                    if res.exit_code != 0 or "\ufffd" in res.stdout:
                        raise InspectError(f"{domu}: the guest's /etc/fstab cannot be read safely: "
                                           f"{res.stderr.strip() or 'it is not valid UTF-8'}")
                    try:
                        entries = parsers.parse_fstab(res.stdout)
                    except ValueError as e:
                        raise InspectError(f"{domu}: the guest's /etc/fstab is not usable: {e}") from None
                    mounts, notes = layout.mounts_from_fstab(entries, root, facts)
                    told.extend(notes)
                    told.extend(f"{m.filesystem.name} ({m.filesystem.fstype}) is not in the guest's fstab: not mounted"
                                for m in mounts if m.tree == layout.UNPLACED)
                    return mount_steps([m for m in mounts[1:] if m.tree != layout.UNPLACED], facts, settings,
                                       directory, dirs=False)
                decide = {"fstab": fstab}
            Executor(journal, runners, timeout=settings.command_timeout, callbacks=decide).run(steps)
        except BaseException:
            journal.teardown(runners)
            raise
        what = f"restore point {point}" if point else "the replica"
        mounted = [e.note for e in journal.entries if e.argv[:2] == (cmd.HELPER, "mount-in")]
        return told + [f"{domu}: {what} mounted read-only at {directory}: " + "; ".join(mounted),
                       f"`domubackup umount {domu}` unmounts it"]


def umount(config, domu: str, local) -> list[str]:
    with DomuLock(config.state_dir, domu):
        journal = Journal.load(config.state_dir, domu, MOUNTS)
        if journal is None:
            return [f"{domu}: nothing of it is mounted by `domubackup mount`"]
        n = sum(e.undo is not None for e in journal.entries)
        journal.teardown({LOCAL: local})
    return [f"{domu}: unmounted ({n} step(s) undone)"]
