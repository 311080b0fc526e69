"""Agent mode against libvirt's test driver (no daemon): fixtures/libvirt/freeze-node.xml holds
web1 (running: fsFreeze/fsThaw work) and db1 (shut off: they raise VIR_ERR_OPERATION_INVALID)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import time

import pytest

from domubackup.core import errors
from domubackup.jobs.freeze import FreezeSettings, agent_undo_argv, freeze_window

libvirt = pytest.importorskip("libvirt")

NODE = pathlib.Path(__file__).resolve().parents[2] / "fixtures" / "libvirt" / "freeze-node.xml"
URI = f"test://{NODE}"  # test:///ABS/PATH


@pytest.fixture(scope="module", autouse=True)
def quiet_libvirt():
    libvirt.registerErrorHandler(lambda ctx, err: None, None)
    yield


@pytest.fixture
def conn():
    c = libvirt.open(URI)
    yield c
    c.close()


class Journal:
    def __init__(self):
        self.steps, self.done_ = [], []

    def begin(self, step):
        self.steps.append(step)
        return len(self.steps) - 1

    def done(self, i):
        self.done_.append(i)


def test_running_domain_reaches_filesystem_level(conn):
    dom = conn.lookupByName("web1")
    j = Journal()

    def snapshot():
        time.sleep(0.05)
        assert dom.fsFreeze() == 0  # already frozen: the test driver freezes nothing more

    rep = freeze_window(FreezeSettings(mode="agent"), "web1", snapshot, runner=None, domain=dom,
                        journal=j)
    assert rep.level == "filesystem"
    assert rep.agent_frozen == 2 and rep.agent_thawed == 2
    assert rep.window_ms is not None and 50 <= rep.window_ms < 2000
    assert not rep.watchdog_fired and not rep.freeze_failed
    # the test driver has no agentSetResponseTimeout (VIR_ERR_NO_SUPPORT): noted, not fatal
    assert any("agent response timeout not set" in n for n in rep.notes)
    assert dom.fsThaw() == 0  # thawed: nothing left frozen
    # URI taken from the connection; the journal's undo is the virsh thaw
    assert j.steps[0].undo == tuple(agent_undo_argv(URI, "web1")) and j.done_ == [0]


def test_shut_off_domain_fails_with_policy_fail(conn):
    dom = conn.lookupByName("db1")
    snapped = []
    with pytest.raises(errors.FreezeError, match="agent freeze of db1 failed") as ei:
        freeze_window(FreezeSettings(mode="agent"), "db1", lambda: snapped.append(1), runner=None,
                      domain=dom, uri=URI)
    assert snapped == []
    assert ei.value.__cause__.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID
    rep = ei.value.report
    assert rep.level == "crash" and rep.freeze_failed
    # the rollback thaw was attempted and failed the same way: recorded, not hidden
    assert rep.thaw_failed and any("agent thaw of db1 failed" in n for n in rep.notes)


def test_shut_off_domain_goes_on_crash_consistent_with_continue(conn):
    dom = conn.lookupByName("db1")
    snapped = []
    rep = freeze_window(FreezeSettings(mode="agent", on_failure="continue"), "db1",
                        lambda: snapped.append(1), runner=None, domain=dom, uri=URI)
    assert snapped == [1]
    assert rep.level == "crash" and rep.freeze_failed and rep.window_ms is None
    assert "went on crash-consistent" in rep.summary


def test_already_frozen_domain_is_refused_and_thawed(conn):
    dom = conn.lookupByName("web1")
    assert dom.fsFreeze() == 2  # someone else froze it
    with pytest.raises(errors.FreezeError, match="froze 0 filesystems"):
        freeze_window(FreezeSettings(mode="agent"), "web1", lambda: None, runner=None, domain=dom)
    assert dom.fsThaw() == 0  # our rollback thawed it (always thaw after a failed freeze)


def test_watchdog_thaws_the_agent(conn):
    dom = conn.lookupByName("web1")
    state = {}

    def hanging_snapshot():
        time.sleep(0.4)
        state["frozen_again"] = dom.fsFreeze()  # 2: the watchdog had thawed everything
        dom.fsThaw()

    with pytest.raises(errors.FreezeError, match="freeze window exceeded 0.2s"):
        freeze_window(FreezeSettings(mode="agent", max_window=0.2), "web1", hanging_snapshot,
                      runner=None, domain=dom)
    assert state["frozen_again"] == 2


@pytest.mark.skipif(shutil.which("virsh") is None, reason="virsh not installed")
def test_journaled_undo_on_an_unfrozen_domain_is_harmless():
    # What `domubackup cleanup` sees when it replays an undo whose thaw already happened.
    r = subprocess.run(agent_undo_argv(URI, "web1"), capture_output=True, text=True, timeout=10)
    assert r.returncode == 0 and "Thawed 0 filesystem(s)" in r.stdout
    r = subprocess.run(agent_undo_argv(URI, "db1"), capture_output=True, text=True, timeout=10)
    assert r.returncode == 1 and "domain is not running" in r.stderr
