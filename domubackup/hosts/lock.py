"""One lock per DomU: ``STATE_DIR/lock/DOMU.lock``, held with flock(2) for the whole run.

The kernel releases a flock when its holder dies, so a held lock always means a live process;
the file is never deleted (deleting a lock file races with flock) and holds the holder's PID."""

from __future__ import annotations

import fcntl
import os

from ..core.errors import BusyError


def state_file(state_dir: str | os.PathLike, kind: str, domu: str, suffix: str) -> str:
    """``STATE_DIR/KIND/DOMU.SUFFIX``; refuses names that would leave that directory."""
    if not domu or domu in (".", "..") or "/" in domu or "\0" in domu:
        raise ValueError(f"unusable DomU name for a state file: {domu!r}")
    return os.path.join(os.fspath(state_dir), kind, f"{domu}.{suffix}")


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode("ascii", "replace").strip())
    except ValueError:
        return None


def holder_pid(state_dir: str | os.PathLike, domu: str) -> int | None:
    """PID of the process holding the lock of ``domu``, or None when it is free."""
    try:
        fd = os.open(state_file(state_dir, "lock", domu, "lock"), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or 0  # held, PID not written yet
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class DomuLock:
    """``with DomuLock(state_dir, "web1"):`` -- raises BusyError when another run holds it."""

    def __init__(self, state_dir: str | os.PathLike, domu: str):
        self.domu = domu
        self.path = state_file(state_dir, "lock", domu, "lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            who = f"PID {pid}" if pid else "another process"
            raise BusyError(f"{self.domu} is already being backed up by {who}",
                            hint=f"wait for it to finish; the lock is {self.path}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        finally:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "DomuLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
