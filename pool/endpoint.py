"""One server's state: up or down, its connections, its counters, and when to probe it again.

State machine (changed only by the pool, under its lock in threaded mode)::

        connect fails (probe after 0.1 s),  probe due (retry_at)
        or a session is lost (probe now)
    UP ─────────────────────────► DOWN ──────────────────────────► probing
     ▲   generation += 1,          ▲  backoff: 0.1 s doubling,         │
     │   idle connections closed   │  capped at 3 s, ±20% jitter       │
     │                             └────────── probe fails ◄───────────┤
     └──────────────────────────── probe succeeds ◄────────────────────┘

A lost session is only indirect evidence (one backend may have been terminated), so it ejects
with the probe due at once, and a request that needs the endpoint meanwhile waits a moment for
that probe (PROBE_GRACE in modes.py): a false alarm costs milliseconds, a dead server no connect
timeout at all.

Invariants:
- ``size`` counts every connection of this endpoint: idle, in use and being opened. It never
  exceeds ``max_size``.
- A connection whose ``generation`` differs from its endpoint's was made before the last failure
  and is never handed out again; bumping the generation invalidates them all in O(1).
- While DOWN nobody connects to the endpoint except the probe, so no caller waits on a connect
  timeout for a server already known to be unreachable.
"""

from __future__ import annotations

import random
from typing import Any

from .config import EndpointConfig

UP, DOWN = "up", "down"

BACKOFF_FIRST = 0.1  # seconds before the first probe of a freshly ejected endpoint
BACKOFF_CAP = 3.0  # so a recovered server is re-admitted within 3.6 s plus one probe
BACKOFF_JITTER = 0.2  # ±20%, so workers that lost a server together don't probe in step


def backoff_delay(failures: int, rand: float) -> float:
    """Seconds until the next probe after ``failures`` failed attempts; ``rand`` is in [0, 1)."""
    base = min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** min(failures, 32))
    return base * (1 - BACKOFF_JITTER + 2 * BACKOFF_JITTER * rand)


class Endpoint:
    """The pool-side state of one server. Plain data: the pool drives the transitions."""

    __slots__ = (
        "name", "role", "dsn", "max_size", "state", "generation", "idle", "size", "connecting",
        "down_since", "retry_at", "failures", "last_error", "probe",
        "checkouts", "waits", "timeouts", "connects", "connect_errors", "ejections", "discards",
    )

    def __init__(self, config: EndpointConfig, max_size: int) -> None:
        self.name = config.name
        self.role = config.role
        self.dsn = config.dsn
        self.max_size = max_size
        self.state = UP  # optimistic until the start-up probe or a first connection says otherwise
        self.generation = 0
        self.idle: list[Any] = []  # a stack: the most recently returned connection goes out first
        self.size = 0
        self.connecting = 0
        self.down_since = 0.0
        self.retry_at = 0.0
        self.failures = 0
        self.last_error: str | None = None
        self.probe: Any = None  # the Probe in flight while DOWN, if any
        self.reset_counters()

    def reset_counters(self) -> None:
        self.checkouts = self.waits = self.timeouts = 0
        self.connects = self.connect_errors = self.ejections = self.discards = 0

    @property
    def in_use(self) -> int:
        return self.size - len(self.idle) - self.connecting

    def mark_down(self, now: float, error: str, probe_now: bool = False) -> bool:
        """Eject the endpoint after a failure. Returns True if it was up (a new outage).

        ``probe_now``: the evidence is indirect (a session was lost or closed by the server, so
        the server may well be fine): probe at once instead of after the first backoff.
        """
        self.last_error = error
        if self.state == DOWN:
            return False
        self.state = DOWN
        self.generation += 1
        self.down_since = now
        self.failures = 0
        self.ejections += 1
        self.retry_at = now if probe_now else now + backoff_delay(0, random.random())
        return True

    def probe_failed(self, now: float, error: str) -> None:
        self.last_error = error
        self.failures += 1
        self.retry_at = now + backoff_delay(self.failures, random.random())

    def mark_up(self) -> None:
        self.state = UP
        self.failures = 0
        self.retry_at = 0.0

    def awaiting_probe(self, now: float, grace: float) -> bool:
        """Down, with a probe due or started less than `grace` ago: worth a short wait."""
        if self.state == UP:
            return False
        if self.probe is None:
            return self.retry_at <= now
        return self.probe.started + grace > now

    def describe(self, now: float) -> str:
        """One line for error messages: the state a reader needs to act on."""
        text = (f"{self.role} {self.name} {self.state} size={self.size}/{self.max_size} "
                f"idle={len(self.idle)} in_use={self.in_use}")
        if self.state == DOWN:
            text += f" down_for={now - self.down_since:.1f}s next_probe_in={max(0.0, self.retry_at - now):.1f}s"
        if self.last_error:
            text += f" last_error={self.last_error!r}"
        return text

    def stats(self, now: float) -> dict[str, Any]:
        return {
            "name": self.name, "role": self.role, "state": self.state,
            "size": self.size, "idle": len(self.idle), "in_use": self.in_use,
            "connecting": self.connecting, "max_size": self.max_size,
            "checkouts": self.checkouts, "waits": self.waits, "timeouts": self.timeouts,
            "connects": self.connects, "connect_errors": self.connect_errors,
            "ejections": self.ejections, "discards": self.discards,
            "down_for": round(now - self.down_since, 3) if self.state == DOWN else None,
            "next_probe_in": round(max(0.0, self.retry_at - now), 3) if self.state == DOWN else None,
            "last_error": self.last_error,
        }
