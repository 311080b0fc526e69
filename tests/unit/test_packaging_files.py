"""What ships beside the code: the man page names every command and option that argparse
knows, the Debian version is pyproject's, and mail-failure reports a failed unit."""

import os
import pathlib
import re
import subprocess
import sys
import argparse

from domubackup import __version__, cli

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
MAN = (ROOT / "doc" / "domubackup.8").read_text()
MAIL_FAILURE = ROOT / "conf" / "mail-failure"


def _commands():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def test_the_man_page_names_every_command_and_option():
    parser, commands = _commands()
    man = MAN.replace("\\-", "-")
    missing = [name for name in commands if not re.search(rf"^\.B[IR]? \"?{re.escape(name)}\b", man, re.M)]
    for p in (parser, *commands.values()):
        for action in p._actions:
            missing += [o for o in action.option_strings if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", man)]
    assert sorted(set(missing)) == []


def test_the_debian_version_is_the_program_version():
    first = (ROOT / "debian" / "changelog").read_text().splitlines()[0]
    assert first.startswith(f"domubackup ({__version__}) ")
    assert f'"domubackup {__version__}"' in MAN


def _mail_failure(tmp_path, bin_files):
    state = tmp_path / "state"
    (state / "log").mkdir(parents=True)
    old, new = state / "log" / "web1-backup-1.log", state / "log" / "db1-backup-2.log"
    old.write_text("old run\n")
    new.write_text("rsync failed: no route to host\n")
    os.utime(old, (1, 1))
    conf = tmp_path / "domubackup.toml"
    conf.write_text(f'dom0s = ["a", "b"]\nstate_dir = "{state}"\n')
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, text in bin_files.items():
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    env = {"PATH": str(bindir), "DOMUBACKUP_CONFIG": str(conf)}
    return subprocess.run([sys.executable, str(MAIL_FAILURE), "domubackup.service"], env=env,
                          capture_output=True, text=True, timeout=30), new


def test_mail_failure_mails_the_newest_run_log_to_root(tmp_path):
    out = tmp_path / "mail"
    r, log = _mail_failure(tmp_path, {"sendmail": f'#!/bin/sh\necho "$@" > {out}.argv\nexec /bin/cat > {out}\n'})
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert (tmp_path / "mail.argv").read_text().split() == ["-t", "-oi"]
    mail = out.read_text()
    assert mail.startswith("To: root\nSubject: domubackup: domubackup.service failed on ")
    assert f"The newest run log, {log}:" in mail and "no route to host" in mail and "old run" not in mail


def test_mail_failure_without_a_mailer_writes_to_the_journal(tmp_path):
    r, log = _mail_failure(tmp_path, {})
    assert r.returncode == 0
    assert r.stdout.startswith("domubackup: domubackup.service failed on ")
    assert str(log) in r.stdout and "no route to host" in r.stdout
