"""Slow clients against the apps: do ordinary requests still get fast answers?

    python -m loadtest.slowloris [--sockets 200] [--seconds 20] [--rate 20] [--max-p99-ms 100]
                                 [--direct] [--targets threaded,process,nopool] [--json FILE]
    make slowloris SLOWLORIS_ARGS="--sockets 200 --seconds 30"

Against each app it holds `--sockets` slowloris connections open: a request header sent one
byte at a time (every `--trickle` seconds) and never finished; whenever the server drops one,
it is opened again. Meanwhile it sends `--rate` ordinary requests a second per app (GET
/items/<id>, a new connection each, as a new visitor would) and times each to its last byte.

Passes (exit 0) when, for every app, every ordinary request was answered 200 and their p99
stayed under `--max-p99-ms`. Without nginx in front (`--direct`: gunicorn's own ports,
APP_*_DIRECT_PORT) 20 such sockets are enough to stall an app: the comparison the README shows.
Ports come from .env and the environment, as for the load tests. Standard library only.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import sys
import time
from dataclasses import dataclass, field

from .analysis import percentile
from .settings import TARGETS, Settings

# gunicorn's own port per app, next to nginx's (docker-compose.yml, native/services.py).
DIRECT_PORTS = {"threaded": ("APP_THREADED_DIRECT_PORT", 18001),
                "process": ("APP_PROCESS_DIRECT_PORT", 18002),
                "nopool": ("APP_NOPOOL_DIRECT_PORT", 18003)}


@dataclass
class TargetResult:
    name: str
    port: int
    probes: int = 0
    ok: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # "timeout", "status 502", ...
    latencies_ms: list[float] = field(default_factory=list)
    slow_opened: int = 0       # slowloris connections opened (the first ones included)
    slow_dropped: int = 0      # ... that the server closed (a header deadline at work)
    slow_open_min: int | None = None  # fewest held open at once while probing

    @property
    def failed(self) -> int:
        return self.probes - self.ok

    def summary(self, max_p99_ms: float) -> dict:
        p50, p99 = percentile(self.latencies_ms, 50), percentile(self.latencies_ms, 99)
        return {"target": self.name, "port": self.port, "probes": self.probes, "failed": self.failed,
                "failures": self.failures, "p50_ms": _round(p50), "p99_ms": _round(p99),
                "max_ms": _round(max(self.latencies_ms, default=None)),
                "slow_sockets_opened": self.slow_opened, "slow_sockets_dropped_by_server": self.slow_dropped,
                "slow_sockets_open_min": self.slow_open_min,
                "passed": self.probes > 0 and self.failed == 0 and p99 is not None and p99 < max_p99_ms}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


# Counters of the slow sockets, shared with the process holding them: per target, open now,
# opened so far, dropped by the server so far.
OPEN, OPENED, DROPPED = 0, 1, 2


async def _slow_client(host: str, port: int, counters, trickle: float, stop: asyncio.Event) -> None:
    """One slowloris socket, reopened whenever the server drops it, until `stop`."""
    await asyncio.sleep(random.uniform(0, 1))  # real attackers' sockets are not in step
    while not stop.is_set():
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(0.2)
            continue
        with counters.get_lock():
            counters[OPEN] += 1
            counters[OPENED] += 1
        try:
            writer.write(b"GET /items/1 HTTP/1.1\r\nHost: slowloris\r\n")
            await writer.drain()
            while not stop.is_set():
                writer.write(b"X")  # one more byte of a header line that never ends
                await writer.drain()
                try:  # the server closing (or answering: a 400, 408) ends this socket
                    await asyncio.wait_for(reader.read(1), trickle * random.uniform(0.8, 1.2))
                    with counters.get_lock():
                        counters[DROPPED] += 1
                    break
                except asyncio.TimeoutError:
                    pass
        except OSError:
            with counters.get_lock():
                counters[DROPPED] += 1
        finally:
            with counters.get_lock():
                counters[OPEN] -= 1
            writer.close()


def _hold_slow_sockets(host: str, targets: dict[str, int], sockets: int, trickle: float,
                       counters: dict, stop_flag) -> None:
    """The slow clients, in a process of their own: they must not share an event loop (or a
    GIL) with the probes, whose latency is what we measure."""
    async def hold():
        stop = asyncio.Event()
        tasks = [asyncio.create_task(_slow_client(host, port, counters[name], trickle, stop))
                 for name, port in targets.items() for _ in range(sockets)]
        while not stop_flag.is_set():
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*tasks)
    asyncio.run(hold())


async def _probe(host: str, port: int, result: TargetResult, timeout: float) -> None:
    """One ordinary request on a new connection, timed until its last byte."""
    result.probes += 1
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        try:
            writer.write(f"GET /items/{random.randint(1, 10000)} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                         "Connection: close\r\n\r\n".encode())
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(), max(0.01, timeout - (time.monotonic() - t0)))
        finally:
            writer.close()
    except asyncio.TimeoutError:
        result.failures["timeout"] = result.failures.get("timeout", 0) + 1
        return
    except OSError as exc:
        key = type(exc).__name__
        result.failures[key] = result.failures.get(key, 0) + 1
        return
    status = raw.split(b" ", 2)[1].decode(errors="replace") if raw.startswith(b"HTTP/") else "no answer"
    if status == "200":
        result.ok += 1
        result.latencies_ms.append((time.monotonic() - t0) * 1000)
    else:
        key = f"status {status}"
        result.failures[key] = result.failures.get(key, 0) + 1


async def probe_for(targets: dict[str, int], results: dict[str, TargetResult], seconds: float,
                    rate: float, timeout: float, host: str, sample=None, progress=None) -> None:
    """Ordinary requests at `rate`/s per target for `seconds`; `sample()` is called per tick."""
    probes: list[asyncio.Task] = []
    t0 = time.monotonic()
    n = 0
    next_report = t0 + 5
    while (now := time.monotonic()) < t0 + seconds:
        for name, port in targets.items():
            probes.append(asyncio.create_task(_probe(host, port, results[name], timeout)))
        if sample:
            sample()
        n += 1
        if progress and now >= next_report:
            progress(f"[{now - t0:4.0f}s] " + "  ".join(f"{r.name}: {r.ok}/{r.probes} ok"
                                                        for r in results.values()))
            next_report += 5
        await asyncio.sleep(max(0.0, t0 + n / rate - time.monotonic()))
    await asyncio.gather(*probes)


def run(targets: dict[str, int], sockets: int = 200, seconds: float = 20, rate: float = 20,
        trickle: float = 0.5, timeout: float = 2.0, host: str = "127.0.0.1",
        progress=None) -> list[TargetResult]:
    """Hold `sockets` slow connections per target (in a child process), and probe each target
    at `rate`/s for `seconds` once they are open."""
    results = {name: TargetResult(name, port) for name, port in targets.items()}
    ctx = multiprocessing.get_context("fork")
    counters = {name: ctx.Array("i", 3) for name in targets}
    stop_flag = ctx.Event()
    holder = ctx.Process(target=_hold_slow_sockets, args=(host, targets, sockets, trickle, counters, stop_flag),
                         daemon=True)
    holder.start()
    try:
        # Probing starts against a server already under siege.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(c[OPENED] < sockets for c in counters.values()):
            time.sleep(0.05)

        def sample():
            for name, r in results.items():
                now = counters[name][OPEN]
                r.slow_open_min = now if r.slow_open_min is None else min(r.slow_open_min, now)

        def report(line):
            progress(line + "  | slow sockets open: " + ", ".join(f"{n} {c[OPEN]}" for n, c in counters.items()))

        asyncio.run(probe_for(targets, results, seconds, rate, timeout, host, sample,
                              report if progress else None))
    finally:
        stop_flag.set()
        holder.join(15)
        if holder.is_alive():
            holder.terminate()
    for name, r in results.items():
        r.slow_opened, r.slow_dropped = counters[name][OPENED], counters[name][DROPPED]
    return list(results.values())


def target_ports(settings: Settings, names: list[str], direct: bool) -> dict[str, int]:
    ports = {}
    for name in names:
        if name not in TARGETS:
            raise SystemExit(f"unknown target {name!r}: use {', '.join(TARGETS)}")
        var, default = DIRECT_PORTS[name] if direct else TARGETS[name][1:]
        ports[name] = int(settings.env.get(var) or default)
    return ports


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.slowloris", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=int, default=200, help="slow connections per app (200)")
    parser.add_argument("--seconds", type=float, default=20, help="how long to probe (20)")
    parser.add_argument("--rate", type=float, default=20, help="ordinary requests per second per app (20)")
    parser.add_argument("--trickle", type=float, default=0.5, help="seconds between two header bytes (0.5)")
    parser.add_argument("--timeout", type=float, default=2.0, help="an ordinary request's limit, s (2)")
    parser.add_argument("--max-p99-ms", type=float, default=100, help="pass threshold for the p99 (100)")
    parser.add_argument("--targets", default="threaded,process,nopool")
    parser.add_argument("--direct", action="store_true", help="gunicorn's own ports, bypassing nginx")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    ports = target_ports(Settings.load(), [t for t in args.targets.split(",") if t], args.direct)
    where = "gunicorn directly" if args.direct else "the public ports"
    print(f"==> {args.sockets} slowloris sockets per app on {where} "
          f"({', '.join(f'{n} :{p}' for n, p in ports.items())}); {args.rate:g} ordinary requests/s "
          f"per app for {args.seconds:g}s", flush=True)
    results = run(ports, args.sockets, args.seconds, args.rate, args.trickle, args.timeout,
                  progress=lambda line: print(line, flush=True))
    summaries = [r.summary(args.max_p99_ms) for r in results]
    print(f"{'app':9} {'port':>6} {'requests':>8} {'failed':>6} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
          f"{'slow open':>9} {'dropped':>7}  verdict")
    for s in summaries:
        print(f"{s['target']:9} {s['port']:>6} {s['probes']:>8} {s['failed']:>6} {s['p50_ms'] or '-':>7} "
              f"{s['p99_ms'] or '-':>7} {s['max_ms'] or '-':>7} {s['slow_sockets_open_min'] or 0:>9} "
              f"{s['slow_sockets_dropped_by_server']:>7}  "
              + ("PASS" if s["passed"] else f"FAIL {s['failures'] or ''}".rstrip()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": summaries}, f, indent=1)
    return 0 if all(s["passed"] for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
