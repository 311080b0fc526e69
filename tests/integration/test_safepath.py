"""safepath against this machine's kernel: real mounts of a loop device, hostile trees.

Each hostile case asserts what escaped: nothing mounted outside the tree (mountinfo before
and after), the directory the attack names untouched, the exact refusal."""

import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from domubackup.hosts import safepath
from domubackup.hosts.safepath import Refused

pytestmark = pytest.mark.integration
HELPER = [sys.executable, "-c", "import sys; from domubackup.entry import main; sys.argv[0] = 'domubackup'; "
          "sys.exit(main())"]


def mounts():
    with open("/proc/self/mountinfo") as f:
        return sorted(line.split(" - ")[0].split()[4] for line in f)


@pytest.fixture(scope="module")
def loopdev(tmp_path_factory):
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup")
    img = tmp_path_factory.mktemp("img") / "fs.img"
    subprocess.run(["truncate", "-s", "32M", str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
    dev = subprocess.run(["losetup", "-f", "--show", str(img)], check=True, capture_output=True,
                         text=True).stdout.strip()
    yield dev
    subprocess.run(["losetup", "-d", dev], check=False)


@pytest.fixture
def tree(tmp_path):
    """A guest tree with a hostile layout, and a Dom0 directory the attacks point at."""
    t, outside = tmp_path / "tree", tmp_path / "dom0-secret"
    (t / "srv").mkdir(parents=True)
    (t / "var" / "lib").mkdir(parents=True)
    (t / "etc").mkdir()
    outside.mkdir()
    (outside / "keep").write_text("dom0\n")
    os.symlink(str(outside), t / "abs")               # absolute symlink
    os.symlink("../dom0-secret", t / "rel")           # relative, pointing out
    os.symlink(str(outside), t / "var" / "www")       # last component
    os.symlink(str(outside), t / "mid")               # middle component: /mid/x
    (t / "file").write_text("x")
    return t, outside


@pytest.mark.parametrize("path, why", [
    ("/abs", "is a symbolic link (to '{outside}'): not followed"),
    ("/rel", "is a symbolic link (to '../dom0-secret'): not followed"),
    ("/var/www", "is a symbolic link (to '{outside}'): not followed"),
    ("/mid/x", "is a symbolic link (to '{outside}'): not followed"),
    ("/file", "is not a directory"),
    ("/../dom0-secret", "contains '..'"),
    ("/srv/\0x", "contains a NUL byte"),
    ("/" + "a" * 256, "has a component longer than 255 bytes"),
])
def test_hostile_mount_points_are_refused_and_nothing_is_mounted(tree, loopdev, path, why):
    t, outside = tree
    before = mounts()
    with pytest.raises(Refused) as e:
        safepath.mount_in(str(t), path, loopdev, "ext4", "ro,nodev,nosuid,noexec,nosymfollow")
    assert why.format(outside=outside) in str(e.value)
    assert e.value.code == safepath.EXIT_REFUSED
    assert mounts() == before
    assert os.listdir(outside) == ["keep"]


def test_mount_lands_where_asked_and_umount_checks_it_is_ours(tree, loopdev):
    t, _ = tree
    before = mounts()
    safepath.mount_in(str(t), "/var/lib", loopdev, "ext4", "ro,nodev,nosuid,noexec,nosymfollow,errors=remount-ro")
    try:
        line = next(m for m in open("/proc/self/mountinfo") if f" {t}/var/lib " in m)
        assert "nosymfollow" in line and "errors=remount-ro" in line and "ro," in line
        # something else at that path is not the run's mount: refused, left alone
        with pytest.raises(Refused, match="not mounted"):
            safepath.umount_in(str(t), "/var/lib", "/dev/null")
        assert f"{t}/var/lib" in mounts()
    finally:
        safepath.umount_in(str(t), "/var/lib", loopdev)
    assert mounts() == before
    with pytest.raises(Refused) as e:  # gone: "not mounted", exit 32 (journal: success only if pending)
        safepath.umount_in(str(t), "/var/lib", loopdev)
    assert e.value.code == safepath.EXIT_NOT_MOUNTED and "not mounted" in str(e.value)


def test_umount_through_a_symlink_is_refused(tree, loopdev):
    t, outside = tree
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(outside)], check=True)  # a Dom0 mount
    try:
        for path in ("/abs", "/mid/x", "/file"):  # nothing of ours can be there: "not mounted"
            with pytest.raises(Refused, match="not mounted .*not followed|not mounted .*not a directory") as e:
                safepath.umount_in(str(t), path, "tmpfs")
            assert e.value.code == safepath.EXIT_NOT_MOUNTED
        assert str(outside) in mounts()
    finally:
        subprocess.run(["umount", str(outside)], check=True)


def test_peer_mkdir_makes_missing_mount_points_inside_the_tree_only(tree, loopdev):
    t, outside = tree
    safepath.mount_in(str(t), "/data/new", loopdev, "ext4", "rw,nodev,nosuid,noexec,nosymfollow", mkdir=True)
    safepath.umount_in(str(t), "/data/new", loopdev)
    assert (t / "data" / "new").is_dir()
    with pytest.raises(Refused, match="symbolic link"):
        safepath.mount_in(str(t), "/mid/new", loopdev, "ext4", "rw", mkdir=True)
    assert os.listdir(outside) == ["keep"]


def test_read_in_regular_file_only(tree, tmp_path):
    t, outside = tree
    (t / "etc" / "fstab").write_text("LABEL=root / ext4 defaults 0 1\n")
    assert safepath.read_in(str(t), "/etc/fstab") == b"LABEL=root / ext4 defaults 0 1\n"
    (outside / "shadow").write_text("secret\n")
    cases = {
        "/etc/link-out": (lambda p: os.symlink(str(outside / "shadow"), p), "is a symbolic link"),
        "/etc/link-in": (lambda p: os.symlink("fstab", p), "is a symbolic link"),
        "/etc/zero": (lambda p: os.symlink("/dev/zero", p), "is a symbolic link (to '/dev/zero')"),
        "/etc/fifo": (os.mkfifo, "is not a regular file"),
        "/etc/dev": (lambda p: os.mknod(p, 0o600 | 0o020000, os.makedev(1, 5)), "is not a regular file"),
        "/etc/dir": (os.mkdir, "is not a regular file"),
        "/etc/big": (lambda p: open(p, "wb").truncate(50 * 1024 * 1024), "more than the 1048576 read"),
        "/abs/shadow": (lambda p: None, "is a symbolic link"),
    }
    for path, (make, why) in cases.items():
        make(str(t) + path)
        start = time.monotonic()
        with pytest.raises(Refused, match=why.replace("(", r"\(").replace(")", r"\)")):
            safepath.read_in(str(t), path)
        assert time.monotonic() - start < 1  # a FIFO does not hang
    with pytest.raises(Refused) as e:
        safepath.read_in(str(t), "/etc/nosuch")
    assert e.value.code == safepath.EXIT_MISSING


def test_a_file_that_grows_past_the_limit_is_refused(tree):
    t, _ = tree
    (t / "etc" / "fstab").write_bytes(b"x" * 100)
    assert safepath.read_in(str(t), "/etc/fstab", limit=100) == b"x" * 100
    (t / "etc" / "fstab").write_bytes(b"x" * 101)
    with pytest.raises(Refused, match="more than the 100 read"):
        safepath.read_in(str(t), "/etc/fstab", limit=100)


def test_the_helper_commands_exit_codes_and_messages(tree, loopdev):
    t, outside = tree
    (t / "etc" / "fstab").write_text("/dev/xvda1 / ext4 defaults 0 1\n")
    r = subprocess.run(HELPER + ["read-in", "--", str(t), "/etc/fstab"], capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (0, "/dev/xvda1 / ext4 defaults 0 1\n")
    r = subprocess.run(HELPER + ["read-in", "--", str(t), "/etc/none"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr == f"read-in: '{t}/etc/none' does not exist\n"
    r = subprocess.run(HELPER + ["mount-in", "--", str(t), "/abs", loopdev, "ext4", "ro"], capture_output=True,
                       text=True)
    assert r.returncode == 1 and r.stderr == f"mount-in: '{t}/abs' is a symbolic link (to '{outside}'): not followed\n"
    r = subprocess.run(HELPER + ["umount-in", "--", str(t), "/srv", loopdev], capture_output=True, text=True)
    assert r.returncode == 32 and "not mounted" in r.stderr
    r = subprocess.run(HELPER + ["mount-in", "--", str(t)], capture_output=True, text=True)
    assert r.returncode == 64 and r.stderr.startswith("usage: domubackup mount-in")


def test_a_swap_to_a_symlink_during_the_walk_is_refused(tree, loopdev):
    # the guest (or anything) replaces a checked directory with a symlink: O_NOFOLLOW catches it
    t, outside = tree
    inode = os.stat(t / "srv").st_ino
    stop = threading.Event()

    def flip():
        while not stop.is_set():
            try:
                os.rename(t / "srv", t / "srv.d")
                os.symlink(str(outside), t / "srv")
                os.unlink(t / "srv")
                os.rename(t / "srv.d", t / "srv")
            except OSError:
                pass
    th = threading.Thread(target=flip)
    th.start()
    try:
        for _ in range(200):
            try:
                fd = safepath.open_dir(str(t), ["srv"])
            except Refused:
                continue
            try:
                assert os.fstat(fd).st_ino == inode  # the guest's directory, never the Dom0's
            finally:
                os.close(fd)
    finally:
        stop.set()
        th.join()
    assert os.listdir(outside) == ["keep"]


def test_batches_say_how_far_they_got(tree, loopdev, tmp_path):
    t, outside = tree
    img = tmp_path / "second.img"
    subprocess.run(["truncate", "-s", "32M", str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
    dev2 = subprocess.run(["losetup", "-f", "--show", str(img)], check=True, capture_output=True,
                          text=True).stdout.strip()
    before = mounts()
    try:
        opts = "ro,nodev,nosuid,noexec,nosymfollow"
        code, out, err = safepath.execute(["mount-in", "--", str(t), "/srv", loopdev, "ext4", opts,
                                           "/var/lib", dev2, "ext4", opts, "/abs", dev2, "ext4", opts])
        assert code == 1 and out.decode().endswith("\nmounted /var/lib\n")  # the symlink stops the batch
        from domubackup.core.model import Space
        from domubackup.core.parsers import parse_mount_space
        told = parse_mount_space(out.decode(), ["/srv", "/var/lib"])
        for path, space in zip(("/srv", "/var/lib"), told):  # each mount's own figures
            v = os.statvfs(f"{t}{path}")
            assert space == Space(v.f_blocks * v.f_frsize, (v.f_blocks - v.f_bfree) * v.f_frsize,
                                  v.f_bfree * v.f_frsize, v.f_files, v.f_files - v.f_ffree)
        assert len(told) == 2 and told[0].size > 20 * 2**20 and told[0].inodes_used == 11  # a fresh ext4
        assert err == f"mount-in: '{t}/abs' is a symbolic link (to '{outside}'): not followed\n"
        code, out, err = safepath.execute(["umount-in", "--", str(t), "/var/lib", dev2, "/srv", loopdev])
        assert (code, out, err) == (0, b"unmounted /var/lib\nunmounted /srv\n", "")
        assert mounts() == before
    finally:
        subprocess.run(["umount", f"{t}/var/lib"], check=False, capture_output=True)
        subprocess.run(["umount", f"{t}/srv"], check=False, capture_output=True)
        subprocess.run(["losetup", "-d", dev2], check=False)
