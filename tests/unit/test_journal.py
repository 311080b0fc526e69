import json
import os

import pytest

from domubackup.core.errors import CommandError, DomuBackupError, PeerError, TeardownError
from domubackup.hosts.journal import Journal, already_gone
from domubackup.core.model import LOCAL, PEER, Result, Step
from domubackup.hosts.runner import Runner


class FakeRunner(Runner):
    """Records every argv; answers from a script {argv tuple: (code, stdout, stderr) | exception}."""

    def __init__(self, host, role, script=None, calls=None):
        super().__init__(host)
        self.role = role
        self.script = script or {}
        self.calls = calls if calls is not None else []

    def _execute(self, argv, env, input, timeout):
        self.calls.append((self.role, argv))
        answer = self.script.get(argv, (0, "", ""))
        if isinstance(answer, Exception):
            raise answer
        return answer


STEPS = [
    Step("snapshot", LOCAL, ("lvcreate", "-s", "-n", "web1-snap", "-L", "1G", "vg0/web1"),
         ("lvremove", "-f", "vg0/web1-snap")),
    Step("map", LOCAL, ("kpartx", "-a", "-r", "/dev/vg0/web1-snap"),
         ("kpartx", "-d", "/dev/vg0/web1-snap")),
    Step("mkdir", LOCAL, ("mkdir", "-p", "/run/domubackup/web1"), ("rmdir", "/run/domubackup/web1")),
    Step("check", LOCAL, ("blkid", "/dev/mapper/web1-snap1"), None),
    Step("mount", LOCAL, ("mount", "-o", "ro", "/dev/mapper/web1-snap1", "/run/domubackup/web1"),
         ("umount", "/run/domubackup/web1")),
    Step("peer-mount", PEER, ("mount", "/dev/mapper/vg1-web1p1", "/srv/replica/web1"),
         ("umount", "/srv/replica/web1")),
]
UNDO_ORDER = [
    (PEER, ("umount", "/srv/replica/web1")),
    (LOCAL, ("umount", "/run/domubackup/web1")),
    (LOCAL, ("rmdir", "/run/domubackup/web1")),
    (LOCAL, ("kpartx", "-d", "/dev/vg0/web1-snap")),
    (LOCAL, ("lvremove", "-f", "vg0/web1-snap")),
]


def per_host(calls):
    """Each host's undos in the order they ran."""
    return {h: [a for x, a in calls if x == h] for h in (LOCAL, PEER)}


def on_disk(tmp_path, domu="web1"):
    with open(tmp_path / "journal" / f"{domu}.json", encoding="utf-8") as f:
        return json.load(f)


def runners(script=None):
    calls = []
    return {LOCAL: FakeRunner("dom0a", LOCAL, script, calls),
            PEER: FakeRunner("dom0b", PEER, script, calls)}, calls


def journal_with_all_steps(tmp_path):
    j = Journal.create(tmp_path, "web1", "dom0b")
    for step in STEPS:
        j.done(j.begin(step))
    return j


def test_create_writes_header(tmp_path):
    Journal.create(tmp_path, "web1", "dom0b")
    data = on_disk(tmp_path)
    assert data["domu"] == "web1"
    assert data["peer"] == "dom0b"
    assert data["pid"] == os.getpid()
    assert data["started"]
    assert data["entries"] == []
    assert oct(os.stat(tmp_path / "journal").st_mode & 0o777) == "0o700"


def test_begin_persists_pending_before_the_step_runs_then_done(tmp_path):
    j = Journal.create(tmp_path, "web1", "dom0b")
    i = j.begin(STEPS[0])
    assert i == 0
    assert on_disk(tmp_path)["entries"] == [{
        "phase": "snapshot", "host": "local",
        "argv": ["lvcreate", "-s", "-n", "web1-snap", "-L", "1G", "vg0/web1"],
        "undo": ["lvremove", "-f", "vg0/web1-snap"], "note": "", "state": "pending"}]
    j.done(i)
    # no write of its own: a pending entry is undone like a done one, so the mark waits
    assert on_disk(tmp_path)["entries"][0]["state"] == "pending"
    assert j.begin(STEPS[3]) == 1
    assert [e["state"] for e in on_disk(tmp_path)["entries"]] == ["done", "pending"]
    assert on_disk(tmp_path)["entries"][1]["undo"] is None


def test_load_after_a_crash_between_steps(tmp_path):
    j = Journal.create(tmp_path, "web1", "dom0b")
    j.done(j.begin(STEPS[0]))
    j.begin(STEPS[1])  # "crash" here: the map step never reported back
    del j
    loaded = Journal.load(tmp_path, "web1")
    assert [(e.phase, e.state) for e in loaded.entries] == [("snapshot", "done"), ("map", "pending")]
    assert loaded.entries[1].undo == ("kpartx", "-d", "/dev/vg0/web1-snap")
    assert loaded.peer == "dom0b"
    assert os.listdir(tmp_path / "journal") == ["web1.json"]  # no temp file left behind


def test_load_missing_is_none(tmp_path):
    assert Journal.load(tmp_path, "web1") is None
    assert Journal.domus(tmp_path) == []


def test_create_refuses_when_an_earlier_journal_is_left(tmp_path):
    j = Journal.create(tmp_path, "web1", "dom0b")
    j.begin(STEPS[0])
    with pytest.raises(TeardownError) as e:
        Journal.create(tmp_path, "web1", "dom0b")
    assert e.value.message == (f"an earlier run of web1 (PID {os.getpid()}, started {j.started}) "
                               f"left 1 step(s) to undo in {tmp_path}/journal/web1.json")
    assert e.value.hint == "run `domubackup cleanup web1` first"
    assert Journal.domus(tmp_path) == ["web1"]


def test_teardown_runs_undos_in_exact_reverse_order_and_removes_the_journal(tmp_path):
    j = journal_with_all_steps(tmp_path)
    rs, calls = runners()
    results = j.teardown(rs)
    assert per_host(calls) == per_host(UNDO_ORDER)  # the hosts tear down at the same time
    assert [(r.host, r.argv) for r in results] == [
        ("dom0b" if h == PEER else "dom0a", argv) for h, argv in UNDO_ORDER]
    assert os.listdir(tmp_path / "journal") == []


def test_pending_entries_are_undone_too(tmp_path):
    j = Journal.create(tmp_path, "web1", "dom0b")
    j.done(j.begin(STEPS[0]))
    j.begin(STEPS[1])
    rs, calls = runners()
    Journal.load(tmp_path, "web1").teardown(rs)
    assert calls == [(LOCAL, ("kpartx", "-d", "/dev/vg0/web1-snap")),
                     (LOCAL, ("lvremove", "-f", "vg0/web1-snap"))]


def test_failures_do_not_stop_teardown_and_are_all_listed_and_kept(tmp_path):
    j = journal_with_all_steps(tmp_path)
    rs, calls = runners({
        ("umount", "/run/domubackup/web1"): (32, "", "umount: /run/domubackup/web1: target is busy.\n"),
        ("lvremove", "-f", "vg0/web1-snap"): CommandError("dom0a", ("lvremove", "-f", "vg0/web1-snap"),
                                                          None, "", timeout=600),
    })
    with pytest.raises(TeardownError) as e:
        j.teardown(rs)
    assert per_host(calls) == per_host(UNDO_ORDER)  # every undo was tried
    assert e.value.message == (f"teardown of web1: 2 undo step(s) failed, kept in "
                               f"{tmp_path}/journal/web1.json")
    assert e.value.failures == [
        "dom0a: `umount /run/domubackup/web1` exited 32: umount: /run/domubackup/web1: target is busy.",
        "dom0a: `lvremove -f vg0/web1-snap`: on dom0a: `lvremove -f vg0/web1-snap` timed out after 600s",
    ]
    kept = on_disk(tmp_path)["entries"]
    assert [e["undo"] for e in kept] == [["lvremove", "-f", "vg0/web1-snap"],
                                         ["umount", "/run/domubackup/web1"]]  # original order
    # the next cleanup retries only what failed, still in reverse order
    rs2, calls2 = runners()
    Journal.load(tmp_path, "web1").teardown(rs2)
    assert calls2 == [(LOCAL, ("umount", "/run/domubackup/web1")),
                      (LOCAL, ("lvremove", "-f", "vg0/web1-snap"))]
    assert not (tmp_path / "journal" / "web1.json").exists()


def test_already_gone_counts_as_success(tmp_path):
    j = journal_with_all_steps(tmp_path)
    rs, calls = runners({
        ("umount", "/srv/replica/web1"): (32, "", "umount: /srv/replica/web1: not mounted.\n"),
        ("rmdir", "/run/domubackup/web1"): (
            1, "", "rmdir: failed to remove '/run/domubackup/web1': No such file or directory\n"),
        ("lvremove", "-f", "vg0/web1-snap"): (5, "", '  Failed to find logical volume "vg0/web1-snap"\n'),
    })
    j.teardown(rs)
    assert len(calls) == 5
    assert not (tmp_path / "journal" / "web1.json").exists()


def test_missing_peer_runner_fails_that_entry_only(tmp_path):
    j = journal_with_all_steps(tmp_path)
    calls = []
    with pytest.raises(TeardownError) as e:
        j.teardown({LOCAL: FakeRunner("dom0a", LOCAL, calls=calls)})
    assert calls == UNDO_ORDER[1:]
    assert e.value.failures == ["peer: `umount /srv/replica/web1` not run: no connection to peer dom0b"]
    assert [x["host"] for x in on_disk(tmp_path)["entries"]] == ["peer"]


def test_peer_error_during_undo_is_a_failure(tmp_path):
    j = journal_with_all_steps(tmp_path)
    rs, calls = runners({("umount", "/srv/replica/web1"): PeerError("cannot connect to dom0b: Connection refused")})
    with pytest.raises(TeardownError) as e:
        j.teardown(rs)
    assert len(calls) == 5
    assert e.value.failures == ["dom0b: `umount /srv/replica/web1`: cannot connect to dom0b: Connection refused"]



def test_unreachable_peer_is_tried_once_its_other_undos_reported_and_kept(tmp_path):
    """A connect timeout per undo would make a dead peer's teardown last N x connect_timeout;
    a command that fails there (CommandError) does not stop the others."""
    j = Journal.create(tmp_path, "web1", "dom0b")
    peer_steps = [Step("map", PEER, ("kpartx", "-a", "/dev/vg0/web1"), ("kpartx", "-d", "/dev/vg0/web1")),
                  Step("mount", PEER, ("mount", "/dev/mapper/vg0-web1p1", "/t"), ("umount", "/t")),
                  Step("mount", PEER, ("mount", "/dev/mapper/vg0-web1p5", "/t/var"), ("umount", "/t/var"))]
    for step in STEPS[:3] + peer_steps:
        j.done(j.begin(step))
    rs, calls = runners({("umount", "/t/var"): CommandError("dom0b", ("umount", "/t/var"), 32, "target is busy"),
                         ("umount", "/t"): PeerError("connection to dom0b timed out after 10s")})
    with pytest.raises(TeardownError) as e:
        j.teardown(rs)
    assert per_host(calls)[PEER] == [("umount", "/t/var"), ("umount", "/t")]  # not kpartx -d
    assert len(per_host(calls)[LOCAL]) == 3
    assert e.value.failures == ["dom0b: `umount /t/var`: on dom0b: `umount /t/var` exited 32: target is busy",
                                "dom0b: `umount /t`: connection to dom0b timed out after 10s",
                                "dom0b: `kpartx -d /dev/vg0/web1` not run: dom0b unreachable"]
    assert [x["undo"][0] for x in on_disk(tmp_path)["entries"]] == ["kpartx", "umount", "umount"]

def test_atomic_write_leaves_old_content_when_the_write_fails(tmp_path, monkeypatch):
    j = Journal.create(tmp_path, "web1", "dom0b")
    j.done(j.begin(STEPS[0]))
    before = (tmp_path / "journal" / "web1.json").read_bytes()

    def crash(*a):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        j.begin(STEPS[1])
    monkeypatch.undo()
    assert (tmp_path / "journal" / "web1.json").read_bytes() == before
    assert os.listdir(tmp_path / "journal") == ["web1.json"]
    assert len(json.loads(before)["entries"]) == 1


def killed_mid_write(tmp_path, domu="web1"):
    """What a kill -9 inside atomic_write leaves: the temp file beside the journal."""
    path = tmp_path / "journal" / f".{domu}.json.k1ll_9x.tmp"
    path.parent.mkdir(exist_ok=True)
    path.write_text('{"domu": "' + domu + '", "entries": [')  # cut short
    return path


def test_a_write_cut_by_a_kill_is_listed_and_swept_without_touching_the_journal(tmp_path):
    j = Journal.create(tmp_path, "web1", "dom0b")
    j.done(j.begin(STEPS[0]))
    before = (tmp_path / "journal" / "web1.json").read_bytes()
    tmp = killed_mid_write(tmp_path)
    other = killed_mid_write(tmp_path, "web1.json.x")  # another DomU whose name starts alike
    assert Journal.domus(tmp_path) == ["web1", "web1.json.x"]
    assert Journal.sweep(tmp_path, "web1") == [str(tmp)]
    assert sorted(os.listdir(tmp_path / "journal")) == [other.name, "web1.json"]
    assert (tmp_path / "journal" / "web1.json").read_bytes() == before
    assert [e.argv for e in Journal.load(tmp_path, "web1").entries] == [STEPS[0].argv]
    assert Journal.sweep(tmp_path, "web1") == []


def test_a_temp_file_alone_still_names_its_domu(tmp_path):
    # killed during the very first write (Journal.create): no journal, only its temp file
    killed_mid_write(tmp_path)
    assert Journal.domus(tmp_path) == ["web1"]
    assert Journal.load(tmp_path, "web1") is None
    Journal.sweep(tmp_path, "web1")
    assert Journal.domus(tmp_path) == [] and os.listdir(tmp_path / "journal") == []


def test_unreadable_journal_is_reported(tmp_path):
    (tmp_path / "journal").mkdir()
    (tmp_path / "journal" / "web1.json").write_text("{trunc")
    with pytest.raises(Exception) as e:
        Journal.load(tmp_path, "web1")
    assert e.value.message.startswith(f"the journal {tmp_path}/journal/web1.json is unreadable: ")


def test_bad_domu_name_is_refused(tmp_path):
    with pytest.raises(ValueError):
        Journal.create(tmp_path, "../etc", "dom0b")


def r(code, stderr="", stdout=""):
    return Result("h", (), code, stdout, stderr)


@pytest.mark.parametrize("argv, result, gone", [
    # real messages captured on this machine (LC_ALL=C)
    (["umount", "/tmp/x"], r(32, "umount: /tmp/x: not mounted.\n"), True),
    (["umount", "/tmp/nope"], r(32, "umount: /tmp/nope: no mount point specified.\n"), True),
    (["umount", "-l", "/tmp/x"], r(32, "umount: /tmp/x: mountpoint not found\n"), True),
    (["umount", "/tmp/x"], r(32, "umount: /tmp/x: target is busy.\n"), False),
    (["rmdir", "/tmp/nope"], r(1, "rmdir: failed to remove '/tmp/nope': No such file or directory\n"), True),
    (["rmdir", "/tmp/full"], r(1, "rmdir: failed to remove '/tmp/full': Directory not empty\n"), False),
    (["lvremove", "-f", "vg/nolv"], r(5, '  Failed to find logical volume "vg/nolv"\n'), True),
    (["lvremove", "-f", "vg0/nolv"], r(5, '  Volume group "vg0" not found\n  Cannot process volume group vg0\n'), True),
    (["lvremove", "-f", "vg/snap"], r(5, '  Logical volume vg/snap contains a filesystem in use.\n'), False),
    (["/usr/sbin/kpartx", "-d", "/dev/vg/x"], r(1, "", "failed to stat() /dev/vg/x\n"), True),
    (["kpartx", "-a", "/dev/vg/x"], r(1, "", "failed to stat() /dev/vg/x\n"), False),
    (["kpartx", "-d", "/dev/vg/x"], r(1, "device mapper prerequisites not met\n"), False),
    (["dmsetup", "remove", "x"], r(1, "device-mapper: remove ioctl on x  failed: No such device or address\nCommand failed.\n"), True),
    (["dmsetup", "remove", "x"], r(1, "device-mapper: remove ioctl on x  failed: Device or resource busy\nCommand failed.\n"), False),
    (["virsh", "domfsthaw", "web1"], r(1, "error: Unable to thaw filesystems\nerror: Requested operation is not valid: domain is not running\n"), True),
    (["virsh", "domfsthaw", "web1"], r(1, "error: failed to get domain 'web1'\n"), True),
    (["virsh", "domfsthaw", "web1"], r(1, "error: Guest agent is not responding: QEMU guest agent is not connected\n"), False),
    (["virsh", "domfsfreeze", "web1"], r(1, "error: Requested operation is not valid: domain is not running\n"), False),
    (["umount", "/tmp/x"], r(0), False),
    (["rm", "/tmp/nope"], r(1, "rm: cannot remove '/tmp/nope': No such file or directory\n"), False),
])
def test_already_gone(argv, result, gone):
    assert already_gone(argv, result) is gone


def test_hosts_tear_down_at_the_same_time(tmp_path):
    # The peer's umount waits (at most 5 s) for this host's last undo: it only sees it when
    # both hosts' undos run at the same time, not one host after the other.
    import threading
    local_done = threading.Event()
    seen = []

    class Peer(FakeRunner):
        def _execute(self, argv, env, input, timeout):
            seen.append(local_done.wait(5))
            return super()._execute(argv, env, input, timeout)

    class Local(FakeRunner):
        def _execute(self, argv, env, input, timeout):
            if argv[0] == "lvremove":
                local_done.set()
            return super()._execute(argv, env, input, timeout)

    j = journal_with_all_steps(tmp_path)
    calls = []
    j.teardown({LOCAL: Local("dom0a", LOCAL, calls=calls), PEER: Peer("dom0b", PEER, calls=calls)})
    assert seen == [True]
    assert per_host(calls) == per_host(UNDO_ORDER)


def two_snapshots(tmp_path):
    j = Journal.create(tmp_path, "web1", "dom0b")
    for lv in ("web1-disk", "web1-srv"):
        j.done(j.begin(Step("snapshot", LOCAL, ("lvcreate", "-s", "-n", f"{lv}-snap", f"vg0/{lv}"),
                            ("lvremove", "-f", f"/dev/vg0/{lv}-snap"))))
    j.done(j.begin(STEPS[2]))  # mkdir
    return j


def test_neighbouring_lvremoves_run_as_one_command(tmp_path):
    rs, calls = runners()
    two_snapshots(tmp_path).teardown(rs)
    assert calls == [(LOCAL, ("rmdir", "/run/domubackup/web1")),
                     (LOCAL, ("lvremove", "-f", "/dev/vg0/web1-srv-snap", "/dev/vg0/web1-disk-snap"))]
    assert os.listdir(tmp_path / "journal") == []


def test_a_failed_batch_is_retried_one_by_one_and_keeps_only_the_failure(tmp_path):
    both = ("lvremove", "-f", "/dev/vg0/web1-srv-snap", "/dev/vg0/web1-disk-snap")
    busy = (5, "", '  Logical volume vg0/web1-disk-snap contains a filesystem in use.\n')
    rs, calls = runners({both: busy, ("lvremove", "-f", "/dev/vg0/web1-disk-snap"): busy,
                         ("lvremove", "-f", "/dev/vg0/web1-srv-snap"):
                             (5, "", '  Failed to find logical volume "vg0/web1-srv-snap"\n')})
    with pytest.raises(TeardownError) as e:
        two_snapshots(tmp_path).teardown(rs)
    assert [a for _, a in calls] == [("rmdir", "/run/domubackup/web1"), both,
                                     ("lvremove", "-f", "/dev/vg0/web1-srv-snap"),
                                     ("lvremove", "-f", "/dev/vg0/web1-disk-snap")]
    assert e.value.failures == ["dom0a: `lvremove -f /dev/vg0/web1-disk-snap` exited 5: "
                                "Logical volume vg0/web1-disk-snap contains a filesystem in use."]
    assert [x["undo"] for x in on_disk(tmp_path)["entries"]] == [["lvremove", "-f", "/dev/vg0/web1-disk-snap"]]


def test_any_exception_of_an_undo_is_a_failure_and_the_other_undos_run(tmp_path):
    # not only DomuBackupError: a bug in a runner (or an OSError of the machine) must not
    # leave the rest of the teardown undone
    j = journal_with_all_steps(tmp_path)
    rs, calls = runners({("umount", "/run/domubackup/web1"): RuntimeError("runner bug"),
                         ("rmdir", "/run/domubackup/web1"): OSError(24, "Too many open files")})
    with pytest.raises(TeardownError) as e:
        j.teardown(rs)
    assert per_host(calls) == per_host(UNDO_ORDER)  # every undo was tried
    assert e.value.failures == ["dom0a: `umount /run/domubackup/web1`: RuntimeError: runner bug",
                                "dom0a: `rmdir /run/domubackup/web1`: OSError: [Errno 24] Too many open files"]
    assert [x["undo"] for x in on_disk(tmp_path)["entries"]] == [["rmdir", "/run/domubackup/web1"],
                                                                 ["umount", "/run/domubackup/web1"]]


def test_a_batch_that_raises_is_retried_one_by_one(tmp_path):
    both = ("lvremove", "-f", "/dev/vg0/web1-srv-snap", "/dev/vg0/web1-disk-snap")
    rs, calls = runners({both: KeyError("x")})
    two_snapshots(tmp_path).teardown(rs)
    assert [a for _, a in calls] == [("rmdir", "/run/domubackup/web1"), both,
                                     ("lvremove", "-f", "/dev/vg0/web1-srv-snap"),
                                     ("lvremove", "-f", "/dev/vg0/web1-disk-snap")]
    assert os.listdir(tmp_path / "journal") == []


@pytest.mark.parametrize("host, argv, undo, problem", [
    (LOCAL, ["mount", "/dev/x", "/t"], ("umount", "/t"), "argv ['mount', '/dev/x', '/t'] is not a non-empty tuple of strings"),
    (LOCAL, (), ("umount", "/t"), "argv () is not a non-empty tuple of strings"),
    (LOCAL, ("mount", 3), ("umount", "/t"), "argv ('mount', 3) is not a non-empty tuple of strings"),
    (LOCAL, ("mount", "/dev/x", "/t"), (), "undo () is not a non-empty tuple of strings"),
    (LOCAL, ("mount", "/dev/x", "/t"), "umount /t", "undo 'umount /t' is not a non-empty tuple of strings"),
    (LOCAL, ("mount", "/dev/x", "/t\0"), ("umount", "/t"), "argv word '/t\\x00' contains a NUL character"),
    (LOCAL, ("mount", "/dev/x", "/t"), ("umount", "/t\udcff"),
     "undo word '/t\\udcff' is not valid UTF-8 (a lone surrogate)"),
    (LOCAL, ("mount", "/dev/x", "/t"), ("-rf", "/"), "undo '-rf' is not a program name"),
    (PEER, ("mount", "/dev/x", "/t"), ("LD_PRELOAD=/t/x.so", "umount", "/t"),
     "undo 'LD_PRELOAD=/t/x.so' is not a program name"),
    ("", ("mount", "/dev/x", "/t"), ("umount", "/t"), "host '' is not a host name"),
    (None, ("mount", "/dev/x", "/t"), ("umount", "/t"), "host None is not a host name"),
])
def test_begin_refuses_a_step_that_is_not_argv_shaped_and_writes_nothing(tmp_path, host, argv, undo, problem):
    j = Journal.create(tmp_path, "web1", "dom0b")
    j.done(j.begin(STEPS[0]))
    before = (tmp_path / "journal" / "web1.json").read_bytes()
    with pytest.raises(ValueError) as e:
        j.begin_many([STEPS[1], Step("mount", host, argv, undo)])
    assert str(e.value) == f"journal of web1: refusing step 'mount' on {host!r} {argv!r}: {problem}"
    assert (tmp_path / "journal" / "web1.json").read_bytes() == before  # none of the two
    assert len(j.entries) == 1


def test_begin_accepts_a_step_without_undo(tmp_path):
    j = Journal.create(tmp_path, "web1", "dom0b")
    assert j.begin(Step("check", LOCAL, ("blkid", "/dev/x"), None)) == 0


@pytest.mark.parametrize("entry", [
    {"phase": "mount", "host": "local", "argv": "rm -rf /", "undo": None},  # a string, not words
    {"phase": "mount", "host": "local", "argv": ["mount"], "undo": "rm -rf /"},
    {"phase": "mount", "host": "local", "argv": ["mount"], "undo": ["-rf", "/"]},
    {"phase": "mount", "host": "local", "argv": ["mount"], "undo": ["X=1", "umount"]},
    {"phase": "mount", "host": "local", "argv": ["mount"], "undo": ["umount", "/t\u0000"]},
    {"phase": "mount", "host": "local", "argv": ["mount"], "undo": ["umount", "\udc80"]},
    {"phase": "mount", "host": "local", "argv": ["mount"], "undo": ["umount", 1]},
    {"phase": "mount", "host": "local", "argv": [], "undo": ["umount", "/t"]},
    {"phase": "mount", "host": "", "argv": ["mount"], "undo": ["umount", "/t"]},
    {"phase": "mount", "host": 1, "argv": ["mount"], "undo": ["umount", "/t"]},
    {"phase": 1, "host": "local", "argv": ["mount"], "undo": ["umount", "/t"]},
    {"phase": "mount", "host": "local", "argv": ["mount"], "undo": ["umount", "/t"], "state": "skip"},
    {"phase": "mount", "host": "local", "undo": ["umount", "/t"]},
    ["mount", "umount"],
])
def test_load_refuses_an_entry_that_is_not_of_the_written_shape(tmp_path, entry):
    (tmp_path / "journal").mkdir()
    good = {"phase": "map", "host": "local", "argv": ["kpartx", "-a", "/x"], "undo": ["kpartx", "-d", "/x"]}
    (tmp_path / "journal" / "web1.json").write_text(json.dumps({"domu": "web1", "entries": [good, entry]}))
    with pytest.raises(DomuBackupError) as e:
        Journal.load(tmp_path, "web1")
    assert e.value.message.startswith(f"the journal {tmp_path}/journal/web1.json is unreadable: ")
    assert e.value.hint == "undo its steps by hand, then remove it"


def test_load_accepts_what_begin_wrote(tmp_path):
    journal_with_all_steps(tmp_path)
    loaded = Journal.load(tmp_path, "web1")
    assert [(e.host, e.argv, e.undo) for e in loaded.entries] == [(s.host, s.argv, s.undo) for s in STEPS]


TREE = "/mnt/domubackup/target/web1"


def three_mounts(tmp_path, states=("done", "done", "done")):
    j = Journal.create(tmp_path, "web1", "dom0b")
    for (path, dev), state in zip((("/", "/dev/p1"), ("/srv", "/dev/p2"), ("/var", "/dev/p5")), states):
        i = j.begin(Step("peer-mount", PEER, ("domubackup", "mount-in", "--mkdir", "--", TREE, path, dev, "ext4", "rw"),
                         ("domubackup", "umount-in", "--", TREE, path, dev)))
        if state == "done":
            j.done(i)
    return j


def test_a_trees_unmounts_run_as_one_helper_and_a_failed_batch_skips_what_it_did(tmp_path):
    rs, calls = runners()
    three_mounts(tmp_path).teardown(rs)
    assert [a for _, a in calls] == [("domubackup", "umount-in", "--", TREE, "/var", "/dev/p5", "/srv", "/dev/p2",
                                      "/", "/dev/p1")]
    # the batch unmounted /var, then /srv was busy: /srv and / run alone, /var is not tried again
    batch = ("domubackup", "umount-in", "--", TREE, "/var", "/dev/p5", "/srv", "/dev/p2", "/", "/dev/p1")
    busy = (32, "", f"umount-in: umount of '{TREE}/srv' failed: Device or resource busy\n")
    rs, calls = runners({batch: (32, "unmounted /var\n", busy[2]),
                         ("domubackup", "umount-in", "--", TREE, "/srv", "/dev/p2"): busy})
    with pytest.raises(TeardownError) as e:
        three_mounts(tmp_path).teardown(rs)
    assert [a for _, a in calls] == [batch, ("domubackup", "umount-in", "--", TREE, "/srv", "/dev/p2"),
                                     ("domubackup", "umount-in", "--", TREE, "/", "/dev/p1")]
    assert len(e.value.failures) == 1 and "Device or resource busy" in e.value.failures[0]


def test_a_mount_the_run_saw_that_is_gone_is_a_failure_a_pending_one_is_not(tmp_path):
    gone = (32, "", f"umount-in: '{TREE}/var': not mounted (no such directory)\n")
    script = {("domubackup", "umount-in", "--", TREE, "/var", "/dev/p5"): gone}
    rs, calls = runners(script)
    three_mounts(tmp_path, states=("done", "done", "pending")).teardown(rs)  # /var never ran: fine
    assert calls[0] == (PEER, ("domubackup", "umount-in", "--", TREE, "/var", "/dev/p5"))  # alone, first
    assert calls[1:] == [(PEER, ("domubackup", "umount-in", "--", TREE, "/srv", "/dev/p2", "/", "/dev/p1"))]
    rs, calls = runners(script | {("domubackup", "umount-in", "--", TREE, "/var", "/dev/p5", "/srv", "/dev/p2",
                                   "/", "/dev/p1"): gone})
    with pytest.raises(TeardownError) as e:  # /var was mounted and seen: someone else unmounted it
        three_mounts(tmp_path).teardown(rs)
    assert e.value.failures == [f"dom0b: `domubackup umount-in -- {TREE} /var /dev/p5` exited 32: "
                                f"umount-in: '{TREE}/var': not mounted (no such directory)"]


def test_unseen_mounts_may_be_gone_at_teardown(tmp_path):
    # an invalid snapshot's filesystems are unmounted by LVM's dmeventd: the run says so first
    gone = (32, "", f"umount-in: '{TREE}/var': not mounted (no such directory)\n")
    rs, calls = runners({("domubackup", "umount-in", "--", TREE, "/var", "/dev/p5", "/srv", "/dev/p2",
                          "/", "/dev/p1"): gone,
                         ("domubackup", "umount-in", "--", TREE, "/var", "/dev/p5"): gone})
    j = three_mounts(tmp_path)
    j.unseen(PEER, ("domubackup", "umount-in"))
    j.teardown(rs)  # no TeardownError
    assert [e.state for e in j.entries] == []
