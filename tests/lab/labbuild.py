"""Build the lab's cached artefacts on the host: keys, base image, kernel/initrd, web1 disk images.

Everything here runs natively on the host (no emulation). The hash of this file names the cache
directory, so changing the recipe rebuilds by itself. Python 3 stdlib only.
"""

import glob
import hashlib
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import tempfile
import threading

SUITE = "bookworm"

# Debian packages inside each lab VM.
GUEST_PACKAGES = [
    "linux-image-amd64", "initramfs-tools", "systemd-sysv", "udev", "kmod", "procps",
    "lvm2", "kpartx", "parted", "util-linux", "e2fsprogs", "xfsprogs", "dosfstools",
    "openssh-server", "openssh-client", "rsync", "libvirt-clients",
    # domubackup's own dependencies (its .deb, installed by `lab install`, names them):
    # Debian's versions, so that the lab runs the code on bookworm's python3-sh 1.14.
    "python3", "python3-libvirt", "python3-lxml", "python3-paramiko", "python3-sh",
    "python3-tqdm",
    "python3-cffi-backend",  # debootstrap does not resolve the virtual cffi-backend-api deps
    "thin-provisioning-tools",  # thin pools: thin replicas and their restore points, thin_delta
    "python3-xxhash",  # the blocks mode's block hash
    "xxhash",  # xxh128sum: the baseline of tests/bench/bench_blocks.py
    "iproute2", "zstd",
]

VMS = {
    # name: (link address, MAC of the NAT nic, MAC of the link nic)
    "dom0a": ("10.77.0.1", "52:54:00:4c:00:0a", "52:54:00:4c:01:0a"),
    "dom0b": ("10.77.0.2", "52:54:00:4c:00:0b", "52:54:00:4c:01:0b"),
}

MIB = 1024 * 1024
WEB1_DISK_MIB = 1200
WEB1_SRV_MIB = 1536
ROOT_IMAGE_SIZE = "3G"


def log(msg):
    print(f"[lab] {msg}", flush=True)


def run(argv, **kw):
    kw.setdefault("check", True)
    return subprocess.run(argv, **kw)


def out(argv):
    return run(argv, stdout=subprocess.PIPE, text=True).stdout


REPO = pathlib.Path(__file__).resolve().parent.parent.parent


def recipe_hash():
    return hashlib.sha256(pathlib.Path(__file__).read_bytes()).hexdigest()[:12]


def apt_mirror():
    """The Debian mirror URL for SUITE, read from the host's apt sources."""
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for stanza in pathlib.Path(path).read_text().split("\n\n"):
            fields = {}
            for line in stanza.splitlines():
                if ":" in line and not line.startswith((" ", "#")):
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.split()
            if SUITE in fields.get("suites", []) and "deb" in fields.get("types", []):
                return fields["uris"][0]
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        if not os.path.exists(path):
            continue
        for line in pathlib.Path(path).read_text().splitlines():
            words = line.split()
            if len(words) >= 3 and words[0] == "deb":
                words = [w for w in words if not w.startswith("[")]
                if len(words) >= 3 and words[2] == SUITE:
                    return words[1]
    raise SystemExit(f"no apt source for {SUITE} found on this host")


# ---------------------------------------------------------------- keys

def make_keys(keys):
    keys.mkdir(parents=True, exist_ok=True)
    for name in ["host_id", "lab_id", "hostkey_dom0a", "hostkey_dom0b"]:
        if not (keys / name).exists():
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"domubackup-lab-{name}",
                 "-f", str(keys / name)])
    lines = []
    for vm, (addr, _, _) in VMS.items():
        pub = (keys / f"hostkey_{vm}.pub").read_text().split()
        lines.append(f"{vm},{addr} {pub[0]} {pub[1]}\n")
    (keys / "vm_known_hosts").write_text("".join(lines))


# ---------------------------------------------------------------- base image

def write(path, text, mode=0o644):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def configure_rootfs(root, keys):
    write(root / "etc/hostname", "lab\n")
    write(root / "etc/hosts", "127.0.0.1 localhost\n" + "".join(
        f"{addr} {vm}\n" for vm, (addr, _, _) in VMS.items()))
    write(root / "etc/fstab", "/dev/vda / ext4 rw,noatime,errors=remount-ro 0 1\n")
    write(root / "etc/initramfs-tools/conf.d/lab.conf", "MODULES=list\n")
    write(root / "etc/initramfs-tools/modules", "virtio_pci\nvirtio_blk\next4\ncrc32c_generic\n")
    for path in glob.glob(str(root / "etc/modules-load.d/*")) + [str(root / "etc/modules")]:
        if os.path.isfile(path):
            os.remove(path)
    write(root / "etc/systemd/journald.conf.d/lab.conf", "[Journal]\nStorage=volatile\n")

    # Network: NAT nic (host ssh) and the private VM<->VM link, matched by MAC.
    nat_macs = " ".join(nat for _, nat, _ in VMS.values())
    write(root / "etc/systemd/network/10-nat.network",
          f"[Match]\nMACAddress={nat_macs}\n\n[Network]\nAddress=10.0.2.15/24\nGateway=10.0.2.2\n"
          "LinkLocalAddressing=no\nIPv6AcceptRA=no\n")
    for vm, (addr, _, link_mac) in VMS.items():
        write(root / f"etc/systemd/network/20-link-{vm}.network",
              f"[Match]\nMACAddress={link_mac}\n\n[Network]\nAddress={addr}/24\n"
              "LinkLocalAddressing=no\nIPv6AcceptRA=no\n")

    # ssh: per-VM host keys, chosen at first boot by host name, the others removed.
    for path in glob.glob(str(root / "etc/ssh/ssh_host_*")):
        os.remove(path)
    for vm in VMS:
        d = root / "etc/ssh/lab-hostkeys" / vm
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(keys / f"hostkey_{vm}", d / "ssh_host_ed25519_key")
        shutil.copy(keys / f"hostkey_{vm}.pub", d / "ssh_host_ed25519_key.pub")
        (d / "ssh_host_ed25519_key").chmod(0o600)
    write(root / "usr/local/sbin/lab-hostkeys",
          "#!/bin/sh\nset -e\nh=$(hostname)\n"
          "cp -p /etc/ssh/lab-hostkeys/$h/ssh_host_ed25519_key* /etc/ssh/\n"
          "echo $h > /etc/hostname\nrm -rf /etc/ssh/lab-hostkeys\n", 0o755)
    write(root / "etc/systemd/system/lab-hostkeys.service",
          "[Unit]\nDescription=Lab per-VM ssh host keys\nBefore=ssh.service\n"
          "ConditionPathExists=/etc/ssh/lab-hostkeys\n\n"
          "[Service]\nType=oneshot\nExecStart=/usr/local/sbin/lab-hostkeys\n\n"
          "[Install]\nWantedBy=multi-user.target\n")
    write(root / "etc/ssh/sshd_config.d/lab.conf",
          "HostKey /etc/ssh/ssh_host_ed25519_key\nPermitRootLogin prohibit-password\n"
          "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUseDNS no\n"
          "MaxSessions 50\nMaxStartups 50:30:100\n")
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    write(ssh_dir / "authorized_keys",
          (keys / "host_id.pub").read_text() + (keys / "lab_id.pub").read_text(), 0o600)
    shutil.copy(keys / "lab_id", ssh_dir / "id_ed25519")
    shutil.copy(keys / "lab_id.pub", ssh_dir / "id_ed25519.pub")
    (ssh_dir / "id_ed25519").chmod(0o600)
    write(ssh_dir / "known_hosts", (keys / "vm_known_hosts").read_text(), 0o644)
    write(ssh_dir / "config", "Host *\n  StrictHostKeyChecking yes\n  BatchMode yes\n")

    for d in ["mnt/guest", "mnt/domubackup/source", "mnt/domubackup/target", "etc/domubackup",
              "var/lib/domubackup"]:
        (root / d).mkdir(parents=True, exist_ok=True)

    chroot = ["chroot", str(root)]
    run(chroot + ["systemctl", "enable", "-q", "systemd-networkd.service", "lab-hostkeys.service"])
    run(chroot + ["systemctl", "mask", "-q", "systemd-networkd-wait-online.service",
                  "systemd-modules-load.service", "apt-daily.timer", "apt-daily-upgrade.timer",
                  "e2scrub_all.timer", "e2scrub_reap.service", "fstrim.timer",
                  "systemd-timesyncd.service", "man-db.timer"])

    run(chroot + ["update-initramfs", "-u", "-k", "all"], stdout=subprocess.DEVNULL)


def build_base(cache, keys):
    """debootstrap + configure + ext4 image. Writes base.raw, vmlinuz, initrd.img to cache.

    The debootstrapped tree stays in /dev/shm when a later step fails, so a retry is quicker."""
    mirror = apt_mirror()
    work = pathlib.Path("/dev/shm") / f"dblab-build-{recipe_hash()}"
    root = work / "root"
    if not (work / "debootstrap.done").exists():
        shutil.rmtree(work / "root", ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        log(f"debootstrap {SUITE} from {mirror} (about 2 minutes)")
        with open(cache / "debootstrap.log", "w") as logfile:
            result = run(["debootstrap", "--variant=minbase",
                          "--include=" + ",".join(GUEST_PACKAGES), SUITE, str(root), mirror],
                         stdout=logfile, stderr=subprocess.STDOUT, check=False)
        if result.returncode != 0:
            detail = root / "debootstrap/debootstrap.log"
            tail = detail.read_text(errors="replace")[-3000:] if detail.exists() else ""
            raise SystemExit(f"debootstrap failed, see {cache / 'debootstrap.log'}\n{tail}")
        (work / "debootstrap.done").write_text("ok\n")
    for fs in ["proc", "sys", "dev"]:
        run(["mount", "--bind", f"/{fs}", str(root / fs)])
    try:
        configure_rootfs(root, keys)
    finally:
        for fs in ["dev", "sys", "proc"]:
            run(["umount", "-l", str(root / fs)], check=False)
    run(["chroot", str(root), "apt-get", "clean"])
    boot = root / "boot"
    shutil.copy(sorted(boot.glob("vmlinuz-*"))[-1], cache / "vmlinuz")
    shutil.copy(sorted(boot.glob("initrd.img-*"))[-1], cache / "initrd.img")
    log("making the base image")
    tmp = cache / "base.raw.tmp"
    run(["mkfs.ext4", "-q", "-F", "-L", "labroot", "-d", str(root), str(tmp), ROOT_IMAGE_SIZE])
    tmp.rename(cache / "base.raw")
    shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- web1 disk images

GUEST_TREE = {
    "etc/hostname": "web1\n",
    "etc/hosts": "127.0.0.1 localhost\n127.0.1.1 web1\n",
    "etc/os-release": 'PRETTY_NAME="Lab guest web1"\nID=debian\n',
    "etc/motd": "web1 lab guest\n",
    "root/.profile": "PS1='web1# '\n",
    "usr/share/lab/README": "This is the root filesystem of the lab DomU web1.\n",
}
VAR_TREE = {
    "log/lab.txt": "web1 /var log file\n",
    "lib/lab/state": "var state 1\n",
    "spool/mail/root": "",
}
SRV_TREE = {
    "www/index.html": "<html><body>web1 lab</body></html>\n",
    "www/sub dir/file with spaces.txt": "spaces\n",
    "data/README": "web1 /srv data\n",
}


def populate(top, tree):
    for rel, text in tree.items():
        path = pathlib.Path(top) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def partitions(image):
    """{number: (offset, size)} from parted -m."""
    parts = {}
    for line in out(["parted", "-s", "-m", str(image), "unit", "B", "print"]).splitlines():
        fields = line.rstrip(";").split(":")
        if fields[0].isdigit():
            parts[int(fields[0])] = (int(fields[1].rstrip("B")), int(fields[3].rstrip("B")))
    return parts


class Loop:
    def __init__(self, image, offset=0, size=None):
        argv = ["losetup", "--show", "-f", "-o", str(offset)]
        if size:
            argv += ["--sizelimit", str(size)]
        self.dev = out(argv + [str(image)]).strip()

    def close(self):
        run(["losetup", "-d", self.dev], check=False)


def blkid(dev, tag):
    return out(["blkid", "-s", tag, "-o", "value", dev]).strip()


def build_web1_images(cache):
    work = pathlib.Path(tempfile.mkdtemp(prefix="dblab-web1-", dir="/dev/shm"))
    loops, mounts = [], []
    try:
        disk, srv = work / "web1-disk.raw", work / "web1-srv.raw"
        with open(disk, "wb") as f:
            f.truncate(WEB1_DISK_MIB * MIB)
        with open(srv, "wb") as f:
            f.truncate(WEB1_SRV_MIB * MIB)
        run(["parted", "-s", "-a", "optimal", str(disk), "mklabel", "msdos",
             "mkpart", "primary", "ext4", "1MiB", "401MiB",
             "mkpart", "extended", "401MiB", "100%",
             "mkpart", "logical", "xfs", "402MiB", "1050MiB",
             "mkpart", "logical", "linux-swap", "1051MiB", "100%"])
        parts = partitions(disk)
        p1, p5, p6 = (Loop(disk, *parts[n]) for n in (1, 5, 6))
        lsrv = Loop(srv)
        loops += [p1, p5, p6, lsrv]
        run(["mkfs.ext4", "-q", "-L", "web1-root", p1.dev])
        run(["mkfs.xfs", "-q", "-L", "web1-var", p5.dev])
        run(["mkswap", "-L", "web1-swap", p6.dev], stdout=subprocess.DEVNULL)
        run(["mkfs.ext4", "-q", "-L", "web1-srv", lsrv.dev])
        mnt = work / "mnt"
        mnt.mkdir()
        run(["mount", p1.dev, str(mnt)])
        mounts.append(mnt)
        for d in ["var", "srv", "tmp", "proc", "sys", "dev", "boot"]:
            (mnt / d).mkdir()
        populate(mnt, GUEST_TREE)
        (mnt / "etc/fstab").write_text(
            f"UUID={blkid(p1.dev, 'UUID')} / ext4 defaults 0 1\n"
            "LABEL=web1-var /var xfs defaults 0 2\n"
            f"UUID={blkid(p6.dev, 'UUID')} none swap sw 0 0\n"
            "LABEL=web1-srv /srv ext4 defaults 0 2\n")
        os.symlink("../usr/share/lab/README", mnt / "etc/README.link")
        os.link(mnt / "etc/motd", mnt / "etc/motd.hardlink")
        run(["mount", p5.dev, str(mnt / "var")])
        mounts.append(mnt / "var")
        populate(mnt / "var", VAR_TREE)
        run(["mount", lsrv.dev, str(mnt / "srv")])
        mounts.append(mnt / "srv")
        populate(mnt / "srv", SRV_TREE)
        with open(mnt / "srv/data/blob.bin", "wb") as f:
            f.write(hashlib.sha256(b"web1").digest() * 32768)   # 1 MiB, deterministic
        for m in reversed(mounts):
            run(["umount", str(m)])
        mounts.clear()
        for lo in loops:
            lo.close()
        loops.clear()
        for raw in (disk, srv):
            write_stream(raw, cache / (raw.stem + ".lsi"))
    finally:
        for m in reversed(mounts):
            run(["umount", str(m)], check=False)
        for lo in loops:
            lo.close()
        shutil.rmtree(work, ignore_errors=True)


# Lab sparse image (.lsi): b"LABIMG1 <size>\n", then records (offset u64, length u64, data),
# ended by a record of length 0. Zero blocks are left out: the target must be zeroed first.
BLOCK = 64 * 1024


def write_stream(raw, dest):
    size = os.path.getsize(raw)
    with open(raw, "rb") as src, open(dest, "wb") as dst:
        dst.write(f"LABIMG1 {size}\n".encode())
        fd = src.fileno()
        pos = 0
        zero = bytes(BLOCK)
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            src.seek(start)
            off = start
            while off < end:
                block = src.read(min(BLOCK, end - off))
                if block != zero[:len(block)]:
                    dst.write(struct.pack(">QQ", off, len(block)))
                    dst.write(block)
                off += len(block)
            pos = end
        dst.write(struct.pack(">QQ", 0, 0))


# ---------------------------------------------------------------- entry

def ensure(cache_root):
    """Build whatever is missing; return the base cache directory."""
    cache = pathlib.Path(cache_root) / f"base-{recipe_hash()}"
    done = cache / "done"
    if done.exists():
        return cache
    cache_root = pathlib.Path(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    for old in cache_root.glob("base-*"):
        if old != cache:
            shutil.rmtree(old, ignore_errors=True)
    cache.mkdir(exist_ok=True)
    make_keys(cache / "keys")
    errors = []

    def images():
        try:
            if not (cache / "web1-srv.lsi").exists():
                build_web1_images(cache)
        except BaseException as e:  # reported below
            errors.append(e)

    t = threading.Thread(target=images)
    t.start()
    if not (cache / "base.raw").exists():
        build_base(cache, cache / "keys")
    t.join()
    if errors:
        raise errors[0]
    done.write_text("ok\n")
    return cache
