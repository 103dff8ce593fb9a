"""Session reset: what one borrower changed on a connection never reaches the next one.

A session carries two kinds of state, and each is put back the cheapest way that is complete:

- psycopg2's client-side settings (``autocommit``, ``isolation_level``, ``readonly``,
  ``deferrable``, ``cursor_factory``) are restored locally, with no round trip, to what they were
  after ``configure()`` ran: the connection's *baseline*. The client encoding, which psycopg2
  keeps on both sides, costs a round trip, and only after a loan changed it.
- Server-side state (any ``SET``, ``SET ROLE``, temp tables, advisory locks, prepared
  statements, ``WITH HOLD`` cursors, ``LISTEN``) is reset by one multi-statement query,
  ``RESET_SQL``, sent after the block's transaction has ended, and followed by the ``SET``\\ s
  (and the role) that ``configure()`` set, so what the hook set survives while what the
  borrower set does not. ``RESET ALL`` leaves the role alone, hence ``SET SESSION AUTHORIZATION
  DEFAULT`` first, as ``DISCARD ALL`` does. (``DISCARD ALL`` would do the same in one
  word, but it also undoes ``configure()`` and cannot run inside the implicit transaction of a
  multi-statement query.)

Only a block that could have changed anything pays: a connection knows whether a cursor was
made or a setting touched during the loan (``PoolConnection.dirty``), so ``fetchone``/``fetchall``/
``execute``, which run one statement through the pool's own cursor, and empty blocks cost nothing.
The reset cannot be folded into the block's COMMIT: psycopg2 tracks the transaction itself, and a
COMMIT it did not send would leave its state out of step with the server's. So a block that ran
statements costs one round trip more than it did before.

Order on return: end the transaction (commit, or roll back), restore the client-side settings,
run ``RESET_SQL`` (unless ``reset_session=False``), then call the user's ``reset`` hook, which
therefore sees a clean session and may add to it (and must leave the connection idle).
"""

from __future__ import annotations

import contextlib
import dataclasses
from time import monotonic
from typing import Any, Iterator

import psycopg2
import psycopg2.extensions as ext
from psycopg2 import sql

RESET_SQL = ("SET SESSION AUTHORIZATION DEFAULT; RESET ALL; SELECT pg_advisory_unlock_all(); "
             "CLOSE ALL; UNLISTEN *; DEALLOCATE ALL; DISCARD TEMP; DISCARD SEQUENCES")

# The settings a session got from SET (not from the server's configuration or the startup
# packet, which RESET ALL keeps), as text set_config() accepts back verbatim. The role is not
# among them (pg_settings hides it): it is read on its own.
_SESSION_GUCS = "SELECT name, current_setting(name) FROM pg_settings WHERE source = 'session'"
_WHO = "SELECT session_user, current_user"

# psycopg2's own descriptors: the pool sets these without marking the loan dirty.
_BASE = ext.connection
set_autocommit = _BASE.autocommit.__set__
get_autocommit = _BASE.autocommit.__get__
set_readonly = _BASE.readonly.__set__
get_readonly = _BASE.readonly.__get__
_get_isolation = _BASE.isolation_level.__get__
_get_deferrable = _BASE.deferrable.__get__
_get_factory = _BASE.cursor_factory.__get__
_set_factory = _BASE.cursor_factory.__set__
_set_encoding = _BASE.set_client_encoding
_set_session = _BASE.set_session
base_cursor = _BASE.cursor
commit = _BASE.commit
rollback = _BASE.rollback


def own_statement(raw: Any, query: str, fetch: bool = False) -> list[tuple] | None:
    """Run one of the pool's own statements: on psycopg2's plain cursor, so the loan is not
    marked as having run anything, yet under the watchdog's deadline like a borrower's."""
    cur = base_cursor(raw, cursor_factory=ext.cursor)  # plain rows, whatever the borrower set
    try:
        timed_call(raw, cur.execute, query)
        return cur.fetchall() if fetch else None
    finally:
        cur.close()


@contextlib.contextmanager
def within(raw: Any, limit: float) -> Iterator[float]:
    """The pool's own statements on ``raw`` bounded by ``limit`` (what is left of a checkout's
    timeout) as well as by its query_timeout; yields the bound that applies."""
    saved = raw.query_timeout
    if saved is None or limit < saved:
        raw.query_timeout = max(0.001, limit)
    try:
        yield raw.query_timeout
    finally:
        raw.query_timeout = saved


def timed_call(raw: Any, method: Any, *args: Any, **kwargs: Any) -> Any:
    """``method(*args, **kwargs)``, a call that waits for ``raw``'s server, with ``busy_since``
    set: the watchdog (watchdog.py) ends it if the server does not answer within
    ``query_timeout``, and it then raises ``QueryTimeout``. Inside another timed call (a cursor
    subclass's execute that makes one first) the outer call keeps the clock."""
    if raw.busy_since:
        return method(*args, **kwargs)
    raw.busy_since = monotonic()
    try:
        return method(*args, **kwargs)
    except psycopg2.Error as exc:
        if raw.timed_out:
            raise raw.timeout_error() from exc
        raise
    finally:
        raw.busy_since = 0.0


@dataclasses.dataclass(frozen=True)
class Baseline:
    """A connection's settings right after ``configure()``: what every loan starts from."""

    isolation_level: Any = None
    deferrable: Any = None
    cursor_factory: Any = None
    restore_sql: str = RESET_SQL  # RESET_SQL plus configure()'s own SETs
    encoding: str = ""  # psycopg2's (and the server's) client encoding
    typecasters: tuple[dict, dict] = ({}, {})  # what configure() registered on the connection

    @classmethod
    def capture(cls, raw: Any, configured: bool) -> "Baseline":
        """Read the baseline off a fresh connection. One round trip, and only when a configure()
        hook ran (without one, nothing was SET)."""
        sql = RESET_SQL
        if configured:
            pairs = own_statement(raw, _SESSION_GUCS, fetch=True)
            ((session_user, current_user),) = own_statement(raw, _WHO, fetch=True)
            if raw.get_transaction_status() != ext.TRANSACTION_STATUS_IDLE:
                raw.rollback()
            if pairs:
                calls = ", ".join(f"set_config({_literal(raw, n)}, {_literal(raw, v)}, false)"
                                  for n, v in pairs)
                sql += f"; SELECT {calls}"
            if session_user != raw.info.user:  # SET SESSION AUTHORIZATION (a superuser's)
                sql += f"; SET SESSION AUTHORIZATION {_ident(raw, session_user)}"
            if current_user != session_user:  # SET ROLE
                sql += f"; SET ROLE {_ident(raw, current_user)}"
        return cls(_get_isolation(raw), _get_deferrable(raw), _get_factory(raw), sql, raw.encoding,
                   (dict(raw.string_types), dict(raw.binary_types)))

    def restore_client(self, raw: Any) -> None:
        """Put psycopg2's settings back, locally (no round trip, unless the loan changed the
        client encoding). The pool's loans start in non-autocommit mode with psycopg2's
        per-transaction ``readonly`` unset."""
        _set_session(raw, isolation_level=_default(self.isolation_level), readonly="DEFAULT",
                     deferrable=_default(self.deferrable), autocommit=False)
        if _get_factory(raw) is not self.cursor_factory:
            _set_factory(raw, self.cursor_factory)
        if self.encoding and raw.encoding != self.encoding:
            timed_call(raw, _set_encoding, raw, self.encoding)  # a round trip
        for now, then in zip((raw.string_types, raw.binary_types), self.typecasters):
            if now != then:  # psycopg2.extensions.register_type(..., conn) in the block
                now.clear()
                now.update(then)


def make_read_only(raw: Any) -> None:
    """The whole session read-only, for a read-only loan on the primary: switching psycopg2's
    settings (autocommit, readonly) cannot then make it write. Undone on return."""
    set_autocommit(raw, True)
    own_statement(raw, "SET SESSION default_transaction_read_only = on")
    set_autocommit(raw, False)
    set_readonly(raw, True)


def reset_server(raw: Any, baseline: Baseline | None) -> None:
    """Reset the server-side session (the connection must be idle: no transaction open).
    Without a baseline (``reset_session=False``) only undo the pool's own read-only SET."""
    set_autocommit(raw, True)  # one implicit transaction for the whole string, no BEGIN
    own_statement(raw, baseline.restore_sql if baseline else "RESET default_transaction_read_only")
    set_autocommit(raw, False)  # (after a failure the connection is discarded)


def _default(value: Any) -> Any:
    return "DEFAULT" if value is None else value


def _literal(raw: Any, text: str) -> str:
    return sql.Literal(text).as_string(raw)


def _ident(raw: Any, name: str) -> str:
    return sql.Identifier(name).as_string(raw)
