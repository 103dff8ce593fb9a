"""The pool's side of the shared health board (board.py): what it puts there, what it takes.

Mixed into Pool. ``_share(ep)`` writes an endpoint's state after evidence (a failed connect or
probe, a refusal, a deadline passed, a successful probe); ``_sync_board()`` runs when the board's
counter differs from the last one seen (the check is on the checkout path: a read from the
mapping, no system call) and applies what other processes found:

- down or refused there, up here: taken out here too (its connections invalidated), with the
  board's next probe time: this process will not probe while another holds the lease;
- up there, down here: taken back here, with no I/O at all;
- up on both sides but with a newer outage counter: an outage this process never saw (it had no
  request meanwhile): its pooled sessions are from before it, and are dropped;
- role, timeline and lag, as measured by whichever process holds the monitor lease.

A down entry nobody refreshed for ``board.EXPIRY`` is ignored, so a stale file cannot keep a
server down.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from . import board as boards
from . import lag, roles
from .config import REPLICA
from .endpoint import DOWN, REFUSED, UP

if TYPE_CHECKING:
    from .core import Pool
    from .endpoint import Endpoint

log = logging.getLogger("pool")


class Sharing:
    """Mixed into Pool: no-ops when the pool has no board."""

    _board: "boards.Board | None" = None
    _board_seen = -1

    def _open_board(self: "Pool") -> None:
        wanted = self.options.shared_state
        if wanted is None:
            wanted = self.options.mode == "process"
        board = boards.Board.open("default" if wanted is True else wanted) if wanted else None
        self._board = board
        self._board_seq = board.seq_view if board is not None else (0,)
        self._board_seen = 0 if board is None else -1
        for ep in self._endpoints:
            ep.board_slot = board.slot_for(ep.config.identity) if board is not None else None
            if board is not None:  # outages before this pool had sessions are none of its own
                entry = board.read(ep.board_slot)
                ep.board_epoch = entry.epoch if entry is not None else 0

    def _sync_board(self: "Pool") -> None:
        """Apply what other processes put on the board since this process last looked."""
        board = self._board
        if board is None:
            return
        self._board_seen = board.seq_view[0]  # before reading: a change meanwhile syncs again
        if self._apply_board(self._endpoints, boards.monotonic()):
            self._publish()  # the host-wide view must not show what this process saw before

    def _apply_board(self: "Pool", endpoints: list, now: float) -> bool:
        """Apply what the board says of ``endpoints`` that this process has not applied yet (a
        sequence number it has not seen); True if an endpoint's state changed. Read under the
        lock, so two threads syncing at once cannot apply an older entry after a newer one."""
        board = self._board
        said: list[tuple[Any, ...]] = []
        doomed: list[Any] = []
        with self._lock:
            before = [ep.state for ep in self._endpoints]
            # The primary first: its new position is judged against the replicas' answers
            # applied before (lag.check_diverged), not the ones the same round wrote after it
            for ep in sorted(endpoints, key=lambda e: e is not self._primary):
                entry = board.read(ep.board_slot)
                if entry is None or entry.seq == ep.board_seq:
                    continue
                ep.board_seq = entry.seq
                doomed += self._adopt_locked(ep, entry, now, said)
            self._state_changed_locked()
            changed = before != [ep.state for ep in self._endpoints]
        for rec in doomed:
            rec.close()
        for level, *args in said:
            log.log(level, *args)
        return changed

    def _adopt_locked(self: "Pool", ep: "Endpoint", entry: "boards.Entry", now: float,
                      said: list) -> list:
        """Lock held. One endpoint's board entry, applied; returns connections to close."""
        doomed: list[Any] = []
        was_down = ep.state in (DOWN, REFUSED)
        state = boards.STATES.get(entry.state)
        if state is None or not entry.fresh(now):
            state = None  # no information (never written, or a leftover nobody refreshed)
        suspect = state == DOWN and bool(entry.flags & boards.SUSPECT)
        if state in (DOWN, REFUSED) and ep.state not in (DOWN, REFUSED):
            ep.state = state
            ep.keeping = suspect  # a missed deadline there: maybe one slow query (endpoint.py)
            if not suspect:
                ep.generation += 1
            ep.down_since = now - max(0.0, entry.updated - entry.changed)
            ep.ejections += 1
            doomed = self._drop_stale_locked(ep)
            said.append((logging.INFO, "%s %s is %s (found by another process): %s",
                         ep.role, ep.name, state, entry.error))
        elif state == UP and ep.state in (DOWN, REFUSED):
            if ep.probe is not None:
                ep.probe.cancel()
                ep.probe = None
                self._end_probe(ep)
            ep.mark_up()
            said.append((logging.INFO, "%s %s is back (found by another process)", ep.role, ep.name))
        elif state == UP and entry.epoch != ep.board_epoch:
            ep.to_verify()  # an outage (or a suspicion) this process slept through: its sessions
            #                 predate it, and are pinged before they are lent
        if state in (DOWN, REFUSED):
            if not suspect:  # confirmed there: the sessions kept here are stale too
                ep.stop_keeping()  # (retire_idle closes them)
            fast = bool(entry.flags & boards.FAILED_FAST)
            if (not was_down or entry.failures != ep.failures or ep.suspect and not suspect) \
                    and not fast:
                # News of a slow failure (a new outage, one more failed probe, a suspicion that
                # a probe confirmed): not a probe that merely started, which writes its next
                # time too, and is no evidence at all; nor one that failed at once, which makes
                # the next probe no less worth a wait (Endpoint.saw_failure).
                ep.seen_down_at = max(ep.seen_down_at, min(entry.updated, now))
                if not suspect and ep.probe is not None:
                    ep.probe.awaited = False  # confirmed just now: no request waits for ours
            ep.failed_fast = fast
            ep.failures = entry.failures
            # Suspect there (a statement past its deadline, maybe one slow query): a request
            # here probes at once and gives its probe the grace (even while another process
            # probes too: that probe's verdict may come too late for it); confirmed there:
            # requests fail fast until the next probe is due.
            ep.suspect = suspect
            # (5 s at most: never trust an absurd time)
            ep.retry_at = now if suspect else min(max(entry.retry_at, now), now + 5.0)
            if entry.error:
                ep.last_error = entry.error
        ep.board_epoch = entry.epoch
        if not entry.recovery or entry.asked <= ep.status_at:
            # No status there, or none asked after what this process has applied: an answer
            # from before a promotion must not undo what a later one here said (Pool._survey)
            return doomed
        ep.status_at = entry.asked
        said += roles.observe(self, ep, entry.recovery == 1, entry.timeline or None)  # (declared
        #                                                          roles: only its timeline)
        if now - entry.lag_at < boards.STATUS_FRESH and ep.monitor is None:
            if entry.recovery == 2 and ep is self._primary:
                # Its position: the replicas' lag is measured against it, and their answers from
                # before it was asked judged by it (lag.py), here too
                if entry.replay:
                    lag.primary_answered(self, ep, entry.lag_at, entry.replay)
                    said += lag.check_diverged(self, ep, entry.asked, entry.replay)
                return doomed
            ep.replay_lsn = entry.replay or None
            ep.lag_s = None if math.isnan(entry.lag_s) else entry.lag_s
            ep.lag_bytes = entry.lag_bytes
            max_lag = self.options.max_lag
            ep.lagging = max_lag is not None and ep.lag_s is not None and ep.lag_s > max_lag
            if entry.recovery == 1 and entry.reach and ep.role == REPLICA:
                lag.replica_answered(ep, entry.asked, entry.lag_at, entry.reach,
                                     entry.floor or None)
        return doomed

    def _share(self: "Pool", ep: "Endpoint") -> None:
        """Put an endpoint's state on the board: the evidence this process has just seen."""
        board = self._board
        if board is None:
            return
        code = boards.state_code(ep.state)
        if code == boards.NONE:
            return
        entry = board.read(ep.board_slot)
        if entry is not None and entry.state == code == boards.UP:
            return  # nothing new to tell
        fields: dict[str, Any] = dict(state=code, retry_at=ep.retry_at, failures=ep.failures,
                                      flags=(boards.SUSPECT if ep.suspect else 0)
                                      | (boards.FAILED_FAST if ep.failed_fast else 0),
                                      error=ep.last_error or "")
        if entry is None or entry.state != code:  # None: a slot of its own yet to be (re)claimed
            fields["changed"] = boards.monotonic()
            if code != boards.UP:
                fields["epoch"] = ((entry.epoch if entry is not None else 0) + 1) & 0xFFFFFFFF
        ep.board_seq = board.write(ep.board_slot, **fields)
        ep.board_epoch = fields.get("epoch", ep.board_epoch if entry is None else entry.epoch)

    def _share_probe(self: "Pool", ep: "Endpoint", now: float) -> None:
        """A probe of an endpoint the board has down starts here: the next is due only after the
        backoff a failure would give, so the other processes neither start one meanwhile nor
        wait for this one (they cannot see it). If it never answers (a stalled server, or this
        worker gets no request to step it), whoever comes after that time probes."""
        board = self._board
        if board is None:
            return
        entry = board.read(ep.board_slot)
        if entry is None or entry.state not in (boards.DOWN, boards.REFUSED) or not entry.fresh(now):
            return  # down here only (a lost session): nobody else is waiting on it
        ep.board_seq = board.write(ep.board_slot, retry_at=ep.retry_at)

    def _adopt_at_start(self: "Pool", ep: "Endpoint", now: float) -> bool:
        """A new pool (a worker just started) takes an endpoint's state from the board rather
        than probing it, when the board's news is fresh: down or refused as another process
        found it, or up as a monitor saw it less than ``board.STATUS_FRESH`` ago (with its role,
        when roles are discovered). True if taken. An up entry without a recent monitor round is
        not taken: nothing refreshes "up", so it says when the server came back, not that it
        still is."""
        board = self._board
        if board is None:
            return False
        entry = board.read(ep.board_slot)
        if entry is None or not entry.fresh(now):
            return False
        if entry.state == boards.UP:
            seen = entry.lag_at and now - entry.lag_at < boards.STATUS_FRESH
            if not seen or self._discover and not entry.recovery:
                return False
        elif entry.state not in (boards.DOWN, boards.REFUSED):
            return False
        self._apply_board([ep], now)
        return True

    def _share_status(self: "Pool", ep: "Endpoint", answer: tuple, asked: float) -> None:
        """Role, timeline, position and lag as this process's monitor measured them, with
        when it asked and when it had the answer: what another process needs to order them
        after its own (monitor.apply_status) and to judge the replicas (lag.check_diverged)."""
        board = self._board
        if board is None:
            return
        in_recovery, lsn, timeline, reach, floor = answer
        primary = not in_recovery and ep is self._primary and lsn is not None
        lag_s = math.nan if ep.lag_s is None else ep.lag_s
        ep.board_seq = board.write(ep.board_slot, recovery=1 if in_recovery else 2,
                                   timeline=timeline or 0,
                                   replay=(lsn if primary else ep.replay_lsn) or 0,
                                   reach=reach or 0, lag_s=lag_s, lag_bytes=ep.lag_bytes or 0,
                                   lag_at=boards.monotonic(), asked=asked, floor=floor or 0)

    def _may_probe(self: "Pool", ep: "Endpoint") -> bool:
        """Only the holder of an endpoint's probe lease probes it (one prober per outage)."""
        board = self._board
        if board is None:
            return True
        return board.try_lease(ep.board_slot, id(self))

    def _probe_abandoned(self: "Pool", ep: "Endpoint", now: float) -> bool:
        """Has the lease holder stopped attending its probe? One that died has lost the lease
        (the kernel frees it); one alive but stopped, frozen or starved keeps it, so its probe
        counts as abandoned once the board's next-probe time plus connect_timeout has passed
        without a word from it (an attended probe has answered by then, and its verdict moved
        that time). Whoever comes next then probes without the lease, and puts its own start
        on the board (so the others wait for that one)."""
        board = self._board
        entry = board.read(ep.board_slot) if board is not None else None
        return entry is not None and now >= entry.retry_at + self.options.connect_timeout

    def _end_probe(self: "Pool", ep: "Endpoint") -> None:
        board = self._board
        if board is not None:
            board.release_lease(ep.board_slot, id(self))

    def _may_monitor(self: "Pool", ep: "Endpoint", now: float) -> bool:
        board = self._board
        if board is None:
            return True
        return board.take_monitor(ep.board_slot, now)

    def _publish(self: "Pool") -> None:
        """This pool's summary, for Pool.stats(scope="host") in any process."""
        board = self._board
        if board is None or self._closed:
            return
        s = self.stats(scope="process", housekeep=False)
        board.publish(id(self), {
            "mode": s["mode"], "checkouts": s["checkouts"], "size": s["size"],
            "in_use": s["in_use"], "waiting": s["waiting"],
            "endpoints": [{k: e[k] for k in ("name", "role", "state", "size", "in_use",
                                             "checkouts", "ejections", "lag_s", "last_error")}
                          for e in s["endpoints"]]})

    def _host_stats(self: "Pool", mine: dict) -> dict:
        """Every process's view of the servers, merged: who sees each endpoint up or not."""
        board = self._board
        workers = []
        if board is not None:
            for proc in board.processes():
                for summary in proc.get("pools", []):
                    names = {e["name"] for e in summary["endpoints"]}
                    if names & {e["name"] for e in mine["endpoints"]}:
                        workers.append({"pid": proc["pid"], "age": proc.get("age"), **summary})
        if not any(w["pid"] == mine["pid"] for w in workers):
            workers.append({"pid": mine["pid"], "mode": mine["mode"], "endpoints": mine["endpoints"]})
        merged = []
        for ep in mine["endpoints"]:
            seen = [e for w in workers for e in w["endpoints"] if e["name"] == ep["name"]]
            merged.append({
                "name": ep["name"], "role": ep["role"], "state": ep["state"],
                "workers_up": sum(e["state"] in ("up", "lagging", "diverged") for e in seen),
                "workers_down": sum(e["state"] in ("down", "refused") for e in seen),
                "states": sorted({e["state"] for e in seen}),
                "checkouts": sum(e.get("checkouts", 0) for e in seen),
            })
        return {"scope": "host", "shared_state": board is not None,
                "board": board.path if board is not None else None,
                "processes": len({w["pid"] for w in workers}), "workers": workers,
                "endpoints": merged}
