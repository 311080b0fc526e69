"""One small hierarchy of errors, each class with the exit code the CLI maps it to. A message
says what failed and on which object; ``hint`` says what to do next."""

from __future__ import annotations

import shlex
import signal

# The exit codes of the program: the one table (README "Exit codes"). Each error class below
# carries its code; the CLI maps outcomes and signals with the others.
EXIT_OK = 0
EXIT_FAILED = 1  # a backup failed (any DomuBackupError without a code of its own)
EXIT_USAGE = 2
EXIT_NOT_ELIGIBLE = 3
EXIT_TEARDOWN = 4
# A run that completed, but could not copy everything of the guest (its reasons are listed):
# not an error class, an outcome (frame.Outcome status PARTIAL).
EXIT_PARTIAL = 5
EXIT_INTERNAL = 70  # sysexits EX_SOFTWARE: a bug; one line on stderr, the traceback in the log
EXIT_BUSY = 75  # sysexits EX_TEMPFAIL
EXIT_REFUSED = 77  # sysexits EX_NOPERM: `domubackup serve` refused a client's request
EXIT_CONFIG = 78  # sysexits EX_CONFIG
EXIT_SIGNAL = 128  # + the signal's number, as a shell reports a process that a signal ended


def signal_exit(signum: int) -> int:
    """The exit code of a run stopped by signal ``signum``: 128+N (SIGTERM 143, SIGINT 130)."""
    return EXIT_SIGNAL + signum


class DomuBackupError(Exception):
    """Base of every error the tool raises on purpose."""
    exit_code = EXIT_FAILED

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(DomuBackupError):
    """Wrong command-line use."""
    exit_code = EXIT_USAGE


class NotEligibleError(DomuBackupError):
    """The DomU is missing, not running here, or this host may not back it up."""
    exit_code = EXIT_NOT_ELIGIBLE


class NotHereError(NotEligibleError):
    """The DomU is not defined or not running on this host: another Dom0 backs it up. The
    nightly run (no DomU named) skips it quietly."""


class TeardownError(DomuBackupError):
    """One or more undo steps failed: something may be left behind (run `domubackup cleanup`)."""
    exit_code = EXIT_TEARDOWN

    def __init__(self, message: str, failures: list[str] | None = None, *, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.failures = list(failures or [])
        self.after: str | None = None  # the error that had ended the run before its teardown

    def __str__(self) -> str:
        text = super().__str__()
        if self.failures:
            text += "".join(f"\n  - {f}" for f in self.failures)
        if self.after:
            text += f"\n  the run had failed before its teardown: {self.after}"
        return text


class BusyError(DomuBackupError):
    """Another run holds the lock of this DomU."""
    exit_code = EXIT_BUSY


class ConfigError(DomuBackupError):
    """The configuration file is missing, unreadable or invalid."""
    exit_code = EXIT_CONFIG


class Interrupted(DomuBackupError):
    """A signal asked us to stop; raised so that every `finally` and teardown runs. Its exit code
    is 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signal.Signals(signum).name}; closing everything that was opened")
        self.signum = signum
        self.exit_code = signal_exit(signum)


class InspectError(DomuBackupError):
    """A disk or its layout cannot be backed up (not an LV, a snapshot, a guest VG, ...)."""


class CommandError(DomuBackupError):
    """A command exited non-zero (or timed out) on a host."""

    def __init__(self, host: str, argv, exit_code: int | None, stderr: str = "", *,
                 timeout: float | None = None, hint: str | None = None):
        self.host, self.argv, self.returncode, self.stderr, self.timeout = host, tuple(argv), exit_code, stderr, timeout
        cmd = shlex.join(self.argv)
        what = f"timed out after {timeout:g}s" if timeout is not None else f"exited {exit_code}"
        tail = stderr.strip().splitlines()[-5:]
        msg = f"on {host}: `{cmd}` {what}"
        if tail:
            msg += ": " + " | ".join(tail)
        super().__init__(msg, hint=hint)


class PeerError(DomuBackupError):
    """The peer Dom0 cannot be reached or refuses us (SSH, host key, libvirt)."""


class PeerRefused(PeerError):
    """The peer's `domubackup serve` (its restricted key) refused a request of ours."""

    exit_code = EXIT_REFUSED


class PeerUnreachable(PeerError):
    """Nothing answers at the peer's address (refused, timed out, name unknown): a failover
    takes such a Dom0 as down; an answer of any kind (a host key, an auth failure) is not."""


class SnapshotError(DomuBackupError):
    """The snapshot cannot be created, filled up, or became invalid."""


class FreezeError(DomuBackupError):
    """Freezing or thawing the guest failed."""
