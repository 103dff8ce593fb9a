"""Replication lag: measured from the servers' own WAL positions, used to keep stale replicas out
of reads, and to let a caller read its own writes.

Measuring. Each monitor round (monitor.py) gives the primary's ``pg_current_wal_lsn()`` and each
replica's ``pg_last_wal_replay_lsn()``. ``lag_bytes`` is the difference. ``lag_s`` is how long
ago the primary first had WAL the replica has not replayed yet: the tracker keeps the primary's
(time, position) samples of the last two minutes, and a replica whose replay position is behind
the sample taken at ``t`` has been missing that WAL since at least ``t``. Equal positions mean no
lag at all, however long the primary has been idle (``now() - pg_last_xact_replay_timestamp()``,
the usual measure, grows while nothing is written), and no server's clock is compared with
another's. The resolution is the monitor's interval, about a second.

Routing (``max_lag`` seconds, default 10; ``None`` turns it off). A replica over the limit leaves
read rotation, shown as ``state: "lagging"`` with its lag in ``stats()``, until it is back under.
If every replica lags, reads go to the primary when ``read_fallback`` allows it, else to the
least-lagging replica; ``stats()["reads_to"]`` says which.

Read your own writes. ``Pool.write_token()`` returns the primary's WAL position after the
caller's writes as text (``"0/3000148"``): short, and safe in a header or a cookie, so it works
across requests and processes. A read with ``after=token`` goes to a replica known to have
replayed that position; if none is known to, the replicas are asked (statements.py,
``_checkout_after``) for up to ``AFTER_WAIT``; then the read goes to the primary, which always
has it (with ``read_fallback=False``, never: the replicas are asked until the timeout).
"""

from __future__ import annotations

import collections
import re
from typing import Any, Iterable

HISTORY = 120.0  # seconds of primary positions kept
AFTER_WAIT = 0.1  # how long a read with a token waits for a replica to catch up
AFTER_POLL = 0.005  # ...asking again after this long at first (the pause doubles, to 0.05 s)
RESURVEY = 0.25  # without read_fallback, every replica is asked again this often
STALE = 5.0  # a primary position older than this cannot measure lag (the primary is gone)

_TOKEN = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")


def parse_lsn(text: str | None) -> int | None:
    """PostgreSQL's ``pg_lsn`` text ("16/B374D848") as a number; None stays None."""
    if text is None:
        return None
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_token(token: Any) -> int | None:
    """A read-after token as a WAL position; None for no token. ValueError for anything that is
    not a token (a client may send garbage in a header: the message does not echo it)."""
    if token is None or token == "":
        return None
    if not isinstance(token, str) or not _TOKEN.match(token):
        raise ValueError("after= must be a token from Pool.write_token() (a WAL position such as "
                         "'0/3000148')")
    return parse_lsn(token)


class LagTracker:
    """The primary's recent WAL positions, and each replica's lag measured against them."""

    __slots__ = ("samples", "seen_at")

    def __init__(self) -> None:
        self.samples: collections.deque[tuple[float, int]] = collections.deque()
        self.seen_at = 0.0  # when the primary last told its position

    def reset(self) -> None:
        """A new primary: positions on another server (or timeline) compare with nothing."""
        self.samples.clear()
        self.seen_at = 0.0

    def primary_at(self, now: float, lsn: int) -> None:
        self.seen_at = now
        samples = self.samples
        if samples and samples[-1][1] == lsn:
            return  # no new WAL: the oldest sample at this position is the one that counts
        samples.append((now, lsn))
        while len(samples) > 2 and samples[1][0] < now - HISTORY:
            samples.popleft()

    def lag(self, now: float, replay: int | None) -> tuple[float | None, int | None]:
        """(seconds, bytes) a replica at ``replay`` is behind; (None, None) when unknown."""
        samples = self.samples
        if replay is None or not samples or now - self.seen_at > STALE:
            return None, None
        latest = samples[-1][1]
        if replay >= latest:
            return 0.0, 0
        for t, lsn in samples:  # the first position the replica has not reached
            if lsn > replay:
                return max(0.0, now - t), latest - replay
        return 0.0, latest - replay  # unreachable: the latest sample is beyond replay


def route_reads(replicas: Iterable[Any], max_lag: float | None) -> tuple[tuple, str]:
    """The replicas that may serve reads, and what stats() reports as ``reads_to``.

    ``replicas`` are those that are up. Lagging ones are left out, unless all of them lag and
    reads may not fall back to the primary (the caller decides that): then the least-lagging one.
    """
    up = tuple(replicas)
    if max_lag is None:
        return up, "replicas"
    fresh = tuple(ep for ep in up if not ep.lagging)
    if fresh or not up:
        return fresh, "replicas"
    return (), "primary (every replica lags)"


def least_lagging(replicas: Iterable[Any]) -> tuple:
    eps = [ep for ep in replicas]
    if not eps:
        return ()
    return (min(eps, key=lambda ep: ep.lag_s if ep.lag_s is not None else 0.0),)
