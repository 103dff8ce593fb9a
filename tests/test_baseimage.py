"""`make up`'s base image: present, else pulled, else built locally with debootstrap, and it
says which (compose/baseimage.py). The decision is a pure function, tested branch by branch; the
fallback runs for real against this machine's Docker engine, where no registry is reachable, so
the pull genuinely fails."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "compose"))
import baseimage  # noqa: E402

PULL_ERROR = ('Error response from daemon: Get "https://registry-1.docker.io/v2/": dial tcp: '
              "lookup registry-1.docker.io: no such host\n")


def test_present_image_is_used_and_nothing_is_pulled() -> None:
    d = baseimage.decide("debian:trixie-slim", present=True, pull_error="ignored", is_root=False)
    assert d == baseimage.Decision("use", "base image debian:trixie-slim: present locally")


def test_a_successful_pull_says_so() -> None:
    d = baseimage.decide("debian:trixie-slim", present=False, pull_error=None, is_root=False)
    assert d.action == "pulled" and d.message == "base image debian:trixie-slim: pulled from the registry"


def test_failed_pull_as_root_falls_back_to_debootstrap_and_says_why() -> None:
    d = baseimage.decide("debian:trixie-slim", present=False, pull_error=PULL_ERROR, is_root=True)
    assert d.action == "build"
    assert "the pull failed (Error response from daemon" in d.message and "no such host)" in d.message
    assert "building it locally with debootstrap" in d.message and "compose/base-image.sh" in d.message


def test_failed_pull_without_root_says_what_to_run() -> None:
    d = baseimage.decide("debian:trixie-slim", present=False, pull_error=PULL_ERROR, is_root=False)
    assert d.action == "fail" and d.message.startswith("error: base image debian:trixie-slim could not be pulled")
    assert "needs root" in d.message
    assert "`sudo bash compose/base-image.sh --tag debian:trixie-slim`, then `make up` again" in d.message


def test_an_empty_pull_error_still_gives_a_reason() -> None:
    assert "(no reason given)" in baseimage.decide("x:y", False, "", True).message


def docker_or_skip() -> None:
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode:
        if os.environ.get("REQUIRE_DOCKER") == "1":
            pytest.fail("REQUIRE_DOCKER=1 but no Docker engine answers")
        pytest.skip("no Docker engine answers")


@pytest.mark.docker
def test_real_fallback_when_the_pull_fails(tmp_path: Path) -> None:
    """An image no registry here can give: the real pull fails and, as root, the fallback is
    debootstrap (dry run: said, not done). Non-root, the same run fails with what to run."""
    docker_or_skip()
    image = f"pgpool-test-absent/base:{uuid.uuid4().hex[:8]}"
    proc = subprocess.run([sys.executable, str(ROOT / "compose/baseimage.py"), "ensure", "--image", image,
                           "--dry-run"], capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert f"==> base image {image} is not present; pulling it" in out, out
    if os.geteuid() == 0:
        assert proc.returncode == 0, out
        assert f"base image {image}: the pull failed (" in out, out
        assert f"dry run: would run bash {ROOT}/compose/base-image.sh --tag {image}" in out, out
    else:
        assert proc.returncode == 1 and "needs root" in out, out
    assert subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode != 0


@pytest.mark.docker
def test_present_base_image_is_reported_present() -> None:
    docker_or_skip()
    proc = subprocess.run([sys.executable, str(ROOT / "compose/baseimage.py"), "ensure"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "base image debian:trixie-slim: present locally", proc


def test_build_script_refuses_without_root_and_knows_its_mirror() -> None:
    """compose/base-image.sh: the mirror comes from the host's apt sources; non-root it stops
    before doing anything, saying why."""
    proc = subprocess.run(["bash", str(ROOT / "compose/base-image.sh"), "--print-mirror"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout.strip().startswith(("http://", "https://", "file:/")), proc
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv missing: cannot drop root for the non-root check")
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash",
               str(ROOT / "compose/base-image.sh"), "--tag", "x:y"]
    else:
        cmd = ["bash", str(ROOT / "compose/base-image.sh"), "--tag", "x:y"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "must run as root (debootstrap needs it)" in proc.stderr, proc
