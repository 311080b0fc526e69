import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from domubackup.core.errors import CommandError, PeerError
from domubackup.hosts.ssh import SSHRunner

ECHO_ARGV = ["python3", "-c", "import sys, json; print(json.dumps(sys.argv[1:]))"]


# the peer's `domubackup serve-session` (this checkout's), or a channel per command
SESSION = {"session": (sys.executable, "-m", "domubackup"), "channel": None}


def make_runner(sshd, mode="session", **kw):
    args = dict(port=sshd.port, identity_file=sshd.identity_file, known_hosts=sshd.known_hosts,
                connect_timeout=5, default_timeout=30, session_program=SESSION[mode])
    args.update(kw)
    return SSHRunner(sshd.host, **args)


@pytest.fixture(scope="module", params=sorted(SESSION))
def peer(sshd, request):
    with make_runner(sshd, request.param) as runner:
        yield runner


def session_pid(runner):
    """The pid of the process that started this command's `timeout`: a session's, or sshd's shell."""
    return runner.run(["sh", "-c", "ps -o ppid= -p $PPID"]).stdout.strip()


def test_one_session_runs_the_commands_and_a_lost_one_is_replaced(sshd):
    with make_runner(sshd) as runner:
        pids = {session_pid(runner) for _ in range(3)}
        assert len(pids) == 1, pids
        os.kill(int(pids.pop()), signal.SIGKILL)  # the session ends while idle: nothing was running
        time.sleep(0.3)
        assert runner.run(["echo", "again"]).stdout == "again\n"
        pid = session_pid(runner)
        assert session_pid(runner) == pid
        os.kill(int(pid), signal.SIGSTOP)  # a peer that stops answering (a cut link, seen from here)
        try:
            start = time.monotonic()
            with pytest.raises(PeerError) as e:
                runner.run(["true"], timeout=600)
            assert time.monotonic() - start < 8  # the connect timeout (5 s), not the command's
            assert e.value.message == (f"127.0.0.1:{sshd.port} did not answer within 5s while starting `true`: "
                                       "the command may or may not have started there")
        finally:
            os.kill(int(pid), signal.SIGKILL)
        assert runner.run(["echo", "back"]).stdout == "back\n"  # a new connection, a new session
        assert session_pid(runner) != pid
    with make_runner(sshd, "channel") as runner:
        assert len({session_pid(runner) for _ in range(3)}) == 3
    # a peer without `domubackup serve-session` (an older version, none on the PATH): a channel each
    with make_runner(sshd, session_program=("/nonexistent/domubackup",)) as runner:
        assert len({session_pid(runner) for _ in range(3)}) == 3
        assert runner._session is False


def pgrep(pattern):
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()


def wait_gone(pattern, seconds=2.0):
    deadline = time.monotonic() + seconds
    while pgrep(pattern) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pgrep(pattern)


def test_hostile_words_arrive_unchanged_and_nothing_runs(peer, sshd):
    marker = sshd.tmp / "pwned"
    words = ["two words", "it's", 'say "hi"', f"$(touch {marker})", f"`touch {marker}`",
             f"; touch {marker}", f"&& touch {marker}", "line1\nline2", "*", "-rf", "--",
             "é ü 日本", "$HOME", "a\\b", "'\"'", "", " ", "\t"]
    r = peer.run([*ECHO_ARGV, *words])
    assert json.loads(r.stdout) == words
    assert r.host == "127.0.0.1"
    assert r.argv == (*ECHO_ARGV, *words)
    assert not marker.exists()


def test_environment_on_the_peer(peer):
    r = peer.run(["env"], env={"EXTRA": "a b'c", "HOSTILE": "$(touch /tmp/x); `id` \\ \"q\" *"})
    lines = r.stdout.splitlines()
    for want in ["LC_ALL=C", "LANG=C", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                 "LVM_SUPPRESS_FD_WARNINGS=1", "EXTRA=a b'c", "HOSTILE=$(touch /tmp/x); `id` \\ \"q\" *"]:
        assert want in lines
    assert peer.run(["sh", "-c", "test -t 0 || test -t 1 && echo tty || echo notty"]).stdout == "notty\n"


def test_remote_command_is_one_quoted_string(peer):
    assert peer.remote_command(["ls", "a b"], {"LC_ALL": "C", "X": "it's $(x); y"}, 7) == \
        "LC_ALL=C X='it'\"'\"'s $(x); y' timeout -k 5 7 ls 'a b'"
    assert peer.remote_command(["true"], {}, 1234567.5) == "timeout -k 5 1234567.5 true"
    assert peer.remote_command(["cat", "<x"], {}, 3, no_input=True) == "timeout -k 5 3 cat '<x' </dev/null"
    with pytest.raises(ValueError):
        peer.remote_command(["true"], {"A=B C": "x"}, 1)


def test_exit_codes_and_stderr_come_back(peer):
    r = peer.run(["sh", "-c", "echo out; echo err >&2; exit 3"], check=False)
    assert (r.exit_code, r.stdout, r.stderr) == (3, "out\n", "err\n")
    with pytest.raises(CommandError) as e:
        peer.run(["sh", "-c", "echo 'Volume group \"vg0\" not found' >&2; exit 5"])
    assert e.value.returncode == 5
    assert e.value.stderr == 'Volume group "vg0" not found\n'
    assert e.value.message.endswith('exited 5: Volume group "vg0" not found')
    assert peer.run(["sh", "-c", "exit 32"], ok_codes=(0, 32)).exit_code == 32
    assert peer.history[-1].exit_code == 32


def test_stdin_and_large_output(peer):
    assert peer.run(["cat"], input="héllo\n").stdout == "héllo\n"
    data = os.urandom(2_500_000).hex()  # 5 MB through stdin and back: beyond the SSH windows
    assert peer.run(["cat"], input=data).stdout == data
    assert peer.run(["cat"]).stdout == ""
    r = peer.run(["sh", "-c", "head -c 400000 /dev/zero | tr '\\0' e >&2; echo done"])
    assert (len(r.stderr), r.stdout) == (400000, "done\n")


def test_missing_program_on_the_peer(peer):
    with pytest.raises(CommandError) as e:
        peer.run(["kpartx-not-here", "-l"])
    assert e.value.returncode == 127
    assert str(e.value) == ("on 127.0.0.1: `kpartx-not-here -l` exited 127: kpartx-not-here: not "
                            "installed on 127.0.0.1 (install the package that provides "
                            "kpartx-not-here on 127.0.0.1)")


def test_timeout_kills_the_remote_process_group(peer):
    start = time.monotonic()
    with pytest.raises(CommandError) as e:
        peer.run(["sh", "-c", "sleep 31.41801 & sleep 31.41802 & wait"], timeout=1)
    assert 1 <= time.monotonic() - start < 4
    assert e.value.timeout == 1
    assert e.value.message == "on 127.0.0.1: `sh -c 'sleep 31.41801 & sleep 31.41802 & wait'` timed out after 1s"
    assert wait_gone("sleep 31.4180") == []
    assert peer.run(["true"]).exit_code == 0  # the connection is still usable


def test_unknown_host_key_is_refused(sshd, tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text((open(sshd.known_hosts).read()).replace(f"[127.0.0.1]:{sshd.port}", "[127.0.0.1]:1"))
    with pytest.raises(PeerError) as e:
        make_runner(sshd, known_hosts=str(kh)).run(["true"])
    assert e.value.message == (f"the host key of 127.0.0.1:{sshd.port} is unknown: no entry for "
                               f"[127.0.0.1]:{sshd.port} in {kh}")
    assert e.value.hint == (f"verify the fingerprint, then add it, e.g. `ssh-keyscan -p {sshd.port} "
                            f"127.0.0.1 >> {kh}`")


def test_changed_host_key_is_refused(sshd, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    other = (tmp_path / "other.pub").read_text().split()[:2]
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{sshd.port} {other[0]} {other[1]}\n")
    with pytest.raises(PeerError) as e:
        make_runner(sshd, known_hosts=str(kh)).run(["true"])
    assert e.value.message == (f"the host key of 127.0.0.1:{sshd.port} has CHANGED: it does not match the "
                               f"entry for [127.0.0.1]:{sshd.port} in {kh} (possible man-in-the-middle "
                               f"attack, or the host was reinstalled)")
    assert e.value.hint == (f"verify the new fingerprint out of band, then fix the entry for "
                            f"[127.0.0.1]:{sshd.port} in {kh}")


def test_missing_known_hosts_file(sshd, tmp_path):
    with pytest.raises(PeerError) as e:
        make_runner(sshd, known_hosts=str(tmp_path / "nope")).run(["true"])
    assert e.value.message == f"cannot read known_hosts file {tmp_path}/nope: No such file or directory"


def test_wrong_client_key_is_an_auth_failure(sshd, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "stranger")], check=True)
    with pytest.raises(PeerError) as e:
        make_runner(sshd, identity_file=str(tmp_path / "stranger")).run(["true"])
    assert e.value.message == f"authentication to root@127.0.0.1:{sshd.port} failed: Authentication failed."


def test_connection_refused(sshd):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PeerError) as e:
        make_runner(sshd, port=port).run(["true"])
    assert e.value.message == f"cannot connect to 127.0.0.1:{port}: Connection refused"


def test_unknown_host_name(sshd):
    with pytest.raises(PeerError) as e:
        SSHRunner("no-such-host.invalid", known_hosts=sshd.known_hosts, connect_timeout=3).run(["true"])
    assert e.value.message.startswith("cannot resolve peer host name no-such-host.invalid: ")


@pytest.mark.parametrize("mode", sorted(SESSION))
def test_dropped_connection_is_a_peer_error_not_a_hang(sshd, mode):
    def children():
        out = subprocess.run(["pgrep", "-P", str(sshd.pid)], capture_output=True, text=True).stdout
        return set(out.split())

    runner = make_runner(sshd, mode)
    before = children()
    runner.connect()
    ours = children() - before  # the per-connection sshd process of this runner
    assert len(ours) == 1
    outcome = {}

    def run():
        try:
            runner.run(["sleep", "31.41901"], timeout=20)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome["exc"] = exc

    t = threading.Thread(target=run)
    t.start()
    try:
        deadline = time.monotonic() + 5
        while not pgrep("sleep 31.41901") and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(int(ours.pop()), signal.SIGKILL)
        t.join(5)
        assert not t.is_alive()
        exc = outcome["exc"]
        assert isinstance(exc, PeerError)
        assert exc.message == (f"connection to 127.0.0.1:{sshd.port} lost while running `sleep 31.41901`: "
                               "the command may or may not have completed there")
    finally:
        for pid in pgrep("sleep 31.41901"):  # the orphaned remote command (our own process)
            os.kill(int(pid), signal.SIGKILL)
    # the next run() reconnects
    assert runner.run(["true"]).exit_code == 0
    runner.close()


def test_a_late_eof_never_breaks_the_connection(sshd, monkeypatch):
    """paramiko can send a channel's EOF after the CLOSE that answers sshd's (paramiko#1115); if
    sshd has freed the channel by then it drops the whole connection ("ieof packet referred to
    nonexistent channel") and the next command failed with "Unable to open channel" (seen in the
    lab once commands got fast). Here every EOF sent from a thread is late, as from a thread
    that lost the CPU, and the next command waits until it has arrived."""
    import paramiko
    send = paramiko.Transport._send_user_message

    def late_eof(transport, message):
        if message.asbytes()[:1] == bytes([96]) and threading.current_thread() is not threading.main_thread():
            time.sleep(0.3)
        send(transport, message)

    monkeypatch.setattr(paramiko.Transport, "_send_user_message", late_eof)
    with make_runner(sshd) as runner:
        runner.run(["true"])
        transport = runner._client.get_transport()
        for _ in range(3):  # no input: stdin is /dev/null there, no EOF of ours
            assert runner.run(["true"]).exit_code == 0
            time.sleep(0.6)
        assert runner.run(["cat"], input=b"read to the end\n").stdout == "read to the end\n"
        time.sleep(0.6)
        assert runner._client.get_transport() is transport and transport.is_active()
        # input the command does not read: sshd may close first and then drop the connection;
        # the next command opens a new one (it had not started, so it runs once)
        runner.run(["true"], input=b"ignored\n")
        time.sleep(0.6)
        assert runner.run(["echo", "still here"]).stdout == "still here\n"


def rsync_ssh_settings(sshd, **kw):
    from domubackup.core.config import SSHSettings

    return SSHSettings(**{"user": "root", "identity_file": sshd.identity_file, "known_hosts": sshd.known_hosts,
                          "port": sshd.port, "connect_timeout": 5, **kw})


def test_rsync_runs_over_the_ssh_command_of_the_config(sshd, tmp_path):
    # The exact argv a backup runs (commands.rsync and its ssh_command, -F none and all),
    # against the private sshd: it connects with the pinned key only and copies.
    from domubackup.core import commands
    from domubackup.core.config import RsyncSettings

    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hostname").write_text("web1\n")
    dst.mkdir()
    argv = commands.rsync(str(src), sshd.host, str(dst), RsyncSettings(), rsync_ssh_settings(sshd))
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (dst / "etc" / "hostname").read_text() == "web1\n"
    ssh = argv[argv.index("-e") + 1]
    assert ssh.startswith("ssh -F none -p ")


def test_ssh_command_options_are_what_openssh_uses(sshd):
    # `ssh -G` prints the configuration the options give (nothing is read from ssh_config).
    from domubackup.core import commands

    argv = commands.ssh_command(rsync_ssh_settings(sshd))
    r = subprocess.run([*argv, "-G", sshd.host], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    got = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert {k: got.get(k) for k in ("globalknownhostsfile", "userknownhostsfile", "stricthostkeychecking",
                                    "updatehostkeys", "controlmaster", "controlpath", "forwardagent",
                                    "forwardx11", "clearallforwardings", "permitlocalcommand", "port",
                                    "batchmode", "identitiesonly", "user", "checkhostip")} == {
        "globalknownhostsfile": "/dev/null", "userknownhostsfile": sshd.known_hosts,
        "stricthostkeychecking": "true", "updatehostkeys": "false", "controlmaster": "false",
        "controlpath": None, "forwardagent": "no", "forwardx11": "no", "clearallforwardings": "yes",
        "permitlocalcommand": "no", "port": str(sshd.port), "batchmode": "yes", "identitiesonly": "yes",
        "user": "root", "checkhostip": "no"}


def one_dom0_at_an_address(sshd, known_hosts=None):
    """The SSH settings of a config that names the private sshd "peerb" (a name that does not
    resolve) and gives its address and port in [dom0.peerb]."""
    from domubackup.core.config import parse_config

    c = parse_config(f'dom0s = ["peera", "peerb"]\n[dom0.peerb]\naddress = "127.0.0.1"\nport = {sshd.port}\n'
                     f'[ssh]\nidentity_file = "{sshd.identity_file}"\nknown_hosts = "{known_hosts or sshd.known_hosts}"\n',
                     hostname="peera", default_uri="test:///default")
    return c.defaults.ssh


@pytest.fixture
def hostile_home(tmp_path, monkeypatch, sshd):
    """A HOME whose ~/.ssh would send both clients elsewhere, with a wrong key: neither reads it."""
    ssh_dir = tmp_path / "home" / ".ssh"
    ssh_dir.mkdir(parents=True)
    (ssh_dir / "config").write_text("Host *\n  HostName 192.0.2.1\n  Port 1\n  User nobody\n"
                                    "  ProxyCommand false\n  UserKnownHostsFile ~/.ssh/known_hosts\n")
    (ssh_dir / "known_hosts").write_text(
        f"[127.0.0.1]:{sshd.port} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHkFTRy5Ljm3yIkwn3aY7VvgZnFGgjbq6FjcQuGgHhyE\n")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_both_clients_reach_a_dom0_by_its_address_and_port_with_the_same_pinned_key(sshd, tmp_path, hostile_home):
    # paramiko (the SSHRunner of a job) and rsync's ssh (commands.rsync) both connect to
    # [dom0.peerb]'s address and port and both look the key up as [127.0.0.1]:PORT.
    from domubackup.core import commands
    from domubackup.jobs import backup as backup_job
    from domubackup.core.config import RsyncSettings

    ssh = one_dom0_at_an_address(sshd)
    with backup_job.ssh_runner("peerb", ssh) as runner:
        r = runner.run(["echo", "hi"])
    assert (r.host, r.stdout) == ("peerb", "hi\n")  # the name stays the identity
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "f").write_text("x\n")
    dst.mkdir()
    argv = commands.rsync(str(src), "peerb", str(dst), RsyncSettings(), ssh)
    assert argv[-1] == f"127.0.0.1:{dst}/"
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert (dst / "f").read_text() == "x\n"


def test_both_clients_refuse_a_key_pinned_under_the_name_instead_of_the_address(sshd, tmp_path, hostile_home):
    from domubackup.core import commands
    from domubackup.jobs import backup as backup_job
    from domubackup.core.config import RsyncSettings

    kh = tmp_path / "known_hosts"
    kh.write_text(open(sshd.known_hosts).read().replace("[127.0.0.1]", "[peerb]"))
    ssh = one_dom0_at_an_address(sshd, known_hosts=kh)
    with pytest.raises(PeerError) as e:
        backup_job.ssh_runner("peerb", ssh).run(["true"])
    assert e.value.message == (f"the host key of peerb (127.0.0.1:{sshd.port}) is unknown: no entry for "
                               f"[127.0.0.1]:{sshd.port} in {kh}")
    assert e.value.hint.endswith(f"`ssh-keyscan -p {sshd.port} 127.0.0.1 >> {kh}`")
    (tmp_path / "src").mkdir()
    res = subprocess.run(commands.rsync(str(tmp_path / "src"), "peerb", str(tmp_path / "dst"), RsyncSettings(), ssh),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode in (12, 255)  # ssh's 255, or rsync's 12 when it saw the pipe close first
    assert "Host key verification failed" in res.stderr


def test_a_block_stream_goes_through_openssh_with_the_same_pinned_key(sshd, tmp_path):
    # An iterable input (seed's and a blocks run's stream) is carried by the ssh client argv of
    # the config, not paramiko: the bytes arrive whole, words unchanged, exit codes come back.
    import hashlib

    runner = SSHRunner.for_host(sshd.host, rsync_ssh_settings(sshd))
    chunks = [os.urandom(1 << 20) for _ in range(6)] + [b"", b"tail"]
    with runner:
        r = runner.run(["sh", "-c", 'sha256sum; echo "$1" >&2', "-", "a b;$(id)'"], input=iter(chunks))
        assert r.stdout.split()[0] == hashlib.sha256(b"".join(chunks)).hexdigest()
        assert r.stderr == "a b;$(id)'\n"
        assert runner._client is None  # paramiko never connected
        r = runner.run(["sh", "-c", "cat >/dev/null; exit 3"], input=iter([b"x"]), check=False)
        assert r.exit_code == 3
        with pytest.raises(CommandError) as e:
            runner.run(["sleep", "30"], input=iter([b""]), timeout=1)
        assert e.value.timeout == 1
    (tmp_path / "kh").write_text("")  # the peer's key is not pinned: ssh refuses, a PeerError
    runner = SSHRunner.for_host(sshd.host, rsync_ssh_settings(sshd, known_hosts=str(tmp_path / "kh")))
    with pytest.raises(PeerError) as e:
        runner.run(["cat"], input=iter([b"x"]))
    assert "ssh to 127.0.0.1" in str(e.value) and "Host key verification failed" in str(e.value), str(e.value)


@pytest.mark.parametrize("openssh", [True, False])
def test_a_failing_stream_ends_the_command_with_its_error(sshd, openssh):
    # The snapshot's read fails mid-stream: the remote end sees end-of-file at once (not a
    # stdin left open until the timeout) and the run gets the read error itself.
    def blocks():
        yield b"x" * 100000
        raise OSError(5, "Input/output error")

    runner = SSHRunner.for_host(sshd.host, rsync_ssh_settings(sshd))
    if not openssh:
        runner.openssh = None
    start = time.monotonic()
    with runner, pytest.raises(OSError, match="Input/output error"):
        runner.run(["wc", "-c"], input=blocks(), timeout=20)
    assert time.monotonic() - start < 10
