"""The pipeline against scripted hosts: failure injection at every open step, teardown order,
refusals before anything is opened. The real thing runs in the lab (tests/e2e)."""


import os

import pytest

from domubackup.jobs import frame, backup as backup_job
from domubackup.core import parsers
from domubackup.core.config import parse_config
from domubackup.hosts.journal import Journal
from domubackup.hosts.runner import Runner
from domubackup.jobs.frame import Inspection
from domubackup.core.model import Domain

import sys, pathlib  # noqa: E401
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "integration"))
from test_plan_cli import web1_probes  # noqa: E402

FSTAB = ("UUID=3f1b2c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d / ext4 defaults 0 1\n"
         "LABEL=data\\040vol /var xfs defaults 0 2\n"
         "LABEL=whole /srv ext4 defaults 0 2\n")
MUTATING = ("lvcreate", "kpartx", "mkdir", "mount")


class Host(Runner):
    """A scripted host: read-only probes answered from captured outputs, every other command
    succeeds unless it is the one chosen to fail. Records what ran."""

    def __init__(self, name, probes, fail_at=None, fail_undo=None, log=None):
        super().__init__(name)
        self.probes = {tuple(k): v for k, v in probes.items()}
        self.fail_at = fail_at  # shared counter dict {"n": k}: the k-th mutating command fails
        self.fail_undo = fail_undo
        self.log = log if log is not None else []
        self.mounted = set()
        self.created = set()
        self.spaces = {}  # mount target -> "space ..." line that mount-in tells for it

    def _execute(self, argv, env, input, timeout):
        if argv[:2] in (("domubackup", "mount-in"), ("domubackup", "umount-in")):  # each item, in order
            said = []
            for item, word in zip(items(argv), argv[argv.index("--") + 2::2 if argv[1] == "umount-in" else 4]):
                code, out, err = self._execute_one(item)
                if code:
                    return code, "".join(said), err
                said.append(self.spaces.get(item[-1], "") if item[0] == "mount" else "")
                said.append(f"{'mounted' if item[0] == 'mount' else 'unmounted'} {word}\n")
            return 0, "".join(said), ""
        return self._execute_one(plain(argv))

    def _execute_one(self, argv):
        self.log.append((self.host, argv))
        if argv in self.probes:
            return self.probes[argv]
        if argv[0] in ("parted", "blkid") and any("-snap" in a for a in argv):  # the origin's layout
            return self.probes[tuple(a.replace("-snap", "") for a in argv)]
        if argv[:2] == ("kpartx", "-l"):  # the layout of fixtures/tools/parted-msdos-logical.txt
            name, dev = argv[-1].split("/")[-1].replace("-", "--"), argv[-1]
            return 0, "".join(f"vg0-{name}p{line}\n" for line in (
                f"1 : 0 204800 {dev} 2048", f"2 : 0 2 {dev} 206848", "5 : 0 815104 /dev/dm-9 2048",
                "6 : 0 202752 /dev/dm-9 819200")), ""
        prog = argv[0]
        if prog == "lvs" and argv[-1] not in self.created:
            return 5, "", f'  Failed to find logical volume "{argv[-1][5:]}"\n'
        if prog == "lvs":  # the snapshot, once created: 1.5 % full
            return 0, f"  vg0|{argv[-1].split('/')[-1]}|268435456|swi-a-s---|x|1.50|1073741824|{argv[-1]}\n", ""
        if prog == "dmsetup":  # every snapshot created so far: 1.5 % full
            return 0, "".join(f"vg0-{p.split('/')[-1].replace('-', '--')}: 0 2457600 snapshot 7864/524288 16\n"
                              for p in sorted(self.created)) or "No devices found\n", ""
        if prog == "findmnt":
            return 0, "", ""
        if prog == "virsh":
            return 0, "shut off\n", ""
        if prog == "cat":
            return 0, FSTAB, ""
        if prog == "rsync":
            return 0, (pathlib.Path(__file__).parents[2] / "fixtures/tools/rsync-stats-delete.txt").read_text(), ""
        if prog in MUTATING and self.fail_at is not None:
            self.fail_at["n"] -= 1
            if self.fail_at["n"] == 0:
                return 1, "", f"{prog}: injected failure"
        if prog == "mount":
            self.mounted.add(argv[-1])
        if prog == "lvcreate":
            self.created.add(f"{argv[-1]}-snap")
        if prog == "umount":
            if argv[-1] not in self.mounted:  # what safepath's umount-in says
                return 32, "", f"umount-in: '{argv[-1]}': not mounted (no such directory)\n"
            if self.fail_undo and argv == self.fail_undo:
                return 32, "", f"umount-in: umount of '{argv[-1]}' failed: Device or resource busy\n"
            self.mounted.discard(argv[-1])
        return 0, "", ""


def plain(argv):
    """The safepath helpers as the commands they stand for (mount, umount, cat), so that the
    tests read the order of the steps: `domubackup mount-in -- TREE PATH DEV T O` is
    `mount -t T -o O -- DEV TREE/PATH`. A batch (several items) gives the first one: see
    `items` for all."""
    return items(argv)[0]


def items(argv):
    if argv[:1] != ("domubackup",):
        return [argv]
    args = [a for a in argv[2:] if a not in ("--", "--mkdir")]
    tree, n = args[0], {"mount-in": 4, "umount-in": 2, "read-in": 1}[argv[1]]
    out = []
    for i in range(1, len(args), n):
        target = os.path.normpath(os.path.join(tree, args[i].lstrip("/")))
        if argv[1] == "mount-in":
            out.append(("mount", "-t", args[i + 2], "-o", args[i + 3], "--", args[i + 1], target))
        elif argv[1] == "umount-in":
            out.append(("umount", "--", target))
        else:
            out.append(("cat", "--", target))
    return out


def setup(tmp_path, fixtures, fail_at=None, fail_undo=None):
    config = parse_config(f'dom0s = ["dom0a", "dom0b"]\nstate_dir = "{tmp_path}"\nsnapshot_size = "256M"\n',
                          hostname="dom0a", default_uri="test:///x")
    probes = web1_probes(fixtures)
    log = []
    host, k = fail_at or (None, None)  # the k-th mutating command on that host fails
    local = Host("dom0a", probes, {"n": k} if host == "dom0a" else None, fail_undo, log)
    # the replica is not open on the peer (the DomU is shut off there)
    peer_probes = {k: (v[0], v[1].replace("-wi-ao----", "-wi-a-----"), v[2]) for k, v in web1_probes(fixtures).items()}
    peer = Host("dom0b", peer_probes, {"n": k} if host == "dom0b" else None, fail_undo, log)
    return config, local, peer, log


def run_backup(config, local, peer, monkeypatch):
    monkeypatch.setattr(frame, "inspect", lambda c, n, conn, r, on_eligible=None: _inspect(c, n, r, on_eligible))
    return backup_job.backup(config, "web1", None, local, factory=lambda host, ssh: peer)


def _inspect(config, name, runner, on_eligible=None):
    from domubackup.core.domxml import parse_domain_xml
    from domubackup.hosts.facts import list_lvs, probe_disk
    xml = (pathlib.Path(__file__).parents[2] / "fixtures/domxml/xen-pv.xml").read_text()
    _, hv, disks = parse_domain_xml(xml)
    if on_eligible is not None:
        on_eligible()
    lvs = list_lvs(runner, [d.source for d in disks])
    return Inspection(Domain("web1", "running", disks=disks), [probe_disk(runner, d, lvs=lvs) for d in disks],
                      [], ("dom0b",), lvs)


def opens_and_undos(log):
    opens = [(h, a) for h, a in log if a[0] in MUTATING and a[:2] not in (("kpartx", "-d"), ("kpartx", "-l"))]
    undos = [(h, a) for h, a in log if a[0] in ("lvremove", "umount", "rmdir") or a[:2] == ("kpartx", "-d")]
    # `lvremove -f A B` (neighbouring snapshot undos in one command) counts as A's then B's
    undos = [(h, u) for h, a in undos for u in ([a] if a[0] != "lvremove" else [a[:2] + (lv,) for lv in a[2:]])]
    # a batch of mounts is journaled before it runs: the undo of a mount after the one that
    # failed is tried too and finds nothing (not counted here: it opened nothing)
    tried = {(h, a[-1]) for h, a in opens if a[0] == "mount"}
    undos = [(h, u) for h, u in undos if u[0] != "umount" or (h, u[-1]) in tried]
    return opens, undos


def by_host(pairs):
    """The undos of each host in order (the hosts tear down at the same time)."""
    out = {}
    for h, a in pairs:
        out.setdefault(h, []).append(a)
    return out


UNDO = {"lvcreate": lambda a: ("lvremove", "-f", f"{a[-1]}-snap"),
        "kpartx": lambda a: ("kpartx", "-d", "-p", a[4], a[-1]),
        "mkdir": lambda a: ("rmdir", "--", a[-1]),
        "mount": lambda a: ("umount", "--", a[-1])}


def test_success_opens_then_closes_in_exact_reverse(tmp_path, fixtures, monkeypatch):
    config, local, peer, log = setup(tmp_path, fixtures)
    out = run_backup(config, local, peer, monkeypatch)
    assert (out.status, out.exit_code, out.error) == ("OK", 0, "")
    assert out.stats.files == 1205 and out.stats.bytes_sent == 22970
    opens, undos = opens_and_undos(log)
    assert len(opens) == 12
    assert by_host(undos) == by_host([(h, UNDO[a[0]](a)) for h, a in reversed(opens)])
    assert Journal.load(tmp_path, "web1") is None
    mounts = by_host((h, a[-1]) for h, a in opens if a[0] == "mount")  # the hosts mount at the same time
    assert mounts == {
        "dom0a": ["/mnt/domubackup/source/web1", "/mnt/domubackup/source/web1/srv", "/mnt/domubackup/source/web1/var"],
        "dom0b": ["/mnt/domubackup/target/web1", "/mnt/domubackup/target/web1/srv", "/mnt/domubackup/target/web1/var"]}


@pytest.mark.parametrize("host,k", [("dom0a", k) for k in range(1, 8)] + [("dom0b", k) for k in range(1, 6)])
def test_failure_at_each_open_step_undoes_exactly_what_was_opened(tmp_path, fixtures, monkeypatch, host, k):
    # dom0a opens 7 steps (2 snapshots, kpartx, mkdir, 3 mounts), dom0b 5 (kpartx, mkdir,
    # 3 mounts); the peer's kpartx runs while dom0a takes its snapshots.
    config, local, peer, log = setup(tmp_path, fixtures, fail_at=(host, k))
    out = run_backup(config, local, peer, monkeypatch)
    assert out.status == "ERROR" and out.exit_code == 1
    assert "injected failure" in out.error
    opens, undos = opens_and_undos(log)
    assert len([a for h, a in opens if h == host]) == k  # nothing opened there after the failure
    # The failed step's own undo is tried first (it may have half-happened) and finds nothing
    # or succeeds; then exactly the undos of steps 1..k-1, in reverse.
    assert by_host(undos) == by_host([(h, UNDO[a[0]](a)) for h, a in reversed(opens)])
    assert not any(a[0] == "rsync" for h, a in log)
    assert Journal.load(tmp_path, "web1") is None  # everything closed: journal gone


def test_failing_undo_keeps_journal_and_runs_the_rest(tmp_path, fixtures, monkeypatch):
    busy = ("umount", "--", "/mnt/domubackup/source/web1/var")
    config, local, peer, log = setup(tmp_path, fixtures, fail_undo=busy)
    out = run_backup(config, local, peer, monkeypatch)
    assert (out.status, out.exit_code) == ("ERROR", 4)
    assert "teardown of web1: 1 undo step(s) failed" in out.error and "Device or resource busy" in out.error
    opens, undos = opens_and_undos(log)
    assert by_host(undos)["dom0a"][-1] == ("lvremove", "-f", "/dev/vg0/web1-disk-snap")  # the rest still ran
    j = Journal.load(tmp_path, "web1")
    assert [plain(e.undo) for e in j.entries] == [busy]



def test_teardown_failure_after_a_failed_run_tells_both(tmp_path, fixtures, monkeypatch):
    busy = ("umount", "--", "/mnt/domubackup/source/web1/var")
    config, local, peer, log = setup(tmp_path, fixtures, fail_at=("dom0b", 5), fail_undo=busy)
    out = run_backup(config, local, peer, monkeypatch)
    assert (out.status, out.exit_code) == ("ERROR", 4)  # something is left: the more serious one
    first, *rest = out.error.splitlines()
    assert first.startswith("teardown of web1: 1 undo step(s) failed")
    assert rest[-1].startswith("  the run had failed before its teardown: ") and "injected failure" in rest[-1]

def test_the_next_run_sweeps_a_journal_write_cut_by_a_kill(tmp_path, fixtures, monkeypatch, caplog):
    config, local, peer, log = setup(tmp_path, fixtures)
    stale = tmp_path / "journal" / ".web1.json.k1ll_9x.tmp"
    stale.parent.mkdir()
    stale.write_text('{"domu": "web1", "entries": [')
    out = run_backup(config, local, peer, monkeypatch)
    assert (out.status, out.exit_code) == ("OK", 0), out.error
    assert os.listdir(tmp_path / "journal") == []
    assert f"web1: removed {stale}, a journal write that a killed run left unfinished" in caplog.text


def test_peer_running_refused_before_anything_opens_there(tmp_path, fixtures, monkeypatch):
    # The peer is checked while the local snapshots are taken; nothing is opened on the peer
    # before its check has passed, and what was opened here is closed again.
    config, local, peer, log = setup(tmp_path, fixtures)
    peer.probes[("virsh", "-c", "test:///x", "domstate", "--domain", "web1")] = (0, "running\n", "")
    out = run_backup(config, local, peer, monkeypatch)
    assert out.error == ("web1 is running on dom0b: refusing to overwrite the disks of a live DomU "
                         "(make sure web1 runs on one Dom0 only)")
    opens, undos = opens_and_undos(log)
    assert not [a for h, a in opens + undos if h == "dom0b"]
    assert by_host(undos) == by_host([(h, UNDO[a[0]](a)) for h, a in reversed(opens)])
    assert not local.mounted and not any(a[0] == "rsync" for h, a in log)
    assert Journal.load(tmp_path, "web1") is None


def test_not_enough_vg_space(tmp_path, fixtures, monkeypatch):
    config, local, peer, log = setup(tmp_path, fixtures)
    from test_plan_cli import lvs_line
    MiB = 1024 * 1024
    local.probes[tuple(parsers.lvs_argv("vg0"))] = (0, lvs_line("vg0", "web1-disk", 1024 * MiB, free=300 * MiB)
                                                    + lvs_line("vg0", "web1-srv", 128 * MiB, free=300 * MiB), "")
    out = run_backup(config, local, peer, monkeypatch)
    assert out.error.startswith("volume group vg0 has 300.0 MiB free, the snapshots need 512.0 MiB: 212.0 MiB missing")
    assert opens_and_undos(log) == ([], [])


def test_invalid_snapshot_is_corrupt_never_ok(tmp_path, fixtures, monkeypatch):
    config, local, peer, log = setup(tmp_path, fixtures)
    real = local._execute

    def execute(argv, env, input, timeout):
        if argv[0] == "dmsetup" and any(a[0] == "rsync" for h, a in log):
            return 0, ("vg0-web1--disk--snap: 0 2457600 snapshot 7864/524288 16\n"
                       "vg0-web1--srv--snap: 0 262144 snapshot Invalid\n"), ""
        return real(argv, env, input, timeout)
    local._execute = execute
    out = run_backup(config, local, peer, monkeypatch)
    assert (out.status, out.exit_code) == ("CORRUPT", 1)
    assert "snapshot /dev/vg0/web1-srv-snap became invalid (100% full)" in out.error
    assert Journal.load(tmp_path, "web1") is None


def test_hooks_freeze_only_around_the_snapshots(tmp_path, fixtures, monkeypatch):
    hooks = tmp_path / "freeze.d"
    hooks.mkdir()
    for name in ("10-db", "20-app"):
        (hooks / name).write_text("#!/bin/sh\nexit 0\n")
        (hooks / name).chmod(0o755)
    config, local, peer, log = setup(tmp_path / "state", fixtures)
    config = parse_config(f'dom0s = ["dom0a", "dom0b"]\nstate_dir = "{tmp_path}/state"\nsnapshot_size = "256M"\n'
                          f'consistency = "hooks"\nfreeze_hook_dir = "{hooks}"\n', hostname="dom0a",
                          default_uri="test:///x")
    out = run_backup(config, local, peer, monkeypatch)
    assert out.status == "OK", out.error
    hook = str(hooks)
    seq = [(a[-1] if a[0].startswith(hook) else a[0]) for h, a in log
           if (a[0] in ("lvcreate", "kpartx") or a[0].startswith(hook)) and h == "dom0a"]
    assert seq[:7] == ["freeze", "freeze", "lvcreate", "lvcreate", "thaw", "thaw", "kpartx"]
    # nothing of ours competes with the snapshots while the guest is frozen: the peer's
    # check starts after the thaw
    hooks_at = [n for n, (h, a) in enumerate(log) if a[0].startswith(hook)]
    assert not [a for h, a in log[hooks_at[0]:hooks_at[-1]] if h == "dom0b"]
    assert any(h == "dom0b" for h, a in log[hooks_at[-1]:])
    hook_calls = [a[0].rsplit("/", 1)[1] + " " + a[-1] for h, a in log if a[0].startswith(hook)]
    assert hook_calls == ["10-db freeze", "20-app freeze", "20-app thaw", "10-db thaw"]
    assert out.freeze.level == "application" and out.freeze.window_ms is not None
    assert "application-consistent" in out.summary()


def hook_config(tmp_path):
    return parse_config(f'dom0s = ["dom0a", "dom0b"]\nstate_dir = "{tmp_path}"\nsnapshot_size = "256M"\n'
                        'job_hook = "/etc/domubackup/job-hook"\n', hostname="dom0a", default_uri="test:///x")


def test_lifecycle_hooks_around_a_backup(tmp_path, fixtures, monkeypatch):
    _, local, peer, log = setup(tmp_path, fixtures)
    out = run_backup(hook_config(tmp_path), local, peer, monkeypatch)
    assert out.status == "OK", out.error
    names = [a[0] if a[0] != "/etc/domubackup/job-hook" else a[1] for h, a in log]
    assert names.index("backup-start") < names.index("lvcreate")
    assert names[-1] == "backup-end" and names.index("lvremove") < names.index("backup-end")


def test_failing_backup_start_hook_aborts_that_domu(tmp_path, fixtures, monkeypatch):
    _, local, peer, log = setup(tmp_path, fixtures)
    local.probes[("/etc/domubackup/job-hook", "backup-start")] = (1, "", "maintenance window\n")
    out = run_backup(hook_config(tmp_path), local, peer, monkeypatch)
    assert out.status == "ERROR"
    assert out.error.startswith("web1: the backup-start hook refused the backup: on dom0a: "
                                "`/etc/domubackup/job-hook backup-start` exited 1: maintenance window")
    assert not any(a[0] == "lvcreate" for h, a in log)
    assert log[-1] == ("dom0a", ("/etc/domubackup/job-hook", "backup-abort"))


def wait_in(host, prog, event, seen, first_only=True, where=None):
    """Make `host` wait (at most 5 s) for `event` before running its first `prog` command
    (matching `where`); `seen` gets whether the event came. Sequential code would time out."""
    real = host._execute

    def execute(argv, env, input, timeout):
        if any(i[0] == prog and (where is None or where(i)) for i in items(argv)) and not (first_only and seen):
            seen.append(event.wait(5))
        return real(argv, env, input, timeout)
    host._execute = execute


def signal_on(host, prog, event, where=None):
    real = host._execute

    def execute(argv, env, input, timeout):
        result = real(argv, env, input, timeout)
        if any(i[0] == prog and (where is None or where(i)) for i in items(argv)):
            event.set()
        return result
    host._execute = execute


def test_peer_is_reached_while_this_host_still_probes(tmp_path, fixtures, monkeypatch):
    # The peer is connected to as soon as the DomU is known to be eligible here: this host's
    # first disk probe can wait for it.
    import threading
    config, local, peer, log = setup(tmp_path, fixtures)
    asked, seen = threading.Event(), []
    peer.connect = asked.set
    wait_in(local, "parted", asked, seen)
    out = run_backup(config, local, peer, monkeypatch)
    assert (out.status, seen) == ("OK", [True])


def test_peer_mounts_while_this_host_still_mounts(tmp_path, fixtures, monkeypatch):
    # The replica's mounts start as soon as the snapshot's fstab is read: this host's last
    # mount can wait for the peer's last one.
    import threading
    config, local, peer, log = setup(tmp_path, fixtures)
    mounted, seen = threading.Event(), []
    signal_on(peer, "mount", mounted, where=lambda a: a[-1].endswith("/var"))
    wait_in(local, "mount", mounted, seen, where=lambda a: a[-1].endswith("/var"))
    out = run_backup(config, local, peer, monkeypatch)
    assert (out.status, seen) == ("OK", [True])
    opens, undos = opens_and_undos(log)
    assert by_host(undos) == by_host([(h, UNDO[a[0]](a)) for h, a in reversed(opens)])


def test_peer_unreachable_after_probes_started_leaves_nothing(tmp_path, fixtures, monkeypatch):
    from domubackup.core.errors import PeerError
    config, local, peer, log = setup(tmp_path, fixtures)

    def unreachable(argv, env, input, timeout):
        raise PeerError("cannot connect to dom0b: Connection refused")
    peer._execute = unreachable
    out = run_backup(config, local, peer, monkeypatch)
    assert (out.status, out.exit_code) == ("ERROR", 1) and "cannot connect to dom0b" in out.error
    opens, undos = opens_and_undos(log)
    assert [h for h, a in opens] == [h for h, a in opens if h == "dom0a"]  # nothing opened on dom0b
    assert by_host(undos) == by_host([(h, UNDO[a[0]](a)) for h, a in reversed(opens)])
    assert Journal.load(tmp_path, "web1") is None


@pytest.mark.parametrize("delay,before,now,expected", [
    (2.0, None, 1.0, 4.0),     # first look: nothing to compare, look again later
    (4.0, 1.0, 1.0, 8.0),      # no growth: twice as long
    (8.0, 1.0, 1.0, 10.0),     # ... at most 10 s (LVM's dmeventd looks every 10 s)
    (10.0, 1.0, 0.5, 10.0),    # shrank (extended elsewhere): no growth
    (2.0, 10.0, 12.0, 10.0),   # 1 %/s, 68 % to go at 80: 68 s -> a quarter is 17 -> 10
    (2.0, 10.0, 20.0, 3.0),    # 5 %/s, 60 % to go: 12 s -> a quarter is 3
    (2.0, 10.0, 30.0, 2.0),    # 10 %/s, 50 % to go: 5 s -> a quarter 1.25 -> at least 2
    (4.0, 40.0, 60.0, 2.0),    # 5 %/s, 20 % to go: 4 s -> 1 -> 2
    (4.0, 50.0, 90.0, 2.0),    # past the threshold already
])
def test_next_poll(delay, before, now, expected):
    from domubackup.jobs.checks import next_poll
    got = next_poll(delay, before, now, 80.0)
    assert got == pytest.approx(expected)


def test_unexpected_exception_ends_that_domu_only_and_the_night_goes_on(tmp_path, fixtures, monkeypatch, capsys,
                                                                          package_logger):
    # web1's rsync prints stats its parser refuses (a ValueError, not a DomuBackupError): web1
    # ends ERROR with everything closed, the traceback in its run log only, one line on
    # stderr (and one more: it has no OK backup within max_age); web2 is backed up next as if
    # nothing happened.
    import argparse
    from domubackup import cli
    from domubackup.hosts import logs
    from domubackup.hosts.catalog import Catalog
    config = parse_config(f'dom0s = ["dom0a", "dom0b"]\nstate_dir = "{tmp_path}"\nsnapshot_size = "256M"\n'
                          'job_hook = "/etc/domubackup/job-hook"\n', hostname="dom0a", default_uri="test:///default")
    _, local, peer, log = setup(tmp_path, fixtures)
    real = local._execute

    def execute(argv, env, input, timeout):
        if argv[0] == "rsync" and argv[-1].endswith("/web1/"):
            return 0, "Number of files: 2.01M\n", ""
        return real(argv, env, input, timeout)
    local._execute = execute
    monkeypatch.setattr(frame, "inspect", lambda c, n, conn, r, on_eligible=None: _inspect(c, n, r, on_eligible))
    backup = backup_job.backup
    monkeypatch.setattr(backup_job, "backup", lambda *a, **kw: backup(*a, factory=lambda host, ssh: peer, **kw))
    logs.setup(0, syslog=False)
    code = cli.run_backups(config, argparse.Namespace(domus=["web1", "web2"], verbose=0), local)
    out, err = capsys.readouterr()
    with Catalog.in_state_dir(tmp_path) as catalog:
        web1, = catalog.runs(domu="web1")
        web2, = catalog.runs(domu="web2")
    why = ("web1: internal error: ValueError: malformed rsync --stats line 'Number of files: 2.01M': "
           f"number not plain (rsync -h output? use --no-h); the traceback is in {web1.log_path}")
    assert code == 1
    assert err == f"domubackup: {why}\ndomubackup: web1: no OK backup within 2d: none recorded\n"
    assert (web1.status, web1.error, web2.status, web2.error) == ("ERROR", why, "OK", "")
    assert out.splitlines()[0].startswith("web1: ERROR in ") and out.splitlines()[0].endswith(f": {why}")
    assert out.splitlines()[1].startswith("web2: OK in ")
    text = open(web1.log_path, encoding="utf-8").read()
    assert f" ERROR {why}\n    Traceback (most recent call last):\n" in text
    assert "\n    ValueError: malformed rsync --stats line 'Number of files: 2.01M'" in text
    hooks = [a[1] for h, a in log if a[0] == "/etc/domubackup/job-hook"]
    assert hooks == ["job-start", "backup-start", "backup-abort", "backup-start", "backup-end", "job-end"]
    # web1's teardown ran in full before web2 started: each undo of each opened step
    abort = log.index(("dom0a", ("/etc/domubackup/job-hook", "backup-abort")))
    opens, undos = opens_and_undos(log[:abort])
    assert len(opens) == 12
    assert by_host(undos) == by_host([(h, UNDO[a[0]](a)) for h, a in reversed(opens)])
    assert Journal.load(tmp_path, "web1") is None and Journal.load(tmp_path, "web2") is None
    assert any(a[0] == "rsync" and a[-1].endswith("/web2/") for h, a in log[abort:])


def test_an_internal_error_without_a_run_log_file_is_one_line_never_a_traceback(tmp_path, fixtures, monkeypatch, capsys,
                                                                                package_logger):
    import argparse
    from domubackup import cli
    from domubackup.hosts import logs
    (tmp_path / "log").write_text("not a directory\n")  # no run log file can be written
    config = parse_config(f'dom0s = ["dom0a", "dom0b"]\nstate_dir = "{tmp_path}"\nsnapshot_size = "256M"\n',
                          hostname="dom0a", default_uri="test:///default")
    _, local, peer, log = setup(tmp_path, fixtures)
    monkeypatch.setattr(frame, "inspect", lambda c, n, conn, r, on_eligible=None: 1 / 0)
    logs.setup(0, syslog=False)
    code = cli.run_backups(config, argparse.Namespace(domus=["web1"], verbose=0), local)
    out, err = capsys.readouterr()
    why = ("web1: internal error: ZeroDivisionError: division by zero; "
           "no log file could be written: the traceback is not kept")
    assert code == 1
    assert err.splitlines()[0] == f"domubackup: {why}"
    assert "Traceback" not in err and "Traceback" not in out



def test_keyboard_interrupt_is_not_contained(tmp_path, fixtures, monkeypatch):
    config, local, peer, log = setup(tmp_path, fixtures)

    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(frame, "inspect", interrupted)
    with pytest.raises(KeyboardInterrupt):
        backup_job.backup(config, "web1", None, local, factory=lambda host, ssh: peer)


def test_a_domu_name_from_libvirt_that_cannot_name_files_is_skipped(tmp_path, fixtures):
    config, local, peer, log = setup(tmp_path, fixtures)
    out = backup_job.backup(config, "../web1", None, local, factory=lambda host, ssh: peer)
    assert (out.status, out.exit_code, out.not_here) == ("SKIPPED", 3, False)
    assert out.error == ("'../web1' is not a usable DomU name: expected 1 to 64 letters, digits, '.', '_', '+' "
                         "or '-', starting with a letter or digit, without '..'")
    assert log == [] and not (tmp_path / "lock").exists()


MiB = 1024 * 1024
SRV_SNAP = "/dev/vg0/web1-srv-snap"


def dm_line(path, percent):
    vg, lv = path.split("/")[-2:]
    return f"{vg}-{lv.replace('-', '--')}: 0 2457600 snapshot {int(524288 * percent / 100 + 0.5)}/524288 16\n"


class WatchHost(Runner):
    """A host with one snapshot (SRV_SNAP of vg0/web1-srv) at PERCENT full: lvs, dmsetup and
    lvextend only."""

    def __init__(self, snap_size, origin_size=1024 * MiB, percent=85.0, free=4096 * MiB):
        super().__init__("dom0a")
        self.snap_size, self.origin_size, self.percent, self.free = snap_size, origin_size, percent, free
        self.calls = []

    def _execute(self, argv, env, input, timeout):
        self.calls.append(argv)
        if argv[0] == "dmsetup":
            return 0, dm_line(SRV_SNAP, self.percent), ""
        if argv[0] == "lvs" and argv[-1] == SRV_SNAP:
            return 0, (f"  vg0|web1-srv-snap|{self.snap_size}|swi-a-s---|web1-srv|{self.percent:.2f}|"
                       f"{self.free}|{SRV_SNAP}\n"), ""
        if argv[0] == "lvs" and argv[-1] == "/dev/vg0/web1-srv" and self.origin_size:
            return 0, f"  vg0|web1-srv|{self.origin_size}|owi-aos---|||{self.free}|/dev/vg0/web1-srv\n", ""
        if argv[0] == "lvs":
            return 5, "", f'  Failed to find logical volume "{argv[-1][5:]}"\n'
        if argv[0] == "lvextend":
            return 0, "", ""
        raise AssertionError(argv)


def watch_settings(extra=""):
    return parse_config('dom0s = ["dom0a", "dom0b"]\nsnapshot_size = "256M"\n' + extra,
                        hostname="dom0a", default_uri="test:///x").settings_for("web1")


EXTEND = ("lvextend", "--size", "+256M", SRV_SNAP)


@pytest.mark.parametrize("extra, snap_size, problem", [
    # 50 % of the 1024 MiB origin = 512 MiB: 256 + 256 fits, 384 + 256 does not
    ("", 256 * MiB, None),
    ("", 384 * MiB, f"snapshot {SRV_SNAP} is 85.0% full and has reached snapshot_extend_max "
                    "(50%ORIGIN = 512.0 MiB): the guest writes faster than the snapshot may grow "
                    "(384.0 MiB now, 256M more would pass it)"),
    ('snapshot_extend_max = "600M"\n', 256 * MiB, None),
    ('snapshot_extend_max = "600M"\n', 512 * MiB,
     f"snapshot {SRV_SNAP} is 85.0% full and has reached snapshot_extend_max (600M): the guest writes "
     "faster than the snapshot may grow (512.0 MiB now, 256M more would pass it)"),
])
def test_snapshot_extends_up_to_snapshot_extend_max(extra, snap_size, problem):
    host = WatchHost(snap_size)
    watch = backup_job.SnapshotWatch(host, [SRV_SNAP], watch_settings(extra))
    assert watch.check() == problem
    assert (EXTEND in host.calls, watch.extended) == (problem is None, problem is None)
    # the origin's size is asked only for a share of it
    assert (tuple(parsers.lvs_argv("/dev/vg0/web1-srv")) in host.calls) == ("%ORIGIN" in (extra or "%ORIGIN"))


def test_a_share_of_an_origin_that_cannot_be_found_does_not_extend():
    host = WatchHost(256 * MiB, origin_size=0)
    watch = backup_job.SnapshotWatch(host, [SRV_SNAP], watch_settings())
    assert watch.check() == (f"snapshot {SRV_SNAP} is 85.0% full and its origin's size is not known: "
                             '/dev/vg0/web1-srv disappeared (Failed to find logical volume "vg0/web1-srv")')
    assert EXTEND not in host.calls


def test_the_vg_without_room_is_still_a_problem_under_the_cap():
    host = WatchHost(256 * MiB, free=100 * MiB)
    watch = backup_job.SnapshotWatch(host, [SRV_SNAP], watch_settings())
    assert watch.check() == (f"snapshot {SRV_SNAP} is 85.0% full and volume group vg0 has no room "
                             "to extend it by 256M")
    assert EXTEND not in host.calls


def test_a_snapshot_at_snapshot_extend_max_stops_the_run_cleanly(tmp_path, fixtures, monkeypatch):
    # web1-srv (128 MiB) has a 256 MiB snapshot: past 50%ORIGIN already, it may not grow. The
    # watch stops rsync (runner.cancel); the run ends ERROR with everything closed.
    import functools
    import threading
    config, local, peer, log = setup(tmp_path, fixtures)
    cancelled, transferring = threading.Event(), threading.Event()
    local.cancel = cancelled.set
    real = local._execute

    def execute(argv, env, input, timeout):
        if argv[0] == "rsync":
            transferring.set()
            cancelled.wait(10)
            return 20, "", "rsync error: received SIGUSR1 (code 20)\n"
        if argv[0] == "dmsetup" and transferring.is_set():
            return 0, dm_line("/dev/vg0/web1-disk-snap", 1.5) + dm_line(SRV_SNAP, 85.0), ""
        if argv[0] == "lvs" and argv[-1] == SRV_SNAP:
            return 0, f"  vg0|web1-srv-snap|{256 * MiB}|swi-a-s---|web1-srv|85.00|{4096 * MiB}|{SRV_SNAP}\n", ""
        return real(argv, env, input, timeout)
    local._execute = execute
    monkeypatch.setattr(backup_job, "SnapshotWatch", functools.partial(backup_job.SnapshotWatch, interval=0.05))
    out = run_backup(config, local, peer, monkeypatch)
    assert (out.status, out.exit_code, cancelled.is_set()) == ("ERROR", 1, True)
    assert out.error == (f"web1: snapshot {SRV_SNAP} is 85.0% full and has reached snapshot_extend_max "
                         "(50%ORIGIN = 64.0 MiB): the guest writes faster than the snapshot may grow "
                         "(256.0 MiB now, 256M more would pass it) (raise snapshot_size, or back up at a quieter time)")
    assert not any(a[0] == "lvextend" for h, a in log)
    opens, undos = opens_and_undos(log)
    assert by_host(undos) == by_host([(h, UNDO[a[0]](a)) for h, a in reversed(opens)])
    assert Journal.load(tmp_path, "web1") is None


def test_a_filesystem_the_fstab_does_not_place_is_copied_in_the_hidden_tree(tmp_path, fixtures, monkeypatch,
                                                                             caplog):
    # /srv (xvdb) is not in the guest's fstab: it goes to .web1.unplaced/xvdb on both hosts,
    # has an rsync of its own, and the run is OK; everything is closed in reverse
    config, local, peer, log = setup(tmp_path, fixtures)
    local.probes[("cat", "--", "/mnt/domubackup/source/web1/etc/fstab")] = (0, FSTAB.replace("LABEL=whole /srv", "#"), "")
    out = run_backup(config, local, peer, monkeypatch)
    assert (out.status, out.exit_code, out.not_copied) == ("OK", 0, []), out.summary()
    hidden = {"dom0a": "/mnt/domubackup/source/.web1.unplaced", "dom0b": "/mnt/domubackup/target/.web1.unplaced"}
    for host, root in hidden.items():
        mounts = [a for h, a in log if h == host and a[0] == "mount"]
        assert [a[-2:] for a in mounts if "unplaced" in a[-1]] == [("/dev/vg0/web1-srv-snap" if host == "dom0a"
                                                                    else "/dev/vg0/web1-srv", f"{root}/xvdb")]
        assert not [a for a in mounts if a[-1].endswith("web1/srv")]  # not in the guest's tree
        assert [a for h, a in log if h == host and a[0] in ("mkdir", "rmdir") and "unplaced" in a[-1]] == [
            ("mkdir", "-p", "--", root), ("mkdir", "-p", "--", f"{root}/xvdb"),
            ("rmdir", "--", f"{root}/xvdb"), ("rmdir", "--", root)]
    rsyncs = [a[-2:] for h, a in log if a[0] == "rsync"]
    assert rsyncs == [("/mnt/domubackup/source/web1/", "dom0b:/mnt/domubackup/target/web1/"),
                      (f"{hidden['dom0a']}/", f"dom0b:{hidden['dom0b']}/")]
    assert ("web1: xvdb (ext4) is not in the guest's /etc/fstab: copied to "
            "/mnt/domubackup/target/.web1.unplaced/xvdb on the peer") in caplog.text
    opens, undos = opens_and_undos(log)
    assert by_host(undos) == by_host([(h, UNDO[a[0]](a)) for h, a in reversed(opens)])
    assert Journal.load(tmp_path, "web1") is None


def test_a_filesystem_that_cannot_be_copied_makes_the_run_partial(tmp_path, fixtures, monkeypatch, capsys,
                                                                   package_logger):
    # /srv (xvdb) holds a filesystem that is not supported: the rest is copied, and the run
    # says what was not: PARTIAL, exit 5, in the catalog, the summary, the metrics and the
    # backup-end hook's status
    import argparse
    from domubackup import cli
    from domubackup.hosts import logs
    from domubackup.hosts.catalog import Catalog
    from domubackup.hosts.metrics import render_metrics
    config = parse_config(f'dom0s = ["dom0a", "dom0b"]\nstate_dir = "{tmp_path}"\nsnapshot_size = "256M"\n'
                          'job_hook = "/etc/domubackup/job-hook"\n', hostname="dom0a", default_uri="test:///default")
    _, local, peer, log = setup(tmp_path, fixtures)
    for host in (local, peer):
        blkid = tuple(parsers.blkid_argv("/dev/vg0/web1-srv"))
        host.probes[blkid] = (0, host.probes[blkid][1].replace("TYPE=ext4", "TYPE=ntfs"), "")
    monkeypatch.setattr(frame, "inspect", lambda c, n, conn, r, on_eligible=None: _inspect(c, n, r, on_eligible))
    backup = backup_job.backup
    monkeypatch.setattr(backup_job, "backup", lambda *a, **kw: backup(*a, factory=lambda host, ssh: peer, **kw))
    logs.setup(0, syslog=False)
    code = cli.run_backups(config, argparse.Namespace(domus=["web1"], verbose=0), local)
    out, err = capsys.readouterr()
    why = "xvdb: filesystem type 'ntfs' is not supported"
    assert code == 5
    assert out.startswith("web1: PARTIAL in ") and out.rstrip().endswith(f"; not copied: {why}"), out
    assert f"domubackup: web1: {why}\n" in err
    with Catalog.in_state_dir(tmp_path) as catalog:
        run, = catalog.runs(domu="web1")
        assert (run.status, run.error) == ("PARTIAL", f"not copied: {why}")
        assert 'domubackup_last_run_status{domu="web1",peer="dom0b"} 0.5' in render_metrics({"web1": [run]})
    hooks = [a[1] for h, a in log if a[0] == "/etc/domubackup/job-hook"]
    assert hooks == ["job-start", "backup-start", "backup-end", "job-end"]
    assert not [a for h, a in log if a[0] == "mount" and "web1-srv" in a[-2]]  # never mounted
    assert [a[-2] for h, a in log if a[0] == "rsync"] == ["/mnt/domubackup/source/web1/"]
    assert Journal.load(tmp_path, "web1") is None


def test_a_replica_too_small_for_its_source_fails_before_anything_is_written(tmp_path, fixtures, monkeypatch):
    # the mounts tell their filesystems' space: /var's replica holds 200 MiB, the source 300
    # MiB; the root's replica has too few inodes. No rsync runs; everything is closed.
    config, local, peer, log = setup(tmp_path, fixtures)
    src, tgt = "/mnt/domubackup/source/web1", "/mnt/domubackup/target/web1"
    local.spaces = {f"{src}/var": f"space {400 * MiB} {300 * MiB} {100 * MiB} 0 0\n",
                    src: f"space {900 * MiB} {100 * MiB} {800 * MiB} 60000 50000\n"}
    peer.spaces = {f"{tgt}/var": f"space {200 * MiB} {150 * MiB} {50 * MiB} 0 0\n",
                   tgt: f"space {900 * MiB} {100 * MiB} {800 * MiB} 40000 39000\n"}
    out = run_backup(config, local, peer, monkeypatch)
    assert (out.status, out.exit_code) == ("ERROR", 1)
    assert out.error == ("web1: the replica is too small, nothing was written: the replica of xvda1 (ext4, /) on "
                         "dom0b has 40000 inodes, the source uses 50000; the replica of xvda5 (xfs, /var) on dom0b "
                         "has room for 200.0 MiB (50.0 MiB free now), the source holds 300.0 MiB (grow the replica "
                         "filesystem on the peer, or re-seed it (`domubackup seed web1`))")
    assert not [a for h, a in log if a[0] == "rsync"]
    opens, undos = opens_and_undos(log)
    assert by_host(undos) == by_host([(h, UNDO[a[0]](a)) for h, a in reversed(opens)])
    assert Journal.load(tmp_path, "web1") is None
    # room enough (the replica's used + free): the run goes on
    peer.spaces[f"{tgt}/var"] = f"space {400 * MiB} {350 * MiB} {50 * MiB} 0 0\n"
    peer.spaces[tgt] = f"space {900 * MiB} {100 * MiB} {800 * MiB} 60000 39000\n"
    assert run_backup(config, local, peer, monkeypatch).status == "OK"
