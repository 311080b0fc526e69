"""The shipped bash completion (conf/completion/domubackup) against the program's parser, and
what it offers in a real bash."""

import argparse
import pathlib
import re
import subprocess

from domubackup import cli

SCRIPT = pathlib.Path(__file__).parents[2] / "conf/completion/domubackup"


def test_its_tables_are_the_parsers():
    text = SCRIPT.read_text()
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert re.search(r'local commands="([^"]*)"', text).group(1).split() == list(sub.choices)
    table = dict(re.findall(r'\[(\w+)\]="([^"]*)"', text))
    common = {"-h", "--help", "-c", "--config", "-v", "--verbose"}
    for name, sp in sub.choices.items():
        assert set(table[name].split()) == {o for a in sp._actions for o in a.option_strings} - common, name
    assert set(re.search(r'local global="([^"]*)"', text).group(1).split()) == {
        o for a in parser._actions for o in a.option_strings}


def complete(line, conf):
    """What bash offers for LINE (the cursor at its end)."""
    words = line.split(" ")
    script = (f"source {SCRIPT}; COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}; "
              "_domubackup; printf '%s\\n' \"${COMPREPLY[@]}\"")
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True,
                         env={"DOMUBACKUP_CONFIG": str(conf), "PATH": "/usr/bin:/bin"}).stdout
    return sorted(w for w in out.splitlines() if w)


def test_it_completes_commands_options_and_domus(tmp_path):
    conf = tmp_path / "d.toml"
    conf.write_text('dom0s = ["a", "b"]\n[domu.web1]\npeers = ["b"]\n[domu.db-2]\n# [domu.gone]\n[ssh]\n')
    assert complete("domubackup r", conf) == ["restore", "rollback", "run"]
    assert complete("domubackup -v h", conf) == ["history"]
    assert complete("domubackup run --d", conf) == ["--dry-run"]
    assert complete("domubackup run ", conf) == ["db-2", "web1"]
    assert complete("domubackup verify w", conf) == ["web1"]
    other = tmp_path / "other.toml"
    other.write_text("[domu.elsewhere]\n")
    assert complete(f"domubackup -c {other} seed ", conf) == ["elsewhere"]
