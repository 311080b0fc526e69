"""The crash-safe close stack: ``STATE_DIR/journal/DOMU.json``.

Before a step runs, its entry (argv and the undo argv: data, never code) is written as
``pending``; after it succeeded it is marked ``done``, on disk with the next write (the next
step's entry): ``teardown`` runs the undo of every entry, pending or done alike, in reverse
order, also in a later process after a crash (``Journal.load``), so the mark needs no write of
its own. Every write is atomic: temp file in the same directory, fsync, rename, fsync of the
directory. A reader sees the old journal or the new one, never a mix. A process killed in the
middle of a write leaves its temp file (``.DOMU.json.XXXX.tmp``) beside the old journal; the
old one is the truth (a step runs only after the write of its entry returned), so the next run
or ``cleanup`` removes such temp files under the DomU's lock (``Journal.sweep``)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

from ..core.errors import DomuBackupError, PeerError, TeardownError
from ..core.commands import HELPER, batch_key, batched
from .lock import state_file
from ..core.model import PEER, Result, Step

if TYPE_CHECKING:
    from .runner import Runner

log = logging.getLogger("domubackup.journal")

PENDING = "pending"
DONE = "done"
UNDONE = "undone"  # closed already during the run (e.g. a freeze after its thaw): nothing to undo


# already_gone: when an undo fails only because its object does not exist (any more), the undo
# has nothing left to do and counts as a success. One row per undo program:
#   (program, word that must be in argv (or None), exit codes (or None = any non-zero),
#    patterns searched in stderr + stdout).
# Messages under LC_ALL=C, as captured on Debian 12 (util-linux 2.38, lvm2 2.03.16,
# multipath-tools kpartx, dmsetup 1.02.185, libvirt 9.0) unless marked "from source".
GONE_TABLE: tuple[tuple[str, str | None, tuple[int, ...] | None, tuple[str, ...]], ...] = (
    # umount DIR        -> "umount: /x: not mounted."               exit 32 (mount point, nothing on it)
    # umount MISSINGDIR -> "umount: /x: no mount point specified."  exit 32 (path does not exist)
    # older util-linux  -> "umount: /x: not mounted" / "mountpoint not found"
    ("umount", None, (32,), (r": not mounted\b", r": no mount point specified",
                             r": mountpoint not found")),
    # domubackup umount-in TREE PATH DEV (safepath) -> "umount-in: /x: not mounted (...)" exit 32.
    # Only for a PENDING mount (see already_gone): a mount that the run made and saw in place
    # and that is gone at teardown was removed by someone else, which is not success.
    ("domubackup", "umount-in", (32,), (r"^umount-in: .*: not mounted\b",)),
    # lvremove VG/LV, LV missing -> '  Failed to find logical volume "vg/lv"' exit 5
    # whole VG missing           -> '  Volume group "vg" not found' exit 5 (its LVs cannot exist)
    ("lvremove", None, (5,), (r"Failed to find logical volume", r'Volume group "[^"]*" not found')),
    # kpartx -d MISSINGDEV -> "failed to stat() /dev/x" exit 1, printed on STDOUT (from source,
    # kpartx.c main(); here the device-mapper check fails first: no dm in this kernel).
    # kpartx -d on an existing device without mappings exits 0.
    ("kpartx", "-d", (1,), (r"failed to stat\(\)",)),
    # dmsetup remove MISSING -> "device-mapper: remove ioctl on NAME  failed: No such device or
    # address" + "Command failed." exit 1 (ENXIO; seen in xfstests output). "Device or resource
    # busy" is a real failure and does not match.
    ("dmsetup", "remove", (1,), (r"remove ioctl on .* failed: No such device or address",)),
    # rmdir MISSING -> "rmdir: failed to remove '/x': No such file or directory" exit 1
    ("rmdir", None, (1,), (r": No such file or directory",)),
    # virsh domfsthaw: a domain that is not running cannot be frozen ->
    #   "error: Requested operation is not valid: domain is not running" exit 1;
    # a domain that does not exist (any more) -> "error: failed to get domain 'x'" exit 1;
    # a driver without fsfreeze (e.g. libxl) could never have frozen it ->
    #   "this function is not supported by the connection driver".
    # On a running, not-frozen domain the agent thaws nothing: "Thawed 0 filesystem(s)" exit 0.
    ("virsh", "domfsthaw", (1,), (r"domain is not running", r"failed to get domain",
                                  r"Domain not found", r"not supported by the connection driver")),
)


def _groups(entries):
    """The (index, entry) pairs in order, neighbouring undos that can run as one command
    (commands.batch_key: `lvremove -f LV`, and the safepath unmounts of one tree whose mounts
    are known to have happened: a pending one may find nothing, and runs alone) in one group."""
    def key(entry):
        k = batch_key(entry.undo)[0] if entry.undo is not None else None
        return None if k is not None and k[0] == HELPER and entry.state != DONE else k

    groups: list[list] = []
    for pair in entries:
        if groups and key(pair[1]) is not None and key(pair[1]) == key(groups[-1][-1][1]):
            groups[-1].append(pair)
        else:
            groups.append([pair])
    return groups


def already_gone(argv: Sequence[str], result: Result, state: str = PENDING) -> bool:
    """True when the failed undo ``argv`` only failed because its object is already gone.
    A safepath unmount counts so only when its mount step is not known to have run (``state``
    pending: a crash between the journal write and the mount)."""
    if not argv or result.exit_code == 0:
        return False
    if tuple(argv[:2]) == (HELPER, "umount-in") and state != PENDING:
        return False
    program = os.path.basename(argv[0])
    text = result.stderr + "\n" + result.stdout
    for name, word, codes, patterns in GONE_TABLE:
        if program != name or (word is not None and word not in argv[1:]):
            continue
        if codes is not None and result.exit_code not in codes:
            continue
        if any(re.search(p, text, re.MULTILINE) for p in patterns):
            return True
    return False


@dataclass
class Entry:
    phase: str
    host: str  # model.LOCAL or model.PEER
    argv: tuple[str, ...]
    undo: tuple[str, ...] | None
    note: str = ""
    state: str = PENDING

    def to_json(self) -> dict:
        return {"phase": self.phase, "host": self.host, "argv": list(self.argv),
                "undo": list(self.undo) if self.undo is not None else None,
                "note": self.note, "state": self.state}

    @classmethod
    def from_json(cls, d: dict) -> "Entry":
        """Raises ValueError (or KeyError, TypeError) for an entry that is not of the shape
        ``Journal.begin_many`` writes: its undo would be run as a command."""
        argv, undo = d["argv"], d.get("undo")
        if not isinstance(argv, list) or not (undo is None or isinstance(undo, list)):
            raise ValueError(f"entry {d!r}: argv and undo must be lists of words")
        entry = cls(phase=d["phase"], host=d["host"], argv=tuple(argv),
                    undo=tuple(undo) if undo is not None else None,
                    note=d.get("note", ""), state=d.get("state", PENDING))
        problem = _shape_problem(entry.host, entry.argv, entry.undo)
        if problem is None and not (isinstance(entry.phase, str) and isinstance(entry.note, str)
                                    and entry.state in (PENDING, DONE, UNDONE)):
            problem = "phase and note must be strings, state one of pending, done, undone"
        if problem:
            raise ValueError(f"entry {d!r}: {problem}")
        return entry


def _shape_problem(host, argv, undo) -> str | None:
    """Why a step's host, argv and undo cannot be journaled (they are run later, maybe by
    `cleanup` on the peer's shell), or None: a non-empty host name; argv and undo (or None)
    non-empty tuples of strings, without NUL or lone surrogates (strict UTF-8), whose first
    word is a program (no leading "-", no "=": the peer's shell would take it for a variable)."""
    if not isinstance(host, str) or not host:
        return f"host {host!r} is not a host name"
    for what, words in (("argv", argv), ("undo", undo)):
        if words is None and what == "undo":
            continue
        if not isinstance(words, tuple) or not words or not all(isinstance(w, str) for w in words):
            return f"{what} {words!r} is not a non-empty tuple of strings"
        for w in words:
            if "\0" in w:
                return f"{what} word {w!r} contains a NUL character"
            try:
                w.encode("utf-8")
            except UnicodeEncodeError:
                return f"{what} word {w!r} is not valid UTF-8 (a lone surrogate)"
        if words[0].startswith("-") or "=" in words[0]:
            return f"{what} {words[0]!r} is not a program name"
    return None


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _listdir(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []


def _temp_of(name: str) -> str | None:
    """The file that a temp file of ``atomic_write`` was to replace, from its name
    (``.web1.json.k2x9_a0b.tmp`` -> ``web1.json``); None for any other name."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return None
    target, _, random = name[1:-4].rpartition(".")
    return target if target and random else None


def atomic_write(path: str, text: str, mode: int | None = None) -> None:
    """Replace ``path`` with ``text``: temp file in the same dir, fsync, rename, fsync dir.
    ``mode``: the file's permissions (default: mkstemp's 0600)."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


class Journal:
    def __init__(self, path: str, domu: str, peer: str, pid: int, started: str,
                 entries: list[Entry] | None = None):
        self.path, self.domu, self.peer, self.pid, self.started = path, domu, peer, pid, started
        self.entries: list[Entry] = entries or []
        self._lock = threading.RLock()  # the peer check thread records its steps too

    @classmethod
    def create(cls, state_dir, domu: str, peer: str, kind: str = "journal") -> "Journal":
        """Start the journal of a run; refuses when an earlier run left one behind. KIND
        "mounts": what `domubackup mount` keeps open until `umount` (no run's, no cleanup's)."""
        path = state_file(state_dir, kind, domu, "json")
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        old = cls.load(state_dir, domu, kind)
        if old is not None:
            raise TeardownError(
                f"an earlier run of {domu} (PID {old.pid}, started {old.started}) left "
                f"{len(old.entries)} step(s) to undo in {path}",
                hint=f"run `domubackup cleanup {domu}` first")
        journal = cls(path, domu, peer, os.getpid(),
                      time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        journal._save()
        return journal

    @classmethod
    def load(cls, state_dir, domu: str, kind: str = "journal") -> "Journal | None":
        path = state_file(state_dir, kind, domu, "json")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            entries = [Entry.from_json(e) for e in data["entries"]]
            return cls(path, data["domu"], data.get("peer", ""), data.get("pid", 0),
                       data.get("started", ""), entries)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DomuBackupError(f"the journal {path} is unreadable: {exc}",
                                  hint="undo its steps by hand, then remove it") from exc

    @staticmethod
    def domus(state_dir) -> list[str]:
        """Names of the DomUs that have a journal (runs that did not finish their teardown),
        or only the temp file of a write that a killed run left (see ``sweep``)."""
        found = {_temp_of(n) or n for n in _listdir(os.path.join(os.fspath(state_dir), "journal"))}
        return sorted(n[:-5] for n in found if n.endswith(".json") and not n.startswith("."))

    @staticmethod
    def sweep(state_dir, domu: str) -> list[str]:
        """Remove the temp files of journal writes that a killed run left; returns their paths.
        Only under the DomU's lock: then no live process is writing one."""
        directory, journal = os.path.split(state_file(state_dir, "journal", domu, "json"))
        removed = [os.path.join(directory, n) for n in sorted(_listdir(directory)) if _temp_of(n) == journal]
        for path in removed:
            os.unlink(path)
        return removed

    def _save(self) -> None:
        with self._lock:
            data = {"domu": self.domu, "pid": self.pid, "started": self.started, "peer": self.peer,
                    "entries": [e.to_json() for e in self.entries]}
            atomic_write(self.path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")

    def begin(self, step: Step) -> int:
        """Record ``step`` as pending (on disk) before it runs; return its index."""
        return self.begin_many([step])[0]

    def begin_many(self, steps) -> list[int]:
        """Record several steps as pending with ONE write (before a freeze: then nothing but
        the commands themselves runs while the guest is frozen)."""
        steps = list(steps)
        for step in steps:  # before anything is written: all of them or none
            problem = _shape_problem(step.host, step.argv, step.undo)
            if problem:
                raise ValueError(f"journal of {self.domu}: refusing step {step.phase!r} on {step.host!r} "
                                 f"{step.argv!r}: {problem}")
        with self._lock:
            first = len(self.entries)
            self.entries += [Entry(step.phase, step.host, tuple(step.argv),
                                   tuple(step.undo) if step.undo is not None else None, step.note) for step in steps]
            self._save()
            return list(range(first, len(self.entries)))

    def done_many(self, indices) -> None:
        """Mark steps done; written with the next write (undone alike after a crash)."""
        with self._lock:
            for i in indices:
                self.entries[i].state = DONE

    def done(self, index: int) -> None:
        self.done_many([index])

    def undone(self, index: int) -> None:
        """The step was closed during the run (its undo ran): teardown skips it."""
        with self._lock:
            self.entries[index].state = UNDONE
            self._save()

    def undos(self) -> list[tuple[str, tuple[str, ...]]]:
        """(host, undo argv) of every entry, newest first: what a teardown would run."""
        with self._lock:
            return [(e.host, e.undo) for e in reversed(self.entries) if e.undo]

    def closed(self, host: str, argv) -> None:
        """The newest done step of HOST with ARGV was closed by a later step of the plan (a
        tentative root mount taken back): teardown skips it."""
        with self._lock:
            for e in reversed(self.entries):
                if e.host == host and e.argv == tuple(argv) and e.state == DONE:
                    e.state = UNDONE
                    self._save()
                    return
        raise ValueError(f"journal of {self.domu}: no done step {argv!r} on {host} to close")

    def close_phase(self, phase: str) -> None:
        """The done steps of PHASE were closed by the code that opened them (a freeze window
        that thawed): teardown skips them."""
        with self._lock:
            for e in self.entries:
                if e.phase == phase and e.state == DONE:
                    e.state = UNDONE
            self._save()

    def unseen(self, host: str | None = None, undo_prefix: tuple[str, ...] = ()) -> None:
        """Count the done steps (of HOST, or of every host; whose undo starts with UNDO_PREFIX)
        as not known to be in place any more: pending, so that their object being gone at
        teardown is no failure (see already_gone)."""
        with self._lock:
            for e in self.entries:
                if (host is None or e.host == host) and e.state == DONE and e.undo \
                        and tuple(e.undo[:len(undo_prefix)]) == undo_prefix:
                    e.state = PENDING

    def teardown(self, runners: Mapping[str, "Runner"]) -> list[Result]:
        """Run every undo in reverse order, carrying on after failures. Each host's undos run
        in reverse order; the hosts run at the same time (a peer's steps never depend on this
        host's, and each ssh round trip would otherwise add to the run).
        All undone (or already gone): the journal file is removed. Otherwise the journal is
        rewritten with only the failed entries and TeardownError lists every failure."""
        todo = [(i, e) for i, e in enumerate(self.entries) if e.undo is not None and e.state != UNDONE]
        hosts = list(dict.fromkeys(e.host for _, e in reversed(todo)))
        outcome: dict[str, tuple[list, list]] = {}

        def undo_host(host):
            outcome[host] = self._undo_all([(i, e) for i, e in reversed(todo) if e.host == host],
                                           runners.get(host))

        threads = [threading.Thread(target=undo_host, args=(h,), name=f"teardown-{h}") for h in hosts[1:]]
        for t in threads:
            t.start()
        if hosts:
            undo_host(hosts[0])
        for t in threads:
            t.join()
        results = [r for h in hosts for r in outcome[h][0]]
        failed = sorted((f for h in hosts for f in outcome[h][1]), key=lambda f: -f[0])
        if not failed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            _fsync_dir(os.path.dirname(self.path))
            self.entries = []
            return results
        self.entries = [e for _, e, _ in reversed(failed)]
        self._save()
        failures = [why for _, _, why in failed]
        raise TeardownError(f"teardown of {self.domu}: {len(failures)} undo step(s) failed, "
                            f"kept in {self.path}", failures,
                            hint=f"fix the cause, then run `domubackup cleanup {self.domu}`")

    def _undo_all(self, entries, runner) -> tuple[list[Result], list[tuple[int, Entry, str]]]:
        """Undo (index, entry) pairs in the given order on one host; (results, failures).
        Neighbouring undos run as one command (commands.batch_key); when that fails, each runs
        alone, but for the unmounts that the failed batch said it did ("unmounted PATH").
        Once the host cannot be reached (PeerError), its later undos are not tried: each would
        wait the connect timeout again; they are reported and kept like every failure."""
        results, failed = [], []
        lost = False  # this host cannot be reached
        for group in _groups(entries):
            if len(group) > 1 and runner is not None:
                argv = batched([e.undo for _, e in group])
                try:
                    result = runner.run(argv, check=False)
                except Exception:  # noqa: BLE001 - each one runs alone below, and says why
                    result = None
                if result is not None and result.exit_code == 0:
                    results.append(result)
                    continue
                log.info("%s: `%s` failed: one by one", runner.host, shlex.join(argv))
                if result is not None and argv[:2] == (HELPER, "umount-in"):
                    done = set(result.stdout.splitlines())
                    group = [(i, e) for i, e in group if f"unmounted {e.undo[-2]}" not in done]
            for i, entry in group:
                if lost:
                    why = f"{runner.host}: `{shlex.join(entry.undo)}` not run: {runner.host} unreachable"
                else:
                    try:
                        why = self._undo_one(entry, runner, results)
                    except PeerError as exc:
                        why, lost = f"{runner.host}: `{shlex.join(entry.undo)}`: {exc.message}", True
                if why:
                    failed.append((i, entry, why))
        return results, failed

    def _undo_one(self, entry, runner, results) -> str | None:
        """Run one undo; None when done (or already gone), else why it failed."""
        cmd = shlex.join(entry.undo)
        if runner is None:
            who = f"{entry.host} {self.peer}" if entry.host == PEER and self.peer else entry.host
            return f"{entry.host}: `{cmd}` not run: no connection to {who}"
        try:
            result = runner.run(entry.undo, check=False)
        except PeerError:
            raise  # _undo_all stops trying this host
        except DomuBackupError as exc:  # CommandError (timeout, missing)
            return f"{runner.host}: `{cmd}`: {exc.message}"
        except Exception as exc:  # noqa: BLE001 - anything else: the other undos still run
            return f"{runner.host}: `{cmd}`: {type(exc).__name__}: {exc}"
        results.append(result)
        if result.exit_code == 0:
            return None
        if already_gone(entry.undo, result, entry.state):
            log.info("%s: `%s`: already gone", runner.host, cmd)
            return None
        tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        return f"{runner.host}: `{cmd}` exited {result.exit_code}" + (f": {tail}" if tail else "")
