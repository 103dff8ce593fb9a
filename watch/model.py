"""What the live view shows, computed from recorded samples: no I/O, no clock, no terminal.

The load generator records every request as a ``loadtest.analysis.Request`` (``name`` is the
app: "threaded" or "process"), the pollers record what the apps say about their endpoints, and
the functions here turn that into figures and event lines. They are what the tests feed with
recorded samples (tests/test_watch.py).

Endpoint states come from ``GET /stats?all=1``. Once the app serves host-wide statistics
(``{"scope": "host", "processes": N, "endpoints": [{"name", "role", "state", "workers_up",
"workers_down"}, ...]}``) every worker is counted in every sample. Until then that URL answers
with the answering worker's own ``/stats`` (``{"pid", "endpoints": [{"name", "role", "state"}]}``),
and the view falls back to the latest state each worker reported within the last ``STALE_S``
seconds: the workers seen so far, not necessarily all of them.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

from loadtest.analysis import Request, failover_figures, percentile

STALE_S = 10.0  # a worker's fallback report older than this no longer counts
UP_STATES = ("up",)


@dataclasses.dataclass(frozen=True)
class EndpointState:
    name: str            # "replica1:5432" (what X-Served-By says)
    role: str            # primary | replica
    state: str           # up, down, refused, lagging, conflict; "mixed" when workers disagree
    workers_up: int
    workers_down: int
    workers_total: int | None  # None: not known (fallback: only the workers seen)

    @property
    def workers(self) -> str:
        """"2" (host-wide: all of them), or "2 seen" (fallback: the workers seen so far)."""
        if self.workers_total is not None:
            return str(self.workers_total)
        return f"{self.workers_up + self.workers_down} seen"

    @property
    def label(self) -> str:
        """e.g. "up 2/2": the state, then in how many of the workers the endpoint is up."""
        return f"{self.state} {self.workers_up}/{self.workers}"


@dataclasses.dataclass(frozen=True)
class Event:
    t: float   # epoch seconds
    text: str


class WorkerReports:
    """The latest /stats?all=1 answer of an app: host-wide if the app has it, else one entry
    per worker pid (the fallback)."""

    def __init__(self) -> None:
        self.host: tuple[float, dict] | None = None
        self.workers: dict[int, tuple[float, list[dict]]] = {}

    def add(self, t: float, body: dict) -> set[str] | None:
        """Record an answer. Returns the endpoints whose state this answer can have changed:
        None (any: a host-wide answer), or, per worker, those whose state differs from the same
        worker's previous answer; a worker seen for the first time changes nothing (its state
        may be old news: an idle worker's pool notices an outage only when next used)."""
        if body.get("scope") == "host":
            self.host = (t, body)
            return None
        if "pid" not in body or not isinstance(body.get("endpoints"), list):
            return set()
        pid = int(body["pid"])
        previous = {e["name"]: e.get("state") for e in self.workers.get(pid, (0, []))[1]}
        self.workers[pid] = (t, body["endpoints"])
        return {e["name"] for e in body["endpoints"] if e["name"] in previous and previous[e["name"]] != e.get("state")}

    def states(self, now: float) -> list[EndpointState]:
        if self.host is not None and now - self.host[0] <= STALE_S:
            return host_states(self.host[1])
        fresh = [eps for t, eps in self.workers.values() if now - t <= STALE_S]
        return merge_worker_states(fresh)


def host_states(body: dict) -> list[EndpointState]:
    """Endpoint states of a host-wide ``/stats?all=1`` answer. Its ``state`` is the answering
    worker's own: "mixed" instead while some workers have the endpoint up and others down."""
    total = body.get("processes")
    out = []
    for e in body.get("endpoints", []):
        up, down = int(e.get("workers_up", 0)), int(e.get("workers_down", 0))
        state = "mixed" if up and down else e.get("state", "?")
        out.append(EndpointState(e["name"], e.get("role", "?"), state, up, down, total))
    return out


def merge_worker_states(reports: Iterable[Sequence[dict]]) -> list[EndpointState]:
    """Endpoint states from several workers' own /stats endpoint lists (the fallback)."""
    merged: dict[str, dict] = {}
    for endpoints in reports:
        for e in endpoints:
            m = merged.setdefault(e["name"], {"role": e.get("role", "?"), "states": []})
            m["states"].append(e.get("state", "?"))
    out = []
    for name, m in merged.items():
        states = m["states"]
        up = sum(1 for s in states if s in UP_STATES)
        distinct = set(states)
        state = states[0] if len(distinct) == 1 else "mixed"
        out.append(EndpointState(name, m["role"], state, up, len(states) - up, None))
    return out


def state_events(app: str, before: Sequence[EndpointState], after: Sequence[EndpointState],
                 t: float, node_of=lambda name: name, only: set[str] | None = None) -> list[Event]:
    """Ejections and re-admissions between two views of one app's endpoints (`only`: just
    these endpoints, as WorkerReports.add returns them)."""
    old = {e.name: e for e in before}
    events = []
    for e in after:
        prev = old.get(e.name)
        if prev is None or (only is not None and e.name not in only):
            continue
        who = node_of(e.name)
        if prev.workers_down == 0 and e.workers_down > 0:
            events.append(Event(t, f"{app}: {who} ejected, down in {e.workers_down} of {e.workers} workers"))
        elif prev.workers_down > 0 and e.workers_down == 0 and e.workers_up > 0:
            every = f"all {e.workers} workers" if e.workers_total is not None else f"every worker seen ({e.workers_up})"
            events.append(Event(t, f"{app}: {who} re-admitted, up in {every}"))
    return events


def window(rows: Sequence[Request], now: float, seconds: float) -> list[Request]:
    """The requests that ended in (now - seconds, now]."""
    return [r for r in rows if now - seconds < r.end <= now]


def rates_by_endpoint(rows: Sequence[Request], now: float, seconds: float = 2.0) -> dict[str, dict[str, float]]:
    """{app: {X-Served-By: successful requests/s}} over the last `seconds`."""
    out: dict[str, dict[str, float]] = {}
    for r in window(rows, now, seconds):
        if r.ok and r.served_by:
            per = out.setdefault(r.name, {})
            per[r.served_by] = per.get(r.served_by, 0.0) + 1 / seconds
    return out


@dataclasses.dataclass(frozen=True)
class AppFigures:
    reads: int
    writes: int
    reads_failed: int
    writes_failed: int
    failed_recent: int        # in the recent window
    rps: float                # recent window
    p99_ms: float | None      # recent window


def app_figures(rows: Sequence[Request], app: str, now: float, seconds: float = 5.0) -> AppFigures:
    mine = [r for r in rows if r.name == app]
    recent = window(mine, now, seconds)
    return AppFigures(
        reads=sum(1 for r in mine if r.kind == "read"),
        writes=sum(1 for r in mine if r.kind == "write"),
        reads_failed=sum(1 for r in mine if r.kind == "read" and not r.ok),
        writes_failed=sum(1 for r in mine if r.kind == "write" and not r.ok),
        failed_recent=sum(1 for r in recent if not r.ok),
        rps=len(recent) / seconds,
        p99_ms=percentile([r.latency_ms for r in recent], 99),
    )


@dataclasses.dataclass
class Fault:
    """One outage of a node: seen (or made) at `kill`, started again at `restart`, answering
    queries again at `healthy` (epoch seconds; None while it has not happened)."""
    node: str
    kill: float
    restart: float | None = None
    healthy: float | None = None

    @property
    def role(self) -> str:
        return "primary" if self.node == "primary" else "replica"


def fault_figures(rows: Sequence[Request], fault: Fault, served_by: dict[str, str], app: str,
                  end: float, slow_ms: float = 1000) -> dict:
    """The load tests' failover figures (loadtest.analysis.failover_figures: reads_failed,
    writes_failed, reroute_s, readmit_s, ...) for one app and one outage, over the requests
    from the kill until `end` (the next outage, or the end of the run)."""
    mine = [r for r in rows if r.name == app and fault.kill <= r.end and r.start < end]
    times = {"kill": fault.kill, "restart": fault.restart if fault.restart is not None else end,
             "healthy": fault.healthy}
    return failover_figures(mine, times, served_by.get(fault.node, fault.node), fault.role, slow_ms)


def node_events(before: dict[str, bool], after: dict[str, bool], t: float) -> list[Event]:
    """A node stopped or started answering queries (the watch mode's kill/restart lines)."""
    events = []
    for node, up in after.items():
        if node in before and before[node] != up:
            events.append(Event(t, f"{node} accepts queries again" if up
                                else f"{node} stopped answering (killed or stopped)"))
    return events


def track_faults(faults: list[Fault], before: dict[str, bool], after: dict[str, bool], t: float) -> None:
    """Open a Fault when a node stops answering, close it when it answers again."""
    for node, up in after.items():
        if node not in before or before[node] == up:
            continue
        if not up:
            faults.append(Fault(node, t))
        else:
            for f in reversed(faults):
                if f.node == node and f.healthy is None:
                    f.restart = f.restart if f.restart is not None else t
                    f.healthy = t
                    break
