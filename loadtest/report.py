"""summary.json, summary.md and the pass/fail checks of a results directory.

summary.json (schema_version 1; keys documented in docs/loadtest.md)::

    {"schema_version": 1, "created": "...", "stack": "docker", "cpus": 2, "ok": true,
     "scenarios": {"<scenario>": {"settings": {...}, "targets": {"<target>": {...}}}},
     "checks": [{"scenario": ..., "target": ..., "check": "...", "ok": true}]}

The checks are what the reference deployment promises; a failed check makes the harness exit 3.
summary.md opens with a one-screen verdict (PASS/FAIL, one line per scenario with its headline
figures, the failed checks), then a section per scenario.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

from . import durability

SCHEMA_VERSION = 1


def checks_for(scenario: str, target: str, r: dict) -> list[tuple[str, bool]]:
    """(description, ok) for one target's figures."""
    if scenario.startswith("failover-promote"):
        # With asynchronous replication losing acknowledged writes is the expected price (the
        # figure is reported, not judged); with SYNC=on it must not happen.
        out = [("no failed read", r["reads_failed"] == 0),
               ("writes succeed on the new primary", r["write_outage_s"] is not None),
               (f"every write from {r['grace_s']:g} s after the promotion succeeds",
                r["writes_failed_late"] == 0),
               ("after the rejoin every node has what the new primary has", r["nodes_agree"])]
        if scenario.endswith("-sync"):
            out.append(("no acknowledged write lost (SYNC=on)", r["acked_lost"] == 0))
        return out
    out = [("no acknowledged write lost (primary and both replicas)", not durability.lost(r))]
    if scenario == "failover-replica":
        out += [("no failed read", r["reads_failed"] == 0),
                ("no failed write", r["writes_failed"] == 0),
                ("replica1 serves reads again after its restart", r["readmit_s"] is not None)]
    elif scenario == "failover-primary":
        out += [("no failed read", r["reads_failed"] == 0),
                ("writes fail only fast, with 503", r["writes_failed"] == r["writes_failed_503"]),
                ("writes succeed again after the primary's restart", r["readmit_s"] is not None),
                ("every app worker writes again; none fails a write 1 s after the first wrote again",
                 r.get("workers_not_back") == 0 and r.get("writes_back_spread_s") is not None
                 and r["writes_back_spread_s"] < 1.0)]
    elif scenario == "lag":
        out += [("the app issues a read-your-writes token with every 201", r["tokens_missing"] == 0),
                ("no stale read with the token", r["with_token"]["stale_reads"] == 0),
                ("no failed request but stale reads", r["writes_failed"] == 0
                 and r["with_token"]["reads_failed"] == 0 and r["without_token"]["reads_failed"] == 0)]
    return out


def build_summary(scenarios: dict, stack: str) -> dict:
    checks = [{"scenario": s, "target": t, "check": text, "ok": ok}
              for s, body in scenarios.items() for t, r in body["targets"].items()
              for text, ok in checks_for(s, t, r)]
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "stack": stack,
        "cpus": os.cpu_count(),
        "ok": all(c["ok"] for c in checks),
        "scenarios": scenarios,
        "checks": checks,
    }


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _missing(r: dict) -> str:
    reps = r["acked_missing_replicas"]
    return f"{_fmt(r['acked_missing_primary'])} / " + " / ".join(_fmt(v) for v in reps.values())


def _workers(r: dict) -> str:
    """Primary failover: how many app workers wrote again, and how long after the first one
    another still failed a write."""
    if "writes_back_by_worker" not in r:
        return "–"
    back = len(r["writes_back_by_worker"])
    return f"{back} of {back + r['workers_not_back']}, {_fmt(r['writes_back_spread_s'], 2)}"


def _n(value) -> str:
    return "–" if value is None else f"{value:,}"


def _share(value) -> str:
    return "–" if value is None else f"{value:.0%}"


def headline(name: str, body: dict) -> str:
    """A scenario's figures in one line, for the verdict."""
    targets = body["targets"]
    if name == "scaling":
        top = {t: r["steps"][-1] for t, r in targets.items() if r["steps"]}
        if not top:
            return "no complete step"
        users = next(iter(top.values()))["users"]
        text = f"at {users} users: " + ", ".join(f"{t} {_fmt(st['rps'], 0)} req/s (p99 {_fmt(st['p99_ms'], 0)} ms)"
                                                 for t, st in top.items())
        base = top.get("nopool", {}).get("rps")
        pooled = [st["rps"] for t, st in top.items() if t != "nopool" and st["rps"]]
        if base and pooled:
            text += f"; pooled {min(pooled) / base:.1f}–{max(pooled) / base:.1f}× no pool"
        return text
    if name.startswith("failover-promote"):
        return "; ".join(f"{t}: write outage {_fmt(r['write_outage_s'], 1)} s, {_n(r['reads_failed'])} "
                         f"reads failed, {_n(r['acked_lost'])} of {_n(r['acked_writes'])} acknowledged "
                         "writes lost" for t, r in targets.items())
    if name == "lag":
        return "; ".join(f"{t}: stale reads {_n(r['without_token']['stale_reads'])} without the token, "
                         f"{_n(r['with_token']['stale_reads'])} with; reads on replicas while one lagged "
                         f"{_share(r['without_token']['replica_share_during_lag'])} / "
                         f"{_share(r['with_token']['replica_share_during_lag'])}" for t, r in targets.items())
    return "; ".join(f"{t}: {_n(r['reads_failed'])}/{_n(r['reads'])} reads and {_n(r['writes_failed'])}/"
                     f"{_n(r['writes'])} writes failed, reroute {_fmt(r['reroute_s'], 2)} s, readmit "
                     f"{_fmt(r['readmit_s'], 2)} s" + _spread(r) for t, r in targets.items())


def _spread(r: dict) -> str:
    if "writes_back_spread_s" not in r:
        return ""
    return (f" (writes back on {len(r['writes_back_by_worker'])} workers; the last failure "
            f"{_fmt(r['writes_back_spread_s'], 2)} s after the first worker wrote again)")


def verdict(summary: dict) -> list[str]:
    """The opening of summary.md: one screen that says whether the run passed, and why not."""
    checks = summary["checks"]
    failed = [c for c in checks if not c["ok"]]
    head = (f"**{'PASS' if summary['ok'] else 'FAIL'}**: {len(checks) - len(failed)} of "
            f"{len(checks)} checks passed")
    if summary.get("error"):
        head += f"; the run stopped early: {summary['error'].splitlines()[0][:200]}"
    lines = ["## Verdict", "", head, "", "| scenario | checks | in one line |", "|---|---|---|"]
    for name, body in summary["scenarios"].items():
        mine = [c for c in checks if c["scenario"] == name]
        bad = sum(1 for c in mine if not c["ok"])
        lines.append(f"| {name} | {'ok' if not bad else f'**{bad} failed**'} | {headline(name, body)} |")
    if failed:
        lines += ["", "Failed:"] + [f"- {c['scenario']} {c['target']}: {c['check']}" for c in failed[:8]]
        if len(failed) > 8:
            lines.append(f"- ... and {len(failed) - 8} more (the checks list at the end)")
    return lines + [""]


def markdown(summary: dict) -> str:
    lines = [f"# Load test {summary['created']} ({summary['stack']} stack, {summary['cpus']} CPUs)", ""]
    lines += verdict(summary)
    for name, body in summary["scenarios"].items():
        s = body["settings"]
        if name == "scaling":
            lines += [f"## scaling: {s['step_s']:g} s per step, first {s['warmup_s']:g} s discarded", "",
                      "| target | users | req/s | p50 ms | p95 ms | p99 ms | fail ratio |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
            for target, r in body["targets"].items():
                for st in r["steps"]:
                    lines.append(f"| {target} | {st['users']} | {_fmt(st['rps'])} | {_fmt(st['p50_ms'])} | "
                                 f"{_fmt(st['p95_ms'])} | {_fmt(st['p99_ms'])} | {_fmt(st['fail_ratio'], 4)} |")
            lines += ["", "acknowledged writes (missing on primary / replica1 / replica2): " + ", ".join(
                f"{t} {r['acked_writes']} ({_missing(r)})" for t, r in body["targets"].items()), "",
                "![scaling](scaling.png)", ""]
        elif name.startswith("failover-promote"):
            lines += [f"## {name}: {s['killed']} killed at {s['kill_at_s']:g} s, {s['promoted']} promoted "
                      f"at {s['promote_at_s']:g} s, {s['killed']} rejoined at {s['rejoin_at_s']:g} s "
                      f"(SYNC={s['sync']}, {s['users']} users per app, {s['duration_s']:g} s)", "",
                      "| target | reads | reads failed | writes | writes failed (503) | write outage s | "
                      "writes back s | failed late | acked writes | acked lost |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for target, r in body["targets"].items():
                lines.append(f"| {target} | {r['reads']} | {r['reads_failed']} | {r['writes']} | "
                             f"{r['writes_failed']} ({r['writes_failed_503']}) | {_fmt(r['write_outage_s'], 2)} | "
                             f"{_fmt(r['writes_back_s'], 2)} | {r['writes_failed_late']} | "
                             f"{r['acked_writes']} | {_fmt(r['acked_lost'])} |")
            events = next(iter(body["targets"].values()))["events_s"]
            lines += ["", "steps (s since load start): " + ", ".join(
                f"{k} {_fmt(v, 2)}" for k, v in events.items() if v is not None), ""]
            lines += [f"![{name} {t}]({name}-{t}.png)" for t in body["targets"]] + [""]
        elif name == "lag":
            lines += [f"## lag: {s['replica']}'s replay paused at {s['lag_at_s']:g} s for {s['lag_s']:g} s "
                      f"({s['users']} write-then-read-back users per app, half with the token, "
                      f"{s['duration_s']:g} s)", "",
                      "| target | read-backs | token | stale | stale during lag | by the lagging replica "
                      "| on replicas during lag | other failures |",
                      "|---|---:|---|---:|---:|---:|---:|---:|"]
            for target, r in body["targets"].items():
                for key, label in (("without_token", "no"), ("with_token", "yes")):
                    f = r[key]
                    lines.append(f"| {target} | {f['read_backs']} | {label} | {f['stale_reads']} | "
                                 f"{f['stale_during_lag']} | {f['served_by_lagging']} | "
                                 f"{_share(f['replica_share_during_lag'])} | {f['reads_failed']} |")
            lines += ["", "tokens issued with the 201s: " + ", ".join(
                f"{t} {r['tokens_issued']} of {r['tokens_issued'] + r['tokens_missing']}"
                for t, r in body["targets"].items()), ""]
            lines += [f"![lag {t}](lag-{t}.png)" for t in body["targets"]] + [""]
        else:
            lines += [f"## {name}: {s['node']} killed at {s['kill_at_s']:g} s, restarted at "
                      f"{s['restart_at_s']:g} s ({s['users']} users, {s['duration_s']:g} s)", "",
                      "| target | reads | reads failed | writes | writes failed (503) | reroute s | "
                      "readmit s | workers back, spread s | acked writes | missing p / r1 / r2 |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for target, r in body["targets"].items():
                lines.append(f"| {target} | {r['reads']} | {r['reads_failed']} | {r['writes']} | "
                             f"{r['writes_failed']} ({r['writes_failed_503']}) | {_fmt(r['reroute_s'], 2)} | "
                             f"{_fmt(r['readmit_s'], 2)} | {_workers(r)} | {r['acked_writes']} | {_missing(r)} |")
            lines += [""] + [f"![{name} {t}]({name}-{t}.png)" for t in body["targets"]] + [""]
    lines += ["## checks", ""]
    lines += [f"- [{'x' if c['ok'] else ' '}] {c['scenario']} {c['target']}: {c['check']}"
              for c in summary["checks"]]
    return "\n".join(lines) + "\n"


def write(out: Path, summary: dict) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(markdown(summary), encoding="utf-8")
