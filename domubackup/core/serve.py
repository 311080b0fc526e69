"""`domubackup serve`: the one program a client Dom0's key may run on its peer (a forced
command in root's authorized_keys). Pure: the request's parser and the judge; the I/O (the
peer's config, its LV tags, the exec) is in hosts/serve.py.

A request is the line the client's ssh asked for (SSH_ORIGINAL_COMMAND): either the runner's
own form, ``NAME=VALUE... timeout -k K T ARGV... [</dev/null]`` (hosts/ssh.py remote_command:
every word shlex-quoted), or rsync's receiving end ``rsync --server ...`` (rsync's own ssh).
The judge allows exactly the command shapes the tool's planners produce for a DomU that the
peer's config grants to that client ([serve] clients), on that DomU's own objects:

- its replica LVs and restore points: LVs tagged ``dbk:domu:D`` on this host (the tag is made
  by seed's lvcreate, or by the admin for replicas older than the tag); a partition mapping
  (kpartx) counts as its LV;
- its trees: TARGET_PREFIX/D and TARGET_PREFIX/.D.unplaced (the peer's own target_prefix);
- its rsync receiver: into one of its trees only, never as a sender, no option that names a
  path of its own.

Append-only: a client creates points (and a point it began and did not finish may be undone),
but never removes, prunes or un-tags a good one, nor rolls back (those run on the peer, or from
a client named in [serve] allow_prune_from). Anything else is refused with the reason."""

from __future__ import annotations

import posixpath
import re
import shlex

from .errors import DomuBackupError

HELPER = "domubackup"
REFUSED = "domubackup serve: refused: "  # how a refusal starts on stderr (exit errors.EXIT_REFUSED)
TAG = "dbk:"
POINT, WRITING, PENDING, GOOD, PRUNING = ("dbk:point", "dbk:writing", "dbk:state:pending", "dbk:state:good",
                                          "dbk:state:pruning")
NAME = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]*")  # an LVM VG or LV name
ENV_WORD = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.S)
SECONDS = re.compile(r"\d+(\.\d+)?")
STAMP = re.compile(r"\d{8}T\d{6}Z")
NO_INPUT = " </dev/null"
# Whole words: the read-only listings' options (lvs, vgs) and what they may name
LIST_OPTIONS = {"--noheadings", "--nosuffix", "--reportformat", "--units", "--separator", "-o"}
# rsync's receiving end: the long options the tool's [rsync] options may send (each may take a
# value); a path-naming one (--temp-dir, --backup-dir, --log-file, --*-dest, --files-from...)
# is not among them
RSYNC_LONG = {"--delete", "--delete-before", "--delete-during", "--delete-delay", "--delete-after",
              "--delete-excluded", "--numeric-ids", "--sparse", "--inplace", "--partial", "--timeout",
              "--bwlimit", "--max-delete", "--ignore-errors", "--force", "--compress-level",
              "--compress-choice", "--checksum-choice", "--no-whole-file", "--whole-file", "--size-only",
              "--ignore-times", "--modify-window", "--fsync", "--preallocate", "--no-inc-recursive",
              "--max-size", "--min-size", "--chmod", "--usermap", "--groupmap", "--chown", "--info", "--debug",
              "--stats"}

# what rsync's client sends for its --out-format (verify's itemized dry run): fixed values
RSYNC_LOG_FORMATS = {"--log-format=%i%I", "--log-format=%i", "--log-format=%o", "--log-format=X"}


# A serve session: one long-lived channel that carries many requests (hosts/serve.py session,
# hosts/ssh.py SSHRunner): the client asks for the line `domubackup serve-session`; each frame
# is a 4-byte big-endian length, that many bytes of a JSON head, then the payload the head
# announces. Hello {"session": 1}; request {"line": L, "input": N or null} + N bytes of stdin
# (L: the line a single request would have been), answered at once by {"ack": 1} (a peer that
# went away is found within the connect timeout, not the command's), then when the command
# ended by the reply {"code": C, "out": N, "err": M} + N + M.
SESSION = "serve-session"
SESSION_INPUT = 1 << 20  # the most stdin one request carries in a session (within SSH's window; larger: a channel)
# seconds a session waits for the next request before it ends (the client starts a new one after
# SESSION_IDLE - 10 idle): a session whose client went away unseen (a cut link) ends by itself
SESSION_IDLE = 30


def frame(head: dict, payload: bytes = b"") -> bytes:
    import json

    data = json.dumps(head).encode()
    return len(data).to_bytes(4, "big") + data + payload


class Refused(DomuBackupError):
    """A request `serve` does not run. Its message goes back to the client on stderr."""


class Request:
    def __init__(self, argv: tuple[str, ...], timeout: tuple[str, str] | None, no_input: bool,
                 env: dict[str, str] | None = None):
        self.argv, self.timeout, self.no_input = argv, timeout, no_input  # timeout: (kill_after, seconds)
        self.env = env or {}  # the client's assignments: only a session without a judge uses them


def parse_request(line: str | None) -> Request:
    """The request the client's line asks for; Refused for an interactive login (no line) or
    a line that is not in one of the two forms. The client's environment assignments are kept
    in ``env``, and serve drops them: the command gets the peer's own environment."""
    if not line:
        raise Refused("an interactive session: this key runs only `domubackup serve` requests")
    no_input = line.endswith(NO_INPUT)  # unquoted: a quoted '</dev/null' word ends with its quote
    try:
        words = shlex.split(line[: -len(NO_INPUT)] if no_input else line)
    except ValueError as e:
        raise Refused(f"not a request: {e}") from None
    env = {}
    while words and ENV_WORD.fullmatch(words[0]):
        name, value = ENV_WORD.fullmatch(words.pop(0)).groups()
        env[name] = value
    if words[:2] == ["rsync", "--server"] and not env and not no_input:
        return Request(tuple(words), None, False)
    if (len(words) < 5 or words[:2] != ["timeout", "-k"] or not SECONDS.fullmatch(words[2])
            or not SECONDS.fullmatch(words[3])):
        raise Refused("not a request of domubackup: " + shlex.join(words[:12]))
    return Request(tuple(words[4:]), (words[2], words[3]), no_input, env)


def lvchange_tags(argv) -> tuple[list[str], list[str], list[str]] | None:
    """(ADDS, DELS, PATHS) of ``lvchange (--addtag T | --deltag T)... /dev/PATH...``, the one
    shape of lvchange the tool sends; None for any other argv."""
    if argv[:1] != ("lvchange",):
        return None
    adds, dels, paths, words = [], [], [], list(argv[1:])
    while words:
        w = words.pop(0)
        if w in ("--addtag", "--deltag") and words:
            (adds if w == "--addtag" else dels).append(words.pop(0))
        elif w.startswith("/dev/"):
            paths.append(w)
        else:
            return None
    return (adds, dels, paths) if paths else None


class Grant:
    """What the peer's config lets CLIENT do: DOMUS (its DomUs here), PRUNE (prune, rollback)."""

    def __init__(self, client: str, domus, prune: bool, target_prefix: str, separator: str, libvirt_uri: str,
                 state_dir: str):
        self.client, self.domus, self.prune = client, frozenset(domus), prune
        self.target_prefix, self.separator = target_prefix.rstrip("/"), separator
        self.libvirt_uri, self.state_dir = libvirt_uri, state_dir


def device_lv(path: str) -> tuple[str, str] | None:
    """(VG, LV) that /dev/VG/LV names; None for any other form of path."""
    parts = path.split("/")
    if len(parts) == 4 and parts[:2] == ["", "dev"] and parts[2] != "mapper" and all(
            NAME.fullmatch(p) for p in parts[2:]):
        return parts[2], parts[3]
    return None


def dm_lv(name: str) -> tuple[str, str] | None:
    """(VG, LV) of an LV's device-mapper name (LVM doubles the dashes of VG and LV)."""
    m = re.fullmatch(r"((?:[^-]|--)+)-((?:[^-]|--)+)", name)
    vg_lv = m and tuple(g.replace("--", "-") for g in m.groups())
    return vg_lv if vg_lv and all(NAME.fullmatch(n) for n in vg_lv) else None


class Judge:
    """Decides one request of GRANT's client. TAGS(vg, lv) -> the LV's tags (a set), or None
    when there is no such LV on this host; DEVICE(path) -> (VG, LV) of an existing device-mapper
    device (a partition mapping: its LV), or None."""

    def __init__(self, grant: Grant, tags, device=None, exists=None):
        self.g, self.tags, self.device = grant, tags, device or (lambda path: None)
        self.exists = exists or (lambda path: False)

    # --- objects ---------------------------------------------------------------------------------

    def owner(self, vg: str, lv: str, *, point: bool | None = False) -> str:
        """The granted DomU whose LV VG/LV is (POINT: True a restore point member, False a
        replica, None either); Refused otherwise."""
        tags = self.tags(vg, lv)
        if tags is None:
            raise Refused(f"{vg}/{lv}: no such logical volume here")
        domus = [t[len(TAG) + 5:] for t in tags if t.startswith(TAG + "domu:")]
        if len(domus) != 1:
            raise Refused(f"{vg}/{lv} is not the replica of a DomU (no dbk:domu tag): not for {self.g.client}",
                          hint="on the peer, tag an existing replica once: lvchange --addtag dbk:domu:DOMU VG/LV")
        if domus[0] not in self.g.domus:
            raise Refused(f"{vg}/{lv} belongs to DomU {domus[0]}, which this host's [serve] clients does not "
                          f"grant to {self.g.client}")
        if point is not None and (POINT in tags) != point:
            raise Refused(f"{vg}/{lv} is {'not ' if point else ''}a restore point member: not writable this way")
        return domus[0]

    def lv(self, path: str, **kw) -> str:
        """The granted DomU of device PATH (/dev/VG/LV, or a /dev/mapper device of one)."""
        vg_lv = device_lv(path)
        if vg_lv is None and path.startswith("/dev/mapper/") and "/" not in path[12:]:
            vg_lv = self.device(path)
        if vg_lv is None:
            raise Refused(f"{path!r} is not a logical volume of a DomU here")
        return self.owner(*vg_lv, **kw)

    def tree(self, path: str, *, deep: bool = False, child: bool = False) -> str:
        """The granted DomU whose tree PATH is (TARGET_PREFIX/D, TARGET_PREFIX/.D.unplaced, or
        a directory right in the latter; CHILD: or right in either, as mkdir and rmdir of a
        layout without fstab make them, TREE/xvda: mkdir(2) and rmdir(2) follow no symlink
        in their last component; DEEP: or anything below either); Refused otherwise."""
        norm = posixpath.normpath(path)
        head, _, rest = norm.partition(self.g.target_prefix + "/")
        if head or not rest or norm != path.rstrip("/"):
            raise Refused(f"{path!r} is not under this host's target prefix {self.g.target_prefix}")
        parts = rest.split("/")
        m = re.fullmatch(r"\.(.+)\.unplaced", parts[0])
        domu = m.group(1) if m else parts[0]
        if domu not in self.g.domus or not deep and len(parts) > (2 if m or child else 1):
            raise Refused(f"{path!r} is not the tree of a DomU granted to {self.g.client}")
        return domu

    def granted(self, domu: str) -> str:
        if domu not in self.g.domus:
            raise Refused(f"DomU {domu!r} is not granted to {self.g.client} by this host's [serve] clients")
        return domu

    # --- the request -----------------------------------------------------------------------------

    def judge(self, req: Request) -> None:
        """Refused unless REQ is one of the shapes the tool sends for a granted DomU."""
        a = req.argv
        if req.timeout is None:  # rsync's receiving end
            return self.rsync(a)
        name = a[0] if a[0] != HELPER else f"{HELPER} {a[1] if len(a) > 1 else ''}"
        check = getattr(self, "c_" + re.sub(r"[^a-z0-9]", "_", name), None)
        if check is None:
            raise Refused(f"`{shlex.join(a[:8])}` is not a command this host serves to {self.g.client}")
        if check(a) is False:
            raise Refused(f"`{shlex.join(a[:12])}`: not a form this host serves to {self.g.client}")

    def c_true(self, a):
        return a == ("true",)

    def c_which(self, a):
        return all(NAME.fullmatch(w) for w in a[1:])

    def c_domubackup_history(self, a):
        return a[2:] == ("--json",)

    def c_virsh(self, a):
        if len(a) != 6 or a[1:3] != ("-c", self.g.libvirt_uri) or a[3:5] != ("domstate", "--domain"):
            return False
        self.granted(a[5])

    def c_lvs(self, a):  # read-only listings: their options, and VG, VG/LV, /dev/VG/LV, @dbk:domu:D
        words = list(a[1:])
        while words:
            w = words.pop(0)
            if w in ("--noheadings", "--nosuffix"):
                continue
            if w in ("--reportformat", "--units", "--separator", "-o") and words:
                words.pop(0)
            elif w.startswith("@" + TAG + "domu:"):
                self.granted(w[len(TAG) + 6:])
            elif not (device_lv(w) or w.count("/") <= 1 and all(NAME.fullmatch(p) for p in w.split("/"))):
                return False

    c_vgs = c_lvs

    def c_blkid(self, a):  # blkid -p [-d] -o export [-O N] [-S N] DEV
        words = list(a[1:])
        if words[:1] != ["-p"] or len(words) < 4:
            return False
        words.pop(0)
        if words[:1] == ["-d"]:
            words.pop(0)
        if words[:2] != ["-o", "export"]:
            return False
        words = words[2:]
        while len(words) > 1 and words[0] in ("-O", "-S") and words[1].isdigit():
            words = words[2:]
        if len(words) != 1:
            return False
        self.lv(words[0], point=None)

    def c_parted(self, a):  # parted -s [-m] DEV unit B print
        dev = a[3] if a[2:3] == ("-m",) else a[2]
        if a[1:2] != ("-s",) or a[-3:] != ("unit", "B", "print") or len(a) != (7 if a[2] == "-m" else 6):
            return False
        self.lv(dev, point=None)

    def c_kpartx(self, a):
        sep, dev = self.g.separator, a[-1]
        if a[1:] not in (("-a", "-s", "-p", sep, dev), ("-a", "-r", "-s", "-p", sep, dev),
                         ("-d", "-p", sep, dev), ("-l", "-p", sep, dev)):
            return False
        self.lv(dev, point=False if a[1:3] == ("-a", "-s") else None)

    def c_umount(self, a):  # a leftover mount of a DomU's tree (cleanup)
        if len(a) != 3 or a[1] != "--":
            return False
        self.tree(a[2], deep=True)

    def c_findmnt(self, a):
        return all(w in ("-J", "-l", "-rn", "-o") or re.fullmatch(r"[A-Z,_-]+", w) for w in a[1:])

    def c_mkdir(self, a):
        if len(a) != 4 or a[1:3] != ("-p", "--"):
            return False
        self.tree(a[3], child=True)

    def c_rmdir(self, a):
        if len(a) != 3 or a[1] != "--":
            return False
        self.tree(a[2], child=True)

    def c_domubackup_mount_in(self, a):
        words = list(a[2:])
        if words[:1] == ["--mkdir"]:
            words.pop(0)
        if words[:1] != ["--"] or len(words) < 6 or (len(words) - 2) % 4:
            return False
        domu = self.tree(words[1])
        for i in range(2, len(words), 4):
            path, dev, fstype, options = words[i:i + 4]
            opts = options.split(",")
            if not {"nodev", "nosuid", "noexec"} <= set(opts) or not NAME.fullmatch(fstype):
                return False
            if self.lv(dev, point=None if "ro" in opts else False) != domu:
                return False

    def c_domubackup_umount_in(self, a):
        words = list(a[2:])
        if words[:1] != ["--"] or len(words) < 4 or (len(words) - 2) % 2:
            return False
        domu = self.tree(words[1])
        for i in range(2, len(words), 2):
            if self.lv(words[i + 1], point=None) != domu:
                return False

    def c_domubackup_block_digests(self, a):
        if len(a) != 5 or not a[3].isdigit():
            return False
        self.lv(a[2], point=None)

    def c_domubackup_send_blocks(self, a):
        if len(a) != 4 or not a[3].isdigit():
            return False
        self.lv(a[2], point=None)

    def c_domubackup_receive_blocks(self, a):
        if len(a) != 4 or not a[3].isdigit():
            return False
        self.lv(a[2], point=False)

    def c_e2fsck(self, a):  # verify --fsck: -n changes nothing
        if len(a) != 4 or a[1:3] != ("-n", "-f"):
            return False
        self.lv(a[3], point=None)

    def c_xfs_repair(self, a):
        if len(a) != 3 or a[1] != "-n":
            return False
        self.lv(a[2], point=None)

    c_fsck_vfat = c_xfs_repair

    def c_btrfs(self, a):
        if len(a) != 4 or a[1:3] != ("check", "--readonly"):
            return False
        self.lv(a[3], point=None)

    def c_lvextend(self, a):  # lvextend --size +N|Nb /dev/VG/LV: growing harms no point
        if len(a) != 4 or a[1] != "--size" or not re.fullmatch(r"\+?\d+[bkmgtBKMGT]?", a[2]):
            return False
        self.lv(a[3], point=None)

    def c_lvchange(self, a):
        if (words := lvchange_tags(a)) is None:
            return False
        adds, dels, paths = words
        if len(adds) == 2 and adds[0] == WRITING and adds[1].startswith(TAG + "domu:") and not dels:
            owners = {self.lv(p) for p in paths}  # before a run writes: its replicas, already its own
            return owners == {adds[1][len(TAG) + 5:]}
        if dels == [WRITING] and not adds:  # the replicas are complete
            return all(self.lv(p) for p in paths)
        if dels == [PENDING] and adds == [GOOD]:  # a point the client made is whole
            return all(self.lv(p, point=True) for p in paths)
        if adds == [PRUNING] and not dels:
            self.may_prune("prune restore points")
            return all(self.lv(p, point=True) for p in paths)
        return False

    def c_lvcreate(self, a):
        words = list(a[1:])
        if words[:2] == ["--yes", "--size"]:  # seed: a new replica LV, tagged with its DomU
            if len(words) != 8 or words[3] != "--name" or words[5] != "--addtag" or not NAME.fullmatch(words[4]) \
                    or not NAME.fullmatch(words[7]) or not words[6].startswith(TAG + "domu:"):
                return False
            self.granted(words[6][len(TAG) + 5:])
            if self.tags(words[7], words[4]) is not None:
                raise Refused(f"{words[7]}/{words[4]} exists already")
            return None
        if words[:1] != ["--snapshot"] or not words[-1].startswith("/dev/"):
            return False
        domu = self.lv(words[-1])
        vg, origin = device_lv(words[-1])
        words = words[1:-1]
        if words[:1] in (["--size"], ["--extents"]):
            words = words[2:]
        tags = [words[i + 1] for i in range(2, len(words) - 1, 2) if words[i] == "--addtag"]
        name = words[1] if words[:1] == ["--name"] else ""
        point = name.rpartition(".")[2]
        if (name != f"{origin}.{point}" or not STAMP.fullmatch(point) or len(tags) * 2 + 2 != len(words)
                or POINT not in tags or PENDING not in tags or f"{TAG}domu:{domu}" not in tags
                or any(t.startswith(TAG + "domu:") and t != f"{TAG}domu:{domu}" for t in tags)
                or GOOD in tags or not all(re.fullmatch(r"dbk:[A-Za-z0-9_+.:=-]+", t) for t in tags)):
            return False
        if self.tags(vg, name) is not None:
            raise Refused(f"{vg}/{name} exists already: a restore point is never overwritten")

    def c_lvremove(self, a):
        """The undo of a point the client began (still pending); a good or pruning one only
        by a client allowed to prune."""
        if len(a) < 3 or a[1] != "-f":
            return False
        for path in a[2:]:
            vg_lv = device_lv(path)
            if vg_lv is None:
                return False
            self.owner(*vg_lv, point=True)
            tags = self.tags(*vg_lv)
            if GOOD in tags or PRUNING in tags or PENDING not in tags:
                self.may_prune(f"remove restore point member {path}")

    def c_install(self, a):  # the domain XML beside a new point: never over an existing one
        if len(a) != 6 or a[1:5] != ("-D", "-m", "0600", "/dev/stdin"):
            return False
        head, name = posixpath.split(a[5])
        domu = posixpath.basename(head)
        if head != posixpath.join(self.g.state_dir, "points", domu) or not STAMP.fullmatch(name[:-4]) \
                or not name.endswith(".xml"):
            return False
        self.granted(domu)
        if self.exists(a[5]):
            raise Refused(f"{a[5]} exists already: a restore point is never overwritten")

    def c_rm(self, a):
        if a[1:3] != ("-f", "--"):
            return False
        self.may_prune("remove the domain XML of restore points")
        for path in a[3:]:
            head, name = posixpath.split(path)
            if head != posixpath.join(self.g.state_dir, "points", posixpath.basename(head)) or not name.endswith(".xml"):
                return False
            self.granted(posixpath.basename(head))

    def may_prune(self, what: str) -> None:
        if not self.g.prune:
            raise Refused(f"{self.g.client} may not {what}: restore points on this host are append-only",
                          hint="prune, rollback and failover run on this host, or list the client in "
                               "[serve] allow_prune_from")

    def rsync(self, a):
        """rsync's receiving end into one tree of a granted DomU (rrsync's job)."""
        if "--sender" in a or len(a) < 4 or a[-2] != ".":
            raise Refused(f"`{shlex.join(a[:12])}`: only rsync's receiving end into a DomU's tree is served")
        for w in a[2:-2]:
            if w in RSYNC_LOG_FORMATS:
                continue
            if w.startswith("--"):
                if w.split("=", 1)[0] not in RSYNC_LONG:
                    raise Refused(f"rsync option {w.split('=', 1)[0]} is not served")
            # short options, but -T (a temp dir), -M (options for the other end), -K (follow a
            # symlinked directory the tree holds, written by whoever wrote the tree)
            elif not re.fullmatch(r"-[A-Za-z]+(e\.[A-Za-z]*)?", w) or any(c in w.split("e.")[0] for c in "TMK"):
                raise Refused(f"rsync argument {w!r} is not served")
        self.tree(a[-1])
