"""The service's settings, read once from the environment and checked at start-up.

    APP_POOL_MODE         threaded | process | nopool (default threaded; each gunicorn config sets it)
    APP_MAX_BODY          largest accepted POST body in bytes (default 4096)
    POOL_PRIMARY          the primary's DSN or URL (required)
    POOL_REPLICAS         the replicas' DSNs or URLs, comma-separated (may be empty)
    POOL_CONNECT_TIMEOUT  seconds per connection attempt (no-pool mode uses it too; default 2)
    POOL_QUERY_TIMEOUT    seconds a statement may wait for the server (default 5, the app's own
                          default: well under gunicorn's worker timeout of 30 s, which would kill a
                          sync worker stuck on a stalled server mid-request, and under the load
                          tests' 10 s client timeout, so a stalled replica costs one slow read)
    POOL_<OPTION>         any other pool option, read by pool.Pool.from_env()

A bad value fails the worker's start with a message naming the variable, instead of failing
every request later.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

MODES = ("threaded", "process", "nopool")
QUERY_TIMEOUT = 5.0  # the app's default for POOL_QUERY_TIMEOUT (the pool's own is 30 s)


@dataclasses.dataclass(frozen=True)
class Settings:
    mode: str
    max_body: int
    primary: str
    replicas: tuple[str, ...]
    connect_timeout: float
    query_timeout: float

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "Settings":
        mode = environ.get("APP_POOL_MODE", "threaded").strip() or "threaded"
        if mode not in MODES:
            raise ValueError(f"APP_POOL_MODE must be one of {', '.join(MODES)}, not {mode!r}")
        primary = environ.get("POOL_PRIMARY", "").strip()
        if not primary:
            raise ValueError("POOL_PRIMARY is not set: it must hold the primary's DSN or URL")
        # Same rule as pool.Pool.from_env: comma-separated, blanks ignored.
        replicas = tuple(r.strip() for r in environ.get("POOL_REPLICAS", "").split(",") if r.strip())
        return cls(
            mode=mode,
            max_body=_number(environ, "APP_MAX_BODY", 4096, int),
            primary=primary,
            replicas=replicas,
            connect_timeout=_number(environ, "POOL_CONNECT_TIMEOUT", 2.0, float),
            query_timeout=_number(environ, "POOL_QUERY_TIMEOUT", QUERY_TIMEOUT, float),
        )


def _number(environ: Mapping[str, str], name: str, default: float, kind: type) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive, not {raw!r}")
    return value
