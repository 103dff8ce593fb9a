"""Figures from the per-request logs (never from Locust's smoothed statistics).

A request is a row of a ``requests-*.csv`` file written by the locustfile: its start (epoch
seconds), latency, kind (read/write), status (0 = no HTTP response: timeout, refused, reset),
X-Served-By, the id a 201 acknowledged, and the error Locust reported ("" = success).

Scaling: each step's window is [reached + warmup, end] from ``steps.jsonl``; requests that
*started* in the window count. The warm-up is cut because each step begins with new users
connecting and (nopool aside) pools growing, which is not the steady state we want to compare.

Failover: the harness records when it issued the kill (``kill``), the start (``restart``) and
when the node answered queries again (``healthy``), all epoch seconds; see ``failover_figures``.
Promotion (``promote_figures``): the kill, then the steps of `make promote` and `make rejoin` as
they report them (promote, promoted, rejoin, rejoined). Lag (``readback_figures``): when replay
was paused and resumed on the lagging replica, and when it had caught up.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence


class Request(NamedTuple):
    start: float
    latency_ms: float
    kind: str  # read | write
    name: str
    status: int
    served_by: str
    item_id: int | None
    error: str
    read_after: str = ""  # locustfile.LOG_COLUMNS: "issued", "sent", "none-issued", "omitted"
    worker: str = ""  # the app's X-Worker: pid of the gunicorn worker that answered

    @property
    def end(self) -> float:
        return self.start + self.latency_ms / 1000

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def stale(self) -> bool:
        """A read-back that did not see the write just acknowledged (readback.py)."""
        return "stale:" in self.error


def load_requests(run_dir: Path) -> list[Request]:
    """Every request of a run (all processes' logs), in start order."""
    rows: list[Request] = []
    for path in sorted(Path(run_dir).glob("requests-*.csv")):
        with open(path, newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                if not r.get("start"):
                    continue  # a torn last line of a killed process
                rows.append(Request(float(r["start"]), float(r["latency_ms"]), r["kind"], r["name"],
                                    int(r["status"] or 0), r["served_by"],
                                    int(r["item_id"]) if r["item_id"] else None, r["error"],
                                    r.get("read_after") or "", r.get("worker") or ""))
    rows.sort(key=lambda r: r.start)
    return rows


def acked_ids(rows: Iterable[Request]) -> list[int]:
    """Ids of every write the service acknowledged (201 with an id)."""
    return [r.item_id for r in rows if r.status == 201 and r.item_id is not None]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between the closest ranks; None if no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def window_figures(rows: Sequence[Request], t0: float, t1: float) -> dict:
    """rps, latency percentiles (all requests, as Locust counts them) and failure ratio of the
    requests that started in [t0, t1)."""
    inside = [r for r in rows if t0 <= r.start < t1]
    latencies = [r.latency_ms for r in inside]
    span = max(t1 - t0, 1e-9)
    failed = sum(1 for r in inside if not r.ok)
    return {
        "window_s": round(span, 3),
        "requests": len(inside),
        "rps": round(len(inside) / span, 1),
        "p50_ms": _ms(percentile(latencies, 50)),
        "p95_ms": _ms(percentile(latencies, 95)),
        "p99_ms": _ms(percentile(latencies, 99)),
        "fail_ratio": round(failed / len(inside), 6) if inside else None,
    }


def load_steps(run_dir: Path) -> list[dict]:
    """[{step, users, reached, end, late}] from the shape's steps.jsonl (complete steps only)."""
    steps: dict[int, dict] = {}
    path = Path(run_dir) / "steps.jsonl"
    if not path.exists():
        return []
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        step = steps.setdefault(rec["step"], {"step": rec["step"], "users": rec["users"]})
        if rec["phase"] in ("reached", "reached_late"):
            step["reached"] = rec["t"]
            step["late"] = rec["phase"] == "reached_late"
        elif rec["phase"] == "end":
            step["end"] = rec["t"]
    return [s for _, s in sorted(steps.items()) if "reached" in s and "end" in s]


def scaling_steps(rows: Sequence[Request], steps: Sequence[dict], warmup_s: float) -> list[dict]:
    """Per step: users, then window_figures() over the step minus its first ``warmup_s``."""
    out = []
    for step in steps:
        t0 = min(step["reached"] + warmup_s, step["end"])
        figures = window_figures(rows, t0, step["end"])
        out.append({"users": step["users"], **figures, "reached_late": step.get("late", False)})
    return out


def request_counts(rows: Sequence[Request]) -> dict:
    """reads, writes, and how many of each failed (the writes that failed with a 503 too)."""
    reads = [r for r in rows if r.kind == "read"]
    failed_writes = [r for r in rows if r.kind == "write" and not r.ok]
    return {"reads": len(reads), "writes": sum(1 for r in rows if r.kind == "write"),
            "reads_failed": sum(1 for r in reads if not r.ok), "writes_failed": len(failed_writes),
            "writes_failed_503": sum(1 for r in failed_writes if r.status == 503)}


def failover_figures(rows: Sequence[Request], faults: dict, dead: str, role: str,
                     slow_ms: float) -> dict:
    """The failover figures of one run (keys documented in docs/loadtest.md).

    ``faults``: epoch seconds ``kill``, ``restart``, ``healthy`` (None if it never got there).
    ``dead``: the X-Served-By value of the killed node; ``role``: "replica" or "primary".

    reroute_s: from the kill until the end of the last request the outage *disturbed*, i.e. one
      still served by the killed node, or slower than ``slow_ms`` (a pool still trying the dead
      server, a connect timeout), or failed where it should not: any read, and (replica outage)
      any write or (primary outage) a write that failed other than by a fast 503. After that
      point every request got its expected answer at normal speed. 0 if nothing was disturbed.
    readmit_s: from ``healthy`` until the end of the first request served by the node again: a
      read on a replica, a successful write (201) on the primary. None if that never happened
      before the run ended.
    """
    kill, restart, healthy = faults["kill"], faults["restart"], faults.get("healthy")

    def expected_failure(r: Request) -> bool:
        # While the primary is down a write may only fail fast, with the app's 503.
        return role == "primary" and r.kind == "write" and r.status == 503

    outage = [r for r in rows if r.end >= kill and r.start < restart]
    disturbed = [r for r in outage
                 if r.served_by == dead or r.latency_ms >= slow_ms
                 or (not r.ok and not expected_failure(r))]
    reroute = max((r.end for r in disturbed), default=kill) - kill

    readmit = None
    if healthy is not None:
        back = [r for r in rows if r.start >= restart and r.served_by == dead and r.ok
                and (r.kind == "read" if role == "replica" else r.status == 201)]
        if back:
            readmit = max(0.0, back[0].end - healthy)

    figures = {
        **request_counts(rows),
        "disturbed_requests": len(disturbed),
        "reroute_s": round(max(0.0, reroute), 3),
        "readmit_s": None if readmit is None else round(readmit, 3),
        "outage_p99_ms": _ms(percentile([r.latency_ms for r in outage], 99)),
        "outage_max_ms": _ms(max((r.latency_ms for r in outage), default=None)),
    }
    if role == "primary" and healthy is not None:
        figures.update(workers_back(rows, kill, healthy))
    return figures


def workers_back(rows: Sequence[Request], kill: float, healthy: float) -> dict:
    """When writes came back on each app worker (X-Worker) after the primary's restart.

    In process mode each worker has its own pool: without a shared health board each one finds
    the primary again on its own schedule, so what matters is how long the workers disagree.
    A worker is seen failing until the end of its last failed write (writes started after the
    kill), and back at the end of its first 201 after that; in between it got no write (at ~20
    writes/s over 16 workers, that can be a second or two), which says nothing about its pool.

    writes_back_by_worker: {pid: seconds from ``healthy``} to its first 201 after its last
      failure (negative: before the harness saw the node healthy, it polls every 0.2 s).
    failing_until_by_worker: {pid: seconds from ``healthy``} to the end of its last failed write.
    writes_back_spread_s: how long after the first worker wrote again any worker still failed a
      write (0 if none did): the last failure's end minus the first worker's back time.
    workers_not_back: workers whose last write failed. write_gap_ms: the median time between
      two writes on one worker, the resolution of these figures.
    """
    writes: dict[str, list[Request]] = {}
    for r in rows:
        if r.kind == "write" and r.worker and r.start >= kill:
            writes.setdefault(r.worker, []).append(r)
    back: dict[str, float] = {}
    failing: dict[str, float] = {}
    gaps: list[float] = []
    for worker, mine in writes.items():
        last_failed = max((i for i, r in enumerate(mine) if not r.ok), default=-1)
        after = [r for r in mine[last_failed + 1:] if r.status == 201]
        if after:
            back[worker] = round(after[0].end - healthy, 3)
            if last_failed >= 0:
                failing[worker] = round(mine[last_failed].end - healthy, 3)
        gaps += [(b.start - a.start) * 1000 for a, b in zip(mine, mine[1:])]
    spread = None
    if back:
        first = min(back.values())
        spread = round(max(0.0, max(failing.values(), default=first) - first), 3)
    return {
        "writes_back_by_worker": dict(sorted(back.items(), key=lambda kv: kv[1])),
        "failing_until_by_worker": dict(sorted(failing.items(), key=lambda kv: kv[1])),
        "writes_back_spread_s": spread,
        "workers_not_back": len(writes) - len(back),
        "write_gap_ms": _ms(percentile(gaps, 50)),
    }


def promote_figures(rows: Sequence[Request], events: dict, new_primary: str,
                    grace_s: float = 2.0) -> dict:
    """The promotion figures of one run (keys documented in docs/loadtest.md).

    ``events``: epoch seconds of ``kill`` (the primary SIGKILLed), ``promoted`` (pg_promote()
    completed on the replica) and the rest of the schedule; ``new_primary``: the promoted
    node's X-Served-By value.

    write_outage_s: from the kill to the end of the first 201 the new primary served (None if
      none did). writes_back_s: the same from ``promoted``, the pool's part of it.
    writes_failed_late: writes started ``grace_s`` or more after ``promoted`` that failed: the
      pool promises to follow a promotion within that time.
    """
    kill, promoted = events.get("kill"), events.get("promoted")
    writes = [r for r in rows if r.kind == "write"]
    first = next((r for r in writes if kill is not None and r.start >= kill and r.status == 201
                  and r.served_by == new_primary), None)
    late = [r for r in writes if promoted is not None and r.start >= promoted + grace_s and not r.ok]
    return {
        **request_counts(rows),
        "write_outage_s": None if first is None else round(first.end - kill, 3),
        "writes_back_s": None if first is None or promoted is None else round(first.end - promoted, 3),
        "writes_failed_late": len(late),
        "grace_s": grace_s,
    }


# Read-backs by protection, as readback.py tags them.
PROTECTIONS = {"with_token": ("sent", "none-issued"), "without_token": ("omitted",)}


def readback_figures(rows: Sequence[Request], events: dict, lagging: str, replicas: Sequence[str]) -> dict:
    """The lag figures of one run (keys documented in docs/loadtest.md), with the read
    protection on (the read-back sends the 201's token) and off.

    ``events``: epoch seconds ``paused``, ``resumed``, ``caught_up``; the lag window is
    [paused, caught_up) (to the end of the run if it never caught up). ``lagging``: the
    X-Served-By value of the lagging replica; ``replicas``: those of every replica.
    """
    t0 = events.get("paused")
    t1 = events.get("caught_up") or (rows[-1].end if rows else t0)
    writes = [r for r in rows if r.kind == "write"]
    acked = [r for r in writes if r.status == 201]
    out: dict = {
        "writes": len(writes),
        "writes_failed": sum(1 for r in writes if not r.ok),
        "tokens_issued": sum(1 for r in acked if r.read_after == "issued"),
        "tokens_missing": sum(1 for r in acked if r.read_after != "issued"),
        "lag_window_s": None if t0 is None or t1 is None else round(t1 - t0, 3),
    }
    for key, tags in PROTECTIONS.items():
        back = [r for r in rows if r.kind == "read" and r.read_after in tags]
        during = [r for r in back if t0 is not None and t0 <= r.start < t1]
        served = [r for r in during if r.ok]
        out[key] = {
            "read_backs": len(back),
            "stale_reads": sum(1 for r in back if r.stale),
            "stale_during_lag": sum(1 for r in during if r.stale),
            "reads_failed": sum(1 for r in back if not r.ok and not r.stale),
            "read_backs_during_lag": len(during),
            "served_by_lagging": sum(1 for r in during if r.served_by == lagging),
            "replica_share_during_lag": (round(sum(1 for r in served if r.served_by in replicas)
                                               / len(served), 4) if served else None),
        }
    return out


def timeline(rows: Sequence[Request], t0: float, bin_s: float = 1.0) -> dict:
    """Per-second series for the failover plot: successful requests/s by X-Served-By, failed
    requests/s, and p99 latency per bin. Bins are [t0 + i*bin_s, t0 + (i+1)*bin_s)."""
    if not rows:
        return {"t": [], "served": {}, "failed": [], "p99_ms": []}
    n = int((rows[-1].start - t0) // bin_s) + 1
    served: dict[str, list[float]] = {}
    failed = [0.0] * n
    latencies: list[list[float]] = [[] for _ in range(n)]
    for r in rows:
        i = int((r.start - t0) // bin_s)
        if i < 0:
            continue
        latencies[i].append(r.latency_ms)
        if r.ok:
            served.setdefault(r.served_by or "?", [0.0] * n)[i] += 1 / bin_s
        else:
            failed[i] += 1 / bin_s
    return {"t": [i * bin_s for i in range(n)], "served": dict(sorted(served.items())),
            "failed": failed, "p99_ms": [percentile(v, 99) for v in latencies]}
