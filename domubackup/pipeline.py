"""The only module that knows the order of the stages of a backup."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from . import virt
from .config import Config
from .errors import NotEligibleError
from .facts import probe_disk
from .model import Domain, DiskFacts
from .plan import Plan, plan_backup

log = logging.getLogger("domubackup")


@dataclass
class Inspection:
    domain: Domain
    facts: list[DiskFacts]
    skipped: list[str]
    peers: tuple[str, ...]


def check_host(config: Config) -> None:
    if config.this_host not in config.dom0s:
        raise NotEligibleError(f"this host {config.this_host!r} is not in dom0s {list(config.dom0s)} of {config.path}",
                               hint="add it to dom0s, or set this_host to its name there")


def inspect(config: Config, name: str, conn, runner) -> Inspection:
    """Eligibility (defined here, running, this host in DOM0S, a peer) and read-only facts."""
    check_host(config)
    settings = config.settings_for(name)
    dom = virt.lookup(conn, name)
    domain = virt.describe(dom, include=settings.disks, exclude=settings.exclude_disks)
    if domain.state not in virt.RUNNING_STATES:
        raise NotEligibleError(f"{name}: is {domain.state} on {config.this_host}, not running; nothing to back up here",
                               hint="it is backed up by the Dom0 it runs on")
    peers = config.peers_for(name)
    if not peers:
        raise NotEligibleError(f"{name}: no peer to copy to: dom0s {list(config.dom0s)} has no other host",
                               hint="add the peer Dom0 to dom0s or set peers in [domu." + name + "]")
    skipped = [f"{d.target}: {d.skip_reason}" for d in domain.disks if d.skip_reason]
    facts = [probe_disk(runner, d) for d in sorted((d for d in domain.disks if d.skip_reason is None),
                                                   key=lambda d: d.target)]
    if not facts:
        raise NotEligibleError(f"{name}: no disk that can be backed up", hint="; ".join(skipped) or None)
    return Inspection(domain, facts, skipped, peers)


def make_plan(config: Config, insp: Inspection, *, progress=False) -> Plan:
    return plan_backup(insp.domain.name, insp.facts, config.settings_for(insp.domain.name), insp.peers,
                       skipped=insp.skipped, progress=progress)
