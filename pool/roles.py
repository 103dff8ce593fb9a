"""Role discovery: which candidate is the primary, followed through promotions, and never two.

In the candidate form (``Pool(["host=db1 ...", "host=db2 ...", "host=db3 ..."])`` or
``nodes=[...]``) no node has a declared role. Every probe and every monitor round asks each node
``pg_is_in_recovery()`` and, on a primary, its timeline (monitor.py); ``observe()`` turns each
answer into a role:

- A node in recovery is a replica (reads).
- A node out of recovery is the primary when there is none, or when the current one is down
  (the old primary died and a replica was promoted): the pool follows the promotion by itself.
- Two nodes out of recovery (an old primary restarted before it was fenced): the newest timeline
  wins; the other is ``state: "conflict"``, never written to nor read from, and logged at WARNING,
  until it comes back as a replica. On a tie the current primary stays.

Besides the monitor, the primary is looked for again when it is ejected and when a write is
refused with SQLSTATE 25006 (``read_only_sql_transaction``) and the node, asked, says it is
read-only (not the borrower's own read-only transaction: returns.py); its pooled sessions
connect with ``target_session_attrs=read-write``, so a demoted node also refuses new ones.
A node whose role changes gets a new generation: its pooled sessions were opened for the other
role and are never lent again.

In the declared form (``Pool(primary, replicas=[...])``) the roles are the user's and never change.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from . import lag
from .config import PRIMARY, REPLICA
from .endpoint import CONFLICT, UP

if TYPE_CHECKING:
    from .core import Pool
    from .endpoint import Endpoint

log = logging.getLogger("pool")

UNKNOWN = "candidate"  # a node whose role no answer has told yet


def observe(pool: "Pool", ep: "Endpoint", in_recovery: bool, timeline: int | None) -> list[tuple[Any, ...]]:
    """Lock held. Apply one node's answer; return the log lines to emit once the lock is free."""
    if ep is pool._primary and timeline is not None and ep.timeline not in (None, timeline):
        lag.forget_judgements(pool)  # a new history at the same address (lag.py)
    ep.timeline = timeline
    if not pool._discover:
        return []
    said: list[tuple[Any, ...]] = []
    current = pool._primary
    if in_recovery:
        if ep.state is CONFLICT:
            ep.state = UP
            said.append((logging.INFO, "%s is a replica again; conflict over", ep.name))
        if ep.role != REPLICA:
            _set_role(ep, REPLICA)
            if current is ep:
                pool._primary = None
                said.append((logging.WARNING, "primary %s is in recovery now (demoted); looking "
                                              "for the primary among the candidates", ep.name))
        return said
    newer = timeline is not None and (current is None or current.timeline is None
                                      or timeline > current.timeline)
    same = current is not None and timeline == current.timeline
    if current is None or current is ep or newer or (same and current.state is not UP):
        # No primary yet; or a newer timeline (a promotion); or the same timeline while the
        # current one is down. Follow it.
        if current is not ep:
            pool._primary = ep
            lag.forget_judgements(pool)
            if current is not None:
                _set_role(current, UNKNOWN)
                if current.state is UP:  # it claims primary on an older timeline: fence it off
                    current.state = CONFLICT
                    said.append((logging.WARNING, "two primaries: %s (timeline %s) and %s "
                                 "(timeline %s); writing only to %s, the newest; %s is a conflict "
                                 "until it rejoins as a replica", ep.name, timeline, current.name,
                                 current.timeline, ep.name, current.name))
            said.append((logging.WARNING if current is not None else logging.INFO,
                         "%s is the primary now (timeline %s)", ep.name, timeline))
        if ep.role != PRIMARY:
            _set_role(ep, PRIMARY)
        if ep.state is CONFLICT:
            ep.state = UP
        return said
    # Another node claims to be primary on a timeline no newer than the current primary's (an
    # old primary restarted before it was fenced): never two writable primaries.
    if ep.state is not CONFLICT:
        ep.state = CONFLICT
        ep.generation += 1
        said.append((logging.WARNING, "two primaries: %s (timeline %s) and %s (timeline %s); "
                     "writing only to %s; %s is a conflict until it rejoins as a replica",
                     current.name, current.timeline, ep.name, timeline, current.name, ep.name))
    return said


def _set_role(ep: "Endpoint", role: str) -> None:
    if ep.role != role:
        ep.role = role
        ep.generation += 1  # sessions opened for the old role (read-only, or read-write) go
        # ...and what its answers in the old role said: its position, lag and history (lag.py)
        ep.replay_lsn = ep.lag_s = ep.lag_bytes = None
        ep.lagging = ep.diverged = ep.judged = False
        ep.answers.clear()
