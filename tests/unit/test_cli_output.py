"""cli: the exit-code table, signals (128+N), no traceback on the terminal, --json, global
options after the subcommand, help text, `python -m domubackup`."""

import argparse
import json
import os
import signal
import subprocess
import sys

import pytest

from domubackup import cli
from domubackup.core import errors
from domubackup.jobs import frame, backup as backup_job
from test_cli import Succeeds, config  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("package_logger")  # cli.main sets the logging up

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def handlers():
    """cli.main installs its signal handlers: put the test process's back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_the_exit_code_table():
    assert (errors.EXIT_OK, errors.EXIT_FAILED, errors.EXIT_USAGE, errors.EXIT_NOT_ELIGIBLE, errors.EXIT_TEARDOWN,
            errors.EXIT_PARTIAL, errors.EXIT_INTERNAL, errors.EXIT_BUSY, errors.EXIT_CONFIG) == (
            0, 1, 2, 3, 4, 5, 70, 75, 78)
    assert [c.exit_code for c in (errors.DomuBackupError, errors.UsageError, errors.NotEligibleError,
                                  errors.TeardownError, errors.BusyError, errors.ConfigError)] == [1, 2, 3, 4, 75, 78]
    assert cli.EXIT_PARTIAL is errors.EXIT_PARTIAL and backup_job.EXIT_PARTIAL == 5  # one table, imported


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_a_signal_ends_the_command_with_128_plus_its_number_after_its_finally(config, monkeypatch, capsys,
                                                                             handlers, sig, code):
    closed = []

    def command(config, args, runner):
        try:
            os.kill(os.getpid(), sig)
            raise AssertionError("the handler raises")
        finally:
            closed.append(True)
    monkeypatch.setattr(cli, "cmd_history", command)
    assert cli.main(["-c", config, "history"], local_runner=Succeeds()) == code
    assert closed == [True]
    name = signal.Signals(sig).name
    assert capsys.readouterr().err == (f"domubackup: error: stopped by signal {name}; "
                                       "closing everything that was opened\n")


def test_a_signal_in_one_domu_stops_the_night_with_its_code(config, monkeypatch, capsys, handlers):
    from domubackup.core.config import load_config
    started = []

    def backup(config, name, conn, runner, **kw):
        started.append(name)
        return backup_job.Outcome(name, "ERROR", errors.signal_exit(signal.SIGTERM), error="stopped by signal SIGTERM")
    monkeypatch.setattr(backup_job, "backup", backup)
    cfg = load_config(config)
    args = argparse.Namespace(domus=["web1", "web2"], verbose=0)
    assert cli.run_backups(cfg, args, Succeeds()) == 143
    assert started == ["web1"]


def domubackup(*argv, stdout=subprocess.PIPE, **kw):
    """`python -m domubackup ARGV` in a child process (its own signals, its own stdout)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "domubackup", *argv], stdout=stdout, stderr=subprocess.PIPE,
                          env=env, text=True, timeout=60, **kw)


def test_python_m_domubackup_is_the_program():
    r = domubackup("--version")
    assert (r.returncode, r.stdout, r.stderr) == (0, f"domubackup {cli.__version__}\n", "")


def test_python_m_domubackup_runs_the_helpers_too(tmp_path):
    # entry.main dispatches mount-in/umount-in/read-in without the CLI: read-in of a file in a tree
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "fstab").write_text("/dev/xvda1 / ext4 defaults 0 1\n")
    r = domubackup("read-in", "--", str(tmp_path), "etc/fstab")
    assert (r.returncode, r.stdout) == (0, "/dev/xvda1 / ext4 defaults 0 1\n"), r.stderr


def closed_pipe():
    """The write end of a pipe whose reader has gone: every write to it is EPIPE."""
    r, w = os.pipe()
    os.close(r)
    return w


@pytest.mark.parametrize("argv", [["history"], ["--help"], ["history", "--json"]])
def test_a_closed_stdout_ends_quietly_with_the_commands_own_code(config, argv):
    w = closed_pipe()
    try:
        r = domubackup("-c", config, *argv, stdout=w)
    finally:
        os.close(w)
    assert (r.returncode, r.stderr) == (0, "")


def test_a_closed_stdout_does_not_hide_the_exit_code(tmp_path):
    # the config is wrong: exit 78 whatever happens to the output
    path = tmp_path / "bad.toml"
    path.write_text("dom0s = 3\n")
    w = closed_pipe()
    try:
        r = domubackup("-c", str(path), "history", stdout=w)
    finally:
        os.close(w)
    assert r.returncode == 78 and r.stderr.startswith("domubackup: error: ") and "Traceback" not in r.stderr


def test_say_to_a_closed_pipe_points_the_descriptor_at_devnull(tmp_path):
    w = closed_pipe()
    with os.fdopen(w, "w") as stream:
        cli.say("x" * 100000, file=stream)  # raised BrokenPipeError before
        cli.say("more", file=stream)
        assert os.path.samestat(os.fstat(stream.fileno()), os.stat(os.devnull))


def test_an_unexpected_exception_is_one_line_and_exit_70_with_the_traceback_in_a_log(config, tmp_path, monkeypatch,
                                                                                    capsys):
    def command(config, args, runner):
        raise ValueError("boom\n\x1b[2Jsecond line")
    monkeypatch.setattr(cli, "cmd_history", command)
    assert cli.main(["-c", config, "history"], local_runner=Succeeds()) == 70
    logs = list((tmp_path / "state" / "log").glob("domubackup-history-*.log"))
    assert len(logs) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (f"domubackup: internal error: ValueError: boom \\x1b[2Jsecond line; "
                   f"the traceback is in {logs[0]}\n")
    text = logs[0].read_text()
    assert " ERROR internal error: ValueError: boom" in text and "\n    Traceback (most recent call last):\n" in text
    assert 'raise ValueError("boom' in text


def test_an_unexpected_exception_in_a_runs_log_leaves_its_traceback_there(config, tmp_path, monkeypatch, capsys):
    def command(config, args, runner):
        with cli.run_log(config, "web1", "seed"):
            {}["missing"]
    monkeypatch.setattr(cli, "cmd_history", command)
    assert cli.main(["-c", config, "history"], local_runner=Succeeds()) == 70
    log, = (tmp_path / "state" / "log").glob("*.log")
    assert log.name.startswith("web1-seed-")
    assert capsys.readouterr() == ("", f"domubackup: internal error: KeyError: 'missing'; the traceback is in {log}\n")
    assert "Traceback (most recent call last):" in log.read_text()


def test_an_unexpected_exception_before_the_config_is_read_has_no_log_file(config, monkeypatch, capsys):
    monkeypatch.setattr(cli.cfg, "load_config", lambda *a, **kw: 1 / 0)
    assert cli.main(["-c", config, "history"], local_runner=Succeeds()) == 70
    assert capsys.readouterr() == ("", "domubackup: internal error: ZeroDivisionError: division by zero; "
                                       "no log file could be written: the traceback is not kept\n")


@pytest.mark.parametrize("argv, config, verbose, domus", [
    (["run", "web1"], None, 0, ["web1"]),
    (["-v", "run", "web1"], None, 1, ["web1"]),
    (["run", "-v", "web1"], None, 1, ["web1"]),
    (["run", "-vv", "web1"], None, 2, ["web1"]),
    (["run", "web1", "-c", "F"], "F", 0, ["web1"]),
    (["-c", "F", "run", "web1"], "F", 0, ["web1"]),  # not overwritten by the subparser's default
    (["-c", "F", "-v", "run", "--config", "G", "web1"], "G", 1, ["web1"]),
])
def test_global_options_before_or_after_the_command(argv, config, verbose, domus):
    args = cli.build_parser().parse_args(argv)
    assert (args.config, args.verbose, args.domus) == (config, verbose, domus)


def test_global_options_after_the_command_reach_the_command(config, capsys):
    assert cli.main(["history", "-c", config, "--json"], local_runner=Succeeds()) == 0
    assert capsys.readouterr() == ("[]\n", "")


def subparsers(parser):
    action, = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action


def test_every_command_and_option_has_help():
    parser = cli.build_parser()
    sub = subparsers(parser)
    assert sorted(sub.choices) == ["check", "cleanup", "failover", "history", "mount", "plan", "points", "prune", "restore",
                                  "rollback", "run", "seed", "umount", "verify"]
    assert all(a.help for a in sub._choices_actions)  # the line in `domubackup --help`
    for name, p in [("domubackup", parser), *sub.choices.items()]:
        assert p.description, name
        for a in p._actions:
            assert a.help and a.help != argparse.SUPPRESS, (name, a.dest)
    assert {n for n, p in sub.choices.items() if any(a.dest == "json" for a in p._actions)} == {
        "plan", "run", "verify", "check", "history", "points"}


ISO_UTC = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
OUTCOME_KEYS = ["domu", "status", "exit_code", "started", "ended", "duration_seconds", "bytes_sent", "blocks_read",
                "blocks_changed", "files",
                "total_size", "snapshot_peak_percent", "not_copied", "error", "log_path", "point"]


def test_outcome_json_has_stable_keys_utc_times_and_raw_numbers():
    from domubackup.core.model import RsyncStats
    from domubackup.core.report import outcome_json
    out = backup_job.Outcome("web1", "PARTIAL", 5, duration=12.34567, stats=RsyncStats(files=3, total_size=4096,
                           bytes_sent=100), snapshot_peak=2.5, not_copied=["xvdb (ext4): not in the guest's fstab"])
    assert outcome_json(out, 1700000000.2, 1700000012.9, "/s/log/web1.log") == {
        "domu": "web1", "status": "PARTIAL", "exit_code": 5, "started": "2023-11-14T22:13:20Z",
        "ended": "2023-11-14T22:13:32Z", "duration_seconds": 12.346, "bytes_sent": 100, "blocks_read": 0,
        "blocks_changed": 0, "files": 3,
        "total_size": 4096, "snapshot_peak_percent": 2.5, "not_copied": ["xvdb (ext4): not in the guest's fstab"],
        "error": "", "log_path": "/s/log/web1.log", "point": None}
    assert list(outcome_json(out, 0, 0, None)) == OUTCOME_KEYS


def test_run_json_prints_each_domus_outcome(tmp_path, fixtures, monkeypatch, capsys):
    # a real run of web1 against scripted hosts (as in test_pipeline), then web2 which is not here
    import re
    from test_pipeline import _inspect, setup
    from domubackup.hosts import logs
    config, local, peer, log = setup(tmp_path, fixtures)

    def inspect(c, n, conn, r, on_eligible=None):
        if n == "web2":
            raise errors.NotHereError("web2: not defined on dom0a")
        return _inspect(c, n, r, on_eligible)
    monkeypatch.setattr(frame, "inspect", inspect)
    backup = backup_job.backup
    monkeypatch.setattr(backup_job, "backup", lambda *a, **kw: backup(*a, factory=lambda host, ssh: peer, **kw))
    monkeypatch.setattr(cli.virt, "connect", lambda uri: type("Conn", (), {"close": lambda self: None})())
    logs.setup(0, syslog=False)
    code = cli.run_backups(config, argparse.Namespace(domus=["web1", "web2"], verbose=0, json=True), local)
    out, err = capsys.readouterr()
    assert code == 3
    web1, web2 = json.loads(out)
    assert list(web1) == OUTCOME_KEYS and list(web2) == OUTCOME_KEYS
    assert (web1["domu"], web1["status"], web1["exit_code"], web1["error"], web1["not_copied"]) == (
        "web1", "OK", 0, "", [])
    assert re.fullmatch(ISO_UTC, web1["started"]) and re.fullmatch(ISO_UTC, web1["ended"])
    assert web1["started"] <= web1["ended"] and isinstance(web1["duration_seconds"], float)
    assert web1["files"] > 0 and web1["total_size"] > 0 and web1["bytes_sent"] > 0
    assert web1["log_path"].startswith(f"{tmp_path}/log/web1-backup-")
    assert (web2["status"], web2["exit_code"], web2["error"]) == ("SKIPPED", 3, "web2: not defined on dom0a")
    assert err == "domubackup: web2: not defined on dom0a\n"


def test_run_json_with_nothing_to_do_prints_an_empty_list(config, monkeypatch, capsys):
    from domubackup.core.config import load_config
    code = cli.run_backups(load_config(config), argparse.Namespace(domus=[], verbose=0, json=True), Succeeds())
    assert code == 3
    assert capsys.readouterr() == ("[]\n", "domubackup: no DomU to back up (none named, none configured)\n")


def test_check_json(config, monkeypatch, capsys):
    from domubackup.jobs import preflight
    monkeypatch.setattr(preflight, "run_checks", lambda config, names, runner: [
        preflight.Check(True, "config x", "dom0s a, b"), preflight.Check(False, "tools on dom0a", "missing: kpartx"),
        preflight.Check(False, "web1: last OK backup (max_age 2d)", "no OK backup within 2d: none recorded", warning=True)])
    assert cli.main(["check", "--json", "-c", config], local_runner=Succeeds()) == 1
    out, err = capsys.readouterr()
    assert json.loads(out) == {"checks": [
        {"ok": True, "what": "config x", "detail": "dom0s a, b", "warning": False},
        {"ok": False, "what": "tools on dom0a", "detail": "missing: kpartx", "warning": False},
        {"ok": False, "what": "web1: last OK backup (max_age 2d)", "detail": "no OK backup within 2d: none recorded",
         "warning": True}], "failed": 1, "warnings": 1}
    assert err == ""
    assert cli.main(["check", "-c", config], local_runner=Succeeds()) == 1
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "WARN web1: last OK backup (max_age 2d): no OK backup within 2d: none recorded",
        "check: 1 OK, 1 to fix, 1 warning"]


@pytest.mark.parametrize("problems, code", [([], 0), (["vg0/web1-disk: e2fsck -n exited 4: bad inode"], 1)])
def test_verify_json(config, monkeypatch, capsys, problems, code):
    from domubackup.core.model import RsyncStats
    monkeypatch.setattr(backup_job, "backup", lambda config, name, conn, runner, **kw: backup_job.Outcome(
        name, "OK", 0, duration=1.5, stats=RsyncStats(files=7)))
    monkeypatch.setattr(backup_job, "fsck_replicas", lambda config, name, conn, runner: problems)
    assert cli.main(["verify", "web1", "--fsck", "--json", "-c", config], local_runner=Succeeds()) == code
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert list(data) == [*OUTCOME_KEYS, "differences", "fsck"]
    assert (data["domu"], data["status"], data["exit_code"], data["files"], data["differences"], data["fsck"]) == (
        "web1", "OK", code, 7, [], problems)
    assert err == ("domubackup: web1: the replica's filesystems have errors\n" if problems else "")


def test_verify_text_is_unchanged(config, monkeypatch, capsys):
    monkeypatch.setattr(backup_job, "backup", lambda config, name, conn, runner, **kw: backup_job.Outcome(
        name, "ERROR", 1, differences=[">fc.T...... etc/motd"]))
    assert cli.main(["verify", "web1", "-c", config], local_runner=Succeeds()) == 1
    assert capsys.readouterr() == ("web1: differs: >fc.T...... etc/motd\nweb1: verify ERROR (1 difference(s))\n", "")


def test_history_json_keys_and_utc_times(config, tmp_path, capsys):
    import re
    from domubackup.hosts.catalog import Catalog
    with Catalog.in_state_dir(tmp_path / "state") as catalog:
        run = catalog.start("backup", "web1", "dom0b", 123, None)
        catalog.finish(run, "OK", bytes_sent=10, files=2, total_size=30)
    assert cli.main(["history", "--json", "-c", config], local_runner=Succeeds()) == 0
    row, = json.loads(capsys.readouterr().out)
    assert list(row) == ["id", "kind", "domu", "peer", "host", "pid", "status", "started", "ended",
                         "duration_seconds", "consistency", "freeze_window_ms", "bytes_sent", "blocks_read",
                         "blocks_changed", "files", "total_size",
                         "snapshot_peak_percent", "error", "log_path"]
    assert re.fullmatch(ISO_UTC, row["started"]) and re.fullmatch(ISO_UTC, row["ended"])
