"""Progress bars for a person at a terminal, drawn by tqdm on stderr.

Only when stderr is a TTY (`Progress.for_terminal`): never under cron, systemd or a pipe, so
that logs and mails stay free of bars. The CLI makes one `Progress` and hands it down; the
backup and seed jobs only call `meter()` and `Meter.to()`. Log records written to the terminal
while a bar is drawn clear it first (logs' console handler uses `tqdm.external_write_mode`).
Imported by the CLI only when it draws bars: tqdm costs ~80 ms of start, ~1 s under emulation."""

import sys

from tqdm import tqdm

from .logs import printable
from ..core.rsyncout import parse_progress2


class Meter:
    """One bar: ``to(done, total)`` moves it (total may be learnt late, or change)."""

    def __init__(self, bar):
        self._bar = bar

    def to(self, done: int, total: int | None = None) -> None:
        if total is not None and total != self._bar.total:
            self._bar.total = total
        self._bar.update(done - self._bar.n)

    def follow_rsync(self):
        """An ``on_output`` for a runner's rsync with ``--info=progress2``: moves this bar.
        rsync gives bytes so far and a percent; the total is estimated from both (it grows
        while rsync's incremental recursion finds more files)."""
        tail = [""]

        def seen(chunk: str) -> None:
            tail[0] = (tail[0] + chunk)[-512:]
            found = parse_progress2(tail[0])
            if found:
                done, percent = found
                self.to(done, done * 100 // percent if percent else None)
        return seen

    def close(self, complete: bool = False) -> None:
        """Take the bar off; ``complete``: the work is done, the bar says 100 % (rsync's last
        record may be short of it: its total was an estimate)."""
        if complete and self._bar.n:
            self._bar.total = self._bar.n
            self._bar.refresh()
        self._bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Progress:
    def __init__(self, stream):
        self.stream = stream

    @classmethod
    def for_terminal(cls, stream=None) -> "Progress | None":
        stream = stream if stream is not None else sys.stderr
        try:
            return cls(stream) if stream.isatty() else None
        except (AttributeError, ValueError):  # a closed or odd stream: no bars
            return None

    def meter(self, label: str, total: int | None = None) -> Meter:
        """A bar of bytes named ``label`` (escaped: it may hold guest-derived names)."""
        return Meter(tqdm(total=total, desc=printable(label), unit="B", unit_scale=True,
                          unit_divisor=1024, file=self.stream, dynamic_ncols=True, mininterval=0.5))
