"""logs: Hold (the freeze window's log records are written after it, all of them, in order);
printable and the formatters (no guest string can forge a log line or drive the terminal)."""

import logging
import os
import threading

import pytest

from domubackup.hosts import logs


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


@pytest.mark.parametrize("text, expected", [
    ("plain text, ümlaut, 日本", "plain text, ümlaut, 日本"),
    ("two\nlines", "two\nlines"),  # the formatters indent continuation lines
    ("tab\there", "tab\\x09here"),
    ("\x00\x07\x08\r\x1b[31mred\x1b[0m", "\\x00\\x07\\x08\\x0d\\x1b[31mred\\x1b[0m"),
    ("del\x7f c1\x80\x85\x9b\x9f", "del\\x7f c1\\x80\\x85\\x9b\\x9f"),
    ("\u2028ls\u2029ps", "\\u2028ls\\u2029ps"),
    ("\u202eevil\u202c \u2066x\u2069 \u200e\u200f \u202a\u202b\u202d \u2067\u2068",
     "\\u202eevil\\u202c \\u2066x\\u2069 \\u200e\\u200f \\u202a\\u202b\\u202d \\u2067\\u2068"),
    (b"label\xff\xc3".decode("utf-8", "surrogateescape"), "label\\xff\\xc3"),  # the original bytes
    ("\ud800lone", "\\ud800lone"),  # a surrogate that no byte made
    ("\u00a0nbsp \u200bzwsp", "\u00a0nbsp \u200bzwsp"),  # printable (invisible, but no control)
])
def test_printable_escapes_every_control_character_but_newline(text, expected):
    assert logs.printable(text) == expected


def test_records_are_escaped_and_cannot_forge_a_line(package_logger, tmp_path, capsys):
    logs.setup(0, syslog=False)
    label = "data\n2026-01-01 00:00:00,000 ERROR web2: OK\x1b[2K"
    with logs.run_log(str(tmp_path), "web1") as path:
        package_logger.warning("fstab: label %s not found", label)
    assert capsys.readouterr().err == ("domubackup: web1: fstab: label data\n"
                                       "    2026-01-01 00:00:00,000 ERROR web2: OK\\x1b[2K not found\n")
    text = open(path, encoding="utf-8").read()
    assert text.endswith(" WARNING fstab: label data\n    2026-01-01 00:00:00,000 ERROR web2: OK\\x1b[2K not found\n")
    assert len([line for line in text.splitlines() if not line.startswith("    ")]) == 1
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


def test_tracebacks_go_to_the_run_log_file_only(package_logger, tmp_path, capsys):
    logs.setup(0, syslog=False)
    with logs.run_log(str(tmp_path), "web1") as path:
        try:
            raise ValueError("bad \x1b line")
        except ValueError:
            package_logger.error("web1: internal error", exc_info=True)
    assert capsys.readouterr().err == "domubackup: web1: internal error\n"
    lines = open(path, encoding="utf-8").read().splitlines()
    assert lines[0].endswith(" ERROR web1: internal error")
    assert lines[1] == "    Traceback (most recent call last):"
    assert lines[-1] == "    ValueError: bad \\x1b line"
    assert all(line.startswith("    ") for line in lines[1:])


def test_stderr_and_syslog_formatters_drop_tracebacks_the_file_keeps_them(tmp_path):
    record = logging.LogRecord("domubackup", logging.ERROR, __file__, 1, "boom", None,
                               (ValueError, ValueError("v"), None))
    record.where = ""
    assert logs._Formatter("x: %(where)s%(message)s", tracebacks=False).format(record) == "x: boom"
    assert logs._Formatter("%(message)s", tracebacks=True).format(record) == "boom\n    ValueError: v"


def test_run_log_refuses_a_name_that_leaves_the_log_directory(tmp_path):
    with logs.run_log(str(tmp_path), "../escape") as path:
        pass
    assert path is None and not list(tmp_path.parent.glob("escape-*"))
