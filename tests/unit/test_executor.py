"""The executor against scripted hosts: lanes at once, marks between them, decisions, checks,
the first failure stopping every lane, teardown of each lane in reverse, a stuck plan."""

import threading
import time

import pytest

from domubackup.core.errors import CommandError, PeerError, PeerRefused
from domubackup.core.model import LOCAL, Step
from domubackup.hosts.journal import Journal
from domubackup.hosts.runner import Runner
from domubackup.jobs.executor import Executor


class Host(Runner):
    """Records (host, argv) in a shared log; `fail` names an argv that exits 1; `gate` an argv
    that waits (at most 5 s) for an event before it runs."""

    def __init__(self, name, log, fail=None, gate=None, failed=None, started=None):
        super().__init__(name)
        self.log, self.fail, self.gate, self.failed, self.started = log, fail, gate or {}, failed, started or {}

    def _execute(self, argv, env, input, timeout):
        if argv in self.started:
            self.started[argv].set()
        if argv in self.gate:
            self.gate[argv].wait(5)
        self.log.append((self.host, argv))
        if argv == self.fail:
            if self.failed is not None:
                self.failed.set()
            return 1, "", "injected"
        return 0, " ".join(argv), ""


def opened(host, name, **kw):
    return Step("open", host, ("open", name), ("close", name), **kw)


def executor(tmp_path, hosts, **kw):
    journal = Journal.create(tmp_path, "web1", "dom0b")
    return Executor(journal, hosts, timeout=10, **kw)


def test_lanes_meet_at_marks_and_close_in_reverse_each(tmp_path):
    log = []
    hosts = {LOCAL: Host("dom0a", log), "dom0b": Host("dom0b", log)}
    ex = executor(tmp_path, hosts)
    steps = [opened(LOCAL, "a1", mark="a1"), opened(LOCAL, "a2", waits=("b1",)),
             opened("dom0b", "b1", waits=("a1",), mark="b1"), opened("dom0b", "b2")]
    with ex.closing():
        ex.run(steps)
    assert log.index(("dom0a", ("open", "a1"))) < log.index(("dom0b", ("open", "b1"))) \
        < log.index(("dom0a", ("open", "a2")))
    assert [a for h, a in log if h == "dom0a"][-2:] == [("close", "a2"), ("close", "a1")]
    assert [a for h, a in log if h == "dom0b"][-2:] == [("close", "b2"), ("close", "b1")]
    assert Journal.load(tmp_path, "web1") is None


def test_a_decision_adds_the_steps_it_found_to_any_lane(tmp_path):
    log = []
    hosts = {LOCAL: Host("dom0a", log), "dom0b": Host("dom0b", log)}

    def decide(step, res):
        assert res.stdout == "read fstab"
        return [opened(LOCAL, "var"), opened("dom0b", "var")]
    ex = executor(tmp_path, hosts, callbacks={"fstab": decide})
    with ex.closing():
        ex.run([opened(LOCAL, "root"), Step("inspect", LOCAL, ("read", "fstab"), then="fstab"),
                opened("dom0b", "root")])
    assert ("dom0b", ("open", "var")) in log and log.index(("dom0a", ("read", "fstab"))) < log.index(
        ("dom0b", ("open", "var")))


def test_a_decisions_mark_is_reached_once_the_steps_it_added_to_its_lane_are_done(tmp_path):
    # dom0b decides two more steps of its own; dom0a waits for the decision's mark: it must
    # run after both (the room they make), not after the read
    log = []

    class Slow:  # p2 takes a while: a mark reached too early lets dom0a run first
        def wait(self, timeout):
            time.sleep(0.2)
    hosts = {LOCAL: Host("dom0a", log), "dom0b": Host("dom0b", log, gate={("grow", "p2"): Slow()})}
    ex = executor(tmp_path, hosts, callbacks={"size": lambda step, res: [
        Step("grow", "dom0b", ("grow", "p1"), None), Step("grow", "dom0b", ("grow", "p2"), None)]})
    with ex.closing():
        ex.run([Step("size", "dom0b", ("list", "points"), None, then="size", mark="sized"),
                opened(LOCAL, "transfer", waits=("sized",))])
    assert log.index(("dom0b", ("grow", "p2"))) < log.index(("dom0a", ("open", "transfer")))
    # a decision that adds nothing to its lane reaches its mark at once
    log.clear()
    ex = executor(tmp_path, hosts, callbacks={"size": lambda step, res: []})
    with ex.closing():
        ex.run([Step("size", "dom0b", ("list", "points"), None, then="size", mark="sized"),
                opened(LOCAL, "transfer", waits=("sized",))])
    assert ("dom0a", ("open", "transfer")) in log


def test_the_first_failure_stops_every_lane_and_everything_opened_is_closed(tmp_path):
    # dom0b's b2 fails while dom0a runs a2 (it waits for that failure): dom0a opens nothing
    # more, dom0b neither; every step opened (and the one that failed: it may have opened
    # something before it failed) is closed, each lane in reverse
    log = []
    failed, a2 = threading.Event(), threading.Event()

    class PeerLaneOver:  # a2 ends once dom0b's lane has stopped (its failure is recorded then)
        def wait(self, timeout):
            deadline = time.monotonic() + timeout
            while any(t.name == "lane-dom0b" for t in threading.enumerate()) and time.monotonic() < deadline:
                time.sleep(0.01)
    hosts = {LOCAL: Host("dom0a", log, gate={("open", "a2"): PeerLaneOver()}, started={("open", "a2"): a2}),
             "dom0b": Host("dom0b", log, fail=("open", "b2"), failed=failed, gate={("open", "b2"): a2})}
    ex = executor(tmp_path, hosts)
    with pytest.raises(CommandError, match="injected"):
        with ex.closing():
            ex.run([opened(LOCAL, "a1"), opened(LOCAL, "a2"), opened(LOCAL, "a3"),
                    opened("dom0b", "b1"), opened("dom0b", "b2", mark="x"), opened("dom0b", "b3")])
    assert ("dom0a", ("open", "a3")) not in log and ("dom0b", ("open", "b3")) not in log
    for host in ("dom0a", "dom0b"):
        opens = [a[1] for h, a in log if h == host and a[0] == "open"]
        assert [a for h, a in log if h == host and a[0] == "close"] == [("close", n) for n in reversed(opens)]
    assert failed.is_set() and ("dom0a", ("open", "a2")) in log


def test_a_step_the_peer_refused_never_ran_so_it_is_not_undone(tmp_path):
    # an append-only peer's serve refuses the prune mark: its undo (finishing the removal,
    # also refused) is not tried, the steps before it still close, no journal entry is left
    log = []

    class Serving(Host):
        def _execute(self, argv, env, input, timeout):
            if argv == ("open", "b2"):
                raise PeerRefused("dom0b refused `open b2`: dom0a may not prune restore points")
            return super()._execute(argv, env, input, timeout)
    ex = executor(tmp_path, {LOCAL: Host("dom0a", log), "dom0b": Serving("dom0b", log)})
    with pytest.raises(PeerRefused, match="may not prune"):
        with ex.closing():
            ex.run([opened("dom0b", "b1"), opened("dom0b", "b2"), opened("dom0b", "b3")])
    assert log == [("dom0b", ("open", "b1")), ("dom0b", ("close", "b1"))]
    assert not (tmp_path / "journal" / "web1.json").exists()


def test_a_check_that_fails_on_a_peer_opens_nothing_after_it(tmp_path):
    log = []
    hosts = {LOCAL: Host("dom0a", log), "dom0b": Host("dom0b", log)}

    def refuse(step):
        raise PeerError("web1 is running on dom0b")
    ex = executor(tmp_path, hosts, checks={"peer-state": refuse})
    with pytest.raises(PeerError):
        with ex.closing():
            ex.run([opened(LOCAL, "a1", waits=("checked",)),
                    Step("check", "dom0b", (), check=("peer-state",), mark="checked"), opened("dom0b", "b1")])
    assert log == []


def test_a_plan_that_waits_for_a_mark_nothing_reaches_fails_instead_of_hanging(tmp_path):
    log = []
    ex = executor(tmp_path, {LOCAL: Host("dom0a", log), "dom0b": Host("dom0b", log)})
    with pytest.raises(RuntimeError, match=r"the plan of web1 is stuck: \{'local': \['never'\]\}"):
        with ex.closing():
            ex.run([opened(LOCAL, "a1"), opened(LOCAL, "a2", waits=("never",)), opened("dom0b", "b1")])
    assert [a for h, a in log if h == "dom0a"] == [("open", "a1"), ("close", "a1")]
