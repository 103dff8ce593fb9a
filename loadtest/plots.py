"""PNG charts of a run with matplotlib (Agg backend: no display needed).

    scaling.png                   requests/s (left) and p99 latency (right) versus users, one
                                  line per target; log2 user axis, so each step is one tick
    failover-<node>-<target>.png  timeline: successful requests/s stacked by X-Served-By (which
                                  server answered), failed requests/s in red, p99 latency per
                                  second below; vertical lines at kill, restart and healthy
    failover-promote-<async|sync>-<target>.png   the same, with lines at kill, promote,
                                  promoted, the first 201 from the new primary, rejoin, rejoined
    lag-<target>.png              read-backs/s with the read-your-writes token (top) and without
                                  (middle), stacked by X-Served-By, stale or failed ones in red;
                                  p99 below; lines at paused, resumed and caught_up
    outage-<mode>.png             (python -m loadtest outage) a row per app worker, a dot per
                                  request: after the kill, after the primary's and replica1's
                                  restarts, after a stall, and after a kill and a stall
                                  that find every worker fresh
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TARGET_COLOURS = {"threaded": "tab:blue", "process": "tab:orange", "nopool": "tab:gray"}
# One colour per node in every timeline, whichever nodes a panel happens to show.
NODE_COLOURS = {"primary": "tab:blue", "replica1": "tab:orange", "replica2": "tab:green"}
MARK_COLOURS = {"kill": "red", "restart": "green", "healthy": "tab:cyan",
                "promote": "purple", "promoted": "darkviolet", "rejoin": "green",
                "rejoined": "tab:cyan", "paused": "darkorange", "resumed": "green",
                "caught_up": "tab:cyan", "first 201": "tab:blue"}
# Steps a procedure reports that the plots leave out (they would crowd the marks that matter).
UNMARKED = {"fenced", "followed", "lag"}


def scaling_plot(targets: dict[str, list[dict]], path: Path, title: str) -> None:
    """``targets``: {target: [step figures with users, rps, p99_ms]}."""
    fig, (ax_rps, ax_p99) = plt.subplots(1, 2, figsize=(11, 4.2))
    for target, steps in targets.items():
        users = [s["users"] for s in steps]
        style = {"marker": "o", "label": target, "color": TARGET_COLOURS.get(target)}
        ax_rps.plot(users, [s["rps"] for s in steps], **style)
        ax_p99.plot(users, [s["p99_ms"] for s in steps], **style)
    for ax, label in ((ax_rps, "requests/s"), (ax_p99, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ticks = sorted({s["users"] for steps in targets.values() for s in steps})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("concurrent users")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_rps.set_title("throughput")
    ax_p99.set_title("tail latency")
    fig.suptitle(title)
    _save(fig, path)


def failover_plot(series: dict, marks: dict[str, float | None], path: Path, title: str,
                  names: dict[str, str] | None = None) -> None:
    """``series``: analysis.timeline() output (seconds since load start); ``marks``: {label:
    seconds since load start} for the vertical lines; ``names``: X-Served-By -> node name for
    the legend."""
    fig, (ax, ax_lat) = plt.subplots(2, 1, figsize=(11, 6), sharex=True,
                                     gridspec_kw={"height_ratios": [3, 1.3]})
    _served(ax, series, names or {}, "failed")
    _latency(ax_lat, series)
    _marks((ax, ax_lat), marks)
    ax.set_title(title)
    _save(fig, path)


def lag_plot(by_protection: dict[str, dict], every: dict, marks: dict[str, float | None],
             path: Path, title: str, names: dict[str, str] | None = None) -> None:
    """``by_protection``: {"with_token": timeline, "without_token": timeline} of the read-backs;
    ``every``: the timeline of every request, for the latency panel."""
    fig, axes = plt.subplots(3, 1, figsize=(11, 8), sharex=True,
                             gridspec_kw={"height_ratios": [2.2, 2.2, 1.2]})
    for ax, (key, series) in zip(axes, by_protection.items()):
        _served(ax, series, names or {}, "stale or failed")
        ax.set_ylabel(f"read-backs/s\n{key.replace('_', ' ')}")
    _latency(axes[-1], every)
    _marks(axes, marks)
    axes[0].set_title(title)
    _save(fig, path)


def _served(ax, series: dict, names: dict[str, str], failed_label: str) -> None:
    t = series["t"]
    if t:
        labels = [f"{names.get(k, k)} ({k})" if k in names else k for k in series["served"]]
        colours = [NODE_COLOURS.get(names.get(k, ""), "tab:gray") for k in series["served"]]
        ax.stackplot(t, *series["served"].values(), labels=labels, colors=colours, step="post",
                     alpha=0.85)
        ax.step(t, series["failed"], where="post", color="red", linewidth=1.5, label=failed_label)
    ax.set_ylabel("requests/s")
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)


def _latency(ax, series: dict) -> None:
    if series["t"]:
        ax.step(series["t"], [v if v is not None else float("nan") for v in series["p99_ms"]],
                where="post", color="black", linewidth=1)
    ax.set_ylabel("p99 ms")
    ax.set_yscale("log")
    ax.set_xlabel("seconds since load started")
    ax.grid(alpha=0.3)


def _marks(axes, marks: dict[str, float | None]) -> None:
    shown = [(label, at) for label, at in marks.items() if at is not None and label not in UNMARKED]
    for i, (label, at) in enumerate(shown):
        colour = MARK_COLOURS.get(label, "black")
        for a in axes:
            a.axvline(at, color=colour, linestyle="--", linewidth=1)
        axes[0].annotate(label, (at, 1.0), xycoords=("data", "axes fraction"),
                         xytext=(3, -12 - 11 * i), textcoords="offset points", color=colour,
                         fontsize=9)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def outage_plot(hits, figures: dict, path: Path, title: str) -> None:
    """outage-<mode>.png (loadtest/outage.py): one panel per phase, a row per app worker, a dot
    per request at its end, coloured by what it got; time from the fault, or from the moment the
    restarted node accepted connections."""
    def write(h):
        return "tab:green" if h.status == 201 else "tab:orange" if h.status == 503 and h.latency_ms < 60 else "red"

    def replica1(h):
        return "tab:green" if h.replica1 == "up" else "tab:orange" if h.status == 200 else "red"

    phases = (("kill-primary", "primary killed", write),
              ("start-primary", "primary accepts connections", write),
              ("replica-up", "replica1 accepts connections", replica1),
              ("stall-primary", "primary stalled", write),
              ("kill-primary-fresh", "primary killed (fresh workers)", write),
              ("stall-primary-fresh", "primary stalled (fresh workers)", write))
    origin = {"start-primary": figures["start_primary"]["accepting"],
              "replica-up": figures["replica"]["accepting"]}
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, (phase, label, colour) in zip(axes.flat, phases):
        t0 = origin.get(phase) or figures[phase.replace("-", "_")]["at"]
        mine = [h for h in hits if h.phase == phase]
        rows = {w: i for i, w in enumerate(sorted({h.worker for h in mine if h.worker}, key=int))}
        ax.scatter([h.start + h.latency_ms / 1000 - t0 for h in mine],
                   [rows.get(h.worker, -1) for h in mine], c=[colour(h) for h in mine], s=9)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(phase, fontsize=10)
        ax.set_xlabel(f"seconds since {label}", fontsize=8)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(list(rows), fontsize=6)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("app worker (pid)")
    fig.text(0.5, 0.005, "green: served (201 / replica1 up in /healthz)   orange: 503 in under 60 ms / "
             "replica1 not yet up   red: slower, failed or no answer", ha="center", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
