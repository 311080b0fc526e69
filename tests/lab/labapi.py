"""Small Python API over the lab for tests (tests/e2e/conftest.py uses it).

    lab = Lab()
    lab.up()                                   # `tests/lab/lab up` (also installs the tree)
    lab.ssh("dom0a", ["lvs", "vg0"])           # CompletedProcess (text); check=True by default
    lab.ssh("dom0a", "lvs | grep web1")        # a str is a remote shell command line
    lab.reset(); lab.leftovers() -> (rc, text); lab.writer("start"); lab.down()
"""

import contextlib
import fcntl
import os
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import labvm  # noqa: E402

LAB = HERE / "lab"
VMS = tuple(labvm.VM_NAMES)


class LabCommandError(subprocess.CalledProcessError):
    """CalledProcessError whose message shows the VM and the command's output."""

    def __init__(self, vm, result):
        super().__init__(result.returncode, result.args, result.stdout, result.stderr)
        self.vm = vm

    def __str__(self):
        return (f"{self.vm}: exit {self.returncode}: {self.cmd[-1]}\n"
                f"--- stdout:\n{(self.stdout or '')[-3000:]}\n--- stderr:\n{(self.stderr or '')[-3000:]}")


class Lab:
    vms = VMS

    def cli(self, *args, check=True, timeout=600):
        """Run `tests/lab/lab ARGS...`; output captured (text)."""
        return subprocess.run([sys.executable, str(LAB), *args], check=check, timeout=timeout,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)

    @contextlib.contextmanager
    def session_lock(self, timeout=3600):
        """Hold the lab for one test session: other sessions on this machine wait (flock)."""
        labvm.RUN.parent.mkdir(parents=True, exist_ok=True)
        path = labvm.RUN.parent / "session.lock"
        with open(path, "a+") as f:
            deadline = time.monotonic() + timeout
            told = False
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"another test session holds {path}")
                    if not told:
                        print(f"\nlab: waiting for another test session ({path})", flush=True)
                        told = True
                    time.sleep(1)
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def is_up(self):
        return labvm.is_up()

    def up(self):
        return self.cli("up")

    def down(self):
        return self.cli("down", timeout=60)

    def install(self):
        return self.cli("install")

    def reset(self):
        return self.cli("reset")

    def leftovers(self):
        """(rc, text): rc 0 when both VMs are clean."""
        result = self.cli("leftovers", check=False, timeout=120)
        return result.returncode, result.stdout

    def cleanup(self):
        """Stop the writer, unmount/unmap/remove snapshots and state on both VMs (no disk reset)."""
        for vm in VMS:
            self.ssh(vm, ["lab-guest", "cleanup"], timeout=120)

    def writer(self, *args, check=True):
        """`lab-guest writer ARGS` in dom0a: start|stop|status|verify FILE..."""
        return self.ssh("dom0a", ["lab-guest", "writer", *args], check=check, timeout=120)

    def ssh(self, vm, command, check=True, input=None, timeout=300):
        """Run command (argv list, or str = remote shell line) in vm as root.

        Returns subprocess.CompletedProcess with text stdout/stderr; raises LabCommandError (a CalledProcessError)
        when check and the exit status is not 0 (255 = ssh itself failed)."""
        if vm not in VMS:
            raise ValueError(f"unknown lab VM {vm!r}")
        result = labvm.ssh(vm, command, check=False, input=input, timeout=timeout)
        if check and result.returncode != 0:
            raise LabCommandError(vm, result)
        return result
