"""A hostile guest in the lab: DomU `evil1` (its own LV vg0/evil1-disk: p1 ext4 root, p2 ext4
/srv) writes what an attacker would on its disks. After every run: no mount appeared outside
the tool's prefixes on either Dom0 at any moment (findmnt --poll watches both while it runs),
the Dom0 directory the attack names is untouched, the run is not OK, no traceback, and
`lab leftovers` is clean (the autouse fixture)."""

import time

import pytest

from e2ehelp import STATE, domubackup, extra_domu, release, start_paused

PREFIXES = ("/mnt/domubackup/source/", "/mnt/domubackup/target/")
# systemd's own: a unit with credentials (systemd-tmpfiles-clean.timer fires 15 min after boot)
# mounts and unmounts /run/credentials/UNIT while a run may be going on
SYSTEMD = "/run/credentials/"
DISK = "/dev/vg0/evil1-disk"
P1, P2 = "/dev/mapper/vg0-evil1--diskp1", "/dev/mapper/vg0-evil1--diskp2"
FSTAB = "LABEL=evil-root / ext4 defaults 0 1\nLABEL=evil-srv /srv ext4 defaults 0 2\n"
BAIT = "/tmp/dom0-bait"  # the Dom0 directory the attacks point at, on both VMs
# udev may still be probing the partitions the test itself just wrote: settle, retry once
UNMAP = f"udevadm settle; kpartx -d -p p {DISK} || {{ sleep 1; udevadm settle; kpartx -d -p p {DISK}; }}"


def guest(lab, script, srv=True):
    """Run SCRIPT (sh) as the guest would: in its root filesystem (and /srv), on dom0a's origin LV."""
    mount_srv = f"mkdir -p /mnt/evil/srv; mount {P2} /mnt/evil/srv;" if srv else ""
    umount_srv = "umount /mnt/evil/srv;" if srv else ""
    lab.ssh("dom0a", f"set -e; kpartx -a -s -p p {DISK}; mkdir -p /mnt/evil; mount {P1} /mnt/evil; "
                     f"{mount_srv} cd /mnt/evil; set +e; ( {script} ); rc=$?; cd /; sync; {umount_srv} "
                     f"umount /mnt/evil; {UNMAP}; exit $rc")


@pytest.fixture(scope="module")
def evil(lab):
    with extra_domu(lab, "evil1", "6b1e7b3a-1f0e-4c59-9d5a-7a3c0e0b0666", [(DISK, "xvda")],
                    setup=f"rm -rf {BAIT}; mkdir {BAIT}; echo dom0 > {BAIT}/keep", teardown=f"rm -rf {BAIT}",
                    keys='mode = "files"'):  # files mode's defences (blocks mode mounts nothing)
        lab.ssh("dom0a", f"set -e; lvcreate -q -y -Zy -L 320M -n evil1-disk vg0; "
                         f"dd if=/dev/zero of={DISK} bs=1M count=320 status=none; "
                         f"parted -s {DISK} mklabel msdos mkpart primary ext4 1MiB 200MiB mkpart primary ext4 200MiB 319MiB; "
                         f"kpartx -a -s -p p {DISK}; mkfs.ext4 -q -F -L evil-root {P1}; mkfs.ext4 -q -F -L evil-srv {P2}; "
                         f"{UNMAP}")
        guest(lab, f"mkdir -p etc srv/www && printf '{FSTAB}' > etc/fstab && echo hello > srv/www/index", srv=True)
        r = domubackup(lab, "seed", "evil1")
        assert r.returncode == 0, r.stdout + r.stderr
        yield lab


def clean_guest(lab):
    """Back to the plain layout. Never with /srv mounted: it may be a symlink to the bait
    (the test's own mount would follow it: exactly the attack)."""
    guest(lab, f"rm -rf data; rm -f etc/fstab; printf '{FSTAB}' > etc/fstab; "
               "if [ -L srv ]; then rm srv; fi; mkdir -p srv", srv=False)


def watched_run(lab, *args):
    """`domubackup run ARGS` on dom0a with every mount event on both Dom0s recorded."""
    for vm in lab.vms:
        lab.ssh(vm, "rm -f /tmp/mounts.log; setsid findmnt --poll -rn -o ACTION,TARGET > /tmp/mounts.log "
                    "2>&1 < /dev/null & echo $! > /tmp/mounts.pid")
    time.sleep(1)
    try:
        r = domubackup(lab, *args)
    finally:
        time.sleep(1)
        events = {}
        for vm in lab.vms:
            events[vm] = lab.ssh(vm, "kill $(cat /tmp/mounts.pid); cat /tmp/mounts.log").stdout.splitlines()
    for vm, lines in events.items():
        outside = [e for e in lines if not e.split(" ", 1)[-1].startswith(PREFIXES + (SYSTEMD,))]
        assert not outside, f"{vm}: mounts outside the tool's prefixes: {outside}"
        bait = lab.ssh(vm, f"ls -A {BAIT}; findmnt -rn {BAIT} || true").stdout
        assert bait == "keep\n", f"{vm}: {BAIT} was touched: {bait!r}"
    assert "Traceback" not in r.stdout + r.stderr
    return r, events


def repair_replica(lab):
    """What an admin would do after the peer refused the replica's symlinked /srv: a real
    directory back into the replica's root (later tests need it). Idempotent."""
    lab.ssh("dom0b", f"set -e; kpartx -a -s -p p {DISK}; mount {P1} /mnt/guest; "
                     f"if [ -L /mnt/guest/srv ]; then rm /mnt/guest/srv; mkdir /mnt/guest/srv; fi; "
                     f"umount /mnt/guest; {UNMAP}")


def test_symlink_mount_points_on_both_hosts(evil):
    try:
        symlink_mount_points(evil)
    finally:
        repair_replica(evil)


def symlink_mount_points(lab):
    # an absolute symlink where the fstab mounts /srv: refused on dom0a, nothing mounted there
    guest(lab, f"rm -rf srv && ln -s {BAIT} srv", srv=False)
    r, _ = watched_run(lab, "run", "evil1", "web1")
    assert r.returncode == 1, r.stdout + r.stderr
    assert (f"'/mnt/domubackup/source/evil1/srv' is a symbolic link (to '{BAIT}'): not followed"
            in r.stderr), r.stderr
    assert "evil1: ERROR" in r.stdout and "web1: OK" in r.stdout  # the other DomU of the night is backed up
    # a relative symlink in a middle component
    clean_guest(lab)
    guest(lab, "ln -s ../../.." + BAIT + " data && "
               "sed -i 's| /srv | /data/srv |' etc/fstab", srv=False)
    r, _ = watched_run(lab, "run", "evil1")
    assert r.returncode == 1 and "/mnt/domubackup/source/evil1/data' is a symbolic link" in r.stderr, r.stderr
    # the peer through an earlier night: the guest's fstab stops mounting /srv, /srv becomes a
    # symlink, the night copies it into the replica's root...
    clean_guest(lab)
    guest(lab, f"sed -i '/evil-srv/d' etc/fstab && rm -rf srv && ln -s {BAIT} srv", srv=False)
    r, _ = watched_run(lab, "run", "evil1")
    assert ("xvda2 (ext4) is not in the guest's /etc/fstab: copied to "
            "/mnt/domubackup/target/.evil1.unplaced/xvda2 on the peer") in r.stderr, r.stderr
    assert r.returncode == 0, r.stdout + r.stderr  # OK: nothing left out (an OK run prints no summary)
    assert lab.ssh("dom0b", f"kpartx -a -s -p p {DISK}; mount -o ro {P2} /mnt/guest; cat /mnt/guest/www/index; "
                            f"umount /mnt/guest; {UNMAP}").stdout == "hello\n"
    assert lab.ssh("dom0b", f"kpartx -a -s -p p {DISK}; mount -o ro {'/dev/mapper/vg0-evil1--diskp1'} /mnt/guest; "
                            f"readlink /mnt/guest/srv; umount /mnt/guest; {UNMAP}").stdout == BAIT + "\n"
    # ... and the next night the guest mounts /srv again on a real directory: dom0a is fine,
    # the replica's /srv is still the symlink: dom0b refuses it
    clean_guest(lab)
    r, _ = watched_run(lab, "run", "evil1")
    assert r.returncode == 1
    assert "on dom0b: `domubackup mount-in --mkdir -- /mnt/domubackup/target/evil1 / " in r.stderr, r.stderr
    assert f"'/mnt/domubackup/target/evil1/srv' is a symbolic link (to '{BAIT}'): not followed" in r.stderr


@pytest.mark.parametrize("make, why", [
    ("ln -sf /dev/zero etc/fstab", "etc/fstab' is a symbolic link (to '/dev/zero'): not followed"),
    ("rm etc/fstab && mkfifo etc/fstab", "etc/fstab' is not a regular file"),
    # (a symlink to a Dom0 file, a 50 MiB fstab, NUL bytes: tests/integration/test_safepath.py,
    # tests/unit/test_parsers.py)
    ("printf 'LABEL=evil-root / ext4 defaults 0 1\\nLABEL=\\377\\376 /srv ext4 defaults 0 2\\n' > etc/fstab",
     "it is not valid UTF-8"),
])
def test_hostile_fstab(evil, make, why):
    lab = evil
    clean_guest(lab)
    guest(lab, make, srv=False)
    r, _ = watched_run(lab, "run", "evil1")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "evil1: the guest's /etc/fstab (on xvda1) " in r.stderr and why in r.stderr, r.stderr
    assert "set mounts in [domu.evil1]" in r.stderr
    rows = [row for row in domubackup(lab, "history", "evil1", "--limit", "1").stdout.splitlines()
            if row.strip() and not row.startswith(("=", "START", "-"))]
    assert len(rows) == 1 and "ERROR" in rows[0].split(), rows


def test_hostile_label_and_panic_superblock(evil):
    lab = evil
    clean_guest(lab)
    # a label with a newline and an escape sequence: a clear error for this DomU
    lab.ssh("dom0a", f"kpartx -a -s -p p {DISK}; e2label {P2} \"$(printf 'a\\nTYPE=xfs\\033[2J')\"; "
                     f"{UNMAP}")
    r, _ = watched_run(lab, "run", "evil1")
    assert r.returncode == 1 and "malformed blkid line" in r.stderr, r.stderr
    assert "\x1b" not in r.stderr + r.stdout
    # errors=panic in the superblock: the mounts on both hosts use errors=remount-ro
    lab.ssh("dom0a", f"kpartx -a -s -p p {DISK}; e2label {P2} evil-srv; tune2fs -q -e panic {P2}; "
                     f"{UNMAP}")
    pid = start_paused(lab, "transfer", "run evil1", domu="evil1")
    try:
        for vm in lab.vms:
            opts = lab.ssh(vm, "for f in $(findmnt -rn -o SOURCE,TARGET | awk '$2 ~ /evil1/ {print $1}'); do "
                               "d=$(basename $(readlink -f $f)); echo $d $(grep errors= /proc/fs/ext4/$d/options); "
                               "done").stdout.splitlines()
            assert len(opts) == 2 and all(o.endswith("errors=remount-ro") for o in opts), (vm, opts)
    finally:
        out = release(lab, "transfer", pid, domu="evil1")
    assert "Traceback" not in out
    lab.ssh("dom0a", f"kpartx -a -s -p p {DISK}; tune2fs -q -e continue {P2}; {UNMAP}")


def test_guest_pv_written_between_probe_and_snapshot_stays_inert(evil):
    lab = evil
    clean_guest(lab)
    state = {vm: lab.ssh(vm, "vgs --noheadings -o vg_name; lvs --noheadings -o lv_name; dmsetup ls | sort").stdout
             for vm in lab.vms}
    pid = start_paused(lab, "snapshot", "run evil1", domu="evil1")
    try:  # the guest turns its /srv partition into a PV of a VG named like the Dom0's own
        lab.ssh("dom0a", f"set -e; kpartx -a -s -p p {DISK}; mkdir -p /tmp/lvd; rm -f /tmp/lvd/pv; "
                         f"set -- $(stat -L -c '%t %T' {P2}); mknod /tmp/lvd/pv b $((0x$1)) $((0x$2)); "
                         "C='devices { dir=\"/tmp/lvd\" scan=[\"/tmp/lvd\"] use_devicesfile=0 obtain_device_list_from_udev=0 }'; "
                         "pvcreate -q -ff -y --devices /tmp/lvd/pv --config \"$C\" /tmp/lvd/pv; "
                         "vgcreate -q --devices /tmp/lvd/pv --config \"$C\" vg0 /tmp/lvd/pv; "
                         "vgchange -q -an --devices /tmp/lvd/pv --config \"$C\" vg0; "
                         f"{UNMAP}")
    finally:
        out = release(lab, "snapshot", pid, domu="evil1")
    assert "xvda2: holds a guest LVM physical volume" in out or "changed between the probe and its snapshot" in out, out
    assert "Traceback" not in out
    for vm in lab.vms:
        assert lab.ssh(vm, "vgs --noheadings -o vg_name; lvs --noheadings -o lv_name; dmsetup ls | sort").stdout \
            == state[vm], vm
    lab.ssh("dom0a", f"kpartx -a -s -p p {DISK}; wipefs -a -q {P2}; mkfs.ext4 -q -F -L evil-srv {P2}; "
                     f"{UNMAP}")
