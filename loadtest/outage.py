"""python -m loadtest outage: how one outage plays out on every app worker (`make loadtest-outage`).

In process mode each gunicorn worker has its own pool, and what one worker learns about a
server reaches the others only through the pools' shared health board (pool/board.py). This
measures that, worker by worker, against the running stack (no Locust: the requests are plain
HTTP from a few threads, each answer tagged with the app's ``X-Worker``). In order:

    kill-primary   every worker warmed up (a pool with connections), the primary SIGKILLed,
                   then 16 consecutive writes. Target: at most one pays a timeout; the rest
                   answer 503 in under 60 ms.
    start-primary  the primary started again after --outage seconds without a request; from
                   the moment it accepts connections, writes from 16 concurrent clients.
                   Target: every worker writes within 1 s, those that received no request
                   during the outage included.
    replica        replica1 killed; /healthz from 16 clients for a second (the workers see it
                   down), --outage seconds of silence, replica1 started; from the moment it
                   accepts connections, /healthz from 16 clients. Target: every worker shows
                   replica1 up within 1 s of the first that did.
    stall-primary  warmed up again, the primary stalled (SIGSTOP: `make stall`, docker pause):
                   connections and packets are accepted, nothing answers, as with an address
                   that black-holes. 16 consecutive writes. Target: one pays the app's
                   statement timeout; at most one more, in the same worker, waits the probe
                   grace (under 0.6 s: the pool cannot tell a stalled server from one slow
                   statement until its probe answers or not); the rest answer 503 in under 60 ms.
    kill-primary-fresh, stall-primary-fresh   the same faults, but every worker replaced just
                   before (SIGHUP to gunicorn): the first write's worker has no pool yet and
                   must connect to the dead or stalled server (it pays the connect timeout).

Results in results/<stamp>/ (results/latest): requests.csv (every request), outage.json (the
figures and checks), summary.md, outage-<mode>.png (per worker: what each request got, on the
time axis of each phase). Exit status as for `python -m loadtest run`: 0 pass, 3 a check
failed, 2 the harness could not run. The stack is left as it was found: every node up.
"""

from __future__ import annotations

import concurrent.futures
import csv
import http.client
import json
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

from .settings import TARGETS, Settings
from .stack import Stack

CLIENTS = 16
FAST_MS = 60.0  # issue 8: the writes after the first answer 503 faster than this
WITHIN_S = 1.0  # ... and every worker is back within this
GRACE_MS = 600.0  # a stall: the probe grace one more write may wait (PROBE_GRACE_MAX, 0.5 s, + slack)
BODY = b'{"name": "loadtest outage"}'
# The primary's faults, each met with 16 consecutive writes (figures under these keys).
FAULTS = ("kill_primary", "stall_primary", "kill_primary_fresh", "stall_primary_fresh")


class Hit(NamedTuple):
    phase: str
    start: float  # epoch seconds
    latency_ms: float
    method: str
    path: str
    status: int  # 0: no HTTP answer
    worker: str  # X-Worker
    replica1: str  # /healthz: replica1's state as that worker saw it; "" otherwise


class Client:
    """One HTTP request per connection, through the app's published port (nginx)."""

    def __init__(self, settings: Settings, mode: str, timeout: float = 10) -> None:
        self.port, self.timeout = settings.app_port(mode), timeout
        self.replica1 = ""  # the replica1 endpoint's name in /healthz, learned on first use

    def request(self, phase: str, method: str, path: str) -> Hit:
        start, t0 = time.time(), time.perf_counter()
        status, worker, replica1 = 0, "", ""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        try:
            conn.request(method, path, body=BODY if method == "POST" else None,
                         headers={"Content-Type": "application/json"} if method == "POST" else {})
            resp = conn.getresponse()
            body = resp.read()
            status, worker = resp.status, resp.getheader("X-Worker") or ""
            if path == "/healthz":
                replica1 = self._replica1_state(json.loads(body or b"{}"))
        except (OSError, http.client.HTTPException, ValueError):
            pass
        finally:
            conn.close()
        return Hit(phase, start, (time.perf_counter() - t0) * 1000, method, path, status, worker, replica1)

    def _replica1_state(self, body: dict) -> str:
        for e in body.get("endpoints") or []:
            if e.get("name") == self.replica1:
                return e.get("state") or ""
        return ""


def hammer(client: Client, phase: str, method: str, path: str, seconds: float,
           clients: int = CLIENTS) -> list[Hit]:
    """``clients`` threads sending requests back to back for ``seconds``."""
    stop = time.monotonic() + seconds
    hits: list[Hit] = []
    lock = threading.Lock()

    def loop() -> None:
        mine = []
        while time.monotonic() < stop:
            mine.append(client.request(phase, method, path))
        with lock:
            hits.extend(mine)

    with concurrent.futures.ThreadPoolExecutor(clients) as ex:
        for f in [ex.submit(loop) for _ in range(clients)]:
            f.result()
    return sorted(hits, key=lambda h: h.start)


def back_by_worker(hits: list[Hit], since: float, ok) -> dict[str, float | None]:
    """Per worker: seconds from ``since`` to the end of its first ``ok`` answer after its last
    answer that was not ``ok`` (None: its last answer was not)."""
    by: dict[str, list[Hit]] = {}
    for h in hits:
        if h.worker:
            by.setdefault(h.worker, []).append(h)
    out: dict[str, float | None] = {}
    for worker, mine in by.items():
        last_bad = max((i for i, h in enumerate(mine) if not ok(h)), default=-1)
        good = mine[last_bad + 1:]
        out[worker] = round(good[0].start + good[0].latency_ms / 1000 - since, 3) if good else None
    return dict(sorted(out.items(), key=lambda kv: (kv[1] is None, kv[1] or 0)))


def spread(back: dict[str, float | None]) -> float | None:
    values = [v for v in back.values() if v is not None]
    return round(max(values) - min(values), 3) if values else None


def run_mode(stack: Stack, settings: Settings, mode: str, outage_s: float, log) -> tuple[dict, list[Hit]]:
    client = Client(settings, mode)
    client.replica1 = stack.served_by_names(mode)["replica1"]
    hits: list[Hit] = []
    workers = warm_up(client, hits, mode, log)

    log(f"[{mode}] kill-primary: SIGKILL, then 16 consecutive writes")
    kill_fig = primary_fault(stack, client, hits, "kill-primary", stack.kill)

    log(f"[{mode}] start-primary: {outage_s:g} s without a request, start, then writes from {CLIENTS} clients")
    time.sleep(max(0.0, kill_fig["at"] + outage_s - time.time()))
    silent = set(workers) - {h.worker for h in hits if h.phase == "kill-primary"}
    t_accept = start_node(stack, "primary")
    back_hits = hammer(client, "start-primary", "POST", "/items", 3)
    hits += back_hits
    back = back_by_worker(back_hits, t_accept, lambda h: h.status == 201)
    start_fig = {"accepting": t_accept, "back_by_worker_s": back,
                 "workers": len(back), "workers_not_back": sum(v is None for v in back.values()),
                 "silent_during_outage": sorted(silent),
                 "last_back_s": max((v for v in back.values() if v is not None), default=None),
                 "spread_s": spread(back)}

    log(f"[{mode}] replica: kill replica1, /healthz for 1 s, {outage_s:g} s of silence, start, /healthz")
    stack.kill("replica1")
    hits += hammer(client, "replica-down", "GET", "/healthz", 1)
    time.sleep(outage_s)
    r_accept = start_node(stack, "replica1")
    up_hits = hammer(client, "replica-up", "GET", "/healthz", 3)
    hits += up_hits
    up = back_by_worker(up_hits, r_accept, lambda h: h.status == 200 and h.replica1 == "up")
    first = min((v for v in up.values() if v is not None), default=None)
    replica_fig = {"accepting": r_accept, "up_by_worker_s": up, "workers": len(up),
                   "workers_not_up": sum(v is None for v in up.values()),
                   "first_up_s": first, "spread_s": spread(up)}
    figures = {"workers": len(workers), "kill_primary": kill_fig, "start_primary": start_fig,
               "replica": replica_fig}

    # The other faults of the primary, each followed by its repair and writes that succeed again.
    for phase, text, fault, repair, fresh in (
            ("stall-primary", "SIGSTOP (docker pause)", stack.stall, stack.resume, False),
            ("kill-primary-fresh", "SIGKILL", stack.kill, lambda n: start_node(stack, n), True),
            ("stall-primary-fresh", "SIGSTOP (docker pause)", stack.stall, stack.resume, True)):
        workers = fresh_workers(stack, client, mode, set(workers)) if fresh else warm_up(client, hits, mode, log)
        log(f"[{mode}] {phase}: {'every worker replaced (SIGHUP), ' if fresh else ''}{text}, "
            "16 consecutive writes")
        figures[phase.replace("-", "_")] = primary_fault(stack, client, hits, phase, fault)
        repair("primary")
        stack.warm_up([mode])
    figures["checks"] = checks(figures)
    return figures, hits


def warm_up(client: Client, hits: list[Hit], mode: str, log) -> list[str]:
    """Writes, then reads, from 16 clients: every worker has a pool with connections."""
    log(f"[{mode}] warm-up: writes and reads from {CLIENTS} clients, so every worker has a pool")
    warm = hammer(client, "warm-up", "POST", "/items", 1.5) + hammer(client, "warm-up", "GET", "/items/1", 1.5)
    hits += warm
    time.sleep(1)
    return sorted({h.worker for h in warm if h.worker})


def primary_fault(stack: Stack, client: Client, hits: list[Hit], phase: str, fault) -> dict:
    """``fault`` on the primary, then 16 consecutive writes: how long each took."""
    fault("primary")
    at = time.time()
    mine = [client.request(phase, "POST", "/items") for _ in range(16)]
    hits += mine
    slow = [h for h in mine if h.latency_ms >= FAST_MS]
    return {"at": at, "writes": len(mine), "slow": len(slow),
            "slow_ms": [round(h.latency_ms, 1) for h in slow],
            "fast_p50_ms": _p50([h.latency_ms for h in mine if h.latency_ms < FAST_MS]),
            "statuses": sorted({h.status for h in mine}),
            "workers": len({h.worker for h in mine if h.worker}),
            "total_s": round(sum(h.latency_ms for h in mine) / 1000, 3)}


def start_node(stack: Stack, node: str) -> float:
    """Start ``node``; the moment it accepted connections (polled while it starts)."""
    starting = threading.Thread(target=stack.start, args=(node,), daemon=True)
    starting.start()
    accepted = stack.wait_node_healthy(node, interval=0.02)  # the moment it accepted
    starting.join(120)
    return accepted


def fresh_workers(stack: Stack, client: Client, mode: str, old: set[str], timeout: float = 60) -> list[str]:
    """Reload the app and wait until none of the ``old`` workers answers any more. ``GET /``
    touches no database, so the new workers build no pool meanwhile."""
    stack.reload_app(mode)
    deadline = time.monotonic() + timeout
    while True:
        seen = {h.worker for h in hammer(client, "reload", "GET", "/", 0.3, clients=4)}
        if seen and not seen & old and "" not in seen:
            return sorted(seen)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{TARGETS[mode][0]}: old workers still answer {timeout:.0f}s after SIGHUP")
        time.sleep(0.2)


def checks(f: dict) -> list[dict]:
    s, r = f["start_primary"], f["replica"]
    out = []
    for phase in FAULTS:
        k, name = f[phase], phase.replace("_", "-")
        slow = sorted(k["slow_ms"], reverse=True)
        if phase.startswith("stall"):
            out.append((f"{name}: one of 16 writes pays a timeout, at most one more the probe grace "
                        f"(< {GRACE_MS:g} ms), the others answer 503 in under {FAST_MS:g} ms",
                        len(slow) <= 2 and all(v < GRACE_MS for v in slow[1:]) and k["statuses"] == [503]))
        else:
            out.append((f"{name}: at most one of 16 writes pays a timeout, the others answer 503 in "
                        f"under {FAST_MS:g} ms", len(slow) <= 1 and k["statuses"] == [503]))
    out += [
        (f"every worker writes within {WITHIN_S:g} s of the primary accepting connections",
         s["workers_not_back"] == 0 and s["last_back_s"] is not None and s["last_back_s"] < WITHIN_S),
        (f"every worker shows replica1 up within {WITHIN_S:g} s of the first",
         r["workers_not_up"] == 0 and r["spread_s"] is not None and r["spread_s"] < WITHIN_S),
    ]
    return [{"check": text, "ok": bool(ok)} for text, ok in out]


def _p50(values: list[float]) -> float | None:
    return round(sorted(values)[len(values) // 2], 1) if values else None


def write_results(out: Path, results: dict, hits: dict[str, list[Hit]]) -> None:
    with open(out / "requests.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("mode", *Hit._fields))
        for mode, rows in hits.items():
            w.writerows((mode, *h) for h in rows)
    (out / "outage.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(markdown(results), encoding="utf-8")
    from . import plots  # matplotlib: only once there is something to draw
    for mode, rows in hits.items():
        plots.outage_plot(rows, results["modes"][mode], out / f"outage-{mode}.png",
                          f"{mode} app on the {results['stack']} stack")


def markdown(results: dict) -> str:
    ok = all(c["ok"] for m in results["modes"].values() for c in m["checks"])
    lines = [f"# One outage, every worker ({results['stack']} stack)", "",
             f"**{'PASS' if ok else 'FAIL'}**", ""]
    for mode, f in results["modes"].items():
        s, r = f["start_primary"], f["replica"]
        lines += [f"## {mode} app: {f['workers']} workers", ""]
        lines += [f"- {phase.replace('_', '-')}: {_kill_line(f[phase])}" for phase in FAULTS]
        lines += [f"- start-primary: {s['workers'] - s['workers_not_back']} of {s['workers']} workers "
                  f"wrote again, the last {s['last_back_s']} s after the primary accepted connections "
                  f"(first to last {s['spread_s']} s); {len(s['silent_during_outage'])} of them had "
                  "received no request during the outage",
                  f"- replica: {r['workers'] - r['workers_not_up']} of {r['workers']} workers showed "
                  f"replica1 up, the first {r['first_up_s']} s after it accepted connections, the "
                  f"last {r['spread_s']} s after the first", "",
                  f"![{mode}](outage-{mode}.png)", ""]
        lines += [f"- [{'x' if c['ok'] else ' '}] {c['check']}" for c in f["checks"]] + [""]
    return "\n".join(lines)


def _kill_line(k: dict) -> str:
    slow = ", ".join(f"{v:g}" for v in k["slow_ms"]) or "none"
    return (f"{k['writes']} consecutive writes took {k['total_s']:.2f} s in all; {k['slow']} slower "
            f"than {FAST_MS:g} ms ({slow}), the rest {k['fast_p50_ms']} ms (median); answers "
            f"{k['statuses']}, from {k['workers']} workers")


def main(stack: Stack, settings: Settings, out: Path, modes: list[str], outage_s: float) -> int:
    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    results: dict = {"stack": stack.name, "outage_s": outage_s, "modes": {}}
    hits: dict[str, list[Hit]] = {}
    try:
        for mode in modes:
            stack.wait_ready([mode])
            results["modes"][mode], hits[mode] = run_mode(stack, settings, mode, outage_s, log)
            stack.warm_up([mode])
    finally:
        for node in ("primary", "replica1"):  # whatever happened, leave every node up
            if not stack.node_healthy(node):
                stack.start(node)
    write_results(out, results, hits)
    print(markdown(results))
    ok = all(c["ok"] for m in results["modes"].values() for c in m["checks"])
    return 0 if ok else 3
