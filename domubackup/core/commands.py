"""Builders of argv lists. Pure: every command the tool runs is spelled here (or next to its parser)."""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: a helper that imports this module (thin.py) skips the config
    from .config import RsyncSettings, SSHSettings


def dm_name(vg: str, lv: str) -> str:
    """device-mapper name of an LV: hyphens inside VG and LV names are doubled."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def lv_path(vg: str, lv: str) -> str:
    return f"/dev/{vg}/{lv}"


def partition_device(vg: str, lv: str, sep: str, number: int) -> str:
    """The device `kpartx -a -p SEP /dev/VG/LV` creates for partition NUMBER."""
    return f"/dev/mapper/{dm_name(vg, lv)}{sep}{number}"


def lvcreate_snapshot(vg: str, lv: str, snap: str, size: str) -> tuple[str, ...]:
    sizing = "--extents" if size.endswith(("%ORIGIN", "%VG", "%FREE")) else "--size"
    return ("lvcreate", "--snapshot", sizing, size, "--name", snap, lv_path(vg, lv))


def lvcreate_thin_snapshot(vg: str, lv: str, snap: str) -> tuple[str, ...]:
    """A thin snapshot of thin LV (no size: it shares the pool), active at once (-kn)."""
    return ("lvcreate", "--snapshot", "--setactivationskip", "n", "--name", snap, lv_path(vg, lv))


def thin_delta(base: str, snap: str) -> tuple[str, ...]:
    """The byte ranges where thin snapshot SNAP differs from thin snapshot BASE (hosts/thin.py)."""
    return (HELPER, "thin-delta", base, snap)


def thin_base(snap: str, base: str) -> tuple[str, ...]:
    """Thin snapshot SNAP becomes BASE (replacing the one there); prints its generation."""
    return (HELPER, "thin-base", snap, base)


def lvremove(vg: str, lv: str) -> tuple[str, ...]:
    return ("lvremove", "-f", lv_path(vg, lv))


def lvextend(vg: str, lv: str, by: str) -> tuple[str, ...]:
    return ("lvextend", "--size", f"+{by}", lv_path(vg, lv))


def kpartx_add(dev: str, sep: str, *, read_only: bool = False) -> tuple[str, ...]:
    return ("kpartx", "-a", *(("-r",) if read_only else ()), "-s", "-p", sep, dev)


def lv_activate(path: str) -> tuple[str, ...]:
    """Activate an LV even when it has the activation-skip flag (a thin snapshot has it)."""
    return ("lvchange", "--activate", "y", "--ignoreactivationskip", path)


def lv_deactivate(path: str) -> tuple[str, ...]:
    return ("lvchange", "--activate", "n", path)


def kpartx_list(dev: str, sep: str) -> tuple[str, ...]:
    """What `kpartx_add` would map, without mapping it (parsers.parse_kpartx_list)."""
    return ("kpartx", "-l", "-p", sep, dev)


def kpartx_delete(dev: str, sep: str) -> tuple[str, ...]:
    return ("kpartx", "-d", "-p", sep, dev)


def mount(dev: str, target: str, fstype: str, options: tuple[str, ...]) -> tuple[str, ...]:
    return ("mount", "-t", fstype, "-o", ",".join(options), "--", dev, target)


# The helpers of safepath (the `domubackup` program on the host that runs them): PATH is a
# path inside TREE that the guest controls, resolved there without following any symlink.
HELPER = "domubackup"


def mount_in(tree: str, path: str, dev: str, fstype: str, options: tuple[str, ...], *,
             mkdir: bool = False) -> tuple[str, ...]:
    return (HELPER, "mount-in", *(("--mkdir",) if mkdir else ()), "--", tree, path, dev, fstype,
            ",".join(options))


def umount_in(tree: str, path: str, dev: str) -> tuple[str, ...]:
    return (HELPER, "umount-in", "--", tree, path, dev)


def read_in(tree: str, path: str) -> tuple[str, ...]:
    return (HELPER, "read-in", "--", tree, path)


def history_json() -> tuple[str, ...]:
    """A Dom0's catalog, asked by `check` of another Dom0 (report.newest_ok_per_domu)."""
    return (HELPER, "history", "--json")


def batch_key(argv) -> tuple[tuple[str, ...] | None, tuple[str, ...]]:
    """(what a command shares with the neighbours it can run as one command with, the words it
    adds to that command); (None, ()) when it runs alone. `lvremove -f LV...` (each LVM command
    costs seconds on a busy Dom0) and the safepath mounts and unmounts of one tree (one helper
    start per host instead of one per filesystem on the peer)."""
    argv = tuple(argv)
    if len(argv) == 3 and argv[:2] == ("lvremove", "-f"):
        return argv[:2], argv[2:]
    if argv[:2] in ((HELPER, "mount-in"), (HELPER, "umount-in")) and "--" in argv:
        i = argv.index("--") + 2  # ... -- TREE
        return argv[:i], argv[i:]
    return None, ()


def batched(argvs) -> tuple[str, ...]:
    """One command for neighbouring commands of the same batch_key, in their order."""
    return batch_key(argvs[0])[0] + tuple(w for a in argvs for w in batch_key(a)[1])


def umount(target: str) -> tuple[str, ...]:
    return ("umount", "--", target)


def mkdir(path: str) -> tuple[str, ...]:
    return ("mkdir", "-p", "--", path)


def rmdir(path: str) -> tuple[str, ...]:
    return ("rmdir", "--", path)


def virsh_domstate(uri: str, domu: str) -> tuple[str, ...]:
    return ("virsh", "-c", uri, "domstate", "--domain", domu)


def _whole_seconds(seconds: float) -> int:
    """For options that take whole seconds, where 0 would mean "off": at least 1."""
    return max(1, round(seconds))


def ssh_command(ssh: SSHSettings, host: str | None = None) -> tuple[str, ...]:
    """The ssh client argv rsync uses to reach Dom0 ``host``: same identity, port (the host's
    [dom0.NAME] port, else ssh.port) and pinned known_hosts as paramiko;
    keepalives so that a link that dies mid-transfer ends rsync (exit 255) within
    ~3 x alive_interval. It reads only the files configured here: no ssh_config (`-F none`),
    no global known_hosts, no control socket, agent or forwarding, no host key rewrite."""
    alive = ("-o", f"ServerAliveInterval={_whole_seconds(ssh.alive_interval)}", "-o", "ServerAliveCountMax=3") \
        if ssh.alive_interval else ()
    isolated = ("GlobalKnownHostsFile=/dev/null", "UpdateHostKeys=no", "ControlMaster=no", "ControlPath=none",
                "ForwardAgent=no", "ForwardX11=no", "ClearAllForwardings=yes", "PermitLocalCommand=no")
    port = ssh.port if host is None else ssh.endpoint(host)[1]
    return ("ssh", "-F", "none", "-p", str(port), "-i", ssh.identity_file,
            "-o", f"UserKnownHostsFile={ssh.known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            *(w for o in isolated for w in ("-o", o)),
            "-o", f"ConnectTimeout={int(ssh.connect_timeout)}", *alive, "-l", ssh.user)


def rsync(source_dir: str, peer: str, target_dir: str, rs: RsyncSettings, ssh: SSHSettings, *,
          progress: bool = False, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """rsync from SOURCE/ into PEER:TARGET/ (the trailing slashes copy the contents, not the dir),
    PEER reached at its address and port (SSHSettings.endpoint), as paramiko reaches it."""
    argv = ["rsync", *rs.options, *rs.extra_options]
    if rs.compress:
        argv.append("--compress")
    if rs.bwlimit:
        argv.append(f"--bwlimit={rs.bwlimit}")
    if rs.io_timeout:
        argv.append(f"--timeout={_whole_seconds(rs.io_timeout)}")
    if progress:
        argv.append("--info=progress2")
    address = ssh.endpoint(peer)[0]
    if ":" in address:  # IPv6: rsync takes [ADDRESS]:PATH
        address = f"[{address}]"
    argv += ["--stats", *extra, "-e", shlex.join(ssh_command(ssh, peer))]
    argv += [source_dir.rstrip("/") + "/", f"{address}:{target_dir.rstrip('/')}/"]
    return tuple(argv)


def copy_blocks(source: str, target: str, size: int) -> tuple[str, ...]:
    """On one host: TARGET's first SIZE bytes become SOURCE's, only differing blocks written
    (hosts/blockcopy.py)."""
    return (HELPER, "copy-blocks", source, target, str(size))


def send_blocks(dev: str, size: int) -> tuple[str, ...]:
    """DEV's first SIZE bytes as a block stream on standard output (hosts/blockcopy.py)."""
    return (HELPER, "send-blocks", dev, str(size))


def receive_blocks(dev: str, size: int) -> tuple[str, ...]:
    """A block stream on standard input written to DEV; prints its checksum and write token."""
    return (HELPER, "receive-blocks", dev, str(size))


def block_digests(dev: str, size: int, token: str | None) -> tuple[str, ...]:
    """DEV's block digests, or ``same`` when its write token is still TOKEN ("-": none known)."""
    return (HELPER, "block-digests", dev, str(size), token or "-")


def fsck_readonly(fstype: str, dev: str) -> tuple[str, ...] | None:
    """A check that changes nothing (-n), per filesystem type; None when there is none."""
    return {"ext2": ("e2fsck", "-n", "-f", dev), "ext3": ("e2fsck", "-n", "-f", dev),
            "ext4": ("e2fsck", "-n", "-f", dev), "xfs": ("xfs_repair", "-n", dev),
            "vfat": ("fsck.vfat", "-n", dev), "btrfs": ("btrfs", "check", "--readonly", dev)}.get(fstype)
