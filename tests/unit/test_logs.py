"""logs.Hold: the freeze window's log records are written after it, all of them, in order."""

import logging
import threading

import pytest

from domubackup import logs


class ListHandler(logging.Handler):
    def __init__(self, level=logging.DEBUG):
        super().__init__(level)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def pkg():
    logger = logging.getLogger("domubackup.test")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    seen, warnings_only = ListHandler(), ListHandler(logging.WARNING)
    logger.handlers = [seen, warnings_only]
    yield logger, seen, warnings_only
    logger.handlers = []
    logger.propagate = True


def test_hold_keeps_records_until_release_then_writes_them_in_order(pkg):
    logger, seen, warnings_only = pkg
    logger.info("before")
    hold = logs.Hold("domubackup.test")
    logger.debug("one")
    t = threading.Thread(target=lambda: logger.warning("two, from another thread"))
    t.start()
    t.join()
    logger.info("three")
    assert seen.lines == ["before"] and warnings_only.lines == []
    hold.end()
    assert seen.lines == ["before", "one", "two, from another thread", "three"]
    assert warnings_only.lines == ["two, from another thread"]  # each handler keeps its level
    hold.end()  # twice: nothing more
    logger.info("after")
    assert seen.lines[-1] == "after" and len(seen.lines) == 5
