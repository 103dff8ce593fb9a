"""Run Locust headless as a subprocess, show progress, and hand back the run's directory.

Never ``import locust`` here: it monkey-patches the importing process with gevent, which would
also patch psycopg2's sockets and the threads the failover schedule runs in. Locust runs as
``<this python> -m locust -f loadtest/locustfile.py[,loadtest/shape.py] --headless ...`` and talks
to us through files only: the per-request logs, ``steps.jsonl``, its CSV/HTML reports and its
own log (``locust.log``; its stdout/stderr go to ``locust.out``).

While it runs, ``LogTail`` reads the new rows of the per-request logs every second; the progress
line (phase, elapsed time, requests/s and failures/s over the last second) is rewritten in place
on a terminal and printed every 10 s otherwise (make, CI logs).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from .settings import REPO_ROOT

LOCUSTFILE = REPO_ROOT / "loadtest" / "locustfile.py"
SHAPEFILE = REPO_ROOT / "loadtest" / "shape.py"
READBACKFILE = REPO_ROOT / "loadtest" / "readback.py"
# Locust's exit codes: 0 = ok, 1 = some request failed (or, with LOADTEST_ALLOW_FAILURES, an
# exception in a task); anything else = it could not run (bad options, crashed).
LOCUST_FAILED_REQUESTS = 1


@dataclasses.dataclass
class LocustRun:
    """One headless Locust process against one target."""

    label: str  # "scaling threaded": shown in the progress line
    run_dir: Path  # receives every file of this run
    host: str  # http://127.0.0.1:8001
    users: int = 8  # constant load (ignored with shape=True)
    duration_s: float = 60
    shape: bool = False  # use shape.py (its settings come from env)
    readback: bool = False  # the read-your-writes users of readback.py instead of the mix
    tags: tuple[str, ...] = ()
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    allow_failures: bool = False  # the run expects failed requests: exit 0 anyway

    def command(self) -> list[str]:
        files = [str(READBACKFILE if self.readback else LOCUSTFILE)] + ([str(SHAPEFILE)] if self.shape else [])
        cmd = [sys.executable, "-m", "locust", "-f", ",".join(files), "--headless",
               "--host", self.host, "--csv", str(self.run_dir / "locust"), "--csv-full-history",
               "--html", str(self.run_dir / "locust.html"), "--only-summary",
               "--logfile", str(self.run_dir / "locust.log"), "--stop-timeout", "5"]
        if not self.shape:
            cmd += ["-u", str(self.users), "-r", str(self.users), "-t", f"{self.duration_s:g}s"]
        if self.tags:
            cmd += ["-T", *self.tags]
        return cmd

    def environment(self) -> dict[str, str]:
        env = {**os.environ, **self.env, "LOADTEST_LOG_DIR": str(self.run_dir), "PYTHONUNBUFFERED": "1"}
        if self.allow_failures:
            env["LOADTEST_ALLOW_FAILURES"] = "1"
        return env

    def exit_code(self, returncode: int) -> int:
        """Locust's exit code, given the command's (here they are the same)."""
        return returncode

    def cleanup(self) -> None:
        """Called after the run, whatever happened (a local Locust leaves nothing behind)."""


class LogTail:
    """Follows the per-request logs of running Locusts (one run directory or several): rows
    since the last poll, and the moment the first request was seen (when "load is on")."""

    def __init__(self, *run_dirs: Path) -> None:
        self.run_dirs = run_dirs
        self._offsets: dict[Path, int] = {}
        self._error_at: dict[Path, int] = {}  # the error column of each log (from its header)
        self.first_request_at: float | None = None  # epoch seconds

    def poll(self) -> tuple[int, int]:
        """(requests, failed requests) logged since the previous call."""
        total = failed = 0
        for path in sorted(p for d in self.run_dirs for p in d.glob("requests-*.csv")):
            offset = self._offsets.get(path, 0)
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            end = chunk.rfind(b"\n") + 1  # complete lines only; the rest comes next time
            self._offsets[path] = offset + end
            for row in csv.reader(chunk[:end].decode("utf-8", "replace").splitlines()):
                if row and row[0] == "start":  # the header: where the error text is
                    self._error_at[path] = row.index("error")
                    continue
                total += 1
                at = self._error_at.get(path, 7)
                if len(row) > at and row[at]:  # empty for a success
                    failed += 1
        if total and self.first_request_at is None:
            self.first_request_at = time.time()
        return total, failed


class Progress:
    """One status line: ``[label] phase  mm:ss  N req/s  M failed/s``."""

    def __init__(self, stream=sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self._last_print = 0.0

    def update(self, label: str, phase: str, elapsed: float, rps: float, fps: float) -> None:
        text = (f"[{label}] {phase:<28} {int(elapsed) // 60:02d}:{int(elapsed) % 60:02d}  "
                f"{rps:7.0f} req/s  {fps:5.0f} failed/s")
        if self.tty:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()
        elif time.monotonic() - self._last_print >= 10:
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last_print = time.monotonic()

    def done(self, label: str, message: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(f"[{label}] {message}\n")
        self.stream.flush()


def run_locust(run: LocustRun, phase: Callable[[LogTail], str] | None = None,
               progress: Progress | None = None, timeout_s: float | None = None,
               tail: LogTail | None = None) -> int:
    """Run Locust to completion; returns its exit code. ``phase(tail)`` names what is going on
    for the progress line (the failover schedule updates it). Locust is stopped (SIGINT, then
    SIGKILL) if this is interrupted or runs past ``timeout_s``. Pass ``tail`` to watch the
    run from another thread (the failover schedule waits for ``tail.first_request_at``)."""
    return run_locusts([run], phase, progress, timeout_s, tail)[0]


def run_locusts(runs: list[LocustRun], phase: Callable[[LogTail], str] | None = None,
                progress: Progress | None = None, timeout_s: float | None = None,
                tail: LogTail | None = None) -> list[int]:
    """run_locust() for several runs at once (say, both apps under one failover): all start
    together, one progress line sums them; returns their exit codes in order."""
    progress = progress or Progress()
    tail = tail or LogTail(*(r.run_dir for r in runs))
    label = " + ".join(r.label for r in runs)
    started = time.monotonic()
    procs = []
    try:
        for run in runs:
            run.run_dir.mkdir(parents=True, exist_ok=True)
            (run.run_dir / "command.txt").write_text(" ".join(run.command()) + "\n")
            with open(run.run_dir / "locust.out", "wb") as out:
                procs.append(subprocess.Popen(run.command(), cwd=REPO_ROOT, env=run.environment(),
                                              stdin=subprocess.DEVNULL, stdout=out,
                                              stderr=subprocess.STDOUT))
        last = time.monotonic()
        while any(proc.poll() is None for proc in procs):
            time.sleep(1.0)
            now = time.monotonic()
            count, failed = tail.poll()
            span = max(now - last, 1e-3)
            last = now
            progress.update(label, phase(tail) if phase else "running", now - started,
                            count / span, failed / span)
            if timeout_s is not None and now - started > timeout_s:
                raise TimeoutError(f"locust ran longer than {timeout_s:.0f}s")
    finally:
        codes = []
        for run, proc in zip(runs, procs):
            if proc.poll() is None:
                _stop(proc)
            codes.append(run.exit_code(proc.returncode))
        for run in runs:
            run.cleanup()
    progress.done(label, f"locust exited {', '.join(map(str, codes))} after "
                         f"{time.monotonic() - started:.0f}s")
    return codes


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT lets Locust write its reports; SIGKILL if it does not stop."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def locust_error(run: LocustRun, code: int) -> str | None:
    """A message if Locust could not run at all (not merely saw failed requests)."""
    if code in (0, LOCUST_FAILED_REQUESTS):
        return None
    out = (run.run_dir / "locust.out")
    tail = out.read_text(errors="replace")[-3000:] if out.exists() else ""
    return f"locust exited {code} for {run.label}; last output:\n{tail}"
