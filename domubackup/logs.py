"""Logging: stderr (and syslog/journald) with the DomU in each line, plus one log file per run."""

from __future__ import annotations

import contextvars
import logging
import logging.handlers
import os
import time
from contextlib import contextmanager

current_domu: contextvars.ContextVar[str] = contextvars.ContextVar("domu", default="-")


class _DomuFilter(logging.Filter):
    """Adds %(domu)s and %(where)s ("web1: ", or "" when the message names the DomU already)."""

    def filter(self, record):
        domu = current_domu.get()
        record.domu = domu
        record.where = "" if domu == "-" or record.getMessage().startswith(f"{domu}:") else f"{domu}: "
        return True


def setup(verbosity: int, *, syslog: bool = True) -> None:
    """stderr: warnings (-v: info, -vv: every command); syslog: info; the package logs everything
    to its handlers, which filter by level."""
    pkg = logging.getLogger("domubackup")
    pkg.setLevel(logging.DEBUG)
    pkg.propagate = False
    for h in list(pkg.handlers):
        pkg.removeHandler(h)
    err = logging.StreamHandler()
    err.setLevel(logging.DEBUG if verbosity > 1 else logging.INFO if verbosity else logging.WARNING)
    err.setFormatter(logging.Formatter("domubackup: %(where)s%(message)s"))
    err.addFilter(_DomuFilter())
    pkg.addHandler(err)
    if syslog and os.path.exists("/dev/log"):
        try:
            sl = logging.handlers.SysLogHandler(address="/dev/log")
        except OSError:
            return
        sl.setLevel(logging.INFO)
        sl.setFormatter(logging.Formatter(f"domubackup[{os.getpid()}]: %(where)s%(message)s"))
        sl.addFilter(_DomuFilter())
        pkg.addHandler(sl)
    logging.getLogger("sh").setLevel(logging.WARNING)
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)


@contextmanager
def run_log(state_dir: str, domu: str, kind: str = "backup"):
    """Log everything about one DomU's run to STATE_DIR/log/DOMU-KIND-TIME.log; yields the path."""
    token = current_domu.set(domu)
    path = None
    handler = None
    try:
        d = os.path.join(state_dir, "log")
        os.makedirs(d, mode=0o700, exist_ok=True)
        path = os.path.join(d, f"{domu}-{kind}-{time.strftime('%Y%m%dT%H%M%S')}.log")
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setLevel(logging.DEBUG)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger("domubackup").addHandler(handler)
    except OSError:
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
