"""Locust scaled out: the same run, but as a master and N workers in docker compose.

``ComposeRun`` is a ``LocustRun`` whose command is ``docker compose --profile loadtest up`` of the
services in compose/loadtest.compose.yml (locust-master, locust-worker scaled to N) instead of a
local ``locust`` process. Everything else stays the same: the workers write their per-request logs
into the run directory (mounted at /results), the master writes the CSV/HTML reports and the
shape's steps.jsonl there, and the harness tails, analyses and checks them as for a local run.
The target is addressed by its compose service name on the stack's network
(http://app-threaded:8000), so only the Docker stack can be driven this way.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

from .runner import LocustRun
from .settings import REPO_ROOT, TARGETS

COMPOSE = ["docker", "compose", "-f", str(REPO_ROOT / "docker-compose.yml"), "--profile", "loadtest"]
SERVICES = ("locust-master", "locust-worker")


def compose_host(target: str) -> str:
    """The target as the containers see it: its service name and container port."""
    return f"http://{TARGETS[target][0]}:8000"


def compose_ready() -> str | None:
    """None if docker-compose.yml defines the locust services, else why not."""
    proc = subprocess.run([*COMPOSE, "config", "--services"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return f"docker compose config failed: {proc.stderr.strip()[-500:]}"
    if not set(SERVICES) <= set(proc.stdout.split()):
        return ("docker-compose.yml has no locust-master/locust-worker: it must include "
                "compose/loadtest.compose.yml (include: [compose/loadtest.compose.yml])")
    return None


@dataclasses.dataclass
class ComposeRun(LocustRun):
    workers: int = 2
    results_root: Path = REPO_ROOT / "results"  # mounted at /results in the containers

    def command(self) -> list[str]:
        # Attached, without --abort-on-container-exit: that would stop the master as soon as the
        # first worker obeys its quit message, possibly before the master has written its
        # reports. `up` returns once every container has exited; exit_code() asks for the master's.
        return [*COMPOSE, "up", "--no-deps", "--no-build", "--scale", f"locust-worker={self.workers}",
                *SERVICES]

    def exit_code(self, returncode: int) -> int:
        ids = subprocess.run([*COMPOSE, "ps", "--all", "--quiet", "locust-master"], capture_output=True,
                             text=True, timeout=60, env=self.environment()).stdout.split()
        if returncode != 0 or not ids:
            return returncode or 2
        inspect = subprocess.run(["docker", "inspect", "--format", "{{.State.ExitCode}}", ids[0]],
                                 capture_output=True, text=True, timeout=60)
        return int(inspect.stdout.strip() or 2)

    def environment(self) -> dict[str, str]:
        inside = Path("/results") / self.run_dir.resolve().relative_to(self.results_root.resolve())
        env = {**super().environment(),
               "LOADTEST_WORKERS": str(self.workers),
               "LOADTEST_HOST": self.host,
               "LOADTEST_RUN_DIR": str(inside),
               "LOADTEST_RESULTS_HOST": str(self.results_root.resolve()),
               "LOADTEST_UID": str(os.getuid()), "LOADTEST_GID": str(os.getgid())}
        env.pop("LOADTEST_LOG_DIR", None)  # the compose file derives it from LOADTEST_RUN_DIR
        return env

    def cleanup(self) -> None:
        """Remove the exited master and worker containers (the next run makes new ones)."""
        subprocess.run([*COMPOSE, "rm", "--force", "--stop", *SERVICES], capture_output=True,
                       timeout=120, env=self.environment())
