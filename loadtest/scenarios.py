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
    failover-promote-async, failover-promote-sync
                       constant load on both pooled targets at once; the primary is SIGKILLed,
                       replica1 promoted (`make promote`), later the old primary rejoined (`make
                       rejoin`); once with asynchronous replication, once with SYNC=on. Counts
                       the acknowledged writes the new primary does not have.
    lag                write-then-read-back load on both pooled targets at once, half of the
                       users sending the read-your-writes token; replica1's replay is paused for
                       a while (`make lag-replica`). Counts stale reads with and without it.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path
from typing import Callable

from . import analysis, durability, plots
from .distributed import ComposeRun, compose_host
from .runner import LocustRun, LogTail, Progress, locust_error, run_locusts
from .settings import NODES, REPLICAS, Settings
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

    def _run(self, scenario: str, target: str, load: dict, allow_failures: bool, tags) -> LocustRun:
        common = dict(label=f"{scenario} {target}", run_dir=self.out / scenario / target,
                      tags=self.tags if tags is None else tags, allow_failures=allow_failures, **load)
        if self.workers:
            run = ComposeRun(host=compose_host(target), workers=self.workers,
                             results_root=self.out.parent, **common)
        else:
            run = LocustRun(host=self.settings.app_url(target), **common)
        run.env = {**self.client_env, **run.env}
        return run

    def run_targets(self, scenario: str, targets: list[str], load: dict, phase=None, tail=None,
                    allow_failures: bool = False, timeout_s: float = 3600, tags=None) -> dict:
        """Locust against every target at once, with the same ``load``; returns {target: (run
        dir, requests, locust exit code)}. No durability check: the caller knows when the stack
        is in the state to check against."""
        self.stack.wait_ready(targets)
        runs = [self._run(scenario, t, load, allow_failures, tags) for t in targets]
        codes = run_locusts(runs, phase=phase, progress=self.progress, timeout_s=timeout_s, tail=tail)
        out = {}
        for target, run, code in zip(targets, runs, codes):
            error = locust_error(run, code)
            if error:
                raise HarnessError(error)
            rows = analysis.load_requests(run.run_dir)
            if not rows:
                raise HarnessError(f"{run.label}: no request was logged (see {run.run_dir}/locust.out)")
            out[target] = (run.run_dir, rows, code)
        return out

    def run_target(self, scenario: str, target: str, load: dict, phase=None, tail=None,
                   allow_failures: bool = False, timeout_s: float = 3600):
        """Run Locust against ``target`` with ``load`` (LocustRun fields); returns (run dir,
        requests, durability check, locust exit code)."""
        run_dir, rows, code = self.run_targets(scenario, [target], load, phase, tail,
                                               allow_failures, timeout_s)[target]
        checked = durability.check_acked(self.settings, analysis.acked_ids(rows), self.replay_timeout_s)
        return run_dir, rows, checked, code


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
        results[target] = {"steps": figures, **analysis.request_counts(rows), **checked,
                           "locust_exit_code": code}
    plots.scaling_plot({t: r["steps"] for t, r in results.items()}, h.out / "scaling.png",
                       f"scaling on the {h.stack.name} stack ({step_s:g} s per step, first "
                       f"{warmup_s:g} s discarded)")
    return {"settings": settings, "targets": results}


# ------------------------------------------------------------------------------------ failover
class Schedule(threading.Thread):
    """Runs ``steps`` beside Locust, each (seconds after the first request, name, action, what
    the progress line says) in turn. ``times`` gets the epoch seconds at which each step began
    (``load``: the first request), updated with whatever an action returns ({event: epoch
    seconds}: the steps a topology procedure reported). A failing step ends the schedule and
    ``error`` keeps it; the run's figures are then void."""

    def __init__(self, tail: LogTail, steps: list[tuple[float, str, Callable, str]], name: str):
        super().__init__(daemon=True, name=name)
        self.tail, self.steps = tail, steps
        self.times: dict[str, float | None] = {"load": None, **{step[1]: None for step in steps}}
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
            for at, name, action, label in self.steps:
                if not self._sleep_until(load + at):
                    return
                self.times[name] = time.time()
                self.state = label
                reported = action() or {}
                reported.pop(name, None)  # the step began when the harness issued it
                self.times.update(reported)
                self.state = f"{label}: done"
        except BaseException as exc:  # reported by the scenario
            self.error = exc
            self.state = f"schedule failed: {exc}"

    def finish(self) -> None:
        self._cancel.set()
        self.join(timeout=300)

    def relative(self) -> dict[str, float | None]:
        """Every recorded moment as seconds since the first request, in time order."""
        load = self.times["load"]
        rel = {k: None if v is None or load is None else round(v - load, 3)
               for k, v in self.times.items() if k != "load"}
        return dict(sorted(rel.items(), key=lambda kv: float("inf") if kv[1] is None else kv[1]))


class FaultSchedule(Schedule):
    """Kills ``node`` ``kill_at`` seconds after the first request, starts it again at
    ``restart_at``, and waits until it serves queries (``kill`` is taken just before the kill
    command, ``restart`` just before the start command, ``healthy`` when it answers).
    ``heal()`` afterwards makes sure the node is running whatever happened."""

    def __init__(self, stack: Stack, node: str, tail: LogTail, kill_at: float, restart_at: float):
        self.stack, self.node = stack, node
        super().__init__(tail, [(kill_at, "kill", lambda: stack.kill(node), f"{node} killed"),
                                (restart_at, "restart", self._restart, f"{node} starting")],
                         name=f"faults-{node}")
        self.times["healthy"] = None

    def _restart(self) -> dict:
        self.stack.start(self.node)
        return {"healthy": self.stack.wait_node_healthy(self.node)}

    def heal(self) -> None:
        self.finish()
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
        _heal_all(h.stack, [mode])
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
        events = faults.relative()
        results[mode] = {**figures, **checked, "events_s": events, "served_by": names,
                         "locust_exit_code": code}
        (run_dir / "faults.json").write_text(json.dumps(faults.times, indent=2) + "\n")
        plots.failover_plot(analysis.timeline(rows, load), events,
                            h.out / f"{scenario}-{mode}.png",
                            f"{node} killed and restarted under load: app-{mode}, {h.stack.name} stack",
                            names={v: k for k, v in names.items()})
    return {"settings": settings, "targets": results}


def _heal_all(stack: Stack, modes) -> None:
    """Every node up in the initial topology (a previous run may have left a node down, or a
    replica promoted), and the apps serving reads and writes again, so each run starts from
    the same healthy stack."""
    stack.restore_initial()
    for node in NODES:
        stack.wait_node_healthy(node)
    stack.warm_up(modes)


# ------------------------------------------------------------------------ promotion failover
PROMOTED, FAILED = "replica1", "primary"  # the replica promoted, the primary killed


def promote_failover(h: Harness, modes: list[str], users: int, user_rps: float, duration_s: float,
                     kill_at: float, promote_at: float, rejoin_at: float, syncs: list[str]) -> dict:
    """One run per replication mode in ``syncs`` ("off", "on"), both apps under load at once.
    Returns {scenario: body} for failover-promote-async and/or -sync."""
    done: dict = {}
    default_sync = h.settings.env.get("SYNC", "off").strip().lower() == "on"
    try:
        for sync in syncs:
            scenario = f"failover-promote-{'sync' if sync == 'on' else 'async'}"
            h.progress.done(scenario, f"SYNC={sync}: configuring the stack")
            h.stack.set_sync(sync == "on")
            _heal_all(h.stack, modes)
            done[scenario] = _promote_run(h, scenario, sync, modes, users, user_rps, duration_s,
                                          kill_at, promote_at, rejoin_at)
    finally:
        h.stack.set_sync(default_sync)
        _heal_all(h.stack, modes)
    return done


def _promote_run(h: Harness, scenario: str, sync: str, modes: list[str], users: int,
                 user_rps: float, duration_s: float, kill_at: float, promote_at: float,
                 rejoin_at: float) -> dict:
    stack = h.stack
    names = {mode: stack.served_by_names(mode) for mode in modes}
    tail = LogTail(*(h.out / scenario / mode for mode in modes))
    schedule = Schedule(tail, [
        (kill_at, "kill", lambda: stack.kill(FAILED), f"{FAILED} killed"),
        (promote_at, "promote", lambda: stack.promote(PROMOTED), f"promoting {PROMOTED}"),
        (rejoin_at, "rejoin", lambda: stack.rejoin(FAILED), f"{FAILED} rejoining"),
    ], name="promote")
    schedule.start()
    try:
        runs = h.run_targets(scenario, modes, {"users": users, "duration_s": duration_s,
                                               "env": {"LOADTEST_USER_RPS": f"{user_rps:g}"}},
                             phase=schedule.phase, tail=tail, allow_failures=True,
                             timeout_s=duration_s + 180)
    finally:
        schedule.finish()
    if schedule.error is not None:  # promote_failover's _heal_all restores the stack
        raise HarnessError(f"{scenario}: {schedule.error}") from schedule.error
    if schedule.times["kill"] is None:
        raise HarnessError(f"{scenario}: the run ended before the kill at {kill_at:g}s "
                           f"(duration {duration_s:g}s)")
    # What the run did not get to: the nodes can be checked against each other only once the
    # promotion and the rejoin have happened.
    if schedule.times.get("promoted") is None:
        schedule.times.update(stack.promote(PROMOTED))
    if schedule.times.get("rejoined") is None:
        schedule.times.update(stack.rejoin(FAILED))
    events = schedule.relative()
    results = {}
    for mode, (run_dir, rows, code) in runs.items():
        checked = durability.check_acked(h.settings, analysis.acked_ids(rows), h.replay_timeout_s,
                                         primary=PROMOTED)
        figures = analysis.promote_figures(rows, schedule.times, names[mode][PROMOTED])
        lost = checked["acked_missing_primary"]
        results[mode] = {**figures, **checked, "acked_lost": lost,
                         # a write lost on the new primary is gone everywhere (the old primary
                         # was rewound); anything else the replicas must have
                         "nodes_agree": lost is not None and all(
                             v == lost for v in checked["acked_missing_replicas"].values()),
                         "events_s": events, "served_by": names[mode], "locust_exit_code": code}
        (run_dir / "faults.json").write_text(json.dumps(schedule.times, indent=2) + "\n")
        marks = dict(events)
        if figures["write_outage_s"] is not None:
            marks["first 201"] = round(events["kill"] + figures["write_outage_s"], 3)
        plots.failover_plot(analysis.timeline(rows, schedule.times["load"]), marks,
                            h.out / f"{scenario}-{mode}.png",
                            f"{FAILED} killed, {PROMOTED} promoted, {FAILED} rejoined: app-{mode}, "
                            f"SYNC={sync}, {stack.name} stack",
                            names={v: k for k, v in names[mode].items()})
    settings = {"killed": FAILED, "promoted": PROMOTED, "sync": sync, "targets": modes,
                "users": users, "user_rps": user_rps, "duration_s": duration_s,
                "kill_at_s": kill_at, "promote_at_s": promote_at, "rejoin_at_s": rejoin_at}
    return {"settings": settings, "targets": results}


# ----------------------------------------------------------------------------------- lag
def lag(h: Harness, modes: list[str], users: int, user_rps: float, duration_s: float,
        lag_at: float, lag_s: float, replica: str = "replica1") -> dict:
    """Write-then-read-back load on both apps at once while ``replica``'s replay is paused for
    ``lag_s`` seconds from ``lag_at``."""
    stack = h.stack
    _heal_all(stack, modes)
    names = {mode: stack.served_by_names(mode) for mode in modes}
    tail = LogTail(*(h.out / "lag" / mode for mode in modes))
    schedule = Schedule(tail, [(lag_at, "lag", lambda: stack.lag_replica(replica, lag_s),
                                f"{replica} lagging")], name="lag")
    schedule.start()
    try:
        runs = h.run_targets("lag", modes, {"users": users, "duration_s": duration_s, "readback": True,
                                            "env": {"LOADTEST_USER_RPS": f"{user_rps:g}"}},
                             phase=schedule.phase, tail=tail, allow_failures=True,
                             timeout_s=duration_s + lag_s + 180, tags=())
    finally:
        schedule.finish()
    if schedule.error is not None:
        raise HarnessError(f"lag: {schedule.error}") from schedule.error
    if schedule.times.get("paused") is None:
        raise HarnessError(f"lag: the run ended before {replica} was paused at {lag_at:g}s "
                           f"(duration {duration_s:g}s)")
    events = schedule.relative()
    results = {}
    for mode, (run_dir, rows, code) in runs.items():
        checked = durability.check_acked(h.settings, analysis.acked_ids(rows), h.replay_timeout_s)
        figures = analysis.readback_figures(rows, schedule.times, names[mode][replica],
                                            [names[mode][r] for r in REPLICAS])
        results[mode] = {**figures, **checked, "events_s": events, "served_by": names[mode],
                         "locust_exit_code": code}
        (run_dir / "faults.json").write_text(json.dumps(schedule.times, indent=2) + "\n")
        load = schedule.times["load"]
        plots.lag_plot({key: analysis.timeline([r for r in rows if r.kind == "read"
                                                and r.read_after in tags], load)
                        for key, tags in analysis.PROTECTIONS.items()},
                       analysis.timeline(rows, load), events, h.out / f"lag-{mode}.png",
                       f"{replica}'s replay paused {lag_s:g} s under write-then-read load: "
                       f"app-{mode}, {stack.name} stack",
                       names={v: k for k, v in names[mode].items()})
    settings = {"replica": replica, "targets": modes, "users": users, "user_rps": user_rps,
                "duration_s": duration_s, "lag_at_s": lag_at, "lag_s": lag_s}
    return {"settings": settings, "targets": results}
