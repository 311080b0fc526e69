"""Logging: stderr (and syslog/journald) with the DomU in each line, plus one log file per run."""

from __future__ import annotations

import contextvars
import logging
import logging.handlers
import os
import re
import sys
import time
from contextlib import contextmanager

from .lock import state_file

current_domu: contextvars.ContextVar[str] = contextvars.ContextVar("domu", default="-")

# Every character that could move the cursor, recolour or reorder a terminal line, or start a
# new line other than "\n": C0 (with \t), DEL, C1, NEL/LS/PS, the bidi controls; and lone
# surrogates (bytes that surrogateescape could not decode).
_UNPRINTABLE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e"
                          "\u2066-\u2069\ud800-\udfff]")


def _escape(m: re.Match) -> str:
    c = ord(m.group())
    if 0xDC80 <= c <= 0xDCFF:  # surrogateescape: the original byte
        c -= 0xDC00
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def printable(text: str) -> str:
    r"""``text`` with every control character but "\n" escaped as \xHH or \uHHHH (a lone
    surrogate from surrogateescape as \xHH of its byte): safe for a terminal or a log line."""
    return _UNPRINTABLE.sub(_escape, text)


class _Formatter(logging.Formatter):
    """Escapes the formatted record (``printable``) and indents its continuation lines, so that
    no string in a message can forge a line that looks like a record of its own. Without
    ``tracebacks``, a record's exception and stack are left out: they go to the run log file
    only, never to the terminal or syslog."""

    def __init__(self, fmt: str, *, tracebacks: bool):
        super().__init__(fmt)
        self.tracebacks = tracebacks

    def format(self, record):
        if not self.tracebacks and (record.exc_info or record.exc_text or record.stack_info):
            record = logging.makeLogRecord(record.__dict__)
            record.exc_info = record.exc_text = record.stack_info = None
        return printable(super().format(record)).replace("\n", "\n    ")


class _DomuFilter(logging.Filter):
    """Adds %(domu)s and %(where)s ("web1: ", or "" when the message names the DomU already)."""

    def filter(self, record):
        domu = current_domu.get()
        record.domu = domu
        record.where = "" if domu == "-" or record.getMessage().startswith(f"{domu}:") else f"{domu}: "
        return True


class _Console(logging.StreamHandler):
    """stderr. While progress bars are drawn (progress.py), a record clears them first and they
    are redrawn after it; tqdm is looked up, not imported: without it there are no bars."""

    def emit(self, record):
        bars = sys.modules.get("tqdm")
        if bars is None:
            return super().emit(record)
        with bars.tqdm.external_write_mode(file=self.stream):
            super().emit(record)


def setup(verbosity: int, *, syslog: bool = True) -> None:
    """stderr: warnings (-v: info, -vv: every command); syslog: info; the package logs everything
    to its handlers, which filter by level."""
    pkg = logging.getLogger("domubackup")
    pkg.setLevel(logging.DEBUG)
    pkg.propagate = False
    for h in list(pkg.handlers):
        pkg.removeHandler(h)

    def add(handler, level, fmt):
        handler.setLevel(level)
        handler.setFormatter(_Formatter(fmt, tracebacks=False))
        handler.addFilter(_DomuFilter())
        pkg.addHandler(handler)
    add(_Console(), logging.DEBUG if verbosity > 1 else logging.INFO if verbosity else logging.WARNING,
        "domubackup: %(where)s%(message)s")
    if syslog and os.path.exists("/dev/log"):
        try:
            sl = logging.handlers.SysLogHandler(address="/dev/log")
        except OSError:
            return
        add(sl, logging.INFO, f"domubackup[{os.getpid()}]: %(where)s%(message)s")
    logging.getLogger("sh").setLevel(logging.WARNING)
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)


@contextmanager
def run_log(state_dir: str, domu: str, kind: str = "backup"):
    """Log everything about one DomU's run to STATE_DIR/log/DOMU-KIND-TIME.log; yields the path."""
    token = current_domu.set(domu)
    path = handler = None
    try:
        d = os.path.join(state_dir, "log")
        os.makedirs(d, mode=0o700, exist_ok=True)
        path = state_file(state_dir, "log", f"{domu}-{kind}-{time.strftime('%Y%m%dT%H%M%S')}", "log")
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setLevel(logging.DEBUG)
        os.fchmod(handler.stream.fileno(), 0o600)  # guest names, paths, errors: root's only
        handler.setFormatter(_Formatter("%(asctime)s %(levelname)s %(message)s", tracebacks=True))
        logging.getLogger("domubackup").addHandler(handler)
    except (OSError, ValueError):  # ValueError: a DomU name that would leave the directory
        path = None
    try:
        yield path
    finally:
        if handler is not None:
            logging.getLogger("domubackup").removeHandler(handler)
            handler.close()
        current_domu.reset(token)


class Hold(logging.Handler):
    """While it holds, the package's log records (from any thread) are kept in memory instead
    of being written; ``end()`` (idempotent) puts the handlers back and writes the kept
    records to them, in order. Used for the freeze window, which should not be spent writing
    logs. A run killed with SIGKILL while holding loses those records (at most
    ``freeze_max_window`` seconds of them); the journal still says what was open."""

    def __init__(self, name: str = "domubackup"):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._logger = logging.getLogger(name)
        self._handlers = self._logger.handlers[:]
        self._released = False
        self._logger.handlers = [self]

    def emit(self, record):
        self.records.append(record)

    def end(self) -> None:
        # (not `release`: logging.Handler.release() unlocks the handler after each emit)
        with self.lock:
            if self._released:
                return
            self._released = True
            self._logger.handlers = self._handlers
            records, self.records = self.records, []
        for record in records:
            for h in self._handlers:
                if record.levelno >= h.level:
                    h.handle(record)
