"""The one command runner: argv lists in, ``model.Result`` out, locally (sh) or on the peer (paramiko).

Every command, on either side, runs with the same base environment (``BASE_ENV`` plus the
caller's ``env`` on top), without a TTY and without a shell on our side. On the peer the
remote command string is built in exactly one place, ``SSHRunner.remote_command``, by
``shlex.join``: every word is quoted, nothing the caller passes is ever parsed by a shell.
"""

from __future__ import annotations

import logging
import os
import re
import select
import shlex
import shutil
import signal
import socket
import threading
import time
from typing import TYPE_CHECKING, Mapping, Sequence

import sh

if TYPE_CHECKING:
    import paramiko

from . import safepath
from ..core.commands import HELPER
from ..core.errors import CommandError, PeerError
from ..core.model import Result

log = logging.getLogger("domubackup.run")

BASE_ENV = {
    "LC_ALL": "C",
    "LANG": "C",
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LVM_SUPPRESS_FD_WARNINGS": "1",
}

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Seconds the remote `timeout` waits after SIGTERM before it sends SIGKILL.
KILL_AFTER = 5
# Extra seconds we wait locally for the remote side to report the timeout before giving up.
REMOTE_GRACE = 10
# Seconds we wait for a command's input to be sent (or refused) before closing its channel.
FEED_JOIN = 10


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, str):
        return data
    return data.decode("utf-8", errors="replace")


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

    host: str
    default_timeout: float

    def __init__(self, host: str, default_timeout: float = 600):
        self.host = host
        self.default_timeout = default_timeout
        self.history: list[Result] = []

    def run(self, argv: Sequence[str], *, timeout: float | None = None, ok_codes=(0,),
            env: Mapping[str, str] | None = None, input: bytes | str | None = None,
            check: bool = True, on_output=None) -> Result:
        """Run ``argv``; return its Result.

        ``on_output(text)``, when given, sees the standard output as it comes, in chunks (a
        progress display; LocalRunner only). The Result's stdout is the same either way.

        Raises CommandError when the exit code is not in ``ok_codes`` (unless ``check`` is
        false), always on a timeout, and always when the program is not installed (127).
        SSHRunner raises PeerError when the peer cannot be reached or the connection drops.
        """
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
        if on_output is not None:
            out = b"".join(streamed)  # sh keeps no stdout of its own when _out is a callback
        if self._cancelled.is_set() and code < 0:
            raise CommandError(self.host, argv, code, _text(err) + "\ncancelled", hint="the run was stopped")
        if fired.is_set() and code < 0:
            raise CommandError(self.host, argv, code, _text(err), timeout=timeout)
        return code, out, err


class SSHRunner(Runner):
    """Runs commands on the peer over one paramiko connection, opened on first use.

    The host key must already be in ``known_hosts`` (RejectPolicy); no agent, no key search.
    Each command is wrapped in coreutils ``timeout -k KILL_AFTER T`` on the peer so that a
    timeout or a dropped connection never leaves the remote process running for long.
    """

    def __init__(self, host: str, *, user: str = "root", port: int = 22,
                 identity_file: str | None = None, known_hosts: str,
                 connect_timeout: float = 10, default_timeout: float = 600, address: str | None = None):
        super().__init__(host, default_timeout)
        self.address = address or host  # where to connect; ``host`` stays the name in messages
        self.user = user
        self.port = port
        self.identity_file = identity_file
        self.known_hosts = known_hosts
        self.connect_timeout = connect_timeout
        self._client: paramiko.SSHClient | None = None

    @classmethod
    def for_host(cls, host: str, ssh) -> "SSHRunner":
        """The runner of Dom0 ``host`` with config.SSHSettings ``ssh``: its address and port
        (``ssh.endpoint``) as rsync's ssh (commands.ssh_command) reaches it."""
        address, port = ssh.endpoint(host)
        return cls(host, address=address, user=ssh.user, port=port, identity_file=ssh.identity_file,
                   known_hosts=ssh.known_hosts, connect_timeout=ssh.connect_timeout)

    @property
    def _where(self) -> str:
        at = self.address if self.port == 22 else f"{self.address}:{self.port}"
        return at if self.address == self.host else f"{self.host} ({at})"

    @property
    def _key_name(self) -> str:
        """The known_hosts entry both clients look up (paramiko and OpenSSH alike)."""
        return self.address if self.port == 22 else f"[{self.address}]:{self.port}"

    def connect(self) -> None:
        """Open the connection (done by the first run()); raise PeerError with the cause."""
        if self._client is not None:
            transport = self._client.get_transport()
            if transport is not None and transport.is_active():
                return
            self.close()
        import paramiko  # here, not at the top: ~1.2 s of imports under emulation, paid in the peer thread

        client = paramiko.SSHClient()
        try:
            client.load_host_keys(self.known_hosts)
        except OSError as exc:
            raise PeerError(f"cannot read known_hosts file {self.known_hosts}: {exc.strerror or exc}",
                            hint="check the peer's known_hosts setting") from exc
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            # paramiko reads no ssh_config (~/.ssh/config): only what is passed here.
            client.connect(self.address, port=self.port, username=self.user,
                           key_filename=self.identity_file, look_for_keys=False,
                           allow_agent=False, timeout=self.connect_timeout,
                           banner_timeout=self.connect_timeout,
                           auth_timeout=self.connect_timeout)
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise PeerError(
                f"the host key of {self._where} has CHANGED: it does not match the entry for "
                f"{self._key_name} in {self.known_hosts} (possible man-in-the-middle attack, or "
                f"the host was reinstalled)",
                hint=f"verify the new fingerprint out of band, then fix the entry for "
                     f"{self._key_name} in {self.known_hosts}") from exc
        except paramiko.AuthenticationException as exc:
            client.close()
            raise PeerError(f"authentication to {self.user}@{self._where} failed: {exc}",
                            hint=f"check that the public key of {self.identity_file or 'the identity file'}"
                                 f" is in {self.user}'s authorized_keys on {self.host}") from exc
        except paramiko.SSHException as exc:
            client.close()
            if "not found in known_hosts" in str(exc):
                raise PeerError(
                    f"the host key of {self._where} is unknown: no entry for {self._key_name} "
                    f"in {self.known_hosts}",
                    hint=f"verify the fingerprint, then add it, e.g. "
                         f"`ssh-keyscan -p {self.port} {self.address} >> {self.known_hosts}`") from exc
            raise PeerError(f"SSH to {self._where} failed: {exc}") from exc
        except socket.gaierror as exc:
            client.close()
            raise PeerError(f"cannot resolve peer host name {self.address}: {exc.strerror}") from exc
        except (TimeoutError, socket.timeout) as exc:
            client.close()
            raise PeerError(f"connection to {self._where} timed out after "
                            f"{self.connect_timeout:g}s") from exc
        except paramiko.ssh_exception.NoValidConnectionsError as exc:
            client.close()
            cause = "; ".join(sorted({e.strerror or str(e) for e in exc.errors.values()}))
            raise PeerError(f"cannot connect to {self._where}: {cause}",
                            hint="is sshd running there and the port right?") from exc
        except OSError as exc:
            client.close()
            raise PeerError(f"cannot connect to {self._where}: {exc.strerror or exc}") from exc
        self._client = client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def remote_command(self, argv: Sequence[str], env: Mapping[str, str],
                       timeout: float, *, no_input: bool = False) -> str:
        """The only place where a remote command string is made: ``NAME=VALUE`` assignments
        (names checked, values quoted) before ``timeout -k KILL_AFTER T ARGV...``, every word
        quoted by ``shlex``. Assignments rather than ``env``: one exec less per command (~45 ms
        under emulation); the peer's login shell must be a POSIX shell (bash, dash, zsh).
        ``no_input``: stdin is /dev/null there, so we never send an EOF of our own: paramiko can
        send it after the CLOSE that answers sshd's (paramiko#1115), and sshd then drops the
        whole connection ("ieof packet referred to nonexistent channel")."""
        for name in env:
            if not ENV_NAME.fullmatch(name):
                raise ValueError(f"not an environment variable name: {name!r}")
        words = [f"{k}={shlex.quote(v)}" for k, v in env.items()]
        line = " ".join([*words, shlex.join(["timeout", "-k", str(KILL_AFTER), _seconds(timeout), *argv])])
        return line + " </dev/null" if no_input else line

    def _execute(self, argv, env, input, timeout, on_output=None):  # no streaming over ssh
        import paramiko

        self.connect()
        transport = self._client.get_transport()
        cmd = shlex.join(argv)
        start = time.monotonic()  # before the remote start: our elapsed >= the remote one
        try:
            try:
                chan = transport.open_session(timeout=self.connect_timeout)
            except paramiko.SSHException:
                if transport.is_active():
                    raise  # sshd refused this channel (e.g. MaxSessions): say so
                self.close()  # the connection was dropped while idle: the command has not started
                self.connect()
                transport = self._client.get_transport()
                chan = transport.open_session(timeout=self.connect_timeout)
            chan.exec_command(self.remote_command(argv, env, timeout, no_input=input is None))
        except (paramiko.SSHException, OSError) as exc:
            self.close()
            raise PeerError(f"connection to {self._where} failed while starting `{cmd}`: {exc}") from exc

        def feed():  # in a thread: a command that writes while it reads must not deadlock us
            try:
                if isinstance(input, (bytes, bytearray)):
                    chan.sendall(input)
                else:  # an iterable of chunks: streamed (seed)
                    for chunk in input:
                        chan.sendall(chunk)
                chan.shutdown_write()
            except (paramiko.SSHException, OSError):
                pass  # the read loop below reports a dropped connection

        feeder = None  # no input: stdin is /dev/null there (see remote_command)
        if input is not None:
            feeder = threading.Thread(target=feed, daemon=True)
            feeder.start()
        deadline = start + timeout + KILL_AFTER + REMOTE_GRACE
        out, err = [], []
        try:
            while True:
                select.select([chan], [], [], 0.5)
                while chan.recv_ready():
                    out.append(chan.recv(65536))
                while chan.recv_stderr_ready():
                    err.append(chan.recv_stderr(65536))
                if chan.closed or (chan.exit_status_ready() and chan.eof_received):
                    break
                if not transport.is_active():
                    break
                if time.monotonic() > deadline:
                    chan.close()
                    raise CommandError(self.host, argv, None, _text(b"".join(err)),
                                       timeout=timeout)
            while chan.recv_ready():
                out.append(chan.recv(65536))
            while chan.recv_stderr_ready():
                err.append(chan.recv_stderr(65536))
            code = chan.exit_status if chan.exit_status_ready() else -1
        finally:
            if feeder is not None:  # its EOF goes before our CLOSE (see remote_command)
                feeder.join(FEED_JOIN)  # it ends once all is sent, or when sshd closes the channel
            chan.close()
        if code == -1 and not transport.is_active():
            self.close()
            raise PeerError(f"connection to {self._where} lost while running `{cmd}`: the command "
                            f"may or may not have completed there")
        stderr = _text(b"".join(err))
        if code in (124, 137) and time.monotonic() - start >= timeout:
            raise CommandError(self.host, argv, code, stderr, timeout=timeout)
        if code == 127 and stderr.startswith("timeout: failed to run command"):
            raise _not_installed(self.host, argv)
        return code, b"".join(out), stderr
