"""The lab's storage/ssh/rsync stack by hand, without domubackup code.

dom0a: LVM snapshots of web1's disks -> kpartx -> read-only mounts under the source prefix;
dom0b: kpartx on the replica LV -> read-write mounts under the target prefix;
rsync dom0a -> dom0b over ssh with pinned host keys; teardown in reverse.
"""

import time

import labvm

SRC = "/mnt/domubackup/source/web1"
DST = "/mnt/domubackup/target/web1"
RO = "ro,nodev,nosuid,noexec"
SSH_E = ("ssh -o BatchMode=yes -o StrictHostKeyChecking=yes "
         "-o UserKnownHostsFile=/etc/domubackup/known_hosts")


def peer_command(lab, vm, argv, out):
    """ARGV run by ssh from VM on its peer: it prints OUT, or (DOMUBACKUP_LAB_SERVE=1: the key
    runs `domubackup serve` only) it is refused, exit 77."""
    r = lab.ssh(vm, argv, check=False)
    if labvm.SERVE:
        assert r.returncode == 77 and "domubackup serve: refused: " in r.stderr, r
    else:
        assert r.returncode == 0 and r.stdout.strip() == out, r


def blkids(lab, vm):
    """{device suffix: UUID} of web1's filesystems in vm (maps and unmaps the partitions)."""
    lab.ssh(vm, ["kpartx", "-a", "-p", "p", "/dev/vg0/web1-disk"])
    try:
        lab.ssh(vm, ["udevadm", "settle"])
        ids = {}
        for dev in ["/dev/mapper/vg0-web1--diskp1", "/dev/mapper/vg0-web1--diskp5",
                    "/dev/mapper/vg0-web1--diskp6", "/dev/vg0/web1-srv"]:
            out = lab.ssh(vm, ["blkid", "-p", "-o", "value", "-s", "UUID", dev]).stdout
            ids[dev] = out.strip()
        return ids
    finally:
        lab.ssh(vm, ["kpartx", "-d", "-p", "p", "/dev/vg0/web1-disk"])


def test_vms_are_set_up(lab):
    assert lab.ssh("dom0a", ["hostname"]).stdout.strip() == "dom0a"
    assert lab.ssh("dom0b", ["hostname"]).stdout.strip() == "dom0b"
    # Plain ssh by name between the VMs, both directions, with pinned keys.
    peer_command(lab, "dom0a", ["ssh", "dom0b", "hostname"], "dom0b")
    peer_command(lab, "dom0b", ["ssh", "dom0a", "hostname"], "dom0a")
    # Each VM has its own host key.
    key_a = lab.ssh("dom0a", ["cat", "/etc/ssh/ssh_host_ed25519_key.pub"]).stdout.split()[1]
    key_b = lab.ssh("dom0b", ["cat", "/etc/ssh/ssh_host_ed25519_key.pub"]).stdout.split()[1]
    assert key_a != key_b
    # libvirt test driver node files: web1 runs on dom0a only.
    uri = "test:///etc/domubackup/lab-node.xml"
    assert lab.ssh("dom0a", ["virsh", "-c", uri, "domstate", "web1"]).stdout.strip() == "running"
    assert lab.ssh("dom0b", ["virsh", "-c", uri, "domstate", "web1"]).stdout.strip() == "shut off"
    assert lab.ssh("dom0a", ["virsh", "-c", uri, "domstate", "idle1"]).stdout.strip() == "shut off"
    assert 'this_host = "dom0b"' in lab.ssh("dom0b", ["cat", "/etc/domubackup/domubackup.toml"]).stdout
    # The tool as an administrator installs it: the package, on Debian's own Python modules
    # (bookworm's python3-sh is 1.14; the host's tests run on PyPI's sh 2.x).
    assert lab.ssh("dom0a", ["dpkg-query", "-W", "-f", "${Status}", "domubackup"]).stdout == \
        "install ok installed"
    assert lab.ssh("dom0a", ["sh", "-c", "command -v domubackup"]).stdout.strip() == "/usr/bin/domubackup"
    assert lab.ssh("dom0a", ["python3", "-c", "import sh; print(sh.__version__)"]).stdout.startswith("1.14.")
    lab.ssh("dom0a", ["test", "-f", "/lib/systemd/system/domubackup.timer"])
    # The installed files are the package's own; only the lab's config differs from it.
    changed = lab.ssh("dom0a", ["dpkg", "--verify", "domubackup"], check=False).stdout.split("\n")
    assert {line.split()[-1] for line in changed if line} <= {"/etc/domubackup/domubackup.toml"}


def test_replicas_are_identical(lab):
    ids_a, ids_b = blkids(lab, "dom0a"), blkids(lab, "dom0b")
    assert all(ids_a.values()), ids_a
    assert ids_a == ids_b


def test_wrong_pinned_host_key_is_refused(lab):
    key_a = lab.ssh("dom0a", ["cat", "/etc/ssh/ssh_host_ed25519_key.pub"]).stdout.split()
    bad = f"dom0b,10.77.0.2 {key_a[0]} {key_a[1]}\n"   # dom0a's key pinned for dom0b
    lab.ssh("dom0a", ["tee", "/tmp/wrong_known_hosts"], input=bad)
    try:
        result = lab.ssh("dom0a", ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                                   "-o", "UserKnownHostsFile=/tmp/wrong_known_hosts",
                                   "dom0b", "true"], check=False)
        assert result.returncode == 255, result
        assert "host key" in result.stderr.lower(), result.stderr
        peer_command(lab, "dom0a", ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                                    "-o", "UserKnownHostsFile=/etc/domubackup/known_hosts", "dom0b", "echo", "ok"],
                     "ok")
    finally:
        lab.ssh("dom0a", ["rm", "-f", "/tmp/wrong_known_hosts"])


def test_snapshot_kpartx_mount_rsync_by_hand(lab):
    # A live "guest" writes into web1's origin filesystems for a moment.
    lab.writer("start")
    time.sleep(2)
    lab.writer("stop")

    a_steps = []   # undo argv lists for dom0a, run in reverse
    b_steps = []
    try:
        # dom0a: snapshots, partition maps, read-only mounts.
        lab.ssh("dom0a", ["sync"])
        lab.ssh("dom0a", ["lvcreate", "-q", "--snapshot", "--size", "128M", "-n", "web1-disk-snap",
                          "vg0/web1-disk"])
        a_steps.append(["lvremove", "-q", "-f", "vg0/web1-disk-snap"])
        lab.ssh("dom0a", ["lvcreate", "-q", "--snapshot", "--size", "128M", "-n", "web1-srv-snap",
                          "vg0/web1-srv"])
        a_steps.append(["lvremove", "-q", "-f", "vg0/web1-srv-snap"])
        lab.ssh("dom0a", ["kpartx", "-a", "-p", "p", "/dev/vg0/web1-disk-snap"])
        a_steps.append(["kpartx", "-d", "-p", "p", "/dev/vg0/web1-disk-snap"])
        lab.ssh("dom0a", ["udevadm", "settle"])
        lab.ssh("dom0a", ["mkdir", "-p", SRC])
        for dev, where, opts in [
                ("/dev/mapper/vg0-web1--disk--snapp1", SRC, RO),
                ("/dev/mapper/vg0-web1--disk--snapp5", f"{SRC}/var", RO + ",nouuid"),
                ("/dev/vg0/web1-srv-snap", f"{SRC}/srv", RO)]:
            lab.ssh("dom0a", ["mount", "-o", opts, dev, where])
            a_steps.append(["umount", where])

        assert lab.ssh("dom0a", ["cat", f"{SRC}/etc/hostname"]).stdout == "web1\n"
        assert "LABEL=web1-var /var xfs" in lab.ssh("dom0a", ["cat", f"{SRC}/etc/fstab"]).stdout
        lab.ssh("dom0a", ["test", "-f", f"{SRC}/var/log/lab.txt"])
        lab.ssh("dom0a", ["test", "-f", f"{SRC}/srv/www/index.html"])
        lab.ssh("dom0a", ["lab-guest", "writer", "verify", f"{SRC}/srv/lab-writer.log",
                          f"{SRC}/var/log/lab-writer.log", f"{SRC}/root/lab-writer.log"])
        # Read-only really.
        assert lab.ssh("dom0a", ["touch", f"{SRC}/x"], check=False).returncode != 0

        # dom0b: the replica, mapped and mounted read-write.
        lab.ssh("dom0b", ["kpartx", "-a", "-p", "p", "/dev/vg0/web1-disk"])
        b_steps.append(["kpartx", "-d", "-p", "p", "/dev/vg0/web1-disk"])
        lab.ssh("dom0b", ["udevadm", "settle"])
        lab.ssh("dom0b", ["mkdir", "-p", DST])
        for dev, where in [("/dev/mapper/vg0-web1--diskp1", DST),
                           ("/dev/mapper/vg0-web1--diskp5", f"{DST}/var"),
                           ("/dev/vg0/web1-srv", f"{DST}/srv")]:
            lab.ssh("dom0b", ["mount", "-o", "rw,nodev,nosuid", dev, where])
            b_steps.append(["umount", where])
        lab.ssh("dom0b", ["test", "!", "-e", f"{DST}/srv/lab-writer.log"])
        lab.ssh("dom0b", ["touch", f"{DST}/srv/stale-on-replica"])

        lab.ssh("dom0a", ["rsync", "-aHAX", "--numeric-ids", "--delete", "-e", SSH_E,
                          f"{SRC}/", f"dom0b:{DST}/"], timeout=600)

        src_sum = lab.ssh("dom0a", ["sha256sum", f"{SRC}/srv/lab-writer.log"]).stdout.split()[0]
        dst_sum = lab.ssh("dom0b", ["sha256sum", f"{DST}/srv/lab-writer.log"]).stdout.split()[0]
        assert src_sum == dst_sum
        assert lab.ssh("dom0b", ["cat", f"{DST}/www/index.html"], check=False).returncode != 0
        assert "web1 lab" in lab.ssh("dom0b", ["cat", f"{DST}/srv/www/index.html"]).stdout
        lab.ssh("dom0b", ["test", "!", "-e", f"{DST}/srv/stale-on-replica"])
        lab.ssh("dom0b", ["test", "-f", f"{DST}/var/log/lab-writer.log"])
    finally:
        for vm, steps in (("dom0b", b_steps), ("dom0a", a_steps)):
            for argv in reversed(steps):
                if argv[0] == "kpartx":
                    lab.ssh(vm, ["udevadm", "settle"], check=False)
                lab.ssh(vm, argv, check=False)
    for vm in lab.vms:
        lvs = lab.ssh(vm, ["lvs", "--noheadings", "-o", "lv_name", "vg0"]).stdout.split()
        assert sorted(lvs) == ["web1-disk", "web1-srv"], (vm, lvs)
