"""summary.json, summary.md and the pass/fail checks of a results directory.

summary.json (schema_version 1; keys documented in docs/loadtest.md)::

    {"schema_version": 1, "created": "...", "stack": "docker", "cpus": 2, "ok": true,
     "scenarios": {"<scenario>": {"settings": {...}, "targets": {"<target>": {...}}}},
     "checks": [{"scenario": ..., "target": ..., "check": "...", "ok": true}]}

The checks are what the reference deployment promises; a failed check makes the harness exit 3.
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
    out = [("no acknowledged write lost (primary and both replicas)", not durability.lost(r))]
    if scenario == "failover-replica":
        out += [("no failed read", r["reads_failed"] == 0),
                ("no failed write", r["writes_failed"] == 0),
                ("replica1 serves reads again after its restart", r["readmit_s"] is not None)]
    elif scenario == "failover-primary":
        out += [("no failed read", r["reads_failed"] == 0),
                ("writes fail only fast, with 503", r["writes_failed"] == r["writes_failed_503"]),
                ("writes succeed again after the primary's restart", r["readmit_s"] is not None)]
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


def markdown(summary: dict) -> str:
    lines = [f"# Load test {summary['created']} ({summary['stack']} stack, {summary['cpus']} CPUs)", ""]
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
        else:
            lines += [f"## {name}: {s['node']} killed at {s['kill_at_s']:g} s, restarted at "
                      f"{s['restart_at_s']:g} s ({s['users']} users, {s['duration_s']:g} s)", "",
                      "| target | reads | reads failed | writes | writes failed (503) | reroute s | "
                      "readmit s | acked writes | missing p / r1 / r2 |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for target, r in body["targets"].items():
                lines.append(f"| {target} | {r['reads']} | {r['reads_failed']} | {r['writes']} | "
                             f"{r['writes_failed']} ({r['writes_failed_503']}) | {_fmt(r['reroute_s'], 2)} | "
                             f"{_fmt(r['readmit_s'], 2)} | {r['acked_writes']} | {_missing(r)} |")
            lines += [""] + [f"![{name} {t}]({name}-{t}.png)" for t in body["targets"]] + [""]
    lines += ["## checks", ""]
    lines += [f"- [{'x' if c['ok'] else ' '}] {c['scenario']} {c['target']}: {c['check']}"
              for c in summary["checks"]]
    return "\n".join(lines) + "\n"


def write(out: Path, summary: dict) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(markdown(summary), encoding="utf-8")
