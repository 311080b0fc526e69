"""The Debian package built from this tree (tools/build-deb): lintian-clean, the files and
dependencies the README promises, units that systemd-analyze accepts."""

import os
import pathlib
import re
import shutil
import subprocess
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
DEPENDS = ["python3-libvirt", "python3-lxml", "python3-paramiko", "python3-sh", "rsync", "lvm2",
           "kpartx", "parted", "util-linux", "openssh-client"]
FILES = ["./usr/bin/domubackup", "./etc/domubackup/domubackup.toml",
         "./lib/systemd/system/domubackup.service", "./lib/systemd/system/domubackup.timer",
         "./lib/systemd/system/domubackup-failure@.service", "./usr/lib/domubackup/mail-failure",
         "./usr/share/bash-completion/completions/domubackup",
         "./lib/udev/rules.d/59-domubackup.rules",
         "./usr/share/man/man8/domubackup.8.gz", "./usr/share/doc/domubackup/README.md",
         "./usr/share/doc/domubackup/examples/domubackup.cron",
         "./usr/share/doc/domubackup/examples/domubackup.toml",  # config.EXAMPLE_PATH
         "./usr/share/doc/domubackup/examples/freeze.d/mysql.example",
         "./usr/share/doc/domubackup/examples/freeze.d/postgresql.example",
         "./usr/lib/python3/dist-packages/domubackup/entry.py"]
ENV = dict(os.environ, PATH="/usr/sbin:/usr/bin:/sbin:/bin")  # Debian's tools, not a venv's


def run(*argv, **kw):
    return subprocess.run(argv, env=ENV, capture_output=True, text=True, check=False, **kw)


@pytest.fixture(scope="module")
def deb(tmp_path_factory):
    if not all(shutil.which(t, path=ENV["PATH"]) for t in ("dpkg-buildpackage", "dh", "lintian")):
        if os.environ.get("CI"):
            pytest.fail("CI: tests/setup should have installed debhelper, dh-python and lintian")
        pytest.skip("needs dpkg-buildpackage, debhelper and lintian (tests/setup installs them)")
    dist = tmp_path_factory.mktemp("dist")
    r = subprocess.run([str(ROOT / "tools" / "build-deb")], env=dict(ENV, DOMUBACKUP_DIST=str(dist)),
                       capture_output=True, text=True, check=False, timeout=300)
    assert r.returncode == 0, r.stderr
    path = pathlib.Path(r.stdout.splitlines()[-1])
    assert path == dist / f"domubackup_{VERSION}_all.deb"
    return path


def test_lintian_finds_no_error_and_no_warning(deb):
    r = run("lintian", "--fail-on", "error,warning", str(deb), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not [line for line in r.stdout.splitlines() if re.match(r"[EW]: ", line)], r.stdout


def test_the_package_holds_the_promised_files(deb):
    listing = run("dpkg-deb", "-c", str(deb)).stdout
    names = {line.split()[5] for line in listing.splitlines()}
    assert sorted(f for f in FILES if f not in names) == []
    modes = {line.split()[5]: line.split()[0] for line in listing.splitlines()}
    assert modes["./usr/bin/domubackup"] == modes["./usr/lib/domubackup/mail-failure"] == "-rwxr-xr-x"
    # One scheduler: the cron file is only an example.
    assert not [n for n in names if n.startswith("./etc/cron")]


def test_control_depends_conffiles_and_no_enabled_timer(deb, tmp_path):
    depends = run("dpkg-deb", "-f", str(deb), "Depends").stdout
    assert sorted(d for d in DEPENDS if not re.search(rf"(^|, ){re.escape(d)}( \(|,|$)", depends.strip())) == []
    assert run("dpkg-deb", "-f", str(deb), "Version").stdout.strip() == VERSION
    run("dpkg-deb", "-e", str(deb), str(tmp_path / "DEBIAN"))
    assert (tmp_path / "DEBIAN" / "conffiles").read_text().split() == ["/etc/domubackup/domubackup.toml"]
    postinst = (tmp_path / "DEBIAN" / "postinst").read_text()
    # dh_installsystemd --no-enable --no-start: enabled only if the admin had enabled it before.
    assert "was-enabled 'domubackup.timer'" in postinst
    assert "deb-systemd-invoke" not in postinst and "start" not in postinst.replace("restart", "")


def test_systemd_analyze_verifies_the_units(deb, tmp_path):
    if not shutil.which("systemd-analyze", path=ENV["PATH"]):
        (pytest.fail if os.environ.get("CI") else pytest.skip)("needs systemd-analyze (package systemd)")
    root = tmp_path / "root"
    assert run("dpkg-deb", "-x", str(deb), str(root)).returncode == 0
    units = root / "lib/systemd/system"
    for target in pathlib.Path("/lib/systemd/system").glob("*.target"):  # the default dependencies
        if not (units / target.name).exists():
            shutil.copy(target, units)
    names = ["domubackup.service", "domubackup.timer", "domubackup-failure@.service"]
    r = run("systemd-analyze", "verify", "--man=no", f"--root={root}", *(f"lib/systemd/system/{n}" for n in names))
    assert (r.returncode, r.stderr) == (0, "")
    service = (units / "domubackup.service").read_text()
    assert "ExecStart=/usr/bin/domubackup run\n" in service
    assert "OnFailure=domubackup-failure@%n.service\n" in service
