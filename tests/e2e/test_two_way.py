"""One configuration file for every Dom0 (issue 18, item 8): the same file on both lab VMs, a
DomU running on each (web1 on dom0a, back1 on dom0b), no `peers` anywhere: each Dom0 copies its
own DomU to the other. Both nightly `run`s start at the same moment (each Dom0 is source and
peer at once); both end OK, each backed up only the DomU that runs on it, and `lab leftovers`
is clean (the autouse fixture)."""

import hashlib
import json
import threading

import labvm
from e2ehelp import domubackup, extra_domu

DISK = "/dev/vg0/back1-disk"
CONF = "/etc/domubackup/domubackup.toml"

# through the restricted peer (conftest: `domubackup serve` as each key's forced command): each Dom0 served by the other, a layout without fstab
LAB_SERVE = True


def test_one_config_both_dom0s_back_up_each_other_at_once(lab):
    with extra_domu(lab, "back1", "6b1e7b3a-1f0e-4c59-9d5a-7a3c0e0b0888", [(DISK, "xvda")], runs_on="dom0b",
                    peers=False):
        lab.ssh("dom0b", f"set -e; lvcreate -q -y -Zy -Wy -L 64M -n back1-disk vg0; mkfs.ext4 -q -F -L back1 {DISK}; "
                         f"mkdir -p /mnt/b1; mount {DISK} /mnt/b1; echo from-dom0b > /mnt/b1/hello; umount /mnt/b1")
        # the same file on both: no this_host (the host name decides), no peers
        text = "\n".join(line for line in labvm.config_toml("dom0a").splitlines()
                         if not line.startswith(("this_host", "peers"))) + "\n\n[domu.back1]\n"
        for vm in lab.vms:
            labvm.push_files(vm, {CONF: (text, 0o644)})
        sums = {vm: lab.ssh(vm, ["sha256sum", CONF]).stdout.split()[0] for vm in lab.vms}
        assert len(set(sums.values())) == 1 and sums["dom0a"] == hashlib.sha256(text.encode()).hexdigest()
        r = domubackup(lab, "seed", "back1", vm="dom0b", timeout=900)
        assert r.returncode == 0, r.stdout + r.stderr
        results = {}

        def night(vm):
            results[vm] = domubackup(lab, "run", vm=vm, timeout=900)
        threads = [threading.Thread(target=night, args=(vm,)) for vm in lab.vms]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for vm, r in results.items():
            assert r.returncode == 0, f"{vm}: {r.stdout}{r.stderr}"
            assert "Traceback" not in r.stdout + r.stderr
        # each Dom0 recorded the DomU that runs on it, and only that one
        for vm, mine in (("dom0a", "web1"), ("dom0b", "back1")):
            runs = json.loads(domubackup(lab, "history", "--json", vm=vm).stdout)
            assert {(x["domu"], x["status"]) for x in runs} == {(mine, "OK")}, (vm, runs)
        # back1's replica on dom0a holds what the guest wrote on dom0b
        out = lab.ssh("dom0a", f"mkdir -p /mnt/b1; mount -o ro {DISK} /mnt/b1; cat /mnt/b1/hello; "
                               "umount /mnt/b1").stdout
        assert out == "from-dom0b\n", out
