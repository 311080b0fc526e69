import logging
import os
import subprocess
import sys
import time

import pytest

from domubackup.core.errors import CommandError
from domubackup.hosts.runner import LocalRunner


@pytest.fixture
def runner():
    return LocalRunner("dom0a", default_timeout=30)


def pgrep(pattern):
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()


def test_true_and_result_fields(runner):
    r = runner.run(["true"])
    assert (r.host, r.argv, r.exit_code, r.stdout, r.stderr) == ("dom0a", ("true",), 0, "", "")
    assert 0 <= r.duration < 5
    assert runner.history == [r]


def test_false_raises_with_exit_code(runner):
    with pytest.raises(CommandError) as e:
        runner.run(["false"])
    assert e.value.returncode == 1
    assert e.value.message == "on dom0a: `false` exited 1"
    assert [h.exit_code for h in runner.history] == [1]


def test_check_false_and_ok_codes(runner):
    assert runner.run(["sh", "-c", "echo oops >&2; exit 3"], check=False).exit_code == 3
    r = runner.run(["sh", "-c", "exit 5"], ok_codes=(0, 5))
    assert r.exit_code == 5
    with pytest.raises(CommandError) as e:
        runner.run(["sh", "-c", "echo first >&2; echo 'no space left' >&2; exit 2"], ok_codes=(0, 5))
    assert e.value.message == "on dom0a: `sh -c 'echo first >&2; echo '\"'\"'no space left'\"'\"' >&2; exit 2'` exited 2: first | no space left"


def test_printf_words_arrive_unchanged(runner):
    words = ["a b", "'", '"', "$(touch /tmp/domubackup-pwned)", "`id`", ";", "&&", "x\ny", "*", "-n", "é€"]
    r = runner.run(["printf", "%s\\0", *words])
    assert r.stdout.split("\0")[:-1] == words


def test_environment_is_fixed_and_merged(runner):
    r = runner.run(["env"], env={"EXTRA": "1", "LANG": "C.UTF-8"})
    assert sorted(r.stdout.splitlines()) == sorted([
        "LC_ALL=C", "LANG=C.UTF-8", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LVM_SUPPRESS_FD_WARNINGS=1", "EXTRA=1"])


def test_no_tty(runner):
    assert runner.run(["sh", "-c", "test -t 1 && echo tty || echo notty"]).stdout == "notty\n"


def test_stdin_input_bytes_and_str(runner):
    assert runner.run(["cat"], input="héllo\n").stdout == "héllo\n"
    assert runner.run(["cat"], input=b"a\x00b").stdout == "a\x00b"
    assert runner.run(["cat"]).stdout == ""  # no input: EOF at once, no hang


def test_undecodable_output_is_replaced(runner):
    assert runner.run(["printf", "a\\377b"]).stdout == "a\ufffdb"


def test_missing_program(runner):
    with pytest.raises(CommandError) as e:
        runner.run(["kpartx-not-here", "-a", "/dev/x"])
    assert e.value.returncode == 127
    assert str(e.value) == ("on dom0a: `kpartx-not-here -a /dev/x` exited 127: kpartx-not-here: not "
                            "installed on dom0a (install the package that provides kpartx-not-here on dom0a)")
    with pytest.raises(CommandError):  # also with check=False
        runner.run(["kpartx-not-here"], check=False)


def test_timeout_kills_the_whole_process_group(runner):
    start = time.monotonic()
    with pytest.raises(CommandError) as e:
        runner.run(["sh", "-c", "sleep 31.41601 & sleep 31.41602 & wait"], timeout=0.5)
    assert time.monotonic() - start < 3
    assert e.value.timeout == 0.5
    assert e.value.message == "on dom0a: `sh -c 'sleep 31.41601 & sleep 31.41602 & wait'` timed out after 0.5s"
    assert pgrep("sleep 31.4160") == []


def test_timeout_does_not_fire_for_quick_commands(runner):
    assert runner.run(["sleep", "0.1"], timeout=5).exit_code == 0


def test_logging(runner, caplog):
    caplog.set_level(logging.DEBUG, logger="domubackup.run")
    runner.run(["printf", "a b"])
    runner.run(["false"], check=False)
    with pytest.raises(CommandError):
        runner.run(["false"])
    msgs = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "domubackup.run"]
    assert msgs[0] == ("DEBUG", "dom0a: $ printf 'a b'")
    assert msgs[1][0] == "INFO" and msgs[1][1].startswith("dom0a: `printf 'a b'` exit 0 in ")
    # check=False: the caller judges the exit code, so no warning
    assert msgs[3][0] == "INFO" and msgs[3][1].startswith("dom0a: `false` exit 1 in ")
    assert msgs[5][0] == "WARNING" and msgs[5][1].startswith("dom0a: `false` exit 1 in ")


def test_argv_must_be_a_list_of_words(runner):
    with pytest.raises(TypeError):
        runner.run("echo hi")
    with pytest.raises(ValueError):
        runner.run(["-rf"])


def test_gated_command_runs_only_when_released(runner, tmp_path):
    mark = tmp_path / "ran"
    g = runner.gated(["sh", "-c", f"date +%s.%N > {mark}; echo out; echo err >&2; exit 3"], check=False)
    time.sleep(0.5)
    assert not mark.exists()  # forked, held before its exec
    released = time.time()
    g.release()
    r = g.wait()
    assert (r.exit_code, r.stdout, r.stderr) == (3, "out\n", "err\n")
    assert float(mark.read_text()) >= released
    assert runner.history[-1] is r


def test_gated_command_errors_are_raised_by_wait(runner):
    with pytest.raises(CommandError) as e:
        runner.gated(["false"]).wait()
    assert e.value.returncode == 1
    with pytest.raises(CommandError) as e:
        runner.gated(["no-such-program-here"])  # at once, not at the release
    assert e.value.returncode == 127 and "not installed on dom0a" in e.value.message


def test_gated_commands_run_at_once_when_the_process_dies(tmp_path):
    # The dead man's switch: a run killed with SIGKILL between fork and release still runs
    # its gated commands (a thaw), each exactly once, to the end although they write output
    # (nobody reads the pipes any more: without /dev/null the first write is a SIGPIPE).
    marks = [tmp_path / "one", tmp_path / "two"]
    prog = f"""
import os, signal, time
from domubackup.hosts.runner import LocalRunner
r = LocalRunner()
gates = [r.gated(["sh", "-c", "echo out; echo err >&2; echo $$ >> " + m]) for m in {[str(m) for m in marks]!r}]
time.sleep(0.5)
print("ready", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    p = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=30)
    assert p.returncode == -9 and p.stdout == "ready\n", p.stderr
    deadline = time.monotonic() + 10
    while not all(m.exists() for m in marks) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    assert [len(m.read_text().split()) for m in marks] == [1, 1]


@pytest.mark.parametrize("where", ["main thread", "other thread"])
def test_a_command_ends_when_the_run_is_killed(where):
    # kill -9 of a run must not leave its rsync (or mount) running in its own session: it
    # would hold the snapshot's mounts busy and `cleanup` would fail on every umount.
    tag = "31.41603" if where == "main thread" else "31.41604"
    prog = f"""
import threading
from domubackup.hosts.runner import LocalRunner
run = lambda: LocalRunner().run(["sleep", "{tag}"])
if {where == "other thread"!r}:
    t = threading.Thread(target=run); t.start(); t.join()
else:
    run()
"""
    p = subprocess.Popen([sys.executable, "-c", prog])
    try:
        deadline = time.monotonic() + 10
        while not pgrep(f"sleep {tag}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pgrep(f"sleep {tag}"), "the command never started"
    finally:
        p.kill()
        p.wait()
    deadline = time.monotonic() + 5
    while pgrep(f"sleep {tag}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pgrep(f"sleep {tag}") == []


def test_a_stream_of_large_chunks_arrives_whole():
    # sh's own feeding of an iterable drops the rest of a short write: 4 MiB chunks into a
    # pipe lost data (a seed's checksum differed). The runner writes them itself.
    import hashlib

    from domubackup.hosts.runner import LocalRunner

    chunks = [os.urandom(4 << 20) for _ in range(8)]
    r = LocalRunner().run(["sha256sum"], input=iter(chunks), timeout=60)
    assert r.stdout.split()[0] == hashlib.sha256(b"".join(chunks)).hexdigest()

    def failing():
        yield b"x" * 100
        raise OSError(5, "Input/output error")
    with pytest.raises(OSError, match="Input/output error"):
        LocalRunner().run(["wc", "-c"], input=failing(), timeout=20)
