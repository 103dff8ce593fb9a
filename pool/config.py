"""Options, endpoint DSNs and the environment: everything checked once, at construction.

Bad configuration raises ``ValueError`` naming the option and the problem, and never echoes a
DSN or URL: libpq's own parse errors quote the text they choke on, which may be the password, so
they are replaced by a message of our own. Each endpoint's DSN is parsed by libpq (through
psycopg2), given the pool's defaults for what the user left out, and rebuilt; the pool connects
with the rebuilt strings only. An endpoint's name comes from its parsed host and port alone.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Callable, Mapping, Sequence, Union

import psycopg2
from psycopg2.extensions import libpq_version, make_dsn, parse_dsn

# An endpoint is a libpq DSN ("host=db1 dbname=app ...") or URL ("postgresql://..."), or a
# (name, dsn) pair to give it a name of your own in stats() and logs.
EndpointSpec = Union[str, "tuple[str, str]"]

MODES = {"threaded": "threaded", "process": "process", "non-threaded": "process"}
DEFAULT = object()  # "the pool's own setting", for per-call overrides such as query_timeout
BALANCES = ("round_robin", "random", "least_busy")
PRIMARY, REPLICA, CANDIDATE = "primary", "replica", "candidate"

# libpq counts connect_timeout in whole seconds, and before libpq 17 treats anything below 2 as 2.
LIBPQ_CONNECT_FLOOR = 1 if libpq_version() >= 170000 else 2
MONITOR_APPLICATION_NAME = "pool-monitor"
TCP_USER_TIMEOUT_MS = 10_000  # unacknowledged data for 10 s: the peer is gone (libpq 12+)


@dataclasses.dataclass(frozen=True)
class Options:
    """The pool's knobs, validated. See pool/README.md for what each does and when to change it."""

    mode: str = "threaded"
    max_size: int = 10  # connections per endpoint, a hard bound
    min_size: int = 0  # per endpoint, kept open by housekeeping
    timeout: float = 5.0  # seconds a checkout may take: waits, pings, connects, probes it awaits
    connect_timeout: float = 2.0  # seconds per connection attempt, enforced by the pool
    query_timeout: float | None = 30.0  # seconds any statement may wait for the server
    max_lifetime: float = 1800.0  # a connection is replaced after this (minus up to 10% jitter)
    max_idle: float = 300.0  # idle connections above min_size are closed after this
    check_after: float = 0.1  # idle longer than this: local check for a server-side close
    ping_after: float = 30.0  # idle longer than this: SELECT 1 before handing it out
    balance: str = "round_robin"  # how reads pick a replica: round_robin, random, least_busy
    read_fallback: bool = True  # reads go to the primary when no replica is up
    max_waiting: int = 0  # callers allowed to wait at once; 0 means no limit
    reset_session: bool = True  # server-side session reset after a block that ran statements
    max_lag: float | None = 10.0  # seconds a replica may lag and still serve reads (lag.py)
    shared_state: bool | str | None = None  # the shared health board (board.py); None: per mode
    configure: Callable[[Any], None] | None = None  # called with each new connection
    reset: Callable[[Any], None] | None = None  # called with each connection given back

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, not {self.mode!r}")
        object.__setattr__(self, "mode", MODES[self.mode])
        _check_int("max_size", self.max_size, minimum=1)
        _check_int("min_size", self.min_size, minimum=0)
        if self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) must not exceed max_size ({self.max_size})")
        _check_int("max_waiting", self.max_waiting, minimum=0)
        for name in ("timeout", "connect_timeout", "max_lifetime", "max_idle"):
            _check_number(name, getattr(self, name), positive=True)
        for name in ("query_timeout", "max_lag"):
            if getattr(self, name) is not None:
                _check_number(name, getattr(self, name), positive=True)
        for name in ("check_after", "ping_after"):
            _check_number(name, getattr(self, name), positive=False)
        if self.balance not in BALANCES:
            raise ValueError(f"balance must be one of {list(BALANCES)}, not {self.balance!r}")
        for name in ("read_fallback", "reset_session"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, not {getattr(self, name)!r}")
        shared = self.shared_state
        if not (shared is None or isinstance(shared, bool) or isinstance(shared, str) and shared.strip()):
            raise ValueError(f"shared_state must be True, False, None or a board name or path, "
                             f"not {shared!r}")
        for name in ("configure", "reset"):
            hook = getattr(self, name)
            if hook is not None and not callable(hook):
                raise ValueError(f"{name} must be a callable taking a connection, not {hook!r}")

    @property
    def libpq_connect_timeout(self) -> int:
        """What libpq is told: whole seconds, at least its floor. The pool itself enforces the
        exact value when libpq cannot (``Pool._open``)."""
        return libpq_seconds(self.connect_timeout)


def libpq_seconds(limit: float) -> int:
    """libpq's connect_timeout for a connect bounded by ``limit`` seconds: whole seconds, at
    least its floor, so never less than ``limit``."""
    return max(LIBPQ_CONNECT_FLOOR, math.ceil(limit))


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, not {value!r}")


def _check_number(name: str, value: Any, positive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a {'positive' if positive else 'non-negative'} number of seconds, not {value!r}")


@dataclasses.dataclass(frozen=True)
class EndpointConfig:
    """One server as the pool sees it: its name, declared role and the DSNs the pool uses.

    ``write_dsn`` is for sessions that may write (the primary); ``read_dsn`` makes every session
    read-only (``default_transaction_read_only=on``), for replicas. ``identity`` is what makes two
    pools' endpoints "the same server" (host, port, database, user: never the password).
    """

    name: str
    role: str
    write_dsn: str
    read_dsn: str
    password: str | None
    identity: str

    @property
    def dsn(self) -> str:
        return self.write_dsn if self.role == PRIMARY else self.read_dsn

    @property
    def monitor_dsn(self) -> str:
        """The monitor's session: neither read-only nor read-write by request, so it sees the
        server's own default_transaction_read_only, and named so it can be told apart in
        pg_stat_activity (one session per endpoint beyond max_size; see monitor.py)."""
        params = parse_dsn(self.read_dsn)
        params["options"] = params["options"].replace("-c default_transaction_read_only=on", "").strip()
        if not params["options"]:
            del params["options"]
        params["application_name"] = MONITOR_APPLICATION_NAME
        return make_dsn(**params)


_URL = re.compile(r"^postgres(ql)?://", re.IGNORECASE)
_HOST = re.compile(r"^(/[^@]*|\[[0-9A-Fa-f:.]+\]|[0-9A-Fa-f:.]+|[A-Za-z0-9_.-]+)$")
_URL_HINT = ("a password (or user) with @ / : ? # % or spaces must be percent-encoded in a URL, "
             "e.g. @ as %40 and / as %2F")


def endpoint_config(spec: EndpointSpec, role: str, label: str, options: Options) -> EndpointConfig:
    """Parse one endpoint and add the pool's libpq defaults to what the user left unset.

    Defaults: ``connect_timeout`` (whole seconds; the pool enforces finer values itself), TCP
    keepalives (a dead peer is noticed while idle), ``tcp_user_timeout`` (a vanished peer is
    noticed while data is unacknowledged), ``application_name=pool``. Write sessions get
    ``target_session_attrs=read-write``, so a standby answering under the primary's name is
    refused at connect time; read sessions get ``default_transaction_read_only=on``, so they are
    read-only whatever the borrower does to psycopg2's settings.
    """
    name = None
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str):
        name, spec = spec
        if not name.strip():
            raise ValueError(f"{label}: the endpoint name must not be empty")
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{label}: expected a libpq DSN or postgresql:// URL string, not {type(spec).__name__}")
    is_url = bool(_URL.match(spec.strip()))
    try:
        params = parse_dsn(spec)
    except psycopg2.ProgrammingError:
        # libpq's message quotes the text it choked on, which may be the password: say what to
        # check instead, never what was written.
        hint = _URL_HINT if is_url else "check the quoting of values with spaces, quotes or backslashes"
        raise ValueError(f"{label}: malformed {'URL' if is_url else 'DSN'} ({hint})") from None
    host, port = params.get("host") or params.get("hostaddr"), params.get("port")
    if host and "," in host or port and "," in port:
        raise ValueError(f"{label}: one host per endpoint; list each server as its own endpoint")
    if host and not _HOST.match(host) or port is not None and not port.isdigit() \
            or is_url and "@" in params.get("dbname", ""):
        # A raw @ or / in a URL's password makes libpq read part of the password as the host,
        # the port or the database. Never echo any of them: they may hold that part.
        raise ValueError(f"{label}: the {'URL' if is_url else 'DSN'} does not parse into a valid "
                         f"host and port ({_URL_HINT if is_url else 'check host= and port='})")
    params.setdefault("connect_timeout", str(options.libpq_connect_timeout))
    params.setdefault("keepalives", "1")
    params.setdefault("keepalives_idle", "30")
    params.setdefault("keepalives_interval", "10")
    params.setdefault("keepalives_count", "3")
    if libpq_version() >= 120000:
        params.setdefault("tcp_user_timeout", str(TCP_USER_TIMEOUT_MS))
    params.setdefault("application_name", "pool")
    write = dict(params)
    write.setdefault("target_session_attrs", "read-write")
    read = dict(params)
    read.pop("target_session_attrs", None)
    read["options"] = (params.get("options", "") + " -c default_transaction_read_only=on").strip()
    # Named as libpq connects: with no host or port in the DSN, from PGHOST (PGHOSTADDR) and PGPORT.
    where = host or os.environ.get("PGHOST") or os.environ.get("PGHOSTADDR") or "localhost"
    port = port or os.environ.get("PGPORT") or "5432"
    identity = "|".join((where, port, params.get("dbname") or params.get("user") or "",
                         params.get("user") or ""))
    return EndpointConfig(
        name=name or f"{where}:{port}",
        role=role,
        write_dsn=make_dsn(**write),
        read_dsn=make_dsn(**read),
        password=params.get("password"),
        identity=identity,
    )


def endpoint_configs(primary: EndpointSpec, replicas: Sequence[EndpointSpec], options: Options) -> list[EndpointConfig]:
    """The declared form: one primary and its replicas, roles as given."""
    if isinstance(replicas, (str, bytes)):
        raise ValueError("replicas must be a list of DSNs, not a single string")
    configs = [endpoint_config(primary, PRIMARY, "primary", options)]
    configs += [endpoint_config(r, REPLICA, f"replica #{i + 1}", options) for i, r in enumerate(replicas)]
    return _unique(configs)


def node_configs(nodes: Sequence[EndpointSpec], options: Options) -> list[EndpointConfig]:
    """The candidate form: every node, roles found by asking (roles.py)."""
    if isinstance(nodes, (str, bytes)) or not nodes:
        raise ValueError("nodes must be a non-empty list of DSNs, one per server")
    return _unique([endpoint_config(n, CANDIDATE, f"node #{i + 1}", options) for i, n in enumerate(nodes)])


def _unique(configs: list[EndpointConfig]) -> list[EndpointConfig]:
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"endpoint names must be unique, got {names}; name them with (name, dsn) pairs")
    return configs


class Redactor:
    """Removes known passwords from text the pool did not write: libpq's error messages.

    The pool builds its own messages from parts that never hold a password (names, states,
    numbers), so only foreign text passes through here. A long password is removed wherever it
    appears; a short one only where it stands alone (between spaces, quotes or punctuation), so a
    password "e" cannot turn "next probe" into "n***xt prob***".
    """

    SHORT = 8

    def __init__(self, secrets: Sequence[str | None]) -> None:
        found = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._long = [s for s in found if len(s) >= self.SHORT]
        short = [re.escape(s) for s in found if len(s) < self.SHORT]
        self._short = re.compile(r"(?<![\w])(?:%s)(?![\w])" % "|".join(short)) if short else None

    def __call__(self, text: str) -> str:
        for secret in self._long:
            text = text.replace(secret, "***")
        if self._short is not None:
            text = self._short.sub("***", text)
        return text


# from_env(): POOL_NODES (every node a candidate), or POOL_PRIMARY and POOL_REPLICAS, name the
# servers; POOL_<OPTION> sets an option.
ENV_PREFIX = "POOL_"
_ENV_OPTIONS = [f.name for f in dataclasses.fields(Options) if f.name not in ("configure", "reset")]
_BOOLS = {"1": True, "true": True, "yes": True, "on": True,
          "0": False, "false": False, "no": False, "off": False}


def options_from_env(environ: Mapping[str, str]) -> tuple[Any, list[str], dict[str, Any]]:
    """Read the endpoints and the options from ``environ`` (see ``Pool.from_env``): the primary
    and replicas, or, when ``POOL_NODES`` is set, the list of candidates (and no replicas)."""
    nodes = [n.strip() for n in environ.get(ENV_PREFIX + "NODES", "").split(",") if n.strip()]
    primary: Any = nodes
    replicas: list[str] = []
    if not nodes:
        primary = environ.get(ENV_PREFIX + "PRIMARY", "").strip()
        if not primary:
            raise ValueError(f"neither {ENV_PREFIX}NODES nor {ENV_PREFIX}PRIMARY is set: give every "
                             f"node's DSN in {ENV_PREFIX}NODES, or the primary's in {ENV_PREFIX}PRIMARY")
        replicas = [r.strip() for r in environ.get(ENV_PREFIX + "REPLICAS", "").split(",") if r.strip()]
    kwargs: dict[str, Any] = {}
    types = {f.name: f.type for f in dataclasses.fields(Options)}
    for name in _ENV_OPTIONS:
        var = ENV_PREFIX + name.upper()
        if var not in environ:
            continue
        raw, kind = environ[var].strip(), types[name].replace(" | None", "")
        optional = types[name].endswith("| None")
        try:
            if name == "shared_state":
                kwargs[name] = _BOOLS.get(raw.lower(), raw or None)
            elif optional and raw.lower() in ("", "none", "off"):
                kwargs[name] = None
            elif kind == "int":
                kwargs[name] = int(raw)
            elif kind == "float":
                kwargs[name] = float(raw)
            elif kind == "bool":
                kwargs[name] = _BOOLS[raw.lower()]
            else:
                kwargs[name] = raw
        except (ValueError, KeyError):
            raise ValueError(f"{var}={raw!r} is not a valid {kind}"
                             + (" (or none)" if optional else "")) from None
    return primary, replicas, kwargs
