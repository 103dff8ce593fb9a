"""Housekeeping, observability, password hygiene, copying pool/ alone, and pinned call counts."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import pool
from conftest import APP_PASSWORD
from pgutil import node_of, timed, wait_until

pytestmark = pytest.mark.db

ROOT = Path(__file__).resolve().parent.parent


def sizes(p):
    return [e["size"] for e in p.stats()["endpoints"]]


# -- housekeeping -------------------------------------------------------------------------------

def test_min_size_connections_are_opened_and_kept(make_pool, mode):
    p = make_pool(min_size=2, max_size=4)
    if mode == "threaded":  # the housekeeping thread fills in the background
        wait_until(lambda: sizes(p) == [2, 2, 2], timeout=5, what="min_size filled")
    else:  # no thread: each checkout opens at most one more until the minimum is reached
        for _ in range(8):
            p.fetchone("SELECT 1")
        assert sizes(p) == [2, 2, 2]


def test_idle_connections_above_min_size_are_closed_after_max_idle(make_pool):
    p = make_pool(min_size=1, max_size=3, max_idle=0.3, replicas=())
    held = [p.connection() for _ in range(3)]
    for h in held:
        h.__enter__()
    for h in held:
        h.__exit__(None, None, None)
    assert sizes(p) == [3]
    # stats() runs due housekeeping in process mode; the thread does it in threaded mode.
    wait_until(lambda: sizes(p) == [1], timeout=4, interval=0.1, what="shrink to min_size")


def test_connections_are_replaced_after_max_lifetime(make_pool):
    p = make_pool(max_lifetime=0.5, replicas=())
    with p.connection() as conn:
        first = conn.get_backend_pid()
    with p.connection() as conn:
        assert conn.get_backend_pid() == first
    time.sleep(0.6)
    with p.connection() as conn:
        assert conn.get_backend_pid() != first


def test_lifetimes_are_jittered_so_connections_do_not_expire_together(make_pool):
    p = make_pool(max_lifetime=100, max_size=6, replicas=())
    held = [p.connection() for _ in range(6)]
    for h in held:
        h.__enter__()
    now = time.monotonic()
    expires = [h._rec.expires for h in held]  # the loans' records: opened within milliseconds
    for h in held:
        h.__exit__(None, None, None)
    assert len(set(expires)) == 6  # all different...
    assert all(now + 89 < e <= now + 100 for e in expires)  # ...and shortened by at most 10%
    assert max(expires) - min(expires) > 0.1  # spread over the window, not a clock tick


def test_process_mode_starts_no_thread_but_the_process_wide_watchdog(db):
    """Housekeeping, probes and refills run on checkouts. The one thread is the watchdog
    (watchdog.py: nothing else can end a libpq call blocked on a stalled server), shared by
    every pool of the process, whatever its mode."""
    before = {t.ident for t in threading.enumerate()}
    pools = [pool.Pool(db.dsn("primary"), replicas=[db.dsn("replica1")], mode="process",
                       min_size=1, max_idle=0.1, max_lifetime=0.2) for _ in range(3)]
    for _ in range(20):
        for p in pools:
            p.fetchone("SELECT 1", readonly=True)
            p.fetchone("SELECT 1")
        time.sleep(0.01)
    new = [t.name for t in threading.enumerate() if t.ident not in before]
    assert set(new) <= {"pool-watchdog"} and len(new) <= 1
    assert [t.name for t in threading.enumerate()].count("pool-watchdog") == 1
    for p in pools:
        p.close()


def test_a_watchdog_that_is_no_longer_the_registered_one_leaves(db):
    """A SIGALRM request timeout inside Thread.start() can leave a watchdog running before
    is_alive() admits it, so the next watch() starts another. Both used to run for as long as
    any connection stayed open (and a pool of the next test saw two). The one no longer
    registered now leaves within a tick."""
    wd = pool.watchdog.WATCHDOG
    p = pool.Pool(db.dsn("primary"), mode="process", min_size=1)
    try:
        p.fetchone("SELECT 1")
        first = wd._thread
        assert first is not None and first.is_alive()
        with wd._lock:
            wd._thread = threading.Thread(target=lambda: None)  # what is_alive() said of it
        with p.connection() as a, p.connection() as b:  # a second connection: watch() again
            a.cursor().execute("SELECT 1")
            b.cursor().execute("SELECT 1")
        assert wd._thread is not first and wd._thread.is_alive()
        wait_until(lambda: not first.is_alive(), timeout=1, interval=0.01,
                   what="the unregistered watchdog to leave")
        assert [t.name for t in threading.enumerate()].count("pool-watchdog") == 1
    finally:
        p.close()


def test_threaded_mode_starts_its_thread_only_when_needed(db):
    p = pool.Pool(db.dsn("primary"), mode="threaded")
    names = lambda: [t.name for t in threading.enumerate()]  # noqa: E731
    assert p._housekeeper is None  # not at construction: a pre-fork parent stays thread-free
    p.fetchone("SELECT 1")
    assert "pool-housekeeping" in names()
    p.close()
    wait_until(lambda: not p._housekeeper.is_alive(), timeout=3, what="thread stopped")


# -- observability ------------------------------------------------------------------------------

def test_stats_report_pool_and_endpoints(make_pool, db, mode):
    p = make_pool()
    p.fetchone("SELECT 1")
    p.fetchone("SELECT 1", readonly=True)
    s = p.stats()
    assert s["mode"] == mode and s["pid"] == os.getpid() and s["checkouts"] == 2
    assert [(node_of(db, e["name"]), e["role"], e["state"]) for e in s["endpoints"]] == [
        ("primary", "primary", "up"), ("replica1", "replica", "up"), ("replica2", "replica", "up")]
    for e in s["endpoints"]:
        for key in ("size", "idle", "in_use", "checkouts", "waits", "timeouts", "connect_errors",
                    "ejections"):
            assert isinstance(e[key], int), key
    json.dumps(s)  # plain data, ready for an HTTP endpoint


def test_state_changes_are_logged_under_the_pool_logger(make_pool, db, caplog):
    caplog.set_level(logging.INFO, logger="pool")
    p = make_pool()
    p.fetchone("SELECT 1", readonly=True)
    p.fetchone("SELECT 1", readonly=True)
    db.kill("replica2")
    for _ in range(4):
        p.fetchone("SELECT 1", readonly=True)
    db.start_node("replica2")

    def logged(text: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "pool" and text in r.getMessage()]

    # In threaded mode the housekeeping thread re-admits: the state turns "up" first, and the
    # line is logged after the board is told, so wait for both (a CI run looked in between).
    wait_until(lambda: p.stats()["endpoints"][2]["state"] == "up" and logged("is back"),
               timeout=5, what="replica2 back, and logged")
    name = f"127.0.0.1:{db.port('replica2')}"
    down, back = logged("is down"), logged("is back")
    assert len(down) == 1 and name in down[0].getMessage() and down[0].levelno == logging.WARNING
    assert len(back) == 1 and name in back[0].getMessage() and back[0].levelno == logging.INFO


def test_no_password_in_errors_logs_stats_or_repr(db, mode, caplog):
    caplog.set_level(logging.DEBUG, logger="pool")
    wrong = "wr0ng-" + APP_PASSWORD[::-1]
    bad_primary = db.dsn("primary").replace(APP_PASSWORD, wrong)
    assert wrong in bad_primary
    p = pool.Pool(bad_primary, replicas=[db.dsn("replica1"), db.dsn("replica2")], mode=mode,
                  timeout=0.2)
    texts = [repr(p), json.dumps(p.stats())]
    assert "password authentication failed" in texts[1]  # the cause is there, not the secret
    for attempt in (lambda: p.execute("SELECT 1"), lambda: p.fetchone("SELECT 1", readonly=True)):
        _, _, error = timed(attempt)
        texts.append(str(error))
    db.stop("replica1")
    db.stop("replica2")
    _, _, error = timed(lambda: p.fetchone("SELECT 1", readonly=True))
    assert isinstance(error, pool.EndpointUnavailable)
    texts += [str(error), caplog.text, json.dumps(p.stats())]
    p.close()
    for text in texts:
        assert APP_PASSWORD not in text and wrong not in text


# -- the folder, copied ------------------------------------------------------------------------

def test_a_copy_of_pool_imports_alone_from_another_directory(db, tmp_path):
    shutil.copytree(ROOT / "pool", tmp_path / "pool")
    script = (
        "import sys, pool\n"
        "assert pool.__file__.startswith(sys.argv[1]), pool.__file__\n"
        "mods = [m for m in sys.modules if m.split('.')[0] in ('native', 'tests', 'app')]\n"
        "assert not mods, mods\n"
        "for mode in ('threaded', 'process'):\n"
        "    with pool.Pool(sys.argv[2], replicas=[sys.argv[3]], mode=mode) as p:\n"
        "        assert p.fetchone('SELECT 1', readonly=True) == (1,)\n"
        "        assert p.execute('SELECT 1') == 1\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path), db.dsn("primary"),
                          db.dsn("replica1")], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_the_reference_travels_with_the_folder_and_documents_every_option():
    """A user copies pool/, not the repository: its own README.md must be in it, and complete."""
    import dataclasses
    readme = (ROOT / "pool" / "README.md").read_text()
    assert "pool/README.md" in (ROOT / "pool" / "__init__.py").read_text()
    for field in dataclasses.fields(pool.config.Options):
        assert f"| `{field.name}` |" in readme, f"option {field.name} is not in pool/README.md"
    for name in pool.__all__:
        assert f"`{name}`" in readme or f"pool.{name}" in readme, name
    for section in ("## Design", "## Options", "## The two modes", "## Failure behaviour",
                    "## Invariants"):
        assert section in readme


# -- overhead, pinned ----------------------------------------------------------------------------

def python_calls(fn):
    """The Python functions of pool/ that fn() calls, in order (C calls are not counted, nor
    whatever the garbage collector happens to run meanwhile, such as weakref callbacks)."""
    calls = []
    pool_dir = str(ROOT / "pool")
    sys.setprofile(lambda frame, event, arg: calls.append(frame.f_code.co_name)
                   if event == "call" and frame.f_code.co_filename.startswith(pool_dir) else None)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def traced(fn):
    """The Python functions of pool/ that fn() calls, in order, and how many bytecode
    instructions of pool/ code it executes (CPython's opcode tracing), in one run."""
    calls, count = [], [0]
    pool_dir = str(ROOT / "pool")

    def tracer(frame, event, arg):
        if not frame.f_code.co_filename.startswith(pool_dir):
            return None
        if event == "call":
            calls.append(frame.f_code.co_name)
            frame.f_trace_opcodes = True
        elif event == "opcode":
            count[0] += 1
        return tracer

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return calls, count[0]


def steady(fn):
    """The Python calls (and opcodes) of fn() in the steady state: warmed up, and on a turn
    that finds no housekeeping or look at the shared board due (about one checkout in a
    thousand does, and pays for it then)."""
    for _ in range(3):
        fn()
    for _ in range(20):
        calls, opcodes = traced(fn)
        if "_tick" not in calls:
            return calls, opcodes
    raise AssertionError(f"every checkout ran _tick: {calls}")


@pytest.mark.parametrize("readonly", [False, True], ids=["write", "read"])
def test_checkout_and_return_make_a_pinned_number_of_calls(make_pool, mode, readonly):
    """Like SQLAlchemy's profiling tests: overhead cannot creep back unnoticed.

    If this fails after a deliberate change, update the expected lists with the reason.
    """
    p = make_pool(check_after=60)  # the steady state, even on a machine that stalls a moment

    def once():
        with p.connection(readonly=readonly):
            pass

    calls, opcodes = steady(once)
    if mode == "process":  # the reusable handle and its lock-free fast path (modes._Loan)
        assert calls == ["connection", "__enter__", "__exit__"]
    else:  # a handle per loan; the lock wrapper + body each way; the round-robin balancer
        balance = ["__call__"] if readonly else []
        assert calls == ["connection", "__init__", "__enter__", "_checkout", "_take",
                         "_take_locked", *balance, "__exit__", "_checkin", "_put", "_put_locked"]
    # Bytecode instructions executed in pool/ (CPython 3.11; measured 164/188 and 285/312: three
    # of them the look at whether fetchone & co may have left autocommit on, seven to twelve
    # psycopg2's and the server's word that no transaction is open on return), with a little
    # room, so that no check or store creeps onto the hot path unnoticed.
    limit = {("process", False): 168, ("process", True): 192,
             ("threaded", False): 286, ("threaded", True): 313}[mode, readonly]
    assert opcodes <= limit, opcodes


def test_fetchone_makes_a_pinned_number_of_calls(make_pool, mode):
    """The helpers' path too: one statement, one checkout, one return, nothing else."""
    p = make_pool(check_after=60)
    calls, opcodes = steady(lambda: p.fetchone("SELECT 1", readonly=True))
    take = ["_take_locked"] if mode == "process" else ["_take", "_take_locked"]
    put = ["_put_locked"] if mode == "process" else ["_put", "_put_locked"]
    assert calls == ["fetchone", "_run", "_run_attempts", "_checkout", *take, "__call__",
                     "_fetchone", "_checkin", *put]
    # measured 283 / 326: no autocommit switch there and back (statements.py), and psycopg2's
    # and the server's word on the transaction at the return (Pool._checkin)
    assert opcodes <= {"process": 287, "threaded": 330}[mode], opcodes
