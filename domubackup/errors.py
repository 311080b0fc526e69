"""One small hierarchy of errors. Each class carries the exit code the CLI maps it to.

A message says what failed and on which object; ``hint`` says what to do next.
"""

from __future__ import annotations


# A run that completed, but could not copy everything of the guest (its reasons are listed):
# not an error class, an outcome (pipeline.Outcome status PARTIAL). In the CLI's table too.
EXIT_PARTIAL = 5


class DomuBackupError(Exception):
    """Base of every error the tool raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class UsageError(DomuBackupError):
    """Wrong command-line use."""

    exit_code = 2


class NotEligibleError(DomuBackupError):
    """The DomU is missing, not running here, or this host may not back it up."""

    exit_code = 3


class NotHereError(NotEligibleError):
    """The DomU is not defined or not running on this host: another Dom0 backs it up. The
    nightly run (no DomU named) skips it quietly."""


class TeardownError(DomuBackupError):
    """One or more undo steps failed: something may be left behind (run `domubackup cleanup`)."""

    exit_code = 4

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

    exit_code = 75


class ConfigError(DomuBackupError):
    """The configuration file is missing, unreadable or invalid."""

    exit_code = 78


class InspectError(DomuBackupError):
    """A disk or its layout cannot be backed up (not an LV, a snapshot, a guest VG, ...)."""


class CommandError(DomuBackupError):
    """A command exited non-zero (or timed out) on a host."""

    def __init__(self, host: str, argv, exit_code: int | None, stderr: str = "", *,
                 timeout: float | None = None, hint: str | None = None):
        self.host = host
        self.argv = tuple(argv)
        self.returncode = exit_code
        self.stderr = stderr
        self.timeout = timeout
        import shlex

        cmd = shlex.join(self.argv)
        if timeout is not None:
            what = f"timed out after {timeout:g}s"
        else:
            what = f"exited {exit_code}"
        tail = stderr.strip().splitlines()[-5:]
        msg = f"on {host}: `{cmd}` {what}"
        if tail:
            msg += ": " + " | ".join(tail)
        super().__init__(msg, hint=hint)


class PeerError(DomuBackupError):
    """The peer Dom0 cannot be reached or refuses us (SSH, host key, libvirt)."""


class SnapshotError(DomuBackupError):
    """The snapshot cannot be created, filled up, or became invalid."""


class FreezeError(DomuBackupError):
    """Freezing or thawing the guest failed."""
