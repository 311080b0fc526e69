"""Run inside a lab VM with `python3 - CMD ARGS` (sent on stdin): mount web1's LVs (origin on
dom0a, replica on dom0b) under /mnt/guest, change the guest tree, or print a manifest of it.

  mount | umount              origin/replica tree at /mnt/guest (/, /var, /srv)
  change                      the changes of the e2e test (add, modify, delete, hardlink,
                              symlink, xattr, a uid unknown to the Dom0, a sparse file)
  manifest                    JSON: every path with type, mode, uid, gid, size, mtime,
                              sha256, link target, xattrs and hardlink group
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


def manifest():
    out, inodes = {}, {}
    for top, dirs, files in os.walk(ROOT):
        dirs.sort()
        for name in sorted(dirs + files):
            p = os.path.join(top, name)
            rel = os.path.relpath(p, ROOT)
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
            if not stat.S_ISLNK(st.st_mode):
                e["xattrs"] = {k: os.getxattr(p, k).hex() for k in sorted(os.listxattr(p))
                               if k.startswith("user.")}
            out[rel] = e
    json.dump(out, sys.stdout, sort_keys=True)


{"mount": mount, "umount": umount, "change": change, "manifest": manifest}[sys.argv[1]]()
