"""`domubackup plan` and `run --dry-run` against libvirt's test driver, probes replayed from
captured outputs of parted and blkid (fixtures/tools)."""

import json
import os

import pytest

from domubackup import cli
from domubackup.core import parsers
from replay import ReplayRunner

MiB = 1024 * 1024


def tool(fixtures, name):
    return (fixtures / "tools" / name).read_text()


def lvs_line(vg, lv, size, attr="-wi-ao----", origin="", pct="", free=2 * 1024 * MiB):
    return f"  {vg}|{lv}|{size}|{attr}|{origin}|{pct}|{free}|/dev/{vg}/{lv}\n"


def web1_probes(fixtures):
    disk, srv = "/dev/vg0/web1-disk", "/dev/vg0/web1-srv"
    table = {
        # inspection lists the VG once; per-path lvs is the fallback for paths that name no VG
        tuple(parsers.lvs_argv("vg0")): (0, lvs_line("vg0", "web1-disk", 1024 * MiB)
                                         + lvs_line("vg0", "web1-srv", 128 * MiB), ""),
        tuple(parsers.lvs_argv(disk)): (0, lvs_line("vg0", "web1-disk", 1024 * MiB), ""),
        tuple(parsers.lvs_argv(srv)): (0, lvs_line("vg0", "web1-srv", 128 * MiB), ""),
        tuple(parsers.parted_argv(disk)): (0, tool(fixtures, "parted-msdos-logical.txt"), ""),
        tuple(parsers.parted_argv(srv)): (0, tool(fixtures, "parted-loop-ext4.txt"), ""),
        tuple(parsers.blkid_argv(disk, 1048576, 104857600)): (0, tool(fixtures, "blkid-ext4.txt"), ""),
        tuple(parsers.blkid_argv(disk, 106954752, 417333248)): (0, tool(fixtures, "blkid-xfs.txt"), ""),
        tuple(parsers.blkid_argv(disk, 525336576, 103809024)): (0, tool(fixtures, "blkid-swap.txt"), ""),
        tuple(parsers.blkid_argv(srv)): (0, tool(fixtures, "blkid-whole-ext4.txt"), ""),
    }
    return table


@pytest.fixture
def conf(tmp_path, fixtures):
    def make(extra="", uri=None):
        uri = uri or f"test://{fixtures}/libvirt/node.xml"
        p = tmp_path / "db.toml"
        p.write_text(f'dom0s = ["dom0a", "dom0b"]\nthis_host = "dom0a"\nlibvirt_uri = "{uri}"\n'
                     f'state_dir = "{tmp_path}/state"\nsnapshot_size = "256M"\n' + extra)
        return str(p)
    return make


def run(argv, runner, capsys):
    code = cli.main(argv, local_runner=runner)
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_json_of_xen_pv_domu_with_two_lv_disks(conf, fixtures, capsys):
    runner = ReplayRunner(web1_probes(fixtures))
    cfg = conf('[domu.web1]\nmounts = { xvda1 = "/", xvda5 = "/var", xvdb = "/srv" }\n')
    code, out, err = run(["-c", cfg, "plan", "web1", "--json"], runner, capsys)
    assert (code, err) == (0, "")
    steps = json.loads(out)
    checks = [(s["host"], s["check"], s.get("waits", []), s.get("mark", "")) for s in steps if "check" in s]
    assert checks == [("local", ["vg-space"], [], ""), ("local", ["no-stale"], [], "checked"),
                      ("local", ["snapshot", "xvda"], [], ""), ("local", ["snapshot", "xvdb"], [], ""),
                      ("dom0b", ["peer-state"], [], ""), ("dom0b", ["replicas"], ["checked"], ""),
                      ("local", ["room"], ["ready:dom0b"], "")]
    steps = [s for s in steps if "check" not in s]
    assert [(s["phase"], s["host"], s["argv"][0], s["argv"][-1] if s["argv"][0] != "domubackup"
             else os.path.join(s["argv"][-5], s["argv"][-4].lstrip("/")).rstrip("/")) for s in steps] == [
        ("snapshot", "local", "lvcreate", "/dev/vg0/web1-disk"),
        ("snapshot", "local", "lvcreate", "/dev/vg0/web1-srv"),
        ("map", "local", "kpartx", "/dev/vg0/web1-disk-snap"),
        ("mount", "local", "mkdir", "/mnt/domubackup/source/web1"),
        ("mount", "local", "domubackup", "/mnt/domubackup/source/web1"),
        ("mount", "local", "domubackup", "/mnt/domubackup/source/web1/srv"),
        ("mount", "local", "domubackup", "/mnt/domubackup/source/web1/var"),
        ("peer-mark", "dom0b", "lvchange", "/dev/vg0/web1-srv"),
        ("peer-map", "dom0b", "kpartx", "/dev/vg0/web1-disk"),
        ("peer-mount", "dom0b", "mkdir", "/mnt/domubackup/target/web1"),
        ("peer-mount", "dom0b", "domubackup", "/mnt/domubackup/target/web1"),
        ("peer-mount", "dom0b", "domubackup", "/mnt/domubackup/target/web1/srv"),
        ("peer-mount", "dom0b", "domubackup", "/mnt/domubackup/target/web1/var"),
        ("transfer", "local", "rsync", "dom0b:/mnt/domubackup/target/web1/"),
        ("complete", "dom0b", "lvchange", "/dev/vg0/web1-srv"),  # after teardown, once OK: the mark cleared
    ]
    assert steps[-1]["after_teardown"] and steps[-1]["argv"][:3] == ["lvchange", "--deltag", "dbk:writing"]
    assert steps[0]["undo"] == ["lvremove", "-f", "/dev/vg0/web1-disk-snap"]
    assert steps[6]["argv"][:3] == ["domubackup", "mount-in", "--"] and steps[6]["argv"][-2:] == [
        "xfs", "ro,nodev,nosuid,noexec,nosymfollow,nouuid"]
    # only read-only probes ran
    assert {c[0] for c in runner.calls} == {"lvs", "parted", "blkid"}


def test_plan_text_shows_skips_and_deferred_fstab(conf, fixtures, capsys):
    code, out, err = run(["-c", conf(), "plan", "web1"], ReplayRunner(web1_probes(fixtures)), capsys)
    assert code == 0, err
    assert "skipped: hdc: cdrom is not backed up" in out
    assert "skipped: xvda6: swap is not copied" in out
    lanes = out.split("\n  on ")
    assert [lane.split(":")[0] for lane in lanes[1:]] == ["local", "dom0b"]
    assert "[inspect] domubackup read-in -- /mnt/domubackup/source/web1 /etc/fstab\n" \
           "         # read the guest's /etc/fstab: the other mounts on both hosts follow from it\n" \
           "         decides: fstab" in lanes[1]
    assert "    1. [check] check peer-state\n" in lanes[2]
    assert "[check] check replicas   (after checked)\n" in lanes[2]
    assert "come from the guest's /etc/fstab at run time" in out
    assert "Teardown (each host in reverse order, the hosts at once):" in out


@pytest.mark.parametrize("domu, code, message", [
    ("nosuch", 3, "domubackup: error: nosuch: no such domain on this host's libvirt"),
    ("idle1", 3, "domubackup: error: idle1: is shut off on dom0a, not running; nothing to back up here"),
    ("paused1", 3, "domubackup: error: paused1: is paused on dom0a, not running"),
    ("files1", 3, "domubackup: error: files1: no disk that can be backed up (xvda: file-backed image: file images are not supported yet"),
])
def test_ineligible_domus(conf, fixtures, capsys, domu, code, message):
    c, out, err = run(["-c", conf(), "plan", domu], ReplayRunner({}), capsys)
    assert c == code
    assert err.startswith(message)
    assert out == ""


def test_host_not_in_dom0s(tmp_path, fixtures, capsys):
    p = tmp_path / "db.toml"
    p.write_text(f'dom0s = ["x", "y"]\nthis_host = "dom0a"\nlibvirt_uri = "test://{fixtures}/libvirt/node.xml"\n')
    c, out, err = run(["-c", str(p), "plan", "web1"], ReplayRunner({}), capsys)
    assert c == 3
    assert err.startswith("domubackup: error: this host 'dom0a' is not in dom0s ['x', 'y']")


def test_disk_that_is_not_an_lv(conf, fixtures, capsys):
    table = web1_probes(fixtures)
    table[tuple(parsers.lvs_argv("vg0"))] = (0, lvs_line("vg0", "web1-srv", 128 * MiB), "")
    table[tuple(parsers.lvs_argv("/dev/vg0/web1-disk"))] = (
        5, "", '  Failed to find logical volume "vg0/web1-disk"\n')
    c, out, err = run(["-c", conf(), "plan", "web1"], ReplayRunner(table), capsys)
    assert c == 1
    assert err.startswith('domubackup: error: xvda: /dev/vg0/web1-disk on dom0a is not an LVM logical volume '
                          '(Failed to find logical volume "vg0/web1-disk")')


def test_disk_that_is_a_snapshot(conf, fixtures, capsys):
    table = web1_probes(fixtures)
    table[tuple(parsers.lvs_argv("vg0"))] = (
        0, lvs_line("vg0", "web1-disk", 1024 * MiB, "swi-a-s---", "web1-orig", "0.52")
        + lvs_line("vg0", "web1-orig", 1024 * MiB) + lvs_line("vg0", "web1-srv", 128 * MiB), "")
    c, out, err = run(["-c", conf(), "plan", "web1"], ReplayRunner(table), capsys)
    assert c == 1
    assert "xvda: /dev/vg0/web1-disk is itself an LVM snapshot (of web1-orig)" in err


def test_guest_lvm_pv_refused_in_files_mode_and_copied_as_blocks_by_auto(conf, fixtures, capsys):
    table = web1_probes(fixtures)
    table[tuple(parsers.blkid_argv("/dev/vg0/web1-disk", 106954752, 417333248))] = (
        0, tool(fixtures, "blkid-lvm2-pv.txt"), "")
    c, out, err = run(["-c", conf('mode = "files"\n'), "plan", "web1"], ReplayRunner(table), capsys)
    assert (c, err) == (0, "")
    assert "skipped: xvda5: holds a guest LVM physical volume: not copied, and its disk is not mapped" in out
    assert "skipped: xvda1: not copied: its disk is not mapped (xvda5 holds a guest LVM2_member)" in out
    assert "kpartx -a" not in out  # never mapped
    assert "xvda: mode files (configured)" in out
    # `auto` (the default): that disk as blocks, the other as files, in one plan
    c, out, err = run(["-c", conf(), "plan", "web1"], ReplayRunner(table), capsys)
    assert (c, err) == (0, "")
    assert ("xvda: mode blocks (auto: xvda5 holds a guest LVM physical volume: not copied, and its disk is not "
            "mapped") in out, out
    assert "xvdb: mode files (auto: every partition holding data has a filesystem the tool mounts)" in out
    assert "skipped: xvda" not in out and "kpartx -a" not in out
    assert "domubackup block-digests /dev/vg0/web1-disk 1073741824 -" in out
    assert "domubackup receive-blocks /dev/vg0/web1-disk 1073741824" in out
    assert "block-digests /dev/vg0/web1-srv" not in out and "domubackup read-in -- /mnt/domubackup/source/web1 /etc/fstab" in out
    assert "lvcreate --snapshot" in out and out.count("lvcreate --snapshot") == 2  # both disks, one freeze window
    # files mode with nothing to mount on that disk: refused with the reason
    c, out, err = run(["-c", conf('[domu.web1]\ndisk_modes = { xvdb = "blocks", xvda = "files" }\n'), "plan", "web1"],
                      ReplayRunner(table), capsys)
    assert c == 1 and "web1: no filesystem to copy on any disk" in err, out + err
    # a disk configured as blocks beside one in files mode
    c, out, err = run(["-c", conf('[domu.web1]\ndisk_modes = { xvdb = "blocks", xvda = "files" }\n'), "plan", "web1"],
                      ReplayRunner(web1_probes(fixtures)), capsys)
    assert c == 0 and "xvdb: mode blocks (configured)" in out and "xvda: mode files (configured)" in out, out + err
    c, out, err = run(["-c", conf('disk_modes = { xvdb = "image" }\n'), "plan", "web1"], ReplayRunner(table), capsys)
    assert c == 78 and "disk_modes.xvdb: expected 'files', 'blocks' or 'auto', got 'image'" in err, err


def test_bad_config_exit_78_one_line(tmp_path, capsys):
    p = tmp_path / "db.toml"
    p.write_text('dom0s = ["a"]\nsnapshot_size = [1]\n')
    c, out, err = run(["-c", str(p), "plan", "web1"], ReplayRunner({}), capsys)
    assert c == 78
    assert err == f"domubackup: error: {p}: snapshot_size: expected a string, got [1]\n"


def test_config_from_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DOMUBACKUP_CONFIG", str(tmp_path / "missing.toml"))
    c, out, err = run(["plan", "web1"], ReplayRunner({}), capsys)
    assert c == 78
    assert "missing.toml: no such configuration file" in err


def test_unreachable_libvirt(conf, capsys):
    c, out, err = run(["-c", conf(uri="test:///nonexistent/node.xml"), "plan", "web1"], ReplayRunner({}), capsys)
    assert c == 1
    assert err.startswith("domubackup: error: cannot connect to libvirt at test:///nonexistent/node.xml")


def test_run_dry_run_goes_on_after_an_ineligible_domu(conf, fixtures, capsys):
    cfg = conf('[domu.idle1]\n[domu.web1]\n')
    c, out, err = run(["-c", cfg, "run", "--dry-run", "--json"], ReplayRunner(web1_probes(fixtures)), capsys)
    assert c == 3  # idle1 is not running here
    assert "domubackup: idle1: is shut off on dom0a" in err
    assert [d["domu"] for d in json.loads(out)] == ["web1"]


def test_usage_error_exit_2(capsys):
    assert cli.main(["plan"]) == 2
    assert cli.main([]) == 2


def test_nightly_run_skips_domus_running_elsewhere_quietly(conf, capsys):
    cfg = conf('[domu.idle1]\n[domu.nosuch]\n')
    c, out, err = run(["-c", cfg, "run"], ReplayRunner({}), capsys)
    assert (c, out, err) == (0, "", "")  # cron mails nothing: another Dom0 backs them up
    c, out, err = run(["-c", cfg, "run", "idle1"], ReplayRunner({}), capsys)
    assert c == 3  # named by hand: say why nothing happened
    assert "idle1: is shut off on dom0a, not running; nothing to back up here" in err
    assert out.startswith("idle1: SKIPPED in ")


def test_one_file_for_both_dom0s_a_domu_without_a_peer_here_fails_alone(conf, fixtures, capsys, tmp_path):
    # files1 runs here and its only replica host is this one: exit 78 for it, naming the DomU,
    # the host and its peers; web1 (peers = the other host) is still planned.
    cfg = conf('[domu.files1]\npeers = ["dom0a"]\n[domu.web1]\npeers = ["dom0b"]\n[domu.idle1]\npeers = ["dom0a"]\n')
    c, out, err = run(["-c", cfg, "run", "--dry-run", "--json"], ReplayRunner(web1_probes(fixtures)), capsys)
    assert c == 78
    assert err == (f"domubackup: {cfg}: domu.files1.peers: files1 runs on dom0a, and its peers ['dom0a'] name no "
                   "other Dom0 to copy it to (add another Dom0 to its peers)\n"
                   "domubackup: idle1: is shut off on dom0a, not running; nothing to back up here "
                   "(it is backed up by the Dom0 it runs on)\n")
    assert [d["domu"] for d in json.loads(out)] == ["web1"]
    # run: files1 ERROR (recorded in the catalog, exit 78), idle1 runs elsewhere (exit 3 is less serious)
    prom = tmp_path / "domubackup.prom"
    cfg = conf(f'metrics_textfile = "{prom}"\n[domu.files1]\npeers = ["dom0a"]\n[domu.idle1]\n')
    c, out, err = run(["-c", cfg, "run", "files1", "idle1"], ReplayRunner({}), capsys)
    assert c == 78
    metrics = prom.read_text()
    assert 'domubackup_last_run_status{domu="files1",peer=""} 0\n' in metrics
    assert 'domubackup_last_ok_age_seconds{domu="files1",peer=""} +Inf\n' in metrics
    assert 'domubackup_last_ok_age_seconds{domu="idle1",peer=""} +Inf\n' in metrics
    assert out.startswith("files1: ERROR in ")
    assert f"{cfg}: domu.files1.peers: files1 runs on dom0a" in out
    # ...and it has no OK backup within max_age (stderr; the metrics say so for every configured DomU)
    assert err.splitlines()[-1] == "domubackup: files1: no OK backup within 2d: none recorded"
    c, out, err = run(["-c", cfg, "history", "--json"], ReplayRunner({}), capsys)
    assert [(r["domu"], r["status"]) for r in json.loads(out)] == [("files1", "ERROR")]
