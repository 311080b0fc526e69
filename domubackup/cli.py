"""Command line. The only place that prints, exits, and maps exceptions to exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from contextlib import closing, contextmanager
from dataclasses import asdict

from . import __version__, cli_points
from .core import config as cfg
from .jobs import backup, frame
from .hosts import logs, virt
from .core.errors import (EXIT_BUSY, EXIT_CONFIG, EXIT_FAILED, EXIT_INTERNAL, EXIT_NOT_ELIGIBLE, EXIT_OK, EXIT_PARTIAL, EXIT_REFUSED,
                     EXIT_SIGNAL, EXIT_TEARDOWN, EXIT_USAGE, DomuBackupError, Interrupted, UsageError,
                     signal_exit)
from .core.plan import describe
from .core.report import format_history, history_json, last_ok_text, outcome_json, parse_since
from .hosts.journal import Journal
from .hosts.lock import DomuLock
from .jobs.seed import seed

# When several DomUs end differently, the most serious outcome decides the exit status (a code
# not listed, a signal's 128+N, wins over all). EXIT_CONFIG: a DomU that runs here with no
# replica host but this one (config.no_peer); the rest of the file is valid.
SEVERITY = [EXIT_OK, EXIT_NOT_ELIGIBLE, EXIT_BUSY, EXIT_PARTIAL, EXIT_FAILED, EXIT_REFUSED, EXIT_CONFIG, EXIT_TEARDOWN]

log = logging.getLogger("domubackup")


def _on_signal(signum, _frame):
    raise Interrupted(signum)


def say(text: str, file=None) -> None:
    """Print one message (stdout by default) with its control characters escaped: messages
    carry strings from the guest's disks (labels, fstab, mount points)."""
    file = file or sys.stdout
    try:
        print(logs.printable(text), file=file, flush=True)
    except BrokenPipeError:
        reader_gone(file)


def reader_gone(stream) -> None:
    """Whoever read ``stream`` has gone (`domubackup history | head`): as the Python docs advise
    for SIGPIPE, its descriptor becomes /dev/null, so that the rest of the output and the flush at
    exit end quietly. The command carries on and exits with its own code (a backup's result is
    never hidden by a closed pipe)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


def flush(stream) -> None:
    try:
        stream.flush()
    except BrokenPipeError:
        reader_gone(stream)


def worst(codes) -> int:
    codes = list(codes) or [EXIT_OK]
    return max(codes, key=lambda c: SEVERITY.index(c) if c in SEVERITY else len(SEVERITY))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="domubackup", description="Keep a copy of each running DomU's LVM disks "
                                "on a peer Dom0: snapshot, map, mount read-only, rsync over SSH, close everything.")
    p.add_argument("--version", action="version", version=f"domubackup {__version__}",
                   help="print the version and exit")
    # -c and -v are also accepted after the command (`domubackup run -v web1`): each subparser
    # has them too, with SUPPRESS as default, so that a value given before the command stays.
    common = argparse.ArgumentParser(add_help=False)
    for parser, config, verbose in ((p, None, 0), (common, argparse.SUPPRESS, argparse.SUPPRESS)):
        parser.add_argument("-c", "--config", default=config, metavar="FILE",
                            help=f"configuration file (default: $DOMUBACKUP_CONFIG or {cfg.DEFAULT_PATH})")
        parser.add_argument("-v", "--verbose", action="count", default=verbose,
                            help="more output: each DomU's summary, the stages on stderr (-vv: every command)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", help="`domubackup COMMAND --help` tells more")

    def command(name, help, description):
        return sub.add_parser(name, help=help, description=f"{help[0].upper()}{help[1:]}. {description}",
                              parents=[common])

    def json_option(parser, what):
        parser.add_argument("--json", action="store_true", help=f"print {what} as JSON (see README, JSON output)")

    sp = command("plan", "show the commands a backup of DOMU would run",
                 "Reads the domain and probes its disks read-only; runs nothing that changes anything.")
    sp.add_argument("domu", metavar="DOMU", help="the DomU, as libvirt names it")
    json_option(sp, "the steps")
    sr = command("run", "back up the named DomUs (default: every configured DomU that runs here)",
                 "Quiet when every DomU succeeded; the exit code is the most serious outcome.")
    sr.add_argument("domus", nargs="*", metavar="DOMU", help="DomUs to back up (default: every configured one)")
    sr.add_argument("--dry-run", action="store_true", help="print the plan of each DomU instead of running it")
    json_option(sr, "each DomU's outcome (with --dry-run: its plan)")
    se = command("seed", "first full block copy of DOMU's disks to the replica LVs on the peer(s)",
                 "Needed once before the first run, so that the replica's filesystem UUIDs match.")
    se.add_argument("domu", metavar="DOMU", help="the DomU whose disks to copy")
    se.add_argument("--force", action="store_true", help="overwrite a replica LV that already holds data")
    sv = command("verify", "compare the replica with a fresh snapshot by checksum",
                 "rsync --dry-run --checksum with the replica mounted read-only; changes nothing.")
    sv.add_argument("domu", metavar="DOMU", help="the DomU to verify")
    sv.add_argument("--fsck", action="store_true",
                    help="also check the replica's filesystems read-only on the peer (e2fsck -n, xfs_repair -n)")
    json_option(sv, "the result")
    sk = command("check", "check everything a first night needs",
                 "Config, libvirt, tools on both hosts, SSH with pinned host keys, replicas, VG space, and (a "
                 "warning) each DomU's newest OK backup on any Dom0 against max_age; one line per check.")
    sk.add_argument("domus", nargs="*", metavar="DOMU", help="DomUs to check (default: what the night backs up here)")
    json_option(sk, "the checks")
    sh_ = command("history", "the runs recorded in the catalog, newest first",
                  "Times are local in the table, UTC in JSON.")
    sh_.add_argument("domu", nargs="?", metavar="DOMU", help="only this DomU's runs")
    json_option(sh_, "the runs")
    sh_.add_argument("--since", metavar="WHEN", help="only runs started since: 2026-11-20, 2026-11-20T10:00, 24h, 7d, 2w")
    sh_.add_argument("--limit", type=int, metavar="N", help="at most N runs")
    cli_points.add_parsers(command, json_option)
    sc = command("cleanup", "undo what a dead run left behind (its journal), on both hosts",
                 "The next run does it by itself too.")
    sc.add_argument("domus", nargs="*", metavar="DOMU", help="DomUs to clean up (default: every DomU with a journal)")
    return p


def main(argv=None, *, local_runner=None, hostname=None) -> int:
    # Journals, run logs, the catalog and their directories: root's only (0600 / 0700), from
    # whichever part of the tool creates them. Restored on return (tests call main in-process).
    umask = os.umask(0o077)
    try:
        return _main(argv, local_runner=local_runner, hostname=hostname)
    finally:
        os.umask(umask)
        flush(sys.stdout)  # argparse's help, say()'s last line: a closed pipe is no traceback


def private_dir(path: str) -> None:
    """Tighten an existing directory to 0700 (state_dir: the umask makes a new one 0700)."""
    try:
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o700)
    except FileNotFoundError:
        return
    except OSError as e:
        raise DomuBackupError(f"state_dir {path}: cannot make it private (0700): {e.strerror or e}") from None


def _main(argv, *, local_runner, hostname) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on usage errors and 0 for --help
        return int(e.code or 0)
    if not args.command:
        parser.print_usage(sys.stderr)
        return EXIT_USAGE
    logs.setup(args.verbose, syslog=local_runner is None)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _on_signal)
    config = None
    try:
        for name in (getattr(args, "domu", None), *getattr(args, "domus", ())):  # named on the command line
            if name is not None:
                cfg.check_domu_name(name, UsageError)
        config = cfg.load_config(cfg.config_path(args.config), hostname=hostname)
        private_dir(config.state_dir)
        runner = local_runner or _local_runner(config)
        command = {"plan": cmd_plan, "run": cmd_run, "cleanup": cmd_cleanup, "seed": cmd_seed,
                   "verify": cmd_verify, "check": cmd_check, "history": cmd_history,
                   **cli_points.COMMANDS}.get(args.command)
        if command is None:
            raise UsageError(f"unknown command {args.command}")
        return command(config, args, runner)
    except KeyboardInterrupt:
        say("domubackup: interrupted", file=sys.stderr)
        return signal_exit(signal.SIGINT)
    except DomuBackupError as e:
        say(f"domubackup: error: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # a bug: one line here, the traceback in a log file
        where = internal_error_log(e, config, args.command)
        say(f"domubackup: internal error: {type(e).__name__}: {' '.join(str(e).split())}; {where}",
            file=sys.stderr)
        return EXIT_INTERNAL


@contextmanager
def run_log(config, domu: str, kind: str = "backup"):
    """logs.run_log; an exception that is not the tool's own leaves its traceback in that file
    (and the file's path on the exception, for the one line that `_main` prints)."""
    with logs.run_log(config.state_dir, domu, kind) as path:
        try:
            yield path
        except Exception as e:
            if path and not isinstance(e, DomuBackupError):
                log_traceback(e)
                e.domubackup_log = path
            raise


def log_traceback(e: BaseException) -> None:
    """The traceback of ``e`` to the package's log files only (never to the terminal)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "internal error: %s: %s",
                            (type(e).__name__, e), (type(e), e, e.__traceback__))
    for h in log.handlers:
        if isinstance(h, logging.FileHandler) and record.levelno >= h.level:
            h.handle(record)


def internal_error_log(e: BaseException, config, command: str) -> str:
    """Where the traceback of ``e`` is: its run log, else a log file of its own in state_dir."""
    path = getattr(e, "domubackup_log", None)
    if path is None and config is not None:
        with logs.run_log(config.state_dir, "domubackup", command) as path:
            if path:
                log_traceback(e)
    return f"the traceback is in {path}" if path else "no log file could be written: the traceback is not kept"


def _local_runner(config):
    from .hosts.runner import LocalRunner

    return LocalRunner(host=config.this_host)


def cmd_plan(config, args, runner) -> int:
    with closing(virt.connect(config.settings_for(args.domu).libvirt_uri)) as conn:
        plan = backup.make_plan(config, frame.inspect(config, args.domu, conn, runner))
    say(json.dumps(plan.to_json(), indent=2) if args.json else describe(plan))
    return EXIT_OK


def cmd_run(config, args, runner) -> int:
    if not args.dry_run:
        return run_backups(config, args, runner)
    codes, out = [], []
    with closing(virt.connect(config.defaults.libvirt_uri)) as conn:
        for name in virt.selected_domus(config, args.domus, conn):
            try:
                plan = backup.make_plan(config, frame.inspect(config, name, conn, runner))
            except DomuBackupError as e:
                say(f"domubackup: {e}", file=sys.stderr)
                codes.append(e.exit_code)
                continue
            codes.append(EXIT_OK)
            if args.json:
                out.append({"domu": name, "steps": plan.to_json()})
            else:
                say(describe(plan))
    if args.json:
        say(json.dumps(out, indent=2))
    return worst(codes)


def open_catalog(config):
    from .hosts.catalog import Catalog

    catalog = Catalog.in_state_dir(config.state_dir)
    for run_id in catalog.reap_dead():
        log.warning("run %d of the catalog died before it finished: marked ERROR", run_id)
    return catalog


@contextmanager
def one_job(config, name: str, kind: str):
    """(libvirt connection, catalog, run log path) of one DomU's job of KIND; closed after it."""
    conn = virt.connect(config.settings_for(name).libvirt_uri)
    catalog = open_catalog(config)
    try:
        with run_log(config, name, kind) as log_path:
            yield conn, catalog, log_path
    finally:
        conn.close()
        catalog.close()


def terminal_bars(args):
    """A progress.Progress when a person watches (stderr a TTY, no --json), else None."""
    if getattr(args, "json", False) or not sys.stderr.isatty():
        return None
    from .hosts.progress import Progress

    return Progress.for_terminal(sys.stderr)


def run_backups(config, args, runner) -> int:
    from .hosts.metrics import write_metrics

    conn = virt.connect(config.defaults.libvirt_uri)
    catalog = open_catalog(config)
    runs = []  # (outcome, its JSON)
    bars = terminal_bars(args)
    try:
        frame.lifecycle_hook(config.defaults, "job-start", runner)
        for name in virt.selected_domus(config, args.domus, conn):
            started = time.time()
            with run_log(config, name) as log_path:
                log.info("backup starts")
                outcome = backup.backup(config, name, conn, runner, catalog=catalog, log_path=log_path,
                                          progress=bars)
                log.info("%s", outcome.summary())
            runs.append((outcome, outcome_json(outcome, started, time.time(), log_path)))
            if outcome.undone:
                say(f"domubackup: {name}: undid what a dead run left: " + "; ".join(outcome.undone), file=sys.stderr)
            if outcome.not_here and args.domus:  # named by hand: say why nothing happened
                say(f"domubackup: {outcome.error}", file=sys.stderr)
            if outcome.exit_code > EXIT_SIGNAL:
                break  # a signal: everything of this DomU is closed; do not start the next one
        outcomes = [o for o, _ in runs]
        codes = {o.exit_code for o in outcomes} - {EXIT_OK}
        frame.hook_or_warn(config.defaults, "job-end", runner, domu=" ".join(o.domu for o in outcomes),
                           status="ERROR" if codes - {EXIT_PARTIAL} else "PARTIAL" if codes else "OK")
        catalog.prune(config.catalog_keep_days)
        if config.metrics_textfile:
            write_metrics(catalog, config.metrics_textfile, list(config.domus))
        stale = stale_lines(config, catalog, [o.domu for o in outcomes if o.status != "OK" and not o.not_here])
    finally:
        conn.close()
        catalog.close()
    code = EXIT_OK if runs else EXIT_NOT_ELIGIBLE
    if not runs:
        say("domubackup: no DomU to back up (none named, none configured)", file=sys.stderr)
    elif not args.domus:
        # The nightly run on every Dom0: a DomU that runs elsewhere is another Dom0's job.
        runs = [(o, j) for o, j in runs if not o.not_here]
        if not runs:
            log.info("no configured DomU runs on this host")
    code = worst([code, *(o.exit_code for o, _ in runs)])
    if getattr(args, "json", False):
        say(json.dumps([j for _, j in runs], indent=2))
    elif code or args.verbose:
        for o, _ in runs:
            say(o.summary())
    for line in stale:  # on stderr, --json or not: cron mails it with the failure
        say(f"domubackup: {line}", file=sys.stderr)
    return code


def stale_lines(config, catalog, domus, now=None) -> list[str]:
    """What the summary says of each DomU of ``domus`` (those that failed here tonight) with no OK
    run in this host's catalog within max_age (the metric domubackup_last_ok_age_seconds)."""
    now = time.time() if now is None else now
    lines = []
    for domu in domus:
        row = catalog.last_ok(domu)
        fresh, text = last_ok_text(None if row is None else (row.ended or row.started, config.this_host),
                                   now, config.max_age)
        if not fresh:
            lines.append(f"{domu}: {text}")
    return lines


def cmd_check(config, args, runner) -> int:
    from .jobs.preflight import run_checks

    checks = run_checks(config, args.domus, runner)
    failed = sum(not c.ok and not c.warning for c in checks)
    warnings = sum(c.warning for c in checks)
    if args.json:
        say(json.dumps({"checks": [asdict(c) for c in checks], "failed": failed, "warnings": warnings}, indent=2))
    else:
        for c in checks:
            say(c.line())
        say(f"check: {len(checks) - failed - warnings} OK, {failed} to fix"
            + (f", {warnings} warning{'s' if warnings > 1 else ''}" if warnings else ""))
    return EXIT_FAILED if failed else EXIT_OK


def cmd_verify(config, args, runner) -> int:
    name = args.domu
    started = time.time()
    with one_job(config, name, "verify") as (conn, catalog, log_path):
        out = backup.backup(config, name, conn, runner, catalog=catalog, log_path=log_path, verify=True)
    ended = time.time()
    lines = [f"{name}: differs: {d}" for d in out.differences]
    code, fsck = out.exit_code, None
    if args.fsck and out.status in ("OK", "ERROR"):
        with closing(virt.connect(config.settings_for(name).libvirt_uri)) as conn:
            fsck = backup.fsck_replicas(config, name, conn, runner)
        lines += [f"{name}: fsck: {p}" for p in fsck]
    if fsck:
        say(f"domubackup: {name}: the replica's filesystems have errors", file=sys.stderr)
        code = max(code, EXIT_FAILED)
    else:
        lines += [f"{name}: fsck OK: every replica filesystem is clean"] if fsck is not None else []
        lines.append(f"{name}: verify {out.status} ({len(out.differences)} difference(s))" if code else
                     f"{name}: verify OK: the replica matches the snapshot ({out.stats.files} files compared "
                     "by checksum)" if out.stats.files or not out.report else
                     f"{name}: verify OK: the replica matches the snapshot (" + "; ".join(out.report) + ")")
    if args.json:
        say(json.dumps({**outcome_json(out, started, ended, log_path), "exit_code": code,
                        "differences": out.differences, "fsck": fsck}, indent=2))
    else:
        for line in lines:
            say(line)
    return code


def cmd_seed(config, args, runner) -> int:
    name = args.domu
    with one_job(config, name, "seed") as (conn, catalog, log_path):
        out = seed(config, name, conn, runner, force=args.force, bars=terminal_bars(args), catalog=catalog,
                   log_path=log_path)
    if out.exit_code:  # the job has logged why
        return out.exit_code
    for line in out.report:
        say(f"{name}: {line}")
    return EXIT_OK


def cmd_history(config, args, runner=None) -> int:
    since = None
    if args.since:
        try:
            since = parse_since(args.since, time.time())
        except ValueError as e:
            raise UsageError(f"--since: {e}") from None
    catalog = open_catalog(config)
    try:
        rows = catalog.runs(domu=args.domu, since=since, limit=args.limit)
    finally:
        catalog.close()
    say(json.dumps(history_json(rows), indent=2) if args.json else format_history(rows))
    return EXIT_OK


def cmd_cleanup(config, args, runner) -> int:
    names = args.domus or Journal.domus(config.state_dir)
    codes = []
    for name in names:
        try:
            with DomuLock(config.state_dir, name):
                undone = frame.recover(config, name, runner)
        except DomuBackupError as e:
            say(f"domubackup: {name}: {e}", file=sys.stderr)
            codes.append(e.exit_code)
            continue
        codes.append(EXIT_OK)
        if undone:
            say(f"{name}: undid {len(undone)} step(s):")
            for u in undone:
                say(f"  {u}")
        else:
            say(f"{name}: nothing to clean up")
    if not names:
        say("nothing to clean up")
    return worst(codes)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
