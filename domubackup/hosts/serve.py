"""`domubackup serve --client NAME [-c CONFIG]`: the forced command of a client Dom0's key in
root's authorized_keys on its peer (core/serve.py decides; this module reads the request,
this host's config and LV tags, then execs the command or refuses it).

A client's runner asks for `domubackup serve-session` (core/serve.py SESSION) and sends all its
requests over that one channel: serve judges each one afresh (this host's config parsed
again whenever the file changed, the LV tags read again after any request that may change
them: TAGS_KEPT) and runs it with subprocess. A request on a channel of its own (rsync's
receiving end, block streams, a peer runner without sessions) is judged the same way and
exec'd. Either way serve imports little (tomllib, subprocess; not the CLI, not `sh`) and reads
only the keys it needs: [serve] clients and allow_prune_from, state_dir, target_prefix,
kpartx_separator, libvirt_uri. A refusal: exit 77 (in a session: a reply with code 77) with
``domubackup serve: refused: REASON`` on stderr (the client's runner raises it as PeerRefused)
and a line in the auth syslog.

Without a forced command `domubackup serve-session` (entry.py) runs the same session unjudged,
with the client's environment: a root key runs anything anyway, and saves the start of a
process per command the same way."""

from __future__ import annotations

import os
import re
import stat
import sys

from ..core.environ import BASE_ENV
from ..core.errors import EXIT_REFUSED
from ..core.serve import (HELPER, REFUSED, SESSION, SESSION_IDLE, SESSION_INPUT, Grant, Judge, Refused, device_lv,
                          dm_lv, frame, lvchange_tags, parse_request)

DEFAULT_CONFIG = "/etc/domubackup/domubackup.toml"


_grants: dict = {}  # a session's last grant, by the config file's identity and times (see load_grant)


def load_grant(path: str, client: str) -> Grant:
    """CLIENT's Grant in the config at PATH as it is now: parsed again whenever the file's
    inode, size, mtime or ctime changed since the last request of this process."""
    import tomllib

    try:
        st = os.stat(path)
        key = (path, client, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if key in _grants:
            return _grants[key]
        with open(path, "rb") as f:  # read after the stat: never older than the key it is kept by
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise Refused(f"cannot read this host's configuration {path}: {e}") from None
    serve = data.get("serve", {})
    clients = serve.get("clients", {}) if isinstance(serve, dict) else {}
    if client not in clients:
        raise Refused(f"{client} is not a client of this host: its [serve] clients has no entry {client} = [...]")
    domus = clients[client]
    for name in domus:
        table = data.get("domu", {}).get(name, {})
        for k in ("target_prefix", "kpartx_separator", "libvirt_uri"):
            if k in table and table[k] != data.get(k, table[k]):
                raise Refused(f"[domu.{name}] {k} differs from the global one: serve knows one {k} per host")
    uri = data.get("libvirt_uri") or ("xen:///system" if os.path.exists("/proc/xen") else "qemu:///system")
    _grants.clear()
    _grants[key] = Grant(client, domus, client in serve.get("allow_prune_from", []),
                         data.get("target_prefix", "/mnt/domubackup/target"), data.get("kpartx_separator", "p"),
                         uri, data.get("state_dir", "/var/lib/domubackup"))
    return _grants[key]


def lv_tags():
    """TAGS(vg, lv) for the Judge: one `lvs` per VG (all its LVs' tags) and read of the tags
    (0.1 s under emulation, whatever the number of LVs asked about)."""
    seen = {}

    def tags(vg: str, lv: str):
        if vg not in seen:
            import subprocess

            r = subprocess.run(["lvs", "--noheadings", "--separator", "|", "-o", "lv_name,lv_tags", "--", vg],
                               env=BASE_ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True)
            rows = (row.strip().split("|") for row in r.stdout.splitlines()) if r.returncode == 0 else ()
            seen[vg] = {f[0]: set(filter(None, f[1].split(","))) for f in rows if len(f) == 2}
        return seen[vg].get(lv)
    return tags


def _sys(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def mapper_device(path: str):
    """(VG, LV) of the existing block device PATH when it is an LV, or a kpartx partition
    mapping of one (its device-mapper UUID ``partN-LVM-...`` and its one slave), from sysfs."""
    try:
        st = os.stat(path)
        if not stat.S_ISBLK(st.st_mode):
            return None
        base = f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        uuid = _sys(f"{base}/dm/uuid")
        if uuid.startswith("LVM-"):
            return dm_lv(_sys(f"{base}/dm/name"))
        slaves = os.listdir(f"{base}/slaves")
        if re.match(r"part\d+-LVM-", uuid) and len(slaves) == 1:
            return dm_lv(_sys(f"/sys/block/{slaves[0]}/dm/name"))
    except OSError:
        pass
    return None


def _log(client: str, line: str, reason: str) -> None:
    import syslog

    from .logs import printable

    syslog.openlog("domubackup-serve", 0, syslog.LOG_AUTH)
    syslog.syslog(syslog.LOG_WARNING, printable(f"refused for {client}: {reason}: {line[:500]}"))


def _read(n: int) -> bytes | None:
    """N bytes of stdin (the session's channel); None at its end or after SESSION_IDLE idle."""
    import select

    data = b""
    while len(data) < n:
        if not select.select([0], [], [], SESSION_IDLE)[0]:
            return None
        chunk = os.read(0, n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _write(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]


def session(run) -> int:
    """Serve requests one after the other on stdin/stdout (core/serve.py SESSION) until the
    client ends the channel: RUN(line, input bytes or None) -> (code, stdout, stderr)."""
    try:
        return _serve(run)
    except BrokenPipeError:  # the client gave up waiting (its timeout) and closed the channel
        return 0


def _serve(run) -> int:
    import json

    _write(frame({"session": 1}))
    while (size := _read(4)) is not None:
        size = int.from_bytes(size, "big")
        head = _read(size) if size <= 1 << 20 else None
        if head is None:
            return 2
        head = json.loads(head)
        n = head.get("input")
        if n is not None and not (isinstance(n, int) and 0 <= n <= SESSION_INPUT):
            return 2
        data = None if n is None else _read(n)
        if n is not None and data is None:
            return 2
        _write(frame({"ack": 1}))
        code, out, err = run(str(head.get("line") or ""), data)
        _write(frame({"code": code, "out": len(out), "err": len(err)}, out + err))
    return 0


def _words(req) -> tuple[str, ...]:
    """The argv REQ runs: its command under the `timeout` it asked for."""
    return req.argv if req.timeout is None else ("timeout", "-k", *req.timeout, *req.argv)


def execute(req, data: bytes | None, env) -> tuple[int, bytes, bytes]:
    """Run REQ's command (in a session) with DATA on its stdin (/dev/null when None)."""
    import subprocess

    words = _words(req)
    try:
        r = subprocess.run(words, input=data, stdin=None if data is not None else subprocess.DEVNULL,
                           capture_output=True, env=env)
    except OSError as e:
        return 127, b"", f"domubackup serve: cannot run {words[0]}: {e.strerror}\n".encode()
    return r.returncode, r.stdout, r.stderr


def unjudged(line: str, data: bytes | None):
    """A session's request where the key is not restricted (`domubackup serve-session` run by
    the peer's shell: the client could run anything anyway): the client's environment kept."""
    try:
        req = parse_request(line)
    except Refused as e:
        return _refused_reply(e)
    return execute(req, data, {**BASE_ENV, **req.env})


# Programs that change no LV's tags: after one of them a session judges its next request with
# the tags it has read (an `lvs` per VG saved, ~0.1 s each under emulation). After a served
# lvchange that exited 0 (it only adds and deletes tags: lvchange_tags) the session changes
# those LVs' tags the same way; after any other request, and in a new session, it reads them again.
TAGS_KEPT = {"lvs", "vgs", "parted", "blkid", "kpartx", "mkdir", "rmdir", "virsh", "udevadm", "true"}
HELPERS_TAGS_KEPT = {"mount-in", "umount-in", "read-in"}


def keeps_tags(req) -> bool:
    if req.argv[0] == HELPER:
        return len(req.argv) > 1 and req.argv[1] in HELPERS_TAGS_KEPT
    return req.argv[0] in TAGS_KEPT


def judged(client: str, config: str, tags=lv_tags, run=None):
    """A judged session's RUN(line, data) for CLIENT (see session): each request judged, then
    run by RUN(req, data, env) (``execute``); TAGS() reads the LV tags (see TAGS_KEPT)."""
    run = run or execute
    read, changed = [tags()], {}  # the tags read, and those a served lvchange changed since

    def current(vg: str, lv: str):
        return changed[vg, lv] if (vg, lv) in changed else read[0](vg, lv)

    def one(line: str, data: bytes | None):
        try:
            req = judge(client, config, line, current)
        except Refused as e:
            return _refused_reply(e)
        code = None
        try:
            code, out, err = run(req, data, BASE_ENV)
            return code, out, err
        finally:
            edit = lvchange_tags(req.argv) if code == 0 else None
            lvs = edit and [device_lv(p) for p in edit[2]]
            if lvs and None not in lvs:  # lvchange exit 0 did what it says: its LVs' tags without an lvs
                for vg, lv in lvs:
                    changed[vg, lv] = (current(vg, lv) or set()) - set(edit[1]) | set(edit[0])
            elif not keeps_tags(req):
                read[0] = tags()
                changed.clear()
    return one


def judge(client: str, config: str, line: str | None, tags=None):
    """The request LINE of CLIENT, judged with this host's config read now and TAGS (lv_tags(),
    fresh when None); Refused (logged to the auth syslog) when it is not served."""
    try:
        req = parse_request(line)
        Judge(load_grant(config, client), tags or lv_tags(), mapper_device, os.path.lexists).judge(req)
    except Refused as e:
        _log(client, line or "", e.message)
        raise
    return req


def _refusal(e: Refused) -> str:
    return REFUSED + e.message + (f" ({e.hint})" if e.hint else "")


def _refused_reply(e: Refused) -> tuple[int, bytes, bytes]:
    """A session's reply to a refused request: what a request of its own would exit with."""
    return EXIT_REFUSED, b"", (_refusal(e) + "\n").encode()


def main(argv: list[str]) -> int:
    """argv: ["serve", "--client", NAME, ("-c", CONFIG)]."""
    args, client, config = argv[1:], None, os.environ.get("DOMUBACKUP_CONFIG") or DEFAULT_CONFIG
    while args:
        opt = args.pop(0)
        if opt == "--client" and args:
            client = args.pop(0)
        elif opt in ("-c", "--config") and args:
            config = args.pop(0)
        else:
            print(f"usage: domubackup serve --client NAME [-c CONFIG] (got {opt!r})", file=sys.stderr)
            return 2
    if not client:
        print("usage: domubackup serve --client NAME [-c CONFIG]", file=sys.stderr)
        return 2
    line = os.environ.get("SSH_ORIGINAL_COMMAND")
    if line and line.split()[-1:] == [SESSION]:  # `PROGRAM serve-session`: the words are never run
        try:
            load_grant(config, client)  # a host that is no client gets no session
        except Refused as e:
            print(_refusal(e), file=sys.stderr)
            return EXIT_REFUSED
        return session(judged(client, config))
    try:
        req = judge(client, config, line)
    except Refused as e:
        print(_refusal(e), file=sys.stderr)
        return EXIT_REFUSED
    words = _words(req)
    if req.no_input:
        fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(fd, 0)
        os.close(fd)
    try:
        os.execvpe(words[0], list(words), BASE_ENV)
    except OSError as e:
        print(f"domubackup serve: cannot run {words[0]}: {e.strerror}", file=sys.stderr)
        return 127
