"""Monitoring: every endpoint that is up is asked, about once a second, where it stands.

One persistent asynchronous connection per endpoint (``probe.Monitor``) sends ``STATUS_SQL`` and
is stepped without blocking, by the housekeeping thread or, in process mode, on checkouts, like
the probes. The answer (in recovery or not, the WAL position, the timeline) feeds role discovery
(roles.py) and the lag measure (lag.py); probes of a down endpoint ask the same question, so an
endpoint comes back with its role known. The job runs only when something needs it: the
candidate form, or ``max_lag``. A monitor that gets no answer within ``connect_timeout`` is
closed and opened again later; it is never evidence against the server (requests find that out
on their own), so a slow monitor cannot raise a false alarm.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from . import lag, roles
from .config import REPLICA
from .endpoint import DOWN, REFUSED
from .lag import parse_lsn
from .probe import OK, PENDING, Monitor

if TYPE_CHECKING:
    from .core import Pool
    from .endpoint import Endpoint

log = logging.getLogger("pool")

# Can it take writes? (Not in recovery, and not read-only by configuration, as a node being
# demoted by hand or a primary fenced read-only is.)  The WAL position: replayed (a replica) or
# written (a primary).  The timeline (a primary only: the first 8 hex digits of its current WAL
# file's name).  A replica's WAL received by streaming (NULL if it has not streamed since it
# started): with the replay position, how far its history reaches (lag.py).
STATUS_SQL = (
    "SELECT pg_is_in_recovery() OR current_setting('default_transaction_read_only')::bool, "
    "CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END::text, "
    "CASE WHEN pg_is_in_recovery() THEN NULL "
    "ELSE substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END, "
    "pg_last_wal_receive_lsn()::text")
# The monitor's own question adds the timeline a replica is on at least, from its control file
# (the last restartpoint's and the minimum recovery point's; they lag, never lead): evidence
# that it is on the primary's history (lag.py). Those functions are executable by everyone by
# default; where they are not, a pool asks STATUS_SQL from then on (Pool._floor_ok).
FLOOR_SQL = STATUS_SQL + f", CASE WHEN pg_is_in_recovery() THEN {lag.FLOOR_EXPR} END"
MONITOR_INTERVAL = 1.0  # seconds between questions to one endpoint
SEEK_INTERVAL = 0.2  # ...while the candidate form has no primary up: a promotion is seen soon
STEP_INTERVAL = 0.01


def status_of(rows: Any) -> tuple | None:
    """(read_only, lsn, timeline, reach, floor) from STATUS_SQL's or FLOOR_SQL's row, or None
    if it did not answer. ``read_only`` is what roles.py calls in recovery: it cannot be the
    primary. A replica's ``reach``: the furthest position it holds, received or replayed; its
    ``floor``: the timeline it is on at least (None if not asked)."""
    if not rows:
        return None
    in_recovery, lsn, timeline, received, *floor = rows[0]
    lsn = parse_lsn(lsn)
    reach = (max(lsn or 0, parse_lsn(received) or 0) or None) if in_recovery else None
    return (bool(in_recovery), lsn, int(timeline, 16) if timeline else None, reach,
            floor[0] if floor else None)


def job_monitor(pool: "Pool", now: float) -> float:
    """Step each endpoint's monitor; apply what answered. Returns when to run again."""
    due = float("inf")
    judgements = pool._judgements
    interval = lag.RECHECK if now < pool._fast_until else SEEK_INTERVAL if pool._discover and (
        pool._primary is None or pool._primary.state in (DOWN, REFUSED)) else MONITOR_INTERVAL
    for ep in pool._endpoints:
        m = ep.monitor
        if ep.state in (DOWN, REFUSED) or pool._closed or not pool._may_monitor(ep, now):
            # Probes ask while it is down; another process may hold the monitor lease (board.py)
            if m is not None:
                m.close()
                ep.monitor = None
            continue
        if m is None or m.status not in (OK, PENDING):
            if now < ep.monitor_at:
                due = min(due, ep.monitor_at)
                continue
            m = ep.monitor = Monitor(ep.config.monitor_dsn, now, pool.options.connect_timeout,
                                     FLOOR_SQL if pool._floor_ok else STATUS_SQL)
        elif m.status == OK:
            if now < ep.monitor_at:
                due = min(due, ep.monitor_at)
                continue
            if not m.ask(now):
                ep.monitor = None
                continue
        status = m.step(now)
        if status == PENDING:
            due = min(due, now + STEP_INTERVAL)
            continue
        ep.monitor_at = now + interval
        due = min(due, ep.monitor_at)
        if status == OK:
            answer = status_of(m.rows)
            if apply_status(pool, ep, answer, now, m.started):
                pool._share_status(ep, answer, m.started)
        else:  # no answer: ask again later, on a new connection; not evidence of an outage
            if "pg_control" in (m.error or "") and "permission denied" in (m.error or ""):
                pool._floor_ok = False  # (see FLOOR_SQL)
            m.close()
            ep.monitor = None
    if pool._judgements != judgements:  # a new primary meanwhile: questions due at once (lag.py)
        due = min(due, now + STEP_INTERVAL)
    return due


def apply_status(pool: "Pool", ep: "Endpoint", status: tuple | None, now: float,
                 asked: float) -> bool:
    """What a monitor or a probe (its question sent at ``asked`` or later) learnt about ep: its
    role, its position, its lag, and whether the replicas are on the primary's history. False if
    nothing was applied: no answer, or one to a question older than what was (stale)."""
    if status is None:
        return False
    in_recovery, lsn, timeline, reach, floor = status
    answered = time.monotonic()  # not ``now``: the answer may have arrived after it was taken
    with pool._lock:
        if asked < ep.status_at:
            return False  # asked before one already applied (a probe, a survey, the board's)
        ep.status_at = asked
        said = roles.observe(pool, ep, in_recovery, timeline)
        if ep is pool._primary and not in_recovery and lsn is not None:
            if pool._lag_source is not ep:  # a new primary: no replica is judged on its history
                lag.forget_judgements(pool)
            lag.primary_answered(pool, ep, now, lsn)
            said += lag.check_diverged(pool, ep, asked, lsn)
        elif in_recovery:
            ep.replay_lsn = lsn
            ep.lag_s, ep.lag_bytes = pool._lag.lag(now, lsn)
            max_lag = pool.options.max_lag
            ep.lagging = max_lag is not None and ep.lag_s is not None and ep.lag_s > max_lag
            if reach is not None and ep.role == REPLICA:
                lag.replica_answered(ep, asked, answered, reach, floor)
        pool._state_changed_locked()
    for level, *args in said:
        log.log(level, *args)
    return True


def close_monitors(pool: "Pool") -> None:
    for ep in pool._endpoints:
        if ep.monitor is not None:
            ep.monitor.close()
            ep.monitor = None

