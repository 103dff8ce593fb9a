"""Unit tests for the pool's pure logic: configuration, backoff, state changes, balancing.

No server needed: these run in milliseconds. Behaviour that depends on PostgreSQL is tested
against real servers in test_pool_*.py.
"""

from __future__ import annotations

import collections
import socket
import time

import pytest

import pool
import pool.resolve
from pool.balance import LeastBusy, RoundRobin, make_balancer, pick_random
from pool.config import (Options, Redactor, endpoint_config, endpoint_configs,
                         options_from_env)
from pool.endpoint import (BACKOFF_CAP, BACKOFF_FIRST, BACKOFF_JITTER, DOWN, UP, Endpoint,
                           backoff_delay)

SECRET = "s3cr3t-Pa55"


@pytest.fixture
def db_free_port():
    """A loopback port nothing listens on: connections are refused at once."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# -- backoff -----------------------------------------------------------------------------------

def test_backoff_starts_small_doubles_and_is_capped():
    mid = [backoff_delay(n, 0.5) for n in range(8)]  # rand 0.5 = no jitter
    assert mid[0] == pytest.approx(BACKOFF_FIRST)
    assert mid[1] == pytest.approx(2 * BACKOFF_FIRST)
    assert mid[2] == pytest.approx(4 * BACKOFF_FIRST)
    assert mid[-1] == pytest.approx(BACKOFF_CAP)
    assert backoff_delay(10_000, 0.5) == pytest.approx(BACKOFF_CAP)  # no overflow, ever


def test_backoff_jitter_bounds_keep_readmission_under_five_seconds():
    lo, hi = backoff_delay(50, 0.0), backoff_delay(50, 0.999999)
    assert lo == pytest.approx(BACKOFF_CAP * (1 - BACKOFF_JITTER))
    assert hi == pytest.approx(BACKOFF_CAP * (1 + BACKOFF_JITTER), rel=1e-5)
    # A recovered server waits at most one capped delay, plus a probe (< 1 s on a LAN).
    assert hi + 1.0 < 5.0


# -- endpoint state ----------------------------------------------------------------------------

def _endpoint(role="replica", name="db2:5432"):
    cfg = endpoint_config((name, "host=h"), role, "test", Options())
    return Endpoint(cfg, max_size=3)


def test_a_probe_grace_is_spent_by_the_servers_silence_not_by_the_prober_being_late():
    """Probe.silence: a gap after which nothing has arrived counts in full (a stalled server
    spends the grace on time); a late step that finds the answer waiting counts PROMPT only."""
    from pool.probe import PENDING, PROMPT, Probe
    silent, answering = socket.socket(), socket.socket()
    try:
        for s in (silent, answering):
            s.bind(("127.0.0.1", 0))
            s.listen(1)
        quiet = Probe(f"host=127.0.0.1 port={silent.getsockname()[1]} dbname=x user=x", 0.0, 5.0)
        talky = Probe(f"host=127.0.0.1 port={answering.getsockname()[1]} dbname=x user=x", 0.0, 5.0)
        for probe in (quiet, talky):
            assert probe.step(0.001) == PENDING  # connected, startup sent: waits for an answer
        peer, _ = answering.accept()
        peer.sendall(b"E")  # an answer of sorts, waiting on the socket
        assert quiet.step(0.3) == PENDING and quiet.silence == pytest.approx(0.3)
        talky.step(0.3)
        assert talky.silence == pytest.approx(0.001 + PROMPT)
        peer.close()
    finally:
        silent.close()
        answering.close()


def test_mark_down_is_one_transition_that_invalidates_connections():
    ep = _endpoint()
    assert ep.state == UP and ep.generation == 0
    assert ep.mark_down(100.0, "refused") is True
    assert ep.state == DOWN and ep.generation == 1 and ep.ejections == 1
    assert 100.0 < ep.retry_at <= 100.0 + BACKOFF_FIRST * (1 + BACKOFF_JITTER)
    # A second failure while down is not a new outage: same generation, same count.
    assert ep.mark_down(100.5, "refused again") is False
    assert ep.generation == 1 and ep.ejections == 1 and ep.last_error == "refused again"


def test_failed_probes_back_off_and_success_readmits():
    ep = _endpoint()
    ep.mark_down(0.0, "down")
    delays = []
    for i in range(8):
        now = ep.retry_at
        ep.probe_failed(now, f"still down {i}")
        delays.append(ep.retry_at - now)
    assert delays[0] < delays[3] and max(delays) <= BACKOFF_CAP * (1 + BACKOFF_JITTER)
    ep.mark_up()
    assert ep.state == UP and ep.failures == 0
    assert ep.mark_down(50.0, "again") is True and ep.generation == 2


def test_describe_and_stats_carry_state_and_last_error():
    ep = _endpoint(role="primary", name="db1:5432")
    ep.mark_down(10.0, "connect failed: refused")
    text = ep.describe(11.0)
    assert "primary db1:5432 down" in text and "refused" in text and "down_for=1.0s" in text
    s = ep.stats(11.0)
    assert s["state"] == "down" and s["role"] == "primary" and s["name"] == "db1:5432"
    assert {"size", "idle", "in_use", "checkouts", "waits", "timeouts", "connect_errors",
            "ejections"} <= set(s)


# -- balancing ---------------------------------------------------------------------------------

def _replicas(n):
    return [_endpoint(name=f"r{i}:5432") for i in range(n)]


def test_round_robin_spreads_evenly():
    rr, eps = RoundRobin(), _replicas(3)
    counts = collections.Counter(rr(eps) for _ in range(300))
    assert counts == {0: 100, 1: 100, 2: 100}
    assert rr(eps[:1]) == 0  # a shrinking candidate list never indexes out of range


def test_random_covers_all_candidates():
    eps = _replicas(2)
    counts = collections.Counter(pick_random(eps) for _ in range(2000))
    assert set(counts) == {0, 1} and min(counts.values()) > 800


def test_least_busy_prefers_idle_replica_and_round_robins_ties():
    eps = _replicas(3)
    lent = []  # connections lent out: in_use = open connections - idle ones
    for ep, busy in zip(eps, (3, 1, 2)):
        for _ in range(busy):
            lent.append(_Lent())
            ep.adopt(ep.reserve(), lent[-1])
    lb = LeastBusy()
    assert {lb(eps) for _ in range(10)} == {1}
    for ep in eps:
        for key in list(ep.slots):
            ep.release(key)
    assert collections.Counter(lb(eps) for _ in range(30)) == {0: 10, 1: 10, 2: 10}


class _Lent:
    """Stands in for a lent connection: something an endpoint's slot can point at."""

    __slots__ = ("key", "__weakref__")


def test_a_slot_is_freed_exactly_once_however_its_holder_goes():
    ep = _endpoint()
    res = ep.reserve()
    assert ep.size == 1 and ep.connecting == 1
    rec = _Lent()
    ep.adopt(res, rec)
    del res  # the reservation's own reference dies: the slot now belongs to rec
    assert ep.size == 1 and ep.connecting == 0 and ep.in_use == 1
    ep.release(rec.key)
    ep.release(rec.key)  # idempotent
    assert ep.size == 0
    lost = _Lent()
    ep.adopt(ep.reserve(), lost)
    assert ep.size == 1
    del lost  # dropped on the floor (an interrupted loan): the weak reference frees the slot
    assert ep.size == 0
    ep.reserve()  # a reservation nobody kept
    assert ep.size == 0


def test_make_balancer_rejects_unknown():
    with pytest.raises(ValueError):
        make_balancer("fastest")


# -- configuration -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(max_size=0), "max_size"),
    (dict(max_size=True), "max_size"),
    (dict(min_size=5, max_size=2), "min_size"),
    (dict(mode="fibers"), "mode"),
    (dict(timeout=0), "timeout"),
    (dict(timeout=float("nan")), "timeout"),
    (dict(connect_timeout=-1), "connect_timeout"),
    (dict(check_after=-0.1), "check_after"),
    (dict(balance="fastest"), "balance"),
    (dict(read_fallback="yes"), "read_fallback"),
    (dict(max_waiting=-1), "max_waiting"),
    (dict(configure="not callable"), "configure"),
    (dict(query_timeout=0), "query_timeout"),
    (dict(reset_session="no"), "reset_session"),
])
def test_bad_options_raise_value_error_naming_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pool.Pool(f"host=127.0.0.1 port=1 password={SECRET}", **kwargs)


def test_mode_alias_non_threaded_means_process():
    assert Options(mode="non-threaded").mode == "process"


@pytest.mark.parametrize("dsn", [
    f"host=db1 password {SECRET}",
    f"nonsense {SECRET}",
    f"postgresql://app:{SECRET}@db1:notaport/app",
    f"host=db1,db2 password={SECRET}",
    f'host=db1 password="{SECRET} x',
    f'postgresql://app:ab"{SECRET}%zz@db1/app',  # libpq quotes the token; the quote ends it early
    "",
])
def test_malformed_dsn_raises_value_error_without_the_password(dsn):
    with pytest.raises(ValueError) as info:
        pool.Pool(dsn)
    assert SECRET not in str(info.value)
    assert "primary" in str(info.value)
    assert info.value.__cause__ is None  # libpq's own message (which may echo it) is dropped


def test_bad_replica_is_named_in_the_error():
    with pytest.raises(ValueError, match="replica #2"):
        pool.Pool("host=db1", replicas=["host=db2", f"garbage {SECRET}"])
    with pytest.raises(ValueError, match="list of DSNs"):
        pool.Pool("host=db1", replicas="host=db2")


@pytest.mark.parametrize("password", ["Xq7@Zr9w", "Kp2/Lm5v", "Ab3@Cd4@Ef5", "Gh6/Ij7@Kl8"])
def test_a_raw_at_or_slash_in_a_url_password_is_refused_without_echoing_any_of_it(password):
    """libpq reads 'app:p@ss@db1' as password 'p' on host 'ss@db1': the rest of the password
    would become the endpoint's name, and so reach stats(), logs and every error."""
    url = f"postgresql://app:{password}@db1:5432/app"
    with pytest.raises(ValueError, match="percent-encoded") as info:
        pool.Pool(url)
    text = str(info.value)
    for part in set(password.replace("@", " ").replace("/", " ").split()):
        assert part not in text.replace("primary", "").replace("percent-encoded", "")
    assert info.value.__cause__ is None


def test_a_percent_encoded_password_works_and_names_come_from_host_and_port():
    cfg = endpoint_config("postgresql://app:p%40ss%2Fw@db1:5433/app", "primary", "p", Options())
    assert cfg.password == "p@ss/w" and cfg.name == "db1:5433"
    assert cfg.identity == "db1|5433|app|app"  # what makes two pools' endpoints the same: no password


def test_endpoint_config_adds_defaults_and_keeps_user_settings():
    opts = Options(connect_timeout=0.5)
    primary = endpoint_config(f"postgresql://app:{SECRET}@db1:5433/app", "primary", "p", opts)
    assert primary.name == "db1:5433" and primary.password == SECRET
    assert "target_session_attrs=read-write" in primary.dsn
    assert f"connect_timeout={pool.config.LIBPQ_CONNECT_FLOOR}" in primary.dsn  # whole seconds
    assert pool.config.libpq_seconds(0.5) > 0.5 + pool.core.PRECHECK_SLACK  # ...so the pool
    assert pool.config.libpq_seconds(2) == 2  # enforces the 0.5 s itself; 2 s is libpq's to keep
    assert "keepalives=1" in primary.dsn and "tcp_user_timeout=10000" in primary.dsn
    replica = endpoint_config("host=db2 connect_timeout=7 options='-c work_mem=8MB'", "replica", "r", opts)
    assert replica.name == "db2:5432"
    assert "connect_timeout=7" in replica.dsn
    assert "-c work_mem=8MB -c default_transaction_read_only=on" in replica.dsn
    assert "target_session_attrs" not in replica.dsn
    named = endpoint_config(("analytics", "host=db3"), "replica", "r", opts)
    assert named.name == "analytics"


def test_an_endpoint_whose_host_and_port_come_from_the_environment_is_named_after_them(
        monkeypatch):
    """With no host or port in the DSN, libpq takes PGHOST (or PGHOSTADDR) and PGPORT: the
    endpoint was named localhost:5432 in every error, log line and stats entry all the same."""
    monkeypatch.setenv("PGHOST", "db.from-env")
    monkeypatch.setenv("PGPORT", "6432")
    cfg = endpoint_config("dbname=app user=app", "primary", "p", Options())
    assert cfg.name == "db.from-env:6432" and cfg.identity == "db.from-env|6432|app|app"
    assert endpoint_config("host=db1 dbname=app", "replica", "r", Options()).name == "db1:6432"
    monkeypatch.delenv("PGHOST")
    monkeypatch.setenv("PGHOSTADDR", "10.0.0.1")
    assert endpoint_config("dbname=app", "primary", "p", Options()).name == "10.0.0.1:6432"


def test_endpoint_names_must_be_unique():
    with pytest.raises(ValueError, match="unique"):
        endpoint_configs("host=db1", ["host=db1"], Options())


def test_redactor_removes_every_password():
    redact = Redactor([SECRET, None, "pw2"])
    assert redact(f"a {SECRET} b pw2 c") == "a *** b *** c"
    assert redact(f"a{SECRET}b") == "a***b"  # a long password, wherever it appears


def test_a_short_password_is_redacted_only_where_it_stands_alone():
    """With the password "e", substring replacement turned "next probe in 0.1s" into
    "n***xt prob*** in 0.1s": readable text ruined, and the password given away by the gaps."""
    redact = Redactor(["e"])
    assert redact("next probe in 0.1s") == "next probe in 0.1s"
    assert redact('password "e" rejected; e') == 'password "***" rejected; ***'


def test_messages_about_an_endpoint_never_carry_a_short_password(db_free_port):
    p = pool.Pool(f"host=127.0.0.1 port={db_free_port} dbname=app user=app password=e",
                  mode="process", connect_timeout=0.5)
    try:
        with pytest.raises(pool.EndpointUnavailable) as info:
            p.fetchone("SELECT 1")
        text = str(info.value) + repr(p) + str(p.stats())
        assert "***" not in text  # nothing was replaced: no message held the password
        assert "next probe in" in text
    finally:
        p.close()


def test_from_env_reads_endpoints_and_typed_options():
    env = {
        "POOL_PRIMARY": "host=db1 dbname=app",
        "POOL_REPLICAS": "host=db2 dbname=app, host=db3 dbname=app",
        "POOL_MODE": "process", "POOL_MAX_SIZE": "4", "POOL_TIMEOUT": "1.5",
        "POOL_READ_FALLBACK": "false", "POOL_BALANCE": "least_busy",
    }
    primary, replicas, kwargs = options_from_env(env)
    assert primary == "host=db1 dbname=app"
    assert replicas == ["host=db2 dbname=app", "host=db3 dbname=app"]
    assert kwargs == dict(mode="process", max_size=4, timeout=1.5, read_fallback=False,
                          balance="least_busy")


@pytest.mark.parametrize("env, message", [
    ({}, "POOL_PRIMARY"),
    ({"POOL_PRIMARY": "host=db1", "POOL_MAX_SIZE": "many"}, "POOL_MAX_SIZE"),
    ({"POOL_PRIMARY": "host=db1", "POOL_READ_FALLBACK": "maybe"}, "POOL_READ_FALLBACK"),
])
def test_from_env_errors_name_the_variable(env, message):
    with pytest.raises(ValueError, match=message):
        pool.Pool.from_env(env)


def test_from_env_reads_optional_numbers_as_none():
    _, _, kwargs = options_from_env({"POOL_PRIMARY": "host=db1", "POOL_QUERY_TIMEOUT": "none",
                                     "POOL_RESET_SESSION": "off"})
    assert kwargs == dict(query_timeout=None, reset_session=False)


def test_error_classes():
    assert issubclass(pool.PoolTimeout, pool.PoolError)
    assert issubclass(pool.EndpointUnavailable, pool.PoolError)
    assert issubclass(pool.EndpointRefused, pool.EndpointUnavailable)
    assert issubclass(pool.QueryTimeout, pool.EndpointUnavailable)
    assert pool.EndpointUnavailable("x", "db1:5432").endpoint == "db1:5432"


def test_locust_is_never_imported_into_pytest():
    """`import locust` monkey-patches threads and sockets with gevent: it runs as a subprocess."""
    import sys
    assert "locust" not in sys.modules and "gevent" not in sys.modules


@pytest.mark.parametrize("dsn, host", [
    ("host=db1 port=5432 dbname=app", "db1"),
    ("postgresql://app:secret@db1.example:5433/app", "db1.example"),
    ("host=127.0.0.1 port=5432", None),
    ("host=::1", None),
    ("host=/var/run/postgresql", None),
    ("host=db1 hostaddr=10.0.0.1", None),
    ("dbname=app", None),
])
def test_the_pool_looks_up_only_the_names_libpq_would_look_up(dsn, host):
    """resolve.py bounds host name lookups; addresses, sockets and a hostaddr are libpq's."""
    assert pool.resolve._host_to_look_up(dsn) == host
    if host is None:
        resolution = pool.resolve.Resolution(dsn, time.monotonic(), 1.0)
        assert resolution.settled(time.monotonic()) and resolution.params() == {}


def test_a_host_name_from_pghost_is_looked_up_by_the_pool_too(monkeypatch):
    """libpq takes the host from PGHOST when the DSN names none, and looks it up unbounded (a
    red-team run: a pool's start took 10 s during a name server stall)."""
    monkeypatch.setenv("PGHOST", "db.from-env")
    assert pool.resolve._host_to_look_up("dbname=app user=from_pghost") == "db.from-env"
    monkeypatch.setenv("PGHOSTADDR", "10.0.0.1")  # then libpq does no lookup
    assert pool.resolve._host_to_look_up("dbname=app user=from_pghostaddr") is None
