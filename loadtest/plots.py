"""PNG charts of a run with matplotlib (Agg backend: no display needed).

    scaling.png                   requests/s (left) and p99 latency (right) versus users, one
                                  line per target; log2 user axis, so each step is one tick
    failover-<node>-<target>.png  timeline: successful requests/s stacked by X-Served-By (which
                                  server answered), failed requests/s in red, p99 latency per
                                  second below; vertical lines at kill, restart and healthy
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TARGET_COLOURS = {"threaded": "tab:blue", "process": "tab:orange", "nopool": "tab:gray"}


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def failover_plot(series: dict, marks: dict[str, float | None], path: Path, title: str,
                  names: dict[str, str] | None = None) -> None:
    """``series``: analysis.timeline() output (seconds since load start); ``marks``: {label:
    seconds since load start} for the vertical lines; ``names``: X-Served-By -> node name for
    the legend."""
    names = names or {}
    t = series["t"]
    fig, (ax, ax_lat) = plt.subplots(2, 1, figsize=(11, 6), sharex=True,
                                     gridspec_kw={"height_ratios": [3, 1.3]})
    if t:
        labels = [f"{names.get(k, k)} ({k})" if k in names else k for k in series["served"]]
        ax.stackplot(t, *series["served"].values(), labels=labels, step="post", alpha=0.85)
        ax.step(t, series["failed"], where="post", color="red", linewidth=1.5, label="failed")
        ax_lat.step(t, [v if v is not None else float("nan") for v in series["p99_ms"]],
                    where="post", color="black", linewidth=1)
    for i, (label, at) in enumerate(marks.items()):
        if at is None:
            continue
        colour = {"kill": "red", "restart": "green", "healthy": "tab:cyan"}.get(label, "black")
        for a in (ax, ax_lat):
            a.axvline(at, color=colour, linestyle="--", linewidth=1)
        ax.annotate(label, (at, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12 - 11 * i),
                    textcoords="offset points", color=colour, fontsize=9)
    ax.set_ylabel("requests/s")
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax_lat.set_ylabel("p99 ms")
    ax_lat.set_yscale("log")
    ax_lat.set_xlabel("seconds since load started")
    ax_lat.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
