"""A private OpenSSH sshd on 127.0.0.1 (free port) with throwaway ed25519 keys."""

import os
import shutil
import socket
import subprocess
import time
from collections import namedtuple

import pytest

SSHD = "/usr/sbin/sshd"

Sshd = namedtuple("Sshd", "host port identity_file known_hosts tmp pid")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().split()[:2]  # [type, base64]


def start_sshd(tmp, authorized_keys):
    """An sshd on a free port of 127.0.0.1 whose root accepts AUTHORIZED_KEYS (a function of
    the client's public key line); yields its Sshd."""
    host_type, host_key = _keygen(tmp / "host_key")
    _keygen(tmp / "client_key")
    (tmp / "authorized_keys").write_text(authorized_keys((tmp / "client_key.pub").read_text()))
    port = _free_port()
    (tmp / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {tmp}/host_key\n"
        f"AuthorizedKeysFile {tmp}/authorized_keys\nPidFile {tmp}/sshd.pid\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "PermitRootLogin prohibit-password\n")
    known_hosts = tmp / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_type} {host_key}\n")
    log = open(tmp / "sshd.log", "w")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(tmp / "sshd_config")],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            pytest.fail(f"sshd exited {proc.returncode}: {(tmp / 'sshd.log').read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("sshd did not listen within 10 s")
            time.sleep(0.02)
    try:
        yield Sshd("127.0.0.1", port, str(tmp / "client_key"), str(known_hosts), tmp, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _needs_sshd():
    if os.geteuid() != 0 or not os.path.exists(SSHD) or not shutil.which("ssh-keygen"):
        pytest.skip("needs root, /usr/sbin/sshd and ssh-keygen")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's compiled-in privsep dir


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    _needs_sshd()
    yield from start_sshd(tmp_path_factory.mktemp("sshd"), lambda key: key)


@pytest.fixture(scope="session")
def serve_sshd(tmp_path_factory):
    """An sshd whose key runs only `domubackup serve --client dom0a` (the restricted peer),
    with a config of its own (CONFIG in its tmp: target_prefix tmp/target, web1 granted)."""
    import sys

    _needs_sshd()
    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "target").mkdir()
    (tmp / "domubackup.toml").write_text(
        f'dom0s = ["dom0a", "dom0b"]\ntarget_prefix = "{tmp}/target"\nlibvirt_uri = "test:///default"\n'
        '[serve]\nclients = { dom0a = ["web1"] }\n')
    forced = f'command="{sys.executable} -m domubackup serve --client dom0a -c {tmp}/domubackup.toml",restrict '
    yield from start_sshd(tmp, lambda key: forced + key)
