"""The live view's logic (watch/model.py) and drawing (watch/live.render), fed with recorded
samples: tests/data/stats-per-worker.json holds real GET /stats?all=1 answers of the native
stack's two pooled apps (per worker, as the apps answer today) with every node up, with
replica1 SIGKILLed, and after its restart; HOST_WIDE is the host-wide answer the pool-wide
statistics will give (the format the view is built against). The smoke runs of `make watch` and
`make demo` against a real stack are in test_stack_native.py."""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from loadtest.analysis import Request
from watch import live, model

SAMPLES = json.loads((Path(__file__).parent / "data" / "stats-per-worker.json").read_text())
PRIMARY, REPLICA1, REPLICA2 = "127.0.0.1:35432", "127.0.0.1:35433", "127.0.0.1:35434"
NODE_OF = {PRIMARY: "primary", REPLICA1: "replica1", REPLICA2: "replica2"}.get

HOST_WIDE = {"scope": "host", "processes": 16, "workers": [{"pid": 1, "endpoints": []}], "endpoints": [
    {"name": PRIMARY, "role": "primary", "state": "up", "workers_up": 16, "workers_down": 0},
    {"name": REPLICA1, "role": "replica", "state": "down", "workers_up": 3, "workers_down": 13},
    {"name": REPLICA2, "role": "replica", "state": "up", "workers_up": 16, "workers_down": 0}]}


def reports_of(label: str, app: str) -> model.WorkerReports:
    reports = model.WorkerReports()
    for s in SAMPLES:
        if s["label"] == label and s["app"] == app:
            reports.add(s["t"], s["body"])
    return reports


def by_name(states) -> dict[str, model.EndpointState]:
    return {e.name: e for e in states}


def last_t(label: str) -> float:
    return max(s["t"] for s in SAMPLES if s["label"] == label)


def test_fallback_merges_the_latest_report_of_each_worker_seen() -> None:
    states = by_name(reports_of("replica1 killed", "threaded").states(last_t("replica1 killed")))
    # Two workers answered; worker 22438's later answer (down) replaced its earlier one (up).
    assert states[REPLICA1] == model.EndpointState(REPLICA1, "replica", "down", 0, 2, None)
    assert states[REPLICA1].label == "down 0/2 seen"
    mixed = model.merge_worker_states([[{"name": REPLICA1, "state": "up"}], [{"name": REPLICA1, "state": "down"}]])
    assert [e.label for e in mixed] == ["mixed 1/2 seen"]
    assert states[REPLICA2].label == states[PRIMARY].label == "up 2/2 seen"
    assert states[PRIMARY].role == "primary" and states[REPLICA2].role == "replica"


def test_all_up_sample_shows_every_endpoint_up() -> None:
    states = by_name(reports_of("all up", "threaded").states(last_t("all up")))
    assert {e.label for e in states.values()} == {"up 1/1 seen"}


def test_stale_worker_reports_stop_counting() -> None:
    reports = reports_of("all up", "process")
    now = last_t("all up")
    assert sum(e.workers_up + e.workers_down for e in reports.states(now)) == 9  # 3 workers x 3
    assert reports.states(now + model.STALE_S + 1) == []


def test_host_wide_stats_win_over_the_fallback_and_count_every_worker() -> None:
    reports = reports_of("all up", "process")
    reports.add(last_t("all up") + 1, HOST_WIDE)
    states = by_name(reports.states(last_t("all up") + 1))
    assert states[REPLICA1].label == "mixed 3/16" and states[REPLICA1].workers_down == 13
    assert states[PRIMARY].label == "up 16/16" and states[PRIMARY].workers_total == 16


def test_a_newly_seen_workers_old_state_is_no_event() -> None:
    """The recorded 'all up' samples include a process worker still reporting replica1 down
    (idle since an earlier outage): seeing it for the first time must not log an ejection."""
    reports = model.WorkerReports()
    before: list[model.EndpointState] = []
    events = []
    for s in SAMPLES:
        if s["label"] == "all up" and s["app"] == "process":
            changed = reports.add(s["t"], s["body"])
            after = reports.states(s["t"])
            events += model.state_events("app-process", before, after, s["t"], NODE_OF, changed)
            before = after
    assert any(e.workers_down for e in before), "the sample should hold a stale 'down'"
    assert events == []
    # The same worker reporting a change is one.
    pid, eps = next(iter(reports.workers.items()))[0], next(iter(reports.workers.values()))[1]
    flipped = [{**e, "state": "down" if e["name"] == REPLICA2 else e["state"]} for e in eps]
    changed = reports.add(last_t("all up") + 1, {"pid": pid, "endpoints": flipped})
    assert changed == {REPLICA2}
    after = reports.states(last_t("all up") + 1)
    assert [e.text for e in model.state_events("app-process", before, after, 0, NODE_OF, changed)] == \
        ["app-process: replica2 ejected, down in 1 of 3 seen workers"]


def test_ejection_and_readmission_events_from_recorded_states() -> None:
    up = reports_of("all up", "threaded").states(last_t("all up"))
    killed = model.host_states({**HOST_WIDE, "processes": 2, "endpoints": [
        {"name": REPLICA1, "role": "replica", "state": "down", "workers_up": 0, "workers_down": 2},
        {"name": PRIMARY, "role": "primary", "state": "up", "workers_up": 2, "workers_down": 0}]})
    events = model.state_events("app-threaded", up, killed, 100.0, NODE_OF)
    assert [(e.t, e.text) for e in events] == [(100.0, "app-threaded: replica1 ejected, down in 2 of 2 workers")]
    back = model.host_states({"scope": "host", "processes": 2, "endpoints": [
        {"name": REPLICA1, "role": "replica", "state": "up", "workers_up": 2, "workers_down": 0}]})
    events = model.state_events("app-threaded", killed, back, 101.0, NODE_OF)
    assert [e.text for e in events] == ["app-threaded: replica1 re-admitted, up in all 2 workers"]
    fallback = model.merge_worker_states([[{"name": REPLICA1, "role": "replica", "state": "up"}]] * 3)
    events = model.state_events("app-process", model.merge_worker_states([[{"name": REPLICA1, "state": "down"}]]),
                                fallback, 103.0, NODE_OF)
    assert [e.text for e in events] == ["app-process: replica1 re-admitted, up in every worker seen (3)"]
    assert model.state_events("app-threaded", back, back, 102.0, NODE_OF) == []


def test_a_host_wide_state_the_workers_disagree_on_reads_mixed() -> None:
    """The state word of a host-wide answer is the answering worker's own: the live view showed
    "up 15/16" beside a replica one worker had just ejected, and "down 15/16" while fifteen
    still had it up (found capturing the README's frame). When they disagree it is "mixed"."""
    [split, agreed] = model.host_states({**HOST_WIDE, "processes": 16, "endpoints": [
        {"name": REPLICA1, "role": "replica", "state": "up", "workers_up": 15, "workers_down": 1},
        {"name": PRIMARY, "role": "primary", "state": "up", "workers_up": 16, "workers_down": 0}]})
    assert (split.state, split.label) == ("mixed", "mixed 15/16")
    assert (agreed.state, agreed.label) == ("up", "up 16/16")


def rows_around_a_replica_kill() -> list[Request]:
    """10 reads/s on "threaded" from t=0 to 10 s; replica1 killed at 3.0, healthy at 6.0. Until
    3.2 reads still alternate replicas (and one at 3.1 takes 900 ms: a retry elsewhere); from 6.5
    replica1 serves again. One write a second on the primary."""
    rows = []
    for i in range(100):
        t = i / 10
        down = 3.2 <= t < 6.5
        served = REPLICA2 if down or i % 2 else REPLICA1
        latency = 900.0 if abs(t - 3.1) < 1e-9 else 5.0
        rows.append(Request(t, latency, "read", "threaded", 200, served, None, ""))
        if i % 10 == 0:
            rows.append(Request(t + 0.05, 8.0, "write", "threaded", 201, PRIMARY, 1000 + i, ""))
    return rows


def test_rates_by_serving_endpoint_and_app_figures() -> None:
    rows = rows_around_a_replica_kill()
    rates = model.rates_by_endpoint(rows, now=6.0, seconds=2.0)
    assert rates == {"threaded": {REPLICA2: 10.0, PRIMARY: 1.0}}  # replica1 gone from the rates
    rates = model.rates_by_endpoint(rows, now=9.0, seconds=2.0)
    assert rates["threaded"] == {REPLICA1: 5.0, REPLICA2: 5.0, PRIMARY: 1.0}
    fig = model.app_figures(rows, "threaded", now=5.0, seconds=5.0)
    assert (fig.reads, fig.writes, fig.reads_failed, fig.writes_failed) == (100, 10, 0, 0)
    assert fig.p99_ms is not None and fig.p99_ms > 100  # the slow read at 3.1 s
    assert model.app_figures(rows, "process", 5.0).reads == 0


def test_fault_figures_are_the_load_tests_figures() -> None:
    rows = rows_around_a_replica_kill()
    fault = model.Fault("replica1", kill=3.0, restart=5.5, healthy=6.0)
    f = model.fault_figures(rows, fault, {"replica1": REPLICA1}, "threaded", end=10.0, slow_ms=500)
    assert f["reads_failed"] == 0 and f["writes_failed"] == 0
    assert f["reroute_s"] == round(3.1 + 0.9 - 3.0, 3)  # until the end of the slow read
    assert f["readmit_s"] == round(6.6 + 0.005 - 6.0, 3)  # first replica1 read after 6.5 (odd i: 66)


def test_node_outages_become_events_and_faults() -> None:
    faults: list[model.Fault] = []
    up = {"primary": True, "replica1": True}
    down = {"primary": True, "replica1": False}
    assert [e.text for e in model.node_events(up, down, 5.0)] == ["replica1 stopped answering (killed or stopped)"]
    model.track_faults(faults, up, down, 5.0)
    model.track_faults(faults, down, up, 9.0)
    assert [(f.node, f.kill, f.restart, f.healthy) for f in faults] == [("replica1", 5.0, 9.0, 9.0)]
    assert [e.text for e in model.node_events(down, up, 9.0)] == ["replica1 accepts queries again"]


def test_the_view_draws_recorded_samples() -> None:
    rec = live.Recorder()
    for s in SAMPLES:
        if s["label"] == "replica1 killed":
            rec.reports[s["app"]].add(s["t"], s["body"])
    now = last_t("replica1 killed")
    for r in rows_around_a_replica_kill():
        rec.add(r._replace(start=now - 10 + r.start))
    rec.node_up = {"primary": True, "replica1": False, "replica2": True}
    rec.event("replica1 stopped answering (killed or stopped)", now - 1)
    console = Console(record=True, width=110, color_system=None)
    console.print(live.render(live.snapshot(rec, now), "make watch (test)", lambda n: NODE_OF(n) or n,
                              {"threaded": "http://127.0.0.1:8001", "process": "http://127.0.0.1:8002"}))
    text = console.export_text()
    assert "nodes: primary up  replica1 DOWN  replica2 up" in text
    assert "app-threaded  http://127.0.0.1:8001" in text
    assert "replica1 (127.0.0.1:35433)" in text and "replica2 (127.0.0.1:35434)" in text
    assert "replica1 stopped answering (killed or stopped)" in text
    assert "failed reads 0/100, writes 0/10" in text
    assert "states: the workers seen so far (/stats?all=1 is per worker)" in text
