"""Housekeeping: the jobs that keep the pool healthy between checkouts.

Three named jobs, run in order by ``_housekeep(now)``, which returns when it wants to run next:

- ``probe_down_endpoints``: step the non-blocking probe of each endpoint that is down and due;
  re-admit it when the probe connects, back off when it fails. Never gives up.
- ``retire_idle``: close idle connections past their (jittered) lifetime, made before their
  endpoint's last failure, or idle longer than ``max_idle`` while above ``min_size``.
- ``fill_min_size``: open connections until each endpoint that is up has ``min_size``.

In threaded mode a background thread runs them; in process mode checkout and return run them
when due, so a single-threaded worker needs no thread. Connect and close happen outside the
pool lock; the probe never blocks (see ``probe.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .endpoint import UP
from .probe import OK, PENDING, Probe

if TYPE_CHECKING:
    from .core import Pool

HOUSEKEEPING_INTERVAL = 1.0  # seconds between runs when nothing is pending
PROBE_STEP_INTERVAL = 0.01  # while a probe is in flight, step it this often


class Housekeeping:
    """Mixed into Pool: the jobs read and change the pool's state through its lock."""

    _fill_batch: int  # connections fill_min_size may open per run (process mode: 1)

    def _housekeep(self: "Pool", now: float) -> float:
        """Run every job once; return the monotonic time at which to run again."""
        due = min(now + HOUSEKEEPING_INTERVAL, self._job_probe_down_endpoints(now))
        self._job_retire_idle(now)
        if not self._job_fill_min_size():
            due = now  # more to open: continue at the next checkout (process mode)
        return due

    def _job_probe_down_endpoints(self: "Pool", now: float) -> float:
        due = float("inf")
        for ep in self._endpoints:
            if ep.state is UP or self._closed:
                continue
            probe = ep.probe
            if probe is None:
                if now < ep.retry_at:
                    due = min(due, ep.retry_at)
                    continue
                probe = ep.probe = Probe(ep.dsn, now, self.options.connect_timeout)
            status = probe.step(now)
            if status == PENDING:
                due = min(due, now + PROBE_STEP_INTERVAL)
                continue
            ep.probe = None
            if status == OK:
                self._readmit(ep, now)
            else:
                with self._lock:
                    ep.probe_failed(now, self._redact(probe.error or "probe failed"))
                due = min(due, ep.retry_at)
        return due

    def _job_retire_idle(self: "Pool", now: float) -> None:
        opts = self.options
        doomed = []
        with self._lock:
            for ep in self._endpoints:
                keep = []
                # The idle list is a stack: the bottom holds the longest-idle connections.
                for rec in ep.idle:
                    stale = rec.generation != ep.generation or now >= rec.expires
                    surplus = now - rec.last_used > opts.max_idle and ep.size > opts.min_size
                    if stale or surplus:
                        doomed.append(rec)
                        ep.size -= 1
                    else:
                        keep.append(rec)
                ep.idle = keep
            if doomed:
                self._serve_waiters()
        for rec in doomed:
            rec.close()

    def _job_fill_min_size(self: "Pool") -> bool:
        """Open at most _fill_batch connections; True when every endpoint that is up is full."""
        budget = self._fill_batch
        for ep in self._endpoints:
            while not self._closed:
                with self._lock:
                    if ep.state is not UP or ep.size >= self.options.min_size:
                        break
                    if budget == 0:
                        return False
                    ep.size += 1
                    ep.connecting += 1
                rec = self._open(ep)
                if rec is None:
                    break
                budget -= 1
                if not self._put(rec):
                    self._discard(rec)
        return True
