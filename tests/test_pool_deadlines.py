"""Deadlines everywhere, and no false alarms, against real servers.

A server that stalls (every process SIGSTOPped: its kernel still ACKs, so keepalives never fire)
or an address that black-holes (the test proxy) must never hang a caller; a terminated session,
a NOTIFY, a SQL error in configure() or a refused login must never be taken for an outage. Both
modes run every test where the mode matters. The bounds here only prove "no hang" and "no
ejection": the latency targets are measured by `make bench-failures`, not by a timed unit test.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import signal
import threading
import time
import types

import psycopg2
import psycopg2.extensions
import psycopg2.extras
import pytest

import pool
from pool.connection import client_port
from pgutil import (admin_sql, node_of, proxied, stalled, terminate_app_sessions,
                    terminate_under_queue, timed, unique_name, wait_until)
from conftest import APP_PASSWORD
from proxy import Proxy

pytestmark = [pytest.mark.db, pytest.mark.timeout(120)]

READ = "SELECT inet_server_port()"
INSERT = "INSERT INTO items (name) VALUES (%s) RETURNING id"


def state(p, name_or_index):
    eps = p.stats()["endpoints"]
    ep = eps[name_or_index] if isinstance(name_or_index, int) else \
        next(e for e in eps if e["name"] == name_or_index)
    return ep["state"]


# -- never hang ---------------------------------------------------------------------------------

def test_a_stalled_replica_costs_no_failed_read_and_comes_back_after_sigcont(make_pool, db):
    """fetchone(readonly=True) on a pooled connection to a stalled replica used to block forever.
    Now the statement ends at query_timeout, the read is retried on the other replica, the
    stalled one is ejected, and a probe with its own deadline takes it back after SIGCONT."""
    p = make_pool(query_timeout=1.0, connect_timeout=0.5)
    for _ in range(6):  # pooled, idle connections to both replicas
        p.fetchone(READ, readonly=True)
    stalled_name = p.stats()["endpoints"][1]["name"]
    latencies = []
    with stalled(db, "replica1"):
        for _ in range(12):
            seconds, row, error = timed(lambda: p.fetchone(READ, readonly=True))
            assert error is None, f"a read failed while replica1 was stalled: {error!r}"
            assert node_of(db, p.last_endpoint) == "replica2"
            latencies.append(seconds)
        assert state(p, stalled_name) == "down"
        assert p.stats()["endpoints"][1]["query_timeouts"] == 1
    assert max(latencies) < 1.0 + 2.0  # one read waited query_timeout; none waited forever
    assert sorted(latencies)[-2] < 0.5  # ...and only one
    wait_until(lambda: state(p, stalled_name) == "up", timeout=10, interval=0.05,
               what="the stalled replica re-admitted after SIGCONT")


def test_a_ping_to_a_stalled_primary_is_bounded_by_the_checkout_timeout(make_pool, db):
    """connection(timeout=1) used to block forever in the pool's own SELECT 1 (a connection
    idle past ping_after), whatever timeout said, even with no query_timeout at all."""
    p = make_pool(query_timeout=None, ping_after=0.2, connect_timeout=5, replicas=())
    with p.connection() as conn:
        conn.cursor().execute("SELECT 1")
    time.sleep(0.3)  # idle past ping_after: the next checkout pings
    with stalled(db, "primary"):
        seconds, _, error = timed(lambda: p.connection(timeout=1.0).__enter__())
        assert isinstance(error, pool.EndpointUnavailable), error
        assert seconds < 1.0 + 1.5
        assert state(p, 0) == "down"  # a ping that timed out ejects
        assert "ping" in p.stats()["endpoints"][0]["last_error"]


def test_a_read_out_of_time_after_a_failed_connect_says_what_happened(make_pool, db):
    """timeout=0.3 and a connect to a stalled replica (no connection open to it), which gets
    those 0.3 s of connect_timeout's 0.5: the read is out of time. The error said "no replica is
    up and read_fallback is off" while replica2 and the primary were up and read_fallback was
    on."""
    p = make_pool(connect_timeout=0.5, timeout=0.3)  # a fresh pool's first read: replica1
    with stalled(db, "replica1"):
        _, _, error = timed(lambda: p.fetchone(READ, readonly=True))
    assert isinstance(error, pool.EndpointUnavailable), error
    assert "read_fallback is off" not in str(error) and "no replica is up" not in str(error)
    assert "deadline" in str(error), error
    assert re.search(r"no answer within 0\.(2\d|3)s", str(error)), error  # (not 0.5)


def test_a_write_out_of_time_with_the_primary_up_does_not_say_it_is_down(make_pool, db):
    """A write whose deadline passed as the connections tried failed (kept sessions that a
    firewall forgot, say) while the primary was up: the error said "primary ... is down (for
    0.1s ...)", with the time since some earlier outage."""
    p = make_pool(replicas=())
    p.fetchone("SELECT 1")
    with p._lock:
        error = p._unavailable(False)
    assert "is down" not in str(error) and "deadline passed" in str(error), error
    assert f"[primary {p.stats()['endpoints'][0]['name']} up " in str(error), error

def test_a_write_to_a_stalled_primary_fails_at_query_timeout_then_fast(make_pool, db):
    p = make_pool(query_timeout=1.0, connect_timeout=0.5)
    p.fetchone("SELECT 1")
    with stalled(db, "primary"):
        seconds, _, error = timed(lambda: p.fetchone(INSERT, (unique_name(),)))
        assert isinstance(error, pool.QueryTimeout), error
        assert "may or may not have been applied" in str(error)
        assert seconds < 1.0 + 1.5
        for i in range(3):  # the first may wait the probe grace (the deadline may have been a
            # false alarm: one slow statement), which a stalled server spends in full; the
            # next ones wait for nothing
            seconds, _, error = timed(lambda: p.execute(INSERT, (unique_name(),)))
            assert isinstance(error, pool.EndpointUnavailable), error
            assert seconds < (pool.endpoint.PROBE_GRACE_MAX + 0.1 if i == 0 else 0.045), (i, seconds)
            if i == 0:  # that grace passed unanswered: down from now on, on the board too, so
                # no other worker waits it again (the server's silence spends the grace, whoever
                # steps the probe; threaded: the housekeeper's next step says so)
                wait_until(lambda: not p._endpoints[0].suspect, timeout=0.1, interval=0.005,
                           what="the unanswered probe's verdict")
        assert p.fetchone(READ, readonly=True) is not None  # reads carry on
    wait_until(lambda: timed(lambda: p.fetchone("SELECT 1"))[2] is None, timeout=10,
               interval=0.05, what="writes after SIGCONT")


def test_a_connection_opened_as_the_idle_watchdog_leaves_is_still_watched(make_pool, db,
                                                                           monkeypatch):
    """The watchdog thread ends after IDLE_EXIT with nothing to watch, and the pool used to
    call on it before connecting: a thread that looked during the connect (here a slow
    configure()) found nothing, left, and the connection it was called for ran unwatched, so a
    statement on a stalled server blocked until SIGCONT. Now the pool calls after adopting the
    connection, and a leaving thread looks once more under the lock."""
    monkeypatch.setattr(pool.watchdog, "IDLE_EXIT", 0.05)
    gc.collect()  # pools of earlier tests, so that their connections stop holding a thread
    wait_until(lambda: "pool-watchdog" not in [t.name for t in threading.enumerate()],
               timeout=5, interval=0.02, what="an idle watchdog to leave")
    p = make_pool(replicas=[], query_timeout=1.0, min_size=0,
                  configure=lambda raw: time.sleep(0.3))  # six ticks with nothing to watch
    assert p.fetchone("SELECT 1") == (1,)
    outcome = []
    with stalled(db, "primary"):
        worker = threading.Thread(target=lambda: outcome.append(timed(lambda: p.fetchone(READ))))
        worker.start()
        worker.join(1.0 + 2.0)
        assert outcome, "a statement on the stalled primary outlived query_timeout by 2 s"
    seconds, _, error = outcome[0]
    assert isinstance(error, pool.QueryTimeout), error
    worker.join(5)


def bounded(fn, limit):
    """fn() in a thread: its (seconds, result, error), or an assertion error if it is still
    blocked after ``limit`` seconds (the caller's finally resumes the server, and it returns)."""
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(timed(fn)), daemon=True)
    worker.start()
    worker.join(limit)
    assert outcome, f"still blocked after {limit:g} s on a stalled server"
    return outcome[0]


# Every round trip a loan can make, each with the server stalled just before it. ``stall()``
# stops the node (once); a ``configure`` entry is the configure= hook, the others a call on the
# pool. Each must end within query_timeout, with a pool error naming the endpoint (or the
# caller's own exception), the endpoint ejected, and the pool usable after SIGCONT.
INS = "INSERT INTO items (name) VALUES ('stalled')"


def _named_fetch(conn, stall):
    cur = conn.cursor("stalled")
    cur.execute("SELECT generate_series(1, 10)")
    stall()
    cur.fetchone()


def _large_object(then, *how):  # a large object written, rewound, then the server stalls
    def step(conn, stall):
        lo = conn.lobject(0, "rwb", *how)
        assert not how or isinstance(lo, how[-1])  # the caller's own class, armed
        lo.write(b"x" * 100)
        lo.seek(0)
        stall()
        then(lo)
    return step


def _block(*steps, **loan):
    def work(p, stall):
        with p.connection(**loan) as conn:
            for step in steps:
                step(conn, stall)
    return work


run = lambda sql: lambda conn, stall: conn.cursor().execute(sql)  # noqa: E731
stop = lambda conn, stall: stall()  # noqa: E731


class Mine(Exception):
    pass


def _raise_mine(conn, stall):
    raise Mine("the caller's own")


def _prime_then(work):  # a connection pooled first, so the stall meets the loan, not a connect
    def both(p, stall):
        p.fetchone("SELECT 1")
        return work(p, stall)
    return both


class MyLobject(psycopg2.extensions.lobject):
    pass


class CheckingCursor(psycopg2.extensions.cursor):
    """A cursor whose execute makes another timed call first (that inner call used to end the
    timing, and the statement then ran with no deadline)."""

    def execute(self, query, params=None):
        self.connection.set_client_encoding("UTF8")  # already so: no round trip
        return super().execute(query, params)


STALLS = {
    # configure= hooks: statements and the psycopg2 calls that wait for the server
    "configure: statement": {"configure": lambda raw, stall: (stall(), run("SELECT 1")(raw, stall))},
    "configure: set_client_encoding": {"configure": lambda raw, stall: (
        stall(), raw.set_client_encoding("LATIN1"))},
    "configure: set_isolation_level in a transaction": {"configure": lambda raw, stall: (
        run("SELECT 1")(raw, stall), stall(), raw.set_isolation_level(2))},
    "configure: named cursor fetch": {"configure": lambda raw, stall: _named_fetch(raw, stall)},
    "configure: reset()": {"configure": lambda raw, stall: (stall(), raw.reset())},
    "configure: left a transaction open (the pool's COMMIT)": {"configure": lambda raw, stall: (
        run("SET work_mem = '8MB'")(raw, stall), stall())},
    "baseline read after configure": {"configure": lambda raw, stall: stall()},
    # in a block
    "block: set_client_encoding": {"work": _block(stop, lambda c, s: c.set_client_encoding("LATIN1"))},
    "block: named cursor fetch": {"work": _block(_named_fetch)},
    "commit": {"work": _block(run(INS), stop)},
    "rollback after the caller's exception": {"work": _block(run(INS), stop, _raise_mine)},
    "COMMIT of a BEGIN psycopg2 never saw": {"work": _block(
        lambda c, s: setattr(c, "autocommit", True), run("BEGIN"), run(INS), stop)},
    "block: tpc_begin (sends BEGIN)": {"work": _block(
        stop, lambda c, s: c.tpc_begin(c.xid(1, "stalled", "q")))},
    "block: cursor(None, None), a positional default factory": {"work": _block(
        stop, lambda c, s: c.cursor(None, None).execute("SELECT 1"))},
    "block: large object read": {"work": _block(_large_object(lambda lo: lo.read()))},
    "block: large object write": {"work": _block(_large_object(lambda lo: lo.write(b"y")))},
    "block: large object of a class of one's own, given positionally": {"work": _block(
        _large_object(lambda lo: lo.read(), 0, None, MyLobject))},
    "block: a cursor subclass's execute making another timed call": {"work": _block(
        stop, lambda c, s: c.cursor(cursor_factory=CheckingCursor).execute("SELECT 1"))},
    # the pool's own statements
    "session reset": {"work": _block(run("SET work_mem = '8MB'"), lambda c, s: c.commit(), stop)},
    "session reset after autocommit": {"work": _block(
        lambda c, s: setattr(c, "autocommit", True), run("SELECT 1"), stop)},
    "client encoding restore": {"work": _block(lambda c, s: c.set_client_encoding("LATIN1"), stop)},
    "client encoding restore, block without deadline": {"work": _block(
        lambda c, s: c.set_client_encoding("LATIN1"), stop, query_timeout=None)},
    "read-only SET on the primary": {"work": _prime_then(lambda p, stall: (
        stall(), _block(run("SELECT 1"), readonly=True)(p, stall)))},
    "read-only SET, block without deadline": {"work": _prime_then(lambda p, stall: (
        stall(), _block(readonly=True, query_timeout=None)(p, stall)))},
    "read-only write check on the primary": {"work": _block(run("SELECT 1"), stop, readonly=True)},
    "reset= hook (reset_session=False)": {
        "work": _block(run(INS), lambda c, s: c.commit(), stop),
        "options": {"reset_session": False, "reset": lambda raw: raw.cursor().execute("SELECT 1")}},
    "ping": {"work": _prime_then(lambda p, stall: (time.sleep(0.3), stall(), p.fetchone("SELECT 1"))),
             "options": {"ping_after": 0.2, "check_after": 0.05}},
}


@pytest.mark.parametrize("case", list(STALLS))
def test_every_round_trip_a_loan_makes_is_bounded(make_pool, db, case):
    """Found by a red-team run: configure()'s and the block's psycopg2 calls other than
    execute/commit (the encoding, the isolation level, a named cursor's fetch, reset()), the
    pool's own statements (the session reset, the read-only SET and write check, the encoding
    restore), and those same statements under a block's query_timeout=None, blocked until
    SIGCONT; a commit, rollback or reset= hook that timed out raised QueryTimeout without
    ejecting the endpoint, or hid the caller's exception; the pool's own COMMIT and write check
    raised a raw psycopg2 error."""
    spec = STALLS[case]
    stalled_now = []

    def stall():
        if not stalled_now:
            stalled_now.append(db.stall("primary"))

    options = dict(spec.get("options", {}))
    if "configure" in spec:
        hook = spec["configure"]
        options["configure"] = lambda raw: hook(raw, stall)
        work = lambda p: p.fetchone("SELECT 1")  # noqa: E731
    else:
        work = lambda p: spec["work"](p, stall)  # noqa: E731
    p = make_pool(replicas=[], query_timeout=1.0, connect_timeout=0.5, **options)
    name = p.stats()["endpoints"][0]["name"]
    try:
        seconds, _, error = bounded(lambda: work(p), 1.0 + 2.0)
    finally:
        db.resume("primary")
    assert stalled_now, "the scenario never stalled the server: it proved nothing"
    assert seconds < 1.0 + 0.5, seconds
    if case.startswith("rollback after"):
        assert isinstance(error, Mine), error  # a failed rollback never hides the caller's error
    elif error is not None:
        assert isinstance(error, pool.EndpointUnavailable) and name in str(error), repr(error)
        assert APP_PASSWORD not in str(error)
    ep = p.stats()["endpoints"][0]
    assert ep["ejections"] >= 1, ep
    assert ep["query_timeouts"] >= 1 or case == "ping", ep  # a failed ping is not a statement
    wait_until(lambda: timed(lambda: p.fetchone("SELECT 1"))[2] is None, timeout=10,
               interval=0.05, what="writes after SIGCONT")


def test_statements_in_a_block_get_the_deadline_unless_the_block_opts_out(make_pool, db):
    p = make_pool(query_timeout=0.5, replicas=())
    with pytest.raises(pool.QueryTimeout, match="query_timeout=0.5s"):
        with p.connection() as conn:
            conn.cursor().execute("SELECT pg_sleep(3)")
    assert p.stats()["endpoints"][0]["discards"] == 1  # the connection that hit it is gone
    with p.connection(query_timeout=None) as conn:  # a long report opts out
        cur = conn.cursor()
        cur.execute("SELECT pg_sleep(1.0), 42")
        assert cur.fetchone()[1] == 42
    with p.connection(query_timeout=5) as conn:  # ...or takes a longer deadline
        conn.cursor().execute("SELECT pg_sleep(0.8)")
    with pytest.raises(pool.QueryTimeout):  # and the override ended with its block
        with p.connection() as conn:
            conn.cursor().execute("SELECT pg_sleep(3)")


def test_the_deadline_covers_cursor_factories_and_commit(make_pool, db):
    import psycopg2.extras
    p = make_pool(query_timeout=0.5, replicas=())
    with pytest.raises(pool.QueryTimeout):
        with p.connection() as conn:
            cur = conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor)
            assert isinstance(cur, psycopg2.extras.RealDictCursor)
            cur.execute("SELECT pg_sleep(3)")


def test_a_sub_second_connect_timeout_is_honoured_against_a_black_hole(db, mode):
    """libpq counts connect_timeout in whole seconds (before libpq 17, at least 2): 0.5 meant 2 s
    against an address that black-holes. The pool now keeps the deadline itself."""
    proxy = Proxy(db.port("primary"))
    p = pool.Pool(proxied(db, "primary", proxy), mode=mode, connect_timeout=0.5)
    try:
        assert state(p, 0) == "up"  # nothing pooled yet: the first write has to connect
        proxy.blackhole()
        seconds, _, error = timed(lambda: p.fetchone("SELECT 1"))
        assert isinstance(error, pool.EndpointUnavailable), error
        assert seconds < 0.5 + 0.5
        proxy.forward()
        wait_until(lambda: timed(lambda: p.fetchone("SELECT 1"))[2] is None, timeout=10,
                   interval=0.05, what="writes after the black hole cleared")
    finally:
        p.close()
        proxy.close()


# -- no false alarms ----------------------------------------------------------------------------

def test_a_statement_after_a_wait_for_a_slot_is_not_timed_from_the_wait(pool_factory):
    """fetchone & co time their statement from the checkout (last_used), which was stamped
    before the caller waited in line (or connected, or ran configure()): a 0.3 s statement
    after a 1.5 s wait was killed at query_timeout=1, and the healthy primary ejected."""
    p = pool_factory(replicas=(), mode="threaded", max_size=1, query_timeout=1.0, timeout=5)
    with p.connection():
        waiter = threading.Thread(target=lambda: outcome.append(
            timed(lambda: p.fetchone("SELECT pg_sleep(0.3), 1"))))
        outcome = []
        waiter.start()
        time.sleep(1.5)
    waiter.join(5)
    assert outcome and outcome[0][2] is None, outcome
    assert p.stats()["query_timeouts"] == 0 and p.stats()["ejections"] == 0


def test_a_statement_after_a_slow_configure_is_not_timed_from_the_connect(make_pool):
    p = make_pool(replicas=(), query_timeout=1.0, configure=lambda raw: time.sleep(1.3))
    assert p.fetchone("SELECT pg_sleep(0.3), 1")[1] == 1
    assert p.stats()["query_timeouts"] == 0


def _sessions(p, n):
    """The server process ids of n sessions to the primary, lent at once."""
    with contextlib.ExitStack() as stack:
        conns = [stack.enter_context(p.connection()) for _ in range(n)]
        return {conn.info.backend_pid for conn in conns}


def _running(db, sql):
    return admin_sql(db, "primary", "SELECT count(*) FROM pg_stat_activity WHERE query = %s "
                                    "AND state = 'active'", (sql,))[0][0]


def test_a_slow_statement_past_its_deadline_costs_no_other_session_and_is_cancelled(make_pool, db):
    """One slow query on a healthy primary (a report past its block's query_timeout) is not an
    outage. It used to close every idle session to the primary (here and, through the board, in
    every worker), and the statement, cut off on our side only, ran on to its end on the server.
    Now the endpoint is suspect while its probe decides, keeps its sessions, and the server is
    asked to cancel the statement."""
    p = make_pool(replicas=(), query_timeout=5)
    before = _sessions(p, 4)
    slow = "SELECT pg_sleep(60) -- cut off"
    for _ in range(2):  # a second one too: sessions not pinged since the first stay kept
        with pytest.raises(pool.QueryTimeout):
            with p.connection(query_timeout=0.5) as conn:
                conn.cursor().execute(slow)
        wait_until(lambda: p.fetchone("SELECT 1") and _running(db, slow) == 0, timeout=10,
                   interval=0.02, what="the statement cut off cancelled on the server")
    after = _sessions(p, 4)
    assert len(before & after) == 2, (before, after)  # only the two cut off were replaced
    assert state(p, 0) == "up" and p.stats()["query_timeouts"] == 2


def test_a_kept_session_the_server_ended_meanwhile_costs_only_itself(make_pool, db):
    """A session kept through a suspicion that the server ended meanwhile (an administrator,
    idle_session_timeout) says so at once: it goes, and the others kept with it are still
    pinged, not presumed lost with it."""
    p = make_pool(replicas=(), query_timeout=5)
    with contextlib.ExitStack() as stack:
        lent = [stack.enter_context(p.connection()).info.backend_pid for _ in range(4)]
    # returned in reverse: lent[0] is lent next, then lent[1]
    slow = "SELECT pg_sleep(60) -- cut off, then one kept session ended"
    with pytest.raises(pool.QueryTimeout):
        with p.connection(query_timeout=0.5) as conn:
            assert conn.info.backend_pid == lent[0]
            conn.cursor().execute(slow)
    admin_sql(db, "primary", "SELECT pg_terminate_backend(%s)", (lent[1],))
    wait_until(lambda: admin_sql(db, "primary", "SELECT count(*) FROM pg_stat_activity "
                                 "WHERE pid = %s", (lent[1],))[0][0] == 0, timeout=5)
    assert p.fetchone("SELECT 1") == (1,)
    assert _sessions(p, 4) & set(lent) == set(lent[2:])


def test_process_mode_cancels_what_was_cut_off_within_the_request_that_finds_the_server_fine(db):
    """A process-mode worker stepped the cancel request's login once per request: with
    requests further apart than the server's authentication_timeout, the server closed the
    login half done and the statement ran on (found by a red-team run). The request that
    re-admits the server gives the cancel request a probe's grace to finish."""
    p = pool.Pool(db.dsn("primary"), mode="process", query_timeout=0.5)
    slow = "SELECT pg_sleep(60) -- cut off, then one request"
    try:
        with pytest.raises(pool.QueryTimeout):
            p.fetchone(slow)
        assert p.fetchone("SELECT 1") == (1,)  # the only request after it
        wait_until(lambda: _running(db, slow) == 0, timeout=2, what="the statement cancelled")
    finally:
        p.close()


def _as_cut_off(raw, opened_at, port=None):
    """What Endpoint.cut_off reads off a connection the watchdog cut off, for raw's session."""
    return types.SimpleNamespace(backend_pid=raw.info.backend_pid, opened_at=opened_at,
                                 client_port=client_port(raw) if port is None else port)


def test_a_cancel_spares_a_session_on_another_port_behind_a_pooler(db, mode):
    """Behind a pooler such as pgbouncer, the process id libpq reports is not a server process
    of ours alone (a fake one, or a server connection other clients share): the cancel would
    hit someone else's statement of the same role. It also needs the server to see our port.
    Here another session's process id is registered as cut off, with a port not its own."""
    p = pool.Pool(db.dsn("primary"), mode=mode, query_timeout=5)
    outcome = []
    innocent = psycopg2.connect(db.dsn("primary"))
    try:
        runner = threading.Thread(target=lambda: outcome.append(
            timed(lambda: innocent.cursor().execute("SELECT pg_sleep(2)"))[2]))
        runner.start()
        wait_until(lambda: _running(db, "SELECT pg_sleep(2)") == 1, timeout=5)
        ep = p._endpoints[0]
        port = client_port(innocent)
        with p._lock:
            ep.cut_off(_as_cut_off(innocent, time.monotonic(), port=port + 1), time.monotonic())
        p._wake_housekeeper()
        wait_until(lambda: p.fetchone("SELECT 1") and not ep.orphans, timeout=5,
                   interval=0.01, what="the cancel request done")
        runner.join(5)
        assert outcome == [None], outcome  # not "canceling statement due to user request"
    finally:
        innocent.close()
        p.close()


def test_a_cancel_sent_requests_later_spares_a_session_younger_than_the_one_cut_off(db):
    """The cancel request skips a server process that started after our connection opened (a
    process id the server gave to another session since). A process-mode worker logs in for it
    on requests, maybe seconds apart; the ages in its statement were reckoned when the login
    started, so an idle spell widened the guard by its length, and a red-team run had an
    innocent session's statement cancelled on a reused process id. They are reckoned when the
    statement is sent. Here the innocent session is registered as the one cut off, directly."""
    p = pool.Pool(db.dsn("primary"), mode="process", query_timeout=5)
    outcome = []
    try:
        p.fetchone("SELECT 1")  # a pooled session for the requests below
        opened = time.monotonic()  # "our connection to it opened" here
        time.sleep(0.3)
        innocent = psycopg2.connect(db.dsn("primary"))  # ...and it started after that
        runner = threading.Thread(target=lambda: outcome.append(
            timed(lambda: innocent.cursor().execute("SELECT pg_sleep(5)"))[2]))
        runner.start()
        wait_until(lambda: _running(db, "SELECT pg_sleep(5)") == 1, timeout=5)
        ep = p._endpoints[0]
        ep.cut_off(_as_cut_off(innocent, opened), time.monotonic())
        postmaster = db.pid("primary")
        os.kill(postmaster, signal.SIGSTOP)  # logins wait (sessions open work): the cancel
        try:                                 # request's cannot finish in the request that starts it
            p._wake_housekeeper()
            p.fetchone("SELECT 1")
            assert ep.errand is not None
            time.sleep(1.5)  # no request for a while
        finally:
            os.kill(postmaster, signal.SIGCONT)
        wait_until(lambda: p.fetchone("SELECT 1") and ep.errand is None, timeout=5,
                   interval=0.01, what="the cancel request done")
        runner.join(8)
        assert outcome == [None], outcome  # not "canceling statement due to user request"
        innocent.close()
    finally:
        p.close()


def test_a_pool_closed_right_after_a_timeout_still_cancels_the_statement(make_pool, db):
    """A worker that exits right after a timeout (gunicorn recycling it) closed its pool with
    the cancel request not yet sent, and the statement ran on to its end (found by a red-team
    run). close() sends it, waiting a probe's grace at most."""
    p = make_pool(replicas=(), query_timeout=0.5)
    slow = "SELECT pg_sleep(60) -- cut off, then the pool closed"
    with pytest.raises(pool.QueryTimeout):
        p.fetchone(slow)
    seconds, _, error = timed(p.close)
    assert error is None and seconds < pool.endpoint.PROBE_GRACE_MAX + 0.2, (seconds, error)
    wait_until(lambda: _running(db, slow) == 0, timeout=2, what="the statement cancelled")


def test_a_statement_cut_off_before_a_fork_is_cancelled_by_a_child(db):
    """gunicorn --preload: a process-mode pool that forks after a statement was cut off. The
    children dropped the parent's cancel requests, and the parent (the master) never serves
    another request, so the statement ran on to its end on the server."""
    p = pool.Pool(db.dsn("primary"), mode="process", query_timeout=0.5)
    slow = "SELECT pg_sleep(60) -- cut off before a fork"
    try:
        with pytest.raises(pool.QueryTimeout):
            p.fetchone(slow)
        child = os.fork()
        if child == 0:
            try:
                end = time.monotonic() + 5
                while time.monotonic() < end and p._endpoints[0].orphans:
                    p.fetchone("SELECT 1")
                    time.sleep(0.01)
            finally:
                os._exit(0)
        os.waitpid(child, 0)
        wait_until(lambda: _running(db, slow) == 0, timeout=2, what="the statement cancelled")
    finally:
        p.close()


def test_a_stall_confirmed_closes_the_sessions_kept_while_it_was_only_suspect(make_pool, db):
    """The other side of keeping sessions through a suspicion: once the probe's grace passes
    unanswered (a stalled server, not a slow query), they are as stale as after any outage."""
    p = make_pool(replicas=(), query_timeout=0.5)
    _sessions(p, 3)
    with stalled(db, "primary"):
        with pytest.raises(pool.QueryTimeout):
            p.fetchone("SELECT 1")
        # (process mode steps the probe on requests: these fail fast meanwhile)
        wait_until(lambda: timed(lambda: p.fetchone("SELECT 1")) and
                   p.stats()["endpoints"][0]["idle"] == 0, timeout=10, interval=0.05,
                   what="the sessions kept while suspect closed")
        assert state(p, 0) == "down"
    wait_until(lambda: timed(lambda: p.fetchone("SELECT 1"))[2] is None, timeout=10,
               interval=0.05, what="writes after SIGCONT")


def test_sessions_kept_through_a_suspicion_are_pinged_before_they_are_lent(db, mode):
    """A firewall or NAT that forgot its flows: the pooled sessions go silent while new logins
    work. The first write pays query_timeout; the probe then answers on a new connection, and
    the sessions kept through the suspicion used to be lent as they were: each cost a caller
    a QueryTimeout (4 of 6 writes failed; 1 before sessions were kept, found by a red-team
    run). Each is now pinged within a probe's grace before it is lent: the first silent one
    drops them all."""
    proxy = Proxy(db.port("primary"))
    p = pool.Pool(proxied(db, "primary", proxy), mode=mode, query_timeout=1, connect_timeout=0.5)
    try:
        _sessions(p, 4)
        proxy.lose_flows()
        errors = [timed(lambda: p.fetchone("SELECT 1"))[2] for _ in range(6)]
        assert isinstance(errors[0], pool.QueryTimeout), errors
        assert errors[1:] == [None] * 5, errors
        assert state(p, 0) == "up"
    finally:
        p.close()
        proxy.close()


def test_a_ping_that_spends_connect_timeout_is_evidence_even_when_logins_are_slow(db, mode):
    """A ping was counted as cut short by the caller when its budget was under a probe's grace,
    which grows with the logins seen (four of them, up to 0.5 s): with connect_timeout below
    that, no ping ever counted, and every caller with time to spare got a PoolTimeout saying its
    deadline had passed (found by a red-team run, logins slowed by a proxy)."""
    p = pool.Pool(db.dsn("primary"), mode=mode, connect_timeout=0.3, ping_after=0.2, timeout=10)
    try:
        p.fetchone("SELECT 1")
        p._endpoints[0].login_s = 0.2  # logins seen to take 0.2 s: a grace of 0.5 s
        time.sleep(0.3)
        with stalled(db, "primary"):
            seconds, _, error = timed(lambda: p.fetchone("SELECT 1"))
            assert isinstance(error, pool.EndpointUnavailable) \
                and not isinstance(error, pool.PoolTimeout), error
            assert p.stats()["ejections"] == 1
    finally:
        p.close()


def test_a_ping_cut_short_by_the_callers_deadline_is_no_outage(db, mode):
    """A ping gets what is left of the caller's timeout, at most connect_timeout. A few
    milliseconds of it are evidence of nothing: a slow answer on a busy server used to eject it
    (and put it on the board) when the caller's timeout was that short. The caller gets a
    PoolTimeout; the endpoint stays up. A ping that had at least a probe's grace (the time a
    login on a server that is fine takes) still ejects."""
    proxy = Proxy(db.port("primary"))
    p = pool.Pool(proxied(db, "primary", proxy), mode=mode, connect_timeout=1, ping_after=0.2)
    try:
        p.fetchone("SELECT 1")
        time.sleep(0.3)  # idle past ping_after: the next checkout pings it
        proxy.freeze()  # a server slow to answer, for as long as the caller can wait
        with pytest.raises(pool.PoolTimeout, match="pinging an idle connection"):
            with p.connection(timeout=0.03):  # (less than PROBE_GRACE)
                pass
        assert state(p, 0) == "up" and p.stats()["ejections"] == 0
        proxy.forward()
        assert p.fetchone("SELECT 1") == (1,)
        time.sleep(0.3)
        proxy.freeze()  # now with a timeout that leaves the ping all of connect_timeout
        with pytest.raises(pool.EndpointUnavailable):
            with p.connection(timeout=3):
                pass
        assert p.stats()["ejections"] == 1
    finally:
        p.close()
        proxy.close()


def test_a_round_trip_cut_short_by_the_callers_deadline_logs_no_warning(db, mode, caplog):
    """The watchdog logged a WARNING for every round trip it cut off, a ping or the read-only
    SET that a caller's short timeout bounded among them: noise for each such checkout, though
    nothing was wrong with the server. The warning is the pool's, where it judges an outage:
    one for a ping that spent the pool's own bound, none for a caller's deadline spent."""
    proxy = Proxy(db.port("primary"))
    p = pool.Pool(proxied(db, "primary", proxy), mode=mode, connect_timeout=1, ping_after=0.2)
    try:
        p.fetchone("SELECT 1")
        time.sleep(0.3)  # idle past ping_after: the next checkout pings it
        proxy.freeze()
        with caplog.at_level(logging.INFO, logger="pool"):
            for _ in range(3):
                with pytest.raises(pool.PoolTimeout, match="pinging an idle connection"):
                    with p.connection(timeout=0.03):
                        pass
                proxy.forward()
                p.fetchone("SELECT 1")  # (a new session: the one cut off is closed)
                time.sleep(0.3)
                proxy.freeze()
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert warnings == [], warnings
        cut = [r for r in caplog.records if "no answer" in r.getMessage()]
        assert len(cut) == 3, [r.getMessage() for r in caplog.records]  # (at INFO, each)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pool"):
            with pytest.raises(pool.EndpointUnavailable):
                with p.connection(timeout=3):  # the ping gets all of connect_timeout: evidence
                    pass
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 1 and "primary" in warnings[0] and "ping" in warnings[0], warnings
    finally:
        p.close()
        proxy.close()


def test_a_connect_is_bounded_by_the_checkout_timeout_too(db, mode):
    """A checkout that had to connect waited libpq's connect_timeout whatever its own timeout
    said: 3 s against a stalled server for a caller with timeout=0.5. The connect now gets what
    is left of the caller's time, at most connect_timeout, kept exactly (a precheck where
    libpq's whole seconds would overshoot it); that much unanswered is evidence."""
    p = pool.Pool(db.dsn("primary"), mode=mode, connect_timeout=3)
    try:
        assert state(p, 0) == "up" and p.stats()["size"] == 0  # the checkout has to connect
        with stalled(db, "primary"):
            seconds, _, error = timed(lambda: p.connection(timeout=0.5).__enter__())
            assert isinstance(error, pool.EndpointUnavailable) \
                and not isinstance(error, pool.PoolTimeout), error
            assert seconds < 0.5 + 0.5
            assert state(p, 0) == "down"
        wait_until(lambda: timed(lambda: p.fetchone("SELECT 1"))[2] is None, timeout=10,
                   interval=0.05, what="writes after SIGCONT")
    finally:
        p.close()


def test_a_connect_cut_short_by_the_callers_deadline_is_no_outage(db, mode):
    """A connect with a few milliseconds of the caller's time left is evidence of nothing, as a
    ping is: the caller gets a PoolTimeout and the endpoint stays up. (Before connects honoured
    the caller's timeout, this one waited connect_timeout and ejected the server.)"""
    p = pool.Pool(db.dsn("primary"), mode=mode, connect_timeout=3)
    try:
        with stalled(db, "primary"):
            seconds, _, error = timed(lambda: p.connection(timeout=0.03).__enter__())
            assert isinstance(error, pool.PoolTimeout), error  # (less than PROBE_GRACE)
            assert "while connecting to primary" in str(error), error
            assert seconds < 0.5
        assert state(p, 0) == "up" and p.stats()["ejections"] == 0
        assert p.stats()["connect_errors"] == 0 and p.stats()["timeouts"] == 1
        assert p.fetchone("SELECT 1") == (1,)
    finally:
        p.close()


def test_a_kept_sessions_ping_cut_short_by_the_callers_deadline_spares_the_others(db, mode):
    """Sessions kept through a suspicion are each pinged, within a probe's grace, before they
    are lent; the first silent one drops the rest. A ping cut short by the caller's own timeout
    counted as silent too, and dropped sessions that were fine. Now the caller gets a
    PoolTimeout, and the others stay kept for the next caller to verify."""
    proxy = Proxy(db.port("primary"))
    p = pool.Pool(proxied(db, "primary", proxy), mode=mode, query_timeout=5, connect_timeout=1)
    try:
        _sessions(p, 4)
        with pytest.raises(pool.QueryTimeout):  # (not cancelled: the server sees the proxy's port)
            with p.connection(query_timeout=0.3) as conn:
                conn.cursor().execute("SELECT pg_sleep(1)")
        with p.connection():  # re-admitted after the probe; one kept session verified
            connects = p.stats()["connects"]
            proxy.freeze()
            with pytest.raises(pool.PoolTimeout, match="kept through an outage"):
                with p.connection(timeout=0.03):  # (less than PROBE_GRACE)
                    pass
            proxy.forward()
        with p.connection(), p.connection():  # the verified one, and the last one kept
            pass
        assert p.stats()["connects"] == connects, "a session kept and fine was dropped"
        assert state(p, 0) == "up"
    finally:
        p.close()
        proxy.close()


def test_a_dict_cursor_factory_does_not_reach_the_pools_own_statements(make_pool, db):
    """The pool's statements ran on the connection's cursor_factory: with RealDictCursor from
    configure() the baseline read column names for values (every reset then failed and each
    connection was discarded), and the read-only write check saw a write in every block."""
    def configure(raw):
        raw.cursor().execute("SET work_mem = '7MB'")
        raw.cursor_factory = psycopg2.extras.RealDictCursor

    p = make_pool(replicas=(), configure=configure)
    for _ in range(3):
        with p.connection(readonly=True) as conn:  # the primary, as the read-only fallback
            cur = conn.cursor()
            cur.execute("SHOW work_mem")
            assert cur.fetchone() == {"work_mem": "7MB"}
    s = p.stats()
    assert s["connects"] == 1 and s["endpoints"][0]["discards"] == 0, s


def test_one_terminated_backend_does_not_fail_the_callers_queued_behind_it(pool_factory, db):
    """The ejection that follows a lost session used to serve "primary ... is down" to every
    waiter before the immediate probe could re-admit the primary. Waiters now get the same probe
    grace as new callers: only the statement on the terminated session fails."""
    p = pool_factory(mode="threaded", max_size=2, replicas=(), timeout=10)

    def queued() -> None:
        time.sleep(0.2)
        wait_until(lambda: p.stats()["waiting"] >= 3, timeout=5, what="callers queued")

    errors = terminate_under_queue(db, p, queued)
    unavailable = [e for e in errors if isinstance(e, pool.PoolError)]
    assert not unavailable, f"queued callers failed: {unavailable[:3]}"
    assert 1 <= len(errors) <= 5  # the terminated statements themselves, and nothing else
    assert all(isinstance(e, psycopg2.OperationalError) for e in errors)


def test_a_request_waiting_on_a_probe_sees_its_verdict_applied(pool_factory, db):
    """The housekeeper cleared the endpoint's probe before applying its verdict. A request
    waiting for that probe then saw an endpoint down with no probe to wait for and failed with
    "primary ... is down" just as the primary was being re-admitted (a loaded CI machine lost the
    race in the test above). Here the gap is held open: the verdict is applied 0.15 s after the
    probe answered, well within the probe's grace."""
    p = pool_factory(mode="threaded", max_size=2, replicas=(), timeout=5)
    p.fetchone("SELECT 1")
    ep = p._endpoints[0]
    finished = p._probe_finished
    answered = threading.Event()

    def late_verdict(*args, **kwargs):  # the housekeeper descheduled between answer and verdict
        answered.set()
        time.sleep(0.15)
        return finished(*args, **kwargs)

    p._probe_finished = late_verdict
    ep.login_s = 0.125  # a grace of about 0.5 s: the probe is young for the whole test
    with pytest.raises(psycopg2.OperationalError):
        with p.connection() as conn:
            terminate_app_sessions(db, "primary")
            conn.cursor().execute("SELECT 1")  # the lost session: ejected, probed at once
    assert state(p, 0) == "down" and ep.suspect
    assert p.fetchone("SELECT 1") == (1,)  # waits for the probe and its verdict, then writes
    assert answered.is_set()
    assert state(p, 0) == "up"


def test_a_probe_whose_prober_was_descheduled_still_gets_its_grace(pool_factory, db, monkeypatch):
    """A busy app (request threads holding the GIL, a loaded machine) can keep the housekeeping
    thread off the CPU for longer than a probe's whole grace. The grace was wall-clock time, so
    a request waiting for the probe of a false alarm (one terminated session) failed with
    "primary ... is down" although the server had answered: nobody had read the answer. The grace
    is now spent by the server's silence only (Probe.silence). Here the housekeeper stalls for
    0.2 s, four graces, right after starting the probe."""
    import pool.modes
    p = pool_factory(mode="threaded", max_size=2, replicas=(), timeout=5)
    p.fetchone("SELECT 1")
    ep = p._endpoints[0]
    real_wait_any = pool.modes.wait_any
    stalls = []

    def descheduled(probes, timeout):
        if not stalls:
            stalls.append(time.monotonic())
            time.sleep(0.2)
        return real_wait_any(probes, timeout)

    monkeypatch.setattr(pool.modes, "wait_any", descheduled)
    ep.login_s = 0.0  # the floor grace, 50 ms, whatever logins took on this machine
    with pytest.raises(psycopg2.OperationalError):
        with p.connection() as conn:
            terminate_app_sessions(db, "primary")
            conn.cursor().execute("SELECT 1")  # the lost session: ejected, probed at once
    assert p.fetchone("SELECT 1") == (1,)  # waits out the stall, not just 50 ms of it
    assert stalls, "the housekeeper never waited on the probe: the test proved nothing"
    assert state(p, 0) == "up"


def test_a_notification_on_an_idle_connection_is_not_a_disconnect(make_pool, db):
    """An idle connection that ran LISTEN becomes readable when a NOTIFY arrives; the local
    poll() check took that for a server-side close and ejected the primary."""
    p = make_pool(max_size=1, replicas=(), reset_session=False)  # keep the LISTEN across loans
    with p.connection() as conn:
        conn.autocommit = True
        conn.cursor().execute("LISTEN pool_test")
        backend = conn.get_backend_pid()
    admin_sql(db, "primary", "NOTIFY pool_test, 'hello'")
    time.sleep(0.3)  # idle past check_after: the next checkout looks at the socket
    with p.connection() as conn:
        assert conn.get_backend_pid() == backend  # lent, not discarded
    ep = p.stats()["endpoints"][0]
    assert ep["state"] == "up" and ep["ejections"] == 0 and ep["discards"] == 0
    terminate_app_sessions(db, "primary")  # ...while a real close is still caught
    time.sleep(0.3)
    assert p.fetchone("SELECT 1") == (1,)
    assert p.stats()["endpoints"][0]["discards"] == 1


def test_a_sql_error_in_configure_reaches_the_caller_and_is_not_an_outage(make_pool, db):
    """A lock_timeout, statement_timeout or recovery conflict inside configure() is an
    OperationalError; it used to eject the endpoint as "connect failed"."""
    failing = [True]

    def configure(conn):
        cur = conn.cursor()
        cur.execute("SET statement_timeout = '5ms'")
        if failing[0]:
            cur.execute("SELECT pg_sleep(0.2)")  # QueryCanceled, an OperationalError
        cur.execute("RESET statement_timeout")

    p = make_pool(configure=configure, replicas=())
    with pytest.raises(psycopg2.errors.QueryCanceled):
        p.fetchone("SELECT 1")
    ep = p.stats()["endpoints"][0]
    assert ep["state"] == "up" and ep["ejections"] == 0 and ep["size"] == 0
    failing[0] = False
    assert p.fetchone("SELECT 1") == (1,)


def test_process_mode_housekeeping_errors_never_reach_unrelated_checkouts(db, caplog):
    """A min_size refill whose configure() fails for a replica used to raise that replica's
    error into writes to a healthy primary, on every request."""
    replica_port = db.port("replica1")

    def configure(conn):
        if conn.info.port == replica_port:
            raise RuntimeError("configure() is broken for this replica")

    p = pool.Pool(db.dsn("primary"), replicas=[db.dsn("replica1")], mode="process",
                  min_size=1, configure=configure)
    try:
        with caplog.at_level(logging.ERROR, logger="pool"):
            for _ in range(20):
                assert p.fetchone("SELECT 1") == (1,)
        logged = [r for r in caplog.records if "min_size" in r.getMessage()]
        assert 1 <= len(logged) <= 2  # logged and backed off, not once per request
        assert "configure() is broken" in logged[0].getMessage()
    finally:
        p.close()


@pytest.mark.parametrize("what", ["password", "database"])
def test_a_refused_login_is_reported_as_a_refusal_not_an_outage(db, mode, what, caplog):
    """A wrong password, an unknown database or a pg_hba rejection is a configuration mistake;
    every write used to say "primary ... is down"."""
    dsn = db.dsn("primary")
    dsn = dsn.replace(f"password={db.env['APP_PASSWORD']}", "password=wrong-one") \
        if what == "password" else dsn.replace(f"dbname={db.env['APP_DB']}", "dbname=no_such_db")
    with caplog.at_level(logging.WARNING, logger="pool"):
        p = pool.Pool(dsn, mode=mode, connect_timeout=1)
        try:
            for _ in range(3):
                with pytest.raises(pool.EndpointRefused) as info:
                    p.fetchone("SELECT 1")
                assert "refused" in str(info.value) and "is down" not in str(info.value)
            assert state(p, 0) == "refused"
            time.sleep(0.8)  # a few probes' worth
            p.stats()
        finally:
            p.close()
    messages = [r.getMessage() for r in caplog.records]
    assert not any("is down" in m for m in messages), messages
    refusals = [r for r in caplog.records if r.levelno == logging.ERROR and "refused" in r.getMessage()]
    assert len(refusals) == 1, messages  # once, loudly; not a warning per probe


def test_a_refused_role_is_taken_back_once_the_server_is_fixed(db, mode):
    """Refusals keep being probed: credentials can be fixed on the server side."""
    role = f"pool_t_{mode}"
    admin_sql(db, "primary", f"DROP ROLE IF EXISTS {role}")
    admin_sql(db, "primary", f"CREATE ROLE {role} LOGIN PASSWORD 'not-yet'")
    admin_sql(db, "primary", f"GRANT CONNECT ON DATABASE {db.env['APP_DB']} TO {role}")
    dsn = db.dsn("primary").replace(f"user={db.env['APP_USER']}", f"user={role}") \
        .replace(f"password={db.env['APP_PASSWORD']}", "password=the-right-one")
    p = pool.Pool(dsn, mode=mode, connect_timeout=1)
    try:
        assert state(p, 0) == "refused"
        admin_sql(db, "primary", f"ALTER ROLE {role} PASSWORD 'the-right-one'")
        wait_until(lambda: timed(lambda: p.fetchone("SELECT 1"))[2] is None, timeout=15,
                   interval=0.2, what="taken back after the password was fixed")
        assert state(p, 0) == "up"
    finally:
        p.close()
        admin_sql(db, "primary", f"REVOKE CONNECT ON DATABASE {db.env['APP_DB']} FROM {role}")
        admin_sql(db, "primary", f"DROP ROLE IF EXISTS {role}")


# -- housekeeping that never stalls -------------------------------------------------------------

def test_probes_never_wait_behind_a_refill_stuck_in_configure(db):
    """A min_size refill that blocks (here configure() waits on a lock for as long as the test
    lasts) used to hold the single housekeeping thread, and with it every probe."""
    release = threading.Event()
    stuck_port = db.port("replica2")

    def configure(conn):  # stuck only where the pool refills in the background
        if conn.info.port == stuck_port and threading.current_thread() is not threading.main_thread():
            release.wait(60)

    p = pool.Pool(db.dsn("primary"), replicas=[db.dsn("replica1"), db.dsn("replica2")],
                  mode="threaded", min_size=1, configure=configure, connect_timeout=1)
    try:
        wait_until(lambda: p.stats()["endpoints"][1]["size"] == 1, timeout=10, what="replica1 filled")
        db.kill("replica1")
        wait_until(lambda: p.fetchone(READ, readonly=True) and state(p, 1) == "down", timeout=10,
                   interval=0.05, what="replica1 ejected")
        db.start_node("replica1")
        took = wait_until(lambda: state(p, 1) == "up", timeout=5, interval=0.05,
                          what="replica1 re-admitted while the refill is stuck")
        assert took < 5
    finally:
        release.set()
        p.close()


def test_process_mode_a_probe_left_pending_between_requests_proves_nothing(db):
    """A worker steps its probe only on checkouts, so a probe's wall-clock deadline passed while
    no request arrived, and it declared a healthy server dead: writes kept failing for seconds
    after the primary came back. A probe now fails only on evidence."""
    proxy = Proxy(db.port("primary"))
    p = pool.Pool(proxied(db, "primary", proxy), mode="process", connect_timeout=0.5)
    try:
        proxy.blackhole()
        assert isinstance(timed(lambda: p.fetchone("SELECT 1"))[2], pool.EndpointUnavailable)
        time.sleep(0.3)  # past the first backoff: the next request starts a probe...
        assert isinstance(timed(lambda: p.fetchone("SELECT 1"))[2], pool.EndpointUnavailable)
        time.sleep(1.5)  # ...which then sits pending past its deadline, with nobody waiting
        proxy.forward()  # the primary is healthy again
        seconds, row, error = timed(lambda: p.fetchone("SELECT 1"))
        assert error is None, f"the first write after the recovery failed: {error!r}"
        assert row == (1,)
    finally:
        p.close()
        proxy.close()


# -- the caller's timeout bounds what the pool does on its behalf ------------------------------

def _select_one(p, timeout):
    with p.connection(timeout=timeout) as conn:
        cur = conn.cursor()
        cur.execute("SELECT 1")
        return cur.fetchone()


def test_a_request_waiting_on_a_probe_is_held_no_longer_than_its_own_timeout(db, mode):
    """A request that finds its endpoint down with a probe running waits for the probe's
    verdict, a grace of up to PROBE_GRACE_MAX (a false alarm then costs it milliseconds, not a
    failure). That wait ignored the request's own timeout: timeout=0.05 was held the whole
    grace, 0.5 s here, against a stalled server. It now ends at the caller's deadline, with a
    PoolTimeout: the probe had not spoken yet, so "is down" would be a guess."""
    p = pool.Pool(db.dsn("primary"), mode=mode, query_timeout=0.3, connect_timeout=3)
    try:
        p.fetchone("SELECT 1")
        ep = p._endpoints[0]
        with stalled(db, "primary"):
            with pytest.raises(pool.QueryTimeout):
                p.fetchone("SELECT 1")
            ep.login_s = 0.125  # a grace of 0.5 s (the most it can be): logins seen as slow
            seconds, _, error = timed(lambda: p.connection(timeout=0.05).__enter__())
            assert isinstance(error, pool.PoolTimeout), error
            assert "waiting for the probe of primary" in str(error), error
            assert seconds < 0.05 + 0.15, seconds
            assert p.stats(housekeep=False)["timeouts"] == 1
        wait_until(lambda: timed(lambda: p.fetchone("SELECT 1"))[2] is None, timeout=10,
                   interval=0.05, what="writes after SIGCONT")
    finally:
        p.close()


def test_process_mode_a_probe_cut_short_by_short_requests_goes_on_in_the_next(db):
    """Process mode steps a probe only on requests. With requests whose timeout is shorter than
    a login (a far server), each cuts its wait for the probe short; the probe was then judged by
    the clock since it started: overdue at the next request (the suspicion confirmed, the
    sessions kept through it closed), or started afresh once older than connect_timeout, and the
    healthy server was never taken back (0 of 8 requests served, found by a red-team run). The
    time someone attended the probe counts now, so the next request finishes it."""
    proxy = Proxy(db.port("primary"))
    proxy.delay = 0.01  # logins take about 0.1 s (a grace of 0.4 s); a round trip 20 ms
    p = pool.Pool(proxied(db, "primary", proxy), mode="process", query_timeout=0.3)
    try:
        _sessions(p, 2)
        with pytest.raises(pool.QueryTimeout):  # one slow statement: suspect, sessions kept
            p.fetchone("SELECT pg_sleep(1)")
        errors = []
        for _ in range(6):
            time.sleep(0.7)
            errors.append(timed(lambda: _select_one(p, timeout=0.08))[2])
        assert isinstance(errors[0], pool.PoolTimeout), errors  # (no verdict yet: no "down")
        assert errors[1:] == [None] * 5, errors
        assert state(p, 0) == "up"
    finally:
        p.close()
        proxy.close()


def test_a_far_server_whose_logins_outlast_a_probe_grace_is_taken_back(db, mode):
    """A request waited for a probe at most 0.5 s (PROBE_GRACE_MAX), however long logins to
    its server were seen to take. A far server's login is longer, so a request that found a
    session lost failed against a server that was fine (threaded mode took it back later, in
    the background), and a process-mode worker whose requests came further apart than
    connect_timeout started its probe afresh at each one and never took a server back after
    an outage. A request now waits for a probe one and a half logins as seen there, when that
    is longer."""
    proxy = Proxy(db.port("primary"))
    proxy.delay = 0.1  # a round trip of at least 0.2 s: a login takes about 0.8 s
    p = pool.Pool(proxied(db, "primary", proxy), mode=mode, connect_timeout=2)
    try:
        p.fetchone("SELECT 1")
        login = p._endpoints[0].login_s
        assert pool.endpoint.PROBE_GRACE_MAX < login < 1.3, login
        proxy.cut()  # one session lost: the request that finds it waits for the probe
        seconds, row, error = timed(lambda: p.fetchone("SELECT 1"))
        assert error is None, error
        assert seconds < 2 * 1.5 * login + 0.5, seconds  # (the probe's wait, then a connect)
        if mode == "process":
            proxy.refuse()
            proxy.cut()  # the server gone: the session lost, new connections refused
            assert isinstance(timed(lambda: p.fetchone("SELECT 1"))[2],
                              pool.EndpointUnavailable)
            time.sleep(2.2)  # (longer than connect_timeout: the probe is left unattended)
            proxy.forward()  # back
            seconds, row, error = timed(lambda: p.fetchone("SELECT 1"))
            assert error is None, error
            assert seconds < 2 * 1.5 * login + 0.5, seconds
    finally:
        p.close()
        proxy.close()


def test_a_slow_statement_on_a_far_server_costs_no_other_session(db, mode):
    """A statement past its deadline makes its server suspect, and the other sessions are kept
    until the probe's verdict. A far server's probe (a login of 0.8 s) outlasted the 0.5 s a
    request waited for it, so the suspicion was always confirmed and every session closed.
    The probe now gets one and a half logins there."""
    proxy = Proxy(db.port("primary"))
    proxy.delay = 0.1  # a login takes about 0.8 s
    p = pool.Pool(proxied(db, "primary", proxy), mode=mode, connect_timeout=2, query_timeout=1)
    try:
        _sessions(p, 3)
        connects = p.stats()["connects"]
        with pytest.raises(pool.QueryTimeout):
            p.fetchone("SELECT pg_sleep(2)")
        assert p.fetchone("SELECT 1") == (1,)  # (waits for the probe, then a kept session)
        _sessions(p, 2)  # the two other sessions, kept
        assert p.stats()["connects"] == connects, "sessions kept through the suspicion closed"
        assert state(p, 0) == "up"
    finally:
        p.close()
        proxy.close()


def test_a_far_replica_does_not_lend_its_logins_to_a_near_primary(db, mode):
    """Each endpoint's login time starts as its start-up probe's. A finished probe went on
    counting while the others were stepped, so every endpoint started with the slowest one's
    time: a far replica made a near primary's probe wait 1.5 s, not 0.5 (found by a red-team
    run)."""
    proxy = Proxy(db.port("replica1"))
    proxy.delay = 0.1  # a login takes about 0.8 s there
    p = pool.Pool(db.dsn("primary"), replicas=[proxied(db, "replica1", proxy)], mode=mode,
                  connect_timeout=2)
    try:
        primary, replica = p._endpoints
        assert replica.login_s > pool.endpoint.PROBE_GRACE_MAX, replica.login_s
        assert primary.login_s < 0.2, primary.login_s
        assert primary.probe_wait == pool.endpoint.PROBE_GRACE_MAX
    finally:
        p.close()
        proxy.close()


def test_a_write_does_not_wait_for_a_replicas_probe(db, mode):
    """A request that found no endpoint up waited for any endpoint's probe, a replica's too,
    though only the primary can take a write: up to 0.5 s, and 1.5 logins (1.2 s) once far
    servers' probes got their logins' worth (found by a red-team run)."""
    primary, replica = Proxy(db.port("primary")), Proxy(db.port("replica1"))
    replica.delay = 0.1  # a far replica: a login takes about 0.8 s
    p = pool.Pool(proxied(db, "primary", primary), replicas=[proxied(db, "replica1", replica)],
                  mode=mode, connect_timeout=2)
    try:
        p.fetchone("SELECT 1")
        p.fetchone(READ, readonly=True)
        replica.blackhole()
        replica.cut()  # the replica's session lost, its probe into a black hole
        assert timed(lambda: p.fetchone(READ, readonly=True))[2] is None  # (on the primary)
        primary.refuse()
        primary.cut()  # the primary gone too: refused at once
        assert isinstance(timed(lambda: p.fetchone("SELECT 1"))[2], pool.EndpointUnavailable)
        assert p._endpoints[1].awaiting_probe(time.monotonic())  # (the replica's, young)
        seconds, _, error = timed(lambda: p.fetchone("SELECT 1"))
        assert isinstance(error, pool.EndpointUnavailable), error
        assert seconds < 0.25, seconds
    finally:
        p.close()
        primary.close()
        replica.close()


def test_process_mode_a_min_size_connect_is_bounded_by_the_requests_timeout(db):
    """Process mode opens min_size connections on requests, one per request, before serving it.
    That connect was bounded by connect_timeout only: with a replica stalled, a write with
    timeout=0.3 (and an idle connection to the primary waiting for it) was held 3 s. It now
    gets what is left of the request's time, and the write goes on."""
    p = pool.Pool([db.dsn("primary"), db.dsn("replica1")], mode="process", min_size=1,
                  connect_timeout=3)
    try:
        p.fetchone("SELECT 1")  # fills the primary's min_size connection, on this request
        assert [e["size"] for e in p.stats(housekeep=False)["endpoints"]] == [1, 0]
        with stalled(db, "replica1"):
            seconds, row, error = timed(lambda: _select_one(p, timeout=0.3))
            assert error is None and row == (1,), error
            assert seconds < 0.3 + 0.3, seconds
            assert state(p, 1) == "up"  # (cut short by the request: no proof; see below)
        wait_until(lambda: p.fetchone("SELECT 1") and state(p, 1) == "up"
                   and p.stats(housekeep=False)["endpoints"][1]["size"] == 1, timeout=10,
                   interval=0.05, what="the replica re-admitted and filled after SIGCONT")
    finally:
        p.close()


def test_process_mode_a_min_size_connect_cut_short_by_a_request_is_no_outage(db):
    """A min_size connect that the request's deadline cut short counted as evidence: with
    logins held up 0.6 s (the postmaster stopped; sessions work), a write with timeout=0.3 and
    an idle session ejected the healthy primary, failed, and closed its sessions (found by a
    red-team run). The request only hosts that connect: cut short, it proves nothing, and
    filling waits a second; the write is served by the idle session."""
    p = pool.Pool(db.dsn("primary"), mode="process", min_size=2, connect_timeout=3)
    try:
        p.fetchone("SELECT 1")  # fills one min_size connection; the next request the other
        postmaster = db.pid("primary")
        os.kill(postmaster, signal.SIGSTOP)
        try:
            seconds, row, error = timed(lambda: _select_one(p, timeout=0.3))
            assert error is None and row == (1,), error
            assert seconds < 0.3 + 0.2, seconds
            seconds, row, error = timed(lambda: _select_one(p, timeout=0.3))
            assert error is None and seconds < 0.1, (seconds, error)  # filling waits a second
        finally:
            os.kill(postmaster, signal.SIGCONT)
        s = p.stats(housekeep=False)
        assert state(p, 0) == "up" and s["ejections"] == 0 and s["timeouts"] == 0, s
        wait_until(lambda: p.fetchone("SELECT 1") and p.stats()["size"] == 2, timeout=5,
                   interval=0.05, what="min_size reached after SIGCONT")
    finally:
        p.close()


def test_stats_does_not_host_a_min_size_connect(db, mode):
    """Process mode runs due housekeeping on stats() too, and it ran with no deadline: with
    min_size=2 and the primary's host black-holed after the pool started, the first stats()
    hosted a min_size connect and took connect_timeout, 2.01 s (found by a red-team run; a
    health endpoint calls stats()). stats() does no blocking I/O now; the next request fills,
    within its own timeout."""
    proxy = Proxy(db.port("primary"))
    p = pool.Pool(proxied(db, "primary", proxy), replicas=[db.dsn("replica1")], mode=mode,
                  min_size=2, timeout=0.2, connect_timeout=2)
    try:
        proxy.freeze()
        for _ in range(3):
            seconds, _, error = timed(p.stats)
            assert error is None and seconds < 0.05, (seconds, error)
        proxy.forward()
        wait_until(lambda: timed(lambda: p.fetchone("SELECT 1"))[2] is None
                   and p.stats()["endpoints"][0]["size"] >= 2, timeout=10, interval=0.05,
                   what="min_size reached once the host answers")
    finally:
        p.close()
        proxy.close()


def test_process_mode_min_size_is_reached_with_timeouts_shorter_than_a_probe_grace(db):
    """With every request's timeout below a probe's grace (at least 50 ms), filling waited for
    a request with more time left: min_size was never reached, and every checkout ran the
    housekeeping again (21 us a checkout instead of 1.2, found by a red-team run). A request
    with time for two logins fills now, and one without leaves filling for a second."""
    p = pool.Pool(db.dsn("primary"), mode="process", min_size=2)
    try:
        runs = []
        housekeep = p._housekeep
        p._housekeep = lambda now: runs.append(now) or housekeep(now)
        for _ in range(2000):
            with p.connection(timeout=0.04):
                pass
        assert p.stats(housekeep=False)["size"] == 2
        assert len(runs) < 20, len(runs)
    finally:
        p.close()


def test_process_mode_a_cancel_request_left_pending_is_finished_by_the_next_request(db):
    """The request that starts a cancel request gives its login a probe's grace within the
    request's own timeout; cut short, the login was then stepped once per request, and a
    server's authentication_timeout could end it half done (the statement ran on). The next
    requests now give it the rest of the grace."""
    p = pool.Pool(db.dsn("primary"), mode="process", query_timeout=5)
    try:
        p.fetchone("SELECT 1")
        other = psycopg2.connect(db.dsn("primary"))
        ep = p._endpoints[0]
        ep.cut_off(_as_cut_off(other, time.monotonic()), time.monotonic())
        ep.login_s = 0.125  # a grace of 0.5 s
        postmaster = db.pid("primary")
        os.kill(postmaster, signal.SIGSTOP)
        try:
            p._wake_housekeeper()
            assert _select_one(p, timeout=0.05) == (1,)
            assert ep.errand is not None
        finally:
            os.kill(postmaster, signal.SIGCONT)
        time.sleep(0.1)
        p._wake_housekeeper()
        assert _select_one(p, timeout=1) == (1,)
        assert ep.errand is None and not ep.orphans, "the cancel request is still pending"
        other.close()
    finally:
        p.close()


def test_process_mode_a_cancel_requests_login_is_bounded_by_the_requests_timeout(db):
    """Process mode asks the server to cancel a statement cut off at its deadline on the next
    request that finds the server up, and gives that login a probe's grace within the request
    (it cannot wait for the next one: the server would close a login half done). The request's
    own timeout was ignored: timeout=0.05 was held 0.5 s with logins stalled. The login now
    goes on in later requests."""
    p = pool.Pool(db.dsn("primary"), mode="process", query_timeout=5)
    try:
        p.fetchone("SELECT 1")  # a pooled session for the requests below
        other = psycopg2.connect(db.dsn("primary"))
        ep = p._endpoints[0]
        ep.cut_off(_as_cut_off(other, time.monotonic()), time.monotonic())
        ep.login_s = 0.125  # a grace of 0.5 s (the most it can be)
        postmaster = db.pid("primary")
        os.kill(postmaster, signal.SIGSTOP)  # logins wait; the pooled session works
        try:
            p._wake_housekeeper()
            seconds, row, error = timed(lambda: _select_one(p, timeout=0.05))
            assert error is None and row == (1,), error
            assert ep.errand is not None, "no cancel request was started"
            assert seconds < 0.05 + 0.15, seconds
        finally:
            os.kill(postmaster, signal.SIGCONT)
        wait_until(lambda: p.fetchone("SELECT 1") and ep.errand is None, timeout=5,
                   interval=0.01, what="the cancel request done")
        other.close()
    finally:
        p.close()


def _reads_on_the_primary(p, db):
    """replica1 (p's only replica) killed and ejected, reads on the primary, and a session to it
    used just now (lent without a ping)."""
    db.kill("replica1")
    wait_until(lambda: timed(lambda: p.fetchone(READ, readonly=True))[2] is None
               and state(p, 1) == "down", timeout=10, interval=0.05,
               what="reads on the primary, the replica down")
    with p.connection() as conn:
        conn.cursor().execute("SELECT 1")


def test_a_read_after_a_token_is_held_no_longer_than_its_timeout_by_a_stalled_replica(db, mode):
    """A read after a token asks a replica its replay position inside the checkout. Against a
    stalled replica (still up in the pool's eyes) that round trip waited query_timeout, 3 s
    here (30 s by default), for a caller with timeout=0.2 (found by a red-team run)."""
    p = pool.Pool(db.dsn("primary"), replicas=[db.dsn("replica1")], mode=mode, query_timeout=3)
    try:
        def judged():  # (a replica counts once it received more since the primary was found)
            p.execute(INSERT, (unique_name(),))
            p.fetchone(READ, readonly=True)  # (process mode: the monitors advance on requests)
            return p._endpoints[1].judged

        wait_until(judged, timeout=10, interval=0.05, what="the replica judged by its monitor")
        p.execute(INSERT, (unique_name(),))
        token = p.write_token()
        with stalled(db, "replica1"):
            def read():
                with p.connection(readonly=True, timeout=0.2, after=token):
                    pass
            seconds, _, error = timed(read)
            assert seconds < 0.2 + 0.2, (seconds, error)
    finally:
        p.close()


@pytest.mark.parametrize("timeout", [0.6, 0.02])
def test_a_read_only_loan_on_the_primary_is_held_no_longer_than_its_timeout(db, mode, timeout):
    """A read that falls back to the primary makes its session read-only with a SET inside the
    checkout. Against a stalled primary (still up in the pool's eyes) that round trip waited
    query_timeout, 3 s here (30 s by default), for a caller with timeout=0.1 (found by a
    red-team run). Now the checkout's timeout bounds it: that long unanswered (0.6 s, more
    than any probe grace) ejects the primary, as for a ping; a few milliseconds (0.02 s, less
    than any) prove nothing."""
    p = pool.Pool(db.dsn("primary"), replicas=[db.dsn("replica1")], mode=mode, query_timeout=3)
    try:
        _reads_on_the_primary(p, db)
        ejections = p.stats(housekeep=False)["ejections"]  # (the replica's)
        with stalled(db, "primary"):
            def read():
                with p.connection(readonly=True, timeout=timeout):
                    pass
            seconds, _, error = timed(read)
            assert seconds < timeout + 0.2, (seconds, error)
            if timeout > pool.endpoint.PROBE_GRACE_MAX:
                assert isinstance(error, pool.EndpointUnavailable), error
                assert "read-only SET" in str(error) and state(p, 0) == "down", error
            else:
                assert isinstance(error, pool.PoolTimeout), error
                assert state(p, 0) == "up"
                assert p.stats(housekeep=False)["ejections"] == ejections
        assert p.stats(housekeep=False)["in_use"] == 0
    finally:
        p.close()


def test_process_mode_a_probe_stuck_in_a_black_hole_is_started_afresh(db):
    """A probe started into a black hole sits in TCP's backoff. Process mode steps it a little
    on every request, so it was never "unattended" and never started afresh: once the network
    was back, a worker with sparse requests took the server back only after the probe's own
    deadline crept past, a tenth of a second a request (28 s, found by a red-team run). One
    older than connect_timeout that nobody waits for any more is started afresh."""
    proxy = Proxy(db.port("primary"))
    p = pool.Pool(proxied(db, "primary", proxy), mode="process", query_timeout=1,
                  connect_timeout=1, timeout=0.1)
    try:
        p.execute("SELECT 1")
        proxy.blackhole()
        proxy.cut()  # sessions dropped, new connections black-holed
        end = time.monotonic() + 2.5
        while time.monotonic() < end:
            assert timed(lambda: p.fetchone("SELECT 1"))[2] is not None
            time.sleep(0.4)
        proxy.forward()
        errors = [timed(lambda: p.fetchone("SELECT 1"))[2]]
        time.sleep(0.4)
        errors.append(timed(lambda: p.fetchone("SELECT 1"))[2])
        assert errors[-1] is None, errors
    finally:
        p.close()
        proxy.close()


def test_a_read_only_loan_gets_what_is_left_of_the_timeout_for_its_set(db, mode):
    """The read-only SET of a read that falls back to the primary got the checkout's whole
    timeout again, after the checkout had spent part of it on a ping: with round trips of 0.4 s
    and timeout=0.6, the checkout took 0.8 s (found by a red-team run). It gets what is left."""
    proxy = Proxy(db.port("primary"))
    p = pool.Pool(proxied(db, "primary", proxy), replicas=[db.dsn("replica1")], mode=mode,
                  ping_after=0.2, query_timeout=5)
    try:
        _reads_on_the_primary(p, db)
        proxy.delay = 0.2  # a round trip of 0.4 s from here on
        time.sleep(0.3)  # idle past ping_after: the checkout pings, then the SET
        def read():
            with p.connection(readonly=True, timeout=0.6):
                pass
        seconds, _, error = timed(read)
        assert seconds < 0.6 + 0.1, (seconds, error)
        assert isinstance(error, pool.PoolError), error
        assert p.stats(housekeep=False)["in_use"] == 0
    finally:
        p.close()
        proxy.close()


class _Alarm(BaseException):
    pass


@pytest.mark.parametrize("where", ["read-only SET", "replay question"])
def test_an_interrupt_in_a_round_trip_the_deadline_cut_off_reaches_the_caller(db, mode, where):
    """A signal handler's exception (a request timeout, ^C) that lands while the pool's
    read-only SET or replay question waits on a stalled server runs when the watchdog cuts
    the call off. The pool took it for the server's silence: the caller got
    EndpointUnavailable, or, for a read after a token, a connection to the primary as if
    nothing had happened (found by a red-team run). The caller gets its own exception."""
    def alarm(signum, frame):
        raise _Alarm()

    previous = signal.signal(signal.SIGALRM, alarm)
    p = pool.Pool(db.dsn("primary"), replicas=[db.dsn("replica1")], mode=mode,
                  query_timeout=5, max_lag=None)
    try:
        if where == "read-only SET":
            _reads_on_the_primary(p, db)
            node, after, timeout = "primary", None, 0.1
        else:
            p.execute(INSERT, (unique_name(),))
            p.fetchone(READ, readonly=True)  # an idle connection to the replica
            admin_sql(db, "replica1", "SELECT pg_wal_replay_pause()")
            p.execute(INSERT, (unique_name(),))
            node, after, timeout = "replica1", p.write_token(), 0.2
        with stalled(db, node):
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            try:
                with pytest.raises(_Alarm):
                    with p.connection(readonly=True, timeout=timeout, after=after):
                        pass
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        assert p.stats(housekeep=False)["in_use"] == 0
    finally:
        signal.signal(signal.SIGALRM, previous)
        if where != "read-only SET":
            admin_sql(db, "replica1", "SELECT pg_wal_replay_resume()")
        p.close()


def test_a_session_lost_in_the_read_only_set_says_so(db, mode):
    """A read that falls back to the primary on a session the server ended a moment ago (idle
    less than check_after: not looked at) got psycopg2's raw OperationalError from the pool's
    read-only SET (found by a red-team run). It gets EndpointUnavailable, naming the primary."""
    p = pool.Pool(db.dsn("primary"), replicas=[db.dsn("replica1")], mode=mode)
    try:
        _reads_on_the_primary(p, db)
        terminate_app_sessions(db, "primary")
        with pytest.raises(pool.EndpointUnavailable, match="read-only SET"):
            with p.connection(readonly=True):
                pass
        assert p.fetchone(READ, readonly=True) is not None  # the probe takes it back
    finally:
        p.close()


def test_a_precheck_that_leaves_too_little_time_for_the_login_ends_the_checkout(db, mode):
    """A connect bounded by the caller's timeout to a fraction of a second first reaches the
    server with a precheck, then logs in for real under libpq's whole seconds. With logins of
    0.4 s and timeout=0.6 the second login overran it: 0.82 s (found by a red-team run). With
    less time left than the precheck took, the caller gets PoolTimeout at once; the server,
    which answered, stays up."""
    proxy = Proxy(db.port("primary"))
    p = pool.Pool(proxied(db, "primary", proxy), mode=mode, connect_timeout=3)
    try:
        proxy.delay = 0.05  # logins of about 0.4 s
        seconds, _, error = timed(lambda: p.connection(timeout=0.6).__enter__())
        assert isinstance(error, pool.PoolTimeout), error
        assert seconds < 0.6 + 0.1, seconds
        assert state(p, 0) == "up" and p.stats(housekeep=False)["ejections"] == 0
    finally:
        p.close()
        proxy.close()


def test_a_precheck_leaves_too_little_time_even_when_connect_timeout_is_the_bound(db, mode):
    """The same with the caller's timeout just above a sub-second connect_timeout: the guard ran
    only when the caller's time was the tighter bound, so with connect_timeout=0.6, timeout=0.7
    and logins of 0.4 s the checkout took both logins, 0.82 s (found by a red-team run). The
    caller's deadline is checked whichever bound the precheck kept."""
    proxy = Proxy(db.port("primary"))
    p = pool.Pool(proxied(db, "primary", proxy), mode=mode, connect_timeout=0.6)
    try:
        proxy.delay = 0.05  # logins of about 0.4 s
        seconds, _, error = timed(lambda: p.connection(timeout=0.7).__enter__())
        assert isinstance(error, pool.PoolTimeout), (seconds, error)
        assert seconds < 0.7 + 0.05, seconds
        assert state(p, 0) == "up" and p.stats(housekeep=False)["ejections"] == 0
    finally:
        p.close()
        proxy.close()


def test_a_new_worker_does_not_take_slow_logins_for_an_outage(db):
    """Logins got slow (0.25 s). A caller with timeout=0.1 could not connect, and the primary
    was marked down for every worker; a new worker, with no login of its own to go by, gave its
    probe the least grace, 50 ms, confirmed the outage and failed every write while the server
    was fine, for as long as it ran (found by a red-team run). A connect ended by the caller's
    time is now a suspicion, and an endpoint with no login seen gets the most grace."""
    proxy = Proxy(db.port("primary"))
    dsn = proxied(db, "primary", proxy)
    first = pool.Pool(dsn, mode="process")
    second = None
    try:
        first.fetchone("SELECT 1")
        with first.connection():  # held: the next checkout has to connect
            proxy.delay = 0.03  # logins of about 0.25 s; a probe (and its question) 0.3 s
            assert isinstance(timed(lambda: first.connection(timeout=0.1).__enter__())[2],
                              pool.PoolError)
        assert first._endpoints[0].suspect
        second = pool.Pool(dsn, mode="process")  # a new worker: what the board says
        seconds, row, error = timed(lambda: second.fetchone("SELECT 1"))
        assert error is None and row == (1,), error
    finally:
        first.close()
        if second is not None:
            second.close()
        proxy.close()
