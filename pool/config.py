"""Options, endpoint DSNs and the environment: everything checked once, at construction.

Bad configuration raises ``ValueError`` naming the option and the value's problem, never the
password. Each endpoint's DSN is parsed by libpq (through psycopg2), given the pool's defaults for
what the user left out, and rebuilt: the pool connects with the rebuilt string only.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping, Sequence, Union

from psycopg2.extensions import make_dsn, parse_dsn

import psycopg2

# An endpoint is a libpq DSN ("host=db1 dbname=app ...") or URL ("postgresql://..."), or a
# (name, dsn) pair to give it a name of your own in stats() and logs.
EndpointSpec = Union[str, "tuple[str, str]"]

MODES = {"threaded": "threaded", "process": "process", "non-threaded": "process"}
BALANCES = ("round_robin", "random", "least_busy")
PRIMARY, REPLICA = "primary", "replica"


@dataclasses.dataclass(frozen=True)
class Options:
    """The pool's knobs, validated. See the README for what each does and when to change it."""

    mode: str = "threaded"
    max_size: int = 10  # connections per endpoint, a hard bound
    min_size: int = 0  # per endpoint, kept open by housekeeping
    timeout: float = 5.0  # seconds a caller may wait for a connection (threaded mode)
    connect_timeout: float = 2.0  # seconds per connection attempt (libpq rounds up, min 2)
    max_lifetime: float = 1800.0  # a connection is replaced after this (minus up to 10% jitter)
    max_idle: float = 300.0  # idle connections above min_size are closed after this
    check_after: float = 0.1  # idle longer than this: local check for a server-side close
    ping_after: float = 30.0  # idle longer than this: SELECT 1 before handing it out
    balance: str = "round_robin"  # how reads pick a replica: round_robin, random, least_busy
    read_fallback: bool = True  # reads go to the primary when no replica is up
    max_waiting: int = 0  # callers allowed to wait at once; 0 means no limit
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
        for name in ("check_after", "ping_after"):
            _check_number(name, getattr(self, name), positive=False)
        if self.balance not in BALANCES:
            raise ValueError(f"balance must be one of {list(BALANCES)}, not {self.balance!r}")
        if not isinstance(self.read_fallback, bool):
            raise ValueError(f"read_fallback must be True or False, not {self.read_fallback!r}")
        for name in ("configure", "reset"):
            hook = getattr(self, name)
            if hook is not None and not callable(hook):
                raise ValueError(f"{name} must be a callable taking a connection, not {hook!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, not {value!r}")


def _check_number(name: str, value: Any, positive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a {'positive' if positive else 'non-negative'} number of seconds, not {value!r}")


@dataclasses.dataclass(frozen=True)
class EndpointConfig:
    """One server as the pool sees it: its name, role and the DSN the pool connects with."""

    name: str
    role: str
    dsn: str
    password: str | None


def endpoint_config(spec: EndpointSpec, role: str, label: str, options: Options) -> EndpointConfig:
    """Parse one endpoint and add the pool's libpq defaults to what the user left unset.

    Defaults: ``connect_timeout`` from the options, TCP keepalives (so a dead peer is noticed
    while idle), ``application_name=pool``. The primary gets ``target_session_attrs=read-write``
    so a standby answering under the primary's name is refused at connect time; replicas get
    ``default_transaction_read_only=on`` so every read session is read-only, even in autocommit.
    """
    name = None
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str):
        name, spec = spec
        if not name.strip():
            raise ValueError(f"{label}: the endpoint name must not be empty")
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{label}: expected a libpq DSN or postgresql:// URL string, not {type(spec).__name__}")
    try:
        params = parse_dsn(spec)
    except psycopg2.ProgrammingError as exc:
        # libpq quotes the offending token, which may be the password: keep the gist only.
        gist = re.sub(r'"[^"]*"', '"..."', str(exc).strip().splitlines()[0])
        raise ValueError(f"{label}: malformed DSN ({gist})") from None
    host, port = params.get("host") or params.get("hostaddr"), params.get("port")
    if host and "," in host or port and "," in port:
        raise ValueError(f"{label}: one host per endpoint; list each server as its own endpoint")
    if port is not None and not port.isdigit():
        raise ValueError(f"{label}: port must be a number, not {port!r}")
    params.setdefault("connect_timeout", str(max(2, math.ceil(options.connect_timeout))))
    params.setdefault("keepalives", "1")
    params.setdefault("keepalives_idle", "30")
    params.setdefault("keepalives_interval", "10")
    params.setdefault("keepalives_count", "3")
    params.setdefault("application_name", "pool")
    if role == PRIMARY:
        params.setdefault("target_session_attrs", "read-write")
    else:
        params["options"] = (params.get("options", "") + " -c default_transaction_read_only=on").strip()
    return EndpointConfig(
        name=name or f"{host or 'localhost'}:{port or 5432}",
        role=role,
        dsn=make_dsn(**params),
        password=params.get("password"),
    )


def endpoint_configs(primary: EndpointSpec, replicas: Sequence[EndpointSpec], options: Options) -> list[EndpointConfig]:
    if isinstance(replicas, (str, bytes)):
        raise ValueError("replicas must be a list of DSNs, not a single string")
    configs = [endpoint_config(primary, PRIMARY, "primary", options)]
    configs += [endpoint_config(r, REPLICA, f"replica #{i + 1}", options) for i, r in enumerate(replicas)]
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"endpoint names must be unique, got {names}; name them with (name, dsn) pairs")
    return configs


class Redactor:
    """Removes every known password from text bound for messages, logs and stats()."""

    def __init__(self, secrets: Sequence[str | None]) -> None:
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


# from_env(): POOL_PRIMARY and POOL_REPLICAS name the servers; POOL_<OPTION> sets an option.
ENV_PREFIX = "POOL_"
_ENV_OPTIONS = [f.name for f in dataclasses.fields(Options) if f.name not in ("configure", "reset")]


def options_from_env(environ: Mapping[str, str]) -> tuple[str, list[str], dict[str, Any]]:
    """Read the primary, the replicas and the options from ``environ`` (see ``Pool.from_env``)."""
    primary = environ.get(ENV_PREFIX + "PRIMARY", "").strip()
    if not primary:
        raise ValueError(f"{ENV_PREFIX}PRIMARY is not set: it must hold the primary's DSN or URL")
    replicas = [r.strip() for r in environ.get(ENV_PREFIX + "REPLICAS", "").split(",") if r.strip()]
    kwargs: dict[str, Any] = {}
    types = {f.name: f.type for f in dataclasses.fields(Options)}
    for name in _ENV_OPTIONS:
        var = ENV_PREFIX + name.upper()
        if var not in environ:
            continue
        raw, kind = environ[var].strip(), types[name]
        try:
            if kind == "int":
                kwargs[name] = int(raw)
            elif kind == "float":
                kwargs[name] = float(raw)
            elif kind == "bool":
                kwargs[name] = {"1": True, "true": True, "yes": True, "on": True,
                                "0": False, "false": False, "no": False, "off": False}[raw.lower()]
            else:
                kwargs[name] = raw
        except (ValueError, KeyError):
            raise ValueError(f"{var}={raw!r} is not a valid {kind}") from None
    return primary, replicas, kwargs
