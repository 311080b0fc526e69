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
