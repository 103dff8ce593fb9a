"""The live view's moving parts: a steady load, the pollers, the terminal view and the demo
script. The figures themselves are computed in model.py (pure, tested on recorded samples).

Threads: per pooled app `CLIENTS` load threads (keep-alive connections, paced to the rate),
one poller per app (GET /stats?all=1 four times a second), one health poller per database node
(the app user's login on its published port, like the load tests). The main thread redraws the
view four times a second with rich's Live display.
"""
from __future__ import annotations

import http.client
import json
import random
import threading
import time
from typing import Callable
from urllib.parse import urlsplit

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from loadtest.analysis import Request, acked_ids
from loadtest.settings import NODES, POOLED, TARGETS, Settings
from loadtest.stack import Stack

from . import model

CLIENTS = 2          # load threads per app
READ_SHARE = 0.9     # the rest are writes
HTTP_TIMEOUT = 5.0
POLL_S = 0.25


def _clock() -> str:
    return time.strftime("%H:%M:%S")


def stamp(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"


class Recorder:
    """Everything observed, shared by the threads (appends under a lock, copies for readers)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rows: list[Request] = []
        self.events: list[model.Event] = []
        self.reports = {app: model.WorkerReports() for app in POOLED}
        self.node_up: dict[str, bool] = {}
        self.faults: list[model.Fault] = []

    def add(self, row: Request) -> None:
        with self.lock:
            self.rows.append(row)

    def event(self, text: str, t: float | None = None) -> None:
        with self.lock:
            self.events.append(model.Event(time.time() if t is None else t, text))


class Worker(threading.Thread):
    def __init__(self, stop: threading.Event, name: str) -> None:
        super().__init__(daemon=True, name=name)
        self.stop = stop


class LoadClient(Worker):
    """Steady reads (GET /items/<id>) and writes (POST /items) on one keep-alive connection,
    `rate` requests a second."""

    def __init__(self, stop, recorder: Recorder, app: str, url: str, rate: float, seed: int) -> None:
        super().__init__(stop, f"load-{app}-{seed}")
        self.recorder, self.app, self.rate = recorder, app, rate
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.random = random.Random(seed)
        self.conn: http.client.HTTPConnection | None = None

    def run(self) -> None:
        n, t0 = 0, time.monotonic()
        while not self.stop.is_set():
            write = self.random.random() >= READ_SHARE
            self.recorder.add(self.one("write" if write else "read"))
            n += 1
            self.stop.wait(max(0.0, t0 + n / self.rate - time.monotonic()))
        if self.conn:
            self.conn.close()

    def one(self, kind: str) -> Request:
        if kind == "read":
            method, path, body, headers = "GET", f"/items/{self.random.randint(1, 10000)}", None, {}
        else:
            method, path = "POST", "/items"
            body = json.dumps({"name": f"watch-{time.time():.3f}"}).encode()
            headers = {"Content-Type": "application/json"}
        start = time.time()
        t0 = time.monotonic()
        status, served_by, item_id, error = 0, "", None, ""
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=HTTP_TIMEOUT)
            self.conn.request(method, path, body=body, headers=headers)
            resp = self.conn.getresponse()
            data = resp.read()
            status, served_by = resp.status, resp.getheader("X-Served-By") or ""
            if resp.will_close:
                self.conn.close()
                self.conn = None
            if status == 201:
                item_id = json.loads(data)["id"]
            elif status != 200:
                error = f"HTTP {status}"
        except (OSError, http.client.HTTPException, ValueError) as exc:
            error = type(exc).__name__
            if self.conn:
                self.conn.close()
            self.conn = None
        return Request(start, (time.monotonic() - t0) * 1000, kind, self.app, status, served_by, item_id, error)


class StatsPoller(Worker):
    """GET /stats?all=1 on one app; logs ejections and re-admissions as they appear."""

    def __init__(self, stop, recorder: Recorder, app: str, url: str, node_of: Callable[[str], str]) -> None:
        super().__init__(stop, f"stats-{app}")
        self.recorder, self.app, self.url, self.node_of = recorder, app, url, node_of

    def run(self) -> None:
        parts = urlsplit(self.url)
        before: list[model.EndpointState] = []
        while not self.stop.is_set():
            try:
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=2)
                try:
                    conn.request("GET", "/stats?all=1")
                    resp = conn.getresponse()
                    body = json.loads(resp.read()) if resp.status == 200 else None
                finally:
                    conn.close()
            except (OSError, http.client.HTTPException, ValueError):
                body = None
            now = time.time()
            if isinstance(body, dict):
                with self.recorder.lock:
                    reports = self.recorder.reports[self.app]
                    changed = reports.add(now, body)
                    after = reports.states(now)
                    self.recorder.events += model.state_events(TARGETS[self.app][0], before, after, now,
                                                               self.node_of, changed)
                before = after
            self.stop.wait(POLL_S)


class NodePoller(Worker):
    """Is a database node answering queries? Logs (and, in watch mode, records) its outages."""

    def __init__(self, stop, recorder: Recorder, stack: Stack, node: str, track: bool) -> None:
        super().__init__(stop, f"node-{node}")
        self.recorder, self.stack, self.node, self.track = recorder, stack, node, track

    def run(self) -> None:
        last_up = None
        while not self.stop.is_set():
            t0 = time.time()
            up = self.stack.node_healthy(self.node)
            now = time.time()
            with self.recorder.lock:
                before = dict(self.recorder.node_up)
                self.recorder.node_up[self.node] = up
                after = {**before, self.node: up}
                if self.track and self.node in before:
                    self.recorder.events += model.node_events({self.node: before[self.node]}, {self.node: up}, now)
                    # An outage starts no later than the last check that still found the node up,
                    # so no disturbed request falls before it (reroute_s is never flattered).
                    model.track_faults(self.recorder.faults, before, after, now if up else (last_up or now))
            if up:
                last_up = t0
            self.stop.wait(0.5)


# --- the view ------------------------------------------------------------------------------------
def snapshot(recorder: Recorder, now: float) -> dict:
    """A consistent copy of what the view needs (taken under the lock)."""
    with recorder.lock:
        rows = [r for r in recorder.rows if r.end > now - 10]
        return {"now": now, "rows": rows, "events": list(recorder.events[-10:]),
                "states": {app: rep.states(now) for app, rep in recorder.reports.items()},
                "host_wide": {app: rep.host is not None for app, rep in recorder.reports.items()},
                "node_up": dict(recorder.node_up),
                "totals": {app: model.app_figures(recorder.rows, app, now) for app in POOLED}}


def render(snap: dict, title: str, node_of: Callable[[str], str], urls: dict[str, str]) -> Group:
    """The whole screen: a header, one table per pooled app, the event lines."""
    now = snap["now"]
    rates = model.rates_by_endpoint(snap["rows"], now)
    nodes = "  ".join(f"{n} {'[green]up[/]' if snap['node_up'][n] else '[red]DOWN[/]'}"
                      for n in NODES if n in snap["node_up"])
    parts = [Text.from_markup(f"[bold]{title}[/]  {stamp(now)}  nodes: {nodes or '…'}")]
    for app in POOLED:
        fig = snap["totals"][app]
        table = Table(expand=True, show_edge=False, pad_edge=False)
        for col, justify in (("endpoint", "left"), ("role", "left"), ("state across workers", "left"),
                             ("req/s", "right")):
            table.add_column(col, justify=justify)
        served = dict(rates.get(app, {}))
        for e in sorted(snap["states"][app], key=lambda e: (e.role != "primary", e.name)):
            colour = "green" if e.workers_down == 0 and e.state == "up" else ("yellow" if e.workers_up else "red")
            table.add_row(f"{node_of(e.name)} ({e.name})", e.role, f"[{colour}]{e.label}[/]",
                          f"{served.pop(e.name, 0.0):.1f}")
        for name, rps in sorted(served.items()):  # served by an endpoint no report named (yet)
            table.add_row(f"{node_of(name)} ({name})", "?", "?", f"{rps:.1f}")
        p99 = "-" if fig.p99_ms is None else f"{fig.p99_ms:.0f} ms"
        scope = ("states: every worker (host-wide /stats?all=1)" if snap["host_wide"][app]
                 else "states: the workers seen so far (/stats?all=1 is per worker)")
        footer = (f"{fig.rps:.0f} req/s  p99 {p99}  failed reads {fig.reads_failed}/{fig.reads}, "
                  f"writes {fig.writes_failed}/{fig.writes}  (last 5 s: {fig.failed_recent} failed)")
        parts.append(Panel(Group(table, Text(footer)), title=f"{TARGETS[app][0]}  {urls[app]}",
                           title_align="left", subtitle=scope, subtitle_align="right"))
    lines = [f"{stamp(e.t)}  {e.text}" for e in snap["events"]] or ["(no events yet)"]
    parts.append(Panel("\n".join(lines), title="events", title_align="left", subtitle="Ctrl-C: stop, summary",
                       subtitle_align="right"))
    return Group(*parts)


def summary_table(recorder: Recorder, served_by: dict[str, str], end: float, acked: dict | None) -> Table:
    """After the run: the load tests' figures per outage and app, then the totals."""
    table = Table(title="summary", show_lines=False)
    for col in ("outage", "app", "failed reads", "failed writes", "reroute_s", "readmit_s"):
        table.add_column(col, justify="left" if col in ("outage", "app") else "right")
    faults = list(recorder.faults)
    for i, fault in enumerate(faults):
        until = faults[i + 1].kill if i + 1 < len(faults) else end
        for app in POOLED:
            f = model.fault_figures(recorder.rows, fault, served_by, app, until)
            table.add_row(f"{fault.node} at {stamp(fault.kill)}", app,
                          f"{f['reads_failed']} of {f['reads']}",
                          f"{f['writes_failed']} of {f['writes']}" + (f" ({f['writes_failed_503']} fast 503)"
                                                                      if f['writes_failed_503'] else ""),
                          f"{f['reroute_s']:.2f}", "-" if f["readmit_s"] is None else f"{f['readmit_s']:.2f}")
    for app in POOLED:
        fig = model.app_figures(recorder.rows, app, end)
        table.add_row("whole run", app, f"{fig.reads_failed} of {fig.reads}",
                      f"{fig.writes_failed} of {fig.writes}", "", "")
    if acked is not None:
        missing = [acked.get("acked_missing_primary")] + list((acked.get("acked_missing_replicas") or {}).values())
        lost = "not checked" if None in missing else str(max(missing))
        table.caption = f"acknowledged writes: {acked.get('acked_writes')}, lost: {lost}"
    return table


class Session:
    """One run of the view (watch or demo) against the running stack."""

    def __init__(self, settings: Settings, stack: Stack, rate: float, track_faults: bool,
                 console: Console | None = None) -> None:
        self.settings, self.stack = settings, stack
        self.console = console or Console()
        self.recorder = Recorder()
        self.stop = threading.Event()
        self.urls = {app: settings.app_url(app) for app in POOLED}
        self.served_by = stack.served_by_names("threaded")  # node -> X-Served-By value
        names = {v: k for k, v in self.served_by.items()}
        self.node_of = lambda name: names.get(name, name)
        self.threads: list[threading.Thread] = []
        for app in POOLED:
            self.threads += [LoadClient(self.stop, self.recorder, app, self.urls[app], rate / CLIENTS, i)
                             for i in range(CLIENTS)]
            self.threads.append(StatsPoller(self.stop, self.recorder, app, self.urls[app], self.node_of))
        self.threads += [NodePoller(self.stop, self.recorder, stack, node, track_faults) for node in NODES]

    def run(self, title: str, until: Callable[[], bool]) -> float:
        """Show the view until `until()` is true or Ctrl-C; returns the end time."""
        for t in self.threads:
            t.start()
        try:
            with Live(console=self.console, refresh_per_second=4, transient=False) as live:
                while not until():
                    live.update(render(snapshot(self.recorder, time.time()), title, self.node_of, self.urls))
                    time.sleep(POLL_S)
                live.update(render(snapshot(self.recorder, time.time()), title, self.node_of, self.urls))
        except KeyboardInterrupt:
            pass
        end = time.time()
        self.console.print()
        self.stop.set()
        for t in self.threads:
            t.join(HTTP_TIMEOUT + 3)
        return end

    def summarise(self, end: float, check_writes: bool = True) -> dict:
        from loadtest import durability
        acked = None
        if check_writes:
            self.console.print("checking that every acknowledged write exists on the primary and both replicas…")
            acked = durability.check_acked(self.settings, acked_ids(self.recorder.rows), timeout=20)
        self.console.print(summary_table(self.recorder, self.served_by, end, acked))
        return {"faults": [vars(f) for f in self.recorder.faults], "acked": acked,
                "totals": {app: vars(model.app_figures(self.recorder.rows, app, end)) for app in POOLED}}
