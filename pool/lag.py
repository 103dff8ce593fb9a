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

Read your own writes. ``Pool.write_token()`` returns the primary's timeline and WAL position
after the caller's writes as text (``"2:0/3000148"``): short, and safe in a header or a cookie,
so it works across requests and processes. A read with ``after=token`` goes to a replica known
to have replayed that position; if none is known to, the replicas are asked (statements.py,
``_checkout_after``) for up to ``AFTER_WAIT``; then the read goes to the primary, which always
has it (with ``read_fallback=False``, never: the replicas are asked until the timeout). A token
from a newer timeline than the primary the pool knows (a promotion it has not seen yet) first
waits, within the timeout, for the pool to find that primary.

Diverged replicas. After an asynchronous failover a replica can hold WAL of the old primary
that the promoted one never received (replayed, or only received: it replays it later).
Positions carry no timeline, so such a replica could pass for caught up, and a token from the
new primary would look replayed there, though it never will be. The monitor also asks each
replica what it has received and, from its control file, the timeline it is on at least (the
last restartpoint's: it lags, never leads). ``check_diverged`` compares a replica's answer with
the primary's next one (answered: when read; asked: before it was sent, so a healthy replica
under any write load is never flagged):
- holding WAL past the primary's position: not on its history, ``diverged``: out of reads
  whatever ``max_lag`` says, ``state: "diverged"``, WARNING; back only once its control file
  names the primary's timeline (rewound or rebuilt; streaming more of the old WAL, from an old
  primary back unfenced, is not that);
- else ``judged`` (reads with a token count on it) if it shows it follows the primary: it has
  received more since the primary was found (positions alone cannot tell a replica a failover
  left behind, stuck, from one that lags), or its control file names the primary's timeline.
  A stuck one does neither: tokens never go to it, and its lag grows until ``max_lag`` takes it
  out. An idle healthy one counts from the primary's next write, and then for as long as this
  primary lasts. While another node answers as a primary too (a conflict), only the control
  file counts.
Judgements are forgotten when a new primary is found (``forget_judgements``: answers to earlier
questions say nothing of what a replica did after the promotion); every node is then asked
every ``RECHECK`` for ``FAST_ROUNDS``, so token reads go to the primary for about 0.15 s (in
process mode, a few requests). With no primary up, a replica is asked its timeline instead and
serves tokens of that timeline or older.
"""

from __future__ import annotations

import collections
import logging
import re
import time
from typing import Any, Iterable

from .config import REPLICA
from .endpoint import CONFLICT

HISTORY = 120.0  # seconds of primary positions kept
AFTER_WAIT = 0.1  # how long a read with a token waits for a replica to catch up
AFTER_POLL = 0.005  # ...asking again after this long at first (the pause doubles, to 0.05 s)
RESURVEY = 0.25  # without read_fallback, every replica is asked again this often
STALE = 5.0  # a primary position older than this cannot measure lag (the primary is gone)
RECHECK = 0.05  # after a new primary, every node is asked this often... (forget_judgements)
FAST_ROUNDS = 0.5  # ...for this long
CONFLICT_LIVE = 3.0  # a node in conflict that answered this recently makes judging strict

# The primary's timeline (hex, as in WAL file names), then its WAL position; tokens from before
# the timeline was added ("0/3000148") are still read.
_TOKEN = re.compile(r"^(?:([0-9A-Fa-f]{1,8}):)?([0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8})$")
# write_token()'s one round trip: "2:0/3000148" (leading zeros of the timeline dropped)
TOKEN_SQL = ("SELECT ltrim(substr(pg_walfile_name(lsn), 1, 8), '0') || ':' || lsn::text "
             "FROM pg_current_wal_lsn() AS lsn")
# A replica's timeline at least, from its control file: the last restartpoint's and the minimum
# recovery point's (they lag, never lead). Executable by everyone by default.
FLOOR_EXPR = ("GREATEST((SELECT timeline_id FROM pg_control_checkpoint()), "
              "(SELECT min_recovery_end_timeline FROM pg_control_recovery()))")


def parse_lsn(text: str | None) -> int | None:
    """PostgreSQL's ``pg_lsn`` text ("16/B374D848") as a number; None stays None."""
    if text is None:
        return None
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_token(token: Any) -> tuple[int, int | None] | None:
    """A read-after token as (WAL position, timeline or None); None for no token. ValueError
    for anything that is not a token (a client may send garbage in a header: the message does
    not echo it)."""
    if token is None or token == "":
        return None
    match = _TOKEN.match(token) if isinstance(token, str) else None
    if match is None:
        raise ValueError("after= must be a token from Pool.write_token() (a timeline and a WAL "
                         "position, such as '2:0/3000148')")
    timeline, lsn = match.groups()
    return parse_lsn(lsn), int(timeline, 16) if timeline else None


def format_token(lsn: int, timeline: int | None) -> str:
    return f"{timeline:X}:{format_lsn(lsn)}" if timeline else format_lsn(lsn)


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
        if now <= self.seen_at:
            return  # older than what is known (the board's, after this process's own monitor's)
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


def primary_answered(pool: Any, primary: Any, when: float, lsn: int) -> None:
    """Lock held. The primary was at ``lsn`` at ``when``, as this process's monitor or, on
    the board, another process's saw it: what each replica's lag is measured against here. (A
    process may monitor a replica and not the primary: one monitor per server per host.) A new
    primary's positions compare with nothing before them."""
    if pool._lag_source is not primary:
        pool._lag.reset()
        pool._lag_source = primary
    pool._lag.primary_at(when, lsn)


def replica_answered(ep: Any, asked: float, when: float, reach: int, floor: int | None) -> None:
    """A replica's monitor or probe, asked at ``asked``, answered (read at ``when``) that it
    holds WAL up to ``reach`` (received or replayed) and, if it could tell, that it is on
    timeline ``floor`` at least (its control file's; lags, never leads). The samples that
    ``check_diverged`` judges; the last few are kept, so a primary slow to answer is compared
    with one from before its question."""
    if floor is not None:
        ep.floor = max(ep.floor or 0, floor)  # (true whenever it was read)
    if asked <= ep.answers_since:
        return  # asked before a new primary was seen: not evidence about its history
    if not ep.answers or ep.answers[-1] != (when, reach):
        ep.answers.append((when, reach))


def check_diverged(pool: Any, primary: Any, asked: float, lsn: int) -> list[tuple[Any, ...]]:
    """The primary answered ``lsn`` to a question sent at ``asked`` or later. For each replica's
    latest answer from before that: past it, diverged; else judged if it shows it follows the
    primary: it has received more since the primary was found (it streams; one that a failover
    left behind is stuck, however its position compares), or its control file says it is on
    the primary's timeline. While another node answers as a primary too (a conflict), only the
    latter counts. A diverged one comes back only on that evidence (rewound or rebuilt).
    Returns the log lines."""
    said: list[tuple[Any, ...]] = []
    now = time.monotonic()
    strict = any(ep.state is CONFLICT and now - ep.status_at < CONFLICT_LIVE
                 for ep in pool._endpoints)
    timeline = primary.timeline or 0
    for ep in pool._endpoints:
        if ep.role != REPLICA:
            continue
        # Its latest answer from strictly before the primary was asked; a later one proves nothing
        reach = next((r for when, r in reversed(ep.answers) if when < asked), None)
        if reach is None:
            continue
        on_timeline = timeline > 0 and (ep.floor or 0) >= timeline
        if reach > lsn:
            if not ep.diverged:
                said.append((logging.WARNING, "replica %s holds WAL up to %s, past the primary "
                             "%s at %s: it is not on the primary's history (left behind by a "
                             "failover?); out of reads until it is rewound or rebuilt",
                             ep.name, format_lsn(reach), primary.name, format_lsn(lsn)))
            ep.diverged, ep.judged = True, False
            continue
        if ep.diverged:
            if not on_timeline:
                ep.judged = False
                continue
            ep.diverged = False
            said.append((logging.INFO, "replica %s is on the primary %s's timeline %s, not past "
                         "it: back in reads", ep.name, primary.name, timeline))
        if strict:
            ep.judged = on_timeline
        else:  # seen to follow this primary once (it received more since it was found), it
            #     stays judged through idle spells, until a new primary (forget_judgements)
            ep.judged = ep.judged or on_timeline or reach > ep.answers[0][1]
    return said


def forget_judgements(pool: Any) -> None:
    """Lock held. A new primary (the first one found, another node, or a new timeline at its
    address): no replica is known to be on its history, and what they answered until now tells
    nothing (they may have gone on with the old primary's WAL). For ``FAST_ROUNDS`` seconds
    every node is asked every ``RECHECK`` (the primary just after the replicas), so the first
    judgements come within about 0.15 s, not seconds later."""
    now = time.monotonic()
    pool._judgements += 1
    pool._fast_until = now + FAST_ROUNDS
    for ep in pool._endpoints:
        ep.judged = False
        ep.answers.clear()
        ep.answers_since = now
        ep.monitor_at = min(ep.monitor_at, now + RECHECK if ep is pool._primary else now)
    pool._hurry_housekeeper()


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
