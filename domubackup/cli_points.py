"""The command line of the restore points: `points`, `prune` and the ways back (`mount`,
`umount`, `rollback`, `restore`, `failover`). Part of the CLI (cli.py prints and exits)."""

from __future__ import annotations

import json
import os
from contextlib import closing, contextmanager

from . import cli
from .core.errors import EXIT_OK, ConfigError
from .hosts import virt
from .jobs import frame


def add_parsers(command, json_option) -> None:
    sp_ = command("points", "the restore points of DomUs, on this host and on their peers",
                  "Read from the LV tags on each host: a peer lists what it holds even when the DomU's own Dom0 is gone.")
    sp_.add_argument("domus", nargs="*", metavar="DOMU", help="only these DomUs (default: every configured one)")
    json_option(sp_, "the points")
    spr = command("prune", "remove the restore points that the [retention] rules do not keep",
                  "Proxmox Backup Server's rules (keep_last, keep_daily, ...), on this host and on the peers; "
                  "every OK run prunes too.")
    spr.add_argument("domus", nargs="*", metavar="DOMU", help="only these DomUs (default: every configured one)")
    spr.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    point = "the restore point (its name in `domubackup points`)"
    sm = command("mount", "mount a restore point (or the replica) read-only, in the guest's layout",
                 "On the peer that holds it, for restoring files by hand; the safety rules of a backup's mounts "
                 "apply. It stays mounted until `domubackup umount DOMU`.")
    sm.add_argument("domu", metavar="DOMU", help="the DomU")
    sm.add_argument("--point", metavar="P", help=f"{point} (default: the replica itself)")
    sm.add_argument("directory", metavar="DIR", help="an existing directory to mount into")
    su = command("umount", "unmount what `domubackup mount DOMU` mounted", "Undoes its steps in reverse.")
    su.add_argument("domu", metavar="DOMU", help="the DomU")
    sb = command("rollback", "make the replica that restore point, on the peer that holds it",
                 "Only the blocks that differ are written, then read back and compared. Refused while the "
                 "DomU runs on this host or its replica is in use.")
    sb.add_argument("domu", metavar="DOMU", help="the DomU")
    sb.add_argument("--point", metavar="P", required=True, help=point)
    ss = command("restore", "copy a restore point (or the replica) back into the DomU's own LVs",
                 "On the DomU's own Dom0, with the DomU shut off: streamed block-wise from its first peer, read "
                 "back and checksum-verified against the sender's (the reverse of seed).")
    ss.add_argument("domu", metavar="DOMU", help="the DomU")
    ss.add_argument("--point", metavar="P", help=f"{point} on the peer (default: the replica)")
    sf = command("failover", "start the DomU here, on its peer, when its own Dom0 is dead",
                 "Refused while the DomU runs on any Dom0 that answers; rolls back to --point first; defines the "
                 "DomU through libvirt from the domain XML kept with the point and starts it.")
    sf.add_argument("domu", metavar="DOMU", help="the DomU")
    sf.add_argument("--point", metavar="P", help=f"{point} (default: the replica as the last OK run left it)")
    sf.add_argument("--no-start", action="store_true", help="only define the DomU")


def _on_point_hosts(config, args, runner, work):
    """WORK's answers from every host that may hold the named DomUs' points; a host's error is
    said on stderr (the others still answer). Returns (answers, exit codes)."""
    from .jobs import points

    answers, codes = [], [EXIT_OK]
    for domu, host, answer, error in points.on_hosts(config, args.domus, runner, frame.ssh_runner, work):
        if error is not None:
            cli.say(f"domubackup: {domu}: {host}: {error}", file=cli.sys.stderr)
            codes.append(error.exit_code)
        else:
            answers.append((domu, host, answer))
    return answers, codes


def cmd_points(config, args, runner) -> int:
    from .jobs import points

    answers, codes = _on_point_hosts(config, args, runner, lambda domu, host, r: points.host_points(r, domu))
    rows = [dict(p.to_json(), domu=domu, host=host) for domu, host, (found, _) in answers for p in found]
    if args.json:
        cli.say(json.dumps(rows, indent=2))
        return cli.worst(codes)
    cli.say(points.format_points(rows))
    for domu, host, (_, writing) in answers:
        for lv in writing:
            cli.say(f"{domu}: {host}: the replica {lv} is being written, or the last run that wrote it did not end OK")
    return cli.worst(codes)


def cmd_prune(config, args, runner) -> int:
    from .jobs import points

    for domu in args.domus:
        if config.settings_for(domu).retention is None:
            raise ConfigError(f"{config.path}: no [retention] for {domu}: nothing says which points to keep",
                              hint="add a [retention] table (e.g. keep_last = 7), or [domu.NAME.retention]")
    args.domus = args.domus or [d for d in config.domus if config.settings_for(d).retention is not None]
    # an append_only peer's points are pruned by that peer's own `domubackup prune` (its serve
    # refuses this host's removals): what it would remove is only shown
    answers, codes = _on_point_hosts(config, args, runner, lambda domu, host, r: points.prune_host(
        config, domu, host, r, dry_run=args.dry_run or host in config.append_only))
    for domu, host, (decided, _) in answers:
        left = " (append-only: left to its own prune)" if host in config.append_only else ""
        for name, keep, why in decided:
            done = "keeps" if keep else "would remove" if args.dry_run or left else "removed"
            cli.say(f"{domu}: {host}: {done} {name} ({why}){'' if keep else left}")
    if not args.dry_run:
        with closing(cli.open_catalog(config)) as catalog:
            for domu in args.domus:
                ok = [(host, known) for d, host, (_, known) in answers if d == domu]
                run_id = catalog.start("prune", domu, ",".join(h for h, _ in ok), os.getpid())
                for host, known in ok:
                    catalog.record_points(domu, host, **known)
                catalog.finish(run_id, "OK" if len(ok) == 1 + len(config.peers_for(domu)) else "ERROR")
    return cli.worst(codes)


def _lines(lines) -> int:
    for line in lines:
        cli.say(line)
    return EXIT_OK


@contextmanager
def recorded(config, kind: str, domu: str, peer: str = ""):
    """The command as a run of KIND in this host's catalog: OK, or ERROR with its message."""
    with closing(cli.open_catalog(config)) as catalog:
        run_id = catalog.start(kind, domu, peer, os.getpid())
        try:
            yield
        except BaseException as e:
            catalog.finish(run_id, "ERROR", error=str(e)[:2000])
            raise
        catalog.finish(run_id, "OK")


def cmd_mount(config, args, runner) -> int:
    from .jobs import wayback

    return _lines(wayback.mount(config, args.domu, runner, args.point, args.directory))


def cmd_umount(config, args, runner) -> int:
    from .jobs import wayback

    return _lines(wayback.umount(config, args.domu, runner))


def cmd_rollback(config, args, runner) -> int:
    from .jobs import wayback

    with recorded(config, "rollback", args.domu):
        return _lines(wayback.rollback(config, args.domu, runner, args.point))


def cmd_restore(config, args, runner) -> int:
    from .jobs import wayback

    with closing(virt.connect(config.settings_for(args.domu).libvirt_uri)) as conn, \
            recorded(config, "restore", args.domu, ",".join(config.peers_for(args.domu)[:1])):
        return _lines(wayback.restore(config, args.domu, conn, runner, frame.ssh_runner, args.point))


def cmd_failover(config, args, runner) -> int:
    from .jobs import wayback

    with closing(virt.connect(config.settings_for(args.domu).libvirt_uri)) as conn, \
            recorded(config, "failover", args.domu):
        return _lines(wayback.failover(config, args.domu, conn, runner, frame.ssh_runner, args.point,
                                       start=not args.no_start))


COMMANDS = {"points": cmd_points, "prune": cmd_prune, "mount": cmd_mount, "umount": cmd_umount,
            "rollback": cmd_rollback, "restore": cmd_restore, "failover": cmd_failover}
