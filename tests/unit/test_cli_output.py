"""cli: the exit-code table, signals (128+N), no traceback on the terminal, --json, global
options after the subcommand, help text, `python -m domubackup`."""

import argparse
import json
import os
import signal
import subprocess
import sys

import pytest

from domubackup import cli, errors, pipeline
from domubackup.runner import Runner

pytestmark = pytest.mark.usefixtures("package_logger")  # cli.main sets the logging up

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Succeeds(Runner):
    def __init__(self):
        super().__init__("dom0a")
        self.calls = []

    def _execute(self, argv, env, input, timeout):
        self.calls.append(argv)
        return 0, "", ""


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "db.toml"
    path.write_text(f'dom0s = ["dom0a", "dom0b"]\nthis_host = "dom0a"\nlibvirt_uri = "test:///default"\n'
                    f'state_dir = "{tmp_path}/state"\n')
    return str(path)


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
    assert cli.EXIT_PARTIAL is errors.EXIT_PARTIAL and pipeline.EXIT_PARTIAL == 5  # one table, imported


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
    from domubackup.config import load_config
    started = []

    def backup(config, name, conn, runner, **kw):
        started.append(name)
        return pipeline.Outcome(name, "ERROR", errors.signal_exit(signal.SIGTERM), error="stopped by signal SIGTERM")
    monkeypatch.setattr(pipeline, "backup", backup)
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
    assert sorted(sub.choices) == ["check", "cleanup", "history", "plan", "run", "seed", "verify"]
    assert all(a.help for a in sub._choices_actions)  # the line in `domubackup --help`
    for name, p in [("domubackup", parser), *sub.choices.items()]:
        assert p.description, name
        for a in p._actions:
            assert a.help and a.help != argparse.SUPPRESS, (name, a.dest)
    assert {n for n, p in sub.choices.items() if any(a.dest == "json" for a in p._actions)} == {
        "plan", "run", "history"}
