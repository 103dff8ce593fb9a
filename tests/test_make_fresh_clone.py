"""On a fresh clone, every make target that runs the project's Python creates the venv first.

The README's commands (`make test`, `make bench`, `make up`, the load tests) are the first things
a new user types, before any `.venv` exists. Each is dry-run (`make -n`) in a copy of the
Makefile and mk/ without a venv: the recipe that creates the venv must come before the first
command that runs `.venv/bin/python`. The stack's other targets (kill, start, stall, ...) act on
a stack `make up` started, so the venv is there by then, and are not listed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# `make up` runs the venv's python only for the Docker-less stack (STACK=local).
FIRST_COMMANDS = ["test", "test-fast", "bench", "bench-failures", "loadtest", "loadtest-scaling",
                  "loadtest-lag", "loadtest-outage", "watch", "demo", "slowloris", "up STACK=local"]


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("fresh")
    shutil.copy(ROOT / "Makefile", copy)
    shutil.copy(ROOT / ".env", copy)
    shutil.copytree(ROOT / "mk", copy / "mk")
    for req in ROOT.glob("requirements*.txt"):
        shutil.copy(req, copy)
    return copy


@pytest.mark.parametrize("target", FIRST_COMMANDS)
def test_target_creates_the_venv_before_running_its_python(fresh_copy: Path, target: str) -> None:
    proc = subprocess.run(["make", "-n", "--no-print-directory", *target.split()], cwd=fresh_copy,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    venv_python = str(fresh_copy / ".venv" / "bin" / "python")
    runs = [i for i, line in enumerate(lines) if venv_python in line and "-m venv" not in line]
    creates = [i for i, line in enumerate(lines) if "-m venv" in line]
    assert runs, f"make -n {target} never runs the venv's python:\n{proc.stdout}"
    assert creates and creates[0] < runs[0], (
        f"make {target} runs {venv_python} before creating the venv:\n{proc.stdout}")


def test_stack_targets_act_on_the_native_stack_when_it_is_the_one_running(fresh_copy: Path,
                                                                         tmp_path: Path) -> None:
    """After `make up STACK=local`, a plain `make kill-replica` acted on the Docker stack (not
    running) whenever a Docker engine answered: STACK had to be repeated on every command (a
    new user's trial). A running native stack (a node's live postmaster.pid) is the default."""
    base = tmp_path / "native"
    (base / "primary").mkdir(parents=True)
    (base / "primary" / "postmaster.pid").write_text(f"{os.getpid()}\n/somewhere\n")
    for basedir, native in ((base, True), (tmp_path / "nothing-here", False)):
        proc = subprocess.run(["make", "-n", "--no-print-directory", "kill-replica",
                               f"NATIVE_BASEDIR={basedir}"], cwd=fresh_copy, capture_output=True,
                              text=True, timeout=60, env={k: v for k, v in os.environ.items()
                                                          if k != "STACK"})
        assert proc.returncode == 0, proc.stderr
        if native:
            assert "-m native kill replica1" in proc.stdout, proc.stdout
        elif shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True,
                                                       timeout=30).returncode == 0:
            assert "-m native" not in proc.stdout, proc.stdout
