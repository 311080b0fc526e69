"""Freeze/thaw a DomU around its disk snapshots.

Modes (``FreezeSettings.mode``): ``none``: nothing is frozen, the snapshots are crash-consistent.
``agent``: libvirt ``virDomain.fsFreeze(mountpoints or None)`` through the guest agent,
``fsThaw()`` after the snapshots (level ``filesystem``). ``hooks``: every executable script of
the hook directory on the Dom0, called as ``SCRIPT freeze`` in name order and ``SCRIPT thaw`` in
reverse, with ``DOMUBACKUP_DOMU`` and ``DOMUBACKUP_PHASE`` in its environment (level
``application``); the scripts reach the guest themselves (ssh, or ``virsh qemu-agent-command ...
guest-exec``), see conf/freeze.d/*.example. ``hooks+agent``: hooks first, then the agent; thaw
in reverse.

The window: :func:`frozen` (a context manager) or :func:`freeze_window` freezes, runs the
snapshots of ALL disks, and thaws at once. A watchdog thread thaws when the window (freeze done
-> now) exceeds ``max_window`` even if a snapshot command hangs; the run then fails with
``FreezeError("freeze window exceeded 10s; guest thawed by the watchdog")``. Rules:

* Every item whose freeze was *started* is thawed exactly once, in reverse order: the failing
  hook too (it may already hold locks), and the agent after a failed ``fsFreeze`` too. A lock
  makes the watchdog's thaw and the normal thaw mutually exclusive; the first takes the items.
* Each hook's thaw is started before its freeze through ``runner.gated`` (when the runner has
  it) and only released at the thaw: the window pays one exec for it, and a run killed while
  the guest is frozen thaws at once (the gate pipe closes with the process).
* A failed freeze with ``on_failure="fail"`` raises :class:`FreezeError` after the thaw; with
  ``"continue"`` the run goes on crash-consistent (``report.freeze_failed``). A watchdog timeout
  or a failed thaw after the snapshots always raises. Every :class:`FreezeError` raised here
  carries the :class:`FreezeReport` as ``.report``.
* Crash safety: before each freeze action ``journal.begin(Step(phase="freeze", host=LOCAL,
  argv=..., undo=<thaw argv>))``, and ``journal.done(i)`` after it succeeded; nothing here
  after a thaw. A cleanup that replays these undo argvs must treat an already-thawed entry as
  gone: hook thaws must be idempotent (the shipped examples exit 0 when nothing is frozen) and
  ``virsh domfsthaw`` on a running domain that is not frozen prints ``Thawed 0 filesystem(s)``
  and exits 0 (libvirt test driver, libvirt 9.0; on a shut-off domain it exits 1 with
  "Requested operation is not valid: domain is not running", also "nothing to thaw")."""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from ..core import errors
from ..hosts import logs
from ..core.freezing import (SKIP_INFIXES, SKIP_SUFFIXES, TAIL_CHARS, TAIL_LINES, FreezeReport,  # noqa: F401 (tests:
                              FreezeSettings, HookResult, agent_freeze_argv, agent_undo_argv,  # freeze.FreezeSettings)
                              hook_argv, hook_undo_argv)
from ..core.model import LOCAL, Step

log = logging.getLogger("domubackup.freeze")

# --- hook directory ------------------------------------------------------------------------

def _skip_reason(path: pathlib.Path) -> str | None:
    name = path.name
    if name.startswith("."):
        return "hidden file"
    if name.endswith(SKIP_SUFFIXES) or any(i in name for i in SKIP_INFIXES):
        return "backup/disabled/package-manager file name"
    if not path.is_file():
        return "not a regular file"
    if not os.access(path, os.X_OK):
        return "not executable"
    return None


def scan_hooks(hook_dir) -> tuple[list[pathlib.Path], list[str]]:
    """(hooks to run in name order, ["NAME: why skipped", ...]). A missing directory: no hooks."""
    try:
        entries = sorted(pathlib.Path(hook_dir).iterdir(), key=lambda p: p.name)
    except FileNotFoundError:
        return [], []
    hooks, skipped = [], []
    for p in entries:
        reason = _skip_reason(p)
        if reason:
            skipped.append(f"{p.name}: {reason}")
            log.info("freeze hook %s skipped: %s", p, reason)
        else:
            hooks.append(p)
    return hooks, skipped


def list_hooks(hook_dir) -> list[pathlib.Path]:
    """The hook scripts to run, in name order (freeze order); skipped files are logged."""
    return scan_hooks(hook_dir)[0]


# --- the freeze machinery ------------------------------------------------------------------

def _tail(*texts: str) -> str:
    lines = "\n".join(t.rstrip("\n") for t in texts if t and t.strip()).splitlines()
    return "\n".join(lines[-TAIL_LINES:])[-TAIL_CHARS:]


@dataclass
class _Item:
    kind: str  # hook | agent
    name: str
    thaw: Callable[[], None]


class _Session:
    """One freeze: the stack of started items and the lock that makes each thaw happen once."""

    def __init__(self, settings: FreezeSettings, domu: str, runner, domain, uri, journal,
                 report: FreezeReport):
        self.s, self.domu, self.runner, self.domain = settings, domu, runner, domain
        self.uri, self.journal, self.report = uri, journal, report
        self.stack: list[_Item] = []
        self.lock = threading.Lock()
        self.thaw_errors: list[str] = []
        self.thawed_at: float | None = None
        self.acted_at: float | None = None  # the last freeze/thaw action returned (before its logging)

    # journal
    def _begin(self, argv, undo, note) -> int | None:
        if self.journal is None:
            return None
        return self.journal.begin(Step(phase="freeze", host=LOCAL, argv=tuple(argv),
                                       undo=tuple(undo), note=note))

    def _done(self, i) -> None:
        if self.journal is not None:
            self.journal.done(i)

    # hooks
    def _hook_call(self, script: pathlib.Path, phase: str):
        # Run as `SCRIPT PHASE` with the variables in the environment (one exec less than the
        # journaled `env ... SCRIPT PHASE`, which a later `cleanup` runs).
        env = {"DOMUBACKUP_DOMU": self.domu, "DOMUBACKUP_PHASE": phase}
        return [str(script), phase], dict(env=env, timeout=self.s.hook_timeout, check=False)

    def _prepare_thaw(self, script: pathlib.Path):
        """The thaw of ``script``, started before its freeze and held before its exec
        (runner.gated): the window then pays one exec, and a killed run still thaws at once.
        None when the runner cannot."""
        gated = getattr(self.runner, "gated", None)
        if gated is None:
            return None
        argv, kwargs = self._hook_call(script, "thaw")
        try:
            return gated(argv, **kwargs)
        except (OSError, errors.CommandError) as e:  # the thaw starts when it runs, and says why
            log.warning("hook %s thaw: not prepared (%s)", script.name, e)
            return None

    def _run_hook(self, script: pathlib.Path, phase: str, prepared=None) -> HookResult:
        argv, kwargs = self._hook_call(script, phase)
        t0 = time.monotonic()
        if phase == "freeze":  # a thaw is announced by thaw_all's one line, before the window ends
            log.info("hook %s %s: start", script.name, phase)
        try:
            res = prepared.wait() if prepared is not None else self.runner.run(argv, **kwargs)
            self.acted_at = time.monotonic()
            hr = HookResult(script.name, phase, res.exit_code, time.monotonic() - t0,
                            _tail(res.stdout, res.stderr))
            out = "\n".join(t for t in (res.stdout, res.stderr) if t)
        except errors.CommandError as e:
            timed_out = e.timeout is not None
            hr = HookResult(script.name, phase, None if timed_out else e.returncode,
                            time.monotonic() - t0, _tail(e.stderr, str(e)), timed_out=timed_out)
            out = e.stderr or ""
        except OSError as e:  # could not start (a runner may let this through)
            hr = HookResult(script.name, phase, None, time.monotonic() - t0, str(e))
            out = ""
        for line in out.splitlines():
            log.info("hook %s %s: %s", script.name, phase, line)
        log.log(logging.INFO if hr.ok else logging.ERROR, "hook %s %s: end, exit %s%s in %.3f s", script.name, phase, hr.exit_code,
                " (timed out)" if hr.timed_out else "", hr.duration)
        self.report.hooks.append(hr)
        return hr

    def freeze_hook(self, script: pathlib.Path) -> None:
        i = self._begin(hook_argv(self.domu, script, "freeze"),
                        hook_undo_argv(self.domu, script), f"freeze hook {script.name}")
        prepared = self._prepare_thaw(script)

        def thaw():
            hr = self._run_hook(script, "thaw", prepared)
            if not hr.ok:
                why = "timed out" if hr.timed_out else f"exited {hr.exit_code}"
                raise errors.FreezeError(f"thaw hook {script.name} {why}")

        # Pushed before running: a failing freeze hook is thawed too (it may hold locks).
        self.stack.append(_Item("hook", script.name, thaw))
        hr = self._run_hook(script, "freeze")
        if not hr.ok:
            why = f"timed out after {self.s.hook_timeout:g}s" if hr.timed_out \
                else f"exited {hr.exit_code}"
            raise errors.FreezeError(f"freeze hook {script.name} {why}",
                                     hint=hr.output_tail.splitlines()[-1] if hr.output_tail else None)
        self._done(i)

    # agent
    def freeze_agent(self) -> None:
        # libvirt.libvirtError is an Exception; catching Exception keeps libvirt an import of
        # the caller only (and lets unit tests pass a fake domain).
        dom = self.domain
        mps = list(self.s.agent_mountpoints)
        setter = getattr(dom, "agentSetResponseTimeout", None)
        if setter is None:
            self.report.notes.append("agentSetResponseTimeout unavailable: agent calls may block")
        else:
            try:
                setter(int(self.s.agent_timeout))
            except Exception as e:  # noqa: BLE001 - VIR_ERR_NO_SUPPORT (3) on old/test drivers
                code = getattr(e, "get_error_code", lambda: None)()
                note = f"agent response timeout not set (libvirt error {code}: {e})"
                self.report.notes.append(note)
                log.warning("%s: %s", self.domu, note)
        i = self._begin(agent_freeze_argv(self.uri, self.domu, mps),
                        agent_undo_argv(self.uri, self.domu), "guest agent fsfreeze")

        def thaw():
            try:
                n = dom.fsThaw()
            except Exception as e:  # noqa: BLE001 - libvirtError
                raise errors.FreezeError(f"agent thaw of {self.domu} failed: {e}") from e
            self.acted_at = time.monotonic()
            self.report.agent_thawed = n
            log.info("%s: agent thawed %d filesystem(s)", self.domu, n)

        self.stack.append(_Item("agent", "agent", thaw))  # thawed even if fsFreeze fails
        log.info("%s: agent freeze %s: start", self.domu, mps or "all filesystems")
        try:
            n = dom.fsFreeze(mps or None)
        except Exception as e:  # noqa: BLE001 - libvirtError
            raise errors.FreezeError(f"agent freeze of {self.domu} failed: {e}") from e
        self.acted_at = time.monotonic()
        self.report.agent_frozen = n
        if n == 0:
            raise errors.FreezeError(f"agent froze 0 filesystems of {self.domu}",
                                     hint="already frozen by someone else, or no filesystem")
        log.info("%s: agent freeze: end, %d filesystem(s)", self.domu, n)
        self._done(i)

    def thaw_all(self, by: str) -> bool:
        """Thaw every started item once, in reverse. False when there was nothing to thaw."""
        with self.lock:
            if not self.stack:
                return False
            log.info("%s: thaw (%s): %s", self.domu, by,
                     ", ".join(it.name for it in reversed(self.stack)))
            self.acted_at = None
            while self.stack:
                it = self.stack.pop()
                try:
                    it.thaw()
                except Exception as e:  # noqa: BLE001 - go on thawing the others
                    self.thaw_errors.append(str(e))
                    log.error("%s: %s", self.domu, e)
            # thaw done: when the last thaw returned, not after its logging
            self.thawed_at = self.acted_at or time.monotonic()
            return True


def _reached_level(settings: FreezeSettings, report: FreezeReport) -> str:
    if any(h.phase == "freeze" and h.ok for h in report.hooks):
        return "application"
    if settings.uses_agent and report.agent_frozen:
        return "filesystem"
    return "crash"


def _fail(report: FreezeReport, message: str, *, hint=None, cause=None) -> errors.FreezeError:
    err = errors.FreezeError(message, hint=hint)
    err.report = report
    if not report.error:
        report.error = message
    if cause is not None:
        err.__cause__ = cause
    return err


@contextlib.contextmanager
def frozen(settings: FreezeSettings, domu_name: str, *, runner, domain=None, uri: str | None = None,
           journal=None) -> Iterator[FreezeReport]:
    """Freeze ``domu_name``, yield the report while frozen (take the snapshots here), thaw.

    ``runner``: the Dom0's local Runner (hooks). ``domain``: its libvirt virDomain (agent modes).
    ``uri``: the libvirt URI for the journaled ``virsh`` argvs (default: the domain's connection).
    ``journal``: an object with ``begin(step) -> int`` and ``done(i)``, or None. The report is
    complete after the ``with`` block, also when it raised."""
    s = settings
    report = FreezeReport(domu=domu_name, mode=s.mode, on_failure=s.on_failure)
    if s.mode == "none":
        report.notes.append("freeze mode none: crash-consistent")
        yield report
        return
    if s.uses_agent:
        if domain is None:
            raise ValueError(f"freeze mode {s.mode} needs the libvirt domain")
        if uri is None:
            uri = domain.connect().getURI()
    sess = _Session(s, domu_name, runner, domain, uri, journal, report)

    # The watchdog thread exists before the freeze (its start costs nothing in the window) and
    # counts from the window's start (`armed`).
    stop, armed = threading.Event(), threading.Event()

    hold: list[logs.Hold] = []  # the window's log records, written after the thaw

    def watchdog():
        armed.wait()
        if not stop.is_set() and not stop.wait(s.max_window):
            if sess.thaw_all("watchdog"):
                report.watchdog_fired = True
                for h in hold:
                    h.end()  # the main thread may hang in a snapshot command: write now
                log.error("%s: freeze window exceeded %gs: thawed by the watchdog",
                          domu_name, s.max_window)

    dog = threading.Thread(target=watchdog, name=f"freeze-watchdog-{domu_name}", daemon=True)
    dog.start()

    # 1. freeze: hooks in name order, then the agent
    t_begin = time.monotonic()
    log.info("%s: freeze (%s): begin", domu_name, s.mode)
    freeze_error = None
    try:
        if s.uses_hooks:
            hooks, report.skipped_hooks = scan_hooks(s.hook_dir)
            if not hooks:
                note = f"no hook scripts in {s.hook_dir}"
                report.notes.append(note)
                log.warning("%s: %s", domu_name, note)
            for script in hooks:
                sess.freeze_hook(script)
        if s.uses_agent:
            sess.freeze_agent()
    except BaseException as e:  # noqa: BLE001 - thaw first, decide below
        freeze_error = e
    if freeze_error is not None:
        e = freeze_error
        stop.set()
        armed.set()
        dog.join()
        sess.thaw_all("freeze failed")
        report.freeze_failed = True
        report.level = "crash"
        report.error = str(e)
        if sess.thaw_errors:
            report.thaw_failed = True
            report.notes.extend(f"rollback: {t}" for t in sess.thaw_errors)
        if not isinstance(e, Exception) or s.on_failure == "fail":
            log.error("%s", report.summary)
            if isinstance(e, errors.FreezeError):
                e.report = report
                raise e
            if isinstance(e, Exception):
                raise _fail(report, f"freeze of {domu_name} failed: {e}", cause=e)
            raise e
        log.warning("%s", report.summary)
        yield report  # crash-consistent, nothing frozen any more
        return
    t_frozen = sess.acted_at or time.monotonic()  # freeze done: when the last freeze returned
    hold.append(logs.Hold())
    armed.set()  # 2. the window, guarded by the watchdog
    log.info("%s: freeze: end after %.3f s", domu_name, t_frozen - t_begin)
    body_error: BaseException | None = None
    try:
        yield report
    except BaseException as e:
        body_error = e
    finally:
        # 3. thaw at once (the watchdog may have done it already; the lock serialises both)
        stop.set()
        sess.thaw_all("end of window")
        hold[0].end()
        dog.join()
        report.window_ms = int(round(((sess.thawed_at or time.monotonic()) - t_frozen) * 1000))
        report.level = "crash" if report.watchdog_fired else _reached_level(s, report)
        if sess.thaw_errors:
            report.thaw_failed = True
            report.notes.extend(f"thaw: {t}" for t in sess.thaw_errors)
        log.info("%s: thaw: end; window %d ms", domu_name, report.window_ms)

    if report.watchdog_fired:
        report.error = f"freeze window exceeded {s.max_window:g}s; guest thawed by the watchdog"
        log.error("%s", report.summary)
        hint = f"the snapshots took too long: {body_error}" if body_error else \
            "the snapshots took too long; raise max_window or check the snapshot commands"
        raise _fail(report, report.error, hint=hint, cause=body_error)
    if body_error is not None:
        if report.thaw_failed:
            log.error("%s", report.summary)
        raise body_error
    if report.thaw_failed:
        msg = "thaw failed: " + "; ".join(sess.thaw_errors)
        report.error = msg
        log.error("%s", report.summary)
        raise _fail(report, msg, hint="the guest may still be frozen: run `domubackup cleanup`")
    log.info("%s", report.summary)


def freeze_window(settings: FreezeSettings, domu: str, snapshot_fn: Callable[[], None], *, runner,
                  domain=None, uri: str | None = None, journal=None) -> FreezeReport:
    """Freeze, ``snapshot_fn()`` (snapshots of ALL disks), thaw; returns the report.
    A FreezeError raised here carries the report as ``.report``; an error of ``snapshot_fn``
    propagates unchanged after the thaw."""
    with frozen(settings, domu, runner=runner, domain=domain, uri=uri, journal=journal) as report:
        snapshot_fn()
    return report
