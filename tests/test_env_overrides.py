"""The environment wins over .env, for every variable, in make and in docker compose alike.

`.env` holds throwaway local defaults; a user avoiding a port clash runs
`PRIMARY_PORT=25432 make up` and must get 25432 everywhere: in make's own expansion, in what
make exports to its recipes (compose, python -m native, the load tests), and in compose's
interpolation of docker-compose.yml.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def env_file_keys() -> dict[str, str]:
    values = {}
    for line in (ROOT / ".env").read_text().splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            values[key] = value
    return values


def overrides() -> dict[str, str]:
    """A distinct value per .env key, different from the file's (ports stay valid ports)."""
    out = {}
    for i, (key, value) in enumerate(sorted(env_file_keys().items())):
        out[key] = str(20000 + i) if value.isdigit() else f"env-{key.lower()}-{i}"
    return out


def clean_env(**extra: str) -> dict[str, str]:
    keys = env_file_keys()
    env = {k: v for k, v in os.environ.items() if k not in keys and not k.startswith("MAKE")}
    return {**env, **extra}


def make_env(env: dict[str, str], *args: str, cwd: Path = ROOT) -> dict[str, str]:
    proc = subprocess.run(["make", "-s", "--no-print-directory", "env", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


def test_make_uses_env_file_defaults_without_overrides() -> None:
    got = make_env(clean_env())
    for key, value in env_file_keys().items():
        assert got[key] == ("***" if "PASSWORD" in key else value), key


def test_environment_beats_env_file_in_make_for_every_variable() -> None:
    wanted = overrides()
    got = make_env(clean_env(**wanted))
    for key, value in wanted.items():
        assert got[key] == ("***" if "PASSWORD" in key else value), key


def test_command_line_still_beats_the_environment() -> None:
    got = make_env(clean_env(PRIMARY_PORT="25432"), "PRIMARY_PORT=25999")
    assert got["PRIMARY_PORT"] == "25999"


def test_env_file_values_reach_recipes_literally(tmp_path: Path) -> None:
    """A `$` or `;` in a .env value (a password, say) is neither expanded nor split by make."""
    for name in ("Makefile", ".env"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "mk", tmp_path / "mk")
    with open(tmp_path / ".env", "a") as f:
        f.write("ODD_VALUE=a$b c;;d\n")
    assert make_env(clean_env(), cwd=tmp_path)["ODD_VALUE"] == "a$b c;;d"
    assert make_env(clean_env(ODD_VALUE="from-env"), cwd=tmp_path)["ODD_VALUE"] == "from-env"


def compose_problem() -> str | None:
    if shutil.which("docker") is None:
        return "no `docker` CLI on PATH"
    proc = subprocess.run(["docker", "compose", "version", "--short"], capture_output=True, text=True)
    if proc.returncode != 0:
        return "Docker Compose v2 (`docker compose`) is not installed"
    return None


@pytest.mark.docker
def test_environment_beats_env_file_in_compose_for_every_variable() -> None:
    problem = compose_problem()
    if problem:
        if os.environ.get("REQUIRE_DOCKER") == "1":
            pytest.fail(f"REQUIRE_DOCKER=1 but: {problem}")
        pytest.skip(problem)
    wanted = overrides()

    def config(env: dict[str, str]) -> str:
        proc = subprocess.run(["docker", "compose", "-f", str(ROOT / "docker-compose.yml"), "config",
                               "--format", "json"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        json.loads(proc.stdout)
        return proc.stdout

    overridden = config(clean_env(**wanted))
    defaults = config(clean_env())
    for key, value in wanted.items():
        # Every variable of .env is used by docker-compose.yml, and the environment's value wins.
        assert value in overridden, f"{key}={value} from the environment not used by compose"
        assert value not in defaults, key
    published = {p["published"] for svc in json.loads(overridden)["services"].values()
                 for p in svc.get("ports", [])}
    assert wanted["PRIMARY_PORT"] in published and "15432" not in published
