"""The one executor: runs any plan (plan.py) on its hosts, and nothing else knows how steps run.

One lane per host: this host's in the calling thread (signals arrive there), each peer's in a
thread of its own, all at once. A lane runs its steps in order; a step first waits for the
marks it names (reached by steps of other lanes). Every step that opens something is written
to the journal before it runs. A decision step's callback (``then``) returns the steps that
follow from what it read; a lane whose steps are all run waits while a decision is still to
come. The first failure stops every lane at its next step; the caller then tears the journal
down (each host in reverse, the hosts at once). A decision's mark is reached once the last
step it added to its own lane is done (the steps it decided belong to it).

Neighbouring safepath mounts of one tree on one lane run as one helper command (commands.
batch_key), journaled before it like a single step. With a ``freeze`` window, the snapshot
steps of this host's lane are journaled at once and run inside it (nothing else runs while the
guest is frozen), then the journal's freeze entries are closed."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import replace

from ..core import commands as cmd, parsers
from ..core.errors import CommandError, PeerRefused, TeardownError
from ..core.model import LOCAL, Step

log = logging.getLogger("domubackup")

PAUSE_ENV = "DOMUBACKUP_TEST_PAUSE"


class Executor:
    """``checks[name](step)`` carries out a check step (raises when it fails); ``callbacks
    [name](step, result)`` judges a ``then`` step's result and returns further steps (or
    None); ``freeze(open_fn)`` is the freeze window around the snapshots; ``on_output(step)``
    may give a display for a step's output; ``feed(step)`` its standard input (an iterable of
    chunks: a seed's blocks); ``on_mark[mark]()`` runs when a mark is reached."""

    def __init__(self, journal, runners: dict, *, timeout: float, checks=None, callbacks=None,
                 freeze=None, on_output=None, feed=None, on_mark=None):
        self.journal, self.runners, self.timeout = journal, runners, timeout
        self.checks, self.callbacks = checks or {}, callbacks or {}
        self.freeze, self.on_output, self.feed, self.on_mark = freeze, on_output, feed, on_mark or {}
        self.space: dict[tuple[str, str, str], object] = {}  # (host, tree, path) -> Space told by a mount
        self.freeze_report = None
        self._cond = threading.Condition()
        self._lanes: dict[str, deque] = {}
        self._marks: set[str] = set()
        self._deciding = 0  # `then` steps still to run: their callbacks may add steps to any lane
        self._failure: BaseException | None = None
        self._paused: set[str] = set()
        self._running = False
        self._inside = 0  # lanes inside a step now

    # --- the lanes ------------------------------------------------------------------------

    def run(self, steps) -> None:
        """Run ``steps`` (and those their decisions add); raise the first failure once every
        lane has stopped."""
        self._add(steps)
        self._lanes.setdefault(LOCAL, deque())
        self._running = True
        threads = [threading.Thread(target=self._lane, args=(h,), name=f"lane-{h}", daemon=True)
                   for h in self._lanes if h != LOCAL]
        for t in threads:
            t.start()
        try:
            self._lane(LOCAL)
        finally:
            for t in threads:
                t.join()
        if self._failure is not None:
            raise self._failure

    @contextmanager
    def closing(self):
        """Tear the journal down at the end, on every host, whatever happened inside; a failed
        teardown is raised (it is more serious than any other error) and tells the cause too."""
        failure = None
        try:
            yield self
        except Exception as e:
            failure = e
            raise
        finally:
            try:
                self.journal.teardown(self.runners)
            except TeardownError as e:
                e.after = str(failure) if failure is not None else None
                raise

    def _add(self, steps) -> None:
        with self._cond:
            for step in steps:
                if step.host not in self._lanes and self._running:
                    raise ValueError(f"a decision added a step on {step.host!r}, which has no lane in this plan")
                self._lanes.setdefault(step.host, deque()).append(step)
                self._deciding += bool(step.then and step.then in self.callbacks)
            self._cond.notify_all()

    def _next(self, host: str) -> list[Step] | None:
        """The next step of HOST's lane (with the mounts batched with it), once its marks are
        reached; None when the lane is over (or a lane failed)."""
        with self._cond:
            lane = self._lanes.setdefault(host, deque())
            while self._failure is None and self._blocked(lane):
                if not self._inside and not any(q and not self._blocked(q) for q in self._lanes.values()):
                    # no step runs and none can start: what the lanes wait for will never come
                    waits = {h: sorted(set(q[0].waits) - self._marks) for h, q in self._lanes.items() if q}
                    self._failure = RuntimeError(f"the plan of {self.journal.domu} is stuck: {waits or 'decisions'} "
                                                 "can never be reached (a planner bug)")
                    self._cond.notify_all()
                    break
                self._cond.wait()
            if self._failure is not None or not lane:
                return None
            group = [lane.popleft()]
            key = _mount_key(group[0])
            while key is not None and lane and _mount_key(lane[0]) == key and not lane[0].waits \
                    and not group[-1].mark:
                group.append(lane.popleft())
            self._inside += 1
            return group

    def _blocked(self, lane) -> bool:
        """A lane waits: for a decision that may give it steps, or for its next step's marks."""
        return not lane and self._deciding > 0 or bool(lane) and not self._marks.issuperset(lane[0].waits)

    def _lane(self, host: str) -> None:
        try:
            while True:
                group = self._next(host)
                if group is None:
                    return
                failure = None
                try:
                    done = self._do(group)
                    if done[-1].mark:
                        self._reach(done[-1].mark)
                except BaseException as e:  # noqa: BLE001 - recorded below, with the step's end
                    failure = e
                with self._cond:  # one atomic change: no lane may see "nothing runs" before the failure
                    self._inside -= 1
                    if failure is not None and self._failure is None:
                        self._failure = failure
                    self._cond.notify_all()
                if failure is not None:
                    return
        except BaseException as e:  # noqa: BLE001 - the first failure ends every lane; run() raises it
            with self._cond:
                if self._failure is None:
                    self._failure = e
                self._cond.notify_all()

    def _reach(self, mark: str) -> None:
        if mark in self.on_mark:
            self.on_mark[mark]()
        with self._cond:
            self._marks.add(mark)
            self._cond.notify_all()

    # --- one step ---------------------------------------------------------------------------

    def _do(self, group: list[Step]) -> list[Step]:
        """Run a step (or a batch of mounts); returns the steps done."""
        step = group[0]
        if step.phase == "snapshot" and self.freeze is not None:
            return self._frozen(step)  # (its test pause is inside the window)
        self._pause(step.phase)
        if step.check:
            self.checks[step.check[0]](step)
        elif len(group) > 1:
            recorded = self.journal.begin_many(group)
            with self._refused(recorded):
                res = self.runners[step.host].run(cmd.batched([s.argv for s in group]), timeout=self.timeout)
            self.journal.done_many(recorded)
            self._note_space(step.host, [s.argv for s in group], res.stdout)
        elif step.then:
            res = self._run(step, check=False)
            more = list((self.callbacks[step.then](step, res) if step.then in self.callbacks else None) or ())
            own = [i for i, s in enumerate(more) if s.host == step.host]
            if step.mark and own:  # the decision's mark is reached once what it added to its lane is done
                more[own[-1]] = replace(more[own[-1]], mark=step.mark)
                group = [replace(step, mark="")]
            with self._cond:
                self._deciding -= step.then in self.callbacks
            self._add(more)
        elif step.undo is None:
            self._run(step)
        else:
            i = self.journal.begin(step)
            with self._refused([i]):
                res = self._run(step)
            self.journal.done(i)
            self._note_space(step.host, [step.argv], res.stdout)
        if step.closes is not None and len(group) == 1:  # it succeeded (a callback judged it so)
            self.journal.closed(step.host, step.closes)
        return group

    @contextmanager
    def _refused(self, recorded):
        """A step the peer's `domubackup serve` refused never ran: nothing of it to undo."""
        try:
            yield
        except PeerRefused:
            for i in recorded:
                self.journal.undone(i)
            raise

    def _run(self, step: Step, check: bool = True):
        display = self.on_output(step) if self.on_output is not None else None
        data = self.feed(step) if self.feed is not None else None
        return self.runners[step.host].run(step.argv, timeout=step.timeout or self.timeout, check=check,
                                           on_output=display, input=data)

    def _frozen(self, first: Step) -> list[Step]:
        """The snapshot steps of this lane: journaled with one write, then only the commands run,
        inside the freeze window; a crash leaves pending entries whose lvremove finds nothing."""
        lane = self._lanes[first.host]
        snaps = [first]
        with self._cond:
            while lane and lane[0].phase == "snapshot" and not lane[0].waits and not snaps[-1].mark:
                snaps.append(lane.popleft())
        recorded = self.journal.begin_many(snaps)

        def open_snapshots():
            for s in snaps:
                self._pause(s.phase)
                self.runners[s.host].run(s.argv, timeout=self.timeout)
        try:
            self.freeze_report = self.freeze(open_snapshots, self.journal)
        except Exception as e:
            self.freeze_report = getattr(e, "report", None)
            raise
        self.journal.done_many(recorded)
        self.journal.close_phase("freeze")  # thawed: the teardown has nothing to thaw
        return snaps

    def _note_space(self, host, argvs, stdout) -> None:
        """Keep what the mounts of ARGVS (mount-in of one tree) said of their filesystems' space."""
        if argvs[0][:2] != (cmd.HELPER, "mount-in"):
            return
        tree, paths = cmd.batch_key(argvs[0])[0][-1], [cmd.batch_key(a)[1][0] for a in argvs]
        try:
            figures = parsers.parse_mount_space(stdout, paths)
        except ValueError as e:
            raise CommandError(host, argvs[0], 0, str(e), hint="the helper on that host is not this version of "
                                                               "domubackup: install the same version there") from None
        for path, space in zip(paths, figures):
            if space is not None:
                self.space[(host, tree, path)] = space

    def _pause(self, phase: str) -> None:
        """Test-only: with DOMUBACKUP_TEST_PAUSE=PHASE[,PHASE...] the run stops before the first
        step of each named phase, creates STATE_DIR/pause/DOMU.PHASE and waits until that file
        is removed (at most 10 minutes), so that a test can look at, or kill, a run there."""
        if phase not in os.environ.get(PAUSE_ENV, "").split(",") or phase in self._paused:
            return
        self._paused.add(phase)
        d = os.path.join(os.path.dirname(os.path.dirname(self.journal.path)), "pause")
        os.makedirs(d, exist_ok=True)
        flag = os.path.join(d, f"{self.journal.domu}.{phase}")
        with open(flag, "w") as f:
            f.write(f"{os.getpid()}\n")
        log.warning("test pause before %s: waiting for %s to be removed", phase, flag)
        deadline = time.monotonic() + 600
        while os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.1)


def _mount_key(step: Step):
    return cmd.batch_key(step.argv)[0] if step.argv[:2] == (cmd.HELPER, "mount-in") and step.undo else None
