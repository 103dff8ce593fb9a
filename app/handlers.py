"""The endpoints, and the validation that keeps bad input away from the database.

Each handler takes the request, the database and the path's parameters and returns a Response
or raises HTTPError; database errors propagate to ``application.py``, which maps an outage to
503. Input rules, chosen to mirror the table's constraints so PostgreSQL never has to reject a
request (a CheckViolation reaching the 500 handler would be a bug here):

- ``id``: ASCII digits, 1 .. 2**63-1 (bigint); anything else is a 400, even before a lookup.
- ``limit``: ASCII digits, 1 .. 100, at most once; other query parameters are ignored.
- ``POST /items`` body: a JSON object with exactly one key, ``name``; unknown keys are rejected
  (400), so a typo such as ``{"nmae": ...}`` cannot pass silently. ``name`` is a string of 1 to
  200 characters (as ``length()`` counts them) without NUL and without lone surrogates, the two
  things PostgreSQL text cannot hold. Leading and trailing spaces are kept as sent.

Reads go to a replica, which may not have replayed a write made a moment ago. So the 201 of
``POST /items`` carries a read-after token (``X-Read-After`` header, ``read_after`` in the body;
``pool.Pool.write_token()``), and a ``GET`` that sends it back in ``X-Read-After`` is served by a
server that has that write: ``GET /items/<id>`` with the token never answers 404 for that id. A
malformed token is a 400.
"""

from __future__ import annotations

import os
import re
from typing import Any

from .db import Database, Served
from .errors import DATABASE_OUTAGE, bad_request, not_found
from .http import Request, Response, json_response, outage_response

BIGINT_MAX = 2**63 - 1
NAME_MAX = 200
LIMIT_DEFAULT, LIMIT_MAX = 10, 100
_DIGITS = re.compile(r"[0-9]{1,19}")  # ASCII only: str.isdigit() would accept "²" and "٣"

SELECT_ITEM = "SELECT id, name, created_at FROM items WHERE id = %s"
SELECT_NEWEST = "SELECT id, name, created_at FROM items ORDER BY id DESC LIMIT %s"
INSERT_ITEM = "INSERT INTO items (name) VALUES (%s) RETURNING id"


def served_by(served: Served) -> list[tuple[str, str]]:
    return [("X-Served-By", served.endpoint)] if served.endpoint else []


def item_json(row: tuple) -> dict[str, Any]:
    item_id, name, created_at = row
    return {"id": item_id, "name": name, "created_at": created_at.isoformat()}


def parse_positive_int(text: str | None, what: str, maximum: int) -> int:
    if text is None or not _DIGITS.fullmatch(text) or not 1 <= int(text) <= maximum:
        raise bad_request(f"{what} must be an integer from 1 to {maximum}")
    return int(text)


def read_after(request: Request) -> str | None:
    """The client's read-after token (X-Read-After), if it sent one."""
    token = request.environ.get("HTTP_X_READ_AFTER", "").strip()
    return token or None


def bad_token() -> Exception:
    return bad_request("X-Read-After must be the token a POST /items answered with")


def get_item(request: Request, db: Database, item_id: str) -> Response:
    """GET /items/<id>: one item from a replica (one that has the client's write, if it sent
    its X-Read-After token)."""
    wanted = parse_positive_int(item_id, "the item id", BIGINT_MAX)
    try:
        served = db.fetchone(SELECT_ITEM, (wanted,), readonly=True, after=read_after(request))
    except ValueError:  # the pool checks the token before any I/O
        raise bad_token() from None
    if served.value is None:
        raise not_found("no such item", served.endpoint)
    return json_response(200, item_json(served.value), served_by(served))


def list_items(request: Request, db: Database) -> Response:
    """GET /items?limit=N: the newest items (highest ids first) from a replica."""
    raw = request.query_value("limit")
    limit = LIMIT_DEFAULT if raw is None else parse_positive_int(raw, "limit", LIMIT_MAX)
    try:
        served = db.fetchall(SELECT_NEWEST, (limit,), readonly=True, after=read_after(request))
    except ValueError:
        raise bad_token() from None
    return json_response(200, {"items": [item_json(r) for r in served.value]}, served_by(served))


def validate_new_item(data: Any) -> str:
    """The name from a POST body, or HTTPError 400 saying what is wrong."""
    if not isinstance(data, dict):
        raise bad_request('the body must be a JSON object: {"name": "..."}')
    unknown = set(data) - {"name"}
    if unknown:
        raise bad_request("unknown fields: the only field is name")
    name = data.get("name")
    if not isinstance(name, str):
        raise bad_request("name is required and must be a string")
    if not 1 <= len(name) <= NAME_MAX:
        raise bad_request(f"name must be 1 to {NAME_MAX} characters long")
    if "\x00" in name:
        raise bad_request("name must not contain NUL characters")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate such as "\ud800", which JSON allows
        raise bad_request("name must be valid Unicode text") from None
    return name


def create_item(request: Request, db: Database, max_body: int) -> Response:
    """POST /items: insert on the primary; 201 with the new id, its Location, and the token a
    read of it sends back (X-Read-After) to be served by a server that has it."""
    name = validate_new_item(request.json_body(max_body))
    served = db.fetchone(INSERT_ITEM, (name,), readonly=False)
    item_id = served.value[0]
    body: dict[str, Any] = {"id": item_id}
    headers = [("Location", f"/items/{item_id}"), *served_by(served)]
    token = db.write_token()
    if token is not None:
        body["read_after"] = token
        headers.append(("X-Read-After", token))
    return json_response(201, body, headers)


def healthz(request: Request, db: Database) -> Response:
    """GET /healthz: 200 if a read succeeds right now (on a replica, or on the primary as the
    last resort), 503 if not; either way with each endpoint's state as this worker sees it.

    A real read rather than the states alone: an idle worker's pool has not noticed a server
    that died since its last request, and the read is what lets it notice.
    """
    try:
        served = db.fetchone("SELECT 1", readonly=True)
    except DATABASE_OUTAGE:
        return outage_response({"status": "unavailable", **_summary(db)})
    return json_response(200, {"status": "ok", **_summary(db)}, served_by(served))


def _summary(db: Database) -> dict[str, Any]:
    stats = db.stats()
    endpoints = [{k: e[k] for k in ("name", "role", "state")} for e in stats["endpoints"]]
    return {"mode": db.mode, "pid": os.getpid(), "endpoints": endpoints}


def stats(request: Request, db: Database) -> Response:
    """GET /stats: this worker's statistics (pool.stats() in the pooled modes). GET /stats?all=1:
    every worker of the app sharing the pool's health board, each endpoint's state as each of
    them sees it (pool.stats(scope="host"); the no-pool baseline has only its own)."""
    raw = request.query_value("all")
    if raw not in (None, "0", "1"):
        raise bad_request("all must be 0 or 1")
    everyone = raw == "1"
    return json_response(200, {**db.stats(everyone), "mode": db.mode, "pid": os.getpid()})
