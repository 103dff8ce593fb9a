"""A name server that stalls must not hold the pool (pool/resolve.py): real PostgreSQL, and a
real name server (dnsmasq) SIGSTOPped, as an overloaded cluster DNS or a firewall dropping its
packets would leave it.

libpq looks a host name up with getaddrinfo() before its connect_timeout counts, and the C
library waits 5 s an attempt, twice. Each test runs its pool in a child process with a mount
namespace of its own, where /etc/resolv.conf names a dnsmasq on 127.0.0.77 that answers for
db.pooltest (tests/nameserver.py); the machine's resolver is never touched. Needs root (unshare,
mount) and dnsmasq (CI installs dnsmasq-base). The bounds only prove "no hang", not a latency target.
"""

from __future__ import annotations

import pytest

from conftest import require
from nameserver import NAME, missing, name_server, run_scenario

pytestmark = [pytest.mark.db, pytest.mark.timeout(180)]

DNS_ADDRESS, REFUSED_ADDRESS = "127.0.0.77", "127.0.0.76"  # (make bench-failures: .75 and .74)


@pytest.fixture(scope="module")
def nameserver():
    why = missing()
    if why:
        require(why)
    with name_server(DNS_ADDRESS, REFUSED_ADDRESS) as ns:
        yield ns


def test_a_stalled_name_server_holds_no_pool_start_and_no_write(nameserver, db, mode):
    """The name server stalls before the pool ever had an answer. The pool's start (its first
    probe) and the first write each waited the C library's 10 s; now a start waits a probe's
    connect_timeout at most, the write fails as fast as for a server that is down, naming the
    lookup, and the pool writes again once the name server answers."""
    r = run_scenario(nameserver, db, "first_lookup_stalled", mode)
    assert r["built_s"] < 2.0, str(r)
    assert r["write_s"] < 2.0 and "EndpointUnavailable" in (r["write_error"] or ""), str(r)
    assert r["state"] == "down" and f'could not translate host name "{NAME}"' in r["last_error"], str(r)
    assert r["lookups"] <= 2, str(r)  # a thread a second on the silent name server, not one an attempt
    assert 0 <= r["back_s"] < 15, str(r)


def test_a_stalled_name_server_falls_back_on_the_last_answer(nameserver, db, mode):
    """The name server stalls after the pool had an answer. A new connection
    waited 10 s for the lookup, and so did a new pool's start; now each waits STALE_AFTER and
    takes the last answer, as a resolver serves stale data when its upstream is down."""
    r = run_scenario(nameserver, db, "later_lookup_stalled", mode)
    assert r["connect_error"] is None and r["connect_s"] < 1.0, str(r)
    assert r["built_error"] is None and r["built_s"] < 1.0 and r["state"] == "up", str(r)
    assert len(r["warnings"]) == 1 and "127.0.0.1" in r["warnings"][0], str(r)  # said once a stall


def test_a_name_server_that_stalls_or_fails_costs_no_request_its_answer_would_not(nameserver, db,
                                                                                 mode):
    """Found by a red-team run, each with the name server stalled after an answer: a checkout
    with 0.08 s left spent it on the lookup and ejected a healthy primary; a statement past its
    deadline on a healthy primary failed the next write and dropped every session kept (the
    probe counted the lookup's wait as the server's silence); a checkout with timeout=1.95
    against a stalled server was held 2.10 s (the lookup's wait came on top of libpq's whole
    seconds); and with the name server failing outright (a temporary failure), every write
    failed although the last answer was good."""
    r = run_scenario(nameserver, db, "name_server_failing", mode)
    assert r["short_error"] is None and r["short_s"] < 0.5, str(r)
    assert (r["alarm_error"] or "").startswith("QueryTimeout") and r["after_alarm_error"] is None, \
        str(r)
    assert r["idle_after"] >= r["idle_before"] - 1, str(r)  # only the session cut off is gone
    assert r["held_error"] is not None and r["held_s"] < 1.95 + 0.1, str(r)
    assert r["failing_error"] is None, str(r)
    assert r["ejections"] == r["ejections_before"], str(r)


def test_a_false_alarm_during_a_name_server_stall_costs_no_write_and_no_session(nameserver, db,
                                                                                 mode):
    """Found by a red-team run: with the name server stalled, the probe that clears a suspicion
    (a statement past its deadline on a healthy primary) counted its wait for the lookup as the
    server's silence, and a process-mode request gave up on it a grace after it started. The
    next write failed and every session kept was dropped."""
    r = run_scenario(nameserver, db, "false_alarm_stalled", mode)
    assert (r["slow_error"] or "").startswith("QueryTimeout"), str(r)
    assert r["write_error"] is None and r["state"] == "up", str(r)
    assert r["idle"] >= 3, str(r)  # the sessions kept through the suspicion


def test_a_host_gone_just_after_its_lookup_fails_fast_as_with_libpq(nameserver, db, mode):
    """A container killed just after the pool looked its name up: the address black-holes and
    Docker's name server says there is no such name. Reusing an answer for a second (as an early
    version of resolve.py did) sent the next connect into the black hole for connect_timeout
    (found by make loadtest-outage: a fresh worker paid 2 s after the primary was killed); libpq,
    asking on each connect, failed at once, and so must the pool."""
    r = run_scenario(nameserver, db, "name_gone", mode)
    assert r["state"] == "up", str(r)
    assert r["write_s"] < 1.0 and "EndpointUnavailable" in (r["write_error"] or ""), str(r)
    assert "could not translate host name" in r["write_error"], str(r)


def test_a_query_lost_on_the_way_holds_the_name_no_longer_than_a_second(nameserver, db, mode):
    """Found by a red-team run: a lookup whose query was lost waits for the resolver's
    retransmit (5 s), and every attempt joined it and took the last answer meanwhile, though the
    name server was back and answering otherwise (the name had moved: 64 writes failed). A
    lookup unanswered for ASK_AGAIN (1 s) is joined no more: the next attempt asks anew."""
    r = run_scenario(nameserver, db, "lost_query", mode)
    assert 0 <= r["gone_s"] < 2.5, str(r)


def test_a_name_with_two_addresses_gets_connect_timeout_for_the_whole_attempt(nameserver, db,
                                                                            mode):
    """libpq applies connect_timeout to each address in turn, and the pool hands it every
    address the name has: with both of two addresses black-holed, the first write took twice
    connect_timeout=2, 4.0 s, 1.0 s past its timeout=3 (found by a red-team run). The whole
    attempt is bounded by connect_timeout now."""
    r = run_scenario(nameserver, db, "two_addresses", mode)
    assert r["addresses"] == ["127.0.0.1", "127.0.0.2"] and r["state"] == "up", str(r)
    assert "EndpointUnavailable" in (r["write_error"] or ""), str(r)
    assert r["write_s"] < 2.0 + 0.1, str(r)
