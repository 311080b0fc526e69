"""e2e fixtures: the two-VM lab (tests/lab/lab).

`lab` (session): takes the machine-wide lab session lock (other test sessions wait), brings the
lab up once (`tests/lab/lab up`, which installs the working tree; a lab that was already up is
also `reset`), and brings it down at the end if it was not up before the session. If the lab
cannot come up the tests fail (error), unless DOMUBACKUP_SKIP_E2E=1 is set: then they skip.

A module that sets `LAB_SERVE = True` runs with the lab in serve mode (each VM runs its peer's
key only through `domubackup serve`: tests/lab/labvm.py SERVE); DOMUBACKUP_LAB_SERVE=1 runs
every module so.

Every e2e test also gets `_no_leftovers` (autouse): after the test, `lab leftovers` must be clean
on both VMs; otherwise the leftovers are cleaned up (so later tests start clean) and the test
fails in teardown.
"""

import os
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "lab"))
import labvm  # noqa: E402
from labapi import Lab  # noqa: E402


@pytest.fixture(scope="session")
def lab():
    if os.environ.get("DOMUBACKUP_SKIP_E2E") == "1":
        pytest.skip("DOMUBACKUP_SKIP_E2E=1")
    if os.geteuid() != 0:
        pytest.fail("the e2e lab needs root", pytrace=False)
    lab = Lab()
    with lab.session_lock():
        was_up = lab.is_up()
        result = lab.cli("up", check=False)
        if result.returncode != 0:
            pytest.fail(f"lab up failed (exit {result.returncode}):\n{result.stdout[-5000:]}",
                        pytrace=False)
        try:
            if was_up:
                lab.reset()  # a lab left running may hold anything: start from fresh web1 disks
            yield lab
        finally:
            if not was_up:
                lab.down()


@pytest.fixture(autouse=True, scope="module")
def _lab_mode(request, lab):
    """The module's LAB_SERVE: the lab reset into serve mode for it, and back after it."""
    if not getattr(request.module, "LAB_SERVE", False) or labvm.SERVE:
        yield
        return
    labvm.SERVE = True
    os.environ["DOMUBACKUP_LAB_SERVE"] = "1"  # for `lab reset` (a subprocess)
    try:
        lab.reset()
        yield
    finally:
        labvm.SERVE = False
        del os.environ["DOMUBACKUP_LAB_SERVE"]
        lab.reset()


@pytest.fixture(autouse=True)
def _no_leftovers(lab):
    yield
    rc, text = lab.leftovers()
    if rc != 0:
        lab.cleanup()
        pytest.fail(f"leftovers after the test:\n{text}", pytrace=False)


@pytest.fixture
def fresh(lab):
    """The lab with fresh web1 disks, node files and config on both VMs."""
    lab.reset()
    return lab
