"""Configuration: TOML, validated into plain frozen dataclasses. `parse_config` is pure (text in,
Config out); `load_config` reads the file. Every error is a ConfigError whose message names the
file, the key (and the line where TOML gives one) and what is expected."""

from __future__ import annotations

import os
import re
import socket
import tomllib
from dataclasses import dataclass, field, fields, replace

from .errors import ConfigError, NotEligibleError
from .freezing import MODES, POLICIES
from .model import LOCAL
from .retention import Retention

DEFAULT_PATH = "/etc/domubackup/domubackup.toml"
EXAMPLE_PATH = "/usr/share/doc/domubackup/examples/domubackup.toml"  # the Debian package's copy

SIZE_RE = re.compile(r"^(\d+(\.\d+)?[bBsSkKmMgGtTpPeE]?|\d+%(ORIGIN|VG|FREE))$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")  # host, VG/LV-like names
DOMU_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")


def check_domu_name(name, error=NotEligibleError) -> str:
    """``name`` when it can name a DomU here: it becomes file names in state_dir, mount points
    and command words. Else ``error`` (NotEligibleError, or UsageError for the command line)."""
    if isinstance(name, str) and DOMU_NAME_RE.fullmatch(name) and ".." not in name:
        return name
    raise error(f"{name!r} is not a usable DomU name: expected 1 to 64 letters, digits, '.', '_', '+' "
                "or '-', starting with a letter or digit, without '..'")


@dataclass(frozen=True)
class SSHSettings:
    user: str = "root"
    identity_file: str = "/root/.ssh/id_ed25519"
    known_hosts: str = "/etc/domubackup/known_hosts"
    port: int = 22
    connect_timeout: float = 10.0
    # A dead peer is noticed after ~3 x this (OpenSSH ServerAliveCountMax=3) when the link
    # breaks mid-transfer, instead of TCP's ~15 min or never; 0 = off.
    alive_interval: float = 15.0
    # From the [dom0.NAME] tables, not from [ssh]: (name, address, port; 0 = `port` above).
    endpoints: tuple[tuple[str, str, int], ...] = ()

    def endpoint(self, host: str) -> tuple[str, int]:
        """(address, port) by which both SSH clients reach Dom0 ``host``: its [dom0.NAME]
        address and port, else its name and ``port``. The name stays its identity elsewhere."""
        for name, address, port in self.endpoints:
            if name == host:
                return address or host, port or self.port
        return host, self.port


@dataclass(frozen=True)
class RsyncSettings:
    options: tuple[str, ...] = ("-aHAX", "--numeric-ids", "--delete", "--sparse")
    extra_options: tuple[str, ...] = ()
    compress: bool = True
    bwlimit: str = ""  # rsync --bwlimit value, e.g. "50M"; empty = none
    timeout: float = 0.0  # 0 = no limit on the whole transfer
    # rsync --timeout: both ends give up after this long without data. After a link cut the
    # peer's rsync then ends by itself and frees the replica's mounts; 0 = off.
    io_timeout: float = 300.0


DISK_MODES = ("files", "blocks", "auto")
RATE_UNITS = {"": 1024, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}


def rate_bytes(bwlimit: str) -> int | None:
    """rsync's --bwlimit value in bytes per second (a number of KiB, or with K, M or G);
    None for none (empty or 0) or what is not such a value."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]?)i?[Bb]?", bwlimit.strip(), re.I)
    if not m:
        return None
    rate = int(float(m.group(1)) * RATE_UNITS[m.group(2).upper()])
    return rate or None


@dataclass(frozen=True)
class Settings:
    """Everything that may differ per DomU (global values, overridden by [domu.NAME])."""
    libvirt_uri: str = ""
    peers: tuple[str, ...] = ()  # the DomU's replica hosts (empty: DOM0S); this host is left out at run time
    disks: tuple[str, ...] = ()  # only these target devs (empty: all)
    exclude_disks: tuple[str, ...] = ()
    mounts: tuple[tuple[str, str], ...] = ()  # (disk[SEP]N or disk, guest mount point)
    snapshot_size: str = "1G"
    snapshot_suffix: str = "-snap"
    snapshot_extend_at: float = 80.0  # percent full at which the snapshot is extended
    snapshot_extend_by: str = "256M"
    snapshot_extend_max: str = "50%ORIGIN"  # no extension past this total size (or share of the origin)
    source_prefix: str = "/mnt/domubackup/source"
    target_prefix: str = "/mnt/domubackup/target"
    kpartx_separator: str = "p"
    command_timeout: float = 600.0
    consistency: str = "none"
    freeze_hook_dir: str = "/etc/domubackup/freeze.d"
    freeze_hook_timeout: float = 30.0
    freeze_max_window: float = 10.0
    freeze_agent_timeout: int = 10
    freeze_mountpoints: tuple[str, ...] = ()
    freeze_on_failure: str = "fail"
    job_hook: str = ""  # executable called at job-start, backup-start, backup-end, backup-abort, job-end
    retention: Retention | None = None  # [retention]: restore points on the peer after each OK run; None: none
    point_size: str = "20%ORIGIN"  # the size of a thick replica's restore point (a thin one needs none)
    # files: rsync of the mounted trees; blocks: the changed blocks of each disk, nothing mounted;
    # auto: files for a disk whose every partition holding data has a filesystem the tool mounts
    mode: str = "auto"
    disk_modes: tuple[tuple[str, str], ...] = ()  # (disk target, mode): `mode` per disk
    ssh: SSHSettings = field(default_factory=SSHSettings)
    rsync: RsyncSettings = field(default_factory=RsyncSettings)

    def mode_of(self, disk: str) -> str:
        """The mode configured for the disk with target dev DISK (files, blocks or auto)."""
        return dict(self.disk_modes).get(disk, self.mode)


@dataclass(frozen=True)
class Config:
    path: str
    dom0s: tuple[str, ...]
    this_host: str
    state_dir: str
    backup_all_running: bool
    catalog_keep_days: int
    metrics_textfile: str
    max_age: int  # seconds: `check`, the run's summary and the metrics warn past it (no OK on any Dom0)
    defaults: Settings
    domus: dict[str, Settings]
    # [serve]: what this host, as a peer, lets each client Dom0's key do (domubackup serve)
    serve_clients: dict = field(default_factory=dict)  # client Dom0 -> the DomUs it may back up here
    allow_prune_from: tuple[str, ...] = ()  # clients that may prune and roll back points held here
    append_only: tuple[str, ...] = ()  # peers ([dom0.NAME] append_only) whose points only they prune

    def settings_for(self, domu: str) -> Settings:
        return self.domus.get(domu, self.defaults)

    def peers_for(self, domu: str) -> tuple[str, ...]:
        """Where ``domu`` is copied from this host: its replica hosts (``peers``, else
        ``dom0s``) minus this host, so that one file serves every Dom0."""
        return tuple(h for h in self.settings_for(domu).peers or self.dom0s if h != self.this_host)

    def no_peer(self, domu: str) -> ConfigError:
        """The error of a DomU that runs here and has no replica host but this one."""
        peers = self.settings_for(domu).peers
        key, what = (f"domu.{domu}.peers" if domu in self.domus else "peers", "its peers") if peers \
            else ("dom0s", "dom0s")
        return ConfigError(f"{self.path}: {key}: {domu} runs on {self.this_host}, and {what} "
                           f"{list(peers or self.dom0s)} name no other Dom0 to copy it to",
                           hint="add another Dom0 to its peers")


GLOBAL_ONLY = {"dom0s": list, "this_host": str, "state_dir": str, "backup_all_running": bool,
               "catalog_keep_days": int, "metrics_textfile": str, "max_age": str}

AGE_RE = re.compile(r"(\d+)([hdw])")
AGE_SECONDS = {"h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> int | None:
    """``24h``, ``2d``, ``1w`` in seconds; None when ``text`` is not such an age."""
    m = AGE_RE.fullmatch(text.strip())
    return int(m.group(1)) * AGE_SECONDS[m.group(2)] if m else None


INTERNAL = {"endpoints"}  # fields filled from elsewhere in the file, not settable by their own name
ADDRESS_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*")  # name, IPv4, IPv6


def _expect(cls) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            list: "a list of strings", tuple: "a list of strings", dict: "a table"}.get(cls, cls.__name__)


class _Checker:
    def __init__(self, path: str):
        self.path = path

    def fail(self, key: str, what: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {what}")

    def value(self, key: str, raw, kind):
        """Check one scalar/list value against the type of the dataclass default."""
        if kind in (bool, str):
            ok = isinstance(raw, kind)
        elif kind in (int, float):  # a TOML true is no number
            ok = not isinstance(raw, bool) and isinstance(raw, int if kind is int else (int, float))
        elif kind in (tuple, list):
            ok = isinstance(raw, list) and all(isinstance(x, str) for x in raw)
        else:
            raise AssertionError(kind)
        if not ok:
            raise self.fail(key, f"expected {_expect(kind)}, got {raw!r}")
        return float(raw) if kind is float else tuple(raw) if kind in (tuple, list) else raw

    def dataclass_from(self, prefix: str, table, base):
        """Override fields of dataclass instance `base` from TOML table `table`."""
        if not isinstance(table, dict):
            raise self.fail(prefix, f"expected a table, got {table!r}")
        known = {f.name: f for f in fields(base) if f.name not in INTERNAL}
        changes = {}
        for key, raw in table.items():
            name = f"{prefix}.{key}" if prefix else key
            if key not in known:
                raise self.fail(name, f"unknown key (known: {', '.join(sorted(known))})")
            current = getattr(base, key)
            if key == "mounts":
                changes[key] = self.mounts(name, raw)
            elif key == "disk_modes":
                if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
                    raise self.fail(name, 'expected a table like { xvdb = "blocks" }')
                changes[key] = tuple(raw.items())
            elif key == "retention":
                if not isinstance(raw, dict):
                    raise self.fail(name, "expected a table like [retention] keep_last = 7")
                try:
                    changes[key] = Retention.from_mapping(raw)
                except ConfigError as e:
                    raise ConfigError(f"{self.path}: {name}: {e.message.removeprefix('retention: ')}", hint=e.hint) from None
            elif isinstance(current, (SSHSettings, RsyncSettings)):
                changes[key] = self.dataclass_from(name, raw, current)
            else:
                changes[key] = self.value(name, raw, type(current))
        return replace(base, **changes)

    def mounts(self, key: str, raw) -> tuple[tuple[str, str], ...]:
        if not isinstance(raw, dict):
            raise self.fail(key, 'expected a table like { xvda1 = "/", xvdb = "/srv" }')
        out = []
        for dev, mp in raw.items():
            if not isinstance(mp, str) or not mp.startswith("/") or "\0" in mp:
                raise self.fail(f"{key}.{dev}", f"expected an absolute guest path, got {mp!r}")
            if ".." in mp.split("/"):
                raise self.fail(f"{key}.{dev}", f"'..' is not allowed in a mount point: {mp!r}")
            out.append((dev, os.path.normpath(mp)))
        return tuple(out)

    def settings(self, prefix: str, s: Settings) -> Settings:
        """Value checks that go beyond the type."""
        if not SIZE_RE.match(s.snapshot_size):
            raise self.fail(f"{prefix}snapshot_size",
                            f"expected a size like '1G', '512M' or '20%ORIGIN', got {s.snapshot_size!r}")
        if not SIZE_RE.match(s.point_size):
            raise self.fail(f"{prefix}point_size", f"expected a size like '2G' or '20%ORIGIN', got {s.point_size!r}")
        if not SIZE_RE.match(s.snapshot_extend_by):
            raise self.fail(f"{prefix}snapshot_extend_by",
                            f"expected a size like '256M', got {s.snapshot_extend_by!r}")
        if not re.fullmatch(r"\d+(\.\d+)?[bBsSkKmMgGtTpPeE]?|\d+%ORIGIN", s.snapshot_extend_max):
            raise self.fail(f"{prefix}snapshot_extend_max",
                            f"expected a size like '4G' or '50%ORIGIN', got {s.snapshot_extend_max!r}")
        if not 0 < s.snapshot_extend_at <= 100:
            raise self.fail(f"{prefix}snapshot_extend_at", "expected a percentage between 1 and 100")
        if s.consistency not in MODES:
            raise self.fail(f"{prefix}consistency", f"expected one of {', '.join(MODES)}, "
                            f"got {s.consistency!r}")
        for key, mode in (("mode", s.mode), *((f"disk_modes.{d}", m) for d, m in s.disk_modes)):
            if mode not in DISK_MODES:
                raise self.fail(f"{prefix}{key}", f"expected 'files', 'blocks' or 'auto', got {mode!r}")
        if s.freeze_on_failure not in POLICIES:
            raise self.fail(f"{prefix}freeze_on_failure", f"expected 'fail' or 'continue', got {s.freeze_on_failure!r}")
        for key in ("source_prefix", "target_prefix"):
            value = getattr(s, key)
            if not value.startswith("/") or os.path.normpath(value) == "/":
                raise self.fail(f"{prefix}{key}", f"expected an absolute directory other than /, got {value!r}")
        if not re.fullmatch(r"[A-Za-z_-]{0,4}", s.kpartx_separator):
            raise self.fail(f"{prefix}kpartx_separator", f"expected a short separator like 'p', got {s.kpartx_separator!r}")
        if not re.fullmatch(r"[A-Za-z0-9._+-]{1,32}", s.snapshot_suffix):
            raise self.fail(f"{prefix}snapshot_suffix", f"expected a suffix of LV name characters, got {s.snapshot_suffix!r}")
        if s.job_hook and not s.job_hook.startswith("/"):
            raise self.fail(f"{prefix}job_hook", f"expected an absolute path, got {s.job_hook!r}")
        for key, value in (("rsync.io_timeout", s.rsync.io_timeout), ("ssh.alive_interval", s.ssh.alive_interval)):
            if value < 0:
                raise self.fail(f"{prefix}{key}", f"expected seconds >= 0, got {value:g}")
        if not 0 < s.ssh.port < 65536:
            raise self.fail(f"{prefix}ssh.port", f"expected a TCP port, got {s.ssh.port}")
        for host in s.peers:
            if not NAME_RE.match(host):
                raise self.fail(f"{prefix}peers", f"not a host name: {host!r}")
        return s


def short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def default_libvirt_uri() -> str:
    return "xen:///system" if os.path.exists("/proc/xen") else "qemu:///system"


def parse_config(text: str, path: str = DEFAULT_PATH, *, hostname: str | None = None,
                 default_uri: str | None = None) -> Config:
    check = _Checker(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}", hint="fix the syntax at that line") from None

    globals_ = {key: check.value(key, data.pop(key), kind) for key, kind in GLOBAL_ONLY.items() if key in data}
    dom0_tables = data.pop("dom0", {})
    if not isinstance(dom0_tables, dict) or not all(isinstance(t, dict) for t in dom0_tables.values()):
        raise check.fail("dom0", 'expected tables like [dom0.dom0b] with address = "10.0.0.2", port = 2222')
    serve = data.pop("serve", {})
    if not isinstance(serve, dict):
        raise check.fail("serve", 'expected a table: [serve] clients = { dom0a = ["web1"] }')
    domu_tables = data.pop("domu", {})
    if not isinstance(domu_tables, dict):
        raise check.fail("domu", "expected tables like [domu.web1]")

    defaults = check.dataclass_from("", data, Settings(libvirt_uri=default_uri or default_libvirt_uri()))
    defaults = check.settings("", defaults)

    if "dom0s" not in globals_:
        raise check.fail("dom0s", 'missing required key: the list of Dom0 host names, e.g. dom0s = ["dom0a", "dom0b"]')
    dom0s = globals_["dom0s"]
    if not dom0s:
        raise check.fail("dom0s", "must name at least one Dom0")
    for host in dom0s:
        if not NAME_RE.match(host):
            raise check.fail("dom0s", f"not a host name: {host!r}")
        if host == LOCAL:  # plans and journals name this host's lane so
            raise check.fail("dom0s", f"{host!r} is reserved for this host's own steps: give the Dom0 its real "
                                      "host name (with [dom0.NAME] address if it is reached otherwise)")
    this_host = globals_.get("this_host") or (hostname or short_hostname())
    endpoints, append_only = [], []
    for name, table in dom0_tables.items():
        if name not in dom0s:
            raise check.fail(f"dom0.{name}", f"{name!r} is not in dom0s {list(dom0s)}")
        for key in sorted(set(table) - {"address", "port", "append_only"}):
            raise check.fail(f"dom0.{name}.{key}", "unknown key (known: address, port, append_only)")
        if check.value(f"dom0.{name}.append_only", table.get("append_only", False), bool):
            append_only.append(name)
        address = check.value(f"dom0.{name}.address", table.get("address", name), str).strip("[]")
        if not ADDRESS_RE.fullmatch(address):
            raise check.fail(f"dom0.{name}.address", f"expected a host name or an IP address, got {address!r}")
        port = check.value(f"dom0.{name}.port", table.get("port", 0), int)
        if "port" in table and not 0 < port < 65536:
            raise check.fail(f"dom0.{name}.port", f"expected a TCP port, got {port}")
        endpoints.append((name, address, port))
    defaults = replace(defaults, ssh=replace(defaults.ssh, endpoints=tuple(endpoints)))

    domus = {}
    for name, table in domu_tables.items():
        try:
            check_domu_name(name)
        except NotEligibleError as e:
            raise check.fail(f"domu.{name}", e.message) from None
        if isinstance(table, dict):
            bad = set(table) & set(GLOBAL_ONLY)
            if bad:
                raise check.fail(f"domu.{name}.{sorted(bad)[0]}", "is a global key and cannot be set per DomU")
        s = check.settings(f"domu.{name}.", check.dataclass_from(f"domu.{name}", table, defaults))
        for peer in s.peers:
            if peer not in dom0s:
                raise check.fail(f"domu.{name}.peers", f"peer {peer!r} is not in dom0s {list(dom0s)}")
        domus[name] = s
    for peer in defaults.peers:
        if peer not in dom0s:
            raise check.fail("peers", f"peer {peer!r} is not in dom0s {list(dom0s)}")

    keep = globals_.get("catalog_keep_days", 90)
    if keep < 1:
        raise check.fail("catalog_keep_days", "expected a number of days >= 1")
    state_dir = globals_.get("state_dir", "/var/lib/domubackup")
    if not state_dir.startswith("/"):
        raise check.fail("state_dir", f"expected an absolute path, got {state_dir!r}")
    max_age = parse_age(globals_.get("max_age", "2d"))
    if not max_age:
        raise check.fail("max_age", f"expected an age like '36h', '2d' or '1w', got {globals_['max_age']!r}")
    for key in sorted(set(serve) - {"clients", "allow_prune_from"}):
        raise check.fail(f"serve.{key}", "unknown key (known: clients, allow_prune_from)")
    clients = serve.get("clients", {})
    if not isinstance(clients, dict):
        raise check.fail("serve.clients", 'expected a table of lists: { dom0a = ["web1", "db1"] }')
    serve_clients = {}
    for client, names in clients.items():
        if client not in dom0s:
            raise check.fail(f"serve.clients.{client}", f"{client!r} is not in dom0s {list(dom0s)}")
        serve_clients[client] = check.value(f"serve.clients.{client}", names, tuple)
        for name in serve_clients[client]:
            try:
                check_domu_name(name)
            except NotEligibleError as e:
                raise check.fail(f"serve.clients.{client}", e.message) from None
    prune_from = check.value("serve.allow_prune_from", serve.get("allow_prune_from", []), tuple)
    for client in prune_from:
        if client not in dom0s:
            raise check.fail("serve.allow_prune_from", f"{client!r} is not in dom0s {list(dom0s)}")
    return Config(path=path, dom0s=dom0s, this_host=this_host, state_dir=state_dir,
                  backup_all_running=globals_.get("backup_all_running", False),
                  catalog_keep_days=keep, metrics_textfile=globals_.get("metrics_textfile", ""), max_age=max_age,
                  defaults=defaults, domus=domus, serve_clients=serve_clients, allow_prune_from=prune_from,
                  append_only=tuple(append_only))


def config_path(cli_value: str | None, environ=os.environ) -> str:
    return cli_value or environ.get("DOMUBACKUP_CONFIG") or DEFAULT_PATH


def load_config(path: str, **kw) -> Config:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file",
                          hint=f"create it from {EXAMPLE_PATH} or the source's conf/domubackup.toml, "
                               "which document every key, or pass -c/--config") from None
    except (PermissionError, IsADirectoryError, UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{path}: cannot read the configuration file: {e.strerror or e}") from None
    return parse_config(text, path, **kw)
