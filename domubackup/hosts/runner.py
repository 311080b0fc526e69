"""The one command runner: argv lists in, ``model.Result`` out, locally (sh) or on the peer
(paramiko: ssh.py).

Every command, on either side, runs with the same base environment (``BASE_ENV`` plus the
caller's ``env`` on top), without a TTY and without a shell on our side. On the peer every word
is quoted (``SSHRunner.remote_command``, the one place): nothing is ever parsed by a shell."""

from __future__ import annotations

import fcntl
import logging
import os
import shlex
import shutil
import signal
import threading
import time
from typing import Mapping, Sequence

import sh

from . import safepath
from ..core.commands import HELPER
from ..core.environ import BASE_ENV
from ..core.errors import CommandError
from ..core.model import Result

log = logging.getLogger("domubackup.run")


# Seconds the remote `timeout` waits after SIGTERM before it sends SIGKILL.
KILL_AFTER = 5
# Extra seconds we wait locally for the remote side to report the timeout before giving up.
REMOTE_GRACE = 10
# Seconds we wait for a command's input to be sent (or refused) before closing its channel.
FEED_JOIN = 10


def _text(data: bytes | str | None) -> str:
    return "" if data is None else data if isinstance(data, str) else data.decode("utf-8", errors="replace")


def _seconds(value: float) -> str:
    """A duration for coreutils `timeout`: plain decimal, never 1e+06."""
    return f"{value:.3f}".rstrip("0").rstrip(".")


def _not_installed(host: str, argv: tuple[str, ...]) -> CommandError:
    return CommandError(host, argv, 127, f"{argv[0]}: not installed on {host}",
                        hint=f"install the package that provides {argv[0]} on {host}")


def _program(host: str, argv: tuple[str, ...], path: str) -> str:
    """The executable argv[0] names (looked up in ``path``); CommandError 127 when there is none."""
    program = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=path)
    if program is None or not os.access(program, os.X_OK):
        raise _not_installed(host, argv)
    return program


class Runner:
    """Runs argv lists on one host. Subclasses implement ``_execute``."""

    def __init__(self, host: str, default_timeout: float = 600):
        self.host = host
        self.default_timeout = default_timeout
        self.history: list[Result] = []

    def run(self, argv: Sequence[str], *, timeout: float | None = None, ok_codes=(0,),
            env: Mapping[str, str] | None = None, input: bytes | str | None = None,
            check: bool = True, on_output=None) -> Result:
        """Run ``argv``; return its Result.

        ``on_output(text)``, when given, sees the standard output as it comes, in chunks (a
        progress display; LocalRunner only). The Result's stdout is the same either way. Raises
        CommandError when the exit code is not in ``ok_codes`` (unless ``check`` is
        false), always on a timeout, and always when the program is not installed (127).
        SSHRunner raises PeerError when the peer cannot be reached or the connection drops."""
        if isinstance(argv, (str, bytes)):
            raise TypeError(f"argv must be a list of words, not a string: {argv!r}")
        argv = tuple(argv)
        if not argv or not all(isinstance(a, str) for a in argv):
            raise TypeError(f"argv must be a non-empty sequence of str, got {argv!r}")
        if argv[0].startswith("-") or "=" in argv[0]:
            raise ValueError(f"not a program name: {argv[0]!r}")
        limit = self.default_timeout if timeout is None else timeout
        full_env = {**BASE_ENV, **(env or {})}
        data = input.encode("utf-8") if isinstance(input, str) else input
        cmd = shlex.join(argv)
        extra = f" (env {' '.join(sorted(env))})" if env else ""  # names only: values may be secret
        log.debug("%s: $ %s%s", self.host, cmd, extra)
        start = time.monotonic()
        try:
            more = {"on_output": on_output} if on_output is not None else {}
            code, out, err = self._execute(argv, full_env, data, limit, **more)
        except CommandError as exc:
            duration = time.monotonic() - start
            code = exc.returncode if exc.returncode is not None else -1
            self.history.append(Result(self.host, argv, code, "", exc.stderr, duration))
            log.warning("%s: `%s` failed after %.2fs: %s", self.host, cmd, duration, exc.message)
            raise
        result = Result(self.host, argv, code, _text(out), _text(err), time.monotonic() - start)
        self.history.append(result)
        if code in ok_codes:
            log.info("%s: `%s` exit %d in %.2fs", self.host, cmd, code, result.duration)
        else:
            # With check=False the caller judges the exit code: no warning of ours.
            log.log(logging.WARNING if check else logging.INFO, "%s: `%s` exit %d in %.2fs: %s",
                    self.host, cmd, code, result.duration, " | ".join(result.stderr.strip().splitlines()[-3:]))
            if check:
                raise CommandError(self.host, argv, code, result.stderr)
        return result

    def _execute(self, argv: tuple[str, ...], env: dict[str, str], input: bytes | None,
                 timeout: float) -> tuple[int, bytes | str, bytes | str]:
        """Run one command: return (exit_code, stdout, stderr); raise CommandError on a
        timeout (``timeout=``) or a missing program (127)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# How a gated command waits: the gate pipe is its stdin; a line (release) lets it exec the real
# command in the same process; end-of-file (this process died) too, with its output to
# /dev/null (nobody reads our pipes any more: a write would kill it with SIGPIPE mid-thaw).
GATE_SCRIPT = 'if read -r _; then exec "$@" </dev/null; fi; exec "$@" </dev/null >/dev/null 2>&1'


class Gated:
    """A command started now that waits before its exec until ``release()``, or until this
    process dies (the gate pipe then reads end-of-file and the command runs at once: a dead
    man's switch). It is ``sh -c GATE_SCRIPT domubackup-gate ARGV...``: the release costs one
    exec, no fork. The timeout counts from the release. ``wait()`` releases it if needed and
    returns its Result like ``Runner.run``, or raises what ``run`` raised."""

    def __init__(self, runner: "LocalRunner", argv: Sequence[str], kwargs: dict):
        read, self._write = os.pipe()
        self._read = os.fdopen(read, "rb", buffering=0)
        self.released = threading.Event()
        self._started = threading.Event()
        self._result: Result | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(runner, list(argv), kwargs), daemon=True,
                                        name=f"gated-{os.path.basename(argv[0])}")
        self._thread.start()
        self._started.wait()  # forked by now: nothing of it runs later but the wait and the exec

    def _run(self, runner, argv, kwargs):
        runner._gate.released, runner._gate.started = self.released, self._started
        try:
            self._result = runner.run(["sh", "-c", GATE_SCRIPT, "domubackup-gate", *argv],
                                      input=self._read, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to wait()
            self._error = exc
        finally:
            runner._gate.released = runner._gate.started = None
            self._started.set()
            self._read.close()

    def release(self) -> None:
        if not self.released.is_set():
            self.released.set()
            try:
                os.write(self._write, b"\n")
            except BrokenPipeError:
                pass  # the command never started: wait() reports why
            finally:
                os.close(self._write)

    def wait(self) -> Result:
        self.release()
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


PR_SET_PDEATHSIG = 1  # prctl(2)
_libc = None


def _dies_with_us():
    """A preexec function: the command gets SIGTERM when this process dies (prctl
    PR_SET_PDEATHSIG). Each command runs in its own session, so without it a run killed with
    SIGKILL left its rsync (or a mount) running, holding the snapshot's mounts busy: `cleanup`
    then failed on every umount. SIGTERM, not SIGKILL: lvm blocks it in its critical sections
    (a SIGKILLed `lvcreate --snapshot` could leave the origin suspended), rsync exits cleanly.
    The kernel sends it when the forking THREAD ends: ours wait for their commands."""
    global _libc
    if _libc is None:
        import ctypes  # only here: ~50 ms to import under the lab's emulation

        _libc = ctypes.CDLL(None, use_errno=True)
    libc, parent = _libc, os.getpid()

    def preexec():  # in the forked child, before its exec
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # we died between the fork and the prctl
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _piped(chunks):
    """A pipe's read end (the command's stdin), the started thread that writes CHUNKS into it
    then closes it, and the list that gets the error of making them. Not sh's own feeding of
    an iterable: it ignores short writes (os.write's count), which lost data of 4 MiB chunks
    into a pipe (a seed's checksum differed)."""
    read, write = os.pipe()
    try:  # 1 MiB: the chunks go on arriving while the command's reader is busy
        fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 1 << 20)
    except OSError:
        pass
    failed = []

    def feed():
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(write, view):]
        except BrokenPipeError:
            pass  # the command ended without reading it all: its exit code says why
        except Exception as exc:  # noqa: BLE001 - raised by _execute once the command ended
            failed.append(exc)
        finally:
            os.close(write)
    thread = threading.Thread(target=feed, daemon=True, name="feed")
    thread.start()
    return os.fdopen(read, "rb", buffering=0), thread, failed


def _stream(chunk, streamed: list, on_output) -> None:
    """sh's stdout callback: keep the bytes (surrogateescape undoes sh's per-chunk decoding),
    show the text. A failing display never fails the command."""
    streamed.append(chunk.encode("utf-8", "surrogateescape") if isinstance(chunk, str) else chunk)
    try:
        on_output(chunk)
    except Exception as e:  # noqa: BLE001 - a display error: the command goes on
        log.debug("progress display failed: %s", e)


class LocalRunner(Runner):
    """Runs commands on this host with the ``sh`` package, each in its own session so that a
    timeout kills the whole process group (sh's own ``_timeout`` signals only the child), and
    each ended by SIGTERM if this process dies, except a gated command (a thaw: it must run)."""

    def __init__(self, host: str = "localhost", default_timeout: float = 600):
        super().__init__(host, default_timeout)
        self._running: dict[int, object] = {}
        self._cancelled = threading.Event()
        self._gate = threading.local()

    def gated(self, argv: Sequence[str], **kwargs) -> Gated:
        """Start ``argv`` now (arguments as for ``run``, no ``input``) held before its exec until
        ``release()``: what must be fast later (a thaw while a guest is frozen) pays for the
        fork now, and runs even if this process is killed in between. Raises CommandError at
        once when the program is not installed."""
        _program(self.host, tuple(argv), BASE_ENV["PATH"])
        return Gated(self, argv, kwargs)

    def cancel(self) -> None:
        """Kill every command this runner is running now (from another thread)."""
        self._cancelled.set()
        for kill in list(self._running.values()):
            kill()

    def _execute(self, argv, env, input, timeout, on_output=None):
        if argv[0] == HELPER and len(argv) > 1 and argv[1] in safepath.COMMANDS:
            # The safepath helpers run in this process: the same code as the program on the
            # peer, without ~0.4 s of interpreter start per mount under the lab's emulation.
            return safepath.execute(list(argv[1:]))
        program = _program(self.host, argv, env["PATH"])
        feeder = None
        if input is not None and not isinstance(input, (bytes, bytearray)) and not hasattr(input, "fileno"):
            input, feeder, failed = _piped(input)  # an iterable of chunks: written by a thread of ours
        # _close_fds=False: sh's own closing runs Python in the forked child (~20 ms a command
        # under emulation) and is not needed: every descriptor of this process is close-on-exec
        # (Python's, and libvirt's, sqlite's and paramiko's; checked with `ls /proc/self/fd`
        # in a child of a run's process: only 0, 1 and 2 arrive).
        released = getattr(self._gate, "released", None)
        streamed = []
        more = {} if on_output is None else {
            "_out": lambda chunk: _stream(chunk, streamed, on_output), "_out_bufsize": 0,
            "_decode_errors": "surrogateescape"}  # lossless: the bytes are joined again
        proc = sh.Command(program)(
            *argv[1:], _tty_out=False, _bg=True, _bg_exc=False, _new_session=True, _close_fds=False,
            _env=env, _in=input, _ok_code=range(256), _truncate_exc=False,
            _preexec_fn=_dies_with_us() if released is None else None, **more)
        fired, done = threading.Event(), threading.Event()

        def kill_group():
            fired.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # _new_session: the child leads its group
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill_group)
        timer.daemon = True

        def arm():  # the timeout, and cancel(), apply from the release of a gated command on
            if not done.is_set():
                self._running[proc.pid] = kill_group
                timer.start()

        started = getattr(self._gate, "started", None)
        if started is not None:
            started.set()
        if released is None:
            arm()
        else:
            threading.Thread(target=lambda: released.wait() and arm(), daemon=True).start()
        try:
            proc.wait()
            code, out, err = proc.exit_code, proc.stdout, proc.stderr
        except sh.ErrorReturnCode as exc:  # killed by a signal: sh reports -N
            code, out, err = exc.exit_code, exc.stdout, exc.stderr
        except BaseException:
            # A signal turned into an exception (SIGTERM, Ctrl-C) while we waited: the child
            # runs in its own session and would outlive us, holding mounts busy. Kill it.
            kill_group()
            raise
        finally:
            done.set()
            timer.cancel()
            self._running.pop(proc.pid, None)
            if feeder is not None:
                input.close()  # a writer still blocked gets EPIPE and ends
                feeder.join(FEED_JOIN)
        if feeder is not None and failed:
            raise failed[0]  # making the chunks failed (a read error): the command saw end-of-file
        if on_output is not None:
            out = b"".join(streamed)  # sh keeps no stdout of its own when _out is a callback
        if self._cancelled.is_set() and code < 0:
            raise CommandError(self.host, argv, code, _text(err) + "\ncancelled", hint="the run was stopped")
        if fired.is_set() and code < 0:
            raise CommandError(self.host, argv, code, _text(err), timeout=timeout)
        return code, out, err
