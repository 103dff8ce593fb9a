"""Endpoint health: ejection, refusal, demotion and re-admission, what routing does after each,
and the errors that describe the state to a caller.

Mixed into Pool. Every change of an endpoint's state goes through here, under the pool lock, and
ends in ``_state_changed_locked``: routes rebuilt (the primary if up; the replicas that are up and
not lagging), waiters served again. The evidence rules (endpoint.py) are applied here: a failed
connect or probe ejects, and is shared on the board (sharing.py); a lost session ejects with a
probe due at once and is not shared; a missed deadline ejects as a suspicion that keeps the other
sessions until the probe's verdict, and is shared; a refused login is a refusal, said once at
ERROR.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, NoReturn


from . import lag, monitor
from .config import PRIMARY, REPLICA
from .connection import PooledConnection, connect_failure, describe_error
from .endpoint import DOWN, PROBE_GRACE, PROBE_GRACE_MAX, REFUSED, UP, Endpoint
from .errors import EndpointRefused, EndpointUnavailable, PoolTimeout
from .probe import OK, PENDING, Probe, wait_any, wait_for
from .roles import UNKNOWN

if TYPE_CHECKING:
    from .core import Pool

log = logging.getLogger("pool")
monotonic = time.monotonic
SURVEY_EVERY = 0.5  # seconds between two surveys of every node (Health._survey)


class Health:
    """Mixed into Pool: endpoint state transitions and their errors."""

    def _connect_failed(self: "Pool", ep: Endpoint, exc: BaseException, fast: bool = False) -> None:
        error = self._redact(describe_error(exc))
        kind = connect_failure(error)
        if kind == "refused":
            self._refuse(ep, error)
        elif kind == "standby":  # target_session_attrs=read-write refused a read-only server
            self._demoted(ep, f"refused a read-write session (a standby now?): {error}")
        else:
            self._eject(ep, f"connect failed: {error}", fast=fast)

    def _demoted(self: "Pool", ep: Endpoint, why: str) -> None:
        """The primary refused to write: it was demoted. With declared roles it is down until it
        is a primary again; with candidates the pool looks for the new one (roles.py)."""
        if self._discover:
            with self._lock:
                if ep.role == PRIMARY:
                    ep.role = UNKNOWN
                    ep.generation += 1
                if self._primary is ep:
                    self._primary = None
                self._state_changed_locked()
        self._eject(ep, why, probe_now=True)

    def _eject(self: "Pool", ep: Endpoint, error: str, probe_now: bool = False, share: bool = True,
               fast: bool = False, keep: bool = False) -> None:
        """Mark an endpoint down: everyone skips it until a probe succeeds (see Endpoint).
        ``share``: the evidence is good enough for every process (board.py); a lost session is
        not (its immediate probe's result is). ``fast``: the failure came at once. ``keep``: a
        missed deadline, which leaves the other sessions open until the probe's verdict."""
        now = monotonic()
        with self._lock:
            news = ep.mark_down(now, error, probe_now, fast, keep)
            doomed = self._drop_stale_locked(ep)  # (none if kept; all if the keeping ended)
            if news:
                self._state_changed_locked()
        for rec in doomed:
            rec.close()
        if not news:
            return
        if share:
            self._share(ep)
        self._publish()
        if ep.keeping:
            log.warning("%s %s is suspect, skipped until a probe (due now) answers: %s",
                        ep.role, ep.name, error)
        else:
            log.warning("%s %s is down, skipping it until a probe succeeds: %s",
                        ep.role, ep.name, error)
        self._wake_housekeeper()

    def _missed_deadline(self: "Pool", ep: Endpoint, raw: Any, what: str) -> None:
        """A statement of ours (``what``) got no answer within its deadline, and the watchdog
        cut it off on our side: one slow query on a server that is fine, or a stalled or
        unreachable server. The probe due at once tells which; once the server is up, the
        statement, which would otherwise run to its end there, is cancelled (watchdog.py).
        Evidence for every process, as a suspicion (board.py)."""
        with self._lock:
            ep.query_timeouts += 1
            ep.cut_off(raw, monotonic())
        self._eject(ep, f"{what} got no answer within its deadline", probe_now=True, keep=True)

    def _refuse(self: "Pool", ep: Endpoint, error: str) -> None:
        """The server refused our login: a configuration problem, said once and loudly."""
        now = monotonic()
        with self._lock:
            news = ep.mark_refused(now, error)
            doomed = self._drop_idle_locked(ep)
            self._state_changed_locked()
        self._share(ep)
        self._publish()
        if news:
            log.error("%s %s refused the connection: %s (check the user, password, database and "
                      "pg_hba.conf; the pool keeps trying every few seconds)", ep.role, ep.name, error)
        self._wake_housekeeper()
        for rec in doomed:
            rec.close()

    def _readmit(self: "Pool", ep: Endpoint, now: float) -> None:
        with self._lock:
            was = ep.state
            ep.mark_up()
            self._state_changed_locked()
        self._share(ep)
        self._publish()
        log.info("%s %s is back after %.1fs %s", ep.role, ep.name, now - ep.down_since, was)

    def _drop_idle_locked(self: "Pool", ep: Endpoint) -> list[PooledConnection]:
        """Lock held. Take every idle connection of ep out of the pool, for closing outside."""
        doomed, ep.idle = ep.idle, []
        for rec in doomed:
            ep.release(rec.key)
        return doomed

    def _drop_stale_locked(self: "Pool", ep: Endpoint) -> list[PooledConnection]:
        """Lock held. Take ep's idle connections made before its generation changed (after a
        failure: all of them; while it keeps them, or they await a ping, none) out of the pool,
        for closing outside."""
        doomed = [rec for rec in ep.idle if ep.stale(rec)]
        if doomed:
            ep.idle = [rec for rec in ep.idle if not ep.stale(rec)]
            for rec in doomed:
                ep.release(rec.key)
        return doomed

    def _state_changed_locked(self: "Pool") -> None:
        """Lock held. An endpoint's state or role changed: route again, re-serve the waiters."""
        self._route_locked()
        self._serve_waiters()

    def _route_locked(self: "Pool") -> None:
        """Lock held. Who serves writes (the primary, if up) and reads (the replicas that are up,
        not diverged and not lagging; see lag.py for when every replica lags)."""
        primary = self._primary
        self._writable = (primary,) if primary is not None and primary.state is UP else ()
        self._replicas = tuple(ep for ep in self._endpoints if ep.role == REPLICA)
        up = tuple(ep for ep in self._replicas if ep.state is UP and not ep.diverged)
        self._readable, self._reads_to = lag.route_reads(up, self.options.max_lag)
        if not self._readable and up and not self.options.read_fallback:
            self._readable = lag.least_lagging(up)
            self._reads_to = "the least-lagging replica (every replica lags; read_fallback is off)"
        elif not up:
            why = "every replica up has diverged from the primary" if any(
                ep.state is UP for ep in self._replicas) else "no replica is up"
            self._reads_to = f"primary ({why})" if self._writable and \
                self.options.read_fallback else f"nowhere ({why})"

    def _grace_pending(self: "Pool", now: float, eps: Any = None) -> bool:
        """Lock held. Is some endpoint (of ``eps``, default all) down with a probe due or
        younger than its grace? Then a request (or a waiter) that no endpoint can serve gets
        that long before it fails."""
        return any(ep.awaiting_probe(now) for ep in (self._endpoints if eps is None else eps))

    def _probe_all_at_start(self: "Pool") -> None:
        """Probe every endpoint at once and wait (at most connect_timeout) for the answers, so a
        pool starts knowing which servers are down without failing because of them. What the
        shared board already says (sharing.py) is taken from there instead: a worker started
        during an outage must not pay the connect timeout another worker has already paid."""
        now = monotonic()
        unknown = [ep for ep in self._endpoints if not self._adopt_at_start(ep, now)]
        probes = [self._new_probe(ep, now) for ep in unknown]
        wait_for(probes, monotonic)
        for ep, probe in zip(unknown, probes):
            self._probe_finished(ep, probe, monotonic(), at_start=True)

    def _survey(self: "Pool", until: float) -> None:
        """Ask every node where it stands, now, whatever the monitor leases say, and wait for
        the answers (until ``until``, at most connect_timeout): evidence of a promotion this
        process has not seen (a token from a newer timeline). At most every SURVEY_EVERY
        seconds. A node down here that answers is back (if no probe of its own is out); one
        that does not answer is no evidence against it (probes decide that), and once another
        has answered, it gets a probe's grace more (four times that answer's time, 50 ms to
        0.5 s), not the caller's whole timeout: a stalled node must not hold every read up."""
        now = monotonic()
        if now - self._surveyed_at < SURVEY_EVERY or now >= until:
            return
        self._surveyed_at = now
        eps = list(self._endpoints)
        sql = monitor.FLOOR_SQL if self._floor_ok else monitor.STATUS_SQL
        probes = [Probe(ep.config.monitor_dsn, now, self.options.connect_timeout, sql)
                  for ep in eps]
        answered = False
        while True:
            t = monotonic()
            pending = [probe for probe in probes if probe.step(t) == PENDING]
            if not pending or t >= until:
                break
            if not answered and any(probe.status == OK for probe in probes):
                answered = True
                until = min(until, t + min(PROBE_GRACE_MAX, max(PROBE_GRACE, 4 * (t - now))))
            wait_any(pending, min(until - t, 0.05))
        for ep, probe in zip(eps, probes):
            if probe.status == OK:
                if ep.state in (DOWN, REFUSED) and ep.probe is None:
                    self._readmit(ep, monotonic())
                monitor.apply_status(self, ep, monitor.status_of(probe.rows), monotonic(),
                                     probe.started)
            probe.cancel()
        if all(probe.status == OK for probe in probes):
            self._all_answered_at = now

    def _newest_timeline(self: "Pool") -> int:
        """The newest timeline any node has said it is on: a primary's, or the one a replica's
        control file names (lag.py)."""
        return max((max(ep.timeline or 0, ep.floor or 0) for ep in self._endpoints), default=0)

    def _start_probe(self: "Pool", ep: Endpoint, now: float) -> Probe:
        """A probe of a down endpoint, starting now. Whether a request should wait for it is
        decided now (Endpoint.worth_waiting); the board learns that it started, so the other
        processes do not start theirs before its backoff (one prober per outage)."""
        awaited = ep.worth_waiting(now)
        probe = self._new_probe(ep, now)
        probe.awaited = awaited
        ep.probe = probe  # first: a request that sees the next probe time move must see the probe
        ep.retry_at = ep.next_probe_after(now)  # if it never answers: what a failure would give
        self._share_probe(ep, now)
        return probe

    def _probe_unanswered(self: "Pool", ep: Endpoint, now: float) -> None:
        """A suspect endpoint's probe has not answered within its grace. A server that is fine
        (one slow statement ran past its deadline) answers a login well within it, so this one
        is treated as down from now on, here and, through the board, everywhere: requests fail
        fast instead of each process waiting the grace in turn. The probe goes on to its verdict."""
        with self._lock:
            if not ep.suspect or ep.state is not DOWN:
                return
            ep.suspect = False
            ep.saw_failure(now, False)
            ep.stop_keeping()  # (its sessions kept meanwhile: retire_idle closes them)
        self._share(ep)

    def _new_probe(self: "Pool", ep: Endpoint, now: float) -> Probe:
        """A probe that also asks where the server stands (its role, its position), so an
        endpoint comes back with both known. Declared roles probe with the role's own DSN: a
        declared primary that is a standby fails its probe (target_session_attrs)."""
        dsn = ep.config.monitor_dsn if self._discover else ep.dsn
        return Probe(dsn, now, self.options.connect_timeout,
                     monitor.STATUS_SQL if self._monitoring else None)

    def _probe_finished(self: "Pool", ep: Endpoint, probe: Probe, now: float, at_start: bool = False) -> None:
        """Apply a finished probe's verdict to its endpoint."""
        error = self._redact(probe.error or "probe failed")
        if probe.status == OK:
            ep.logged_in(probe.waited)  # the time someone actually waited on it
            if ep.state in (DOWN, REFUSED):
                self._readmit(ep, now)
            else:
                self._share(ep)  # a probe's result always wins over what the board says
            monitor.apply_status(self, ep, monitor.status_of(probe.rows), now, probe.started)
        elif probe.status == "refused":
            self._refuse(ep, error)
        elif at_start or ep.state is UP:
            self._eject(ep, f"unreachable{' at start' if at_start else ''}: {error}",
                        fast=ep.at_once(probe.silence))
        else:
            with self._lock:
                ep.probe_failed(now, error, fast=ep.at_once(probe.silence))
                self._serve_waiters()  # waiters given probe grace learn the verdict now
            self._share(ep)

    # -- errors -------------------------------------------------------------------------------

    def _unavailable(self: "Pool", readonly: bool) -> EndpointUnavailable:
        """Lock held. The error for a request no endpoint can serve, with every endpoint's state."""
        self._wake_housekeeper()
        now = monotonic()
        ep = self._primary
        if ep is None:
            states = "; ".join(e.describe(now) for e in self._endpoints)
            if not readonly or not self._replicas:
                return EndpointUnavailable(f"no primary among the candidates (none is up and out "
                                           f"of recovery; still looking) [{states}]")
            why = "the deadline passed as the connections tried failed" if self._readable \
                else "no replica is up"
            return EndpointUnavailable(f"cannot serve reads: {why}, and there is no primary "
                                       f"[{states}]")
        if not readonly:
            if ep.state is REFUSED:
                return EndpointRefused(
                    f"primary {ep.name} refused the connection (check the user, password, "
                    f"database and pg_hba.conf): {ep.last_error}", ep.name)
            if ep.state is UP:  # the checkout's time ran out as the connections tried failed
                return EndpointUnavailable(
                    f"cannot write: the deadline passed as the connections tried to primary "
                    f"{ep.name} failed, though it is up "
                    f"[{'; '.join(e.describe(now) for e in self._endpoints)}]", ep.name)
            return EndpointUnavailable(
                f"primary {ep.name} is down (for {now - ep.down_since:.1f}s; next probe in "
                f"{max(0.0, ep.retry_at - now):.1f}s); last error: {ep.last_error}", ep.name)
        if not self._replicas:
            why = f"the primary is {ep.state} and there are no replicas"
        elif self._readable or ep.state is UP and self.options.read_fallback:  # the checkout's
            why = "the deadline passed as the connections tried failed"  # time ran out
        elif ep.state is UP:
            why = "no replica is up and read_fallback is off"
        else:
            why = f"no replica is up and the primary is {ep.state}"
        states = "; ".join(e.describe(now) for e in self._endpoints)
        cls = EndpointRefused if all(e.state is REFUSED for e in self._endpoints
                                     if e is not ep or self.options.read_fallback) else EndpointUnavailable
        return cls(f"cannot serve reads: {why} [{states}]")

    def _deadline_spent(self: "Pool", what: str, count: bool = True) -> NoReturn:
        """The checkout's deadline passed while it was ``what`` (a ping, a connect): too soon to
        be evidence against the server, so no ejection, only PoolTimeout. ``count``: a checkout
        timed out (not so for a min_size connect, which the request only hosted)."""
        with self._lock:
            self._timeouts += count
            raise self._timeout_error(False, None,
                                      head=f"the checkout's deadline passed while {what}")

    def _timeout_error(self: "Pool", readonly: bool, waited: float | None,
                       head: str | None = None) -> PoolTimeout:
        """Lock held. Exhaustion (or what ``head`` says ran out), with the pool's state so the
        reader can tell why."""
        now = monotonic()
        kind = "read" if readonly else "write"
        if head is None and waited is None:
            head = (f"no {kind} connection free in process mode: all connections are in use by "
                    f"this process, and nothing else could return one (a leak, or a nested "
                    f"checkout beyond max_size={self.options.max_size}?)")
        elif head is None:
            head = f"no {kind} connection became free within {waited:.2f}s"
        states = "; ".join(e.describe(now) for e in self._endpoints)
        return PoolTimeout(f"{head} [mode={self.options.mode} waiting={self._waiting_count()}; {states}]")

