"""No acknowledged write lost: every id a 201 returned must exist on the primary and, once
replication has caught up, on both replicas. After a promotion "the primary" is the promoted
node and the replicas are the two others (``primary=``).

Runs in the harness after Locust has finished, over the published ports as the app user (it has
SELECT on items, and pg_current_wal_lsn()/pg_last_wal_replay_lsn() are open to everyone).
"Caught up" means the replica's replay LSN has reached the primary's current LSN, taken after
the run; we wait for that up to a timeout and check anyway if it never happens (the counts then
say how much is missing, and ``replicas_caught_up`` says why).
"""

from __future__ import annotations

import time
from typing import Sequence

import psycopg2

from .settings import NODES, Settings

MISSING_SQL = ("SELECT u.id FROM unnest(%s::bigint[]) AS u(id) "
               "WHERE NOT EXISTS (SELECT 1 FROM items i WHERE i.id = u.id) ORDER BY u.id")


def _retrying(settings: Settings, node: str, timeout: float, work):
    """work(cursor) on ``node``, retrying connection failures until ``timeout`` (the node may
    still be restarting after a failover run)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = psycopg2.connect(**settings.db_params(node))
            try:
                conn.autocommit = True
                with conn.cursor() as cur:
                    return work(cur)
            finally:
                conn.close()
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _missing(cur, ids: Sequence[int]) -> list[int]:
    cur.execute(MISSING_SQL, (list(ids),))
    return [row[0] for row in cur.fetchall()]


def wait_replayed(settings: Settings, node: str, target_lsn: str, timeout: float) -> bool:
    """True once ``node`` has replayed up to ``target_lsn``; False after ``timeout``."""
    deadline = time.monotonic() + timeout

    def caught_up(cur) -> bool:
        cur.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target_lsn,))
        return bool(cur.fetchone()[0])

    while True:
        try:
            if _retrying(settings, node, max(0.0, deadline - time.monotonic()), caught_up):
                return True
        except psycopg2.OperationalError:
            return False
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def check_acked(settings: Settings, ids: Sequence[int], timeout: float = 30,
                primary: str = "primary") -> dict:
    """acked_writes, acked_missing_primary (on ``primary``, the node that is primary now),
    acked_missing_replicas {node: n} and replicas_caught_up {node: bool} for the other nodes,
    and up to 20 missing ids per node for the report. A count is None when the node could not
    be checked at all."""
    ids = sorted(set(ids))
    replicas = [n for n in NODES if n != primary]
    result: dict = {"acked_writes": len(ids), "acked_missing_primary": None,
                    "acked_missing_replicas": {r: None for r in replicas},
                    "replicas_caught_up": {r: False for r in replicas}, "missing_ids": {}}
    try:
        missing, lsn = _retrying(settings, primary, timeout,
                                 lambda cur: (_missing(cur, ids), _lsn(cur)))
    except psycopg2.OperationalError as exc:
        result["error"] = f"{primary} (the primary) unreachable: {str(exc).strip()[:200]}"
        return result
    result["acked_missing_primary"] = len(missing)
    result["missing_ids"][primary] = missing[:20]
    for replica in replicas:
        result["replicas_caught_up"][replica] = wait_replayed(settings, replica, lsn, timeout)
        try:
            gone = _retrying(settings, replica, timeout, lambda cur: _missing(cur, ids))
        except psycopg2.OperationalError:
            continue
        result["acked_missing_replicas"][replica] = len(gone)
        result["missing_ids"][replica] = gone[:20]
    return result


def _lsn(cur) -> str:
    cur.execute("SELECT pg_current_wal_lsn()::text")
    return cur.fetchone()[0]


def lost(result: dict) -> bool:
    """True if any acknowledged write is missing anywhere, or could not be checked."""
    counts = [result["acked_missing_primary"], *result["acked_missing_replicas"].values()]
    return any(c is None or c > 0 for c in counts)
