"""One server connection's lifecycle: open, lend, check, classify failures, close or abandon.

Two classes, kept apart as SQLAlchemy keeps its connection record and its checkout handle:

- ``PoolConnection`` is the psycopg2 connection the borrower gets: psycopg2's own class with
  two additions, both invisible to well-behaved code. It notes when a loan makes a cursor or
  changes a setting, by any of psycopg2's spellings (``dirty``: only then does the loan need a
  reset), and it times every call that waits for the server (``execute``, ``executemany``,
  ``callproc``, ``copy_*``, ``commit``, ``rollback``, and the rarer ones listed in the class) so
  the watchdog (watchdog.py) can end one that waits longer than ``query_timeout``. A call ended
  that way raises ``pool.QueryTimeout``.
- ``PooledConnection`` is the pool's record of it: endpoint, slot, generation, owner pid, expiry,
  last use, and a registered ``poll()`` for a local liveness check. The borrower never sees it.
"""

from __future__ import annotations

import os
import random
import select
import socket
import time
from typing import Any, Callable

import psycopg2
import psycopg2.extensions as ext

from .errors import PoolError, QueryTimeout
from .session import Baseline, base_cursor, make_read_only, own_statement, set_autocommit, timed_call


LIFETIME_JITTER = 0.1  # lifetimes are shortened by up to 10% so connections don't expire together

# SQLSTATEs that mean the session is gone or going: class 08 (connection exception) and
# 57P01-57P03 (admin shutdown, crash shutdown, cannot connect now).
_DISCONNECT_CODES = ("57P01", "57P02", "57P03")
_TX_INTRANS = ext.TRANSACTION_STATUS_INTRANS
_TX_IDLE = ext.TRANSACTION_STATUS_IDLE
_TX_INERROR = ext.TRANSACTION_STATUS_INERROR

# What ``dirty`` records about a loan: a psycopg2 setting changed; a cursor was made (only then
# can the server-side session have changed); the pool made a read-only fallback session read-only;
# psycopg2's reset() ran DISCARD ALL, taking configure()'s settings and whatever state the
# borrower kept with reset_session=False (such a connection is replaced, not reset); the borrower
# closed it with a transaction open (whose work is then lost: the block is told).
SETTING, RAN, READ_ONLY_SET, WIPED, CLOSED_IN_TX = 1, 2, 4, 8, 16

# libpq reports a login failure as text only (psycopg2 gives connection errors no SQLSTATE), so
# refusals are told from outages by libpq's and the server's English messages. A server with
# translated messages (lc_messages) is then reported as "down", the safe side.
_REFUSALS = ("password authentication failed", "no pg_hba.conf entry", "pg_hba.conf rejects",
             "does not exist", "is not permitted to log in", "permission denied for database",
             "no password supplied", "authentication failed", "SCRAM", "certificate")
_STANDBY = ("session is read-only", "server is in hot standby mode")
_SERVER_READ_ONLY = ("SELECT pg_is_in_recovery() OR reset_val::bool FROM pg_settings "
                     "WHERE name = 'default_transaction_read_only'")


def _armed(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a method that waits for the server so the watchdog can bound the wait."""

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        conn = self if isinstance(self, PoolConnection) else self.connection
        if conn.query_timeout is None:
            return method(self, *args, **kwargs)
        return timed_call(conn, method, self, *args, **kwargs)

    call.__name__ = method.__name__
    call.__doc__ = method.__doc__
    return call


_ARMED_CURSOR_METHODS = ("execute", "executemany", "callproc", "copy_expert", "copy_from", "copy_to")
# A named (server-side) cursor also waits for the server to fetch, move and close. A client-side
# cursor does not, and its fetches stay unwrapped: they are the hot path of a block.
_ARMED_NAMED_METHODS = _ARMED_CURSOR_METHODS + ("fetchone", "fetchmany", "fetchall", "scroll",
                                                "close", "__iter__", "__next__")
_armed_cursor_classes: dict[tuple[type, bool], type] = {}


def armed_cursor_class(cls: Any, named: bool = False) -> Any:
    """``cls`` (a psycopg2 cursor class, RealDictCursor, ...) with its statements timed."""
    armed = _armed_cursor_classes.get((cls, named))
    if armed is None:
        if not (isinstance(cls, type) and issubclass(cls, ext.cursor)):
            return cls  # a factory function: used as given, its statements untimed
        methods = _ARMED_NAMED_METHODS if named else _ARMED_CURSOR_METHODS
        body = {name: _armed(getattr(cls, name)) for name in methods}
        armed = _armed_cursor_classes[cls, named] = type(cls.__name__, (cls,), body)
        armed.__module__, armed.__qualname__ = cls.__module__, cls.__qualname__
    return armed


_ARMED_LOBJECT_METHODS = ("read", "write", "seek", "tell", "truncate", "export", "unlink", "close")
_armed_lobject_classes: dict[type, type] = {}


def armed_lobject_class(cls: Any) -> Any:
    """``cls`` (psycopg2's lobject class, or a subclass) with its round trips timed: a large
    object's read, write, seek and the rest each wait for the server (``lo_read`` & co)."""
    armed = _armed_lobject_classes.get(cls)
    if armed is None:
        def __init__(self: Any, conn: Any, *args: Any, **kwargs: Any) -> None:
            self.connection = conn  # for _armed: psycopg2's lobject does not expose it
            cls.__init__(self, conn, *args, **kwargs)

        body = {name: _armed(getattr(cls, name)) for name in _ARMED_LOBJECT_METHODS}
        armed = _armed_lobject_classes[cls] = type(cls.__name__, (cls,), dict(body, __init__=__init__))
        armed.__module__, armed.__qualname__ = cls.__module__, cls.__qualname__
    return armed


def _two_phase_step(method: Callable[..., Any], opens: bool) -> Callable[..., Any]:
    """psycopg2's tpc_begin, tpc_commit or tpc_rollback, timed, noting in ``two_phase`` whether a
    two-phase transaction is open (begun, maybe prepared): psycopg2 does not say, and refuses
    commit() and rollback() inside one, so the return path ends it. Two-phase commit is for
    writes: a read-only loan on the primary may not begin one, nor finish one prepared
    elsewhere."""

    def step(self: "PoolConnection", *args: Any, **kwargs: Any) -> None:
        if self.read_only_loan:
            raise self.read_only_error()
        if opens:
            self.dirty |= RAN
        method(self, *args, **kwargs)
        self.two_phase = opens

    step.__name__ = method.__name__
    step.__doc__ = method.__doc__
    return _armed(step)


def _marking(name: str) -> property:
    """A psycopg2 setting as a property that notes, when set, that the loan changed it."""
    base = getattr(ext.connection, name)

    def fset(self: "PoolConnection", value: Any) -> None:
        if name == "readonly" and self.read_only_loan and value is not True:
            raise self.read_only_error()
        self.dirty |= SETTING
        base.__set__(self, value)

    return property(base.__get__, fset, doc=base.__doc__)


class PoolConnection(ext.connection):
    """A psycopg2 connection that knows when a loan changed it and how long it has waited.

    ``label`` names its endpoint in messages. The watchdog reads ``busy_since`` and
    ``query_timeout`` and sets ``timed_out`` before it shuts the socket. ``backend_pid``,
    ``opened_at`` and ``client_port`` name its server process, for cancelling a statement the
    watchdog cut off (watchdog.cancel_sql).
    """

    __slots__ = ("dirty", "busy_since", "query_timeout", "timed_out", "label", "read_only_loan",
                 "two_phase", "backend_pid", "opened_at", "client_port")

    autocommit = _marking("autocommit")
    readonly = _marking("readonly")
    isolation_level = _marking("isolation_level")
    deferrable = _marking("deferrable")
    cursor_factory = _marking("cursor_factory")

    # Both mark a loan whose transaction they end: a cursor made from psycopg2's class directly
    # (RealDictCursor(conn)) may have run anything in it, and once it is ended neither psycopg2
    # nor the server shows a trace of it. (psycopg2's `with conn:` ends it through these too.
    # The pool ends its own with psycopg2's: returns.py.)
    @_armed
    def commit(self) -> None:
        if self.read_only_loan and self.info.transaction_status == _TX_INTRANS \
                and self.wrote():  # SQL made the transaction read-write
            raise PoolError(f"{self.label}: this connection was lent with readonly=True and its "
                            f"transaction wrote (made read-write by SQL); not committed")
        self.mark_if_open()
        super().commit()

    @_armed
    def rollback(self) -> None:
        self.mark_if_open()
        super().rollback()

    def mark_if_open(self) -> None:
        """A transaction open, by psycopg2's account or the server's: anything may have run."""
        if self.status != ext.STATUS_READY or self.info.transaction_status != _TX_IDLE:
            self.dirty |= RAN

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        self.dirty |= RAN
        named = (args[0] if args else kwargs.get("name")) is not None
        given = args[1] if len(args) >= 2 else kwargs.get("cursor_factory")
        factory = armed_cursor_class(
            given or ext.connection.cursor_factory.__get__(self) or ext.cursor, named)
        if len(args) >= 2:
            args = (args[0], factory) + args[2:]
        else:
            kwargs["cursor_factory"] = factory
        return super().cursor(*args, **kwargs)

    # The other calls that wait for the server are timed too: a ROLLBACK (changing the isolation
    # level inside a transaction), a SET (the encoding), a reset, two-phase commit, a large
    # object's opening. (A large object's read and write are not: psycopg2 gives them no hook.)
    @_armed
    def set_isolation_level(self, level: Any) -> None:  # psycopg2's older spelling; 0 = autocommit
        self.dirty |= SETTING
        super().set_isolation_level(level)

    @_armed
    def set_client_encoding(self, encoding: str) -> None:
        self.dirty |= SETTING
        super().set_client_encoding(encoding)

    @_armed
    def reset(self) -> None:  # DISCARD ALL, configure()'s settings too: see WIPED
        self.dirty |= SETTING | RAN | WIPED
        super().reset()
        self.two_phase = False
        if self.read_only_loan:  # it took the read-only session too
            make_read_only(self)

    tpc_begin = _two_phase_step(ext.connection.tpc_begin, opens=True)
    tpc_commit = _two_phase_step(ext.connection.tpc_commit, opens=False)
    tpc_rollback = _two_phase_step(ext.connection.tpc_rollback, opens=False)
    tpc_prepare = _armed(ext.connection.tpc_prepare)
    tpc_recover = _armed(ext.connection.tpc_recover)

    def set_session(self, *args: Any, **kwargs: Any) -> None:
        readonly = args[1] if len(args) > 1 else kwargs.get("readonly", True)
        if self.read_only_loan and readonly not in (True, None) and not (
                len(args) < 2 and "readonly" not in kwargs):
            raise self.read_only_error()
        self.dirty |= SETTING
        super().set_session(*args, **kwargs)

    def wrote(self) -> bool:
        """Has the open transaction written anything (been given a transaction id)? One round
        trip."""
        ((wrote,),) = own_statement(self, "SELECT pg_current_xact_id_if_assigned() IS NOT NULL",
                                    fetch=True)
        return wrote

    def server_read_only(self) -> bool:
        """Is the server read-only for this session's user, whatever the session itself SET: in
        recovery, or read-only by its configuration (file, database or role: what RESET would
        give)? One round trip, in autocommit; the connection must be idle."""
        set_autocommit(self, True)
        try:
            ((read_only,),) = own_statement(self, _SERVER_READ_ONLY, fetch=True)
        finally:
            set_autocommit(self, False)
        return read_only

    def read_only_error(self) -> PoolError:
        return PoolError(f"{self.label}: this connection was lent with readonly=True; it cannot "
                         f"be made writable (borrow one with readonly=False to write)")

    def close(self) -> None:
        """A borrower's close (the pool closes with psycopg2's own): a transaction it leaves
        open that wrote is lost, and the block is told (returns.py). One round trip, then, and
        none on a replica (the server says it is one when the session starts, PostgreSQL 14+)
        or in a read-only loan on the primary."""
        self.dirty |= SETTING  # closed inside a block: the pool must look at it on return
        if not self.closed and not self.read_only_loan \
                and self.info.parameter_status("in_hot_standby") != "on":
            tx = self.info.transaction_status
            if tx == _TX_INERROR:  # failed: the block swallowed an error (as returns.py says)
                self.dirty |= CLOSED_IN_TX
            elif tx == _TX_INTRANS:
                try:
                    wrote = self.wrote()
                except (psycopg2.Error, QueryTimeout):
                    wrote = True  # no answer (a stall: query_timeout): say so, not success
                if wrote:
                    self.dirty |= CLOSED_IN_TX
        super().close()

    @_armed
    def lobject(self, *args: Any, **kwargs: Any) -> Any:
        self.dirty |= RAN
        if len(args) >= 5:  # lobject(oid, mode, new_oid, new_file, lobject_factory)
            args = (*args[:4], armed_lobject_class(args[4] or ext.lobject), *args[5:])
        else:
            kwargs["lobject_factory"] = armed_lobject_class(
                kwargs.get("lobject_factory") or ext.lobject)
        return super().lobject(*args, **kwargs)

    def timeout_error(self) -> QueryTimeout:
        return QueryTimeout(
            f"{self.label}: no answer from the server within query_timeout={self.query_timeout:g}s; "
            f"the pool closed the connection, and probes the server (cancelling the statement "
            f"there) before lending another: a slow statement, or a stalled or unreachable "
            f"server; a write may or may not have been applied", self.label)


class PooledConnection:
    """A server connection plus the facts the pool checks on every checkout, all O(1)."""

    __slots__ = ("raw", "endpoint", "key", "generation", "pid", "expires", "last_used",
                 "readonly", "baseline", "cursor", "maybe_autocommit", "lent_by", "_poller",
                 "__weakref__")

    def __init__(self, raw: PoolConnection, endpoint: Any, baseline: Baseline, now: float,
                 max_lifetime: float) -> None:
        self.raw = raw
        self.endpoint = endpoint
        self.key = 0  # the endpoint's slot, set by Endpoint.adopt
        self.generation = endpoint.generation
        self.pid = os.getpid()  # the process that opened it; only that one may use or close it
        self.expires = now + max_lifetime * (1 - LIFETIME_JITTER * random.random())
        self.last_used = now
        self.readonly: bool | None = None  # psycopg2's per-transaction flag, as last set by us
        self.baseline = baseline
        self.cursor: Any = None  # the pool's own cursor for fetchone/fetchall/execute, reused
        # psycopg2's autocommit may be on: fetchone & co leave it so (statements.py), and a block
        # then switches it off (Pool._lend). Only ever False when it is off for sure, so a loan
        # for a block that finds False needs no look at psycopg2 (a slot read: the hot path).
        # True to begin with, and after the reset= hook: configure() or the hook may have
        # switched it on (a borrower's own switch marks the loan, and the reset undoes it).
        self.maybe_autocommit = True
        self.lent_by = (0.0, 0.0)  # see deadline()
        # Registered once: checking for a server-side close is then a single poll() syscall.
        self._poller = select.poll()
        self._poller.register(raw.fileno(), select.POLLIN | select.POLLPRI)

    def deadline(self, timeout: float) -> float:
        """The deadline of the checkout that lent it, given that checkout's ``timeout``: a fast
        checkout started at ``last_used``; one that waited, connected, pinged or asked a replica
        left its deadline in ``lent_by`` (last_used then, deadline), so the hot path stores
        nothing more."""
        then, deadline = self.lent_by
        return deadline if then == self.last_used else self.last_used + timeout

    def new_cursor(self) -> Any:
        self.cursor = base_cursor(self.raw)
        return self.cursor

    def drop_cursor(self) -> None:
        cur, self.cursor = self.cursor, None
        if cur is not None:
            cur.close()

    def closed_by_server(self) -> bool:
        """True if the server closed this idle connection. No round trip.

        An idle session receives nothing unless the server is ending it (shutdown, restart,
        ``pg_terminate_backend``: a FATAL message, then EOF), or a ``NOTIFY`` arrives for a
        channel it listens to. So readable input is consumed (psycopg2 files notifications
        away), and only EOF, an error or an unexplained leftover counts as a close.
        """
        if not self._poller.poll(0):
            return False
        raw = self.raw
        for _ in range(3):
            try:
                raw.poll()
            except psycopg2.Error:
                return True
            if raw.closed or not self._poller.poll(0):
                return bool(raw.closed)
        return True

    def ping(self, timeout: float) -> bool:
        """One round trip (``SELECT 1`` in autocommit), bounded by ``timeout`` via the watchdog,
        for connections idle long enough that silence proves little."""
        raw = self.raw
        saved, raw.query_timeout = raw.query_timeout, timeout
        try:
            set_autocommit(raw, True)
            own_statement(raw, "SELECT 1")
            set_autocommit(raw, False)
            return True
        except (psycopg2.Error, QueryTimeout):
            return False
        finally:
            raw.query_timeout = saved

    def close(self) -> None:
        try:
            ext.connection.close(self.raw)  # psycopg2's: PoolConnection.close is the borrower's
        except Exception:  # closing a broken connection may fail; it is gone either way
            pass

    def abandon(self) -> None:
        """Forget a connection inherited through fork() without touching the parent's session."""
        abandon(self.raw)


# Connections inherited through fork() and abandoned: kept, never closed nor freed (below).
_ABANDONED: list[Any] = []


def abandon(raw: Any) -> None:
    """Forget a psycopg2 connection inherited through fork() without disturbing the parent.

    Closing it, even implicitly when the object is freed, would send the server a Terminate
    message over the socket the parent shares, ending the parent's session. So the child points
    its copy of the descriptor at /dev/null (libpq's goodbye would go nowhere), and then does not
    close it at all: another thread of the parent (housekeeping stepping a probe or a monitor)
    may have held the connection's internal lock at the fork, and in the child that thread does
    not exist to release it, so closing (or freeing) would wait forever. The object is kept for
    the child's life instead: a few per fork.
    """
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(devnull, raw.fileno())
        finally:
            os.close(devnull)
    except (OSError, psycopg2.Error):
        pass
    _ABANDONED.append(raw)


def connect(dsn: str, label: str, query_timeout: float | None, params: dict[str, str],
            connect_timeout: int | None = None) -> PoolConnection:
    """A new session (blocking; libpq's connect_timeout bounds it: the DSN's, or the one given,
    in whole seconds). ``params``: the host's addresses, looked up already (resolve.py). Raises
    OperationalError."""
    if connect_timeout is not None:
        params = dict(params, connect_timeout=str(connect_timeout))
    raw = psycopg2.connect(dsn, connection_factory=PoolConnection, **params)
    raw.opened_at = time.monotonic()  # its server process started before this
    raw.backend_pid = raw.info.backend_pid
    raw.client_port = client_port(raw)
    raw.label = label
    raw.query_timeout = query_timeout
    raw.busy_since = 0.0
    raw.timed_out = False
    raw.read_only_loan = False
    raw.two_phase = False
    raw.dirty = 0
    return raw


def client_port(raw: Any) -> int | None:
    """Our end's port, as the server shows it (``pg_stat_activity.client_port``): -1 for a Unix
    socket, None if it cannot be read. Behind a pooler such as pgbouncer, or a NAT, the server
    sees another port, so a statement cut off there is never cancelled on someone else's
    session: the process id libpq reports may not be ours alone (watchdog.cancel_sql)."""
    try:
        sock = socket.socket(fileno=os.dup(raw.fileno()))
    except (OSError, ValueError):
        return None
    try:
        name = sock.getsockname()
    except OSError:
        return None
    finally:
        sock.close()
    return name[1] if isinstance(name, tuple) else -1


def is_disconnect(exc: BaseException | None, raw: Any) -> bool:
    """Did this error (or the connection's state) show the session is lost?

    Decided by psycopg2's ``closed`` flag, SQLSTATEs and the watchdog's mark, not by matching
    message text. ``closed == 2`` is psycopg2's "connection broken"; 1 means the caller closed it.
    """
    if raw.closed == 2 or getattr(raw, "timed_out", False) or isinstance(exc, QueryTimeout):
        return True
    if isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)):
        code = exc.pgcode
        return code is None or code.startswith("08") or code in _DISCONNECT_CODES
    return False


def connect_failure(text: str) -> str:
    """What a failed login says about the server: "refused" (it answered and said no: password,
    database, role, pg_hba), "standby" (it is read-only where a primary was wanted) or "down"."""
    if any(marker in text for marker in _STANDBY):
        return "standby"
    if any(marker in text for marker in _REFUSALS):
        return "refused"
    return "down"


def describe_error(exc: BaseException) -> str:
    """The first line of an error, with its class: enough to act on, short enough to log."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()
