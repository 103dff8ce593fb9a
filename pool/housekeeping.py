"""Housekeeping: the jobs that keep the pool healthy between checkouts.

Three named jobs never block, and run in order by ``_housekeep(now)``, which returns when it wants
to run next:

- ``probe_down_endpoints``: step the non-blocking probe of each endpoint that is down and due;
  re-admit it when the probe connects, back off when it fails. Never gives up.
- ``cancel_cut_off``: ask a server that is up to cancel the statements the watchdog cut off on
  our side at their deadline (watchdog.py), which it would otherwise run to their end.
- ``retire_idle``: close idle connections past their (jittered) lifetime, made before their
  endpoint's last failure, or idle longer than ``max_idle`` while above ``min_size``.

The fourth, ``fill_min_size``, opens connections, which blocks (a connect, the user's
``configure()``), so it never runs where probes do: threaded mode gives it a thread of its own,
started when there is something to fill; process mode runs it on a checkout, one connection at a
time, after the probes. Whatever a job raises is logged and backed off, never raised into a
caller: a replica's ``configure()`` error must not fail a write to a healthy primary.
"""

from __future__ import annotations

import logging
import traceback
from time import monotonic
from typing import TYPE_CHECKING

from .connection import describe_error
from .endpoint import DOWN, QUIET, REFUSED, UP
from .errors import PoolTimeout
from .monitor import job_monitor
from .probe import PENDING
from .watchdog import job_cancel_cut_off

if TYPE_CHECKING:
    from .core import Pool

log = logging.getLogger("pool")

def log_failure(what: str) -> None:
    """Log the exception being handled, with its traceback as text. Not exc_info: a handler that
    keeps records (pytest's caplog, an in-memory buffer) would keep the traceback's frames alive,
    and with them every connection their locals name, which could then never free its slot."""
    log.error("%s\n%s", what, traceback.format_exc().rstrip())


HOUSEKEEPING_INTERVAL = 1.0  # seconds between runs when nothing is pending
PROBE_STEP_INTERVAL = 0.01  # while a probe is in flight, step it this often
FILL_BACKOFF = (1.0, 30.0)  # after a failed fill: first delay, cap (doubling)


class Housekeeping:
    """Mixed into Pool: the jobs read and change the pool's state through its lock."""

    _fill_batch: int = 1  # connections fill_min_size opens per run (threaded: all it needs)
    _probes_in_background = True  # a thread steps probes between requests (not process mode)
    _fill_retry_at: float = 0.0
    _fill_failures: int = 0
    # Process mode runs the jobs on a request, whose deadline this is while they run: the jobs
    # that wait (a min_size connect, a cancel request's login) stop there and go on in a later
    # request. Threads have no caller to hold up.
    _until: float = float("inf")

    def _housekeep(self: "Pool", now: float) -> float:
        """Run the non-blocking jobs once; return the monotonic time at which to run again."""
        due = now + HOUSEKEEPING_INTERVAL
        jobs = [self._job_probe_down_endpoints, self._job_cancel_cut_off, self._job_retire_idle]
        if self._monitoring:
            jobs.append(self._job_monitor)
        if self._board is not None:
            jobs.append(self._job_publish)
        for job in jobs:
            try:
                due = min(due, job(now))
            except Exception:  # a job's failure is the job's: log it, go on, try again later
                log_failure(f"pool housekeeping ({job.__name__}) failed; retrying in a second")
        if self._waiting_count():  # slots freed by collected connections; waiters past their grace
            with self._lock:
                self._serve_waiters()
        if self._fill_needed():
            self._wake_filler()
        return due

    def _job_probe_down_endpoints(self: "Pool", now: float) -> float:
        due = float("inf")
        if self._board_seq[0] != self._board_seen:  # another process may have news
            self._sync_board()
        for ep in self._endpoints:
            if ep.state not in (DOWN, REFUSED) or self._closed:
                continue
            probe = ep.probe
            if probe is None and now < ep.retry_at:
                due = min(due, ep.retry_at)
                continue
            if probe is None and not self._probes_in_background and not ep.worth_waiting(now):
                # No thread here steps a probe nobody waits for: it would advance one step per
                # request and rarely finish. Fail fast until waiting on one is worth it.
                due = min(due, max(ep.retry_at, ep.seen_down_at + QUIET))
                continue
            if probe is None or probe.leased:  # one taken over from an absent holder has none
                leased = self._may_probe(ep)
                if not leased and probe is not None:  # another process took the lease meanwhile
                    probe.cancel()
                    ep.probe = None
                    due = min(due, now + PROBE_STEP_INTERVAL * 10)
                    continue
                if not leased and not (ep.suspect or self._probe_abandoned(ep, now)):
                    # Without the lease a probe starts only for a suspect endpoint (a request here
                    # waits for its own probe: a false alarm must cost it milliseconds), or when
                    # the holder stopped attending its own.
                    due = min(due, now + PROBE_STEP_INTERVAL * 10)
                    continue
            if probe is None:
                probe = self._start_probe(ep, now)
                probe.leased = leased
            status = probe.step(now)
            if status == PENDING:
                if ep.suspect and ep.probe_left(probe) <= 0:
                    self._probe_unanswered(ep, now)
                due = min(due, now + PROBE_STEP_INTERVAL)
                continue
            try:
                self._probe_finished(ep, probe, now)
            finally:
                # Cleared only once the verdict is applied: a request (or waiter) that finds the
                # endpoint down in between must still see a probe to wait for, not fail at once.
                ep.probe = None
                self._end_probe(ep)
            due = min(due, ep.retry_at if ep.state in (DOWN, REFUSED) else due)
        return due

    def _job_cancel_cut_off(self: "Pool", now: float) -> float:
        """cancel_cut_off: what the watchdog cut off on our side, cancelled on the server."""
        return job_cancel_cut_off(self, now)

    def _job_publish(self: "Pool", now: float) -> float:
        """publish: this pool's summary on the board, about once a second (board.py)."""
        if now >= self._publish_at:
            self._publish_at = now + HOUSEKEEPING_INTERVAL
            self._publish()
        return self._publish_at

    _publish_at = 0.0

    def _job_monitor(self: "Pool", now: float) -> float:
        """monitor_endpoints: ask each endpoint that is up where it stands (monitor.py)."""
        return job_monitor(self, now)

    def _job_retire_idle(self: "Pool", now: float) -> float:
        opts = self.options
        doomed = []
        with self._lock:
            for ep in self._endpoints:
                keep = []
                # The idle list is a stack: the bottom holds the longest-idle connections.
                for rec in ep.idle:
                    stale = ep.stale(rec) or now >= rec.expires
                    surplus = now - rec.last_used > opts.max_idle and ep.size > opts.min_size
                    if stale or surplus:
                        doomed.append(rec)
                        ep.release(rec.key)
                    else:
                        keep.append(rec)
                ep.idle = keep
            if doomed:
                self._serve_waiters()
        for rec in doomed:
            rec.close()
        if doomed and self.options.min_size:
            self._wake_filler()
        return float("inf")

    def _fill_needed(self: "Pool") -> bool:
        return bool(self.options.min_size) and not self._closed and any(
            ep.state is UP and ep.size < self.options.min_size for ep in self._endpoints)

    def _job_fill_min_size(self: "Pool", now: float) -> bool:
        """Open at most _fill_batch connections; True when every endpoint that is up is full.

        A connect that fails ejects its endpoint (evidence) and filling skips it; any other
        error (the user's configure(), say) is logged, and filling waits, doubling the delay.
        In process mode a connect ends at the request's deadline (``_until``), and only a whole
        connect_timeout unanswered is evidence against the server: the request merely hosts the
        connect, and must not fail for it. Cut short, or with less time left than two logins
        take, filling waits a second (a request a second at most pays for a slow server).
        """
        if now < self._fill_retry_at:
            return False
        budget = self._fill_batch
        for ep in self._endpoints:
            while not self._closed:
                with self._lock:
                    if ep.state is not UP or ep.size >= self.options.min_size:
                        break
                    if budget == 0:
                        return False
                    short = self._until - monotonic() < 2 * ep.login_s
                    if not short:
                        res = ep.reserve()
                try:
                    rec = None if short else \
                        self._open(res, self._until, hosted=True)
                except PoolTimeout:  # the request's deadline: proof of nothing
                    short = True
                except Exception as exc:
                    first, cap = FILL_BACKOFF
                    delay = min(cap, first * 2 ** self._fill_failures)
                    self._fill_failures += 1
                    self._fill_retry_at = now + delay
                    log.error("opening a min_size connection to %s %s failed (%s); retrying in "
                              "%.0fs", ep.role, ep.name, self._redact(describe_error(exc)), delay)
                    return False
                if short:
                    self._fill_retry_at = now + HOUSEKEEPING_INTERVAL
                    return False
                if rec is None:
                    break
                self._fill_failures = 0
                budget -= 1
                if not self._put(rec):
                    self._discard(rec)
        return True
