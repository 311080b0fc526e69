"""Helpers of the e2e tests: run domubackup in the lab VMs, hold a run at a step boundary."""

import pathlib
import time
from contextlib import contextmanager

TOOL = (pathlib.Path(__file__).parent / "treetool.py").read_text()
STATE = "/var/lib/domubackup"


def tree(lab, vm, cmd, check=True):
    return lab.ssh(vm, ["python3", "-", cmd], input=TOOL, timeout=600, check=check)


def manifest(lab, vm):
    import json
    tree(lab, vm, "mount")
    try:
        return json.loads(tree(lab, vm, "manifest").stdout)
    finally:
        tree(lab, vm, "umount")


# The xxh64 of a whole file or device (fast under emulation, unlike sha256sum), read past the
# page cache: a device's cached pages are dropped first (a write through a partition mapping
# on it leaves the LV's own cached pages stale, which udev's probes fill): `python3 -c XXH PATH`
# on a lab VM.
XXH = ("import os, sys, xxhash\nh = xxhash.xxh64()\nwith open(sys.argv[1], 'rb') as f:\n"
       "    os.fsync(f.fileno())\n    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)\n"
       "    for b in iter(lambda: f.read(4 << 20), b''):\n        h.update(b)\nprint(h.hexdigest())")


def domubackup(lab, *args, vm="dom0a", check=False, timeout=900):
    return lab.ssh(vm, ["domubackup", *args], check=check, timeout=timeout)


def start_paused(lab, phase, args="run web1", vm="dom0a", domu="web1"):
    """Start `domubackup ARGS` in the background, held before the first step of PHASE.
    Returns its PID once it waits there."""
    flag = f"{STATE}/pause/{domu}.{phase}"
    r = lab.ssh(vm, f"rm -f {flag}; DOMUBACKUP_TEST_PAUSE={phase} setsid domubackup {args} "
                    f"> /tmp/paused.out 2>&1 < /dev/null & echo $!")
    pid = int(r.stdout.strip())
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if lab.ssh(vm, ["test", "-e", flag], check=False).returncode == 0:
            return pid
        if lab.ssh(vm, ["kill", "-0", str(pid)], check=False).returncode != 0:
            raise AssertionError("the run ended before pausing: " + lab.ssh(vm, "cat /tmp/paused.out").stdout)
        time.sleep(0.5)
    raise AssertionError(f"no pause at {phase}")


def release(lab, phase, pid, vm="dom0a", timeout=600, domu="web1"):
    """Let a paused run go on; wait for it and return (its exit status, its output)."""
    lab.ssh(vm, ["rm", "-f", f"{STATE}/pause/{domu}.{phase}"])
    deadline = time.monotonic() + timeout
    while lab.ssh(vm, ["kill", "-0", str(pid)], check=False).returncode == 0:
        if time.monotonic() > deadline:
            raise AssertionError("the run did not end")
        time.sleep(0.5)
    return lab.ssh(vm, "cat /tmp/paused.out").stdout


def kill9(lab, pid, vm="dom0a"):
    lab.ssh(vm, ["kill", "-9", str(pid)])
    while lab.ssh(vm, ["kill", "-0", str(pid)], check=False).returncode == 0:
        time.sleep(0.2)


@contextmanager
def extra_domu(lab, name, uuid, disks, *, unmap="", setup="", teardown="", runs_on="dom0a", peers=True, keys=""):
    """The lab (reset) with one more DomU NAME on DISKS [(LV, target dev)]: running on RUNS_ON,
    shut off on the other, each Dom0 the other's peer (PEERS false: its config section names no
    peers: they are the dom0s but the host it runs on). Its LVs are removed before (a killed run of
    the module may have left them) and after, UNMAP first; SETUP and TEARDOWN (sh) run on both
    VMs too; KEYS (TOML lines) go into its config section. The caller creates the LVs."""
    import labvm

    dom = labvm.NODE_DOMAIN.format(name=name, uuid=uuid, state="{state}",
                                   disks="".join(labvm.DISK.format(dev=d, target=t) for d, t in disks))
    lvs = " ".join(d for d, _ in disks)
    lab.reset()
    try:
        for vm in lab.vms:
            xml = labvm.node_xml(vm).replace("</node>", dom.format(
                state=labvm.RUNNING if vm == runs_on else labvm.SHUTOFF) + "</node>")
            labvm.push_files(vm, {"/etc/domubackup/lab-node.xml": (xml, 0o644)})
            peer = [v for v in lab.vms if v != vm][0]
            section = f"\\n[domu.{name}]\\n" + (f"peers = [\"{peer}\"]\\n" if peers else "") + \
                "".join(f"{line}\\n" for line in keys.splitlines())
            lab.ssh(vm, f"printf '{section}' >> /etc/domubackup/domubackup.toml; {setup or ':'}")
            lab.ssh(vm, f"{unmap or ':'}; lvremove -q -f {lvs}", check=False)
        yield lab
    finally:
        for vm in lab.vms:
            lab.ssh(vm, f"{unmap or ':'}; lvremove -q -f {lvs}; {teardown or ':'}", check=False)
        lab.reset()
