import pytest

from domubackup.core.domxml import parse_domain_xml
from domubackup.core.errors import InspectError
from domubackup.core.model import Disk


def load(fixtures, name, **kw):
    return parse_domain_xml((fixtures / "domxml" / name).read_text(), **kw)


def test_xen_pv_two_lv_disks(fixtures):
    name, hv, disks = load(fixtures, "xen-pv.xml")
    assert (name, hv) == ("web1", "xen")
    assert disks == (
        Disk("block", "disk", "/dev/vg0/web1-disk", "xvda", "xen", "phy"),
        Disk("block", "disk", "/dev/vg0/web1-srv", "xvdb", "xen", "phy"),
    )


def test_xen_hvm_skips_cdrom_and_empty_floppy(fixtures):
    _, _, disks = load(fixtures, "xen-hvm.xml")
    assert [(d.target, d.source, d.skip_reason) for d in disks] == [
        ("hda", "/dev/mapper/vg--data-win1--c", None),
        ("hdc", "/srv/iso/virtio win.iso", "cdrom is not backed up"),
        ("fda", None, "floppy is not backed up"),
    ]


def test_kvm_file_network_cdrom_and_odd_path(fixtures):
    _, hv, disks = load(fixtures, "kvm.xml")
    assert hv == "kvm"
    reasons = {d.target: d.skip_reason for d in disks}
    assert reasons == {
        "vda": None,
        "vdb": "file-backed image: file images are not supported yet (only LVM logical volumes)",
        "vdc": "network disk (rbd) cannot be snapshotted with LVM on this host",
        "sda": "cdrom is not backed up",
        "vdd": None,
    }
    odd = next(d for d in disks if d.target == "vdd")
    assert odd.source == "/dev/vg0/odd name 'quoted' $(touch x);"  # data, kept verbatim
    assert next(d for d in disks if d.target == "vdc").source == "pool/db1-logs"


def test_include_and_exclude(fixtures):
    _, _, disks = load(fixtures, "xen-pv.xml", include=("xvda",))
    assert [d.skip_reason for d in disks] == [None, "not selected by the config's disks list"]
    _, _, disks = load(fixtures, "xen-pv.xml", exclude=("xvda",))
    assert [d.skip_reason for d in disks] == ["excluded by the config's exclude_disks", None]


@pytest.mark.parametrize("xml, message", [
    ("<domain><name>x</name>", "domain XML is not well-formed"),
    ("<node/>", "domain XML has root <node>, expected <domain>"),
])
def test_bad_xml(xml, message):
    with pytest.raises(InspectError, match=message):
        parse_domain_xml(xml)


def test_entities_are_not_expanded():
    xml = ('<!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]><domain><devices>'
           "<disk type='block' device='disk'><source dev='&x;'/><target dev='xvda'/></disk></devices></domain>")
    with pytest.raises(InspectError) as e:
        parse_domain_xml(xml)
    assert "root:" not in str(e.value)
