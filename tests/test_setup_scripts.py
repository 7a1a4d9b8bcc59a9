"""scripts/apt-install.sh, which slurm-up.sh and chromium-up.sh install Debian's packages through.

The real dpkg of this machine is not broken on purpose here: `dpkg` and `apt-get` are stand-ins on PATH that
behave as Debian's do on a machine whose image was taken mid-install (apt-get refuses with "dpkg was interrupted"
until `dpkg --configure -a` has run). The real path ran on such a machine: chromium-up.sh installed chromium there.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FAKE_DPKG = """#!/bin/sh
echo "dpkg $*" >> "$CALLS"
case "$1" in
  --audit) [ -e "$BROKEN" ] && echo " libc-bin   GNU C Library: Binaries (half configured)"; exit 0 ;;
  --configure) rm -f "$BROKEN"; rm -f "$DPKG_ADMINDIR"/updates/*; exit 0 ;;
esac
"""
FAKE_APT = """#!/bin/sh
echo "apt-get $*" >> "$CALLS"
if [ -e "$BROKEN" ] || [ -n "$(ls -A "$DPKG_ADMINDIR/updates")" ]; then
  echo "E: dpkg was interrupted, you must manually run 'dpkg --configure -a' to correct the problem." >&2; exit 100
fi
case " $* " in *" install "*) [ -n "$FAIL_INSTALL" ] && { echo "E: Unable to locate package $FAIL_INSTALL" >&2; exit 100; } ;; esac
exit 0
"""


def _apt_install(tmp_path: Path, *, broken: bool = False, journal: bool = False, fail: str = "") -> tuple:
    bin_dir, admin = tmp_path / "bin", tmp_path / "dpkg"
    (admin / "updates").mkdir(parents=True)
    bin_dir.mkdir()
    for name, text in (("dpkg", FAKE_DPKG), ("apt-get", FAKE_APT)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    if broken:
        (tmp_path / "broken").touch()
    if journal:
        (admin / "updates" / "0000").write_text("pending\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls"),
           "BROKEN": str(tmp_path / "broken"), "DPKG_ADMINDIR": str(admin), "FAIL_INSTALL": fail,
           "DANET_APT_LOCK_TIMEOUT": "7"}
    r = subprocess.run(["bash", "-c", f'. {REPO}/scripts/apt-install.sh; apt_install "$1" pkg-a pkg-b', "_",
                        str(tmp_path / "apt.log")], env=env, capture_output=True, text=True, timeout=60)
    calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []
    return r, [c for c in calls if not c.startswith("dpkg --audit")]


pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="apt_install writes /usr/sbin/policy-rc.d: needs root")


@pytest.mark.parametrize("broken,journal", [(True, False), (False, True)], ids=["half-configured", "journal"])
def test_an_interrupted_dpkg_is_finished_before_installing(tmp_path, broken, journal):
    r, calls = _apt_install(tmp_path, broken=broken, journal=journal)
    assert r.returncode == 0, r.stderr
    assert "finishing it (dpkg --configure -a)" in r.stderr
    assert calls[0] == "dpkg --configure -a"
    assert calls[1] == "apt-get -o DPkg::Lock::Timeout=7 update -qq"
    assert calls[2] == "apt-get -o DPkg::Lock::Timeout=7 install -y -qq --no-install-recommends pkg-a pkg-b"


def test_a_clean_dpkg_is_left_alone(tmp_path):
    r, calls = _apt_install(tmp_path)
    assert r.returncode == 0, r.stderr
    assert not any(c.startswith("dpkg --configure") for c in calls) and len(calls) == 2
    assert "half done" not in r.stderr


def test_a_failed_install_returns_non_zero_with_apts_words(tmp_path):
    policy = Path("/usr/sbin/policy-rc.d")
    before = policy.exists()
    r, calls = _apt_install(tmp_path, fail="pkg-b")
    assert r.returncode == 1
    assert "Unable to locate package pkg-b" in r.stderr  # the log's tail, for the caller's one-line error
    assert policy.exists() == before  # a policy-rc.d it wrote is removed again, one that was there is kept
