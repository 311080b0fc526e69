"""Run inside a lab VM with `python3 - CMD ARGS` (sent on stdin): mount web1's LVs (origin on
dom0a, replica on dom0b) under /mnt/guest, change the guest tree, or print a manifest of it.

  mount | umount              origin/replica tree at /mnt/guest (/, /var, /srv)
  change                      the changes of the e2e test (add, modify, delete, hardlink,
                              symlink, xattr, a uid unknown to the Dom0, a sparse file)
  manifest [DIR]              JSON: every path under DIR (default /mnt/guest) with type, mode,
                              uid, gid, size, mtime, sha256, holes, link target, device
                              number, user xattrs, ACLs and hardlink group
  mountspec JSON | umountspec JSON
                              {"disks": [LV...], "mounts": [[DEV, DIR, OPTIONS]...]}: map the
                              disks' partitions, mount each DEV on DIR in order (umount: reverse)
  zoo DIR                     make every kind of file rsync must keep under DIR (modes with
                              setuid/setgid/sticky, owners, xattrs, ACLs, hardlinks across
                              directories, dangling and looping symlinks, devices, a FIFO,
                              names with spaces, newlines, leading dashes, invalid UTF-8)
  sparse FILE SIZE            a sparse file of SIZE bytes with three 4 KiB data extents
"""
import hashlib
import json
import os
import stat
import subprocess
import sys

ROOT = "/mnt/guest"
DISK = "/dev/vg0/web1-disk"


def sh(*argv, check=True):
    return subprocess.run(argv, check=check, env=dict(os.environ, LC_ALL="C"))


def mount():
    os.makedirs(ROOT, exist_ok=True)
    sh("kpartx", "-a", "-s", "-p", "p", DISK)
    sh("udevadm", "settle")
    sh("mount", "/dev/mapper/vg0-web1--diskp1", ROOT)
    sh("mount", "-o", "nouuid", "/dev/mapper/vg0-web1--diskp5", ROOT + "/var")
    sh("mount", "/dev/vg0/web1-srv", ROOT + "/srv")


def umount():
    for d in (ROOT + "/srv", ROOT + "/var", ROOT):
        sh("umount", d, check=False)
    sh("kpartx", "-d", "-p", "p", DISK, check=False)


def change():
    j = lambda p: os.path.join(ROOT, p)  # noqa: E731
    with open(j("etc/motd"), "a") as f:
        f.write("changed by the e2e test\n")
    os.makedirs(j("srv/new dir"), exist_ok=True)
    with open(j("srv/new dir/added.txt"), "w") as f:
        f.write("added\n")
    os.unlink(j("var/lib/lab/state"))
    os.link(j("srv/new dir/added.txt"), j("srv/new dir/hardlink.txt"))
    os.symlink("../www/index.html", j("srv/new dir/link-to-index"))
    with open(j("srv/xattr.txt"), "w") as f:
        f.write("x\n")
    os.setxattr(j("srv/xattr.txt"), "user.domubackup", b"kept")
    with open(j("var/owned-by-4242"), "w") as f:
        f.write("nobody here\n")
    os.chown(j("var/owned-by-4242"), 4242, 4343)
    with open(j("srv/sparse.img"), "wb") as f:
        f.truncate(64 * 1024 * 1024)
        f.seek(32 * 1024 * 1024)
        f.write(b"middle")
    os.sync()


def mountspec(spec, undo=False):
    spec = json.loads(spec)
    if undo:
        for dev, d, opts in reversed(spec["mounts"]):
            sh("umount", d, check=False)
        for disk in spec["disks"]:
            sh("kpartx", "-d", "-p", "p", disk, check=False)
        return
    for disk in spec["disks"]:
        sh("kpartx", "-a", "-s", "-p", "p", disk)
    sh("udevadm", "settle")
    for dev, d, opts in spec["mounts"]:
        os.makedirs(d, exist_ok=True)
        sh("mount", "-o", opts, dev, d)


def acl(entries):
    """A POSIX ACL as the system.posix_acl_* xattr holds it: version 2, then (tag, perm, id)."""
    import struct
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i) for t, p, i in entries)


def zoo(d):
    j = lambda *p: os.path.join(d, *p)  # noqa: E731
    any_id = 0xFFFFFFFF
    for sub in ("a", "b", "sticky", "names"):
        os.makedirs(j(sub), exist_ok=True)
    for name, mode in (("setuid", 0o4755), ("setgid", 0o2750), ("plain", 0o640)):
        with open(j(name), "w") as f:
            f.write(name + "\n")
        os.chmod(j(name), mode)
    os.chmod(j("sticky"), 0o1777)
    os.chmod(j("b"), 0o2775)
    with open(j("owned"), "w") as f:
        f.write("owned by ids unknown here\n")
    os.chown(j("owned"), 4242, 4343)
    os.setxattr(j("owned"), "user.domubackup", b"kept")
    os.setxattr(j("plain"), "system.posix_acl_access",
                acl([(1, 6, any_id), (2, 4, 4242), (4, 4, any_id), (0x10, 4, any_id), (0x20, 0, any_id)]))
    os.setxattr(j("a"), "system.posix_acl_default",
                acl([(1, 7, any_id), (4, 5, any_id), (8, 5, 4343), (0x10, 5, any_id), (0x20, 0, any_id)]))
    with open(j("a", "linked"), "w") as f:
        f.write("one inode, two directories\n")
    os.link(j("a", "linked"), j("b", "linked too"))
    os.symlink("/nonexistent/target", j("dangling"))
    os.symlink("loop2", j("loop1"))
    os.symlink("loop1", j("loop2"))
    os.symlink("self", j("self"))
    os.mknod(j("null"), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(j("loop7"), 0o660 | stat.S_IFBLK, os.makedev(7, 7))
    os.mkfifo(j("fifo"))
    for name in (b"with space", b"new\nline", b"-leading-dash", b"--delete", b"invalid-\xff\xfe", b"x" * 200):
        with open(os.path.join(os.fsencode(j("names")), name), "w") as f:
            f.write("named\n")
    os.utime(j("plain"), (1000000000, 1000000000))
    os.sync()


def sparse(path, size):
    with open(path, "wb") as f:
        f.truncate(int(size))
        for off in (0, int(size) // 3, int(size) - 4096):
            f.seek(off)
            f.write(os.urandom(4096))
    os.sync()


def xattrs(p, prefix):
    try:
        return {k: os.getxattr(p, k, follow_symlinks=False).hex()
                for k in sorted(os.listxattr(p, follow_symlinks=False)) if k.startswith(prefix)}
    except OSError:  # vfat: no xattrs
        return {}


def manifest(root=ROOT):
    out, inodes = {}, {}
    for top, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            p = os.path.join(top, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            e = {"mode": stat.filemode(st.st_mode), "uid": st.st_uid, "gid": st.st_gid}
            if stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                e.update(size=st.st_size, mtime=int(st.st_mtime), sha256=h.hexdigest(),
                         sparse=st.st_blocks * 512 < st.st_size)  # holes kept (rsync --sparse)
                if st.st_nlink > 1:
                    e["hardlink"] = inodes.setdefault((st.st_dev, st.st_ino), rel)
            elif stat.S_ISLNK(st.st_mode):
                e["target"] = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                e["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
            if not stat.S_ISLNK(st.st_mode):
                e["xattrs"] = xattrs(p, "user.")
                e["acl"] = xattrs(p, "system.posix_acl_")
            out[rel] = e
    json.dump(out, sys.stdout, sort_keys=True)


{"mount": mount, "umount": umount, "change": change, "manifest": manifest, "mountspec": mountspec,
 "umountspec": lambda spec: mountspec(spec, undo=True), "zoo": zoo, "sparse": sparse}[sys.argv[1]](*sys.argv[2:])
