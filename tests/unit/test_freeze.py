"""Unit tests of domubackup.jobs.freeze with real tiny hook scripts and a subprocess-based fake Runner.

The fake implements the Runner interface of domubackup/runner.py (run(argv, *, timeout, ok_codes,
env, input, check) -> model.Result; CommandError on failure/timeout; kills the process group on
timeout) so these tests do not depend on that module.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import textwrap
import time

import pytest

from domubackup.core import errors, model
from domubackup.jobs import freeze
from domubackup.jobs.freeze import FreezeSettings, freeze_window, frozen

DOMU = "web1"
URI = "xen:///system"


class FakeRunner:
    host = model.LOCAL

    def __init__(self):
        self.calls: list[list[str]] = []

    def run(self, argv, *, timeout=None, ok_codes=(0,), env=None, input=None, check=True):
        argv = [str(a) for a in argv]
        self.calls.append(argv)
        t0 = time.monotonic()
        p = subprocess.Popen(argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            out, err = p.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            raise errors.CommandError(self.host, argv, None, err, timeout=timeout)
        res = model.Result(self.host, tuple(argv), p.returncode, out, err, time.monotonic() - t0)
        if check and p.returncode not in ok_codes:
            raise errors.CommandError(self.host, argv, p.returncode, err)
        return res


class FakeJournal:
    def __init__(self):
        self.events: list[tuple] = []
        self.steps: list[model.Step] = []

    def begin(self, step):
        self.steps.append(step)
        self.events.append(("begin", len(self.steps) - 1))
        return len(self.steps) - 1

    def done(self, i):
        self.events.append(("done", i))


class FakeDomain:
    """Just enough of virDomain; records into a shared event list."""

    def __init__(self, events, *, freeze_error=None, frozen_count=2):
        self.events = events
        self.freeze_error = freeze_error
        self.frozen_count = frozen_count
        self.timeouts = []

    def agentSetResponseTimeout(self, seconds, flags=0):
        self.timeouts.append(seconds)
        return 0

    def fsFreeze(self, mountpoints=None, flags=0):
        self.events.append(f"agent freeze {mountpoints}")
        if self.freeze_error:
            raise self.freeze_error
        return self.frozen_count

    def fsThaw(self, mountpoints=None, flags=0):
        self.events.append("agent thaw")
        return self.frozen_count


@pytest.fixture(params=["fake", "LocalRunner"])
def runner(request):
    """The fake above, and domubackup.hosts.runner.LocalRunner when it is there (minimal env, sh)."""
    if request.param == "fake":
        return FakeRunner()
    runner_mod = pytest.importorskip("domubackup.hosts.runner")
    return runner_mod.LocalRunner()


@pytest.fixture
def hookdir(tmp_path):
    d = tmp_path / "freeze.d"
    d.mkdir()
    return d


@pytest.fixture
def eventlog(tmp_path):
    return tmp_path / "events.log"


def make_hook(hookdir, eventlog, name, *, freeze_rc=0, thaw_rc=0, freeze_body="", mode=0o755):
    path = hookdir / name
    path.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "{name} $1 $DOMUBACKUP_DOMU $DOMUBACKUP_PHASE" >> {eventlog}
        echo "output of {name} $1"
        if [ "$1" = freeze ]; then
            {freeze_body or ':'}
            exit {freeze_rc}
        fi
        exit {thaw_rc}
        """))
    path.chmod(mode)
    return path


def events(eventlog):
    return eventlog.read_text().splitlines() if eventlog.exists() else []


def hooks_settings(hookdir, **kw):
    return FreezeSettings(mode="hooks", hook_dir=str(hookdir), **kw)


# --- settings, argv builders, hook discovery ----------------------------------------------

def test_settings_validate():
    with pytest.raises(errors.ConfigError):
        FreezeSettings(mode="guest")
    with pytest.raises(errors.ConfigError):
        FreezeSettings(on_failure="ignore")
    with pytest.raises(errors.ConfigError):
        FreezeSettings(max_window=0)
    s = FreezeSettings(mode="hooks+agent", agent_mountpoints=["/", "/var"])
    assert s.agent_mountpoints == ("/", "/var") and s.uses_hooks and s.uses_agent


def test_undo_argvs_are_exact():
    assert freeze.hook_undo_argv("web1", "/etc/domubackup/freeze.d/10-mysql") == [
        "env", "DOMUBACKUP_DOMU=web1", "DOMUBACKUP_PHASE=thaw",
        "/etc/domubackup/freeze.d/10-mysql", "thaw"]
    assert freeze.hook_argv("web1", pathlib.Path("/x/10-a"), "freeze") == [
        "env", "DOMUBACKUP_DOMU=web1", "DOMUBACKUP_PHASE=freeze", "/x/10-a", "freeze"]
    assert freeze.agent_undo_argv(URI, "web1") == ["virsh", "-c", URI, "domfsthaw", "web1"]
    assert freeze.agent_freeze_argv(URI, "web1", ("/", "/var")) == [
        "virsh", "-c", URI, "domfsfreeze", "web1", "--mountpoint", "/", "--mountpoint", "/var"]


def test_list_hooks_skips_and_logs(hookdir, eventlog, caplog):
    make_hook(hookdir, eventlog, "20-b")
    make_hook(hookdir, eventlog, "10-a")
    make_hook(hookdir, eventlog, "30-noexec", mode=0o644)
    for name in ("40-old~", "50-x.dpkg-old", "55-y.dpkg-dist", "60-z.disabled", ".hidden"):
        make_hook(hookdir, eventlog, name)
    (hookdir / "70-dir").mkdir()
    caplog.set_level("INFO", logger="domubackup.freeze")
    assert [p.name for p in freeze.list_hooks(hookdir)] == ["10-a", "20-b"]
    hooks, skipped = freeze.scan_hooks(hookdir)
    assert sorted(s.split(":")[0] for s in skipped) == sorted(
        ["30-noexec", "40-old~", "50-x.dpkg-old", "55-y.dpkg-dist", "60-z.disabled", ".hidden",
         "70-dir"])
    assert "30-noexec: not executable" in skipped
    assert "30-noexec" in caplog.text and "not executable" in caplog.text
    assert freeze.list_hooks(hookdir / "missing") == []


# --- hooks --------------------------------------------------------------------------------

def test_none_mode_runs_nothing():
    called = []
    rep = freeze_window(FreezeSettings(), DOMU, lambda: called.append(1), runner=None)
    assert called == [1]
    assert rep.level == "crash" and rep.window_ms is None and rep.hooks == []


def test_hooks_freeze_in_order_thaw_in_reverse(hookdir, eventlog, caplog, runner):
    for name in ("30-c", "10-a", "20-b"):
        make_hook(hookdir, eventlog, name)
    make_hook(hookdir, eventlog, "15-off", mode=0o644)
    caplog.set_level("INFO", logger="domubackup.freeze")

    def snap():
        with eventlog.open("a") as f:
            f.write("snapshot\n")
        time.sleep(0.05)

    rep = freeze_window(hooks_settings(hookdir), DOMU, snap, runner=runner)
    assert events(eventlog) == [
        "10-a freeze web1 freeze", "20-b freeze web1 freeze", "30-c freeze web1 freeze",
        "snapshot",
        "30-c thaw web1 thaw", "20-b thaw web1 thaw", "10-a thaw web1 thaw"]
    assert rep.level == "application"
    assert rep.mode == "hooks"
    assert rep.window_ms is not None and 50 <= rep.window_ms < 2000
    assert [(h.name, h.phase, h.exit_code) for h in rep.hooks] == [
        ("10-a", "freeze", 0), ("20-b", "freeze", 0), ("30-c", "freeze", 0),
        ("30-c", "thaw", 0), ("20-b", "thaw", 0), ("10-a", "thaw", 0)]
    assert rep.hooks[0].output_tail == "output of 10-a freeze"
    assert all(h.duration >= 0 for h in rep.hooks)
    assert rep.skipped_hooks == ["15-off: not executable"]
    assert not rep.watchdog_fired and not rep.freeze_failed
    assert "application-consistent" in rep.summary and "3 hook(s)" in rep.summary
    assert "hook 20-b freeze: output of 20-b freeze" in caplog.text  # output in the run log


def test_kth_failing_hook_thaws_1_to_k_in_reverse(hookdir, eventlog, runner):
    # Decision: the failing hook is thawed too (it may already hold locks) -- the field's rule.
    make_hook(hookdir, eventlog, "10-a")
    make_hook(hookdir, eventlog, "20-b")
    make_hook(hookdir, eventlog, "30-c", freeze_rc=3)
    make_hook(hookdir, eventlog, "40-d")
    snapped = []
    with pytest.raises(errors.FreezeError, match="freeze hook 30-c exited 3") as ei:
        freeze_window(hooks_settings(hookdir), DOMU, lambda: snapped.append(1), runner=runner)
    assert snapped == []
    assert [e.split()[0:2] for e in events(eventlog)] == [
        ["10-a", "freeze"], ["20-b", "freeze"], ["30-c", "freeze"],
        ["30-c", "thaw"], ["20-b", "thaw"], ["10-a", "thaw"]]
    rep = ei.value.report
    assert rep.freeze_failed and rep.level == "crash" and rep.window_ms is None
    assert "run failed" in rep.summary


def test_hanging_hook_is_killed_at_timeout_and_all_thawed(hookdir, eventlog, tmp_path, runner):
    pidfile = tmp_path / "hang.pid"
    make_hook(hookdir, eventlog, "10-a")
    make_hook(hookdir, eventlog, "20-hang", freeze_body=f"echo $$ > {pidfile}; exec sleep 30")
    t0 = time.monotonic()
    with pytest.raises(errors.FreezeError, match="20-hang timed out after 0.4s") as ei:
        freeze_window(hooks_settings(hookdir, hook_timeout=0.4), DOMU, lambda: None,
                      runner=runner)
    assert time.monotonic() - t0 < 3
    hang = [h for h in ei.value.report.hooks if h.name == "20-hang" and h.phase == "freeze"][0]
    assert hang.timed_out and hang.exit_code is None
    with pytest.raises(ProcessLookupError):
        os.kill(int(pidfile.read_text()), 0)
    assert [e.split()[0:2] for e in events(eventlog)] == [
        ["10-a", "freeze"], ["20-hang", "freeze"], ["20-hang", "thaw"], ["10-a", "thaw"]]


def test_watchdog_thaws_while_snapshot_still_runs(hookdir, eventlog):
    make_hook(hookdir, eventlog, "10-a")
    make_hook(hookdir, eventlog, "20-b")
    seen = {}

    def slow_snapshot():
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3:  # a hanging snapshot command
            if "10-a thaw web1 thaw" in events(eventlog):
                seen["thawed_after"] = time.monotonic() - t0
                break
            time.sleep(0.02)
        time.sleep(0.1)  # still "running" after the watchdog's thaw

    with pytest.raises(errors.FreezeError) as ei:
        freeze_window(hooks_settings(hookdir, max_window=0.3), DOMU, slow_snapshot,
                      runner=FakeRunner())
    assert str(ei.value).startswith("freeze window exceeded 0.3s; guest thawed by the watchdog")
    assert 0.25 <= seen["thawed_after"] < 2  # thawed by the watchdog, during the snapshot
    rep = ei.value.report
    assert rep.watchdog_fired and rep.level == "crash"
    # exactly one thaw per frozen hook, although the normal path tried too
    assert [e.split()[0:2] for e in events(eventlog)] == [
        ["10-a", "freeze"], ["20-b", "freeze"], ["20-b", "thaw"], ["10-a", "thaw"]]
    assert 300 <= rep.window_ms < 2000


def test_snapshot_error_propagates_after_thaw(hookdir, eventlog):
    make_hook(hookdir, eventlog, "10-a")

    def boom():
        raise errors.SnapshotError("lvcreate failed")

    with pytest.raises(errors.SnapshotError):
        freeze_window(hooks_settings(hookdir), DOMU, boom, runner=FakeRunner())
    assert [e.split()[0:2] for e in events(eventlog)] == [["10-a", "freeze"], ["10-a", "thaw"]]


def test_failed_thaw_raises_after_snapshot(hookdir, eventlog):
    make_hook(hookdir, eventlog, "10-a")
    make_hook(hookdir, eventlog, "20-b", thaw_rc=1)
    with pytest.raises(errors.FreezeError, match="thaw hook 20-b exited 1") as ei:
        freeze_window(hooks_settings(hookdir), DOMU, lambda: None, runner=FakeRunner())
    # 10-a is thawed despite the failure of 20-b
    assert events(eventlog)[-1].startswith("10-a thaw")
    assert ei.value.report.thaw_failed and "THAW FAILED" in ei.value.report.summary


def test_continue_policy_goes_on_crash_consistent(hookdir, eventlog):
    make_hook(hookdir, eventlog, "10-a")
    make_hook(hookdir, eventlog, "20-b", freeze_rc=1)
    snapped = []
    rep = freeze_window(hooks_settings(hookdir, on_failure="continue"), DOMU,
                        lambda: snapped.append(events(eventlog)[-1]), runner=FakeRunner())
    assert snapped == ["10-a thaw web1 thaw"]  # snapshots only after everything was thawed
    assert rep.level == "crash" and rep.freeze_failed and rep.window_ms is None
    assert "went on crash-consistent" in rep.summary


def test_continue_policy_does_not_hide_a_watchdog_timeout(hookdir, eventlog):
    make_hook(hookdir, eventlog, "10-a")
    with pytest.raises(errors.FreezeError, match="watchdog"):
        freeze_window(hooks_settings(hookdir, on_failure="continue", max_window=0.1), DOMU,
                      lambda: time.sleep(0.3), runner=FakeRunner())


def test_no_hooks_is_not_application_level(hookdir):
    rep = freeze_window(hooks_settings(hookdir), DOMU, lambda: None, runner=FakeRunner())
    assert rep.level == "crash" and rep.notes == [f"no hook scripts in {hookdir}"]


# --- journal --------------------------------------------------------------------------------

def test_journal_gets_each_freeze_with_its_undo(hookdir, eventlog):
    a = make_hook(hookdir, eventlog, "10-a")
    b = make_hook(hookdir, eventlog, "20-b", freeze_rc=1)
    j = FakeJournal()
    with pytest.raises(errors.FreezeError):
        freeze_window(hooks_settings(hookdir), DOMU, lambda: None, runner=FakeRunner(), journal=j)
    assert j.events == [("begin", 0), ("done", 0), ("begin", 1)]  # 20-b never done: stays journaled
    assert j.steps == [
        model.Step(phase="freeze", host=model.LOCAL,
                   argv=("env", "DOMUBACKUP_DOMU=web1", "DOMUBACKUP_PHASE=freeze", str(a), "freeze"),
                   undo=("env", "DOMUBACKUP_DOMU=web1", "DOMUBACKUP_PHASE=thaw", str(a), "thaw"),
                   note="freeze hook 10-a"),
        model.Step(phase="freeze", host=model.LOCAL,
                   argv=("env", "DOMUBACKUP_DOMU=web1", "DOMUBACKUP_PHASE=freeze", str(b), "freeze"),
                   undo=("env", "DOMUBACKUP_DOMU=web1", "DOMUBACKUP_PHASE=thaw", str(b), "thaw"),
                   note="freeze hook 20-b"),
    ]


def test_journal_and_order_with_hooks_and_agent(hookdir, eventlog):
    make_hook(hookdir, eventlog, "10-a")
    ev: list[str] = []
    dom = FakeDomain(ev)
    j = FakeJournal()

    class LoggingRunner(FakeRunner):
        def run(self, argv, **kw):
            ev.append("hook " + argv[-1])
            return super().run(argv, **kw)

    s = FreezeSettings(mode="hooks+agent", hook_dir=str(hookdir), agent_timeout=7,
                       agent_mountpoints=("/",))
    rep = freeze_window(s, DOMU, lambda: ev.append("snapshot"), runner=LoggingRunner(),
                        domain=dom, uri=URI, journal=j)
    assert ev == ["hook freeze", "agent freeze ['/']", "snapshot", "agent thaw", "hook thaw"]
    assert dom.timeouts == [7]
    assert j.events == [("begin", 0), ("done", 0), ("begin", 1), ("done", 1)]
    assert j.steps[1] == model.Step(
        phase="freeze", host=model.LOCAL,
        argv=("virsh", "-c", URI, "domfsfreeze", "web1", "--mountpoint", "/"),
        undo=("virsh", "-c", URI, "domfsthaw", "web1"), note="guest agent fsfreeze")
    assert rep.level == "application" and rep.agent_frozen == 2 and rep.agent_thawed == 2


# --- agent (fake domain; the real test driver is in tests/integration) ----------------------

class AgentError(Exception):
    def get_error_code(self):
        return 86  # VIR_ERR_AGENT_UNRESPONSIVE


def test_agent_failure_still_thaws(tmp_path):
    ev: list[str] = []
    dom = FakeDomain(ev, freeze_error=AgentError("Guest agent is not responding"))
    j = FakeJournal()
    with pytest.raises(errors.FreezeError, match="agent freeze of web1 failed") as ei:
        freeze_window(FreezeSettings(mode="agent"), DOMU, lambda: ev.append("snapshot"),
                      runner=None, domain=dom, uri=URI, journal=j)
    assert ev == ["agent freeze None", "agent thaw"]
    assert j.events == [("begin", 0)]
    assert ei.value.report.level == "crash"


def test_agent_zero_filesystems_is_a_failure_and_continue_goes_on():
    ev: list[str] = []
    rep = freeze_window(FreezeSettings(mode="agent", on_failure="continue"), DOMU,
                        lambda: ev.append("snapshot"), runner=None,
                        domain=FakeDomain(ev, frozen_count=0), uri=URI)
    assert ev == ["agent freeze None", "agent thaw", "snapshot"]
    assert rep.level == "crash" and rep.freeze_failed and "0 filesystems" in rep.error


def test_agent_mode_filesystem_level_and_missing_timeout_setter():
    ev: list[str] = []

    class OldDomain(FakeDomain):
        agentSetResponseTimeout = None  # libvirt-python older than 5.10

    rep = freeze_window(FreezeSettings(mode="agent"), DOMU, lambda: ev.append("snapshot"),
                        runner=None, domain=OldDomain(ev), uri=URI)
    assert ev == ["agent freeze None", "snapshot", "agent thaw"]
    assert rep.level == "filesystem" and rep.window_ms is not None
    assert any("agentSetResponseTimeout unavailable" in n for n in rep.notes)


def test_watchdog_and_normal_thaw_race_thaws_once():
    # Window and max_window about equal: whoever wins, the agent is thawed exactly once.
    for _ in range(5):
        ev: list[str] = []
        try:
            freeze_window(FreezeSettings(mode="agent", max_window=0.05), DOMU,
                          lambda: time.sleep(0.05), runner=None, domain=FakeDomain(ev), uri=URI)
        except errors.FreezeError as e:
            assert e.report.watchdog_fired
        assert ev.count("agent thaw") == 1


def test_frozen_context_manager_gives_report_while_frozen(hookdir, eventlog):
    make_hook(hookdir, eventlog, "10-a")
    with frozen(hooks_settings(hookdir), DOMU, runner=FakeRunner()) as rep:
        assert events(eventlog) == ["10-a freeze web1 freeze"]
        assert rep.window_ms is None
    assert rep.window_ms is not None and rep.level == "application"
    assert rep.to_json()["summary"] == rep.summary


# --- the example hook scripts in conf/freeze.d --------------------------------------------

CONF = pathlib.Path(__file__).resolve().parents[2] / "conf" / "freeze.d"


@pytest.fixture
def fake_guest(tmp_path, monkeypatch):
    """A fake `ssh GUEST CMD` (runs CMD locally) and a fake mysql client on PATH."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "fakessh").write_text('#!/bin/sh\nshift\nexec sh -c "$*"\n')
    state = tmp_path / "mysql.state"
    (bindir / "mysql").write_text(textwrap.dedent(f"""\
        #!/bin/sh
        while IFS= read -r line; do
            case "$line" in
                "FLUSH TABLES WITH READ LOCK;") echo locked >> {state} ;;
                "UNLOCK TABLES;") echo unlocked >> {state} ;;
                "SELECT '"*) v=${{line#SELECT \\'}}; echo "${{v%\\';}}" ;;
            esac
        done
        echo eof >> {state}
        """))
    for f in bindir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("DOMUBACKUP_GUEST_SSH", f"{bindir / 'fakessh'} guest")
    monkeypatch.setenv("DOMUBACKUP_RUN_DIR", str(tmp_path / "run"))
    return state


def run_example(name, phase, **env):
    return subprocess.run([str(CONF / name), phase], capture_output=True, text=True, timeout=10,
                          env={**os.environ, "DOMUBACKUP_DOMU": DOMU, "DOMUBACKUP_PHASE": phase,
                               **env})


def test_mysql_example_holds_the_lock_between_freeze_and_thaw(fake_guest, tmp_path):
    present = {"DOMUBACKUP_MYSQL_PRESENT": "command -v mysql"}
    r = run_example("mysql.example", "freeze", **present)  # returns although the session lives on
    assert r.returncode == 0, r.stdout + r.stderr
    assert "read-locked" in r.stdout
    run = tmp_path / "run" / "mysql-web1"
    session = int((run / "session.pid").read_text())
    os.kill(session, 0)  # the client session is still open: the lock is held
    assert fake_guest.read_text().splitlines() == ["locked"]
    r = run_example("mysql.example", "thaw", **present)
    assert r.returncode == 0, r.stdout + r.stderr
    assert fake_guest.read_text().splitlines() == ["locked", "unlocked", "eof"]
    assert not run.exists()
    r = run_example("mysql.example", "thaw", **present)  # idempotent (cleanup replay)
    assert r.returncode == 0 and "nothing frozen" in r.stdout


def test_mysql_example_thaw_after_the_session_died(fake_guest, tmp_path):
    present = {"DOMUBACKUP_MYSQL_PRESENT": "command -v mysql"}
    assert run_example("mysql.example", "freeze", **present).returncode == 0
    run = tmp_path / "run" / "mysql-web1"
    os.killpg(int((run / "session.pid").read_text()), signal.SIGKILL)  # ssh/mysql gone
    t0 = time.monotonic()
    r = run_example("mysql.example", "thaw", **present)
    assert r.returncode == 0 and time.monotonic() - t0 < 2, r.stdout + r.stderr
    assert not run.exists()


def test_mysql_example_through_freeze_window(fake_guest, tmp_path, runner):
    # The real contract: run by freeze.py through a Runner that waits for EOF on stdout/stderr
    # and (LocalRunner) gives the hook a minimal environment: settings come from a wrapper,
    # as a site would do in the installed copy or in /etc/domubackup/hooks.conf.
    hookdir = tmp_path / "freeze.d"
    hookdir.mkdir()
    exports = "".join(f"export {k}='{os.environ[k]}'\n" for k in
                      ("PATH", "DOMUBACKUP_GUEST_SSH", "DOMUBACKUP_RUN_DIR"))
    for name, extra in (("20-mysql", "export DOMUBACKUP_MYSQL_PRESENT='command -v mysql'\n"),
                        ("30-postgresql", "export DOMUBACKUP_PSQL_PRESENT=false\n")):
        example = CONF / (name[3:] + ".example")
        (hookdir / name).write_text(f'#!/bin/sh\n{exports}{extra}exec {example} "$@"\n')
        (hookdir / name).chmod(0o755)
    seen = []
    s = FreezeSettings(mode="hooks", hook_dir=str(hookdir), hook_timeout=5)
    rep = freeze_window(s, DOMU, lambda: seen.append(fake_guest.read_text().split()), runner=runner)
    assert seen == [["locked"]]
    assert fake_guest.read_text().split() == ["locked", "unlocked", "eof"]
    assert rep.level == "application"
    assert [(h.name, h.phase, h.exit_code) for h in rep.hooks] == [
        ("20-mysql", "freeze", 0), ("30-postgresql", "freeze", 0),
        ("30-postgresql", "thaw", 0), ("20-mysql", "thaw", 0)]
    assert all(h.duration < 2 for h in rep.hooks)  # the background session did not stall them


def test_examples_read_the_site_file(fake_guest, tmp_path):
    conf = tmp_path / "hooks.conf"
    conf.write_text('case $DOMUBACKUP_DOMU in web1) DOMUBACKUP_PSQL_PRESENT=true;'
                    ' DOMUBACKUP_PSQL_CMD="echo from-site-file" ;; esac\n')
    r = run_example("postgresql.example", "freeze", DOMUBACKUP_HOOK_CONF=str(conf))
    assert r.returncode == 0 and "from-site-file" in r.stdout, r.stdout + r.stderr


def test_examples_exit_0_when_the_application_is_absent(fake_guest):
    for name in ("mysql.example", "postgresql.example"):
        r = run_example(name, "freeze", DOMUBACKUP_MYSQL_PRESENT="false",
                        DOMUBACKUP_PSQL_PRESENT="false")
        assert r.returncode == 0 and "nothing to" in r.stdout, (name, r.stdout, r.stderr)
        r = run_example(name, "thaw")
        assert r.returncode == 0


def test_examples_fail_when_the_guest_is_unreachable(fake_guest):
    dead = fake_guest.parent / "bin" / "deadssh"
    dead.write_text("#!/bin/sh\necho 'ssh: connect to host guest port 22: No route to host' >&2\n"
                    "exit 255\n")
    dead.chmod(0o755)
    for name in ("mysql.example", "postgresql.example"):
        r = run_example(name, "freeze", DOMUBACKUP_GUEST_SSH=f"{dead} guest")
        assert r.returncode == 1 and "cannot reach" in r.stdout, (name, r.stdout)


def test_postgresql_example_checkpoint(fake_guest):
    r = run_example("postgresql.example", "freeze", DOMUBACKUP_PSQL_PRESENT="true",
                    DOMUBACKUP_PSQL_CMD="echo CHECKPOINT")
    assert r.returncode == 0 and "CHECKPOINT done" in r.stdout
    r = run_example("postgresql.example", "freeze", DOMUBACKUP_PSQL_PRESENT="true",
                    DOMUBACKUP_PSQL_CMD="exit 2")
    assert r.returncode == 0 and "not reachable" in r.stdout
    r = run_example("postgresql.example", "freeze", DOMUBACKUP_PSQL_PRESENT="true",
                    DOMUBACKUP_PSQL_CMD="exit 1")
    assert r.returncode == 1


def test_window_log_records_are_written_after_the_thaw(hookdir, eventlog):
    import logging
    from test_logs import ListHandler
    make_hook(hookdir, eventlog, "10-db")
    pkg = logging.getLogger("domubackup")
    seen, level = ListHandler(), pkg.level
    pkg.addHandler(seen)
    pkg.setLevel(logging.DEBUG)
    try:
        def snapshot():
            logging.getLogger("domubackup.pipeline").info("snapshot taken")
            assert not any("snapshot taken" in line for line in seen.lines)  # held while frozen
        report = freeze_window(FreezeSettings(mode="hooks", hook_dir=str(hookdir)), "web1", snapshot,
                               runner=FakeRunner())
    finally:
        pkg.removeHandler(seen)
        pkg.setLevel(level)
    assert report.level == "application"
    order = [next(i for i, line in enumerate(seen.lines) if want in line)
             for want in ("freeze: end", "snapshot taken", "thaw (end of window)", "thaw: end; window")]
    assert order == sorted(order)
