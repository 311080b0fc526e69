"""cli: DomU names from the command line, escaped output, a private state directory."""

import json
import os
import stat

import pytest

from domubackup import cli
from domubackup.hosts.runner import Runner

pytestmark = pytest.mark.usefixtures("package_logger")  # cli.main sets the logging up

BAD_NAME = ("'../etc' is not a usable DomU name: expected 1 to 64 letters, digits, '.', '_', '+' or '-', "
            "starting with a letter or digit, without '..'")


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


@pytest.mark.parametrize("argv", [["plan", "../etc"], ["run", "web1", "../etc"], ["verify", "../etc"],
                                  ["seed", "../etc"], ["cleanup", "../etc"], ["history", "../etc"],
                                  ["check", "../etc"]])
def test_a_domu_name_that_cannot_name_files_is_a_usage_error(config, capsys, argv):
    runner = Succeeds()
    assert cli.main(["-c", config, *argv], local_runner=runner) == 2
    assert capsys.readouterr() == ("", f"domubackup: error: {BAD_NAME}\n")
    assert runner.calls == []


def test_say_escapes_control_characters(capsys):
    cli.say("web1: \x1b]0;pwned\x07 ok\nnext")
    cli.say("\u202eerr", file=__import__("sys").stderr)
    assert capsys.readouterr() == ("web1: \\x1b]0;pwned\\x07 ok\nnext\n", "\\u202eerr\n")


def test_cleanup_output_is_escaped(config, tmp_path, capsys):
    # an undo word that came from the guest (a mount point from its fstab) reaches the terminal
    # escaped
    journal = tmp_path / "state" / "journal"
    journal.mkdir(parents=True)
    entry = {"phase": "mount", "host": "local", "argv": ["mount", "/dev/x", "/t/\x1b[2Jx"],
             "undo": ["umount", "--", "/t/\x1b[2Jx"], "note": "", "state": "done"}
    (journal / "web1.json").write_text(json.dumps({"domu": "web1", "entries": [entry]}))
    runner = Succeeds()
    assert cli.main(["-c", config, "cleanup", "web1"], local_runner=runner) == 0
    assert runner.calls == [("umount", "--", "/t/\x1b[2Jx")]
    out, err = capsys.readouterr()
    assert out == "web1: undid 1 step(s):\n  local: umount -- /t/\\x1b[2Jx\n"


def test_state_dir_is_tightened_and_the_catalog_is_private(config, tmp_path, capsys):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    umask = os.umask(0o022)
    try:
        assert cli.main(["-c", config, "history"], local_runner=Succeeds()) == 0
        assert os.umask(0o022) == 0o022  # main gives the caller's umask back
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state / "catalog.sqlite").st_mode) == 0o600


def test_a_new_state_dir_and_what_it_holds_are_private(config, tmp_path, capsys):
    umask = os.umask(0o022)
    try:
        assert cli.main(["-c", config, "cleanup", "web1"], local_runner=Succeeds()) == 0
        assert cli.main(["-c", config, "history"], local_runner=Succeeds()) == 0
    finally:
        os.umask(umask)
    state = tmp_path / "state"
    modes = {str(p.relative_to(state)): stat.S_IMODE(os.stat(p).st_mode) for p in [state, *state.rglob("*")]}
    assert modes["."] == 0o700 and modes["catalog.sqlite"] == 0o600
    assert {m for p, m in modes.items() if os.path.isdir(state / p)} == {0o700}
    assert {m for p, m in modes.items() if not os.path.isdir(state / p)} == {0o600}
