"""python -m watch [watch|demo] ...: the pool's failover, live in the terminal.

    make watch          # = python -m watch watch: a steady light load on both pooled apps,
                        #   until Ctrl-C; kill and start nodes from another terminal
                        #   (make kill-replica, make start-replica, make kill-primary, ...)
    make demo           # = python -m watch demo: the same view, scripted: steady load, kill
                        #   replica1, start it, kill the primary, start it (about a minute)

Refreshed four times a second: per app, requests/s by serving endpoint (X-Served-By), each
endpoint's state across the workers (GET /stats?all=1), failures and the p99; below, a
timestamped line per kill, restart, ejection and re-admission. At the end, a summary with the
load tests' figures: failed reads and writes, reroute_s and readmit_s per outage (see
docs/loadtest.md), and whether every acknowledged write exists on every node.

Works against whichever stack `make up` started (LOADTEST_STACK / STACK=docker|local to choose).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from loadtest.settings import Settings
from loadtest.stack import StackError, detect

from .live import Session, stamp
from .model import Fault


def demo_script(session: Session, phase: float) -> None:
    """Steady load, kill replica1, start it, kill the primary, start it; `phase` seconds of
    steady load around each step. Runs in its own thread while the view is drawn."""
    rec, stack = session.recorder, session.stack
    sleep = session.stop.wait

    def outage(node: str) -> None:
        rec.event(f"demo: SIGKILL {node}")
        fault = Fault(node, time.time())
        stack.kill(node)
        with rec.lock:
            rec.faults.append(fault)
        if sleep(phase):
            return
        rec.event(f"demo: starting {node}")
        fault.restart = time.time()
        stack.start(node)
        fault.healthy = stack.wait_node_healthy(node, timeout=90)
        rec.event(f"demo: {node} answers queries again", fault.healthy)
        sleep(phase)

    rec.event("demo: steady load")
    if sleep(phase):
        return
    outage("replica1")
    if not session.stop.is_set():
        outage("primary")
    rec.event("demo: done")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m watch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="watch", choices=("watch", "demo"))
    parser.add_argument("--rate", type=float, default=20, help="requests/s per app (default 20: 90%% reads)")
    parser.add_argument("--duration", type=float, help="watch: stop after this many seconds (default: Ctrl-C)")
    parser.add_argument("--phase", type=float, default=8, help="demo: seconds of steady load around each step (8)")
    parser.add_argument("--stack", choices=("docker", "local"), help="default: whichever is running")
    parser.add_argument("--json", help="also write the summary's figures to this file")
    args = parser.parse_args(argv)

    settings = Settings.load()
    try:
        stack = detect(settings, args.stack)
        session = Session(settings, stack, args.rate, track_faults=args.command == "watch")
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    t0 = time.time()
    if args.command == "demo":
        import threading
        script = threading.Thread(target=demo_script, args=(session, args.phase), daemon=True)
        script.start()
        end = session.run(f"make demo ({stack.name} stack)", lambda: not script.is_alive())
    else:
        limit = args.duration
        end = session.run(f"make watch ({stack.name} stack)",
                          lambda: limit is not None and time.time() - t0 >= limit)
    session.console.print(f"ran {end - t0:.0f} s, from {stamp(t0)} to {stamp(end)}")
    figures = session.summarise(end)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
