"""Issue 4 in the lab: a small snapshot filled by the guest writer is extended, or the run stops
cleanly; a run is never reported OK with an invalid snapshot."""

import pytest

from e2ehelp import domubackup, release, start_paused


@pytest.fixture
def writing(lab):
    lab.reset()
    lab.ssh("dom0a", "sed -i '1i snapshot_size = \"32M\"\\nsnapshot_extend_by = \"128M\"' /etc/domubackup/domubackup.toml "
                     "&& sed -i '0,/^snapshot_size = \"256M\"/{/^snapshot_size = \"256M\"/d}' /etc/domubackup/domubackup.toml")
    lab.writer("start")
    yield lab
    lab.writer("stop")


def fill(lab, mib, step=2, pause=1.5):
    """The guest writes MIB MiB of new data to /srv (the origin of web1-srv-snap), STEP MiB at a
    time (the snapshot watch polls every 2 s)."""
    lab.ssh("dom0a", f"for i in $(seq 0 {mib // step - 1}); do dd if=/dev/urandom of=/mnt/guest/srv/fill.bin "
                     f"bs=1M count={step} seek=$((i*{step})) conv=notrunc,fsync status=none; sleep {pause}; done",
            timeout=600)


def test_filling_snapshot_is_extended(writing):
    lab = writing
    pid = start_paused(lab, "transfer")
    fill(lab, 28)  # > 80 % of 32 MiB: the watch extends the snapshot while the guest writes
    out = release(lab, "transfer", pid)
    assert "snapshot /dev/vg0/web1-srv-snap is" in out and "full: extending by 128M" in out, out
    h = domubackup(lab, "history", "--json", "web1").stdout
    assert '"status": "OK"' in h


def test_snapshot_that_cannot_grow_stops_the_run(writing):
    lab = writing
    free = int(lab.ssh("dom0a", ["vgs", "--noheadings", "--nosuffix", "--units", "m", "-o", "vg_free", "vg0"]).stdout.strip().split(".")[0])
    lab.ssh("dom0a", ["lvcreate", "-q", "-y", "-L", f"{free - 72}m", "-n", "filler", "vg0"])
    try:
        pid = start_paused(lab, "transfer")
        fill(lab, 40, step=8, pause=0)  # more than the 32 MiB snapshot holds, no room to grow
        out = release(lab, "transfer", pid)
    finally:
        lab.ssh("dom0a", ["lvremove", "-q", "-f", "vg0/filler"])
    assert "web1: OK" not in out
    assert "became invalid (100% full)" in out or "has no room to extend it" in out, out
    h = domubackup(lab, "history", "--json", "web1").stdout
    assert '"status": "OK"' not in h
    assert '"status": "CORRUPT"' in h or '"status": "ERROR"' in h
