"""Turn benchmark rows into bench.csv (every round), bench.md (the median round) and bench.png."""

from __future__ import annotations

import csv
import datetime
import math
import os
import platform
import statistics
from pathlib import Path
from typing import Any, Callable

OURS = "pool (threaded)"


def median_cells(rows: list[dict]) -> dict[tuple[str, int], dict]:
    """Per (contender, threads): the round with the median throughput, whole (p50/p99 too)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["contender"], r["threads"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["ops_per_s"])
        out[key] = rs[(len(rs) - 1) // 2]
    return out


def write_report(rows: list[dict], bare: list[tuple[str, float]], threads: list[int],
                 names: list[str], base: Path, placement: str = "not pinned",
                 halt_poll_ns: int | None = None) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    outdir = base / stamp
    outdir.mkdir(parents=True, exist_ok=True)
    with open(outdir / "bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["round", "contender", "threads", "ops", "ops_per_s",
                                          "p50_ms", "p99_ms", "max_ms", "fairness",
                                          "client_ipis_per_query", "steal_pct", "client_cpu_us",
                                          "client_busy_pct", "server_busy_pct", "errors"])
        w.writeheader()
        w.writerows(rows)
    with open(outdir / "checkout.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["what", "microseconds"])
        w.writerows(bare)
    cells = median_cells(rows)
    (outdir / "bench.md").write_text(markdown(cells, names, bare, threads, rows, placement,
                                              halt_poll_ns))
    plot(cells, names, threads, outdir / "bench.png")
    latest = base / "latest"
    if latest.is_symlink() or latest.exists():
        latest.unlink()
    os.symlink(stamp, latest)
    return outdir


def markdown(cells: dict, names: list[str], bare: list[tuple[str, float]], threads: list[int],
             rows: list[dict], placement: str = "not pinned",
             halt_poll_ns: int | None = None) -> str:
    rounds = max(r["round"] for r in rows)
    natural = [n for n in names if "+autocommit" not in n]
    autocommit = [n for n in names if n.startswith("pool (")] + [n for n in names if "+autocommit" in n]
    lines = [
        f"Median of {rounds} rounds, pool size 8 "
        f"({platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs; {placement}). Cells: queries/s, then p50 / p99 latency in ms, "
        f"of each contender's median round. Within a round the contenders at one thread count "
        f"ran back to back, and a ratio is the median over the rounds of that round's ratio.", ""]
    lines += steal_note(rows)
    lines += polling_note(halt_poll_ns)
    lines += table(cells, rows, natural, threads, "Each pool in its natural idiom (the defaults: "
                   "peers run BEGIN, the query and ROLLBACK or COMMIT; pgdbpool pings, then queries)")
    if len(autocommit) > 2:
        lines += table(cells, rows, autocommit, threads, "Peers configured for autocommit: one "
                       "round trip per query for everyone, so only the pools' own overhead differs")
    lines += cpu_table(cells, autocommit if len(autocommit) > 2 else names, threads)
    most = max(threads)
    lines += [f"Fairness at {most} threads: the least-served thread's requests as a share of the "
              "most-served one's (1.00: every thread got its turn), the slowest request, and the "
              "interrupts the client's CPU received per query (`client_ipis` in bench.py: on one "
              "machine, each is the server's CPU waking a client thread the hard way).", "",
              "| contender | fairness | max latency ms | interrupts / query |", "|---|---|---|---|"]
    lines += [f"| {n} | {cells[(n, most)]['fairness']:.2f} | {cells[(n, most)]['max_ms']:.1f} | "
              f"{cells[(n, most)]['client_ipis_per_query']:.2f} |"
              for n in names if (n, most) in cells]
    lines += ["", "Checkout + return without a query (and, last, a block running one statement, "
              "with and without the session reset), one thread, best of 7 (microseconds):", "",
              "| what | µs |", "|---|---|"]
    lines += [f"| {what} | {us:.2f} |" for what, us in bare]
    return "\n".join(lines) + "\n"


# Above this share of a cell's CPU time taken by the hypervisor, the run is called noisy.
NOISY_STEAL_PCT = 5.0


def steal_note(rows: list[dict]) -> list[str]:
    """One line on CPU steal (bench.cpu_steal) over the cells; a warning naming the worst ones
    when some exceed NOISY_STEAL_PCT, since then rounds differ by the neighbours' load."""
    steal = sorted((r["steal_pct"], r["round"], r["contender"], r["threads"]) for r in rows
                   if not math.isnan(r.get("steal_pct", math.nan)))
    if not steal:
        return []
    line = (f"CPU steal (the hypervisor running something else, from /proc/stat): "
            f"{steal[len(steal) // 2][0]:.1f}% of a cell's CPU time at the median, "
            f"{steal[-1][0]:.1f}% at most.")
    noisy = [s for s in steal if s[0] > NOISY_STEAL_PCT]
    if noisy:
        worst = "; ".join(f"round {rnd} {name} at {n} thread{'s' if n > 1 else ''} {pct:.0f}%"
                          for pct, rnd, name, n in noisy[::-1][:3])
        line += (f" **Noisy run:** {len(noisy)} of {len(steal)} cells lost more than "
                 f"{NOISY_STEAL_PCT:.0f}% ({worst}); their rounds measured the neighbours too, "
                 "so compare ratios only with a quieter run.")
    return [line, ""]


def grid(cells: dict, names: list[str], threads: list[int],
         show: Callable[[dict | None], str]) -> list[str]:
    """A markdown table: a row per contender, a column per thread count, `show(cell)` in each
    (the cell is None where that contender did not run)."""
    return (["| contender | " + " | ".join(f"{n} thread{'s' if n > 1 else ''}" for n in threads) + " |",
             "|---|" + "---|" * len(threads)]
            + [f"| {name} | " + " | ".join(show(cells.get((name, n))) for n in threads) + " |"
               for name in names])


def polling_note(halt_poll_ns: int | None) -> list[str]:
    """A warning where idle CPUs halt at once (bench.halt_polling): then waking one costs the
    waker an exit to the hypervisor, and on one machine the server's CPU pays it for every
    reply that finds the client's CPU idle."""
    if halt_poll_ns != 0:
        return []
    return ["**Idle CPUs halt here without polling** (guest_halt_poll_ns = 0). On one machine the "
            "server's CPU wakes a client thread with every reply, and waking a halted CPU costs "
            "it an exit to the hypervisor. So from 4 threads up, where the server's CPU is "
            "saturated, throughput favours the client that leaves its CPU idle least, wasted "
            "work included, over the cheapest one; the CPU time per query below still ranks "
            "them by cost. `make bench BENCH_ARGS=\"--halt-poll 200000\"` (the kernel's default) "
            "measures without that toll.", ""]


def table(cells: dict, rows: list[dict], names: list[str], threads: list[int],
          title: str) -> list[str]:
    lines = [f"**{title}**", ""] + grid(cells, names, threads, lambda c: (
        "n/a (one thread per process)" if c is None else
        f"{c['ops_per_s']:,.0f} ({c['p50_ms']:.2f} / {c['p99_ms']:.2f})"
        + (f", {c['errors']} errors" if c["errors"] else "")))
    peer_names = [m for m in names if not m.startswith("pool (")]
    spans = [round_ratios(rows, peer_names, n) for n in threads]
    # The median over rounds of each round's ratio: its cells ran back to back (bench.schedule),
    # so the host's drift, which moves both, cancels; a ratio of medians would mix rounds.
    lines.append(f"| **{OURS} / best peer** | " + " | ".join(
        f"{statistics.median(s):.2f}x" if s else "n/a" for s in spans) + " |")  # (n/a: --only)
    if any(len(s) > 1 for s in spans):  # how far one round's ratio strays from the median's
        lines.append("| the same ratio, lowest and highest round | " + " | ".join(
            f"{min(s):.2f}x to {max(s):.2f}x" if s else "n/a" for s in spans) + " |")
    return lines + [""]


def cpu_table(cells: dict, names: list[str], threads: list[int]) -> list[str]:
    """Per cell (the median round): the client's CPU time per query, and how busy the client's
    and the server's CPUs were. Throughput cannot rank pools where the server's CPU is the one
    that ran out: then every contender gets what the server can give, give or take how it
    wakes the client (bench.client_ipis); the CPU time per query still can."""
    if not any(math.isfinite(c.get("client_cpu_us", math.nan)) for c in cells.values()):
        return []
    lines = ["**What a query cost the client, and which CPU ran out.** The benchmark process's "
             "CPU time per query (its threads', kernel time included: what the pool costs the "
             "worker that runs it), then how busy the client's and the server's CPUs were "
             "(client / server). Where the server's CPU was saturated, it set the throughput for "
             "every contender alike, and the ratios above compare the rest: how each client "
             "woke it and was woken.", ""]
    return lines + grid(cells, names, threads, lambda c: "n/a" if c is None else (
        f"{c['client_cpu_us']:.1f} µs "
        f"({_pct(c.get('client_busy_pct'))} / {_pct(c.get('server_busy_pct'))})")) + [""]


def _pct(value: Any) -> str:
    return f"{float(value):.0f}%" if value is not None and math.isfinite(float(value)) else "?"


def round_ratios(rows: list[dict], peer_names: list[str], threads: int) -> list[float]:
    """Ours over the best of `peer_names` within each round (cells seconds apart)."""
    got = {(r["round"], r["contender"]): r["ops_per_s"] for r in rows if r["threads"] == threads}
    out = []
    for rnd in sorted({rnd for rnd, _ in got}):
        peers = [got[(rnd, m)] for m in peer_names if (rnd, m) in got]
        if peers and (rnd, OURS) in got:
            out.append(got[(rnd, OURS)] / max(peers))
    return out


def plot(cells: dict, names: list[str], threads: list[int], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    colors = {}
    for name in names:
        xs = [n for n in threads if (name, n) in cells]
        base = name.replace(" +autocommit", "")
        style = dict(marker="o")
        if name.startswith("pool ("):
            style.update(linewidth=2.8, color="black" if "threaded" in name else "gold", markeredgecolor="black")
        if "+autocommit" in name:
            style.update(linestyle="--", color=colors.get(base))
        if len(xs) == 1:
            style.update(linestyle="none", marker="*", markersize=14)
        line, = ax1.plot(xs, [cells[(name, n)]["ops_per_s"] for n in xs], label=name, **style)
        colors.setdefault(base, line.get_color())
        ax2.plot(xs, [cells[(name, n)]["p99_ms"] for n in xs], label=name,
                 **{**style, "color": line.get_color()})
    for ax, title, unit in ((ax1, "throughput (higher is better)", "queries/s"),
                            (ax2, "p99 latency (lower is better)", "ms, log scale")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(threads, [str(n) for n in threads])
        ax.set_xlabel("threads (pool size 8)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax2.set_yscale("log")
    handles, labels = ax1.get_legend_handles_labels()  # below both plots: over one, it hid lines
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("One read query per checkout (solid: natural idiom, dashed: peers in autocommit)")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
