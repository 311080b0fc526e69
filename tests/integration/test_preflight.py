"""`domubackup check` against libvirt's test driver (web1 and files1 run there): what the night
backs up is what is checked, and every DomU without an OK backup on any Dom0 within max_age is
a warning; the peers are asked with `domubackup history --json` through their runner."""

import json

from domubackup.core import commands
from domubackup.jobs import preflight
from domubackup.hosts.catalog import Catalog
from domubackup.core.config import load_config
from domubackup.core.errors import PeerError
from domubackup.hosts.runner import Runner
from replay import ReplayRunner
from test_plan_cli import web1_probes

NOW = 1_800_000_000.0
DAY = 86400


class Peer(Runner):
    """A peer that answers `domubackup history --json` only (``history``: its runs, or an
    exception to raise, or text); anything else cannot reach it."""

    def __init__(self, host, history):
        super().__init__(host)
        self.answer = history

    def _execute(self, argv, env, input, timeout):
        if argv != commands.history_json():
            raise PeerError(f"cannot connect to {self.host}: No route to host")
        if isinstance(self.answer, Exception):
            raise self.answer
        return 0, self.answer if isinstance(self.answer, str) else json.dumps(self.answer), ""


def config(tmp_path, fixtures, extra):
    p = tmp_path / "db.toml"
    p.write_text(f'dom0s = ["dom0a", "dom0b"]\nthis_host = "dom0a"\n'
                 f'libvirt_uri = "test://{fixtures}/libvirt/node.xml"\nstate_dir = "{tmp_path}/state"\n'
                 'snapshot_size = "256M"\n' + extra)
    return load_config(str(p))


def local(fixtures):
    table = web1_probes(fixtures)
    table[("which", *preflight.LOCAL_TOOLS)] = (0, "".join(f"/usr/bin/{t}\n" for t in preflight.LOCAL_TOOLS), "")
    return ReplayRunner(table)


def ok_run(state, domu, ended):
    with Catalog.in_state_dir(state, clock=lambda: ended) as c:
        c.finish(c.start("backup", domu, "dom0b", 1), "OK")


def lines(checks):
    return [c.line() for c in checks]


def test_backup_all_running_checks_the_running_domus_and_warns_about_stale_ones(tmp_path, fixtures):
    c = config(tmp_path, fixtures, "backup_all_running = true\n")
    ok_run(tmp_path / "state", "web1", NOW - 5 * DAY)  # here, too old; dom0b has a newer one
    peer = Peer("dom0b", [
        {"id": 9, "kind": "backup", "domu": "web1", "status": "OK", "started": "2027-01-15T07:00:00Z",
         "ended": "2027-01-15T07:00:00Z"},
        {"id": 8, "kind": "verify", "domu": "files1", "status": "OK", "started": "2027-01-15T07:00:00Z",
         "ended": "2027-01-15T07:00:00Z"}])  # a verify leaves no replica: does not count
    checks = preflight.run_checks(c, [], local(fixtures), factory=lambda host, ssh: peer, now=NOW)
    out = lines(checks)
    assert "OK   DomUs the night backs up here: files1, paused1, web1" in out
    assert any(x.startswith("OK   web1: eligible here: running; disks xvda=vg0/web1-disk, xvdb=vg0/web1-srv")
               for x in out)
    assert any(x.startswith("FAIL files1: eligible here: files1: no disk that can be backed up") for x in out)
    assert out[-3:] == [
        "WARN files1: last OK backup (max_age 2d): no OK backup within 2d: none recorded",
        "WARN paused1: last OK backup (max_age 2d): no OK backup within 2d: none recorded",
        "OK   web1: last OK backup (max_age 2d): newest OK 1h00m00s ago (2027-01-15T07:00:00Z, on dom0b)"]
    assert [(c.ok, c.warning) for c in checks[-3:]] == [(False, True), (False, True), (True, False)]


def test_a_peer_that_cannot_answer_is_a_warning_and_the_local_catalog_still_counts(tmp_path, fixtures):
    c = config(tmp_path, fixtures, 'max_age = "36h"\n[domu.web1]\n[domu.idle1]\n')
    ok_run(tmp_path / "state", "web1", NOW - 3 * DAY)
    for answer, why in ((PeerError("connection to dom0b timed out after 10s"), "connection to dom0b timed out after 10s"),
                        ("not json", "Expecting value: line 1 column 1 (char 0)"),
                        ('{"a": 1}', "not a list of runs")):
        checks = preflight.run_checks(c, [], local(fixtures), factory=lambda host, ssh: Peer(host, answer), now=NOW)
        out = lines(checks)
        assert f"WARN newest backups on dom0b: cannot ask it: {why}" in out
        assert out[-2:] == [
            "WARN web1: last OK backup (max_age 36h): no OK backup within 36h: newest OK 3d00h00m ago "
            "(2027-01-12T08:00:00Z, on dom0a)",
            "WARN idle1: last OK backup (max_age 36h): no OK backup within 36h: none recorded"]
        # idle1 runs on another Dom0 (the night skips it here): not a failure either
        assert "OK   idle1: eligible here: idle1: is shut off on dom0a, not running; nothing to back up here " \
               "(it is backed up by the Dom0 it runs on)" in out
        assert not any(x.startswith("FAIL") and "dom0b" not in x for x in out)


def test_a_night_with_nothing_to_back_up_is_a_failure_not_silence(tmp_path, fixtures):
    c = config(tmp_path, fixtures, "")
    out = lines(preflight.run_checks(c, [], local(fixtures), factory=lambda host, ssh: Peer(host, []), now=NOW))
    assert "FAIL DomUs the night backs up here: none: no [domu.NAME] section, and backup_all_running is false" in out
