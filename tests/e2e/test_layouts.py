"""A guest laid out the way real installs are (issue 14), DomU `gpt1` on dom0a:
- xvda (vg0/gpt1-disk), GPT: p1 bios_grub (no filesystem), p2 ext4 root, p3 xfs at
  /var/lib/db (two levels deep), p4 swap, p5 ext4 at /srv/big holding a 2 GiB sparse file (the
  filesystem is 100 MiB), p6 vfat at /boot/efi named by PARTUUID;
- xvdb (vg0/gpt1-data), msdos with logical partitions: p1 ext4 /home (named /dev/xvdb1),
  p5 ext4 /home/shared/projects (listed before its parent), p6 ext4 that the fstab does not
  list (copied to the hidden tree), p7 ext4 /opt named in a quoted tag (UUID="...").
Every file kind rsync must keep is in /home/zoo (ext4) and /var/lib/db/zoo (xfs). The origin's
and the replica's manifests are compared tree by tree; the sparse file's cost is measured; a
replica too small for its source fails before anything is written; a filesystem that cannot
be copied makes a files-mode run PARTIAL, and `auto` copies that disk as blocks beside the
files-mode one (a mixed DomU). `lab leftovers` is clean after each test (autouse fixture)."""

import json
import re
from contextlib import contextmanager

import pytest

from e2ehelp import TOOL, XXH, domubackup, extra_domu

CONF = "/etc/domubackup/domubackup.toml"
DISK, DATA = "/dev/vg0/gpt1-disk", "/dev/vg0/gpt1-data"
D = "/dev/mapper/vg0-gpt1--diskp"
H = "/dev/mapper/vg0-gpt1--datap"
OPT_UUID = "0b5e0b5e-1111-4222-8333-944445555666"
GUEST = [  # (device, mount point in the guest, mount options for the test's own mounts)
    (f"{D}2", "/", "defaults"), (f"{D}3", "/var/lib/db", "nouuid"), (f"{D}6", "/boot/efi", "defaults"),
    (f"{D}5", "/srv/big", "defaults"), (f"{H}1", "/home", "defaults"),
    (f"{H}5", "/home/shared/projects", "defaults"), (f"{H}7", "/opt", "defaults")]
ORPHAN = (f"{H}6", "/xvdb6")  # in the hidden tree .gpt1.unplaced on the replica
SPARSE = 2 * 1024**3
UNMAP = f"udevadm settle; for d in {DISK} {DATA}; do kpartx -d -p p $d || {{ sleep 1; udevadm settle; kpartx -d -p p $d; }}; done"


def tool(lab, vm, *args, check=True):
    """treetool.py ARGS in VM."""
    return lab.ssh(vm, ["python3", "-", *args], input=TOOL, timeout=900, check=check)


def spec(mounts, root="/mnt/guest"):
    return json.dumps({"disks": [DISK, DATA],
                       "mounts": [[dev, mp if mp.startswith("/mnt/") else root + (mp if mp != "/" else ""), opts]
                                  for dev, mp, opts in mounts]})


WITH_ORPHAN = GUEST + [(ORPHAN[0], "/mnt/orphan", "defaults")]


@contextmanager
def tree_mounted(lab, vm, mounts=WITH_ORPHAN):
    """gpt1's MOUNTS on VM (the origin on dom0a, the replica on dom0b), unmounted and unmapped
    at the end whatever happened."""
    tool(lab, vm, "mountspec", spec(mounts))
    try:
        yield
    finally:
        tool(lab, vm, "umountspec", spec(mounts), check=False)
        lab.ssh(vm, UNMAP, check=False)


def mounted(lab, vm, script, orphan=True):
    """Run SCRIPT (sh) on VM with gpt1's tree mounted at /mnt/guest (and the unplaced p6 at
    /mnt/orphan)."""
    with tree_mounted(lab, vm, WITH_ORPHAN if orphan else GUEST):
        return lab.ssh(vm, f"set -e; {script}", timeout=900)


def manifests(lab, vm):
    with tree_mounted(lab, vm):
        return {where: json.loads(tool(lab, vm, "manifest", f"/mnt/{where}").stdout)
                for where in ("guest", "orphan")}


@pytest.fixture(scope="module")
def gpt1(lab):
    with extra_domu(lab, "gpt1", "6b1e7b3a-1f0e-4c59-9d5a-7a3c0e0b0777", [(DISK, "xvda"), (DATA, "xvdb")],
                    unmap=UNMAP):
        lab.ssh("dom0a", f"""set -e
            lvcreate -q -y -Zy -Wy -L 604M -n gpt1-disk vg0; lvcreate -q -y -Zy -Wy -L 200M -n gpt1-data vg0
            parted -s {DISK} mklabel gpt mkpart bios 1MiB 2MiB set 1 bios_grub on mkpart root ext4 2MiB 130MiB \
            mkpart db xfs 130MiB 450MiB mkpart swap linux-swap 450MiB 466MiB mkpart big ext4 466MiB 566MiB \
            mkpart efi fat32 566MiB 600MiB
            parted -s {DATA} mklabel msdos mkpart primary ext4 1MiB 60MiB mkpart extended 60MiB 199MiB \
            mkpart logical ext4 61MiB 100MiB mkpart logical ext4 101MiB 140MiB mkpart logical ext4 141MiB 198MiB
            kpartx -a -s -p p {DISK}; kpartx -a -s -p p {DATA}; udevadm settle
            dd if=/dev/zero of={D}1 bs=1M count=1 status=none
            mkfs.ext4 -q -F -L gpt-root {D}2; mkfs.xfs -q -f -L gpt-db {D}3; mkswap -q {D}4
            mkfs.ext4 -q -F -L gpt-big {D}5; mkfs.vfat -n EFI {D}6 > /dev/null
            mkfs.ext4 -q -F -L home {H}1; mkfs.ext4 -q -F -L projects {H}5; mkfs.ext4 -q -F -L orphan {H}6
            mkfs.ext4 -q -F -L opt -U {OPT_UUID} {H}7
            echo "$(blkid -s PARTUUID -o value {D}6) $(blkid -s UUID -o value {D}4)" > /tmp/gpt1-ids
            {UNMAP}""")
        efi, swap = lab.ssh("dom0a", "cat /tmp/gpt1-ids").stdout.split()
        fstab = (f"# the guest's fstab, as a real install writes it\n"
                 f"/dev/vda2\t/\text4\terrors=remount-ro\t0\t1\n"
                 f"LABEL=gpt-db /var/lib/db xfs defaults 0 2\n"
                 f"PARTUUID={efi} /boot/efi vfat umask=0077 0 1\n"
                 f"UUID={swap} none swap sw 0 0\n"
                 f"/dev/disk/by-label/gpt-big /srv/big ext4 defaults,nofail\n"
                 f"LABEL=projects /home/shared/projects ext4 defaults 0 2\n"
                 f"/dev/xvdb1 /home ext4 defaults 0 2\n"
                 f'UUID="{OPT_UUID}" /opt ext4 defaults 0 2\n'
                 f"tmpfs /tmp tmpfs defaults 0 0\n")
        # mount points first (each made in its parent filesystem), then the fstab
        steps = [(GUEST[0:1], "mkdir -p etc var/lib/db boot/efi srv/big home opt"),
                 (GUEST[0:5], "mkdir -p home/shared/projects")]
        for mounts, script in steps:
            with tree_mounted(lab, "dom0a", mounts):
                lab.ssh("dom0a", f"cd /mnt/guest && {script}")
        mounted(lab, "dom0a", f"cat > /mnt/guest/etc/fstab <<'EOF'\n{fstab}EOF\n", orphan=False)
        r = domubackup(lab, "seed", "gpt1", timeout=1800)
        assert r.returncode == 0, r.stdout + r.stderr
        yield lab


def test_every_filesystem_reaches_the_replica_and_sparse_files_stay_cheap(gpt1):
    lab = gpt1
    with tree_mounted(lab, "dom0a"):
        for where in ("/mnt/guest/home/zoo", "/mnt/guest/var/lib/db/zoo"):
            tool(lab, "dom0a", "zoo", where)
        tool(lab, "dom0a", "sparse", "/mnt/guest/srv/big/huge.img", str(SPARSE))
        lab.ssh("dom0a", "echo efi > /mnt/guest/boot/efi/grubx64.efi; echo projects > "
                         "/mnt/guest/home/shared/projects/p.txt; echo opt > /mnt/guest/opt/o.txt; "
                         "echo orphan > /mnt/orphan/orphan.txt; sync")
    r = domubackup(lab, "run", "gpt1", timeout=1800)
    assert r.returncode == 0, r.stdout + r.stderr  # OK (an OK run prints no summary)
    assert ("xvdb6 (ext4) is not in the guest's /etc/fstab: copied to "
            "/mnt/domubackup/target/.gpt1.unplaced/xvdb6 on the peer") in r.stderr, r.stderr
    a, b = manifests(lab, "dom0a"), manifests(lab, "dom0b")
    for part in ("guest", "orphan"):
        diff = sorted(k for k in a[part].keys() | b[part].keys() if a[part].get(k) != b[part].get(k))
        assert not diff, f"{part}: differs at {diff[:10]}: " + "; ".join(
            f"{k}: {a[part].get(k)} vs {b[part].get(k)}" for k in diff[:3])
    zoo = a["guest"]
    assert zoo["home/zoo/setuid"]["mode"] == "-rwsr-xr-x" and zoo["home/zoo/sticky"]["mode"] == "drwxrwxrwt"
    assert zoo["home/zoo/null"]["rdev"] == [1, 3] and zoo["home/zoo/fifo"]["mode"].startswith("p")
    assert zoo["home/zoo/b/linked too"]["hardlink"] == "home/zoo/a/linked"
    assert zoo["home/zoo/plain"]["acl"] and zoo["var/lib/db/zoo/a"]["acl"]
    assert "home/zoo/names/invalid-\udcff\udcfe" in zoo and "home/zoo/names/new\nline" in zoo
    assert zoo["srv/big/huge.img"]["sparse"] and zoo["srv/big/huge.img"]["size"] == SPARSE
    assert a["orphan"]["orphan.txt"]["size"] == 7
    # the sparse file: what it cost on the wire (all of this run's bytes) and on the replica's disk
    sent = json.loads(domubackup(lab, "history", "gpt1", "--json").stdout)[0]["bytes_sent"]
    allocated = int(mounted(lab, "dom0b", "du -B1 /mnt/guest/srv/big/huge.img", orphan=False).stdout.split()[0])
    print(f"sparse {SPARSE} bytes: run sent {sent} bytes ({sent / SPARSE:.4%}), replica allocates "
          f"{allocated} bytes ({allocated / SPARSE:.4%})")
    assert sent <= SPARSE // 100 and allocated <= SPARSE // 100


def test_a_replica_too_small_fails_before_writing_then_partial(gpt1):
    lab = gpt1
    # the replica's /home filesystem is shrunk to 24 MiB; the guest writes 30 MiB there
    lab.ssh("dom0b", f"set -e; kpartx -a -s -p p {DATA}; e2fsck -f -p {H}1 > /dev/null; resize2fs -f {H}1 24M "
                     f"2> /dev/null; {UNMAP}")
    mounted(lab, "dom0a", "head -c 30M /dev/urandom > /mnt/guest/home/big.bin; echo new > /mnt/guest/opt/new.txt",
            orphan=False)
    r = domubackup(lab, "run", "gpt1", timeout=1800)
    assert r.returncode == 1 and "gpt1: ERROR" in r.stdout, r.stdout + r.stderr
    assert "the replica is too small, nothing was written: the replica of xvdb1 (ext4, /home) on dom0b has room for" \
        in r.stdout, r.stdout
    assert "the source holds" in r.stdout and "free now" in r.stdout
    replica = mounted(lab, "dom0b", "ls /mnt/guest/home /mnt/guest/opt", orphan=False).stdout
    assert "big.bin" not in replica and "new.txt" not in replica, replica  # nothing written, not even /opt
    lab.ssh("dom0b", f"set -e; kpartx -a -s -p p {DATA}; resize2fs -f {H}1 > /dev/null 2>&1; {UNMAP}")
    # a filesystem that cannot be copied: in files mode the rest is, and the run says PARTIAL
    # with the reason
    lab.ssh("dom0a", f"set -e; kpartx -a -s -p p {DATA}; mkfs.minix {H}6 > /dev/null; {UNMAP}")
    lab.ssh("dom0a", f"sed -i '/^\\[domu.gpt1\\]/a mode = \"files\"' {CONF}")
    r = domubackup(lab, "run", "gpt1", timeout=1800)
    assert r.returncode == 5 and r.stdout.startswith("gpt1: PARTIAL in "), r.stdout + r.stderr
    assert "not copied: xvdb6: filesystem type 'minix' is not supported" in r.stdout, r.stdout
    assert "PARTIAL" in domubackup(lab, "history", "gpt1").stdout
    replica = mounted(lab, "dom0b", "ls /mnt/guest/home /mnt/guest/opt", orphan=False).stdout
    assert "big.bin" in replica and "new.txt" in replica, replica
    # `auto` (the default) copies that disk as blocks and the other as files: a mixed DomU, OK
    lab.ssh("dom0a", f"sed -i '/^mode = \"files\"$/d' {CONF}")
    plan = domubackup(lab, "plan", "gpt1").stdout
    assert "xvdb: mode blocks (auto: xvdb6 filesystem type 'minix' is not supported)" in plan, plan
    assert "xvda: mode files (auto: every partition holding data has a filesystem the tool mounts)" in plan, plan
    mounted(lab, "dom0a", "echo mixed > /mnt/guest/home/mixed.txt; echo mixed > /mnt/guest/srv/big/mixed.txt",
            orphan=False)
    r = domubackup(lab, "-v", "run", "gpt1", timeout=1800)
    assert r.returncode == 0 and r.stdout.startswith("gpt1: OK in "), r.stdout + r.stderr
    assert re.search(r"xvdb: the changed blocks of /dev/vg0/gpt1-data-snap -> dom0b:/dev/vg0/gpt1-data: \d+ of 50 "
                     r"blocks of 4 MiB changed", r.stdout + r.stderr), r.stdout + r.stderr
    assert [lab.ssh(vm, ["python3", "-c", XXH, DATA]).stdout for vm in lab.vms] == \
        [lab.ssh("dom0a", ["python3", "-c", XXH, DATA]).stdout] * 2
    replica = mounted(lab, "dom0b", "cat /mnt/guest/home/mixed.txt /mnt/guest/srv/big/mixed.txt", orphan=False).stdout
    assert replica == "mixed\nmixed\n", replica
