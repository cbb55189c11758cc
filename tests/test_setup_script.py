"""README's first command on a fresh machine: scripts/setup.sh must install the
missing Debian packages as root (no sudo there) and as a user through sudo.

apt-get, dpkg, id and sudo are stand-ins on PATH that record what they were
asked; python3 is a stand-in too, so the pip and build steps run as commands
without installing anything.
"""

import os
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["liburing-dev", "fio", "g++", "redis-server"]


def _tool(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake_machine(tmp_path):
    """A PATH whose package tools report `installed` packages and log every call."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()

    def make(uid: int, installed=(), sudo=True):
        _tool(bin_dir / "id", f'[ "$1" = -u ] && echo {uid} || echo "uid={uid}"\n')
        _tool(bin_dir / "dpkg", f'[ "$1" = -s ] || exit 2\nfor p in {" ".join(installed) or "NONE"}; do [ "$p" = "$2" ] && exit 0; done\nexit 1\n')
        _tool(bin_dir / "apt-get", f'echo "apt-get uid={uid} DEBIAN_FRONTEND=${{DEBIAN_FRONTEND:-}} $*" >> {log}\n')
        if sudo:
            _tool(bin_dir / "sudo", f'echo "sudo $*" >> {log}\nexec "$@"\n')
        elif (bin_dir / "sudo").exists():
            (bin_dir / "sudo").unlink()
        _tool(bin_dir / "python3", f'echo "python3 $*" >> {log}\nexit 0\n')
        env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
        # The stand-ins first, then only what bash needs: no real apt-get, dpkg or sudo can be reached.
        core = tmp_path / "core"
        core.mkdir(exist_ok=True)
        for name in ("bash", "env", "dirname", "cat", "echo", "true"):
            real = subprocess.run(["bash", "-c", f"command -v {name}"], capture_output=True, text=True).stdout.strip()
            if real.startswith("/") and not (core / name).exists():
                (core / name).symlink_to(real)
        env["PATH"] = f"{bin_dir}:{core}"
        return env

    def run(env):
        r = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh")], env=env, capture_output=True, text=True, cwd=tmp_path)
        calls = log.read_text().splitlines() if log.exists() else []
        return r, calls

    return make, run


def test_setup_installs_missing_packages_as_root_without_sudo(fake_machine):
    make, run = fake_machine
    r, calls = run(make(uid=0))
    assert r.returncode == 0, r.stderr
    apt = [c for c in calls if c.startswith("apt-get")]
    assert apt[0] == "apt-get uid=0 DEBIAN_FRONTEND=noninteractive update -q"
    assert apt[1] == "apt-get uid=0 DEBIAN_FRONTEND=noninteractive install -y -q " + " ".join(PACKAGES)
    assert not any(c.startswith("sudo") for c in calls)
    assert any(c.startswith("python3 -m pip install") for c in calls)  # setup went on to the Python steps


def test_setup_installs_missing_packages_through_sudo_as_a_user(fake_machine):
    make, run = fake_machine
    r, calls = run(make(uid=1000, installed=["g++"]))
    assert r.returncode == 0, r.stderr
    assert "sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q liburing-dev fio redis-server" in calls
    assert "apt-get uid=1000 DEBIAN_FRONTEND=noninteractive install -y -q liburing-dev fio redis-server" in calls


def test_setup_skips_apt_when_everything_is_installed(fake_machine):
    make, run = fake_machine
    r, calls = run(make(uid=1000, installed=PACKAGES, sudo=False))
    assert r.returncode == 0, r.stderr
    assert not any(c.startswith(("apt-get", "sudo")) for c in calls)


def test_setup_says_what_to_do_as_a_user_without_sudo(fake_machine):
    make, run = fake_machine
    r, calls = run(make(uid=1000, sudo=False))
    assert r.returncode == 1
    assert "install liburing-dev fio g++ redis-server as root" in r.stderr
    assert not any(c.startswith("apt-get") for c in calls)
