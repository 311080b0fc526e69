"""`domubackup serve`'s judge: every request the tool's own builders make for a granted DomU
is served; what a compromised client would try is refused, with the reason."""

import shlex

import pytest

from domubackup.core import commands as cmd, parsers, points as pts
from domubackup.core.serve import Grant, Judge, Refused, dm_lv, parse_request
from domubackup.hosts.ssh import SSHRunner

T = "/mnt/domubackup/target"
LVS = {("vg0", "web1-disk"): {"dbk:domu:web1"},
       ("vg0", "web1-disk.20261202T031500Z"): {"dbk:point", "dbk:domu:web1", "dbk:state:good"},
       ("vg0", "web1-disk.20261203T031500Z"): {"dbk:point", "dbk:domu:web1", "dbk:state:pending"},
       ("vg0", "db1-disk"): {"dbk:domu:db1"},  # dom0c's DomU, backed up here too
       ("vg0", "own-disk"): set()}  # this host's own guest
MAPPER = {"/dev/mapper/vg0-web1--diskp1": ("vg0", "web1-disk"), "/dev/mapper/vg0-db1--diskp1": ("vg0", "db1-disk")}


XML = {"/var/lib/domubackup/points/web1/20261202T031500Z.xml"}  # the domain XML of the good point


def judge(prune=False):
    grant = Grant("dom0a", ["web1"], prune, T, "p", "qemu:///system", "/var/lib/domubackup")
    return Judge(grant, lambda vg, lv: LVS.get((vg, lv)), MAPPER.get, XML.__contains__)


def line(argv, no_input=True):
    """What the client's runner sends for ARGV (hosts/ssh.py remote_command)."""
    runner = SSHRunner("dom0b", known_hosts="/dev/null")
    return runner.remote_command(argv, {"LC_ALL": "C", "PATH": "/tmp/evil"}, 600, no_input=no_input)


def serve(argv, **kw):
    req = parse_request(line(argv))
    assert req.argv == tuple(argv) and req.timeout == ("5", "600")
    judge(**kw).judge(req)


SERVED = [
    ["true"],
    ["which", "lvs", "rsync", "timeout"],
    cmd.history_json(),
    cmd.virsh_domstate("qemu:///system", "web1"),
    parsers.lvs_argv("/dev/vg0/web1-disk", "/dev/vg0/web1-srv"),
    pts.lvs_of("web1"),
    ["vgs", "--noheadings", "--nosuffix", "--units", "b", "-o", "vg_free", "vg0"],
    parsers.blkid_argv("/dev/mapper/vg0-web1--diskp1"),
    ["blkid", "-p", "-o", "export", "/dev/vg0/web1-disk"],
    parsers.parted_argv("/dev/vg0/web1-disk"),
    parsers.parted_human_argv("/dev/vg0/web1-disk"),
    cmd.kpartx_add("/dev/vg0/web1-disk", "p"),
    cmd.kpartx_delete("/dev/vg0/web1-disk", "p"),
    cmd.mkdir(f"{T}/web1"), cmd.rmdir(f"{T}/.web1.unplaced/xvda2"),
    cmd.mkdir(f"{T}/web1/xvda"), cmd.rmdir(f"{T}/web1/xvdb1"),  # a layout without fstab: /<disk><partition>
    cmd.mount_in(f"{T}/web1", "/", "/dev/mapper/vg0-web1--diskp1", "ext4",
                 ("rw", "nodev", "nosuid", "noexec", "nosymfollow"), mkdir=True),
    cmd.umount_in(f"{T}/web1", "/", "/dev/mapper/vg0-web1--diskp1"),
    cmd.umount(f"{T}/web1/srv"),
    cmd.block_digests("/dev/vg0/web1-disk", 4 << 20, None),
    cmd.receive_blocks("/dev/vg0/web1-disk", 4 << 20),
    cmd.send_blocks("/dev/vg0/web1-disk.20261202T031500Z", 4 << 20),
    cmd.fsck_readonly("ext4", "/dev/mapper/vg0-web1--diskp1"),
    cmd.lvextend("vg0", "web1-disk", "8192k"),
    pts.mark_writing("web1", "dom0b", [("vg0", "web1-disk")]).argv,
    pts.unmark_writing("dom0b", [("vg0", "web1-disk")]).argv,
    ["lvcreate", "--yes", "--size", "1048576b", "--name", "web1-new", "--addtag", "dbk:domu:web1", "vg0"],
    pts.keep_xml("dom0b", "/var/lib/domubackup/points/web1", "20261204T031500Z").argv,
    ["lvremove", "-f", "/dev/vg0/web1-disk.20261203T031500Z"],  # the undo of a point it began
]


@pytest.mark.parametrize("argv", SERVED, ids=lambda a: " ".join(a[:3]))
def test_what_the_tool_sends_for_a_granted_domu_is_served(argv):
    serve(argv)


def test_a_new_point_and_its_commit_are_served():
    lv = pts.LV(vg="vg0", name="web1-disk", origin="", pool="", attr="-wi-a-----", size=4 << 20, percent=None,
                tags=frozenset({"dbk:domu:web1"}), vg_free=1 << 30)
    steps = pts.point_steps("web1", "dom0b", [lv], "20261204T031500Z", disks=["xvda"], size="20%ORIGIN",
                            consistency="none")
    LVS[("vg0", "web1-disk.20261204T031500Z")] = None
    for step in steps:
        if step.phase == "point-commit":  # by then it exists, pending
            LVS[("vg0", "web1-disk.20261204T031500Z")] = {"dbk:point", "dbk:domu:web1", "dbk:state:pending"}
        serve(step.argv)
    del LVS[("vg0", "web1-disk.20261204T031500Z")]


def test_rsyncs_receiving_end_into_the_domus_tree():
    j = judge()
    j.judge(parse_request(f"rsync --server -logDtpAXrSe.iLsfxCIvu --delete --numeric-ids --timeout=300 . {T}/web1/"))
    j.judge(parse_request(f"rsync --server -logDtpre.iLsfxCIvu --delete . {T}/.web1.unplaced/"))
    # verify's itemized dry run: the client asks for the server's part of --out-format
    j.judge(parse_request(f"rsync --server -nlogDtpre.iLsfxCIvu --log-format=%i --delete . {T}/web1/"))


REFUSED = [
    (None, "an interactive session"),
    ("", "an interactive session"),
    ("id", "not a request of domubackup"),
    ("sh -c 'rm -rf /'", "not a request of domubackup"),
    (line(["id"]), "`id` is not a command this host serves"),
    (line(["sh", "-c", "id"]), "`sh -c id` is not a command"),
    (line(["bash"]), "is not a command"),
    (line(["lvremove", "-f", "/dev/vg0/web1-disk.20261202T031500Z"]),
     "dom0a may not remove restore point member /dev/vg0/web1-disk.20261202T031500Z: restore points on this "
     "host are append-only"),
    (line(["lvremove", "-f", "/dev/vg0/web1-disk"]), "is not a restore point member"),
    (line(["lvchange", "--deltag", "dbk:point", "/dev/vg0/web1-disk.20261202T031500Z"]), "not a form"),
    (line(["lvchange", "--deltag", "dbk:state:good", "/dev/vg0/web1-disk.20261202T031500Z"]), "not a form"),
    (line(["lvchange", "--addtag", "dbk:state:pruning", "/dev/vg0/web1-disk.20261202T031500Z"]), "append-only"),
    (line(["lvchange", "--activate", "y", "/dev/vg0/web1-disk.20261202T031500Z"]), "not a form"),
    (line(pts.mark_writing("web1", "dom0b", [("vg0", "own-disk")]).argv), "vg0/own-disk is not the replica of a DomU"),
    (line(pts.mark_writing("db1", "dom0b", [("vg0", "db1-disk")]).argv),
     "vg0/db1-disk belongs to DomU db1, which this host's [serve] clients does not grant to dom0a"),
    (line(cmd.receive_blocks("/dev/vg0/db1-disk", 4 << 20)), "belongs to DomU db1"),
    (line(cmd.receive_blocks("/dev/vg0/own-disk", 4 << 20)), "not the replica of a DomU"),
    (line(cmd.receive_blocks("/dev/vg0/web1-disk.20261202T031500Z", 4 << 20)), "is a restore point member"),
    (line(cmd.receive_blocks("/dev/sda", 4 << 20)), "'/dev/sda' is not a logical volume of a DomU here"),
    (line(cmd.receive_blocks("/dev/vg0/../sda", 4 << 20)), "is not a logical volume"),
    (line(cmd.send_blocks("/dev/vg0/db1-disk", 4 << 20)), "belongs to DomU db1"),
    (line(["rm", "-rf", "--", f"{T}/web1"]), "not a form"),
    (line(["rm", "-f", "--", "/var/lib/domubackup/points/web1/20261202T031500Z.xml"]), "append-only"),
    (line(cmd.mkdir("/etc/cron.d")), "'/etc/cron.d' is not under this host's target prefix"),
    (line(cmd.mkdir(f"{T}/web1/../../../etc")), "is not under this host's target prefix"),
    (line(cmd.mkdir(f"{T}/db1")), "is not the tree of a DomU granted to dom0a"),
    (line(cmd.mkdir(f"{T}/web1/etc/cron.d")), "is not the tree of a DomU granted to dom0a"),
    (line(cmd.rmdir(f"{T}/web1/srv/www")), "is not the tree of a DomU granted to dom0a"),
    (line(cmd.mount_in("/etc", "/", "/dev/mapper/vg0-web1--diskp1", "ext4", ("rw", "nodev", "nosuid", "noexec"))),
     "'/etc' is not under this host's target prefix"),
    (line(cmd.mount_in(f"{T}/web1", "/", "/dev/mapper/vg0-db1--diskp1", "ext4", ("rw", "nodev", "nosuid", "noexec"))),
     "belongs to DomU db1"),
    (line(cmd.mount_in(f"{T}/web1", "/", "/dev/mapper/vg0-web1--diskp1", "ext4", ("rw",))), "not a form"),
    (line(cmd.mount("/dev/mapper/vg0-web1--diskp1", "/root", "ext4", ("rw",))), "`mount -t ext4"),
    (line(cmd.virsh_domstate("qemu+ssh://evil/system", "web1")), "not a form"),
    (line(cmd.virsh_domstate("qemu:///system", "db1")), "DomU 'db1' is not granted to dom0a"),
    (line(pts.lvs_of("db1")), "DomU 'db1' is not granted"),
    (line(["lvs", "--config", "global{}", "vg0"]), "not a form"),
    (line(["lvcreate", "--yes", "--size", "1b", "--name", "web1-disk", "--addtag", "dbk:domu:web1", "vg0"]),
     "vg0/web1-disk exists already"),
    (line(["lvcreate", "--yes", "--size", "1b", "--name", "x", "--addtag", "dbk:domu:db1", "vg0"]), "not granted"),
    (line(["lvcreate", "--snapshot", "--name", "web1-disk.20261202T031500Z", "--addtag", "dbk:point", "--addtag",
           "dbk:domu:web1", "--addtag", "dbk:state:pending", "/dev/vg0/web1-disk"]),
     "exists already: a restore point is never overwritten"),
    (line(["lvcreate", "--snapshot", "--name", "web1-disk.20261205T031500Z", "--addtag", "dbk:point", "--addtag",
           "dbk:domu:web1", "--addtag", "dbk:state:good", "--addtag", "dbk:state:pending", "/dev/vg0/web1-disk"]),
     "not a form"),
    (line(["install", "-D", "-m", "0600", "/dev/stdin", "/root/.ssh/authorized_keys"]), "not a form"),
    (line(["install", "-D", "-m", "0600", "/dev/stdin", "/var/lib/domubackup/points/web1/20261202T031500Z.xml"]),
     "exists already: a restore point is never overwritten"),
    (line(["kpartx", "-a", "-s", "-p", "p", "/dev/vg0/own-disk"]), "not the replica of a DomU"),
    (line(["timeout", "1", "id"]), "`timeout 1 id` is not a command"),
    ("rsync --server --sender -logDtpre.iLsf . /etc/", "only rsync's receiving end"),
    (f"rsync --server -logDtpre.iLsf . {T}/db1/", "is not the tree of a DomU granted to dom0a"),
    (f"rsync --server -logDtpre.iLsf --log-format=%f . {T}/web1/", "rsync option --log-format is not served"),
    ("rsync --server -logDtpre.iLsf . /root/", "is not under this host's target prefix"),
    (f"rsync --server -logDtpre.iLsf --temp-dir=/etc . {T}/web1/", "rsync option --temp-dir is not served"),
    (f"rsync --server -logDtpre.iLsf --log-file=/etc/passwd . {T}/web1/", "rsync option --log-file"),
    (f"rsync --server -logDtpre.iLsf -T /etc . {T}/web1/", "rsync argument '-T' is not served"),
    (f"rsync --server -logDtpKre.iLsf . {T}/web1/", "rsync argument '-logDtpKre.iLsf' is not served"),
    (f"X=1 rsync --server -logDtpre.iLsf . {T}/web1/", "not a request of domubackup"),
    (f"rsync --server -logDtpre.iLsf . {T}/web1/ </dev/null", "not a request of domubackup"),
    ("timeout -k 5 600 true; id", "`'true;' id` is not a command"),
    ("timeout -k 5 600 'unbalanced", "not a request: No closing quotation"),
]


@pytest.mark.parametrize("request_line, why", REFUSED, ids=lambda v: str(v)[:40])
def test_what_a_compromised_client_tries_is_refused(request_line, why):
    with pytest.raises(Refused) as e:
        judge().judge(parse_request(request_line))
    assert why in str(e.value), str(e.value)


def test_a_client_allowed_to_prune_may_prune():
    j = judge(prune=True)
    for argv in (["lvremove", "-f", "/dev/vg0/web1-disk.20261202T031500Z"],
                 ["lvchange", "--addtag", "dbk:state:pruning", "/dev/vg0/web1-disk.20261202T031500Z"],
                 ["rm", "-f", "--", "/var/lib/domubackup/points/web1/20261202T031500Z.xml"]):
        j.judge(parse_request(line(argv)))
    with pytest.raises(Refused, match="belongs to DomU db1"):
        j.judge(parse_request(line(["lvremove", "-f", "/dev/vg0/db1-disk"])))


def test_the_clients_environment_is_dropped_and_no_input_is_kept():
    req = parse_request(line(["true"]))
    assert req.no_input and req.argv == ("true",)
    req = parse_request(line(cmd.receive_blocks("/dev/vg0/web1-disk", 1), no_input=False))
    assert not req.no_input
    # a word that looks like the redirection is quoted by the client: an argument, not a redirection
    req = parse_request(line(["true", "</dev/null"], no_input=False))
    assert req.argv == ("true", "</dev/null") and not req.no_input
    assert shlex.split(line(["true"]))[0] == "LC_ALL=C"


def test_dm_names():
    assert dm_lv("vg0-web1--disk") == ("vg0", "web1-disk")
    assert dm_lv("my--vg-lv") == ("my-vg", "lv")
    assert dm_lv("nodash") is None and dm_lv("vg0-a/b") is None


def test_mkdir_and_rmdir_right_in_a_tree_follow_no_symlink_a_guest_left_there(tmp_path):
    """What makes `mkdir -p -- TREE/x` and `rmdir -- TREE/x` safe to serve (Judge.tree child;
    both shapes are in SERVED): with x a symlink a guest made (dangling, or to a directory of the host), nothing is made or
    removed outside the tree."""
    import subprocess
    tree, outside = tmp_path / "web1", tmp_path / "host"
    tree.mkdir()
    (outside / "keep").mkdir(parents=True)
    (tree / "xvda").symlink_to(outside / "new")   # dangling: mkdir must not create host/new
    (tree / "xvdb1").symlink_to(outside / "keep")  # to a host directory: rmdir must not remove it
    for argv in (cmd.mkdir(str(tree / "xvda")), cmd.rmdir(str(tree / "xvdb1"))):
        assert subprocess.run(argv, capture_output=True).returncode != 0
    assert sorted(p.name for p in outside.iterdir()) == ["keep"]
    assert (tree / "xvda").is_symlink() and (tree / "xvdb1").is_symlink()


def test_a_session_reads_the_tags_again_after_any_request_that_may_change_them(tmp_path):
    """A session judges a request with the tags it read after the last request that could
    change them: a served lvchange that exited 0 changes its LVs' tags in the session's copy
    (no lvs), a failed one makes it read them again, and an LV whose tag went away is then not
    served. The config is parsed again when the file changed: a DomU taken out of the grant is
    refused at the next request."""
    import os

    from domubackup.hosts import serve

    config = tmp_path / "domubackup.toml"
    grant = f'target_prefix = "{T}"\nlibvirt_uri = "test:///default"\n[serve]\nclients = {{ dom0a = ["web1"] }}\n'
    config.write_text(grant)
    now, reads, ran = {("vg0", "web1-disk"): {"dbk:domu:web1"}}, [], []
    codes = iter([0, 0, 0, 0, 5, 0])
    state = line(["virsh", "-c", "test:///default", "domstate", "--domain", "web1"])

    def tags():
        reads.append({k: set(v) for k, v in now.items()})
        return lambda vg, lv, seen=reads[-1]: seen.get((vg, lv))

    one = serve.judged("dom0a", str(config), tags,
                       run=lambda req, data, env: ran.append(req.argv) or (next(codes), b"", b""))
    probe = line(["blkid", "-p", "-d", "-o", "export", "/dev/vg0/web1-disk"])
    writing = ["lvchange", "--addtag", "dbk:writing", "--addtag", "dbk:domu:web1", "/dev/vg0/web1-disk"]
    assert [one(probe, None)[0] for _ in range(3)] == [0, 0, 0]
    assert len(reads) == 1  # blkid changes no tag: read once for the session
    assert one(line(writing), None)[0] == 0
    assert len(reads) == 1  # the lvchange's own change, made in the session's copy
    now[("vg0", "web1-disk")] = set()  # the admin takes the tag away: unseen until the next read
    assert one(line(["lvchange", "--deltag", "dbk:writing", "/dev/vg0/web1-disk"]), None)[0] == 5
    assert len(reads) == 2  # a failed lvchange: read again
    code, out, err = one(probe, None)
    assert code == 77 and b"is not the replica of a DomU" in err, err
    assert len(ran) == 5 and ran[3] == tuple(writing)
    now[("vg0", "web1-disk")] = {"dbk:domu:web1"}
    assert one(line(["lvchange", "--deltag", "dbk:writing", "/dev/vg0/web1-disk"]), None)[0] == 77  # still the read
    assert one(line(["kpartx", "-d", "-p", "p", "/dev/vg0/web1-disk"]), None)[0] == 77
    assert one(state, None)[0] == 0
    config.write_text(grant.replace('"web1"', '"web2"'))
    os.utime(config, ns=(1, 1))  # the same size: parsed again for its other times
    assert b"DomU 'web1' is not granted to dom0a" in one(state, None)[2]
