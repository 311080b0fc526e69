"""`domubackup check`: everything a first night needs, one line per check, OK or what to fix;
and whether every DomU of the night has an OK backup on some Dom0 within max_age (a warning)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass

from ..core import commands as cmd
from ..core.plan import is_blocks
from . import frame as jobs
from ..hosts import virt
from ..hosts.catalog import Catalog
from .checks import check_peer_state, check_replicas, check_vg_space
from ..core.errors import DomuBackupError, NotHereError, PeerRefused
from ..core.report import age_text, last_ok_text, newest_ok_per_domu

LOCAL_TOOLS = ("lvs", "vgs", "lvcreate", "lvremove", "lvextend", "kpartx", "parted", "blkid", "findmnt",
               "mount", "umount", "rsync", "ssh")
PEER_TOOLS = ("lvs", "vgs", "kpartx", "parted", "blkid", "mount", "umount", "rsync", "virsh",
              "timeout", "python3")


@dataclass(frozen=True)
class Check:
    ok: bool
    what: str
    detail: str = ""
    warning: bool = False  # not OK, but not a failure either: said, not counted in `failed`

    def line(self) -> str:
        tag = "WARN" if self.warning else "OK  " if self.ok else "FAIL"
        return f"{tag} {self.what}" + (f": {self.detail}" if self.detail else "")


def tools_present(runner, tools, hint=None) -> str:
    """Check: every program of TOOLS is on RUNNER's host."""
    res = runner.run(["which", *tools], check=False)
    found = {os.path.basename(line.strip()) for line in res.stdout.splitlines() if line.strip()}
    gone = [t for t in tools if t not in found]
    if gone:
        raise DomuBackupError(f"missing: {', '.join(gone)}", hint=hint)
    return "all present"


def peer_access(runner, peer: str, this_host: str) -> Check:
    """Whether PEER runs only `domubackup serve` for this host's key: a shell command must be
    refused there (README, Restricted peer). A shell is not a failure (the plain mode), a warning."""
    what = f"{peer} restricts this host's key (domubackup serve)"
    try:
        runner.run(["sh", "-c", "exit 0"], timeout=30)
    except PeerRefused:
        return Check(True, what, "a shell command is refused there")
    except DomuBackupError as e:
        return Check(False, what, str(e))
    return Check(False, what, f"the key gives a root shell on {peer}: whoever is root here is root there, with "
                              f"every replica and restore point; install the forced command `domubackup serve "
                              f"--client {this_host}` in root's authorized_keys on {peer} (README, Restricted peer)",
                 warning=True)


def _try(what, fn) -> Check:
    try:
        return Check(True, what, fn() or "")
    except DomuBackupError as e:
        return Check(False, what, str(e))


def run_checks(config, names, local, *, factory=jobs.ssh_runner, now=None) -> list[Check]:
    """The checks of ``names``, or (none named) of what the night backs up here."""
    checks = [Check(True, f"config {config.path}", f"dom0s {', '.join(config.dom0s)}; this host {config.this_host}")]

    def state_dir():
        try:
            os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=config.state_dir):
                pass
        except OSError as e:
            raise DomuBackupError(f"cannot write there: {e.strerror}", hint="create it or fix its permissions")
        return "writable"
    checks.append(_try(f"state directory {config.state_dir}", state_dir))
    checks.append(_try(f"this host {config.this_host} in dom0s", lambda: jobs.check_host(config)))
    checks.append(_try(f"tools on {config.this_host}", lambda: tools_present(
        local, LOCAL_TOOLS, hint="install lvm2, kpartx, parted, util-linux, rsync, openssh-client, udev")))
    try:
        conn = virt.connect(config.defaults.libvirt_uri)
    except DomuBackupError as e:
        checks.append(Check(False, f"libvirt {config.defaults.libvirt_uri}", str(e)))
        conn = None
    peers_seen = {}
    try:
        if conn is not None:
            checks.append(Check(True, f"libvirt {config.defaults.libvirt_uri}", "reachable"))
            night = not names
            names = virt.selected_domus(config, names, conn)
            if night:
                none = "none running here" if config.backup_all_running else \
                    "none: no [domu.NAME] section, and backup_all_running is false"
                checks.append(Check(bool(names) or config.backup_all_running, "DomUs the night backs up here",
                                    ", ".join(names) or none))
            checks += domu_checks(config, names, conn, local, factory, peers_seen, night)
        checks += last_ok_checks(config, names or list(config.domus), peers_seen, factory,
                                 time.time() if now is None else now)
    finally:
        if conn is not None:
            conn.close()
        for r in peers_seen.values():
            r.close()
    return checks


def domu_checks(config, names, conn, local, factory, peers_seen, night) -> list[Check]:
    """Each DomU: eligible here, VG space, ssh to and tools on its peers, its replicas there.
    In the nightly set (``night``) a DomU that runs on another Dom0 is that Dom0's job: OK."""
    checks = []
    for name in names:
        settings = config.settings_for(name)
        try:
            insp = jobs.inspect(config, name, conn, local)
        except DomuBackupError as e:
            checks.append(Check(night and isinstance(e, NotHereError), f"{name}: eligible here", str(e)))
            continue
        disks = ", ".join(f"{f.disk.target}={f.lv.vg}/{f.lv.lv}" for f in insp.facts)
        checks.append(Check(True, f"{name}: eligible here", f"{insp.domain.state}; disks {disks}"))
        checks.append(_try(f"{name}: VG space for snapshots of {settings.snapshot_size}",
                           lambda: check_vg_space(insp.facts, settings)))
        for peer in insp.peers:
            if peer not in peers_seen:
                runner = factory(peer, settings.ssh)
                peers_seen[peer] = runner
                ok = _try(f"ssh to {peer} (pinned host key in {settings.ssh.known_hosts})",
                          lambda: runner.run(["true"], timeout=30) and "connected")
                checks.append(ok)
                if ok.ok:
                    checks.append(_try(f"tools on {peer}", lambda: tools_present(runner, PEER_TOOLS)))
                    checks.append(peer_access(runner, peer, config.this_host))
            runner = peers_seen[peer]
            blocks = [f for f in insp.facts if is_blocks(f)]
            files = [f for f in insp.facts if not is_blocks(f)]
            if blocks:
                from .blocks import check_block_replicas

                checks.append(_try(f"{name}: replica on {peer} (not running there, LVs present)",
                                   lambda: (check_peer_state(name, settings, peer, runner),
                                            check_block_replicas(name, blocks, peer, runner))[1]))
            if files:
                checks.append(_try(f"{name}: replica on {peer} (not running there, LVs present, same layout)",
                                   lambda: (check_peer_state(name, settings, peer, runner),
                                            check_replicas(name, files, peer, runner)) and "matches"))
    return checks


def last_ok_checks(config, names, runners, factory, now) -> list[Check]:
    """A warning for each DomU of ``names`` that no Dom0 has backed up OK within max_age: this
    host's catalog, and each other Dom0 of dom0s asked for its own (`domubackup history --json`
    there, over ``runners[host]`` or a new one kept there). A Dom0 that cannot answer is a
    warning too, never a failure."""
    checks, newest = [], {}  # domu: (end of its newest OK run, on which host)

    def note(host, found):
        for domu, when in found.items():
            if domu not in newest or when > newest[domu][0]:
                newest[domu] = (when, host)
    try:
        with Catalog.in_state_dir(config.state_dir) as catalog:
            rows = [catalog.last_ok(d) for d in names]
        note(config.this_host, {r.domu: r.ended or r.started for r in rows if r is not None})
    except DomuBackupError as e:
        checks.append(Check(False, f"newest backups on {config.this_host}", f"cannot read the catalog: {e}",
                            warning=True))
    for peer in (h for h in config.dom0s if h != config.this_host):
        try:
            runner = runners.get(peer) or runners.setdefault(peer, factory(peer, config.defaults.ssh))
            res = runner.run(cmd.history_json(), timeout=60)
            note(peer, newest_ok_per_domu(json.loads(res.stdout)))
        except (DomuBackupError, ValueError) as e:
            checks.append(Check(False, f"newest backups on {peer}", f"cannot ask it: {e}", warning=True))
    for d in names:
        fresh, text = last_ok_text(newest.get(d), now, config.max_age)
        checks.append(Check(fresh, f"{d}: last OK backup (max_age {age_text(config.max_age)})", text,
                            warning=not fresh))
    return checks
