import pytest

from domubackup.core import commands
from domubackup.core.config import RsyncSettings, parse_config
from domubackup.core.errors import InspectError
from domubackup.core.model import (LOCAL, Disk, DiskFacts, Filesystem, FstabEntry, LogicalVolume, Mount,
                              Partition, PartitionTable)
from domubackup.core.layout import classify, mounts_from_fstab, sort_mounts
from domubackup.core.plan import plan_backup, teardown_order

MiB = 1024 * 1024
ROOT = Filesystem("xvda", 1, "ext4", uuid="1111-aaaa", label="web1-root")
VAR = Filesystem("xvda", 5, "xfs", uuid="2222-bbbb", label="web1-var")
SWAP = classify(Filesystem("xvda", 6, "swap", uuid="3333-cccc"))
SRV = Filesystem("xvdb", None, "ext4", uuid="4444-dddd", label="web1-srv")


def web1_facts():
    d1 = Disk("block", "disk", "/dev/vg0/web1-disk", "xvda", "xen", "phy")
    d2 = Disk("block", "disk", "/dev/vg0/web1-srv", "xvdb", "xen", "phy")
    t1 = PartitionTable("msdos", 1200 * MiB, (
        Partition(1, MiB, 401 * MiB - 1, 400 * MiB, "ext4"),
        Partition(2, 401 * MiB, 1200 * MiB - 1, 799 * MiB, "", flags=("extended",)),
        Partition(5, 402 * MiB, 802 * MiB - 1, 400 * MiB, "xfs"),
        Partition(6, 803 * MiB, 867 * MiB - 1, 64 * MiB, "linux-swap(v1)"),
    ))
    t2 = PartitionTable("loop", 1536 * MiB, (Partition(1, 0, 1536 * MiB - 1, 1536 * MiB, "ext4"),))
    return [
        DiskFacts(d1, LogicalVolume("vg0", "web1-disk", 1200 * MiB, "-wi-ao----", path="/dev/vg0/web1-disk"), t1,
                  (ROOT, VAR, SWAP)),
        DiskFacts(d2, LogicalVolume("vg0", "web1-srv", 1536 * MiB, "-wi-ao----", path="/dev/vg0/web1-srv"), t2,
                  (SRV,)),
    ]


def settings(extra=""):
    return parse_config('dom0s = ["dom0a", "dom0b"]\nsnapshot_size = "256M"\n' + extra,
                        hostname="dom0a", default_uri="xen:///system")


MOUNTS = '[domu.web1]\nmounts = { xvdb = "/srv", xvda5 = "/var", xvda1 = "/" }\n'
SSH_E = ("ssh -F none -p 22 -i /root/.ssh/id_ed25519 -o UserKnownHostsFile=/etc/domubackup/known_hosts "
         "-o StrictHostKeyChecking=yes -o BatchMode=yes -o IdentitiesOnly=yes "
         "-o GlobalKnownHostsFile=/dev/null -o UpdateHostKeys=no -o ControlMaster=no -o ControlPath=none "
         "-o ForwardAgent=no -o ForwardX11=no -o ClearAllForwardings=yes -o PermitLocalCommand=no "
         "-o ConnectTimeout=10 "
         "-o ServerAliveInterval=15 -o ServerAliveCountMax=3 -l root")
EXPECTED = [
    ("snapshot", "local", "lvcreate --snapshot --size 256M --name web1-disk-snap /dev/vg0/web1-disk",
     "lvremove -f /dev/vg0/web1-disk-snap"),
    ("snapshot", "local", "lvcreate --snapshot --size 256M --name web1-srv-snap /dev/vg0/web1-srv",
     "lvremove -f /dev/vg0/web1-srv-snap"),
    ("map", "local", "kpartx -a -s -p p /dev/vg0/web1-disk-snap", "kpartx -d -p p /dev/vg0/web1-disk-snap"),
    ("mount", "local", "mkdir -p -- /mnt/domubackup/source/web1", "rmdir -- /mnt/domubackup/source/web1"),
    ("mount", "local", "domubackup mount-in -- /mnt/domubackup/source/web1 / /dev/mapper/vg0-web1--disk--snapp1 "
     "ext4 ro,nodev,nosuid,noexec,nosymfollow,errors=remount-ro",
     "domubackup umount-in -- /mnt/domubackup/source/web1 / /dev/mapper/vg0-web1--disk--snapp1"),
    ("mount", "local", "domubackup mount-in -- /mnt/domubackup/source/web1 /srv /dev/vg0/web1-srv-snap "
     "ext4 ro,nodev,nosuid,noexec,nosymfollow,errors=remount-ro",
     "domubackup umount-in -- /mnt/domubackup/source/web1 /srv /dev/vg0/web1-srv-snap"),
    ("mount", "local", "domubackup mount-in -- /mnt/domubackup/source/web1 /var /dev/mapper/vg0-web1--disk--snapp5 "
     "xfs ro,nodev,nosuid,noexec,nosymfollow,nouuid",
     "domubackup umount-in -- /mnt/domubackup/source/web1 /var /dev/mapper/vg0-web1--disk--snapp5"),
    ("peer-mark", "dom0b", "lvchange --addtag dbk:writing --addtag dbk:domu:web1 /dev/vg0/web1-disk /dev/vg0/web1-srv",
     None),
    ("peer-map", "dom0b", "kpartx -a -s -p p /dev/vg0/web1-disk", "kpartx -d -p p /dev/vg0/web1-disk"),
    ("peer-mount", "dom0b", "mkdir -p -- /mnt/domubackup/target/web1", "rmdir -- /mnt/domubackup/target/web1"),
    ("peer-mount", "dom0b", "domubackup mount-in --mkdir -- /mnt/domubackup/target/web1 / /dev/mapper/vg0-web1--diskp1 "
     "ext4 rw,nodev,nosuid,noexec,nosymfollow,errors=remount-ro",
     "domubackup umount-in -- /mnt/domubackup/target/web1 / /dev/mapper/vg0-web1--diskp1"),
    ("peer-mount", "dom0b", "domubackup mount-in --mkdir -- /mnt/domubackup/target/web1 /srv /dev/vg0/web1-srv "
     "ext4 rw,nodev,nosuid,noexec,nosymfollow,errors=remount-ro",
     "domubackup umount-in -- /mnt/domubackup/target/web1 /srv /dev/vg0/web1-srv"),
    ("peer-mount", "dom0b", "domubackup mount-in --mkdir -- /mnt/domubackup/target/web1 /var /dev/mapper/vg0-web1--diskp5 "
     "xfs rw,nodev,nosuid,noexec,nosymfollow",
     "domubackup umount-in -- /mnt/domubackup/target/web1 /var /dev/mapper/vg0-web1--diskp5"),
    ("transfer", "local", f"rsync -aHAX --numeric-ids --delete --sparse --compress --timeout=300 --stats -e '{SSH_E}' "
     "/mnt/domubackup/source/web1/ dom0b:/mnt/domubackup/target/web1/", None),
]


def flat(plan):
    """The plan's commands (its check steps left out: see test_the_checks_come_first_on_each_lane)."""
    import shlex
    return [(s.phase, s.host, shlex.join(s.argv), shlex.join(s.undo) if s.undo else None) for s in plan.steps
            if not s.check]


def test_full_plan_with_config_mounts():
    c = settings(MOUNTS)
    plan = plan_backup("web1", web1_facts(), c.settings_for("web1"), c.peers_for("web1"))
    assert flat(plan) == EXPECTED
    assert plan.skipped == ["xvda6: swap is not copied"]


def test_the_checks_come_first_on_each_lane_and_the_lanes_meet_at_marks():
    plan = plan_backup("web1", web1_facts(), settings(MOUNTS).settings_for("web1"), ("dom0b",))
    lane = {h: [(s.phase, s.check[:1] or s.argv[:1], s.waits, s.mark) for s in plan.steps if s.host == h]
            for h in (LOCAL, "dom0b")}
    assert lane[LOCAL][:4] == [("check", ("vg-space",), (), ""), ("check", ("no-stale",), (), "checked"),
                               ("snapshot", ("lvcreate",), (), ""), ("snapshot", ("lvcreate",), (), "snapshots")]
    assert lane[LOCAL][4:6] == [("check", ("snapshot",), (), ""), ("check", ("snapshot",), (), "")]
    assert lane[LOCAL][-2:] == [("check", ("room",), ("ready:dom0b",), ""), ("transfer", ("rsync",), (), "")]
    # the peer is asked at once; it opens nothing before this host's checks passed
    assert lane["dom0b"][:2] == [("check", ("peer-state",), (), ""), ("check", ("replicas",), ("checked",), "")]
    assert lane["dom0b"][-1][-1] == "ready:dom0b"
    # with a freeze window, the peer waits for the snapshots (nothing competes with the freeze)
    frozen = plan_backup("web1", web1_facts(), settings(MOUNTS).settings_for("web1"), ("dom0b",), frozen=True)
    assert next(s for s in frozen.steps if s.host == "dom0b").waits == ("snapshots",)


def test_teardown_is_exact_reverse():
    c = settings(MOUNTS)
    plan = plan_backup("web1", web1_facts(), c.settings_for("web1"), c.peers_for("web1"))
    undos = [e[3] for e in EXPECTED if e[3]]
    assert [" ".join(u) for _, u in teardown_order(plan.steps)] == [u.replace("-- ", "-- ") for u in reversed(undos)]


def test_without_fstab_the_plan_says_the_rest_is_decided_at_run_time():
    c = settings()
    plan = plan_backup("web1", web1_facts(), c.settings_for("web1"), c.peers_for("web1"))
    phases = [(s.phase, s.host) for s in plan.steps]
    assert ("inspect", LOCAL) in phases
    inspect = next(s for s in plan.steps if s.phase == "inspect")
    assert inspect.argv == ("domubackup", "read-in", "--", "/mnt/domubackup/source/web1", "/etc/fstab")
    assert any("come from the guest's /etc/fstab at run time" in n and "xvda5 (xfs), xvdb (ext4)" in n
               for n in plan.notes)
    assert inspect.then == "fstab" and plan.steps.index(inspect) == len([s for s in plan.steps if s.host == LOCAL]) - 1
    mounts = [s for s in plan.steps if s.argv[:2] == ("domubackup", "mount-in")]
    assert [m.argv[m.argv.index("--") + 1:][:2] for m in mounts] == [("/mnt/domubackup/source/web1", "/")]
    assert not [s for s in plan.steps if s.phase in ("peer-mount", "transfer")]  # decided by the fstab
    # given the fstab the run read: the plan as the run decided it
    fstab = "LABEL=web1-root / ext4 defaults 0 1\nLABEL=web1-var /var xfs defaults 0 2\n/dev/xvdb /srv ext4 defaults 0 2\n"
    decided = plan_backup("web1", web1_facts(), c.settings_for("web1"), c.peers_for("web1"), fstab=fstab)
    assert flat(decided)[:len(flat(plan))] == flat(plan)
    read = ("inspect", LOCAL, "domubackup read-in -- /mnt/domubackup/source/web1 /etc/fstab", None)
    for host in (LOCAL, "dom0b"):  # each lane: the config-mounts plan's, with the fstab read after the root
        assert [e for e in flat(decided) if e[1] == host] == [e for e in EXPECTED[:5] + [read] + EXPECTED[5:]
                                                              if e[1] == host]


def test_fstab_by_uuid_label_and_device():
    entries = [FstabEntry("UUID=1111-AAAA", "/", "ext4"), FstabEntry("LABEL=web1-var", "/var", "xfs"),
               FstabEntry("UUID=3333-cccc", "none", "swap"), FstabEntry("/dev/xvdb", "/srv/", "ext4"),
               FstabEntry("tmpfs", "/tmp", "tmpfs"), FstabEntry("LABEL=gone", "/data", "ext4")]
    mounts, notes = mounts_from_fstab(entries, ROOT, web1_facts())
    assert [(m.filesystem.name, m.mountpoint) for m in mounts] == [("xvda1", "/"), ("xvdb", "/srv"), ("xvda5", "/var")]
    assert notes == ["fstab entry LABEL=gone /data: names no filesystem of this DomU's disks"]


GPT_VAR = Filesystem("xvda", 5, "xfs", uuid="2222-bbbb", label="web1-var", partuuid="0A1B2C3D-05", partlabel="var data")


@pytest.mark.parametrize("spec, name", [
    ('UUID="2222-BBBB"', "xvda5"), ("UUID='2222-bbbb'", "xvda5"), ('LABEL="web1-var"', "xvda5"),
    ("PARTUUID=0a1b2c3d-05", "xvda5"), ('PARTLABEL="var data"', "xvda5"),
    ("/dev/disk/by-uuid/2222-bbbb", "xvda5"), ("/dev/disk/by-label/web1-var", "xvda5"),
    ("/dev/disk/by-partuuid/0a1b2c3d-05", "xvda5"), ("/dev/disk/by-partlabel/var\\x20data", "xvda5"),
    ("/dev/xvda5", "xvda5"), ("/dev/sda5", "xvda5"), ("/dev/vda5", "xvda5"), ("/dev/hda5", "xvda5"),
    ("/dev/sdb", "xvdb"), ("/dev/vdb", "xvdb"), ("/dev/xvdb1", None), ("/dev/sda", None), ("/dev/sdc5", None),
    ("LABEL=web1-var ", None), ("UUID=", None), ('UUID="2222-bbbb', None), ("ID=2222-bbbb", None),
])
def test_fstab_specs_as_libmount_reads_them(spec, name):
    from domubackup.core.layout import resolve_spec
    fs = resolve_spec(spec, [ROOT, GPT_VAR, SRV])
    assert (fs.name if fs else None) == name


def test_fstab_lines_that_place_nothing_and_two_lines_for_one_mount_point():
    from dataclasses import replace
    facts = web1_facts()
    facts[0] = replace(facts[0], filesystems=(ROOT, GPT_VAR, SWAP))
    entries = [FstabEntry("/dev/sda1", "/", "ext4"), FstabEntry("proc", "/proc", "proc"),
               FstabEntry("/srv/www", "/var/www", "none", ("bind",)), FstabEntry("nas:/export", "/mnt/nas", "nfs"),
               FstabEntry("//nas/share", "/mnt/smb", "cifs"), FstabEntry("tmpfs", "/tmp", "tmpfs"),
               FstabEntry("LABEL=web1-var", "/data", "xfs", ("noauto", "nofail")),  # still copied
               FstabEntry("UUID=4444-dddd", "/data", "ext4"),  # a later line at /data: on top
               FstabEntry("UUID=1111-aaaa", "/again", "ext4"),  # the root filesystem twice
               FstabEntry("UUID=9999", "/gone", "ext4")]
    mounts, notes = mounts_from_fstab(entries, ROOT, facts)
    # xvda5, under xvdb at /data, is not lost: it goes to the hidden tree
    assert [(m.filesystem.name, m.mountpoint, m.tree) for m in mounts] == [
        ("xvda1", "/", ""), ("xvdb", "/data", ""), ("xvda5", "/xvda5", "unplaced")]
    assert notes == [
        "fstab: xvda5 and xvdb both at /data: xvdb, the later line, is on top (as mount -a does)",
        "fstab entry UUID=1111-aaaa /again: xvda1 is mounted at / already",
        "fstab entry UUID=9999 /gone: names no filesystem of this DomU's disks"]


def test_needs_partition_ids():
    from domubackup.core.layout import needs_partition_ids
    assert not needs_partition_ids([FstabEntry("UUID=1", "/", "ext4"), FstabEntry("/dev/sda1", "/x", "ext4")])
    assert needs_partition_ids([FstabEntry('PARTUUID="a-01"', "/", "ext4")])
    assert needs_partition_ids([FstabEntry("/dev/disk/by-partlabel/root", "/", "ext4")])


def test_fstab_missing_filesystem_is_reported_and_wrong_root_refused():
    mounts, notes = mounts_from_fstab([FstabEntry("LABEL=web1-var", "/var", "xfs")], ROOT, web1_facts())
    # xvdb, not in the fstab, is copied in the hidden tree
    assert [(m.filesystem.name, m.mountpoint, m.tree) for m in mounts] == [
        ("xvda1", "/", ""), ("xvda5", "/var", ""), ("xvdb", "/xvdb", "unplaced")] and notes == []
    with pytest.raises(InspectError, match="the guest's /etc/fstab mounts xvdb at /, but xvda1 was mounted as root"):
        mounts_from_fstab([FstabEntry("LABEL=web1-srv", "/", "ext4")], ROOT, web1_facts())


def test_mount_order_parents_before_children():
    ms = [Mount(VAR, "/var/lib/mysql"), Mount(SRV, "/srv"), Mount(VAR, "/var"), Mount(ROOT, "/")]
    assert [m.mountpoint for m in sort_mounts(ms)] == ["/", "/srv", "/var", "/var/lib/mysql"]


def test_guest_lvm_is_skipped_and_its_disk_not_mapped():
    from domubackup.core.layout import not_copied, unmappable
    from domubackup.core.plan import mapped
    pv = classify(Filesystem("xvda", 2, "LVM2_member"))
    assert pv.skip_reason.startswith("holds a guest LVM physical volume: not copied, and its disk is not mapped")
    fss = unmappable([ROOT, pv, SWAP])
    assert fss[0].skip_reason == "not copied: its disk is not mapped (xvda2 holds a guest LVM2_member)"
    f = web1_facts()[0]
    from dataclasses import replace
    f = replace(f, filesystems=fss)
    assert not mapped(f)
    assert not_copied([f], ["hdc: cdrom is not backed up", "xvdc: file-backed image: file images are not supported yet"]) == [
        "xvdc: file-backed image: file images are not supported yet",
        "xvda1: not copied: its disk is not mapped (xvda2 holds a guest LVM2_member)",
        "xvda2: " + pv.skip_reason]
    assert classify(Filesystem("xvda", 3, "linux_raid_member")).skip_reason.startswith(
        "holds a guest linux_raid_member (a RAID or cache member): not copied")


def test_no_root_fs_falls_back_to_named_directories():
    from dataclasses import replace
    f = web1_facts()[1]
    only_vfat = [replace(f, filesystems=(replace(SRV, fstype="vfat"),))]
    c = settings()
    plan = plan_backup("web1", only_vfat, c.settings_for("web1"), ("dom0b",))
    assert [s.argv[1:] for s in plan.steps if s.phase == "mount"] == [
        ("-p", "--", "/mnt/domubackup/source/web1"), ("-p", "--", "/mnt/domubackup/source/web1/xvdb"),
        ("mount-in", "--", "/mnt/domubackup/source/web1", "/xvdb", "/dev/vg0/web1-srv-snap", "vfat",
         "ro,nodev,nosuid,noexec,nosymfollow")]
    assert plan.notes[0].startswith("no Linux root filesystem found")


def test_peers_get_one_rsync_each_and_bwlimit():
    c = parse_config('dom0s = ["a", "b", "c"]\n[rsync]\nbwlimit = "10M"\ncompress = true\n' + MOUNTS, hostname="a",
                     default_uri="x")
    plan = plan_backup("web1", web1_facts(), c.settings_for("web1"), c.peers_for("web1"))
    rsyncs = [s.argv for s in plan.steps if s.phase == "transfer"]
    assert [r[-1] for r in rsyncs] == ["b:/mnt/domubackup/target/web1/", "c:/mnt/domubackup/target/web1/"]
    assert "--compress" in rsyncs[0] and "--bwlimit=10M" in rsyncs[0]


@pytest.mark.parametrize("value, expected", [("io_timeout = 0\n", []), ("io_timeout = 45.0\n", ["--timeout=45"])])
def test_rsync_io_timeout(value, expected):
    c = settings(MOUNTS + "[rsync]\n" + value)
    plan = plan_backup("web1", web1_facts(), c.settings_for("web1"), c.peers_for("web1"))
    assert [w for s in plan.steps if s.phase == "transfer" for w in s.argv if w.startswith("--timeout")] == expected


def test_hostile_names_stay_single_argv_words():
    facts = web1_facts()
    c = settings("source_prefix = \"/mnt/a b/$(reboot)\"\n" + MOUNTS)
    plan = plan_backup("web1", facts, c.settings_for("web1"), ("dom0b",))
    mkdir = next(s for s in plan.steps if s.argv[:1] == ("mkdir",))
    assert mkdir.argv == ("mkdir", "-p", "--", "/mnt/a b/$(reboot)/web1")


@pytest.mark.parametrize("value, expected", [
    ("alive_interval = 0\n", []),
    ("alive_interval = 0.4\n", ["ServerAliveInterval=1", "ServerAliveCountMax=3"]),
    ("alive_interval = 5.0\n", ["ServerAliveInterval=5", "ServerAliveCountMax=3"]),
])
def test_rsync_ssh_keepalive_follows_alive_interval(value, expected):
    argv = commands.ssh_command(settings("[ssh]\n" + value).settings_for("web1").ssh)
    assert [argv[i + 1] for i, w in enumerate(argv) if w == "-o" and "ServerAlive" in argv[i + 1]] == expected


def test_config_mounts_that_leave_a_filesystem_out_copy_it_in_the_hidden_tree():
    c = settings('[domu.web1]\nmounts = { xvda5 = "/var", xvda1 = "/" }\n')
    plan = plan_backup("web1", web1_facts(), c.settings_for("web1"), c.peers_for("web1"))
    steps = [(p, h, a.replace(f"-e '{SSH_E}' ", "")) for p, h, a, u in flat(plan)
             if "unplaced" in a or p == "transfer"]
    src, tgt = "/mnt/domubackup/source/.web1.unplaced", "/mnt/domubackup/target/.web1.unplaced"
    assert steps == [
        ("mount", "local", f"mkdir -p -- {src}"), ("mount", "local", f"mkdir -p -- {src}/xvdb"),
        ("mount", "local", f"domubackup mount-in -- {src} /xvdb /dev/vg0/web1-srv-snap ext4 "
                           "ro,nodev,nosuid,noexec,nosymfollow,errors=remount-ro"),
        ("peer-mount", "dom0b", f"mkdir -p -- {tgt}"), ("peer-mount", "dom0b", f"mkdir -p -- {tgt}/xvdb"),
        ("peer-mount", "dom0b", f"domubackup mount-in --mkdir -- {tgt} /xvdb /dev/vg0/web1-srv ext4 "
                                "rw,nodev,nosuid,noexec,nosymfollow,errors=remount-ro"),
        ("transfer", "local", "rsync -aHAX --numeric-ids --delete --sparse --compress --timeout=300 --stats "
                              "/mnt/domubackup/source/web1/ dom0b:/mnt/domubackup/target/web1/"),
        ("transfer", "local", "rsync -aHAX --numeric-ids --delete --sparse --compress --timeout=300 --stats "
                              f"{src}/ dom0b:{tgt}/")]
    assert plan.skipped == ["xvda6: swap is not copied"]  # nothing else is left out


def test_rsync_and_its_ssh_reach_a_dom0_at_its_address_and_port():
    ssh = settings('[dom0.dom0b]\naddress = "10.0.0.2"\nport = 2222\n[dom0.dom0a]\naddress = "fd00::3"\n'
                   ).settings_for("web1").ssh
    argv = commands.rsync("/src", "dom0b", "/dst", RsyncSettings(), ssh)
    assert argv[-1] == "10.0.0.2:/dst/"
    assert argv[argv.index("-e") + 1] == SSH_E.replace("-p 22 ", "-p 2222 ")
    assert commands.rsync("/src", "dom0a", "/dst", RsyncSettings(), ssh)[-1] == "[fd00::3]:/dst/"
    assert commands.ssh_command(ssh, "dom0a")[:4] == ("ssh", "-F", "none", "-p") and \
        commands.ssh_command(ssh, "dom0a")[4] == "22"


def test_seed_prepares_every_replica_before_the_snapshots_then_streams_each_disk():
    from domubackup.jobs.seed import plan_seed
    plan = plan_seed("web1", web1_facts(), settings().settings_for("web1"), ("dom0b",))
    lane = {h: [(s.phase, s.check or s.argv[:2], s.waits, s.mark) for s in plan.steps if s.host == h]
            for h in (LOCAL, "dom0b")}
    assert lane[LOCAL] == [("snapshot", ("lvcreate", "--snapshot"), ("prepared:dom0b",), ""),
                           ("snapshot", ("lvcreate", "--snapshot"), (), "snapshots")]
    assert lane["dom0b"] == [("check", ("peer-state",), (), ""), ("check", ("replica", "xvda"), (), ""),
                             ("check", ("replica", "xvdb"), (), "prepared:dom0b"),
                             ("seed", ("domubackup", "receive-blocks"), ("snapshots",), ""),
                             ("seed", ("domubackup", "receive-blocks"), (), "")]
    seeds = [s for s in plan.steps if s.phase == "seed"]
    assert [(s.argv[-2:], s.about, s.then) for s in seeds] == [
        (("/dev/vg0/web1-disk", str(1200 * MiB)), ("xvda",), "seed"),
        (("/dev/vg0/web1-srv", str(1536 * MiB)), ("xvdb",), "seed")]


def test_blocks_mode_maps_and_mounts_nothing_and_reads_the_replicas_digests_first():
    from domubackup.core.plan import describe
    from domubackup.jobs.blocks import blocks_facts, plan_blocks
    facts = [blocks_facts(f.disk, f.lv) for f in web1_facts()]
    plan = plan_blocks("web1", facts, settings().settings_for("web1"), ("dom0b",), tokens={("dom0b", "xvdb"): "B/1:2/3"})
    lane = {h: [(s.phase, s.check or s.argv[:2], s.waits, s.mark) for s in plan.steps if s.host == h]
            for h in (LOCAL, "dom0b")}
    assert lane[LOCAL] == [("check", ("vg-space",), (), ""), ("check", ("no-stale",), (), "checked"),
                           ("snapshot", ("lvcreate", "--snapshot"), (), ""),
                           ("snapshot", ("lvcreate", "--snapshot"), (), "snapshots")]
    assert lane["dom0b"] == [("check", ("peer-state",), (), ""), ("check", ("block-replicas",), ("checked",), ""),
                             ("peer-mark", ("lvchange", "--addtag"), (), ""),
                             ("digests", ("domubackup", "block-digests"), (), ""),
                             ("blocks", ("domubackup", "receive-blocks"), ("snapshots",), ""),
                             ("digests", ("domubackup", "block-digests"), (), ""),
                             ("blocks", ("domubackup", "receive-blocks"), (), "")]
    # the write token kept with a replica's digests is in the argv (xvdb); none known: "-" (xvda)
    assert [s.argv[2:] for s in plan.steps if s.phase == "digests"] == [
        ("/dev/vg0/web1-disk", "1258291200", "-"), ("/dev/vg0/web1-srv", "1610612736", "B/1:2/3")]
    assert [s.argv[0] for s in plan.steps if s.undo] == ["lvcreate", "lvcreate"]  # only the snapshots open anything
    assert not any(s.argv[:1] in (("kpartx",), ("mount",)) or "mount-in" in s.argv for s in plan.steps)
    assert [s.argv[:3] for s in plan.after] == [("lvchange", "--deltag", "dbk:writing")]
    text = describe(plan)
    assert "mode blocks" in text and "decides: digests" not in text


def test_blocks_verify_reads_every_block_on_both_ends_and_writes_nothing():
    from domubackup.jobs.blocks import blocks_facts, plan_blocks_verify
    facts = [blocks_facts(f.disk, f.lv) for f in web1_facts()]
    plan = plan_blocks_verify("web1", facts, settings().settings_for("web1"), ("dom0b",))
    reads = [(s.host, s.argv, s.then, s.waits) for s in plan.steps if s.phase == "digests"]
    assert reads == [
        (LOCAL, ("domubackup", "block-digests", "/dev/vg0/web1-disk-snap", "1258291200", "-"), "compare", ("snapshots",)),
        (LOCAL, ("domubackup", "block-digests", "/dev/vg0/web1-srv-snap", "1610612736", "-"), "compare", ()),
        ("dom0b", ("domubackup", "block-digests", "/dev/vg0/web1-disk", "1258291200", "-"), "compare", ()),
        ("dom0b", ("domubackup", "block-digests", "/dev/vg0/web1-srv", "1610612736", "-"), "compare", ())]
    # nothing but the snapshots is made, nothing is marked or written on the peer
    assert [s.argv[0] for s in plan.steps if s.argv and s.phase != "digests"] == ["lvcreate", "lvcreate"]
    assert not plan.after


def test_auto_takes_blocks_where_files_mode_would_leave_data_out():
    from dataclasses import replace
    from domubackup.core.layout import NO_FS_SKIP, blocks_reason
    disk, srv = web1_facts()
    assert blocks_reason(disk) is None and blocks_reason(srv) is None  # ext4, xfs, swap: all copied
    # a partition without a filesystem: raw data unless it is tiny or flagged bios_grub
    t = replace(disk.table, partitions=disk.table.partitions + (Partition(7, 868 * MiB, 968 * MiB - 1, 100 * MiB, ""),))
    raw = Filesystem("xvda", 7, "", skip_reason=NO_FS_SKIP)
    assert blocks_reason(replace(disk, table=t, filesystems=disk.filesystems + (raw,))) == \
        "xvda7 has no filesystem signature (it may hold raw data)"
    for p in (Partition(7, 868 * MiB, 869 * MiB - 1, MiB, ""), Partition(7, 868 * MiB, 968 * MiB - 1, 100 * MiB, "",
                                                                       flags=("bios_grub",))):
        t = replace(disk.table, partitions=disk.table.partitions + (p,))
        assert blocks_reason(replace(disk, table=t, filesystems=disk.filesystems + (raw,))) is None
    # an unsupported filesystem; a guest PV (named before what it leaves unmapped); nothing at all
    minix = classify(Filesystem("xvda", 7, "minix"))
    assert blocks_reason(replace(disk, filesystems=disk.filesystems + (minix,))) == \
        "xvda7 filesystem type 'minix' is not supported"
    from domubackup.core.layout import unmappable
    pv = unmappable([ROOT, VAR, classify(Filesystem("xvda", 7, "LVM2_member"))])
    assert blocks_reason(replace(disk, filesystems=tuple(pv))).startswith("xvda7 holds a guest LVM physical volume")
    assert blocks_reason(replace(srv, filesystems=())) == "no filesystem found on the disk"
    assert blocks_reason(replace(disk, filesystems=(SWAP,))) is None  # swap only: nothing to lose


def test_disk_modes_in_the_config():
    c = settings('mode = "blocks"\n[domu.web1]\ndisk_modes = { xvdb = "files" }\n')
    assert c.settings_for("web1").mode_of("xvdb") == "files" and c.settings_for("web1").mode_of("xvda") == "blocks"
    assert settings().settings_for("web1").mode_of("xvda") == "auto"  # the default
    with pytest.raises(Exception, match="mode: expected 'files', 'blocks' or 'auto', got 'image'"):
        settings('mode = "image"\n')
    with pytest.raises(Exception, match='disk_modes: expected a table like'):
        settings('disk_modes = ["xvda"]\n')


THIN_DELTA = """<superblock uuid="" time="2" transaction="3" data_block_size="128" nr_data_blocks="24576">
  <diff left="1" right="2">
    <same begin="0" length="16"/>
    <different begin="16" length="2"/>
    <same begin="18" length="62"/>
    <right_only begin="80" length="1"/>
    <left_only begin="200" length="64"/>
  </diff>
</superblock>
"""


def test_thin_delta_ranges_and_the_blocks_they_touch():
    from domubackup.core.parsers import parse_thin_delta
    from domubackup.jobs.blocks import changed_blocks
    ranges = parse_thin_delta(THIN_DELTA)
    K = 64 * 1024  # 128 sectors
    assert ranges == [(16 * K, 2 * K), (80 * K, K), (200 * K, 64 * K)]
    # 1 MiB..1.125 MiB, 5 MiB..5.06 MiB, 12.5 MiB..16.5 MiB -> 4 MiB blocks 0, 1, 3, 4
    assert changed_blocks("".join(f"{o} {n}\n" for o, n in ranges)) == {0, 1, 3, 4}
    with pytest.raises(ValueError):
        parse_thin_delta("<html/>")


def test_a_thin_disk_in_blocks_mode_reads_only_what_thin_delta_names_and_keeps_a_base():
    from dataclasses import replace
    from domubackup.jobs.blocks import blocks_facts, plan_blocks
    facts = [blocks_facts(f.disk, f.lv) for f in web1_facts()]
    facts[1] = replace(facts[1], lv=replace(facts[1].lv, attr="Vwi-aotz--"))  # xvdb thin
    plan = plan_blocks("web1", facts, settings().settings_for("web1"), ("dom0b",), bases={"xvdb": "17"})
    local = [(s.phase, s.argv, s.waits, s.mark) for s in plan.steps if s.host == LOCAL and s.argv]
    assert local[:2] == [
        ("snapshot", ("lvcreate", "--snapshot", "--size", "256M", "--name", "web1-disk-snap", "/dev/vg0/web1-disk"),
         (), ""),
        ("snapshot", ("lvcreate", "--snapshot", "--setactivationskip", "n", "--name", "web1-srv-snap",
                      "/dev/vg0/web1-srv"), (), "snapshots")]
    assert local[2:] == [
        ("delta", ("domubackup", "thin-delta", "vg0/web1-srv.dbkbase", "vg0/web1-srv-snap"), ("snapshots",),
         "delta:xvdb"),
        ("base", ("domubackup", "thin-base", "vg0/web1-srv-snap", "vg0/web1-srv.dbkbase"), ("sent:xvdb:dom0b",), "")]
    blocks = [(s.about, s.waits, s.mark) for s in plan.steps if s.phase == "blocks"]
    assert blocks == [(("xvda",), ("snapshots",), ""), (("xvdb",), ("delta:xvdb",), "sent:xvdb:dom0b")]
    # the snapshot becomes the base: the teardown removes the thick disk's snapshot, not it
    from domubackup.core.plan import teardown_order
    assert [u for h, u in teardown_order(plan.steps) if h == LOCAL and u[0] == "lvremove"] == [
        ("lvremove", "-f", "/dev/vg0/web1-disk-snap")]
    # no usable base: no delta, the base is still made for the next run
    plan = plan_blocks("web1", facts, settings().settings_for("web1"), ("dom0b",))
    assert [s.phase for s in plan.steps if s.host == LOCAL and s.argv][2:] == ["base"]


def test_bwlimit_as_a_rate_and_a_throttled_stream():
    from domubackup.core.config import rate_bytes
    from domubackup.hosts.blockcopy import throttled
    assert [rate_bytes(v) for v in ("", "0", "50M", "1000", "2G", "1.5m", "fast")] == [
        None, None, 50 << 20, 1000 << 10, 2 << 30, 3 << 19, None]
    now, slept = [0.0], []
    out = list(throttled([b"x" * 100] * 3, 100, clock=lambda: now[0], sleep=lambda s: slept.append(s)))
    assert out == [b"x" * 100] * 3 and slept == [1.0, 2.0, 3.0]  # the clock stood still: 1 s per 100 bytes
    assert list(throttled(iter([b"a"]), None)) == [b"a"]
