"""Issue 19 in the lab: dom0b runs dom0a's key only through `domubackup serve --client dom0a`
(a forced command in root's authorized_keys). The night works through it (check, a files-mode
run with a restore point, a blocks-mode run, verify, seed, prune left to the peer), and what a
compromised dom0a would send with that key is refused and leaves dom0b as it was.

One lab setup for all of it; the plain root key is restored in a finally."""

import json
import shlex

import labvm
from e2ehelp import XXH, domubackup, manifest

CONF = "/etc/domubackup/domubackup.toml"
KEYS = "/root/.ssh/authorized_keys"
FORCED = 'command="domubackup serve --client dom0a",restrict '
T = "/mnt/domubackup/target"
XML = "/var/lib/domubackup/points/web1"
SSH = ("ssh -F none -o BatchMode=yes -o UserKnownHostsFile=/etc/domubackup/known_hosts "
       "-i /root/.ssh/id_ed25519 root@dom0b")
SRV = 1610612736  # bytes of web1-srv


def as_dom0a(lab, line, stdin="/dev/null"):
    """LINE sent to dom0b with dom0a's backup key, as any program on a compromised dom0a could."""
    return lab.ssh("dom0a", f"{SSH} {shlex.quote(line)} < {stdin}", check=False)


def dom0b_state(lab):
    """What a refused request must leave as it was on dom0b: LVs with their tags and sizes, the
    content of each restore point, mounts, the target tree, the points' domain XML."""
    return lab.ssh("dom0b", "lvs --noheadings -o lv_name,lv_tags,lv_size,lv_attr,origin vg0 | sort; "
                            "for p in $(lvs --noheadings -o lv_path @dbk:point); do "
                            f"echo $p $(python3 -c {shlex.quote(XXH)} $p); done; "
                            "findmnt -rn -o TARGET,SOURCE | grep -v '^/run/credentials/' | sort; "
                            f"find {T} {XML} /root -xdev -printf '%p %s %m\\n' 2>/dev/null | sort; "
                            f"md5sum {XML}/*.xml {KEYS} 2>/dev/null").stdout


def good_points(lab):
    rows = json.loads(domubackup(lab, "points", "--json", "web1", vm="dom0b", check=True).stdout)
    return sorted(p["name"] for p in rows if p["status"] == "GOOD")


def run_ok(lab, *args, vm="dom0a"):
    r = domubackup(lab, *args, vm=vm)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


def serve_mode(lab):
    """dom0b: dom0a's key forced to serve, web1 granted to dom0a alone, no prune from clients
    (whether or not the lab runs DOMUBACKUP_LAB_SERVE=1: this test's own [serve])."""
    lab.reset()
    labvm.push_files("dom0b", {
        KEYS: (labvm.authorized_keys("dom0b", serve=True), 0o600),
        CONF: (labvm.config_toml("dom0b", serve=False)
               + '\n[retention]\nkeep_last = 2\n\n[serve]\nclients = { dom0a = ["web1"] }\n', 0o644)})
    lab.ssh("dom0b", "lvchange -q --addtag dbk:domu:web1 vg0/web1-disk vg0/web1-srv")
    lab.ssh("dom0a", f"sed -i '1i point_size = \"64M\"' {CONF} && "
                     f"printf '\\n[retention]\\nkeep_last = 1\\n\\n[dom0.dom0b]\\nappend_only = true\\n' >> {CONF}")
    assert FORCED in lab.ssh("dom0b", ["cat", KEYS]).stdout


def plain_mode(lab):
    lab.reset()  # the lab's own keys and config again


def test_a_restricted_peer_serves_the_night_and_refuses_the_rest(lab):
    serve_mode(lab)
    try:
        night_through_serve(lab)
        refusals(lab)
    finally:
        plain_mode(lab)


def night_through_serve(lab):
    # seed (a full block copy) through serve, before there are points (it rewrites every block)
    out = run_ok(lab, "seed", "--force", "web1")
    assert out.count("matches") == 2, out
    r = domubackup(lab, "check")
    assert "dom0b restricts this host's key (domubackup serve): a shell command is refused there" in r.stdout, \
        r.stdout + r.stderr
    out = run_ok(lab, "run", "web1")
    assert manifest(lab, "dom0a") == manifest(lab, "dom0b")
    first = good_points(lab)
    assert len(first) == 1, out
    # blocks mode through serve: digests, the stream over OpenSSH, a point
    lab.ssh("dom0a", f"sed -i '1i mode = \"blocks\"' {CONF}")
    lab.ssh("dom0a", "mkdir -p /mnt/psrv && mount /dev/vg0/web1-srv /mnt/psrv && head -c 9M /dev/urandom > "
                     "/mnt/psrv/served; umount /mnt/psrv")
    out = run_ok(lab, "-v", "run", "web1")
    assert "xvdb: the changed blocks of" in out, out
    # retention keeps 1 on dom0a's side, but dom0b is append-only: its own prune decides
    assert "keeps its restore points append-only" in out, out
    assert good_points(lab) == sorted([*first, good_points(lab)[-1]]) and len(good_points(lab)) == 2
    for vg_lv in ("vg0/web1-disk", "vg0/web1-srv"):
        src = lab.ssh("dom0a", f"python3 -c {shlex.quote(XXH)} /dev/{vg_lv}").stdout
        assert lab.ssh("dom0b", f"python3 -c {shlex.quote(XXH)} /dev/{vg_lv}").stdout == src, vg_lv
    assert "verify OK" in run_ok(lab, "verify", "web1")
    # prune from dom0a leaves dom0b's points to dom0b ...
    out = run_ok(lab, "prune", "web1")
    assert f"web1: dom0b: would remove {first[0]} (" in out and "append-only: left to its own prune" in out, out
    assert len(good_points(lab)) == 2
    # ... and without append_only in dom0a's config, dom0b refuses the removal itself
    lab.ssh("dom0a", f"sed -i '/^append_only = true$/d' {CONF}")
    before = dom0b_state(lab)
    r = domubackup(lab, "prune", "web1")
    out = r.stdout + r.stderr
    assert r.returncode == 77 and "dom0b refused `lvchange --addtag dbk:state:pruning" in out \
        and "dom0a may not prune restore points" in out and "teardown" not in out, out
    assert dom0b_state(lab) == before
    lab.ssh("dom0a", f"sed -i 's/^\\[dom0.dom0b\\]$/&\\nappend_only = true/' {CONF}")
    # dom0b's own prune applies its own retention (keep_last = 2: nothing to remove yet)
    assert "removed" not in run_ok(lab, "prune", "web1", vm="dom0b")


def refusals(lab):
    points = good_points(lab)
    p = points[0]
    ungranted = ["/dev/vg0/idle1-disk"]
    lab.ssh("dom0b", "lvcreate -q -y -L 8M -n idle1-disk vg0 && lvchange -q --addtag dbk:domu:idle1 vg0/idle1-disk")
    before = dom0b_state(lab)
    t = "timeout -k 5 60 "
    tried = {
        # what the issue lists
        "a shell": (None, "an interactive session: this key runs only `domubackup serve` requests"),
        "id": ("id", "not a request of domubackup: id"),
        "sh -c": ("sh -c 'rm -rf /'", "not a request of domubackup"),
        "lvremove of a point": (f"{t}lvremove -f /dev/vg0/web1-srv.{p}",
                                f"dom0a may not remove restore point member /dev/vg0/web1-srv.{p}"),
        "rm under the target prefix": (f"{t}rm -rf -- {T}/web1", "not a form this host serves"),
        "mount outside the target prefix": (f"{t}domubackup mount-in -- /etc / /dev/vg0/web1-disk ext4 "
                                            "ro,nodev,nosuid,noexec", "is not under this host's target prefix"),
        "prune mark of a point": (f"{t}lvchange --addtag dbk:state:pruning /dev/vg0/web1-disk.{p}",
                                  "dom0a may not prune restore points"),
        "rollback": (f"{t}domubackup copy-blocks /dev/vg0/web1-srv.{p} /dev/vg0/web1-srv {SRV}",
                     "is not a command this host serves to dom0a"),
        "the CLI's rollback": (f"{t}domubackup rollback web1 {p}", "is not a command this host serves"),
        "an ungranted DomU's LV": (f"{t}domubackup receive-blocks {ungranted[0]} 8388608",
                                   "belongs to DomU idle1, which this host's [serve] clients does not grant to dom0a"),
        # what a compromised client would try on the points
        "untag a good point": (f"{t}lvchange --deltag dbk:state:good /dev/vg0/web1-srv.{p}", "not a form"),
        "deactivate a point": (f"{t}lvchange -an /dev/vg0/web1-srv.{p}", "not a form"),
        "rename a point": (f"{t}lvrename vg0 web1-srv.{p} x", "is not a command this host serves"),
        "shrink a point": (f"{t}lvreduce -f -L 4M /dev/vg0/web1-srv.{p}", "is not a command this host serves"),
        "write blocks into a point": (f"{t}domubackup receive-blocks /dev/vg0/web1-srv.{p} {SRV}",
                                      "is a restore point member: not writable this way"),
        "mark a point as a replica being written": (
            f"{t}lvchange --addtag dbk:writing --addtag dbk:domu:web1 /dev/vg0/web1-srv.{p}",
            "is a restore point member: not writable this way"),
        "mount a point read-write": (f"{t}domubackup mount-in --mkdir -- {T}/web1 / /dev/vg0/web1-disk.{p} ext4 "
                                     "rw,nodev,nosuid,noexec", "a restore point member: not writable this way"),
        "a point again under its name": (
            f"{t}lvcreate --snapshot --size 8M --name web1-srv.{p} --addtag dbk:point --addtag dbk:domu:web1 "
            f"--addtag dbk:state:pending /dev/vg0/web1-srv", "exists already: a restore point is never overwritten"),
        "overwrite a point's XML": (f"{t}install -D -m 0600 /dev/stdin {XML}/{p}.xml",
                                    "exists already: a restore point is never overwritten"),
        "remove a point's XML": (f"{t}rm -f -- {XML}/{p}.xml", "dom0a may not remove the domain XML"),
        "remove the replica (and its points)": (f"{t}lvremove -f /dev/vg0/web1-srv",
                                                "is not a restore point member: not writable this way"),
        "dd": (f"{t}dd if=/dev/zero of=/dev/vg0/web1-srv.{p}", "`dd if=/dev/zero"),
        "the env trick": (f"LD_PRELOAD=/tmp/x.so {t}id", "is not a command this host serves"),
        "a key for the peer": (f"{t}install -D -m 0600 /dev/stdin {KEYS}", "not a form"),
    }
    seen = {}
    for what, (line, why) in tried.items():
        r = lab.ssh("dom0a", f"{SSH} < /dev/null", check=False) if line is None else as_dom0a(lab, line)
        seen[what] = (r.returncode, r.stderr.strip())
        assert r.returncode == 77 and "domubackup serve: refused: " in r.stderr and why in r.stderr, (what, r.stderr)
    # rsync to a path outside the DomU's tree, and into its tree with .. or an option naming a path
    e = f"-e {shlex.quote(SSH.rsplit(' ', 1)[0])}"
    for what, (dest, why) in {
            "rsync outside": ("root@dom0b:/root/", "is not under this host's target prefix"),
            "rsync up from the tree": (f"root@dom0b:{T}/web1/../../../root/", "is not under"),
            "rsync into an ungranted tree": (f"root@dom0b:{T}/idle1/", "is not the tree of a DomU granted"),
            "rsync with a temp dir": (f"--temp-dir=/root root@dom0b:{T}/web1/", "rsync option --temp-dir")}.items():
        r = lab.ssh("dom0a", f"rsync -a {e} /etc/hostname {dest}", check=False)
        seen[what] = (r.returncode, r.stderr.strip())
        assert r.returncode != 0 and "domubackup serve: refused: " in r.stderr and why in r.stderr, (what, r.stderr)
    # a backup of a DomU dom0b does not grant to dom0a
    lab.ssh("dom0b", f"sed -i 's/^clients = .*/clients = {{ dom0a = [\"idle1\"] }}/' {CONF}")
    r = domubackup(lab, "run", "web1")
    seen["a run of an ungranted DomU"] = (r.returncode, (r.stdout + r.stderr).strip()[-300:])
    out = r.stdout + r.stderr
    assert r.returncode == 77 and "dom0b refused" in out \
        and ("not granted to dom0a" in out or "does not grant to dom0a" in out), out
    lab.ssh("dom0b", f"sed -i 's/^clients = .*/clients = {{ dom0a = [\"web1\"] }}/' {CONF}")
    after = dom0b_state(lab)
    assert after == before  # nothing of it changed dom0b: LVs, tags, points' content, mounts, files
    assert good_points(lab) == points
    refused = lab.ssh("dom0b", "journalctl -q -t domubackup-serve --no-pager | wc -l", check=False).stdout.strip()
    print("\n".join(f"{k}: exit {c}: {m.splitlines()[-1][:160]}" for k, (c, m) in seen.items()),
          f"\nrefusals in dom0b's auth log: {refused}")
    lab.ssh("dom0b", "lvremove -q -f vg0/idle1-disk")
