"""Host side of the lab: qemu VMs, their saved state, ssh, per-VM files, reset, install.

Python 3 stdlib only. The saved VM state lives under the base cache directory in a folder named
by the hash of labbuild.py and this file, so changing either rebuilds by itself.
"""

import hashlib
import io
import json
import os
import pathlib
import shlex
import shutil
import socket
import subprocess
import tarfile
import threading
import time

import labbuild
from labbuild import VMS, log, run

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
CACHE_ROOT = pathlib.Path(os.environ.get("DOMUBACKUP_LAB_CACHE", "/var/cache/domubackup-lab"))
RUN = pathlib.Path(os.environ.get("DOMUBACKUP_LAB_RUN", "/var/tmp/domubackup-lab/run"))
PORT_BASE = int(os.environ.get("DOMUBACKUP_LAB_PORT_BASE", "42200"))
VM_NAMES = list(VMS)
LINK_PORT = PORT_BASE + 10
MEMORY_MIB = 1024
DATA_DISK_SIZE = "8G"
WEB1_LVS = ["web1-disk", "web1-srv"]
# DOMUBACKUP_LAB_SERVE=1: each VM runs its peer's key only through `domubackup serve --client
# PEER` (issue 19's restricted setup, a forced command in root's authorized_keys), grants the
# lab's DomUs to both VMs ([serve] clients; prunes allowed from them: the tests prune from the
# client) and tags web1's replica LVs on dom0b (the DomUs tests add get theirs from seed).
SERVE = os.environ.get("DOMUBACKUP_LAB_SERVE") == "1"
SERVE_DOMUS = ["web1", "idle1", "back1", "evil1", "gpt1"]
FORCED = 'command="domubackup serve --client {client}",restrict '


def ssh_port(vm):
    return PORT_BASE + 1 + VM_NAMES.index(vm)


def base_dir():
    return CACHE_ROOT / f"base-{labbuild.recipe_hash()}"


def state_dir():
    digest = hashlib.sha256()
    for name in ["labbuild.py", "labvm.py"]:
        digest.update((HERE / name).read_bytes())
    return base_dir() / f"state-{digest.hexdigest()[:12]}"


def keys():
    return base_dir() / "keys"


# ---------------------------------------------------------------- ssh

def ssh_argv(vm, command=None, tty=False):
    """argv for ssh from the host into VM. command: list (quoted for the remote shell) or str."""
    argv = ["ssh", "-p", str(ssh_port(vm)), "-i", str(keys() / "host_id"),
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={RUN / 'known_hosts'}", "-o", "ConnectTimeout=10",
            "-o", "LogLevel=ERROR", "-o", f"ControlPath={RUN / (vm + '.ctl')}",
            "-o", "ServerAliveInterval=10"]
    argv += ["-t"] if tty else ["-T"]
    argv.append("root@127.0.0.1")
    if command is not None:
        argv += ["--", command if isinstance(command, str) else shlex.join(command)]
    return argv


def ssh(vm, command, check=True, input=None, timeout=None, capture=True, text=True):
    return subprocess.run(ssh_argv(vm, command), check=check, input=input, timeout=timeout,
                          stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.PIPE if capture else None,
                          stdin=None if input is not None else subprocess.DEVNULL, text=text)


def write_host_known_hosts():
    lines = []
    for vm in VM_NAMES:
        pub = (keys() / f"hostkey_{vm}.pub").read_text().split()
        lines.append(f"[127.0.0.1]:{ssh_port(vm)} {pub[0]} {pub[1]}\n")
    (RUN / "known_hosts").write_text("".join(lines))


def start_ssh_master(vm):
    """One multiplexed connection per VM makes later ssh calls cheap (no key exchange)."""
    argv = ssh_argv(vm)
    argv[1:1] = ["-f", "-N", "-M", "-o", "ControlPersist=yes"]
    subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False, timeout=30)


def stop_ssh_master(vm):
    if (RUN / f"{vm}.ctl").exists():
        argv = ssh_argv(vm)
        argv[1:1] = ["-O", "exit"]
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False, timeout=5)


def wait_ssh(vm, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ssh(vm, ["true"], check=False, timeout=15).returncode == 0:
                return
        except subprocess.TimeoutExpired:
            pass
        if not qemu_pid(vm):
            break
        time.sleep(0.5)
    tail = ""
    serial = RUN / f"{vm}.serial"
    if serial.exists():
        tail = "\n".join(serial.read_text(errors="replace").splitlines()[-30:])
    raise SystemExit(f"lab: {vm} did not answer ssh within {timeout} s; serial log tail:\n{tail}")


# ---------------------------------------------------------------- qemu

class QMP:
    def __init__(self, vm, timeout=30):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(str(RUN / f"{vm}.qmp"))
        self.file = self.sock.makefile("rwb")
        json.loads(self.file.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, name, **arguments):
        msg = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            line = self.file.readline()
            if not line:
                raise EOFError(f"qmp {name}: connection closed")
            reply = json.loads(line)
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"qmp {name}: {reply['error']}")

    def close(self):
        self.sock.close()


def qemu_pid(vm):
    try:
        pid = int((RUN / f"{vm}.pid").read_text())
        cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"qemu-system" in cmdline else None


def start_qemu(vm, root_disk, data_disk, incoming=None):
    addr, nat_mac, link_mac = VMS[vm]
    base = base_dir()
    link = f"listen=127.0.0.1:{LINK_PORT}" if vm == "dom0a" else f"connect=127.0.0.1:{LINK_PORT}"
    for name in [f"{vm}.qmp", f"{vm}.pid", f"{vm}.serial"]:
        (RUN / name).unlink(missing_ok=True)
    argv = [
        "qemu-system-x86_64", "-name", vm, "-M", "pc",
        "-accel", "tcg,thread=multi,tb-size=256", "-smp", "1", "-m", str(MEMORY_MIB),
        "-nodefaults", "-display", "none", "-serial", f"file:{RUN / (vm + '.serial')}",
        "-kernel", str(base / "vmlinuz"), "-initrd", str(base / "initrd.img"),
        # norandmaps: no address-space randomisation. qemu's translation cache is keyed by the
        # virtual address too, so with ASLR every new process translates its libc and ld.so
        # again: an exec cost ~50 ms and a backup run filled the 256 MB cache twice (`info jit`);
        # without it ~11 ms and the cache stays warm (a run 18-24 s -> 11 s).
        "-append", f"root=/dev/vda rw console=ttyS0 net.ifnames=0 systemd.hostname={vm} quiet norandmaps",
        "-drive", f"file={root_disk},if=virtio,format=qcow2,cache=unsafe,discard=unmap",
        # no detect-zeroes=unmap on the data disk: with it, qemu 7.2 turned the guest's zero
        # writes into unmaps of this overlay's clusters, and pages of LVs read back afterwards as
        # older data (a replica block the tool never wrote differed from its origin; rx5 in
        # issue 17's note: plain pwritev of 10 blocks changed an 11th)
        "-drive", f"file={data_disk},if=virtio,format=qcow2,cache=unsafe,discard=unmap",
        "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{ssh_port(vm)}-:22",
        "-device", f"virtio-net-pci,netdev=n0,mac={nat_mac}",
        "-netdev", f"socket,id=n1,{link}",
        "-device", f"virtio-net-pci,netdev=n1,mac={link_mac}",
        "-qmp", f"unix:{RUN / (vm + '.qmp')},server=on,wait=off",
        "-pidfile", str(RUN / f"{vm}.pid"), "-daemonize",
    ]
    if incoming:
        argv += ["-incoming", f"exec:cat {shlex.quote(str(incoming))}"]
    run(argv)


def overlay(path, backing, backing_format):
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", backing_format, "-b", str(backing),
         str(path)])


def save_state(vm, dest):
    """Pause VM and write its RAM/device state to dest (the disks stay as they are)."""
    ssh(vm, ["sync"], timeout=60)
    qmp = QMP(vm)
    try:
        qmp.cmd("stop")
        qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 64 << 30})
        tmp = f"{dest}.tmp"
        qmp.cmd("migrate", uri=f"exec:cat > {shlex.quote(tmp)}")
        while True:
            status = qmp.cmd("query-migrate").get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise RuntimeError(f"{vm}: saving state failed ({status})")
            time.sleep(0.1)
        os.rename(tmp, dest)
        qmp.cmd("quit")
    finally:
        qmp.close()
    wait_exit(vm, 10)


def wait_exit(vm, timeout):
    pid = qemu_pid(vm)
    deadline = time.monotonic() + timeout
    while pid and qemu_pid(vm) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not qemu_pid(vm)


def resume_after_incoming(vm, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            qmp = QMP(vm)
            break
        except OSError:
            time.sleep(0.05)
    else:
        raise SystemExit(f"lab: no QMP socket for {vm}")
    try:
        while time.monotonic() < deadline:
            status = qmp.cmd("query-status")["status"]
            if status == "running":
                return
            if status != "inmigrate":
                qmp.cmd("cont")
                return
            time.sleep(0.05)
        raise SystemExit(f"lab: {vm} still loading its state after {timeout} s")
    finally:
        qmp.close()


def parallel(fn, items):
    errors = []

    def call(item):
        try:
            fn(item)
        except BaseException as e:  # re-raised in the caller
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# ---------------------------------------------------------------- per-VM files

NODE_DOMAIN = """\
  <domain type='xen' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>{name}</name>
    <uuid>{uuid}</uuid>
    <memory unit='MiB'>512</memory>
    <vcpu>1</vcpu>
    <os><type arch='x86_64'>linux</type></os>
    <devices>
{disks}    </devices>
    <test:runstate>{state}</test:runstate>
  </domain>
"""
DISK = """\
      <disk type='block' device='disk'>
        <driver name='phy'/>
        <source dev='{dev}'/>
        <target dev='{target}' bus='xen'/>
      </disk>
"""
CDROM = """\
      <disk type='file' device='cdrom'>
        <target dev='hdc' bus='ide'/>
      </disk>
"""
RUNNING, SHUTOFF = 1, 5


def node_xml(vm):
    web1_disks = (DISK.format(dev="/dev/vg0/web1-disk", target="xvda")
                  + DISK.format(dev="/dev/vg0/web1-srv", target="xvdb") + CDROM)
    idle1_disks = DISK.format(dev="/dev/vg0/idle1-disk", target="xvda")
    return ("<node>\n"
            + NODE_DOMAIN.format(name="web1", uuid="6b1e7b3a-1f0e-4c59-9d5a-7a3c0e0b0001",
                                 disks=web1_disks,
                                 state=RUNNING if vm == "dom0a" else SHUTOFF)
            + NODE_DOMAIN.format(name="idle1", uuid="6b1e7b3a-1f0e-4c59-9d5a-7a3c0e0b0002",
                                 disks=idle1_disks, state=SHUTOFF)
            + "</node>\n")


def config_toml(vm, serve=None):
    """VM's domubackup.toml; SERVE (default: the lab's DOMUBACKUP_LAB_SERVE) adds [serve]."""
    peer = [v for v in VM_NAMES if v != vm][0]
    grant = json.dumps(SERVE_DOMUS)
    return f"""\
dom0s = ["dom0a", "dom0b"]
this_host = "{vm}"
libvirt_uri = "test:///etc/domubackup/lab-node.xml"
state_dir = "/var/lib/domubackup"
snapshot_size = "256M"
source_prefix = "/mnt/domubackup/source"
target_prefix = "/mnt/domubackup/target"
kpartx_separator = "p"

[ssh]
user = "root"
identity_file = "/root/.ssh/id_ed25519"
known_hosts = "/etc/domubackup/known_hosts"
port = 22
connect_timeout = 10

[domu.web1]
peers = ["{peer}"]
""" + (f"""
[serve]
clients = {{ dom0a = {grant}, dom0b = {grant} }}
allow_prune_from = ["dom0a", "dom0b"]
""" if (SERVE if serve is None else serve) else "")


def authorized_keys(vm, serve=None):
    """Root's authorized_keys of VM: the host's key, then the peer's (forced to serve)."""
    peer = [v for v in VM_NAMES if v != vm][0]
    forced = FORCED.format(client=peer) if (SERVE if serve is None else serve) else ""
    return (keys() / "host_id.pub").read_text() + forced + (keys() / "lab_id.pub").read_text()


def vm_files(vm):
    """{absolute path: (text, mode)} written into VM by reset."""
    known = (keys() / "vm_known_hosts").read_text()
    return {
        "/etc/domubackup/domubackup.toml": (config_toml(vm), 0o644),
        "/etc/domubackup/lab-node.xml": (node_xml(vm), 0o644),
        "/etc/domubackup/known_hosts": (known, 0o644),
        "/root/.ssh/known_hosts": (known, 0o644),
        "/root/.ssh/authorized_keys": (authorized_keys(vm), 0o600),
    }


def tar_bytes(members):
    """members: [(arcname, bytes, mode)] -> tar archive bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data, mode in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def push_files(vm, files):
    members = [(path.lstrip("/"), text.encode(), mode) for path, (text, mode) in files.items()]
    ssh(vm, ["tar", "-x", "--no-same-owner", "--warning=no-timestamp", "-C", "/"],
        input=tar_bytes(members), text=False, timeout=60)


def image_bundle():
    parts = []
    for lv in WEB1_LVS:
        parts.append(f"LV {lv}\n".encode())
        parts.append((base_dir() / f"{lv}.lsi").read_bytes())
    return b"".join(parts)


def reset_vm(vm, bundle):
    ssh(vm, ["lab-guest", "cleanup"], timeout=120)
    push_files(vm, vm_files(vm))
    ssh(vm, ["lab-guest", "load-images"], input=bundle, text=False, timeout=300)
    if SERVE and vm == "dom0b":  # web1's replicas, as an admin tags replicas older than seed's tag
        ssh(vm, ["lvchange", "-q", "--addtag", "dbk:domu:web1"] + [f"vg0/{lv}" for lv in WEB1_LVS])


def reset():
    bundle = image_bundle()
    parallel(lambda vm: reset_vm(vm, bundle), VM_NAMES)


# ---------------------------------------------------------------- install the tree

def build_deb():
    """The package of the working tree, built on the host by tools/build-deb (about 5 s)."""
    dist = RUN / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    result = subprocess.run([str(REPO / "tools/build-deb")], env=dict(os.environ, DOMUBACKUP_DIST=str(dist)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"tools/build-deb failed:\n{result.stderr[-3000:]}")
    return pathlib.Path(result.stdout.strip().splitlines()[-1])


def install_tarball():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        deb = build_deb()
        tar.add(str(deb), arcname=deb.name, recursive=False)
        tar.add(str(HERE / "guest" / "lab-guest"), arcname="lab-guest")
    return buf.getvalue()


INSTALL_SCRIPT = """set -e
rm -rf /var/lib/lab-incoming
mkdir -p /var/lib/lab-incoming
tar -x --no-same-owner --warning=no-timestamp -C /var/lib/lab-incoming
exec python3 /var/lib/lab-incoming/lab-guest install
"""


def install():
    """Install the working tree's .deb in both VMs (and resync their clocks: TCG guests drift)."""
    data = install_tarball()

    def install_vm(vm):
        set_clock(vm)
        ssh(vm, ["sh", "-c", INSTALL_SCRIPT], input=data, text=False, timeout=300, capture=False)
    parallel(install_vm, VM_NAMES)


# ---------------------------------------------------------------- up / down

def is_up():
    return all(qemu_pid(vm) for vm in VM_NAMES)


def set_clock(vm):
    ssh(vm, ["date", "-s", f"@{time.time():.3f}"], timeout=30)


def build_state():
    """Cold boot both VMs on the state disks, provision them, save their state. About 1 min."""
    state = state_dir()
    for old in base_dir().glob("state-*"):
        shutil.rmtree(old, ignore_errors=True)
    state.mkdir(parents=True)
    for vm in VM_NAMES:
        overlay(state / f"{vm}-root.qcow2", base_dir() / "base.raw", "raw")
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(state / f"{vm}-data.qcow2"),
             DATA_DISK_SIZE])
    log("cold boot of dom0a and dom0b")
    for vm in VM_NAMES:
        start_qemu(vm, state / f"{vm}-root.qcow2", state / f"{vm}-data.qcow2")
    try:
        for vm in VM_NAMES:
            wait_ssh(vm, 240)
        log("provisioning: tree, vg0, web1 disks")
        install()
        parallel(lambda vm: ssh(vm, ["lab-guest", "init-vg"], timeout=120), VM_NAMES)
        reset()
        log("saving VM state")
        parallel(lambda vm: save_state(vm, state / f"{vm}.state"), VM_NAMES)
    except BaseException:
        down()
        shutil.rmtree(state, ignore_errors=True)
        raise
    (state / "done").write_text("ok\n")


def start_warm():
    state = state_dir()
    for vm in VM_NAMES:
        for disk in ["root", "data"]:
            path = RUN / f"{vm}-{disk}.qcow2"
            path.unlink(missing_ok=True)
            overlay(path, state / f"{vm}-{disk}.qcow2", "qcow2")
    for vm in VM_NAMES:
        start_qemu(vm, RUN / f"{vm}-root.qcow2", RUN / f"{vm}-data.qcow2",
                   incoming=state / f"{vm}.state")
    try:
        parallel(resume_after_incoming, VM_NAMES)

        def ready(vm):
            wait_ssh(vm, 60)
            set_clock(vm)
            start_ssh_master(vm)
        parallel(ready, VM_NAMES)
    except BaseException:
        down()
        raise


def up():
    RUN.mkdir(parents=True, exist_ok=True)
    if is_up():
        log("lab already up; installing the tree")
        install()
        return
    down()
    labbuild.ensure(CACHE_ROOT)
    write_host_known_hosts()
    if not (state_dir() / "done").exists():
        build_state()
    log("starting dom0a and dom0b from the saved state")
    try:
        start_warm()
    except (Exception, SystemExit) as e:  # e.g. a saved state this qemu cannot load
        log(f"warm start failed ({e}); rebuilding the saved state")
        shutil.rmtree(state_dir(), ignore_errors=True)
        build_state()
        start_warm()
    install()
    log("lab up: " + ", ".join(f"{vm} ssh 127.0.0.1:{ssh_port(vm)}" for vm in VM_NAMES))


def down():
    for vm in VM_NAMES:
        stop_ssh_master(vm)
    pids = {vm: qemu_pid(vm) for vm in VM_NAMES}
    for vm, pid in pids.items():
        if pid:
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                pass
    for vm, pid in pids.items():
        if pid and not wait_exit(vm, 3):
            os.kill(pid, 9)
            wait_exit(vm, 2)
    if RUN.exists():
        for pattern in ["*.qcow2", "*.pid", "*.qmp", "*.ctl"]:
            for path in RUN.glob(pattern):
                path.unlink(missing_ok=True)
