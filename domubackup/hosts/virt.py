"""libvirt adapter: connect, look a DomU up, read its state and XML. Thin; parsing is in domxml."""

from __future__ import annotations

import libvirt

from ..core.errors import DomuBackupError, NotHereError
from ..core.model import Domain
from ..core.domxml import parse_domain_xml

STATES = {libvirt.VIR_DOMAIN_NOSTATE: "nostate", libvirt.VIR_DOMAIN_RUNNING: "running",
          libvirt.VIR_DOMAIN_BLOCKED: "blocked", libvirt.VIR_DOMAIN_PAUSED: "paused",
          libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down", libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
          libvirt.VIR_DOMAIN_CRASHED: "crashed", libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended"}
# Xen reports an idle guest as "blocked": it is running.
RUNNING_STATES = ("running", "blocked")

libvirt.registerErrorHandler(lambda ctx, err: None, None)  # errors are raised, not printed


class LibvirtError(DomuBackupError):
    """libvirt cannot be reached or answered with an error."""


def connect(uri: str):
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise LibvirtError(f"cannot connect to libvirt at {uri}: {e.get_error_message()}",
                           hint="check libvirt_uri in the config and that libvirtd is running") from None


def lookup(conn, name: str):
    """The virDomain for `name`, or NotEligibleError when it is not defined here."""
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise NotHereError(f"{name}: no such domain on this host's libvirt ({conn.getURI()})",
                                   hint="check the name with `virsh list --all`") from None
        raise LibvirtError(f"{name}: libvirt lookup failed: {e.get_error_message()}") from None


def describe(dom, *, include=(), exclude=()) -> Domain:
    try:
        state, reason = dom.state()
        xml = dom.XMLDesc(0)
    except libvirt.libvirtError as e:
        raise LibvirtError(f"{dom.name()}: cannot read state or XML: {e.get_error_message()}") from None
    name, hypervisor, disks = parse_domain_xml(xml, include=include, exclude=exclude)
    return Domain(name=name or dom.name(), state=STATES.get(state, f"state {state}"),
                  state_reason=reason, hypervisor=hypervisor, disks=disks, xml=xml)


def running_domains(conn) -> list[str]:
    try:
        return sorted(d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE))
    except libvirt.libvirtError as e:
        raise LibvirtError(f"cannot list domains: {e.get_error_message()}") from None


def selected_domus(config, names, conn) -> list[str]:
    """The DomUs a command works on: ``names``, else what the night backs up here (the
    configured DomUs, and with ``backup_all_running`` every other DomU running here)."""
    if names:
        return list(names)
    names = list(config.domus)
    if config.backup_all_running:
        names += [n for n in running_domains(conn) if n not in names]
    return names


def define(conn, xml: str, *, start: bool) -> str:
    """Define a domain from XML (and start it); returns its state as libvirt then tells."""
    try:
        dom = conn.defineXML(xml)
        if start:
            dom.create()
        return STATES.get(dom.state()[0], "unknown")
    except libvirt.libvirtError as e:
        raise LibvirtError(f"cannot {'define and start' if start else 'define'} the domain: "
                           f"{e.get_error_message()}", hint="see the libvirt log of this host") from None
