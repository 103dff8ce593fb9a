"""Where the stack is: app and database ports and the app's credentials, from .env and the
environment (the environment wins, as in the Makefile and docker compose).

Targets are named by their pool mode; each is one of the app services:

    threaded  app-threaded  APP_THREADED_PORT (8001)   gthread workers, one shared pool each
    process   app-process   APP_PROCESS_PORT  (8002)   sync workers, one small pool each
    nopool    app-nopool    APP_NOPOOL_PORT   (8003)   a new connection per request (baseline)
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping

REPO_ROOT = Path(__file__).resolve().parent.parent

# mode -> (service name, port variable, default port)
TARGETS = {
    "threaded": ("app-threaded", "APP_THREADED_PORT", 8001),
    "process": ("app-process", "APP_PROCESS_PORT", 8002),
    "nopool": ("app-nopool", "APP_NOPOOL_PORT", 8003),
}
POOLED = ("threaded", "process")
NODES = {"primary": ("PRIMARY_PORT", 15432), "replica1": ("REPLICA1_PORT", 15433),
         "replica2": ("REPLICA2_PORT", 15434)}
REPLICAS = ("replica1", "replica2")


def read_env_file(path: Path = REPO_ROOT / ".env") -> dict[str, str]:
    """KEY=VALUE lines of a dotenv file (comments and blanks skipped); {} if it is missing."""
    values: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            key, sep, value = line.strip().partition("=")
            if sep and key and not key.startswith("#"):
                values[key.strip()] = value.strip().strip("'\"")
    return values


@dataclasses.dataclass(frozen=True)
class Settings:
    env: Mapping[str, str]  # .env overlaid by the process environment

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        environ = os.environ if environ is None else environ
        return cls({**read_env_file(), **{k: v for k, v in environ.items() if v}})

    def _port(self, var: str, default: int) -> int:
        return int(self.env.get(var) or default)

    def app_port(self, mode: str) -> int:
        _, var, default = TARGETS[mode]
        return self._port(var, default)

    def app_url(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.app_port(mode)}"

    def db_port(self, node: str) -> int:
        return self._port(*NODES[node])

    def db_params(self, node: str) -> dict[str, object]:
        """psycopg2.connect() keywords for the app user on a node's published port
        (connect_timeout kept short: the node may be down and we would rather know quickly)."""
        return {"host": "127.0.0.1", "port": self.db_port(node), "dbname": self.env.get("APP_DB", "app"),
                "user": self.env.get("APP_USER", "app"),
                "password": self.env.get("APP_PASSWORD", "app-local-only"),
                "connect_timeout": 3, "application_name": "loadtest"}
