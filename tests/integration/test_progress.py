"""Progress bars on a terminal: a real rsync's --info=progress2 read as it comes (LocalRunner's
on_output), the bar drawn by tqdm, log records that clear it, and nothing at all off a TTY."""

import io
import logging
import os

from domubackup.hosts import logs
from domubackup.core import rsyncout
from domubackup.hosts.progress import Progress
from domubackup.hosts.runner import LocalRunner


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_no_bars_off_a_terminal():
    assert Progress.for_terminal(io.StringIO()) is None
    assert isinstance(Progress.for_terminal(Terminal()), Progress)


def test_parse_progress2_takes_the_last_whole_record():
    text = ("\r              2   0%    0.00kB/s    0:00:00 (xfr#1, to-chk=2/4)\n"
            ">f+++++++++ d/big\n\r      3,000,002 100%  408.72MB/s    0:00:00 (xfr#2, to-chk=0/4)\r   3000")
    assert rsyncout.parse_progress2(text) == (3000002, 100)
    assert rsyncout.parse_progress2(">f+++++++++ small\n") is None
    assert rsyncout.parse_progress2("\r      1234  4") is None  # cut short: no "% " yet


def test_streamed_output_is_the_same_bytes_as_captured_output():
    # sh decodes each chunk on its own: a UTF-8 character or an invalid byte cut between two
    # chunks must come out as the same stdout as without on_output.
    argv = ["sh", "-c", r"printf 'caf\303'; sleep 0.2; printf '\251 \377\r1%% \r2\n'"]
    chunks = []
    streamed = LocalRunner("dom0a", default_timeout=30).run(argv, on_output=chunks.append)
    captured = LocalRunner("dom0a", default_timeout=30).run(argv)
    assert len(chunks) >= 2
    assert streamed.stdout == captured.stdout and "caf\u00e9 " in streamed.stdout


def test_a_real_rsync_moves_the_bar_to_its_end(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    (src / "d" / "big").write_bytes(os.urandom(3 << 20))
    (src / "small").write_bytes(b"x" * 1000)
    dst.mkdir()
    term = Terminal()
    with Progress(term).meter("web1 -> dom0b") as meter:
        argv = ["rsync", "-a", "-i", "--no-h", "--stats", "--info=progress2", f"{src}/", f"{dst}/"]
        result = LocalRunner("dom0a", default_timeout=60).run(argv, on_output=meter.follow_rsync())
    drawn = term.getvalue()
    assert rsyncout.parse_rsync_stats(result.stdout).total_size == (3 << 20) + 1000  # records ignored
    assert (dst / "d" / "big").read_bytes() == (src / "d" / "big").read_bytes()
    last = drawn.rstrip("\n").rsplit("\r", 1)[-1]
    assert last.startswith("web1 -> dom0b: 100%|") and "3.00M/3.00M" in last, drawn


def test_a_log_record_clears_the_bar_and_is_a_line_of_its_own(package_logger):
    term = Terminal()
    console = logs._Console(term)
    console.setFormatter(logging.Formatter("domubackup: %(message)s"))
    package_logger.addHandler(console)
    try:
        with Progress(term).meter("seed vg0/web1-disk-snap -> dom0b", 1000) as meter:
            meter.to(400)
            package_logger.warning("a warning mid-transfer")
            meter.to(1000)
    finally:
        package_logger.removeHandler(console)
    text = term.getvalue()
    before, _, after = text.partition("domubackup: a warning mid-transfer\n")
    assert after, text
    assert before.startswith("\rseed") and before.endswith("\r")
    assert not before.rstrip("\r").rsplit("\r", 1)[-1].strip()  # the bar was blanked out first
    assert after.startswith("\rseed vg0/web1-disk-snap -> dom0b:  40%")  # redrawn
    assert "100%" in after


def test_a_transfer_that_ended_well_leaves_its_bar_at_100_percent():
    # rsync's last record may say 98 % of an estimated total: a completed transfer is 100 %
    term = Terminal()
    meter = Progress(term).meter("web1 -> dom0b")
    meter.to(64 << 20, (64 << 20) * 100 // 98)
    meter.close(complete=True)
    last = term.getvalue().rstrip("\n").rsplit("\r", 1)[-1]
    assert last.startswith("web1 -> dom0b: 100%|") and "64.0M/64.0M" in last, term.getvalue()
    term = Terminal()
    meter = Progress(term).meter("web1 -> dom0b")
    meter.to(10, 100)
    meter.close()  # a failed one stays where it was
    assert term.getvalue().rstrip("\n").rsplit("\r", 1)[-1].startswith("web1 -> dom0b:  10%")
