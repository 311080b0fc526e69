"""Paths inside a tree that a guest wrote, resolved without following any symbolic link.

A DomU controls every name in its filesystems, and so in the snapshot tree on this Dom0 and in
the replica tree on the peer (rsync brings the guest's symlinks there). mount(8), umount(8)
and cat(1) resolve a path themselves and follow symlinks in it: a guest that makes ``srv`` a
symlink to ``/root/.ssh`` would have the tool mount over the Dom0's own directory. Here every
component of a path inside the tree is looked at with ``lstat`` and opened with
``O_PATH|O_NOFOLLOW|O_DIRECTORY`` relative to the one before (the walk of systemd's chase()
without its symlink handling: a symlink anywhere is refused, never followed), and the mount
goes onto the opened directory through ``/proc/self/fd/N`` with ``mount --no-canonicalize``
(as runc does), so the path is never looked up again; then the mount is checked where it
landed (``/proc/self/mountinfo``). Unmount looks up the mount the same way and checks that
it is the run's (same mount point, same device) before it unmounts it.

The tool runs these as the helper commands ``domubackup mount-in | umount-in | read-in``
through its runner, on this host and on the peer alike (the same code on both): argv in,
exit code and messages out, so that the journal can record them like any other command.
Exit codes: 0 done; 1 refused (a symlink, not a directory, a bad path); 2 (read-in) no such
file; 32 (umount-in) not mounted / busy, as umount(8); 64 usage; mount's own code when
mount fails."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

MAX_PATH = 4096
MAX_NAME = 255
MOUNT_TIMEOUT = 600  # seconds for one mount(8) (an ext4 journal replay on a slow disk)
READ_LIMIT = 1024 * 1024  # read-in: at most this many bytes (an fstab is a few hundred)
UMOUNT_NOFOLLOW = 8  # umount2(2)
EXIT_REFUSED, EXIT_MISSING, EXIT_NOT_MOUNTED, EXIT_USAGE = 1, 2, 32, 64
COMMANDS = ("mount-in", "umount-in", "read-in")


class Refused(Exception):
    """The path cannot be used safely (or does not exist): the message says why."""

    def __init__(self, message: str, code: int = EXIT_REFUSED):
        super().__init__(message)
        self.code = code


def shown(text: str) -> str:
    """A guest-made name for a message: quoted, control characters escaped."""
    return ascii(text) if not text.isprintable() else repr(text)


def components(path: str) -> list[str]:
    """The components of PATH inside the tree ("/srv/www" -> ["srv", "www"]; "/" -> []).
    Refuses "..", NUL, and absurd lengths; "." and empty components are dropped."""
    if "\0" in path:
        raise Refused(f"path {shown(path)} contains a NUL byte")
    if len(os.fsencode(path)) > MAX_PATH:
        raise Refused(f"path {shown(path[:80])}... is longer than {MAX_PATH} bytes")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    for p in parts:
        if p == "..":
            raise Refused(f"path {shown(path)} contains '..'")
        if len(os.fsencode(p)) > MAX_NAME:
            raise Refused(f"path {shown(path)} has a component longer than {MAX_NAME} bytes")
    return parts


def _where(tree: str, parts: list[str]) -> str:
    return shown(os.path.join(tree, *parts))


def _link(name: str, dir_fd: int) -> str:
    """Where the symlink NAME points, for a message (it may be gone already)."""
    try:
        return shown(os.readlink(name, dir_fd=dir_fd))
    except OSError:
        return "somewhere"


def open_dir(tree: str, parts: list[str], *, create: bool = False) -> int:
    """An O_PATH descriptor of TREE/PARTS..., every component a real directory (no symlink
    followed, none crossed); ``create`` makes missing components (mode 0755). TREE itself is
    the tool's own (config), opened as it is."""
    fd = os.open(tree, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, name in enumerate(parts):
            here = parts[: i + 1]
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                if not create:
                    raise Refused(f"{_where(tree, here)} does not exist", EXIT_MISSING) from None
                os.mkdir(name, 0o755, dir_fd=fd)
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise Refused(f"{_where(tree, here)} is a symbolic link (to {_link(name, fd)}): not followed")
            if not stat.S_ISDIR(st.st_mode):
                raise Refused(f"{_where(tree, here)} is not a directory")
            try:
                nxt = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            except OSError as e:  # it changed since the lstat
                raise Refused(f"{_where(tree, here)}: {e.strerror}") from None
            seen = os.fstat(nxt)
            if (seen.st_dev, seen.st_ino) != (st.st_dev, st.st_ino):
                os.close(nxt)
                raise Refused(f"{_where(tree, here)} changed while it was looked up")
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unoctal(field: str) -> str:
    """mountinfo's octal escapes (\\040 for a space) decoded."""
    if "\\" not in field:
        return field
    raw, out, i = os.fsencode(field), bytearray(), 0
    while i < len(raw):
        if raw[i:i + 1] == b"\\" and raw[i + 1:i + 4].isdigit() and len(raw[i + 1:i + 4]) == 3:
            out.append(int(raw[i + 1:i + 4], 8) & 0xFF)
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def parse_mountinfo(text: str) -> list[dict]:
    """Parse /proc/PID/mountinfo (proc(5)): one dict per line with id, parent, dev
    ("MAJ:MIN"), root, mountpoint, fstype and source, escapes decoded. Here rather than in
    parsers: the helpers must start fast (parsers' imports cost ~0.5 s under emulation)."""
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        f, r = left.split(" "), right.split(" ")
        if not sep or len(f) < 6 or len(r) < 2 or not f[0].isdigit():
            raise ValueError(f"malformed mountinfo line {line!r}")
        out.append({"id": int(f[0]), "parent": int(f[1]), "dev": f[2], "root": _unoctal(f[3]),
                    "mountpoint": _unoctal(f[4]), "fstype": r[0], "source": _unoctal(r[1])})
    return out


def mount_of(fd: int) -> dict | None:
    """The /proc/self/mountinfo record of the mount that descriptor FD is on."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        mnt_id = next(int(line.split()[1]) for line in f if line.startswith("mnt_id:"))
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return next((m for m in parse_mountinfo(f.read()) if m["id"] == mnt_id), None)


def _is_the_mount(m: dict | None, fd: int, target: str, dev: str) -> str | None:
    """None when FD is the root of a mount of DEV at TARGET; else what is there instead."""
    if m is None:
        return "no mount record"
    if m["mountpoint"] != target or m["root"] != "/":
        return f"the directory is on the mount at {shown(m['mountpoint'])}"
    st = os.fstat(fd)
    try:
        rdev = os.stat(dev).st_rdev
    except OSError:
        rdev = None
    if st.st_dev != rdev and m["source"] not in (dev, os.path.realpath(dev)):
        return f"{shown(m['source'])} is mounted there, not {dev}"
    return None


def mount_in(tree: str, path: str, dev: str, fstype: str, options: str, *, mkdir: bool = False) -> os.statvfs_result:
    """Mount DEV on TREE/PATH, PATH resolved inside TREE without following symlinks; return the
    new mount's statvfs (what it holds and has room for: checked before a transfer)."""
    parts = components(path)
    target = os.path.join(os.path.realpath(tree), *parts)
    fd = open_dir(tree, parts, create=mkdir)
    try:
        res = subprocess.run(["mount", "--no-canonicalize", "-t", fstype, "-o", options, "--", dev,
                              f"/proc/self/fd/{fd}"], pass_fds=(fd,), stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, errors="replace", timeout=MOUNT_TIMEOUT,
                             env={"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    finally:
        os.close(fd)
    if res.returncode:
        why = " | ".join(line.strip() for line in res.stderr.strip().splitlines()[:3])
        raise Refused(f"mount of {dev} on {shown(target)} failed (mount exited {res.returncode}"
                      + (f": {why})" if why else ")"), res.returncode)
    fd = open_dir(tree, parts)
    try:
        wrong = _is_the_mount(mount_of(fd), fd, target, dev)
        space = os.fstatvfs(fd)
    finally:
        os.close(fd)
    if wrong:
        raise Refused(f"the mount of {dev} did not land on {shown(target)}: {wrong}")
    return space


def umount_in(tree: str, path: str, dev: str) -> None:
    """Unmount TREE/PATH when it is the mount of DEV that mount_in made there; the lookup
    does not follow symlinks and the unmount goes through the parent directory's descriptor
    (a descriptor inside the mount would keep it busy)."""
    parts = components(path)
    real = os.path.realpath(tree)
    target = os.path.join(real, *parts)
    if parts:
        try:
            parent, name = open_dir(tree, parts[:-1]), parts[-1]
        except Refused as e:  # mount_in never mounts across a symlink: nothing of ours is there
            raise Refused(f"{shown(target)}: not mounted ({e})", EXIT_NOT_MOUNTED) from None
    else:  # the tree root itself: the tool's own directory, looked up from its parent
        parent, name = os.open(os.path.dirname(real), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), \
            os.path.basename(real)
    try:
        try:
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=parent)
        except FileNotFoundError:
            raise Refused(f"{shown(target)}: not mounted (no such directory)", EXIT_NOT_MOUNTED) from None
        except OSError as e:  # a symlink, or not a directory: mount_in never mounts there
            raise Refused(f"{shown(target)}: not mounted ({e.strerror}; not followed)", EXIT_NOT_MOUNTED) from None
        try:
            wrong = _is_the_mount(mount_of(fd), fd, target, dev)
        finally:
            os.close(fd)
        if wrong:
            raise Refused(f"{shown(target)}: not mounted ({wrong})", EXIT_NOT_MOUNTED)
        import ctypes  # here: ~50 ms to import under the lab's emulation

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.umount2(os.fsencode(f"/proc/self/fd/{parent}/{name}"), UMOUNT_NOFOLLOW) != 0:
            err = ctypes.get_errno()
            raise Refused(f"umount of {shown(target)} failed: {os.strerror(err)}", EXIT_NOT_MOUNTED)
    finally:
        os.close(parent)


def read_in(tree: str, path: str, limit: int = READ_LIMIT) -> bytes:
    """The contents of the regular file TREE/PATH, at most LIMIT bytes, no symlink followed
    (not even the last component), never a FIFO or device (opened O_NONBLOCK, checked)."""
    parts = components(path)
    if not parts:
        raise Refused("read-in needs a file name")
    where = _where(tree, parts)
    dirfd = open_dir(tree, parts[:-1])
    try:
        try:
            st = os.stat(parts[-1], dir_fd=dirfd, follow_symlinks=False)
        except FileNotFoundError:
            raise Refused(f"{where} does not exist", EXIT_MISSING) from None
        if stat.S_ISLNK(st.st_mode):
            raise Refused(f"{where} is a symbolic link (to {_link(parts[-1], dirfd)}): not followed")
        if not stat.S_ISREG(st.st_mode):
            raise Refused(f"{where} is not a regular file")
        if st.st_size > limit:
            raise Refused(f"{where} is {st.st_size} bytes, more than the {limit} read")
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                     dir_fd=dirfd)
    finally:
        os.close(dirfd)
    try:
        seen = os.fstat(fd)
        if not stat.S_ISREG(seen.st_mode) or (seen.st_dev, seen.st_ino) != (st.st_dev, st.st_ino):
            raise Refused(f"{where} changed while it was opened")
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise Refused(f"{where} is more than {limit} bytes")
    return data


USAGE = """usage: domubackup mount-in [--mkdir] -- TREE PATH DEV FSTYPE OPTIONS [PATH DEV FSTYPE OPTIONS]...
       domubackup umount-in -- TREE PATH DEV [PATH DEV]...
       domubackup read-in [--max BYTES] -- TREE PATH"""
ARITY = {"mount-in": 4, "umount-in": 2, "read-in": 1}  # words per item after TREE


def execute(argv: list[str]) -> tuple[int, bytes, str]:
    """Run one helper command (argv[0] is its name): (exit code, stdout, stderr). mount-in and
    umount-in take several items (one command for a host's neighbouring steps), done in order;
    the first failure stops them; each item done is told on stdout ("mounted PATH",
    "unmounted PATH"), so that a caller knows how far a failed batch got; before each "mounted"
    line, "space SIZE USED FREE INODES INODES_USED" (bytes; FREE counts root's reserve; INODES 0:
    the filesystem has no fixed count) of the new mount. Used in-process by the
    local runner and by ``main`` (the program, on the peer)."""
    command, args = argv[0], list(argv[1:])
    flags = {}
    while args and args[0] != "--":
        if args[0] == "--mkdir":
            flags["mkdir"] = True
            args.pop(0)
        elif args[0] == "--max" and len(args) > 1 and args[1].isdigit():
            flags["limit"] = int(args[1])
            del args[:2]
        else:
            break
    if args[:1] == ["--"]:
        args.pop(0)
    n = ARITY[command]
    items = [args[i:i + n] for i in range(1, len(args), n)]
    if len(args) < 1 + n or (len(args) - 1) % n or (command == "read-in" and len(items) != 1) or \
            ("mkdir" in flags and command != "mount-in") or ("limit" in flags and command != "read-in"):
        return EXIT_USAGE, b"", USAGE + "\n"
    tree, out = args[0], []
    for item in items:
        try:
            if command == "mount-in":
                v = mount_in(tree, *item, mkdir=flags.get("mkdir", False))
                out.append(f"space {v.f_blocks * v.f_frsize} {(v.f_blocks - v.f_bfree) * v.f_frsize} "
                           f"{v.f_bfree * v.f_frsize} {v.f_files} {v.f_files - v.f_ffree}\n"
                           f"mounted {item[0]}\n".encode("utf-8", "surrogateescape"))
            elif command == "umount-in":
                umount_in(tree, *item)
                out.append(f"unmounted {item[0]}\n".encode("utf-8", "surrogateescape"))
            else:
                out.append(read_in(tree, *item, limit=flags.get("limit", READ_LIMIT)))
        except Refused as e:
            return e.code, b"".join(out), f"{command}: {e}\n"
        except (OSError, subprocess.SubprocessError) as e:
            return EXIT_REFUSED, b"".join(out), f"{command}: {e}\n"
    return 0, b"".join(out), ""


def main(argv: list[str]) -> int:
    """The helper commands as a program: ``execute``, its output on stdout and stderr."""
    code, out, err = execute(argv)
    sys.stdout.buffer.write(out)
    sys.stderr.write(err)
    return code
