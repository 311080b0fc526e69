"""Read a domain's disks from its libvirt XML (lxml XPath over /domain/devices/disk). Pure."""

from __future__ import annotations

from dataclasses import replace

from lxml import etree

from .errors import InspectError
from .model import Disk

NETWORK_DISK = "network disk ({}) cannot be snapshotted with LVM on this host"


def _first(node, xpath: str) -> str | None:
    found = node.xpath(xpath)
    return str(found[0]) if found else None


def parse_domain_xml(xml: str | bytes, *, include: tuple[str, ...] = (),
                     exclude: tuple[str, ...] = ()) -> tuple[str, str | None, tuple[Disk, ...]]:
    """Return (name, hypervisor type, disks). Disks that cannot be backed up carry a skip_reason."""
    if isinstance(xml, str):
        xml = xml.encode()
    try:
        root = etree.fromstring(xml, parser=etree.XMLParser(resolve_entities=False, no_network=True))
    except etree.XMLSyntaxError as e:
        raise InspectError(f"domain XML is not well-formed: {e}") from None
    if root.tag != "domain":
        raise InspectError(f"domain XML has root <{root.tag}>, expected <domain>")
    name = _first(root, "/domain/name/text()") or ""
    hypervisor = root.get("type")
    disks = []
    for node in root.xpath("/domain/devices/disk"):
        disk = Disk(type=node.get("type", "file"), device=node.get("device", "disk"),
                    source=_first(node, "source/@dev") or _first(node, "source/@file")
                    or _first(node, "source/@name") or _first(node, "source/@volume"),
                    target=_first(node, "target/@dev") or "", bus=_first(node, "target/@bus"),
                    driver_name=_first(node, "driver/@name"), driver_type=_first(node, "driver/@type"),
                    protocol=_first(node, "source/@protocol"))
        disks.append(replace(disk, skip_reason=skip_reason(disk, include, exclude)))
    return name, hypervisor, tuple(disks)


# Skipped disks that hold nothing of the guest's data, or that the admin left out on purpose;
# any other skipped disk makes the run PARTIAL (see loses_data).
NOT_DATA = ("disk has no target dev", "not selected by the config's disks list",
            "excluded by the config's exclude_disks", "cdrom is not backed up", "floppy is not backed up",
            "disk has no source (empty drive)")


def loses_data(reason: str) -> bool:
    return reason not in NOT_DATA


def skip_reason(disk: Disk, include=(), exclude=()) -> str | None:
    """Why this disk is not backed up, or None when it is."""
    if not disk.target:
        return "disk has no target dev"
    if include and disk.target not in include:
        return "not selected by the config's disks list"
    if disk.target in exclude:
        return "excluded by the config's exclude_disks"
    if disk.device in ("cdrom", "floppy"):
        return f"{disk.device} is not backed up"
    if disk.type == "network":
        return NETWORK_DISK.format(disk.protocol or "unknown protocol")
    if not disk.source:
        return "disk has no source (empty drive)"
    if disk.type == "file":
        return "file-backed image: file images are not supported yet (only LVM logical volumes)"
    if disk.type != "block":
        return f"disk type {disk.type!r} is not supported (only block devices on LVM)"
    if disk.device not in ("disk", "lun"):
        return f"device kind {disk.device!r} is not backed up"
    if disk.driver_type and disk.driver_type != "raw":
        return f"driver type {disk.driver_type!r} on a block device is not supported (raw only)"
    return None
