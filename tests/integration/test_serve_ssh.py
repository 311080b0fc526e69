"""`domubackup serve` as the forced command of a real sshd (conftest serve_sshd): what the tool
sends for its granted DomU passes (commands, rsync's receiving end, a streamed command over
OpenSSH), a shell, `id`, a tree of another DomU, rsync outside the tree are refused, with
nothing written. (Its judgement of LVM objects: tests/unit/test_serve.py; in the lab:
tests/e2e/test_serve_e2e.py.)"""

import os
import subprocess
import time

import pytest

from domubackup.core import commands
from domubackup.core.config import RsyncSettings, SSHSettings
from domubackup.core.errors import PeerRefused
from domubackup.hosts.ssh import SSHRunner
from domubackup.jobs.preflight import peer_access


def settings(sshd):
    return SSHSettings(user="root", identity_file=sshd.identity_file, known_hosts=sshd.known_hosts,
                       port=sshd.port, connect_timeout=5)


@pytest.fixture
def peer(serve_sshd):
    with SSHRunner.for_host(serve_sshd.host, settings(serve_sshd)) as runner:
        yield runner


def test_the_tools_requests_pass_and_anything_else_is_refused(peer, serve_sshd):
    target = serve_sshd.tmp / "target"
    assert peer.run(["true"]).exit_code == 0
    peer.run(commands.mkdir(f"{target}/web1"))
    assert (target / "web1").is_dir()
    for argv, why in ((["id"], "refused `id`: `id` is not a command this host serves to dom0a"),
                      (["sh", "-c", "touch /tmp/pwned"], "`sh -c 'touch /tmp/pwned'` is not a command"),
                      (commands.mkdir(f"{target}/db1"), "is not the tree of a DomU granted to dom0a"),
                      (commands.mkdir("/tmp/pwned"), "is not under this host's target prefix"),
                      (["rm", "-f", "--", "/var/lib/domubackup/points/web1/20261202T031500Z.xml"], "append-only")):
        with pytest.raises(PeerRefused) as e:
            peer.run(argv, check=False)  # refused whatever the caller accepts
        assert why in str(e.value), str(e.value)
        assert str(e.value).startswith(f"{serve_sshd.host} refused `")
    assert not (target / "db1").exists() and not os.path.exists("/tmp/pwned")
    assert peer._session, "the requests went through one serve session"
    # through OpenSSH's client (a block stream's path) too
    assert peer.run(["true"], input=iter([b""])).exit_code == 0
    with pytest.raises(PeerRefused, match="`id` is not a command"):
        peer.run(["id"], input=iter([b"x"]))
    check = peer_access(peer, "127.0.0.1", "dom0a")
    assert check.ok and check.detail == "a shell command is refused there"


def test_a_session_judges_every_request_and_ends_on_a_bad_frame(peer, serve_sshd):
    """Frames written by hand (a compromised client speaks the protocol as it likes)."""
    from domubackup.core.serve import frame

    peer.connect()
    chan = peer._client.get_transport().open_session()
    chan.exec_command("anything at all serve-session")
    hello = peer._session_read(chan, time.monotonic() + 20)
    assert hello == {"session": 1}
    for line in ("sh -c 'touch /tmp/pwned'", "timeout -k 5 10 sh -c 'touch /tmp/pwned'",
                 "PATH=/tmp timeout -k 5 10 id", ""):
        chan.sendall(frame({"line": line, "input": None}))
        assert peer._session_read(chan, time.monotonic() + 20) == {"ack": 1}
        reply = peer._session_read(chan, time.monotonic() + 20)
        err = peer._session_take(chan, reply["out"] + reply["err"], time.monotonic() + 20).decode()
        assert reply["code"] == 77 and err.startswith("domubackup serve: refused: "), (line, reply, err)
    chan.sendall(frame({"line": "timeout -k 5 10 true", "input": 1 << 30}))  # more than a session takes
    assert chan.recv_exit_status() == 2
    chan.close()
    assert not os.path.exists("/tmp/pwned")


def test_a_login_without_a_command_is_refused(serve_sshd):
    r = subprocess.run([*commands.ssh_command(settings(serve_sshd)), serve_sshd.host], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 77
    assert "domubackup serve: refused: an interactive session" in r.stderr, r.stderr


def test_rsync_receives_only_into_the_domus_tree(serve_sshd, tmp_path):
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hostname").write_text("web1\n")
    target = serve_sshd.tmp / "target"
    ssh = settings(serve_sshd)
    argv = commands.rsync(str(src), serve_sshd.host, f"{target}/web1", RsyncSettings(), ssh)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (target / "web1" / "etc" / "hostname").read_text() == "web1\n"
    for dest, why in ((f"{target}/db1", "is not the tree of a DomU granted to dom0a"),
                      (str(tmp_path / "elsewhere"), "is not under this host's target prefix")):
        r = subprocess.run(commands.rsync(str(src), serve_sshd.host, dest, RsyncSettings(), ssh),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and why in r.stderr, r.stderr
        assert not os.path.exists(dest)
    r = subprocess.run(commands.rsync(str(src), serve_sshd.host, f"{target}/web1", RsyncSettings(), ssh,
                                      extra=("--backup-dir=/tmp/pwned", "--backup")),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "rsync option --backup-dir is not served" in r.stderr, r.stderr
