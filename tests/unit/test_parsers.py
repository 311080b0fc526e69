"""Data-driven tests of domubackup.core.parsers on outputs captured from real tools
(fixtures/tools/, see its README for the commands)."""

from __future__ import annotations

import pathlib
import re

import pytest

from domubackup.core import parsers as P
from domubackup.core import rsyncout as R
from domubackup.core.model import (FstabEntry, LogicalVolume, MountInfo, Partition, PartitionTable,
                              RsyncStats)

TOOLS = pathlib.Path(__file__).resolve().parents[2] / "fixtures" / "tools"


def fx(name: str) -> str:
    return (TOOLS / name).read_text(encoding="utf-8", errors="surrogateescape")


MSDOS_LOGICAL = PartitionTable("msdos", 1073741824, (
    Partition(1, 1048576, 105906175, 104857600, "ext4"),
    Partition(2, 105906176, 1048575999, 942669824, "", "", ("lba", "extended")),
    Partition(5, 106954752, 524287999, 417333248, "xfs"),
    Partition(6, 525336576, 629145599, 103809024, "linux-swap(v1)", "", ("swap",)),
))
GPT_NAMED = PartitionTable("gpt", 268435456, (
    Partition(1, 1048576, 68157439, 67108864, "fat16", "EFI system", ("boot", "esp")),
    Partition(2, 68157440, 267386879, 199229440, "ext4", "rootfs"),
))

# (fixture, human-print fixture or None, expected)
PARTED_CASES = [
    ("parted-msdos-logical.txt", None, MSDOS_LOGICAL),
    ("parted-msdos-logical.txt", "parted-msdos-logical.human.txt", MSDOS_LOGICAL),
    ("parted-msdos-type05.txt", None, PartitionTable("msdos", 67108864, (
        Partition(1, 1048576, 11534335, 10485760),
        Partition(2, 11534336, 32505855, 20971520, flags=("extended",)),
        Partition(5, 12582912, 17825791, 5242880),
    ))),
    # an extended partition with no logical inside: only the human print tells
    ("parted-msdos-extended-empty.txt", None, PartitionTable("msdos", 67108864, (
        Partition(1, 1048576, 11534335, 10485760),
        Partition(2, 11534336, 32505855, 20971520, flags=("lba",)),
    ))),
    ("parted-msdos-extended-empty.txt", "parted-msdos-extended-empty.human.txt",
     PartitionTable("msdos", 67108864, (
         Partition(1, 1048576, 11534335, 10485760),
         Partition(2, 11534336, 32505855, 20971520, flags=("lba", "extended")),
     ))),
    ("parted-gpt-named.txt", None, GPT_NAMED),
    ("parted-gpt-grown.txt", None, PartitionTable("gpt", 314572800, GPT_NAMED.partitions)),
    ("parted-gpt-escaped-name.txt", None, PartitionTable("gpt", 16777216, (
        Partition(1, 1048576, 8388607, 7340032, "", "x\\y:z"),
    ))),
    ("parted-loop-ext4.txt", None, PartitionTable("loop", 134217728, (
        Partition(1, 0, 134217727, 134217728, "ext4"),
    ))),
    ("parted-blank.rc1.txt", None, PartitionTable("unknown", 33554432, ())),
    ("parted-whole-pv.rc1.txt", None, PartitionTable("unknown", 134217728, ())),
]


@pytest.mark.parametrize("name,human,expected", PARTED_CASES,
                         ids=[f"{c[0]}+{c[1] or 'm'}" for c in PARTED_CASES])
def test_parse_parted(name, human, expected):
    types = P.parse_parted_types(fx(human)) if human else None
    assert P.parse_parted(fx(name), types) == expected


def test_parted_extended_property_and_types():
    t = P.parse_parted(fx("parted-msdos-logical.txt"))
    assert [p.number for p in t.partitions if p.is_extended] == [2]
    assert P.parse_parted_types(fx("parted-msdos-logical.human.txt")) == {
        1: "primary", 2: "extended", 5: "logical", 6: "logical"}
    assert P.parse_parted_types(fx("parted-msdos-type05.human.txt")) == {
        1: "primary", 2: "extended", 5: "logical"}


def test_parted_unrecognised_stderr():
    assert P.parted_unrecognised(fx("parted-blank.rc1.stderr.txt"))
    assert P.parted_unrecognised(fx("parted-whole-pv.rc1.stderr.txt"))
    assert not P.parted_unrecognised(fx("parted-gpt-grown.stderr.txt"))


BLKID_CASES = [
    ("blkid-ext4.txt", ("ext4", "3f1b2c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d", "root"), {"USAGE": "filesystem", "BLOCK_SIZE": "1024"}),
    ("blkid-ext4-gpt.txt", ("ext4", "0b0c0d0e-1f20-4122-8324-252627282930", "root fs"), {}),
    ("blkid-whole-ext4.txt", ("ext4", "55555555-6666-4777-8888-999999999999", "whole"), {}),
    ("blkid-xfs.txt", ("xfs", "9a8b7c6d-5e4f-4321-8765-43210fedcba9", "data vol"), {"BLOCK_SIZE": "512"}),
    ("blkid-swap.txt", ("swap", "11111111-2222-4333-8444-555555555555", "swap0"), {"USAGE": "other", "VERSION": "1"}),
    ("blkid-vfat.txt", ("vfat", "1A2B-3C4D", "EFI BOOT"), {"SEC_TYPE": "msdos", "VERSION": "FAT16", "LABEL_FATBOOT": "EFI BOOT"}),
    ("blkid-lvm2-pv.txt", ("LVM2_member", "dWelsA-cLv1-XMTx-oL2m-8wUP-tznc-25GMYV", ""), {"USAGE": "raid", "VERSION": "LVM2 001"}),
    ("blkid-extended.txt", ("", "", ""), {"PTTYPE": "dos"}),
    ("blkid-empty.rc2.txt", ("", "", ""), {}),
    ("blkid-label-special.txt", ("ext4", "b5bc163b-848a-4111-932e-78728f8a36bd", "a'b\"c$d\\é x"), {}),
]


@pytest.mark.parametrize("name,fs,subset", BLKID_CASES, ids=[c[0] for c in BLKID_CASES])
def test_parse_blkid(name, fs, subset):
    probe = P.parse_blkid(fx(name))
    assert P.fs_of(probe) == fs
    assert subset.items() <= probe.items()


def test_blkid_empty_is_empty_dict():
    assert P.parse_blkid(fx("blkid-empty.rc2.txt")) == {}


def test_blkid_escaped_form():
    # without -d, blkid -o export escapes shell characters with "\"; non-ASCII stays M- notation
    assert P.parse_blkid(fx("blkid-xfs-escaped.txt"), escaped=True) == P.parse_blkid(fx("blkid-xfs.txt"))
    assert fx("blkid-xfs-escaped.txt").count("LABEL=data\\ vol") == 1
    special = P.parse_blkid(fx("blkid-label-special-escaped.txt"), escaped=True)
    assert special["LABEL"] == "a'b\"c$d\\M-CM-) x"


LVS_CASES = [
    ("lvs-loop-noactivation.txt", [
        LogicalVolume("vgtest", "root", 33554432, "-wi-XX----", "", None, 79691776, "/dev/vgtest/root"),
        LogicalVolume("vgtest", "swap", 16777216, "-wi-XX----", "", None, 79691776, "/dev/vgtest/swap"),
    ]),
    ("lvs-handmade-snapshot.txt", [
        LogicalVolume("vg0", "db01-disk", 10737418240, "-wi-ao----", "", None, 2147483648, "/dev/vg0/db01-disk"),
        LogicalVolume("vg0", "web01-disk", 21474836480, "owi-aos---", "", None, 2147483648, "/dev/vg0/web01-disk"),
        LogicalVolume("vg0", "web01-disk-domubackup", 4294967296, "swi-a-s---", "web01-disk", 0.52, 2147483648,
                      "/dev/vg0/web01-disk-domubackup"),
        LogicalVolume("vg0", "web01-swap", 1073741824, "-wi-ao----", "", None, 2147483648, "/dev/vg0/web01-swap"),
        LogicalVolume("vg1", "data", 53687091200, "owi-a-s---", "", None, 0, "/dev/vg1/data"),
        LogicalVolume("vg1", "data-old", 1073741824, "swi-I-s---", "data", 100.0, 0, "/dev/vg1/data-old"),
    ]),
]


@pytest.mark.parametrize("name,expected", LVS_CASES, ids=[c[0] for c in LVS_CASES])
def test_parse_lvs(name, expected):
    assert P.parse_lvs(fx(name)) == expected


def test_lvs_properties():
    lvs = {lv.lv: lv for lv in P.parse_lvs(fx("lvs-handmade-snapshot.txt"))}
    assert lvs["web01-disk-domubackup"].is_snapshot and not lvs["web01-disk"].is_snapshot
    assert lvs["db01-disk"].is_open and not lvs["data"].is_open


def test_lvs_padded_aligned_fields():
    text = "  vg0 |root  |1073741824|-wi-ao----|      |     |0.00|/dev/vg0/root\n"
    assert P.parse_lvs(text) == [LogicalVolume("vg0", "root", 1073741824, "-wi-ao----", "", None, 0, "/dev/vg0/root")]


FINDMNT_EXPECTED = [
    MountInfo("/tmp/a b", "my tmp", "tmpfs", ("rw", "relatime", "size=1024k", "mode=755")),
    MountInfo("/tmp/dbfix/back\\slash", "/dev/loop0", "ext4", ("ro", "relatime", "norecovery")),
    MountInfo("/tmp/dbfix/tab\tdir", "/dev/loop1", "xfs",
              ("ro", "relatime", "norecovery", "inode64", "logbufs=8", "logbsize=32k", "noquota")),
    MountInfo("/tmp/dbfix/café", "x", "tmpfs", ("rw", "relatime", "size=1024k")),
]


@pytest.mark.parametrize("name,expected", [
    ("findmnt-rn-escaped.txt", FINDMNT_EXPECTED),
    ("findmnt-json-escaped.json", FINDMNT_EXPECTED),
    ("findmnt-notfound.rc1.txt", []),
])
def test_parse_findmnt(name, expected):
    assert P.parse_findmnt(fx(name)) == expected


def test_findmnt_json_tree_children_flattened():
    text = ('{"filesystems": [{"target": "/", "source": "/dev/vda", "fstype": "ext4", "options": "rw",'
            ' "children": [{"target": "/boot", "source": "/dev/vda1", "fstype": "vfat", "options": "ro"}]}]}')
    assert [m.target for m in P.parse_findmnt(text)] == ["/", "/boot"]


FSTAB_EXPECTED = [
    FstabEntry("UUID=3f1b2c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d", "/", "ext4", ("errors=remount-ro",), 0, 1),
    FstabEntry("PARTUUID=5c1a9e7b-02", "/boot/efi", "vfat", ("umask=0077",), 0, 1),
    FstabEntry("LABEL=data vol", "/srv/data files", "xfs", ("defaults", "noatime"), 0, 2),
    FstabEntry("UUID=11111111-2222-4333-8444-555555555555", "none", "swap", ("sw",), 0, 0),
    FstabEntry("/dev/xvdb1", "swap", "swap", ("defaults",), 0, 0),
    FstabEntry("/dev/mapper/vg0-home", "/home", "ext4", ("defaults", "nodev"), 0, 0),
    FstabEntry("/dev/sr0", "/media/cdrom0", "udf,iso9660", ("user", "noauto"), 0, 0),
    FstabEntry("tmpfs", "/tmp", "tmpfs", ("defaults", "size=512m", "mode=1777"), 0, 0),
    FstabEntry("proc", "/proc", "proc", ("defaults",), 0, 0),
    FstabEntry("//nas/share", "/mnt/nas", "cifs",
               ("credentials=/root/.smbcred", "_netdev", "noauto", "x-systemd.automount"), 0, 0),
    FstabEntry("/dev/vg0/backup", "/var/backups", "ext4", ("noauto", "nofail"), 0, 2),
]


def test_parse_fstab():
    assert P.parse_fstab(fx("fstab-guest-debian.txt")) == FSTAB_EXPECTED


def test_fstab_agrees_with_libmount():
    # fstab-guest-debian.findmnt.txt is libmount's own parse (findmnt -s -F ... -r)
    lines = fx("fstab-guest-debian.findmnt.txt").splitlines()[1:]
    unx = lambda s: re.sub(r"\\x([0-9a-f]{2})", lambda m: chr(int(m.group(1), 16)), s)  # noqa: E731
    theirs = []
    for line in lines:
        spec, file, vfstype, opts, freq, passno = map(unx, line.split(" "))
        theirs.append(FstabEntry(spec, file, vfstype, tuple(opts.split(",")) if opts else (),
                                 int(freq), int(passno)))
    assert P.parse_fstab(fx("fstab-guest-debian.txt")) == theirs


@pytest.mark.parametrize("line,expected", [
    ("/dev/a /x\\011y\\134z ext4", FstabEntry("/dev/a", "/x\ty\\z", "ext4")),
    ("/dev/a /x ext4 defaults 0 2 7 # trailing", FstabEntry("/dev/a", "/x", "ext4", ("defaults",), 0, 2)),
    ("  # indented comment\n\n\t\n", None),
    ("LABEL=caf\\303\\251 /c ext4 ro 1", FstabEntry("LABEL=café", "/c", "ext4", ("ro",), 1, 0)),
])
def test_fstab_lines(line, expected):
    assert P.parse_fstab(line) == ([expected] if expected else [])


RSYNC_STATS_CASES = [
    ("rsync-stats-dryrun.txt", RsyncStats(15, 3, 1503060, 3038, 415, 61, 2)),
    ("rsync-stats-no-h.txt", RsyncStats(15, 3, 1503060, 3038, 3577, 113, 2)),
    ("rsync-stats-delete.txt", RsyncStats(1205, 1, 2010908, 15, 22970, 79, 2)),
    ("rsync-itemize-stats-first.txt", RsyncStats(1207, 1203, 2010915, 2010897, 2086076, 22906, 0)),
]


@pytest.mark.parametrize("name,expected", RSYNC_STATS_CASES, ids=[c[0] for c in RSYNC_STATS_CASES])
def test_parse_rsync_stats(name, expected):
    assert R.parse_rsync_stats(fx(name)) == expected


def test_rsync_stats_old_format():
    text = ("Number of files: 12\nNumber of files transferred: 3\nTotal file size: 100 bytes\n"
            "Total transferred file size: 10 bytes\nTotal bytes sent: 50\nTotal bytes received: 5\n")
    assert R.parse_rsync_stats(text) == RsyncStats(12, 3, 100, 10, 50, 5, 0)


def test_parse_rsync_itemize_delete_dryrun():
    assert R.parse_rsync_itemize(fx("rsync-itemize-delete-dryrun.txt")) == [
        ("*deleting", "old/file"),
        ("*deleting", "old/"),
        (">fcst......", "etc/passwd"),
        ("cd+++++++++", "srv/"),
        ("cd+++++++++", "srv/www/"),
        (">f+++++++++", "srv/www/app.bin"),
        (">f+++++++++", "srv/www/index.html"),
    ]


def test_parse_rsync_itemize_first_sync_with_stats():
    items = R.parse_rsync_itemize(fx("rsync-itemize-stats-first.txt"))
    assert len(items) == 1207  # 1207 itemize lines; the --stats block is not parsed as items
    assert items[:6] == [
        (".d..t......", "./"),
        (">f+++++++++", "café.txt"),  # \#303\#251
        (">f+++++++++", "new\nline"),  # \#012
        ("cL+++++++++", "sym -> link"),  # " -> data/f1.txt" cut
        ("cd+++++++++", "data/"),
        (">f+++++++++", "data/blob.bin"),
    ]
    assert items[-1] == ("hf+++++++++", "hardlink")  # " => data/f2.txt" cut
    assert R.parse_rsync_itemize("cL+++++++++ a -> b", link_targets=False) == [("cL+++++++++", "a -> b")]


def test_parse_rsync_itemize_clean_and_verbose():
    assert R.parse_rsync_itemize(fx("rsync-itemize-verify-clean.txt")) == []
    text = "sending incremental file list\n.f          same\n\nsent 10 bytes  received 5 bytes\n"
    assert R.parse_rsync_itemize(text) == [(".f         ", "same")]


def test_argv_builders():
    assert P.lvs_argv() == ["lvs", "--noheadings", "--nosuffix", "--units", "b", "--separator", "|",
                            "-o", "vg_name,lv_name,lv_size,lv_attr,origin,snap_percent,vg_free,lv_path,lv_tags"]
    assert P.lvs_argv("vg0/web01-disk")[-1] == "vg0/web01-disk"
    assert P.parted_argv("/dev/vg0/x") == ["parted", "-s", "-m", "/dev/vg0/x", "unit", "B", "print"]
    assert P.parted_human_argv("/dev/x") == ["parted", "-s", "/dev/x", "unit", "B", "print"]
    assert P.blkid_argv("/dev/vg0/x", 1048576, 104857600) == [
        "blkid", "-p", "-d", "-o", "export", "-O", "1048576", "-S", "104857600", "/dev/vg0/x"]
    assert P.blkid_argv("/dev/x") == ["blkid", "-p", "-d", "-o", "export", "/dev/x"]
    assert P.findmnt_argv() == ["findmnt", "-rn", "-o", "TARGET,SOURCE,FSTYPE,OPTIONS"]
    assert P.findmnt_argv(json_output=True) == ["findmnt", "-J", "-l", "-o", "TARGET,SOURCE,FSTYPE,OPTIONS"]


MALFORMED = [
    (P.parse_lvs, "  vg0|root|123|-wi-a-----\n", "vg0|root|123|-wi-a-----"),
    (P.parse_lvs, "  vg0|root|12G|-wi-a-----||||/dev/vg0/root\n", "12G"),
    (P.parse_lvs, "  vg0|s|1|swi-a-s---|root|abc|0|/dev/vg0/s\n", "abc"),
    (P.parse_lvs, "  WARNING: something\n", "WARNING: something"),
    (P.parse_parted, "", "empty"),
    (P.parse_parted, "CHS;\n/dev/x:1:file:512:512:msdos::;\n", "CHS;"),
    (P.parse_parted, "BYT;\n/dev/x:100B:file:512:512:msdos::;\n1:0B:99B;\n", "1:0B:99B;"),
    (P.parse_parted, "BYT;\n/dev/x:100B:file:512:512:msdos::;\n1:0s:99s:100s:::;\n", "1:0s:99s:100s:::;"),
    (P.parse_parted, "BYT;\n/dev/x:100B:file:512:512:msdos::\n", "/dev/x:100B:file:512:512:msdos::"),
    (P.parse_blkid, "TYPE=ext4\ngarbage\n", "garbage"),
    (P.parse_blkid, "TYPE=ext4\nTYPE=xfs\n", "TYPE=xfs"),
    (P.parse_fstab, "# ok\n/dev/a /x\n", "/dev/a /x"),
    (P.parse_fstab, "/dev/a /x ext4 defaults zero 2\n", "zero"),
    (P.parse_fstab, "LABEL=r / ext4 defaults\0 0 1\n", "NUL byte"),
    (P.parse_fstab, "/dev/a /" + "x" * 9000 + " ext4\n", f"longer than {P.FSTAB_LINE_MAX} characters"),
    (P.parse_kpartx_list, "vg0-ap1 : 0 2048 /dev/vg0/a 2048\nvg0-ap2 : zero\n", "vg0-ap2 : zero"),
    (P.parse_findmnt, "/a /dev/x ext4\n", "/a /dev/x ext4"),
    (P.parse_findmnt, "/a b /dev/x ext4 rw\n", "/a b /dev/x ext4 rw"),
    (P.parse_findmnt, '{"filesystems": [{"target": "/"}]}', '"target": "/"'),
    (R.parse_rsync_stats, fx("rsync-stats-human.txt"), "Total file size: 2.01M bytes"),
    (R.parse_rsync_stats, "hello\n", "hello"),
    (R.parse_rsync_itemize, ">f+++++++++ ok\nrsync: error in something\n", "rsync: error in something"),
]


@pytest.mark.parametrize("parser,text,fragment", MALFORMED,
                         ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(MALFORMED)])
def test_malformed_raises_with_line(parser, text, fragment):
    with pytest.raises(ValueError) as exc:
        parser(text)
    assert fragment in str(exc.value)


def test_dm_snapshot_status_from_the_lab():
    s = P.parse_dm_snapshot_status((TOOLS / "dmsetup-status-snapshot.txt").read_text())
    ok, bad = s["vg0-fx--snap"], s["vg0-web1--disk--snap"]
    assert (ok.used, ok.total, ok.state) == (6184, 131072, "valid")
    assert round(ok.percent, 2) == 4.72  # what lvs said of the same snapshot
    assert (bad.state, bad.percent) == ("invalid", 100.0)
    assert P.parse_dm_snapshot_status("") == {} == P.parse_dm_snapshot_status("No devices found\n")
    assert P.dm_snapshot_status_argv() == ["dmsetup", "status", "--target", "snapshot"]


@pytest.mark.parametrize("line", ["vg0-x: 0 8 linear", "no colon here", "vg0-x: 0 8 snapshot"])
def test_dm_snapshot_status_malformed(line):
    with pytest.raises(ValueError, match="malformed dmsetup status line"):
        P.parse_dm_snapshot_status(line)


@pytest.mark.parametrize("path,vg", [
    ("/dev/vg0/web1-disk", "vg0"), ("/dev/mapper/vg0-web1--disk", "vg0"),
    ("/dev/mapper/my--vg-lv", "my-vg"), ("/dev/disk/by-id/dm-name-x", None), ("/dev/sda", None),
    ("/dev/mapper/nohyphen", None), ("/srv/img.qcow2", None)])
def test_vg_of_path(path, vg):
    from domubackup.hosts.facts import vg_of_path
    assert vg_of_path(path) == vg


def test_find_lv_by_any_path_form():
    from domubackup.hosts.facts import find_lv
    lvs = P.parse_lvs("  my-vg|web1-disk|1024|-wi-ao----|||0|/dev/my-vg/web1-disk\n")
    for path in ("/dev/my-vg/web1-disk", "/dev/mapper/my--vg-web1--disk"):
        assert find_lv(lvs, path).lv == "web1-disk"
    assert find_lv(lvs, "/dev/my-vg/web1") is None and find_lv(None, "/dev/my-vg/web1-disk") is None


def test_parse_kpartx_list():
    # captured in the lab (kpartx 0.9.4): logical partitions are relative to their extended one
    text = ("vg0-web1--diskp1 : 0 819200 /dev/vg0/web1-disk 2048\n"
            "vg0-web1--diskp2 : 0 2 /dev/vg0/web1-disk 821248\n"
            "vg0-web1--diskp5 : 0 1327104 /dev/dm-1 2048\n"
            "vg0-web1--diskp6 : 0 305152 /dev/dm-1 1331200\n")
    assert P.parse_kpartx_list(text) == [("vg0-web1--diskp1", 819200, "/dev/vg0/web1-disk", 2048),
                                         ("vg0-web1--diskp2", 2, "/dev/vg0/web1-disk", 821248),
                                         ("vg0-web1--diskp5", 1327104, "/dev/dm-1", 2048),
                                         ("vg0-web1--diskp6", 305152, "/dev/dm-1", 1331200)]
    assert P.parse_kpartx_list("") == []


def test_parse_partx():
    # captured with util-linux 2.38 partx -g -r -o NR,UUID,NAME on a gpt and an msdos image
    gpt = "1 ecb87f34-813c-4460-9107-86582567d1ac my\\x20root\n2 d6293a1e-7997-47f2-902d-911691aff6fe x:y\\x5cz\n"
    assert P.parse_partx(gpt) == {1: ("ecb87f34-813c-4460-9107-86582567d1ac", "my root"),
                                  2: ("d6293a1e-7997-47f2-902d-911691aff6fe", "x:y\\z")}
    assert P.parse_partx("1 627c3b53-01 \n5 627c3b53-05 \n") == {1: ("627c3b53-01", ""), 5: ("627c3b53-05", "")}
    with pytest.raises(ValueError, match="expected NR UUID NAME"):
        P.parse_partx("1 a b c\n")


def test_parse_mount_space_reads_each_item_by_its_exact_path():
    from domubackup.core.model import Space
    from domubackup.core.parsers import parse_mount_space
    # a mount point with a newline and a fake "space" line in its name is read as one path
    odd = "/srv\nspace 1 1 1 1 1"
    text = f"space 100 40 60 10 4\nmounted /\nspace 50 5 45 0 0\nmounted {odd}\nmounted /var\n"
    assert parse_mount_space(text, ["/", odd, "/var"]) == [Space(100, 40, 60, 10, 4), Space(50, 5, 45), None]
    assert parse_mount_space("space 100 40 60 10 4\nmounted /\n", ["/", "/var"]) == [Space(100, 40, 60, 10, 4)]
    assert parse_mount_space("", ["/"]) == []  # a helper that told nothing
    for bad in ("space 1 2 x 4 5\nmounted /\n", "space 1 2 3 4 5\nmounted /other\n", "garbage\n"):
        with pytest.raises(ValueError, match="malformed mount-in output"):
            parse_mount_space(bad, ["/"])
