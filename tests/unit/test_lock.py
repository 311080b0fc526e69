import os
import subprocess
import sys

import pytest

from domubackup.core.errors import BusyError
from domubackup.hosts.lock import DomuLock, holder_pid


def test_lock_writes_pid_and_frees_on_exit(tmp_path):
    assert holder_pid(tmp_path, "web1") is None
    with DomuLock(tmp_path, "web1"):
        assert (tmp_path / "lock" / "web1.lock").read_text() == f"{os.getpid()}\n"
        assert holder_pid(tmp_path, "web1") == os.getpid()
    assert holder_pid(tmp_path, "web1") is None
    assert oct(os.stat(tmp_path / "lock").st_mode & 0o777) == "0o700"


def test_second_lock_is_busy_with_the_holders_pid(tmp_path):
    with DomuLock(tmp_path, "web1"):
        with pytest.raises(BusyError) as e:
            DomuLock(tmp_path, "web1").acquire()
        assert e.value.message == f"web1 is already being backed up by PID {os.getpid()}"
        assert e.value.hint == f"wait for it to finish; the lock is {tmp_path}/lock/web1.lock"
        assert e.value.exit_code == 75
    with DomuLock(tmp_path, "web1"):  # free again
        pass


def test_domus_lock_independently(tmp_path):
    with DomuLock(tmp_path, "web1"), DomuLock(tmp_path, "db1"):
        assert holder_pid(tmp_path, "web1") == os.getpid()
        assert holder_pid(tmp_path, "db1") == os.getpid()
    assert holder_pid(tmp_path, "db1") is None


def test_lock_held_by_another_process_and_freed_when_it_dies(tmp_path):
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]);"
            "from domubackup.hosts.lock import DomuLock;"
            "l = DomuLock(sys.argv[1], 'web1'); l.acquire(); print('ok', flush=True); time.sleep(60)")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), root], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline() == "ok\n"
        assert holder_pid(tmp_path, "web1") == child.pid
        with pytest.raises(BusyError, match=f"^web1 is already being backed up by PID {child.pid} "):
            with DomuLock(tmp_path, "web1"):
                pass
    finally:
        child.kill()
        child.wait()
    assert holder_pid(tmp_path, "web1") is None  # the kernel dropped the dead holder's flock
    with DomuLock(tmp_path, "web1"):
        assert holder_pid(tmp_path, "web1") == os.getpid()
