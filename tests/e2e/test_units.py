"""The Debian package's systemd units on a real Debian 12 with systemd as PID 1 (issue 18): the
timer enabled as README says, the service it starts backs web1 up, and a failed night starts
domubackup-failure@, which (no mailer in the lab) writes the run log to the journal."""

import time

import labvm
from e2ehelp import manifest, tree

UNIT = "domubackup.service"
FAILURE = "domubackup-failure@domubackup.service.service"


def show(lab, unit, *props):
    out = lab.ssh("dom0a", ["systemctl", "show", "-p", ",".join(props), unit]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_the_timer_starts_a_night_and_a_failed_night_reaches_root(fresh):
    lab = fresh
    try:
        lab.ssh("dom0a", ["systemctl", "enable", "--now", "domubackup.timer"])
        assert show(lab, "domubackup.timer", "UnitFileState", "ActiveState") == {
            "UnitFileState": "enabled", "ActiveState": "active"}
        timers = lab.ssh("dom0a", ["systemctl", "list-timers", "--all", "domubackup.timer"]).stdout
        assert "domubackup.timer" in timers and "domubackup.service" in timers, timers

        # what the timer starts at night, started now: the package's ExecStart, config and units
        tree(lab, "dom0a", "mount")
        try:
            tree(lab, "dom0a", "change")
        finally:
            tree(lab, "dom0a", "umount")
        r = lab.ssh("dom0a", ["systemctl", "start", UNIT], check=False, timeout=900)
        assert r.returncode == 0, lab.ssh("dom0a", ["journalctl", "-u", UNIT, "-n", "40"]).stdout
        assert show(lab, UNIT, "Result", "ExecMainStatus") == {"Result": "success", "ExecMainStatus": "0"}
        assert manifest(lab, "dom0a") == manifest(lab, "dom0b")
        journal = lab.ssh("dom0a", ["journalctl", "-u", UNIT, "-o", "cat"]).stdout
        assert "web1 -> dom0b" not in journal  # no progress bars without a terminal

        # a failed night: web1 runs on the peer too (refused), the unit fails, root is told
        lab.ssh("dom0b", ["sed", "-i", "s|<test:runstate>5</test:runstate>|<test:runstate>1</test:runstate>|",
                          "/etc/domubackup/lab-node.xml"])
        r = lab.ssh("dom0a", ["systemctl", "start", UNIT], check=False, timeout=900)
        assert r.returncode != 0
        assert show(lab, UNIT, "Result", "ExecMainStatus") == {"Result": "exit-code", "ExecMainStatus": "1"}
        deadline = time.monotonic() + 120
        text = ""
        while time.monotonic() < deadline:
            text = lab.ssh("dom0a", ["journalctl", "-u", FAILURE, "-o", "cat"]).stdout
            if "refusing to overwrite the disks of a live DomU" in text:
                break
            time.sleep(2)
        assert "web1 is running on dom0b: refusing to overwrite the disks of a live DomU" in text, text
        assert "/var/lib/domubackup/log/web1-backup-" in text  # the newest run log, named
        assert show(lab, FAILURE, "Result")["Result"] == "success"
    finally:
        labvm.push_files("dom0b", {"/etc/domubackup/lab-node.xml": (labvm.node_xml("dom0b"), 0o644)})
        lab.ssh("dom0a", ["systemctl", "disable", "--now", "domubackup.timer"], check=False)
        lab.ssh("dom0a", ["systemctl", "reset-failed"], check=False)
