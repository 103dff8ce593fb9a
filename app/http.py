"""Just enough HTTP on top of WSGI: a parsed request, a JSON response, and a JSON body reader.

The body reader is where untrusted bytes enter the service, so it checks in a fixed order and
stops at the first problem: media type (415), declared length (411 missing, 400 malformed, 413
too big: the body is then never read), then the bytes themselves (400 if short, cut off by a
client that went away, not UTF-8, or not JSON). Only after that does a handler look at the content.
"""

from __future__ import annotations

import dataclasses
import http
import json
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import parse_qs

from .errors import RETRY_AFTER_SECONDS, ClientDisconnected, HTTPError, bad_request

# WSGI's callables, spelled out (wsgiref.types only exists from Python 3.11 on).
StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict, StartResponse], Iterable[bytes]]

JSON_TYPE = "application/json"


@dataclasses.dataclass(frozen=True)
class Request:
    """The parts of a WSGI environ the handlers use."""

    environ: Mapping[str, Any]
    method: str
    path: str
    query: dict[str, list[str]]

    @classmethod
    def from_environ(cls, environ: Mapping[str, Any]) -> "Request":
        # PATH_INFO is already percent-decoded by the server (as latin-1 text, per PEP 3333).
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        return cls(environ, environ.get("REQUEST_METHOD", "GET"), path or "/", query)

    def query_value(self, name: str) -> str | None:
        """The single value of a query parameter, None if absent; 400 if given more than once."""
        values = self.query.get(name)
        if values is None:
            return None
        if len(values) != 1:
            raise bad_request(f"{name} must be given once")
        return values[0]

    def json_body(self, max_bytes: int) -> Any:
        """The request body parsed as JSON, after the checks in the module docstring."""
        media_type, _, params = self.environ.get("CONTENT_TYPE", "").partition(";")
        if media_type.strip().lower() != JSON_TYPE:
            raise HTTPError(415, f"Content-Type must be {JSON_TYPE}")
        charset = _param(params, "charset")
        if charset is not None and charset.lower() not in ("utf-8", "utf8"):
            raise HTTPError(415, "the only charset accepted is utf-8")

        declared = self.environ.get("CONTENT_LENGTH", "").strip()
        if not declared:  # chunked uploads have none: we want to know the size before reading
            raise HTTPError(411, "Content-Length is required")
        if not (declared.isascii() and declared.isdigit()):
            raise bad_request("Content-Length is not a valid length")
        digits = declared.lstrip("0") or "0"
        # Count digits before int(): a 5000-digit length must be a 413, not int()'s ValueError.
        if len(digits) > len(str(max_bytes)) or int(digits) > max_bytes:
            raise HTTPError(413, f"the body must not exceed {max_bytes} bytes")
        length = int(digits)

        try:
            body = self.environ["wsgi.input"].read(length) if length else b""
        except (ConnectionError, TimeoutError) as exc:  # reset, or gunicorn's socket timeout
            raise ClientDisconnected(exc) from None
        if len(body) != length:
            raise bad_request("the body is shorter than its Content-Length")
        try:
            # Strict UTF-8 (json.loads on bytes would also guess UTF-16/32), and a RecursionError
            # from deeply nested arrays is a bad body too, not a server error.
            return json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise bad_request("the body is not valid JSON") from None


def _param(params: str, name: str) -> str | None:
    """A parameter of a Content-Type header (``; charset=utf-8``), unquoted, or None."""
    for item in params.split(";"):
        key, sep, value = item.partition("=")
        if sep and key.strip().lower() == name:
            return value.strip().strip('"')
    return None


@dataclasses.dataclass
class Response:
    """A complete response: the body is built before start_response is called, so a failure
    while building it can still become a clean error response."""

    status: int
    body: bytes
    headers: list[tuple[str, str]]

    @property
    def status_line(self) -> str:
        return f"{self.status} {http.HTTPStatus(self.status).phrase}"


def json_response(status: int, data: Any, headers: Iterable[tuple[str, str]] = ()) -> Response:
    body = json.dumps(data, separators=(",", ":")).encode("ascii") + b"\n"
    return Response(status, body, [
        ("Content-Type", JSON_TYPE),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),  # every answer reflects the live database
        ("X-Content-Type-Options", "nosniff"),
        *headers,
    ])


def error_response(status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> Response:
    return json_response(status, {"error": message}, headers)


def outage_response(data: Any, headers: Iterable[tuple[str, str]] = ()) -> Response:
    """503: the database cannot serve this request now; the client should retry shortly."""
    return json_response(503, data, [("Retry-After", str(RETRY_AFTER_SECONDS)), *headers])
