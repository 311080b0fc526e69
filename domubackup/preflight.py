"""`domubackup check`: everything a first night needs, one line per check, OK or what to fix."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

from . import pipeline, virt
from .errors import DomuBackupError

LOCAL_TOOLS = ("lvs", "vgs", "lvcreate", "lvremove", "lvextend", "kpartx", "parted", "blkid", "findmnt",
               "mount", "umount", "rsync", "ssh")
PEER_TOOLS = ("lvs", "vgs", "kpartx", "parted", "blkid", "mount", "umount", "rsync", "virsh",
              "timeout", "python3")


@dataclass(frozen=True)
class Check:
    ok: bool
    what: str
    detail: str = ""

    def line(self) -> str:
        return f"{'OK  ' if self.ok else 'FAIL'} {self.what}" + (f": {self.detail}" if self.detail else "")


def missing_tools(runner, tools) -> list[str]:
    res = runner.run(["which", *tools], check=False)
    found = {os.path.basename(line.strip()) for line in res.stdout.splitlines() if line.strip()}
    return [t for t in tools if t not in found]


def _try(what, fn) -> Check:
    try:
        detail = fn()
        return Check(True, what, detail or "")
    except DomuBackupError as e:
        return Check(False, what, str(e))


def run_checks(config, names, local, *, factory=pipeline.ssh_runner) -> list[Check]:
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
    checks.append(_try(f"this host {config.this_host} in dom0s", lambda: pipeline.check_host(config)))

    def tools():
        gone = missing_tools(local, LOCAL_TOOLS)
        if gone:
            raise DomuBackupError(f"missing: {', '.join(gone)}", hint="install lvm2, kpartx, parted, util-linux, rsync, openssh-client, udev")
        return "all present"
    checks.append(_try(f"tools on {config.this_host}", tools))
    try:
        conn = virt.connect(config.defaults.libvirt_uri)
    except DomuBackupError as e:
        checks.append(Check(False, f"libvirt {config.defaults.libvirt_uri}", str(e)))
        return checks
    checks.append(Check(True, f"libvirt {config.defaults.libvirt_uri}", "reachable"))
    peers_seen = {}
    try:
        for name in names:
            settings = config.settings_for(name)
            try:
                insp = pipeline.inspect(config, name, conn, local)
            except DomuBackupError as e:
                checks.append(Check(False, f"{name}: eligible here", str(e)))
                continue
            disks = ", ".join(f"{f.disk.target}={f.lv.vg}/{f.lv.lv}" for f in insp.facts)
            checks.append(Check(True, f"{name}: eligible here", f"{insp.domain.state}; disks {disks}"))
            checks.append(_try(f"{name}: VG space for snapshots of {settings.snapshot_size}",
                               lambda: pipeline.check_vg_space(insp.facts, settings)))
            for peer in insp.peers:
                if peer not in peers_seen:
                    runner = factory(peer, settings.ssh)
                    peers_seen[peer] = runner
                    ok = _try(f"ssh to {peer} (pinned host key in {settings.ssh.known_hosts})",
                              lambda: runner.run(["true"], timeout=30) and "connected")
                    checks.append(ok)
                    if ok.ok:
                        def peer_tools(runner=runner):
                            gone = missing_tools(runner, PEER_TOOLS)
                            if gone:
                                raise DomuBackupError(f"missing: {', '.join(gone)}")
                            return "all present"
                        checks.append(_try(f"tools on {peer}", peer_tools))
                runner = peers_seen[peer]
                checks.append(_try(f"{name}: replica on {peer} (not running there, LVs present, same layout)",
                                   lambda: pipeline.check_peer(config, name, insp.facts, settings, peer, runner)
                                   and "matches"))
    finally:
        conn.close()
        for r in peers_seen.values():
            r.close()
    return checks
