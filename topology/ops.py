"""Promote, rejoin, follow, lag a replica and report: the same steps for both stacks.

``ReplicaSet`` holds the procedures; a stack supplies a handful of primitives (is a node
running, superuser SQL on it, stop and start it, the topology state, the conninfo one node uses
to stream from another). native/cluster.py implements them with the local server binaries,
compose/stackctl.py with `docker compose`. PostgreSQL's own tools do the work: pg_promote(),
ALTER SYSTEM + pg_reload_conf() to re-point a running replica (PostgreSQL 13+ restarts the WAL
receiver, and recovery_target_timeline = 'latest', the default, follows the new timeline), and
pg_rewind to turn a former primary (or a replica that got ahead of the new primary) into a
replica without a re-clone.

Invariants the procedures keep:

* Never two writable primaries: a switchover stops (fences) the old primary *before* the
  promotion, and a fenced node carries a rewind mark (topology/state.py), so any later start of
  it, by hand or by a restart policy, rewinds it into a replica instead of reviving a primary.
* Nothing a replica acknowledged is thrown away: before a failover promotes the chosen replica,
  it first fetches, by cascading replication from the other replica, any WAL that one received
  and it did not. With SYNC=on every acknowledged commit is on at least one replica, so the
  promoted node then has them all. A replica that is down at the promotion may hold such WAL
  too; it is fenced, and rewound when it starts.
* A replica holds no replication slots. Slots live on the primary, one per other node, named
  after the node; they are created on the promoted node just before pg_promote(), so the WAL the
  others will ask for is kept from that moment (a standby can create physical slots, and they
  survive its promotion). A rejoined node's leftover slots are dropped.
* Each step says what it does (``say``) and the long waits print progress; ``events`` records
  the moments a load test wants to mark on its timeline (promote, fenced, promoted, ...).
"""

from __future__ import annotations

import abc
import json
import sys
import time
from typing import Callable

from .state import INITIAL_PRIMARY, NODES, Topology


class OpError(RuntimeError):
    """An operation could not be carried out; the message says why and what to do."""


def lsn(text: str | None) -> int | None:
    """'16/B374D848' -> an integer byte position (None for '' or None)."""
    if not text:
        return None
    high, _, low = text.strip().partition("/")
    return (int(high, 16) << 32) + int(low, 16)


def literal(value: str) -> str:
    """A SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def event_writer(path: str | None) -> Callable[[str, float], None] | None:
    """An on_event for ReplicaSet: one {"event", "t"} JSON line per step appended to ``path``,
    flushed at once (a load test reads the file afterwards to mark the steps on its timeline).
    None without a path."""
    if not path:
        return None

    def write(name: str, at: float) -> None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"event": name, "t": round(at, 6)}) + "\n")
    return write


def sync_standby_names(node: str) -> str:
    """synchronous_standby_names for ``node`` with SYNC=on: any one of the *other* nodes. The value
    differs per node but never has to change at a promotion: whichever node is primary waits for
    one of the two others (initially 'ANY 1 (replica1, replica2)')."""
    return f"ANY 1 ({', '.join(n for n in NODES if n != node)})"


# One round trip per node: its role, then what that role can tell (psql's \gset + \if).
STATUS_SQL = r"""
SELECT pg_is_in_recovery() AS standby \gset
\if :standby
SELECT 'standby', coalesce(r.received_tli, (SELECT timeline_id FROM pg_control_checkpoint())),
       coalesce(r.sender_host, ''), coalesce(r.sender_port::text, ''), coalesce(r.status, ''),
       coalesce(pg_last_wal_receive_lsn()::text, ''), coalesce(pg_last_wal_replay_lsn()::text, ''),
       pg_get_wal_replay_pause_state(),
       coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp())::text, ''),
       current_setting('primary_conninfo')
  FROM (SELECT 1) AS one LEFT JOIN pg_stat_wal_receiver r ON true;
\else
SELECT 'primary', ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int,
       pg_current_wal_lsn(), current_setting('synchronous_standby_names');
SELECT 'sender', application_name, state, sync_state, coalesce(replay_lsn::text, '')
  FROM pg_stat_replication;
\endif
SELECT 'slot', slot_name, active FROM pg_replication_slots ORDER BY slot_name;
"""


class ReplicaSet(abc.ABC):
    """The database nodes of one stack. Subclasses implement the primitives."""

    kind = "?"
    catch_up_timeout = 30.0  # seconds promote() waits for a replica to fetch WAL from the other

    def __init__(self, say: Callable[[str], None] | None = None,
                 on_event: Callable[[str, float], None] | None = None) -> None:
        self._say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        self.on_event = on_event
        self.events: list[tuple[str, float]] = []  # (name, epoch seconds)

    def say(self, text: str) -> None:
        """Progress output; never raises (a closed pipe must not abort a promotion half-way)."""
        try:
            self._say(text)
        except (OSError, ValueError):
            pass

    # ------------------------------------------------------------------ primitives
    @abc.abstractmethod
    def running(self, node: str) -> bool: ...

    @abc.abstractmethod
    def sql(self, node: str, query: str, timeout: float = 30) -> str:
        """Superuser SQL (psql -X -A -t, ON_ERROR_STOP) in database postgres; raises OpError."""

    @abc.abstractmethod
    def stop(self, node: str) -> None:
        """A clean (fast) shutdown, so pg_rewind needs no crash recovery afterwards."""

    @abc.abstractmethod
    def start(self, node: str) -> None:
        """Start a stopped node as the topology says: the primary as itself, a replica pointed
        at the current primary, a fenced node through pg_rewind first. Returns once it accepts
        connections."""

    @abc.abstractmethod
    def topology(self) -> Topology: ...

    @abc.abstractmethod
    def set_primary(self, node: str) -> None: ...

    @abc.abstractmethod
    def set_rewind(self, node: str, needed: bool) -> None: ...

    @abc.abstractmethod
    def upstream_conninfo(self, node: str, primary: str) -> str:
        """primary_conninfo for ``node`` streaming from ``primary`` (passfile, never a password)."""

    @abc.abstractmethod
    def node_at(self, host: str, port: str) -> str | None:
        """The node a WAL receiver's sender_host/sender_port (or a conninfo's host/port) names."""

    # ------------------------------------------------------------------ small queries
    def event(self, name: str) -> None:
        at = time.time()
        self.events.append((name, at))
        if self.on_event is not None:
            self.on_event(name, at)

    def _check(self, node: str) -> None:
        if node not in NODES:
            raise OpError(f"unknown node {node!r}: use one of {', '.join(NODES)}")

    def in_recovery(self, node: str) -> bool:
        return self.sql(node, "SELECT pg_is_in_recovery()") == "t"

    def replication_states(self, primary: str) -> dict[str, str]:
        """{application_name (= the replica's node name): walsender state} on ``primary``."""
        out = self.sql(primary, "SELECT application_name, state FROM pg_stat_replication", timeout=10)
        return dict(line.split("|", 1) for line in out.splitlines() if "|" in line)

    def streams_from(self, primary: str, node: str) -> bool:
        try:
            return self.replication_states(primary).get(node) == "streaming"
        except OpError:
            return False

    def timeline(self, primary: str) -> int:
        return int(self.sql(primary, "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), "
                                     "1, 8))::bit(32)::int"))

    def fork_lsn(self, primary: str) -> int | None:
        """Where ``primary``'s current timeline branched off its parent (None on timeline 1), from
        the timeline history file the promotion wrote: '<parent tli> <switch lsn> <reason>'."""
        tli = self.timeline(primary)
        if tli <= 1:
            return None
        text = self.sql(primary, f"SELECT pg_read_file('pg_wal/{tli:08X}.history')")
        entries = [line.split() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        return lsn(entries[-1][1]) if entries else None

    def replayed(self, node: str) -> int | None:
        """How far a standby has replayed, once replay has caught up with what it received (it
        does in milliseconds; a trailing partial record, cut off when the old primary died, is
        never replayed, which is why the received position itself says nothing about divergence)."""
        deadline = time.monotonic() + 2
        while True:
            out = self.sql(node, "SELECT coalesce(pg_last_wal_replay_lsn()::text, '') || '|' || "
                                 "coalesce(pg_last_wal_receive_lsn()::text, '')")
            replay, _, receive = out.partition("|")
            if time.monotonic() > deadline or (lsn(receive) or 0) <= (lsn(replay) or 0) + 16384:
                return lsn(replay)
            time.sleep(0.05)

    def upstream(self, node: str) -> tuple[str, str]:
        """(primary_conninfo, primary_slot_name) of a running node."""
        conninfo, _, slot = self.sql(node, "SELECT current_setting('primary_conninfo') || '|' || "
                                           "current_setting('primary_slot_name')").rpartition("|")
        return conninfo, slot

    def set_upstream(self, node: str, conninfo: str, slot: str) -> None:
        """Re-point a running standby (ALTER SYSTEM + reload: its WAL receiver restarts)."""
        self.sql(node, f"ALTER SYSTEM SET primary_conninfo = {literal(conninfo)}; "
                       f"ALTER SYSTEM SET primary_slot_name = {literal(slot)}; SELECT pg_reload_conf()")

    def create_slots(self, on: str, nodes) -> None:
        """A physical slot per node on ``on`` (a primary or a standby about to be promoted),
        reserving WAL from now; existing slots are kept."""
        values = ", ".join(f"({literal(n)})" for n in nodes)
        self.sql(on, "SELECT count(pg_create_physical_replication_slot(n, true)) "
                     f"FROM (VALUES {values}) AS v(n) "
                     "WHERE NOT EXISTS (SELECT FROM pg_replication_slots WHERE slot_name = n)")

    def drop_stale_slots(self, node: str) -> None:
        """A replica holds no slots: drop what a former primary kept (they would pin its WAL)."""
        dropped = self.sql(node, "SELECT string_agg(slot_name, ' ') FROM (SELECT slot_name, "
                                 "pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                                 "WHERE NOT active) AS d")
        if dropped:
            self.say(f"{node}: dropped the slots it kept as a primary: {dropped}")

    def poll(self, probe: Callable[[], str | None], timeout: float, interval: float = 0.2) -> str | None:
        """Call ``probe`` until it returns None (done), for at most ``timeout`` seconds; until
        then it returns what is still awaited, said every 5 s. Returns None, or on timeout the
        probe's last answer."""
        t0 = last = time.monotonic()
        while (pending := probe()) is not None:
            now = time.monotonic()
            if now - t0 > timeout:
                return pending
            if now - last >= 5:
                self.say(f"  waiting for {pending} ({now - t0:.0f}s)")
                last = now
            time.sleep(interval)
        return None

    def wait_accepting(self, node: str, timeout: float = 120) -> None:
        """Until ``node`` answers SQL; progress every 5 s."""
        def probe():
            try:
                self.sql(node, "SELECT 1", timeout=10)
                return None
            except OpError as exc:
                return f"{node} to accept connections ({_first_line(exc)})"
        pending = self.poll(probe, timeout)
        if pending:
            raise OpError(f"no answer {timeout:.0f}s after the start: waited for {pending}; see its "
                          f"log (make logs SERVICE={node})")

    def wait_streaming(self, primary: str, nodes, timeout: float = 60) -> None:
        """Until each of ``nodes`` streams from ``primary``; progress every 5 s."""
        def probe():
            try:
                states = self.replication_states(primary)
            except OpError as exc:
                return f"{', '.join(nodes)} to stream ({primary} does not answer: {_first_line(exc)})"
            pending = [n for n in nodes if states.get(n) != "streaming"]
            return f"{', '.join(pending)} to stream from {primary} (it reports {states})" if pending else None
        pending = self.poll(probe, timeout)
        if pending:
            raise OpError(f"still waiting after {timeout:.0f}s for {pending}; see the log "
                          f"(make logs SERVICE=...)")

    # ------------------------------------------------------------------ procedures
    def promote(self, target: str) -> None:
        """Make ``target`` (a running replica) the primary. If the current primary is still
        running this is a switchover: it is stopped first. The other replica is re-pointed at
        the new primary; the old primary stays fenced until rejoin()."""
        self._check(target)
        t = self.topology()
        old = t.primary
        if target == old:
            raise OpError(f"{target} is already the primary")
        if target in t.rewind:
            raise OpError(f"{target} is fenced (a former primary): rejoin it first "
                          f"(make rejoin NODE={target}), then promote it")
        if not self.running(target):
            raise OpError(f"{target} is not running: start it first (make start-replica REPLICA={target})")
        if not self.in_recovery(target):
            if old in t.rewind and not self.running(old):
                # pg_promote() happened, recording it did not (the tool was interrupted): finish.
                self.say(f"{target} is already promoted and {old} fenced: finishing that promotion")
                self.event("promoted")
                self._promoted(target, old)
                return
            raise OpError(f"{target} is not in recovery although the topology says {old} is the "
                          f"primary: two primaries? Check `make replication-status`")
        switchover = self.running(old)
        upstream = self.upstream(target)  # catch_up() re-points it: put back if the promotion fails
        self.event("promote")
        self.set_rewind(old, True)  # fenced from here on: any start of it now goes through pg_rewind
        if switchover:
            self.say(f"switchover: stopping {old} first (clean shutdown, its WAL reaches the "
                     f"replicas), so that two primaries never accept writes")
            self.stop(old)
            self.event("fenced")
        else:
            self.say(f"failover: {old} is down; it stays fenced until `make rejoin NODE={old}`")
        try:
            if not switchover:  # after a clean stop every streaming replica has everything
                self.catch_up(target, [n for n in NODES if n not in (target, old)])
            self.create_slots(target, [n for n in NODES if n != target])
            self.say(f"promoting {target} (pg_promote)")
            if self.sql(target, "SELECT pg_promote(true, 60)", timeout=90) != "t":
                raise OpError(f"pg_promote() on {target} did not complete within 60 s; see its log")
            self.event("promoted")  # now: clients may find the new primary before it is recorded
        except BaseException:
            # Undo the fence: nothing was promoted, so the old primary is still the only one.
            # Best effort, step by step; if it fails, the old primary stays fenced (safe: it
            # then refuses to start as a primary, and `make promote` can be run again).
            if self.in_recovery_or_down(target):
                try:  # back on its primary and slot, so starting that primary (make up) restores it all
                    if self.upstream(target) != upstream:
                        self.set_upstream(target, *upstream)
                        self.say(f"promotion failed: {target}'s primary_conninfo and slot put back")
                except BaseException as exc:  # noqa: BLE001 - report the original error
                    self.say(f"could not put back {target}'s primary_conninfo and slot: {exc}")
                try:
                    self.set_rewind(old, False)
                    if switchover:
                        self.say(f"promotion failed: starting {old} again as the primary")
                        self.start(old)
                except BaseException as exc:  # noqa: BLE001 - report the original error
                    self.say(f"could not undo the fence of {old}: {exc}")
            raise
        self._promoted(target, old)

    def catch_up(self, target: str, others) -> None:
        """Let ``target`` stream from any running replica in ``others`` that has received more
        WAL than it (the primary is gone, so such WAL exists nowhere else), until it has it all.
        A standby can feed another (cascading replication); no slot is needed for the moment."""
        def received(node):
            # The WAL a standby has: what it received, or what it replayed if that is further.
            # After a restart, a standby reports as received the start of the WAL segment its
            # replay is in, until its WAL receiver gets WAL past the replay position: from an
            # idle or dead primary, or from a peer with nothing newer, never.
            return lsn(self.sql(node, "SELECT GREATEST(pg_last_wal_receive_lsn(), "
                                      "pg_last_wal_replay_lsn())")) or 0
        mine = received(target)
        best, best_pos = None, mine
        for node in others:
            if not self.running(node):
                continue
            try:
                pos = received(node) if self.in_recovery(node) else 0
            except OpError:
                continue  # not answering: follow() fences it
            if pos > best_pos:
                best, best_pos = node, pos
        if best is None:
            return
        self.say(f"{target} has {fmt_bytes(best_pos - mine)} less WAL than {best}: "
                 f"fetching it from {best} first (cascading replication), so that no write "
                 f"{best} acknowledged is lost")
        self.set_upstream(target, self.upstream_conninfo(target, best), "")
        t0 = time.monotonic()
        if self.poll(lambda: None if received(target) >= best_pos else f"{target} to receive "
                     f"{best}'s WAL", timeout=self.catch_up_timeout, interval=0.05):
            raise OpError(f"{target} did not get {best}'s WAL within {self.catch_up_timeout:.0f}s; "
                          f"not promoting it (promote {best} instead: make promote REPLICA={best})")
        self.say(f"{target} has everything {best} had ({time.monotonic() - t0:.1f}s)")

    def in_recovery_or_down(self, node: str) -> bool:
        try:
            return self.in_recovery(node)
        except OpError:
            return True

    def _promoted(self, target: str, old: str) -> None:
        """Record a completed pg_promote() and bring the others along."""
        self.set_primary(target)
        # pg_rewind takes the source's timeline from its control file, which a promoted node
        # updates only at its first checkpoint: without one, rewinding onto it would leave the old
        # primary unable to start ("requested timeline does not contain minimum recovery point").
        # Also drop the leftovers of its standby days (harmless, but misleading in a status).
        self.sql(target, "CHECKPOINT; ALTER SYSTEM RESET primary_conninfo; "
                         "ALTER SYSTEM RESET primary_slot_name; SELECT pg_reload_conf()", timeout=120)
        self.say(f"{target} is the primary now, timeline {self.timeline(target)}")
        for node in NODES:
            if node not in (target, old):
                self.follow(node, target)
        self.event("followed")

    def follow(self, node: str, primary: str) -> None:
        """Point a running replica at ``primary`` without restarting it; if it has WAL the new
        primary's timeline does not contain (it was ahead when the old primary died), rewind it."""
        if node in self.topology().rewind:
            return  # fenced: rejoin() deals with it
        if not self.running(node):
            # It may hold WAL that the new primary never got: fenced, it is rewound at its start.
            self.set_rewind(node, True)
            self.say(f"{node} is down: fenced, it will be rewound onto {primary}'s timeline "
                     "when it starts")
            return
        if self.streams_from(primary, node):
            return
        fork, pos = self.fork_lsn(primary), self.replayed(node)
        if fork is not None and pos is not None and pos > fork:
            self.say(f"{node} has replayed {fmt_bytes(pos - fork)} of WAL past the point where "
                     f"{primary}'s timeline began: it cannot follow as it is")
            self.rejoin(node)
            return
        self.sql(node, f"ALTER SYSTEM SET primary_conninfo = {literal(self.upstream_conninfo(node, primary))}; "
                       f"ALTER SYSTEM SET primary_slot_name = {literal(node)}; SELECT pg_reload_conf()")
        self.say(f"{node}: primary_conninfo now points at {primary} (reloaded, no restart)")
        try:
            self.wait_streaming(primary, [node], timeout=15)
        except OpError:
            # It may still refuse the new timeline ("forked off ... before current recovery
            # point"); pg_rewind settles it either way.
            self.say(f"{node} does not stream from {primary} after 15s: rewinding it")
            self.rejoin(node)
            return
        self.say(f"{node} streams from {primary}")

    def rejoin(self, node: str) -> None:
        """Bring ``node`` back as a replica of the current primary, through pg_rewind."""
        self._check(node)
        t = self.topology()
        primary = t.primary
        if node == primary:
            raise OpError(f"{node} is the primary; to make it a replica, promote another node "
                          f"(make promote REPLICA=...)")
        if not self.running(primary):
            raise OpError(f"the primary ({primary}) is not running: start it (make start-primary) or "
                          f"promote a replica (make promote REPLICA=...)")
        if node not in t.rewind and self.running(node) and self.streams_from(primary, node):
            self.say(f"{node} already streams from {primary}: nothing to do")
            return
        t0 = time.monotonic()
        self.event("rejoin")
        self.create_slots(primary, [node])
        self.set_rewind(node, True)
        if self.running(node):
            self.say(f"{node}: clean shutdown first (pg_rewind needs a stopped server)")
            self.stop(node)
        self.say(f"{node}: pg_rewind onto {primary}'s timeline, then start as its replica")
        self.start(node)
        self.wait_streaming(primary, [node], timeout=120)
        self.set_rewind(node, False)
        self.drop_stale_slots(node)
        self.event("rejoined")
        self.say(f"{node} rejoined as a replica of {primary} in {time.monotonic() - t0:.1f}s")

    def restore_initial(self) -> None:
        """Every node running, and the initial topology: `primary` the primary, both replicas
        streaming from it (a switchover back if a replica was promoted)."""
        t = self.topology()
        for node in (t.primary, *t.standbys):
            if not self.running(node) and node not in t.rewind:
                self.say(f"starting {node}")
                self.start(node)
        if t.primary != INITIAL_PRIMARY:
            self.say(f"restoring the initial topology ({INITIAL_PRIMARY} as the primary)")
            if INITIAL_PRIMARY in t.rewind:
                self.rejoin(INITIAL_PRIMARY)
            self.promote(INITIAL_PRIMARY)
        for node in sorted(self.topology().rewind):
            self.rejoin(node)
        self.wait_streaming(INITIAL_PRIMARY, self.topology().standbys)

    def lag_replica(self, replica: str, seconds: float, interval: float = 1.0,
                    catch_up_timeout: float = 120) -> None:
        """Pause WAL replay on ``replica`` for ``seconds`` (it keeps receiving, and serving reads
        of ever older data), then resume and wait until it has replayed what the primary had."""
        self._check(replica)
        primary = self.topology().primary
        if replica == primary:
            raise OpError(f"{replica} is the primary; choose a replica")
        if not self.running(replica) or not self.in_recovery(replica):
            raise OpError(f"{replica} is not a running replica (make replication-status)")
        self.sql(replica, "SELECT pg_wal_replay_pause()")
        self.event("paused")
        t0 = time.monotonic()
        self.say(f"{replica}: WAL replay paused for {seconds:g}s (pg_wal_replay_pause)")
        try:
            while (left := seconds - (time.monotonic() - t0)) > 0:
                time.sleep(min(interval, left))
                behind, age = self.lag(replica, primary)
                self.say(f"  [{time.monotonic() - t0:4.1f}/{seconds:g}s] {replica} is "
                         f"{fmt_bytes(behind)} and {_secs(age)} behind {primary}")
        finally:
            self.sql(replica, "SELECT pg_wal_replay_resume()")
            self.event("resumed")
        target = self.sql(primary, "SELECT pg_current_wal_lsn()")
        self.say(f"{replica}: replay resumed; catching up to {primary}'s {target}")
        t1 = last = time.monotonic()
        while self.sql(replica, f"SELECT pg_last_wal_replay_lsn() >= {literal(target)}::pg_lsn") != "t":
            now = time.monotonic()
            if now - t1 > catch_up_timeout:
                raise OpError(f"{replica} has not replayed up to {target} {catch_up_timeout:.0f}s after "
                              f"resuming; see its log")
            if now - last >= interval:
                behind, _ = self.lag(replica, primary)
                self.say(f"  catching up: {fmt_bytes(behind)} behind ({now - t1:.1f}s)")
                last = now
            time.sleep(0.05)
        self.event("caught_up")
        self.say(f"{replica} caught up {time.monotonic() - t1:.2f}s after resuming")

    def lag(self, replica: str, primary: str) -> tuple[int | None, float | None]:
        """(bytes, seconds) ``replica`` is behind ``primary``. Seconds are the age of the last
        replayed commit, but 0 when nothing is outstanding: on its own that age grows while the
        primary is idle, a lag that is not there."""
        out = self.sql(replica, "SELECT coalesce(pg_last_wal_replay_lsn()::text, '') || '|' || coalesce("
                                "extract(epoch FROM now() - pg_last_xact_replay_timestamp())::text, '')")
        replay, _, age = out.partition("|")
        head = lsn(self.sql(primary, "SELECT pg_current_wal_lsn()"))
        behind = None if lsn(replay) is None or head is None else max(0, head - lsn(replay))
        seconds = 0.0 if behind == 0 else (float(age) if age else None)
        return behind, seconds

    # ------------------------------------------------------------------ status
    def status(self) -> dict:
        """Every node's role, timeline, upstream and lag, plus the recorded topology."""
        t = self.topology()
        nodes: dict[str, dict] = {}
        senders: dict[str, dict] = {}
        for node in (*t.standbys, t.primary):  # standbys first: the primary's LSN is then newer
            row: dict = {"node": node, "running": self.running(node), "fenced": node in t.rewind}
            nodes[node] = row
            if not row["running"]:
                continue
            try:
                out = self.sql(node, STATUS_SQL, timeout=10)
            except OpError as exc:
                row["error"] = _first_line(exc)
                continue
            row["slots"] = []
            for line in out.splitlines():
                f = line.split("|")
                if f[0] == "standby":
                    row.update(role="replica", timeline=int(f[1]) if f[1] else None,
                               upstream=self.node_at(f[2], f[3]) if f[2] else None,
                               receiver=f[4] or "not connected", receive_lsn=f[5], replay_lsn=f[6],
                               replay=f[7], replay_age_s=float(f[8]) if f[8] else None,
                               configured_upstream=_conninfo_node(self, f[9]))
                elif f[0] == "primary":
                    row.update(role="primary", timeline=int(f[1]), current_lsn=f[2],
                               synchronous_standby_names=f[3])
                elif f[0] == "sender":
                    senders[f[1]] = {"state": f[2], "sync_state": f[3], "from": node}
                elif f[0] == "slot":
                    row["slots"].append((f[1], f[2] == "t"))
        primaries = [n for n, r in nodes.items() if r.get("role") == "primary"]
        head = lsn(nodes[t.primary].get("current_lsn")) if t.primary in primaries else None
        for node, row in nodes.items():
            if row.get("role") != "replica":
                continue
            sender = senders.get(node, {})
            row["state"] = sender.get("state") if sender.get("from") == t.primary else None
            row["sync_state"] = sender.get("sync_state")
            replay = lsn(row.get("replay_lsn"))
            row["lag_bytes"] = None if head is None or replay is None else max(0, head - replay)
            row["lag_s"] = 0.0 if row["lag_bytes"] == 0 else row.get("replay_age_s")
        return {"topology": {"primary": t.primary, "fenced": sorted(t.rewind)},
                "primaries": primaries, "nodes": [nodes[n] for n in (t.primary, *t.standbys)]}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no answer"


def _conninfo_node(rs: ReplicaSet, conninfo: str) -> str | None:
    params = dict(p.split("=", 1) for p in conninfo.split() if "=" in p)
    host = params.get("host", "").strip("'")
    return rs.node_at(host, params.get("port", "5432").strip("'")) if host else None


def _secs(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f} s"


def format_status(st: dict) -> str:
    """The table `make replication-status` prints."""
    topo = st["topology"]
    primary_row = next((r for r in st["nodes"] if r["node"] == topo["primary"]), {})
    head = f"primary: {topo['primary']}"
    if primary_row.get("role") == "primary":
        sync = primary_row.get("synchronous_standby_names") or ""
        head += (f", timeline {primary_row['timeline']}, replication "
                 + (f"synchronous ({sync})" if sync else "asynchronous"))
    elif not primary_row.get("running"):
        head += " (DOWN: `make start-primary`, or `make promote REPLICA=...` to fail over)"
    lines = [head]
    if topo["fenced"]:
        lines.append(f"fenced (former primary, must rejoin): {', '.join(topo['fenced'])}")
    if len(st["primaries"]) > 1:
        lines.append(f"WARNING: more than one node accepts writes: {', '.join(st['primaries'])}")
    lines.append(f"{'node':9} {'role':8} {'tl':>3} {'upstream':9} {'state':11} {'sync':7} "
                 f"{'lag':>10} {'lag s':>7}  replay")
    for r in st["nodes"]:
        if not r["running"]:
            what = "fenced: make rejoin NODE=" + r["node"] if r["fenced"] else "stopped"
            lines.append(f"{r['node']:9} {'-':8} {'-':>3} {'-':9} {what}")
            continue
        if "error" in r:
            lines.append(f"{r['node']:9} {'?':8} {'-':>3} {'-':9} error: {r['error'][:60]}")
            continue
        if r["role"] == "primary":
            lines.append(f"{r['node']:9} {'primary':8} {r['timeline']:>3} {'-':9} {'running':11} "
                         f"{'-':7} {'-':>10} {'-':>7}  -")
            continue
        upstream = r.get("upstream") or (f"({r['configured_upstream']})" if r.get("configured_upstream") else "-")
        state = r.get("state") or r.get("receiver") or "?"
        lines.append(f"{r['node']:9} {'replica':8} {r['timeline'] or '-':>3} {upstream:9} {state:11} "
                     f"{r.get('sync_state') or '-':7} {fmt_bytes(r.get('lag_bytes')):>10} "
                     f"{'-' if r.get('lag_s') is None else format(r['lag_s'], '.1f'):>7}  "
                     f"{'replaying' if r.get('replay') == 'not paused' else r.get('replay')}")
    slots = [f"{r['node']}: " + (", ".join(f"{s}{'' if a else ' (inactive)'}" for s, a in r["slots"]) or "none")
             for r in st["nodes"] if r.get("slots") is not None]
    if slots:
        lines.append("slots  " + "; ".join(slots))
    return "\n".join(lines)
