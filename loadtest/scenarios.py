"""The scenarios: what runs against which target, and which figures come out.

Every target run goes the same way (``Harness.run_target``): wait until the stack is ready, run
Locust into ``<results>/<scenario>/<target>/``, read the per-request log, then check that every
acknowledged write exists on the primary and both replicas. The scenarios differ only in the
load (a stepped shape or constant users), in the faults they inject while Locust runs, and in
the figures they compute from the log.

    scaling            stepped users (shape.py) against each target: per step rps, p50/p95/p99,
                       fail ratio
    failover-replica   constant load against each pooled target; replica1 is SIGKILLed at
                       kill_at and started again at restart_at
    failover-primary   the same with the primary
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path
from . import analysis, durability, plots
from .distributed import ComposeRun, compose_host
from .runner import LocustRun, LogTail, Progress, locust_error, run_locust
from .settings import NODES, Settings
from .stack import Stack

# failover scenario -> (node to kill, its role)
FAILOVER_NODES = {"replica": "replica1", "primary": "primary"}


class HarnessError(RuntimeError):
    pass


@dataclasses.dataclass
class Harness:
    settings: Settings
    stack: Stack
    out: Path  # this invocation's results directory
    tags: tuple[str, ...] = ()
    client_env: dict[str, str] = dataclasses.field(default_factory=dict)  # LOADTEST_* for locust
    slow_ms: float = 1000
    replay_timeout_s: float = 30
    progress: Progress = dataclasses.field(default_factory=Progress)
    workers: int = 0  # > 0: Locust runs distributed in docker compose with this many workers

    def run_target(self, scenario: str, target: str, load: dict, phase=None, tail=None,
                   allow_failures: bool = False, timeout_s: float = 3600):
        """Run Locust against ``target`` with ``load`` (LocustRun fields); returns (run dir,
        requests, durability check, locust exit code)."""
        self.stack.wait_ready([target])
        common = dict(label=f"{scenario} {target}", run_dir=self.out / scenario / target,
                      tags=self.tags, allow_failures=allow_failures, **load)
        if self.workers:
            run = ComposeRun(host=compose_host(target), workers=self.workers,
                             results_root=self.out.parent, **common)
        else:
            run = LocustRun(host=self.settings.app_url(target), **common)
        run.env = {**self.client_env, **run.env}
        code = run_locust(run, phase=phase, progress=self.progress, timeout_s=timeout_s, tail=tail)
        error = locust_error(run, code)
        if error:
            raise HarnessError(error)
        rows = analysis.load_requests(run.run_dir)
        if not rows:
            raise HarnessError(f"{run.label}: no request was logged (see {run.run_dir}/locust.out)")
        checked = durability.check_acked(self.settings, analysis.acked_ids(rows), self.replay_timeout_s)
        return run.run_dir, rows, checked, code


def _totals(rows) -> dict:
    reads = [r for r in rows if r.kind == "read"]
    writes = [r for r in rows if r.kind == "write"]
    return {"reads": len(reads), "writes": len(writes),
            "reads_failed": sum(1 for r in reads if not r.ok),
            "writes_failed": sum(1 for r in writes if not r.ok)}


# ------------------------------------------------------------------------------------- scaling
def scaling(h: Harness, targets: list[str], steps: list[int], step_s: float, warmup_s: float) -> dict:
    settings = {"targets": targets, "steps": steps, "step_s": step_s, "warmup_s": warmup_s}
    env = {"LOADTEST_STEPS": ",".join(map(str, steps)), "LOADTEST_STEP_SECONDS": f"{step_s:g}"}
    results = {}
    for target in targets:
        def phase(tail, target=target) -> str:
            done = analysis.load_steps(h.out / "scaling" / target)
            current = steps[min(len(done), len(steps) - 1)]
            return f"step {min(len(done) + 1, len(steps))}/{len(steps)}: {current} users"

        run_dir, rows, checked, code = h.run_target(
            "scaling", target, {"shape": True, "env": env}, phase=phase,
            timeout_s=len(steps) * (step_s + 40) + 120)
        figures = analysis.scaling_steps(rows, analysis.load_steps(run_dir), warmup_s)
        results[target] = {"steps": figures, **_totals(rows), **checked, "locust_exit_code": code}
    plots.scaling_plot({t: r["steps"] for t, r in results.items()}, h.out / "scaling.png",
                       f"scaling on the {h.stack.name} stack ({step_s:g} s per step, first "
                       f"{warmup_s:g} s discarded)")
    return {"settings": settings, "targets": results}


# ------------------------------------------------------------------------------------ failover
class FaultSchedule(threading.Thread):
    """Kills ``node`` ``kill_at`` seconds after the first request, starts it again at
    ``restart_at``, and waits until it serves queries. ``times`` gets the epoch seconds of each
    (``kill`` is taken just before the kill command, ``restart`` just before the start command).
    Runs beside Locust; ``heal()`` afterwards makes sure the node is running whatever happened."""

    def __init__(self, stack: Stack, node: str, tail: LogTail, kill_at: float, restart_at: float):
        super().__init__(daemon=True, name=f"faults-{node}")
        self.stack, self.node, self.tail = stack, node, tail
        self.kill_at, self.restart_at = kill_at, restart_at
        self.times: dict[str, float | None] = {"load": None, "kill": None, "restart": None, "healthy": None}
        self.state = "waiting for load"
        self.error: BaseException | None = None
        self._cancel = threading.Event()

    def phase(self, _tail=None) -> str:
        return self.state

    def _sleep_until(self, at: float) -> bool:
        return not self._cancel.wait(max(0.0, at - time.time()))

    def run(self) -> None:
        try:
            deadline = time.monotonic() + 60
            while self.tail.first_request_at is None:
                if self._cancel.wait(0.1) or time.monotonic() > deadline:
                    return
            load = self.times["load"] = self.tail.first_request_at
            self.state = "steady"
            if not self._sleep_until(load + self.kill_at):
                return
            self.times["kill"] = time.time()
            self.stack.kill(self.node)
            self.state = f"{self.node} killed"
            if not self._sleep_until(load + self.restart_at):
                return
            self.times["restart"] = time.time()
            self.stack.start(self.node)
            self.state = f"{self.node} starting"
            self.times["healthy"] = self.stack.wait_node_healthy(self.node)
            self.state = f"{self.node} healthy again"
        except BaseException as exc:  # reported by heal(); the run's figures are then void
            self.error = exc
            self.state = f"fault schedule failed: {exc}"

    def heal(self) -> None:
        self._cancel.set()
        self.join(timeout=120)
        if self.times["kill"] is not None and self.times["healthy"] is None:
            self.stack.start(self.node)  # the run ended (or failed) with the node still down
            self.stack.wait_node_healthy(self.node)


def failover(h: Harness, kind: str, modes: list[str], users: int, user_rps: float,
             duration_s: float, kill_at: float, restart_at: float) -> dict:
    node = FAILOVER_NODES[kind]
    scenario = f"failover-{kind}"
    settings = {"node": node, "targets": modes, "users": users, "user_rps": user_rps,
                "duration_s": duration_s, "kill_at_s": kill_at, "restart_at_s": restart_at,
                "slow_ms": h.slow_ms}
    results = {}
    for mode in modes:
        _heal_all(h.stack)
        names = h.stack.served_by_names(mode)
        tail = LogTail(h.out / scenario / mode)
        faults = FaultSchedule(h.stack, node, tail, kill_at, restart_at)
        faults.start()
        try:
            run_dir, rows, checked, code = h.run_target(
                scenario, mode, {"users": users, "duration_s": duration_s,
                                 "env": {"LOADTEST_USER_RPS": f"{user_rps:g}"}},
                phase=faults.phase, tail=tail, allow_failures=True, timeout_s=duration_s + 120)
        finally:
            faults.heal()
        if faults.error is not None:
            raise HarnessError(f"{scenario} {mode}: {faults.error}") from faults.error
        if faults.times["kill"] is None:
            raise HarnessError(f"{scenario} {mode}: the run ended before the kill at {kill_at:g}s "
                               f"(duration {duration_s:g}s)")
        figures = analysis.failover_figures(rows, faults.times, names[node], kind, h.slow_ms)
        load = faults.times["load"]
        events = {k: None if v is None else round(v - load, 3) for k, v in faults.times.items() if k != "load"}
        results[mode] = {**figures, **checked, "events_s": events, "served_by": names,
                         "locust_exit_code": code}
        (run_dir / "faults.json").write_text(json.dumps(faults.times, indent=2) + "\n")
        plots.failover_plot(analysis.timeline(rows, load), {k: v for k, v in events.items()},
                            h.out / f"{scenario}-{mode}.png",
                            f"{node} killed and restarted under load: app-{mode}, {h.stack.name} stack",
                            names={v: k for k, v in names.items()})
    return {"settings": settings, "targets": results}


def _heal_all(stack: Stack) -> None:
    """Start any node a previous run left down, so each failover starts from a healthy stack."""
    for node in NODES:
        if not stack.node_healthy(node):
            stack.start(node)
            stack.wait_node_healthy(node)
