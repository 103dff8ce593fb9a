"""python -m loadtest run scaling|failover|lag [...]   (see docs/loadtest.md)

    python -m loadtest run scaling                      all three targets, steps 4..64 users
    python -m loadtest run failover --target replica    replica1 killed under load, pooled targets
    python -m loadtest run failover --target primary    the primary killed and restarted
    python -m loadtest run failover --target promote    the primary killed, replica1 promoted, the
                                                        old primary rejoined; async, then SYNC=on
    python -m loadtest run lag                          replica1's replay paused under
                                                        write-then-read-back load
    python -m loadtest run scaling failover --target replica,primary --step-seconds 10 --duration 40
                                                        (what `make loadtest` does)
    python -m loadtest run scaling --distributed 2 --targets threaded   (Locust master + 2 workers
                                                        in docker compose; Docker stack only)
    python -m loadtest outage [--modes process]         one outage, every app worker: the primary
                                                        killed and started, replica1 killed and
                                                        started (loadtest/outage.py)

Needs a running stack (`make up`, or the native one); the stack is detected, or named with
--stack / STACK=docker|local. Each invocation writes results/<timestamp>/ and points
results/latest at it. Exit status: 0 all checks passed, 3 a check failed (summary.md lists
which), 2 the harness could not run (no stack, Locust failed to start, ...).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

from . import outage as outage_run
from . import report, scenarios
from .distributed import compose_ready
from .runner import Progress
from .scenarios import FAILOVER_NODES, Harness, HarnessError
from .settings import POOLED, REPO_ROOT, TARGETS, Settings
from .stack import StackError, detect


def _csv(kind):
    return lambda text: [kind(x.strip()) for x in text.split(",") if x.strip()]


def _choices(allowed):
    def parse(text):
        values = _csv(str)(text)
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)} (comma-separated)")
        return values
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run scenarios against the running stack")
    run.add_argument("scenarios", nargs="+", choices=("scaling", "failover", "lag"))
    run.add_argument("--stack", choices=("docker", "local", "auto"), help="default: STACK, else detect")
    run.add_argument("--results", type=Path, default=Path(os.environ.get("LOADTEST_RESULTS") or REPO_ROOT / "results"),
                     help="parent of the timestamped results directory (default results/)")
    run.add_argument("--tags", type=_choices(("read", "write")), default=[],
                     help="only these task tags: read, write (default both)")
    g = run.add_argument_group("scaling")
    g.add_argument("--targets", type=_choices(tuple(TARGETS)), default=list(TARGETS))
    g.add_argument("--steps", type=_csv(int), default=[4, 8, 16, 32, 64], help="user counts")
    g.add_argument("--step-seconds", type=float, default=30, help="dwell per step (default 30)")
    g.add_argument("--warmup-seconds", type=float, help="discarded start of each step "
                   "(default a third of the step, at most 10)")
    g.add_argument("--distributed", type=int, default=0, metavar="WORKERS",
                   help="run Locust as a master and WORKERS workers in docker compose "
                        "(compose/loadtest.compose.yml; Docker stack only)")
    g = run.add_argument_group("failover")
    g.add_argument("--target", type=_choices((*FAILOVER_NODES, "promote")), default=["replica"],
                   help="replica (kill and restart replica1), primary (the same with the "
                        "primary), promote (kill the primary, promote replica1, rejoin the old "
                        "primary), or several: replica,primary")
    g.add_argument("--modes", type=_choices(POOLED), default=list(POOLED), help="pooled targets")
    g.add_argument("--users", type=int, default=8, help="per target (lag and failover)")
    g.add_argument("--user-rps", type=float, default=25, help="requests/s per user (0 = no wait)")
    g.add_argument("--duration", type=float, default=60, help="seconds of load per run")
    g.add_argument("--kill-at", type=float, help="seconds after load start (default 25%% of duration)")
    g.add_argument("--restart-at", type=float, help="seconds after load start (default 50%% of duration)")
    g.add_argument("--promote-after", type=float, default=5,
                   help="promote: seconds from the kill to `make promote` (default 5)")
    g.add_argument("--rejoin-at", type=float, help="promote: seconds after load start for `make "
                   "rejoin` of the old primary (default 60%% of duration)")
    g.add_argument("--sync", type=_choices(("off", "on")), default=["off", "on"],
                   help="promote: replication modes to run, in turn (default off,on)")
    g = run.add_argument_group("lag")
    g.add_argument("--lag-at", type=float, help="seconds after load start (default 25%% of duration)")
    g.add_argument("--lag-seconds", type=float, default=10, help="how long replay stays paused")
    g.add_argument("--lag-replica", choices=("replica1", "replica2"), default="replica1")
    g = run.add_argument_group("measurement")
    g.add_argument("--slow-ms", type=float, default=1000, help="a request this slow during an outage "
                   "counts as disturbed (reroute_s)")
    g.add_argument("--replay-timeout", type=float, default=30, help="seconds to wait for the replicas "
                   "to replay every acknowledged write")
    g.add_argument("--network-timeout", type=float, default=10, help="client response timeout (s)")
    g.add_argument("--connect-timeout", type=float, default=3, help="client connect timeout (s)")
    g.add_argument("--new-connections", action="store_true", help="one client connection per "
                   "request (Connection: close); default: each user keeps its connection alive")
    out = sub.add_parser("outage", help="how one outage plays out on every app worker (loadtest/outage.py)")
    out.add_argument("--stack", choices=("docker", "local", "auto"), help="default: STACK, else detect")
    out.add_argument("--results", type=Path, default=Path(os.environ.get("LOADTEST_RESULTS") or REPO_ROOT / "results"))
    out.add_argument("--modes", type=_choices(POOLED), default=["process"], help="pooled targets (default process)")
    out.add_argument("--outage", type=float, default=5, help="seconds each node stays down (default 5)")
    return p


def outage(args: argparse.Namespace) -> int:
    settings = Settings.load()
    stack = detect(settings, args.stack)
    out = results_dir(args.results)
    print(f"loadtest outage: {stack.name} stack; results in {out}", file=sys.stderr)
    status = outage_run.main(stack, settings, out, args.modes, args.outage)
    print(f"results: {out} (summary.md, outage.json, requests.csv, outage-*.png)", file=sys.stderr)
    return status


def results_dir(parent: Path) -> Path:
    """parent/<UTC timestamp>, and parent/latest pointing at it (relative symlink)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = parent / stamp
    n = 1
    while out.exists():
        n += 1
        out = parent / f"{stamp}-{n}"
    out.mkdir(parents=True)
    latest = parent / "latest"
    if latest.is_symlink() or not latest.exists():
        tmp = parent / f".latest-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(out.name)
        tmp.replace(latest)
    return out


def run(args: argparse.Namespace) -> int:
    settings = Settings.load()
    stack = detect(settings, args.stack)
    duration = args.duration
    kill_at = args.kill_at if args.kill_at is not None else round(duration * 0.25, 1)
    restart_at = args.restart_at if args.restart_at is not None else round(duration * 0.5, 1)
    warmup = args.warmup_seconds if args.warmup_seconds is not None else round(min(10.0, args.step_seconds / 3), 1)
    promote_at = kill_at + args.promote_after
    rejoin_at = args.rejoin_at if args.rejoin_at is not None else round(duration * 0.6, 1)
    lag_at = args.lag_at if args.lag_at is not None else round(duration * 0.25, 1)
    restarts = [t for t in args.target if t in FAILOVER_NODES]
    if "failover" in args.scenarios and restarts and not 0 < kill_at < restart_at < duration:
        raise HarnessError(f"need 0 < kill-at ({kill_at:g}) < restart-at ({restart_at:g}) < duration ({duration:g})")
    if "failover" in args.scenarios and "promote" in args.target and not 0 < kill_at < promote_at < rejoin_at < duration:
        raise HarnessError(f"need 0 < kill-at ({kill_at:g}) < kill-at + promote-after ({promote_at:g}) "
                           f"< rejoin-at ({rejoin_at:g}) < duration ({duration:g})")
    if "lag" in args.scenarios and not 0 < lag_at < duration:
        raise HarnessError(f"need 0 < lag-at ({lag_at:g}) < duration ({duration:g})")
    if "scaling" in args.scenarios and not 0 <= warmup < args.step_seconds:
        raise HarnessError("the warm-up must be shorter than a step")
    if args.distributed:
        if args.scenarios != ["scaling"] or stack.name != "docker" or args.tags:
            raise HarnessError("--distributed runs the scaling scenario only, without --tags, "
                               "against the Docker stack")
        problem = compose_ready()
        if problem:
            raise HarnessError(problem)

    out = results_dir(args.results)
    print(f"loadtest: {stack.name} stack; results in {out}", file=sys.stderr)
    harness = Harness(settings, stack, out, tags=tuple(args.tags), slow_ms=args.slow_ms,
                      replay_timeout_s=args.replay_timeout, progress=Progress(),
                      workers=args.distributed, client_env={"LOADTEST_NETWORK_TIMEOUT": f"{args.network_timeout:g}",
                                  "LOADTEST_CONNECT_TIMEOUT": f"{args.connect_timeout:g}",
                                  "LOADTEST_NEW_CONNECTIONS": "1" if args.new_connections else ""})
    done: dict = {}
    error = None
    try:
        if "scaling" in args.scenarios:
            done["scaling"] = scenarios.scaling(harness, args.targets, args.steps, args.step_seconds, warmup)
        if "failover" in args.scenarios:
            for kind in args.target:
                if kind == "promote":
                    done.update(scenarios.promote_failover(
                        harness, args.modes, args.users, args.user_rps, duration, kill_at,
                        promote_at, rejoin_at, args.sync))
                else:
                    done[f"failover-{kind}"] = scenarios.failover(
                        harness, kind, args.modes, args.users, args.user_rps, duration, kill_at,
                        restart_at)
        if "lag" in args.scenarios:
            done["lag"] = scenarios.lag(harness, args.modes, args.users, args.user_rps, duration,
                                        lag_at, args.lag_seconds, args.lag_replica)
    except (HarnessError, StackError, TimeoutError) as exc:
        error = str(exc)
    summary = report.build_summary(done, stack.name)
    if error:
        summary["error"] = error
        summary["ok"] = False
    report.write(out, summary)
    print(report.markdown(summary))
    print(f"results: {out} (summary.json, summary.md, *.png)", file=sys.stderr)
    if error:
        print(f"loadtest: error: {error}", file=sys.stderr)
        return 2
    if not summary["ok"]:
        print("loadtest: some checks failed (see the checks in summary.md)", file=sys.stderr)
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return outage(args) if args.cmd == "outage" else run(args)
    except (HarnessError, StackError, TimeoutError) as exc:
        print(f"loadtest: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nloadtest: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
