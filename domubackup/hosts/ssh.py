"""The peer's runner: commands over one paramiko connection (see runner.py for the contract);
a command fed a block stream goes through OpenSSH's client instead (``_execute_openssh``).

Commands go one after the other over one long-lived channel, a serve session (core/serve.py
SESSION: one `domubackup` start on the peer for the whole run instead of one per command, ~0.3 s
each under the lab's emulation when the key runs `domubackup serve`); a peer without one, a
command run while the session is busy, and stdin larger than SESSION_INPUT get a channel of their
own, as before.

The remote command string is built in exactly one place, ``SSHRunner.remote_command``, by
``shlex.join``: every word is quoted, nothing the caller passes is ever parsed by a shell."""

from __future__ import annotations

import json
import logging
import select
import shlex
import socket
import threading
import time
from typing import TYPE_CHECKING, Mapping, Sequence

if TYPE_CHECKING:
    import paramiko

from ..core.errors import EXIT_REFUSED, CommandError, PeerError, PeerRefused, PeerUnreachable
from ..core.serve import REFUSED, SESSION, SESSION_IDLE, SESSION_INPUT, frame
from ..core.environ import ENV_NAME
from .runner import FEED_JOIN, KILL_AFTER, REMOTE_GRACE, Runner, _not_installed, _seconds, _text

log = logging.getLogger("domubackup.run")


def _guarded(chunks, failed: list):
    """CHUNKS, ended early when producing them fails (a read error on the snapshot): the error
    goes to FAILED, raised once the remote command ended, instead of a stdin never closed
    (the remote end would wait for the rest until the timeout)."""
    try:
        yield from chunks
    except Exception as exc:  # noqa: BLE001 - re-raised by the caller
        failed.append(exc)


class SSHRunner(Runner):
    """Runs commands on the peer over one paramiko connection, opened on first use.

    The host key must already be in ``known_hosts`` (RejectPolicy); no agent, no key search.
    Each command is wrapped in coreutils ``timeout -k KILL_AFTER T`` on the peer so that a
    timeout or a dropped connection never leaves the remote process running for long."""

    def __init__(self, host: str, *, user: str = "root", port: int = 22,
                 identity_file: str | None = None, known_hosts: str,
                 connect_timeout: float = 10, default_timeout: float = 600, address: str | None = None,
                 openssh: Sequence[str] | None = None, session_program: Sequence[str] | None = ("domubackup",)):
        super().__init__(host, default_timeout)
        self.openssh = tuple(openssh) if openssh else None  # ssh client argv (no host): block streams
        self._local = None
        self.address = address or host  # where to connect; ``host`` stays the name in messages
        self.user, self.port, self.identity_file = user, port, identity_file
        self.known_hosts, self.connect_timeout = known_hosts, connect_timeout
        self._client: paramiko.SSHClient | None = None
        # the peer's program that runs `PROGRAM serve-session`; None: a channel per command
        self.session_program = tuple(session_program) if session_program else None
        self._session = None if session_program else False  # its channel; False: none (for this runner's life)
        self._session_lock = threading.Lock()
        self._session_used = 0.0

    @classmethod
    def for_host(cls, host: str, ssh) -> "SSHRunner":
        """The runner of Dom0 ``host`` with config.SSHSettings ``ssh``: its address and port
        (``ssh.endpoint``) as rsync's ssh (commands.ssh_command) reaches it."""
        from ..core.commands import ssh_command

        address, port = ssh.endpoint(host)
        return cls(host, address=address, user=ssh.user, port=port, identity_file=ssh.identity_file,
                   known_hosts=ssh.known_hosts, connect_timeout=ssh.connect_timeout,
                   openssh=ssh_command(ssh, host))

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
            try:
                # paramiko reads no ssh_config (~/.ssh/config): only what is passed here.
                client.connect(self.address, port=self.port, username=self.user, key_filename=self.identity_file,
                               look_for_keys=False, allow_agent=False, timeout=self.connect_timeout,
                               banner_timeout=self.connect_timeout, auth_timeout=self.connect_timeout)
            except Exception:
                client.close()
                raise
        except paramiko.BadHostKeyException as exc:
            raise PeerError(
                f"the host key of {self._where} has CHANGED: it does not match the entry for "
                f"{self._key_name} in {self.known_hosts} (possible man-in-the-middle attack, or "
                f"the host was reinstalled)",
                hint=f"verify the new fingerprint out of band, then fix the entry for "
                     f"{self._key_name} in {self.known_hosts}") from exc
        except paramiko.AuthenticationException as exc:
            raise PeerError(f"authentication to {self.user}@{self._where} failed: {exc}",
                            hint=f"check that the public key of {self.identity_file or 'the identity file'}"
                                 f" is in {self.user}'s authorized_keys on {self.host}") from exc
        except paramiko.SSHException as exc:
            if "not found in known_hosts" in str(exc):
                raise PeerError(
                    f"the host key of {self._where} is unknown: no entry for {self._key_name} "
                    f"in {self.known_hosts}",
                    hint=f"verify the fingerprint, then add it, e.g. "
                         f"`ssh-keyscan -p {self.port} {self.address} >> {self.known_hosts}`") from exc
            raise PeerError(f"SSH to {self._where} failed: {exc}") from exc
        except socket.gaierror as exc:
            raise PeerUnreachable(f"cannot resolve peer host name {self.address}: {exc.strerror}") from exc
        except (TimeoutError, socket.timeout) as exc:
            raise PeerUnreachable(f"connection to {self._where} timed out after "
                            f"{self.connect_timeout:g}s") from exc
        except paramiko.ssh_exception.NoValidConnectionsError as exc:
            cause = "; ".join(sorted({e.strerror or str(e) for e in exc.errors.values()}))
            raise PeerUnreachable(f"cannot connect to {self._where}: {cause}",
                            hint="is sshd running there and the port right?") from exc
        except OSError as exc:
            raise PeerError(f"cannot connect to {self._where}: {exc.strerror or exc}") from exc
        self._client = client

    def close(self) -> None:
        self._end_session()
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

    def stream(self, argv: Sequence[str], timeout: float) -> "Stream":
        """ARGV's standard output as an iterable of chunks, as it comes (a restore's blocks:
        never held whole in memory); once iterated, the Stream has its exit code and stderr."""
        return Stream(self, tuple(argv), timeout)

    def _execute(self, argv, env, input, timeout, on_output=None):  # no streaming over ssh
        if self.openssh and input is not None and not isinstance(input, (bytes, bytearray)):
            return self._execute_openssh(argv, env, input, timeout)
        if (self._session is not False and (input is None or (isinstance(input, (bytes, bytearray))
                                                               and len(input) <= SESSION_INPUT))
                and self._session_lock.acquire(blocking=False)):
            try:
                done = self._execute_in_session(argv, env, input, timeout)
            finally:
                self._session_lock.release()
            if done is not None:
                return done
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

        failed = []

        def feed():  # in a thread: a command that writes while it reads must not deadlock us
            try:
                if isinstance(input, (bytes, bytearray)):
                    chan.sendall(input)
                else:  # an iterable of chunks: streamed (seed)
                    for chunk in _guarded(input, failed):
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

        def drain():
            while chan.recv_ready():
                out.append(chan.recv(65536))
            while chan.recv_stderr_ready():
                err.append(chan.recv_stderr(65536))
        try:
            while True:
                select.select([chan], [], [], 0.5)
                drain()
                if chan.closed or (chan.exit_status_ready() and chan.eof_received) or not transport.is_active():
                    break
                if time.monotonic() > deadline:
                    chan.close()
                    raise CommandError(self.host, argv, None, _text(b"".join(err)), timeout=timeout)
            drain()
            code = chan.exit_status if chan.exit_status_ready() else -1
        finally:
            if feeder is not None:  # its EOF goes before our CLOSE (see remote_command)
                feeder.join(FEED_JOIN)  # it ends once all is sent, or when sshd closes the channel
            chan.close()
        if failed:
            raise failed[0]
        if code == -1 and not transport.is_active():
            self.close()
            raise PeerError(f"connection to {self._where} lost while running `{cmd}`: the command "
                            f"may or may not have completed there")
        return self._result(argv, code, b"".join(out), _text(b"".join(err)), start, timeout)

    def _result(self, argv, code: int, out: bytes, stderr: str, start: float, timeout: float):
        """(CODE, OUT, STDERR) of ARGV that ran on the peer, or the error its code means there:
        a refusal of serve, `timeout`'s kill, a program that is not installed."""
        self._refused(argv, code, stderr)
        if code in (124, 137) and time.monotonic() - start >= timeout:
            raise CommandError(self.host, argv, code, stderr, timeout=timeout)
        if code == 127 and stderr.startswith("timeout: failed to run command"):
            raise _not_installed(self.host, argv)
        return code, out, stderr

    def _execute_in_session(self, argv, env, input, timeout):
        """ARGV run through the serve session (opened on first use); None when the peer has no
        session: the caller runs it on a channel of its own."""
        import paramiko

        self.connect()
        chan = self._session_channel()
        if chan is None:
            return None
        data = bytes(input or b"")
        line = self.remote_command(argv, env, timeout, no_input=input is None)
        start = time.monotonic()
        try:
            chan.sendall(frame({"line": line, "input": None if input is None else len(data)}, data))
        except (paramiko.SSHException, OSError) as exc:
            self.close()
            raise PeerError(f"connection to {self._where} failed while starting `{shlex.join(argv)}`: {exc}") from exc
        try:
            try:
                if self._session_read(chan, time.monotonic() + self.connect_timeout).get("ack") != 1:
                    raise ValueError("no acknowledgement")
            except TimeoutError:
                self.close()  # the peer went away (a cut link: the TCP session has not noticed yet)
                raise PeerError(f"{self._where} did not answer within {self.connect_timeout:g}s while starting "
                                f"`{shlex.join(argv)}`: the command may or may not have started there") from None
            deadline = start + timeout + KILL_AFTER + REMOTE_GRACE
            head = self._session_read(chan, deadline)
            out = self._session_take(chan, head["out"], deadline)
            err = self._session_take(chan, head["err"], deadline)
        except TimeoutError:
            self._end_session()
            raise CommandError(self.host, argv, None, "", timeout=timeout) from None
        except (EOFError, ValueError, KeyError, TypeError, paramiko.SSHException, OSError) as exc:
            lost = "connection" if not chan.get_transport().is_active() else f"serve session ({exc or 'it ended'})"
            self.close()
            raise PeerError(f"{lost} to {self._where} lost while running `{shlex.join(argv)}`: "
                            f"the command may or may not have completed there") from exc
        self._session_used = time.monotonic()
        return self._result(argv, int(head["code"]), out, _text(err), start, timeout)

    def _session_channel(self):
        """The open serve session of this connection, started when there is none; None when
        the peer runs no session (an older domubackup there, or none on the PATH)."""
        chan = self._session
        if chan is False:
            return None
        transport = self._client.get_transport()
        if chan is not None and (chan.closed or chan.eof_received or chan.exit_status_ready()
                                 or chan.get_transport() is not transport
                                 or time.monotonic() - self._session_used > SESSION_IDLE - 10):
            self._end_session()  # it ended while idle: nothing was lost, start another
            chan = None
        if chan is None:
            import paramiko

            try:
                chan = transport.open_session(timeout=self.connect_timeout)
                chan.exec_command(shlex.join([*self.session_program, SESSION]))
            except (paramiko.SSHException, OSError) as exc:  # a channel of its own says what is wrong
                log.debug("%s: cannot start a serve session: %s", self.host, exc)
                return None
            try:
                hello = self._session_read(chan, time.monotonic() + self.connect_timeout + 20)
                if hello.get("session") != 1:
                    raise ValueError(f"unexpected hello {hello!r}")
            except (TimeoutError, EOFError, ValueError, AttributeError, OSError) as exc:
                err = chan.recv_stderr(4096) if chan.recv_stderr_ready() else b""
                log.debug("%s: no serve session there (%s): %s", self.host, exc or "it ended",
                          _text(err).strip()[:300])
                chan.close()
                self._session = False
                return None
            self._session, self._session_used = chan, time.monotonic()
        return chan

    def _end_session(self) -> None:
        if self._session:
            self._session.close()
        if self._session is not False:
            self._session = None

    @classmethod
    def _session_take(cls, chan, n: int, deadline: float) -> bytes:
        """N bytes of CHAN by DEADLINE: TimeoutError, EOFError when the channel ends first."""
        data = b""
        while len(data) < n:
            chan.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = chan.recv(min(n - len(data), 1 << 20))
            except socket.timeout:
                raise TimeoutError() from None
            if not chunk:
                raise EOFError()
            data += chunk
        return data

    @classmethod
    def _session_read(cls, chan, deadline: float) -> dict:
        size = int.from_bytes(cls._session_take(chan, 4, deadline), "big")
        if size > 1 << 20:
            raise ValueError(f"a frame of {size} bytes")
        head = json.loads(cls._session_take(chan, size, deadline))
        if not isinstance(head, dict):
            raise ValueError("not a frame")
        return head

    def _refused(self, argv, code: int, stderr: str) -> None:
        """PeerRefused when the peer's `domubackup serve` refused ARGV (whatever ok_codes say)."""
        if code == EXIT_REFUSED and stderr.startswith(REFUSED):
            raise PeerRefused(f"{self.host} refused `{shlex.join(argv)}`: {stderr[len(REFUSED):].strip()}",
                              hint=f"{self.host}'s [serve] section decides what this host's key may do there")


    def _execute_openssh(self, argv, env, chunks, timeout):
        """ARGV fed CHUNKS (a block stream: seed, a blocks run) through OpenSSH's client, the
        ``ssh`` argv rsync uses (commands.ssh_command: the same pinned known_hosts, identity,
        port, keepalives), with the same remote line. Why not paramiko: its per-packet work in
        Python carries ~3.7 MiB/s under the lab's emulation where ``ssh`` carries ~14 (issue 17
        bench (c)). Exit 255 is ssh's own failure (our helpers never exit 255): PeerError."""
        from .runner import BASE_ENV, LocalRunner

        if self._local is None:
            self._local = LocalRunner(self.host)
        line = self.remote_command(argv, env, timeout)
        start = time.monotonic()
        try:  # the runner raises the error of making the chunks, once ssh ended
            code, out, err = self._local._execute((*self.openssh, "--", self.address, line), dict(BASE_ENV),
                                                  chunks, timeout + KILL_AFTER + REMOTE_GRACE)
        except CommandError as exc:
            if exc.timeout is not None:
                raise CommandError(self.host, argv, None, exc.stderr, timeout=timeout) from None
            raise
        stderr = _text(err)
        if code == 255:
            last = " | ".join(stderr.strip().splitlines()[-3:]) or "no message"
            raise PeerError(f"ssh to {self._where} failed while running `{shlex.join(argv)}`: {last}; "
                            f"the command may or may not have completed there",
                            hint="check that `ssh` reaches the peer as rsync does (`domubackup check`)")
        return self._result(argv, code, out, stderr, start, timeout)


class Stream:
    def __init__(self, runner: SSHRunner, argv: tuple[str, ...], timeout: float):
        self.runner, self.argv, self.timeout = runner, argv, timeout
        self.exit_code, self.stderr = None, ""

    def __iter__(self):
        from .runner import BASE_ENV

        r = self.runner
        r.connect()
        log.debug("%s: $ %s (streamed)", r.host, shlex.join(self.argv))
        chan = r._client.get_transport().open_session(timeout=r.connect_timeout)
        try:
            chan.exec_command(r.remote_command(self.argv, BASE_ENV, self.timeout, no_input=True))
            chan.settimeout(self.timeout)
            while True:
                data = chan.recv(1 << 20)
                if not data:
                    break
                yield data
            self.exit_code = chan.recv_exit_status()
            err = []
            while chan.recv_stderr_ready():
                err.append(chan.recv_stderr(65536))
            self.stderr = _text(b"".join(err))
        finally:
            chan.close()
