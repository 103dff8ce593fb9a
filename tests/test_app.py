"""The sample WSGI app (app/) against a real primary and two streaming replicas. No mocks.

Part 1 calls the WSGI application in-process (through wsgiref's validator, which checks WSGI
compliance too) in each APP_POOL_MODE: every endpoint, every kind of bad input, and outages made
by stopping servers. Part 2 runs the three gunicorn configs as real servers: every endpoint over
HTTP, and a replica killed under a stream of reads without one failed request.

Every reply is checked on the way: never a 500 unless a test asks for one, never a traceback, SQL
or the session's password in a body, and the app's last-resort handler never logs.

Skips without PostgreSQL server binaries or gunicorn, except under CI=true or REQUIRE_DB=1,
where that is a failure. Runs in about 20 seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import http.client
import io
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator
from wsgiref.util import setup_testing_defaults
from wsgiref.validate import validator

import pytest

from app.application import create_app
from conftest import APP_PASSWORD, heal, require
from native.cluster import NODES, REPLICAS, Cluster
from pgutil import admin_sql

pytestmark = pytest.mark.db  # nearly every test needs the cluster; the rest take milliseconds

ROOT = Path(__file__).resolve().parent.parent
MODES = ("threaded", "process", "nopool")
# The session cluster's app password: a leak into any body cannot go unnoticed.
PASSWORD = APP_PASSWORD
LEAK_MARKERS = ("Traceback", 'File "', "psycopg2", "SELECT", "INSERT", "password", PASSWORD)


# --- the database: the session's cluster from conftest.py (`cluster`, and `db`, which heals
# it before and after each test) -------------------------------------------------------------


def endpoint_names(cluster: Cluster) -> dict[str, str]:
    """{"127.0.0.1:<port>": node}: how X-Served-By names each node."""
    return {f"127.0.0.1:{cluster.port(node)}": node for node in NODES}


def app_environ(cluster: Cluster, mode: str) -> dict[str, str]:
    return {
        "APP_POOL_MODE": mode,
        "POOL_PRIMARY": cluster.dsn("primary"),
        "POOL_REPLICAS": ",".join(cluster.dsn(r) for r in REPLICAS),
        "POOL_TIMEOUT": "2",
        "POOL_CONNECT_TIMEOUT": "2",
    }


# --- calling the app in-process ------------------------------------------------------------


@dataclasses.dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def served_by(self) -> str | None:
        return self.headers.get("x-served-by")


def check_reply(reply: Reply, allow_500: bool = False) -> Reply:
    if not allow_500:
        assert reply.status != 500, reply.body
    text = reply.body.decode("utf-8", "replace")
    for marker in LEAK_MARKERS:
        assert marker not in text, f"{marker!r} leaked into a {reply.status} body: {text[:300]}"
    if reply.body:
        assert reply.headers["content-type"] == "application/json"
        assert isinstance(json.loads(reply.body), dict)
    return reply


def call(app: Any, method: str, target: str, body: bytes | None = None, *,
         content_type: str | None = "application/json", headers: dict[str, str] | None = None,
         validate: bool = True, allow_500: bool = False, wsgi_input: Any = None) -> Reply:
    """One request through the WSGI callable. ``validate=False`` for environs that a real server
    would never produce (a malformed CONTENT_LENGTH), which wsgiref's validator rejects."""
    environ = setup_environ(method, target)
    if body is not None:
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        if content_type is not None:
            environ["CONTENT_TYPE"] = content_type
    if wsgi_input is not None:
        environ["wsgi.input"] = wsgi_input
    for name, value in (headers or {}).items():
        key = name.upper().replace("-", "_")
        environ[key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key] = value
    environ = {k: v for k, v in environ.items() if v is not None}  # headers={"X": None} removes X
    seen: dict[str, Any] = {}

    def start_response(status: str, response_headers: list, exc_info: Any = None) -> Any:
        seen["status"], seen["headers"] = status, response_headers
        return lambda data: None

    result = (validator(app) if validate else app)(environ, start_response)
    try:
        data = b"".join(result)
    finally:
        if hasattr(result, "close"):
            result.close()
    reply = Reply(int(seen["status"].split()[0]), {k.lower(): v for k, v in seen["headers"]}, data)
    return check_reply(reply, allow_500)


def setup_environ(method: str, target: str) -> dict[str, Any]:
    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    path, _, query = target.partition("?")
    environ.update(REQUEST_METHOD=method, PATH_INFO=path, QUERY_STRING=query)
    return environ


def post_json(app: Any, data: Any, **kw: Any) -> Reply:
    return call(app, "POST", "/items", json.dumps(data).encode(), **kw)


@pytest.fixture(scope="module")
def apps(cluster: Cluster) -> Iterator[dict[str, Any]]:
    """One app per mode for the whole module, like one gunicorn worker each."""
    made = {mode: create_app(app_environ(cluster, mode)) for mode in MODES}
    yield made
    for app in made.values():
        app.close()


@pytest.fixture(params=MODES)
def app(request: pytest.FixtureRequest, apps: dict[str, Any], db: Cluster) -> Any:
    return apps[request.param]


@pytest.fixture(autouse=True)
def no_unhandled_errors(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """The last-resort handler logs at ERROR on logger "app": no test may reach it by accident."""
    caplog.set_level(logging.WARNING, logger="app")
    yield
    if "expect_unhandled_error" in request.fixturenames:
        return
    unhandled = [r.getMessage() for r in caplog.get_records("call") if r.name == "app" and r.levelno >= logging.ERROR]
    assert not unhandled, unhandled


@pytest.fixture
def expect_unhandled_error() -> None:
    """Requested by the tests that exercise the last-resort handler on purpose."""


# --- part 1: every endpoint in-process ------------------------------------------------------


def test_get_item_reads_from_a_replica(app: Any, db: Cluster) -> None:
    names = endpoint_names(db)
    seen = set()
    for _ in range(4):  # round-robin: both replicas serve, the primary never does
        reply = call(app, "GET", "/items/42")
        assert reply.status == 200
        assert reply.json["id"] == 42 and reply.json["name"] == "item-42"
        assert datetime.datetime.fromisoformat(reply.json["created_at"]).tzinfo is not None
        seen.add(names[reply.served_by])
    assert seen == set(REPLICAS)


def test_get_missing_item_is_404_from_a_replica(app: Any, db: Cluster) -> None:
    reply = call(app, "GET", f"/items/{2**63 - 1}")
    assert reply.status == 404 and reply.json == {"error": "no such item"}
    assert endpoint_names(db)[reply.served_by] in REPLICAS


@pytest.mark.parametrize("item_id", [
    "0", "-1", "+1", "abc", "1.5", "1e3", "0x10", " 1", "1 ", "9223372036854775808",
    "99999999999999999999999999", "1" * 5000, "\xb2", "\u0663", "%31",
])
def test_bad_item_id_is_400_without_touching_the_database(app: Any, item_id: str) -> None:
    # PATH_INFO arrives percent-decoded, as the latin-1 text of the UTF-8 bytes (PEP 3333).
    reply = call(app, "GET", "/items/" + item_id.encode("utf-8").decode("latin-1"))
    assert reply.status == 400, item_id
    assert "error" in reply.json and reply.served_by is None


def test_list_items_newest_first(app: Any, db: Cluster) -> None:
    reply = call(app, "GET", "/items")
    assert reply.status == 200
    ids = [item["id"] for item in reply.json["items"]]
    assert len(ids) == 10 and ids == sorted(ids, reverse=True)
    assert endpoint_names(db)[reply.served_by] in REPLICAS
    for limit in (1, 100):
        assert len(call(app, "GET", f"/items?limit={limit}&other=ignored").json["items"]) == limit


@pytest.mark.parametrize("query", [
    "limit=0", "limit=101", "limit=-1", "limit=abc", "limit=", "limit=1.0", "limit=1e1",
    "limit=%201", "limit=1&limit=2", "limit=" + "9" * 5000,
])
def test_bad_limit_is_400(app: Any, query: str) -> None:
    reply = call(app, "GET", "/items?" + query)
    assert reply.status == 400 and reply.served_by is None


def test_post_creates_an_item_readable_on_the_replicas(app: Any, db: Cluster) -> None:
    names = endpoint_names(db)
    name = f"new-{uuid.uuid4()}"
    reply = post_json(app, {"name": name})
    assert reply.status == 201
    item_id = reply.json["id"]
    assert reply.headers["location"] == f"/items/{item_id}"
    assert names[reply.served_by] == "primary"
    db.wait_replayed(timeout=10)
    for _ in range(2):  # from each replica in turn
        got = call(app, "GET", reply.headers["location"])
        assert got.status == 200 and got.json["name"] == name and names[got.served_by] in REPLICAS
    assert call(app, "GET", "/items?limit=1").json["items"][0]["id"] == item_id


def test_a_get_with_the_post_s_token_reads_the_write_even_from_lagging_replicas(app: Any, db: Cluster) -> None:
    """POST, then GET at once: a replica that has not replayed the write used to answer 404.
    The 201 carries a token; a GET that sends it back is served by a server that has the item."""
    names = endpoint_names(db)
    for replica in REPLICAS:
        admin_sql(db, replica, "SELECT pg_wal_replay_pause()")
    try:
        for _ in range(3):
            name = f"ryw-{uuid.uuid4()}"
            reply = post_json(app, {"name": name})
            assert reply.status == 201
            token = reply.headers.get("x-read-after")
            if app.settings.mode == "nopool":
                assert token is None and "read_after" not in reply.json  # the baseline has none
                continue
            assert token and reply.json["read_after"] == token
            got = call(app, "GET", reply.headers["location"], headers={"X-Read-After": token})
            assert got.status == 200 and got.json["name"] == name
            assert names[got.served_by] == "primary"  # no replica has replayed it
            listed = call(app, "GET", "/items?limit=1", headers={"X-Read-After": token})
            assert listed.status == 200 and listed.json["items"][0]["name"] == name
    finally:
        for replica in REPLICAS:
            admin_sql(db, replica, "SELECT pg_wal_replay_resume()")


@pytest.mark.parametrize("token", ["nope", "0/", "'; DROP TABLE items; --", "1/2/3"])
def test_a_malformed_read_after_token_is_400(app: Any, token: str) -> None:
    reply = call(app, "GET", "/items/1", headers={"X-Read-After": token})
    assert reply.status == 400 and "X-Read-After" in reply.json["error"]
    assert call(app, "GET", "/items?limit=1", headers={"X-Read-After": token}).status == 400


@pytest.mark.parametrize("name", ["x", "ü" * 200, " padded ", "名前", "emoji \U0001F600", "<script>"])
def test_post_accepts_any_text_of_1_to_200_characters(app: Any, db: Cluster, name: str) -> None:
    reply = post_json(app, {"name": name}, content_type="Application/JSON; charset=UTF-8")
    assert reply.status == 201
    db.wait_replayed(timeout=10)
    assert call(app, "GET", f"/items/{reply.json['id']}").json["name"] == name


BAD_BODIES = {
    "not JSON": b"{",
    "empty": b"",
    "JSON null": b"null",
    "array": b'[{"name": "a"}]',
    "string": b'"name"',
    "no name": b"{}",
    "name null": b'{"name": null}',
    "name number": b'{"name": 5}',
    "name list": b'{"name": ["a"]}',
    "name NaN": b'{"name": NaN}',
    "empty name": b'{"name": ""}',
    "201 characters": json.dumps({"name": "x" * 201}).encode(),
    "201 non-ASCII characters": json.dumps({"name": "é" * 201}).encode(),
    "unknown field": b'{"name": "a", "colour": "red"}',
    "typo": b'{"nmae": "a"}',
    "NUL": b'{"name": "a\\u0000b"}',
    "lone surrogate": b'{"name": "\\ud800"}',
    "invalid UTF-8": b'{"name": "\xff\xfe"}',
    "UTF-16": '{"name": "a"}'.encode("utf-16"),
    "BOM": b'\xef\xbb\xbf{"name": "a"}',
    "deeply nested": b"[" * 2048 + b"]" * 2048,
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_bad_post_body_is_400(app: Any, body: bytes) -> None:
    reply = call(app, "POST", "/items", body)
    assert reply.status == 400 and reply.served_by is None


@pytest.mark.parametrize("content_type", [
    None, "", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
    "application/jsonp", "application/json; charset=latin-1", "text/json",
])
def test_post_without_json_content_type_is_415(app: Any, content_type: str | None) -> None:
    reply = call(app, "POST", "/items", b'{"name": "a"}', content_type=content_type)
    assert reply.status == 415


def test_post_length_checks(app: Any) -> None:
    # No Content-Length (a chunked upload): 411, before any byte is read.
    assert call(app, "POST", "/items", b'{"name": "a"}', headers={"Content-Length": None}).status == 411
    # Over the limit: 413, also without reading the body.
    big = json.dumps({"name": "x" * 5000}).encode()
    assert call(app, "POST", "/items", big).status == 413
    assert call(app, "POST", "/items", b"{}", headers={"Content-Length": "9" * 40}).status == 413
    # Exactly at the limit is fine (JSON allows the trailing spaces).
    assert call(app, "POST", "/items", b'{"name": "at the limit"}'.ljust(4096)).status == 201
    # A body shorter than announced (the client went away): 400.
    assert call(app, "POST", "/items", b'{"name": "a"}', headers={"Content-Length": "20"}).status == 400
    # Malformed lengths a real server would already refuse: still 400, never 500.
    for bad in ("abc", "-1", "1.5", "\u0661"):
        assert call(app, "POST", "/items", b"{}", headers={"Content-Length": bad}, validate=False).status == 400


@pytest.mark.parametrize("path", ["/item", "/items/", "/items/1/", "/items/1/name", "/healthz/", "/stats/x", "//items"])
def test_unknown_route_is_404(app: Any, path: str) -> None:
    reply = call(app, "GET", path)
    assert reply.status == 404 and reply.json == {"error": "no such resource"}


def test_root_lists_the_routes_and_every_example_answers_200(app: Any, db: Cluster) -> None:
    reply = call(app, "GET", "/")
    assert reply.status == 200 and reply.served_by is None
    routes = reply.json["routes"]
    assert {(r["method"], r["path"]) for r in routes} == {
        ("GET", "/"), ("GET", "/items/{item_id}"), ("GET", "/items"), ("POST", "/items"),
        ("GET", "/healthz"), ("GET", "/stats")}
    assert all(r["description"] for r in routes)
    examples = [r["example"] for r in routes if "example" in r]
    assert len(examples) == 5 and all(r["method"] == "GET" for r in routes if "example" in r)
    for example in examples:
        assert call(app, "GET", example).status == 200, example


@pytest.mark.filterwarnings("ignore:Unknown REQUEST_METHOD")  # wsgiref's validator, about "get"
@pytest.mark.parametrize("method, path, allow", [
    ("DELETE", "/items", "GET, POST, HEAD"),
    ("PUT", "/items/1", "GET, HEAD"),
    ("PATCH", "/items/1", "GET, HEAD"),
    ("POST", "/items/1", "GET, HEAD"),
    ("POST", "/healthz", "GET, HEAD"),
    ("DELETE", "/stats", "GET, HEAD"),
    ("get", "/items", "GET, POST, HEAD"),  # methods are case-sensitive
])
def test_wrong_method_is_405_with_allow(app: Any, method: str, path: str, allow: str) -> None:
    reply = call(app, method, path)
    assert reply.status == 405 and reply.headers["allow"] == allow


def test_head_is_get_without_a_body(app: Any) -> None:
    reply = call(app, "HEAD", "/items/1")
    assert reply.status == 200 and reply.body == b"" and int(reply.headers["content-length"]) > 0


def test_healthz_and_stats(app: Any, db: Cluster) -> None:
    mode = app.settings.mode
    health = call(app, "GET", "/healthz")
    assert health.status == 200 and health.served_by in endpoint_names(db)
    assert health.json["status"] == "ok" and health.json["mode"] == mode
    assert {(e["name"], e["role"]) for e in health.json["endpoints"]} == {
        (name, "primary" if node == "primary" else "replica") for name, node in endpoint_names(db).items()}
    # No-pool mode reports "unknown" for a server it has not needed yet.
    assert {e["state"] for e in health.json["endpoints"]} <= ({"up", "unknown"} if mode == "nopool" else {"up"})
    stats = call(app, "GET", "/stats")
    assert stats.status == 200 and stats.served_by is None
    assert stats.json["mode"] == mode and stats.json["pid"] == os.getpid()
    assert {e["name"] for e in stats.json["endpoints"]} == set(endpoint_names(db))


@pytest.mark.parametrize("mode", ["threaded", "process"])
def test_the_app_bounds_every_statement_well_under_the_worker_timeout(db: Cluster, mode: str) -> None:
    """gunicorn kills a sync worker stuck for 30 s; a stalled server must cost one slow read,
    so the pooled apps set query_timeout to 5 s unless POOL_QUERY_TIMEOUT says otherwise."""
    app = create_app(app_environ(db, mode))
    assert app.db.pool().options.query_timeout == 5.0
    app.close()
    app = create_app({**app_environ(db, mode), "POOL_QUERY_TIMEOUT": "2.5"})
    assert app.db.pool().options.query_timeout == 2.5
    app.close()


def test_process_mode_refuses_to_run_under_threads(apps: dict[str, Any], expect_unhandled_error: None,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    app = apps["process"]
    under_threads = lambda env, start_response: app({**env, "wsgi.multithread": True}, start_response)  # noqa: E731
    reply = call(under_threads, "GET", "/items/1", allow_500=True)
    assert reply.status == 500 and reply.json == {"error": "internal server error"}
    assert any(r.exc_info and "single-threaded" in str(r.exc_info[1]) for r in caplog.records)


def test_last_resort_handler_hides_the_details(apps: dict[str, Any], expect_unhandled_error: None,
                                               caplog: pytest.LogCaptureFixture) -> None:
    class BrokenInput:  # a server whose input stream fails in a way nobody planned for
        def read(self, *args: Any) -> bytes:
            raise RuntimeError(f"secret detail {PASSWORD}")

    reply = call(apps["threaded"], "POST", "/items", b'{"name": "a"}', wsgi_input=BrokenInput(),
                 validate=False, allow_500=True)
    assert reply.status == 500 and reply.json == {"error": "internal server error"}
    logged = [r for r in caplog.records if r.name == "app" and r.levelno == logging.ERROR]
    assert logged and logged[0].exc_info is not None  # the traceback is in the server's log


@pytest.mark.parametrize("error", [ConnectionResetError(104, "Connection reset by peer"),
                                   TimeoutError("timed out")])
def test_a_client_that_goes_away_mid_body_is_a_400_logged_at_info(
        apps: dict[str, Any], caplog: pytest.LogCaptureFixture, error: OSError) -> None:
    class GoneClient:  # what gunicorn's wsgi.input raises when the peer resets or stalls
        def read(self, *args: Any) -> bytes:
            raise error

    caplog.set_level(logging.INFO, logger="app")
    reply = call(apps["threaded"], "POST", "/items", b'{"name": "a"}', wsgi_input=GoneClient(),
                 validate=False)
    assert reply.status == 400 and reply.json == {"error": "the request body was cut off"}
    records = [r for r in caplog.records if r.name == "app"]
    assert [(r.levelno, r.exc_info) for r in records] == [(logging.INFO, None)], records
    assert "client went away" in records[0].getMessage()
    assert type(error).__name__ in records[0].getMessage()


# --- part 1b: start-up, fork and outages, in-process -------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_create_app_does_no_io_and_an_unreachable_database_is_503(mode: str) -> None:
    primary, replica = Cluster.free_ports(2)  # nothing listens there
    app = create_app({"APP_POOL_MODE": mode,
                      "POOL_PRIMARY": f"host=127.0.0.1 port={primary} user=app password={PASSWORD}",
                      "POOL_REPLICAS": f"host=127.0.0.1 port={replica} user=app password={PASSWORD}"})
    try:
        assert getattr(app.db, "_pool", None) is None  # no pool yet: built on the first request
        assert_outage(call(app, "GET", "/items/1"))
        assert_outage(post_json(app, {"name": "a"}))
        assert call(app, "GET", "/healthz").json["status"] == "unavailable"
        assert call(app, "GET", "/stats").status == 200  # errors in it, but never the password
    finally:
        app.close()


@pytest.mark.parametrize("environ, message", [
    ({"APP_POOL_MODE": "pooled", "POOL_PRIMARY": "host=x"}, "APP_POOL_MODE must be one of"),
    ({"APP_POOL_MODE": "threaded"}, "POOL_PRIMARY is not set"),
    ({"POOL_PRIMARY": "host=x", "APP_MAX_BODY": "4k"}, "APP_MAX_BODY='4k' is not a valid int"),
    ({"POOL_PRIMARY": "host=x", "POOL_CONNECT_TIMEOUT": "-1"}, "POOL_CONNECT_TIMEOUT must be positive"),
])
def test_bad_configuration_fails_at_start(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_app(environ)


def bare_get(app: Any, target: str) -> int:
    """The status of a GET, with none of call()'s checks (for a forked child to report)."""
    seen: list[str] = []
    b"".join(app(setup_environ("GET", target), lambda status, headers, exc_info=None: seen.append(status)))
    return int(seen[0].split()[0])


@pytest.mark.parametrize("mode", ["threaded", "process"])
def test_a_forked_worker_builds_its_own_pool(db: Cluster, mode: str) -> None:
    """An app that served before a fork (think --preload): the child builds a pool of its own
    and the parent's connections survive the child, untouched."""
    app = create_app(app_environ(db, mode))
    try:
        for _ in range(2):  # a connection to each replica
            assert call(app, "GET", "/items/1").status == 200
        parent_pool = app.db._pool
        before = parent_pool.stats()
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report and leave without running any pytest machinery
            try:
                statuses = [bare_get(app, "/items/2") for _ in range(2)]
                child_pool = app.db._pool
                os.write(write_end, json.dumps({"own_pool": child_pool is not parent_pool,
                                                "checkouts": child_pool.stats()["checkouts"],
                                                "statuses": statuses}).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            report = json.loads(pipe.read() or b"{}")
        os.waitpid(pid, 0)
        assert report == {"own_pool": True, "checkouts": 2, "statuses": [200, 200]}, report
        for _ in range(2):  # the parent's connections still work: the child did not close them
            assert call(app, "GET", "/items/3").status == 200
        after = parent_pool.stats()
        assert app.db._pool is parent_pool
        assert (after["connects"], after["ejections"]) == (before["connects"], before["ejections"])
    finally:
        app.close()


# --- part 1c: outages, in-process -------------------------------------------------------------


def assert_outage(reply: Reply) -> None:
    assert reply.status == 503, reply.body
    assert reply.headers["retry-after"] == "1"
    assert reply.served_by is None  # no server answered
    assert reply.json == {"error": "database unavailable, retry shortly"}


def test_outages_are_503_with_retry_after(db: Cluster) -> None:
    apps = {mode: create_app(app_environ(db, mode)) for mode in MODES}
    names = endpoint_names(db)
    try:
        for app in apps.values():  # warm up: the pools hold connections to every server
            assert post_json(app, {"name": "warm"}).status == 201
            for _ in range(2):
                assert call(app, "GET", "/items/1").status == 200

        db.stop("primary")
        for mode, app in apps.items():
            assert_outage(post_json(app, {"name": "during the outage"}))
            reply = call(app, "GET", "/items/1")  # reads carry on from the replicas
            assert reply.status == 200 and names[reply.served_by] in REPLICAS, mode
            assert call(app, "GET", "/healthz").status == 200

        for replica in REPLICAS:
            db.stop(replica)
        for mode, app in apps.items():
            for target in ("/items/1", "/items?limit=5"):
                assert_outage(call(app, "GET", target))
            assert_outage(post_json(app, {"name": "during the outage"}))
            health = call(app, "GET", "/healthz")
            assert health.status == 503 and health.headers["retry-after"] == "1"
            assert health.json["status"] == "unavailable"
            assert call(app, "GET", "/stats").status == 200  # no database needed
            assert call(app, "GET", "/items/abc").status == 400  # validation comes first

        heal(db)
        # Back within the pool's probe backoff (capped at 3 s): until an endpoint's probe has
        # succeeded the pool keeps skipping it, so a write may still get a 503 at first.
        for mode, app in apps.items():
            wait_for(lambda: call(app, "GET", "/healthz").status == 200, 15, f"reads to recover ({mode})")
            wait_for(lambda: post_json(app, {"name": "after the outage"}).status == 201, 15,
                     f"writes to recover ({mode})")
    finally:
        for app in apps.values():
            app.close()
        heal(db)


# --- part 2: real gunicorn --------------------------------------------------------------------


@dataclasses.dataclass
class Server:
    mode: str
    port: int
    process: subprocess.Popen
    log: Path

    def request(self, method: str, target: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 10) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, target, body=body, headers=headers or {})
            resp = conn.getresponse()
            return check_reply(Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()))
        finally:
            conn.close()


def require_gunicorn() -> None:
    try:
        import gunicorn  # noqa: F401  (only: is it there?)
    except ImportError:
        require("gunicorn is not installed (pip install -r requirements-app.txt)")


@pytest.fixture(scope="module")
def servers(cluster: Cluster) -> Iterator[dict[str, Server]]:
    """The three gunicorn configs running side by side against the cluster."""
    require_gunicorn()
    logdir = Path(tempfile.mkdtemp(prefix="app-gunicorn-"))
    running: dict[str, Server] = {}
    try:
        for mode, port in zip(MODES, Cluster.free_ports(len(MODES))):  # distinct ports
            env = dict(os.environ, **app_environ(cluster, mode), APP_BIND=f"127.0.0.1:{port}",
                       APP_WORKERS="2", APP_THREADS="4", PYTHONPATH=str(ROOT))
            del env["APP_POOL_MODE"]  # each config picks its own
            running[mode] = spawn_gunicorn(mode, port, env, logdir / f"{mode}.log")
        for server in running.values():
            wait_until_serving(server)
        yield running
    finally:
        for server in running.values():
            stop_server(server)
        for server in running.values():
            assert "unhandled error" not in server.log.read_text(), server.log.read_text()[-3000:]
        shutil.rmtree(logdir, ignore_errors=True)


def spawn_gunicorn(mode: str, port: int, env: dict[str, str], log: Path) -> Server:
    """gunicorn with app/gunicorn_<mode>.py on ``port``, its output in ``log``."""
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", f"app/gunicorn_{mode}.py", "app.wsgi:application"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Server(mode, port, process, log)


def wait_until_serving(server: Server, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            pytest.fail(f"gunicorn ({server.mode}) exited {server.process.returncode}:\n{server.log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            if server.request("GET", "/healthz", timeout=2).status == 200:
                return
        if time.monotonic() > deadline:
            pytest.fail(f"gunicorn ({server.mode}) not serving after {timeout}s:\n{server.log.read_text()[-3000:]}")
        time.sleep(0.1)


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)  # graceful: workers finish, pools close
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()


@pytest.fixture(params=MODES)
def server(request: pytest.FixtureRequest, servers: dict[str, Server], db: Cluster) -> Server:
    return servers[request.param]


def gunicorn_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APP_", "POOL_"))}
    return dict(env, PYTHONPATH=str(ROOT), POOL_PRIMARY="host=127.0.0.1 port=1", **extra)


@pytest.mark.parametrize("mode, worker_class, workers, threads", [
    ("threaded", "gthread", 3, 5), ("process", "sync", 15, 1), ("nopool", "gthread", 3, 5),
])
def test_gunicorn_configs(mode: str, worker_class: str, workers: int, threads: int) -> None:
    require_gunicorn()
    config = f"app/gunicorn_{mode}.py"

    def print_config(**env: str) -> tuple[dict[str, str], subprocess.CompletedProcess]:
        result = subprocess.run([sys.executable, "-m", "gunicorn", "-c", config, "--print-config"], cwd=ROOT,
                                env=gunicorn_env(**env), capture_output=True, text=True, timeout=30)
        settings = dict(line.split(" = ", 1) for line in result.stdout.splitlines() if " = " in line)
        return {k.strip(): v.strip() for k, v in settings.items()}, result

    settings, result = print_config(APP_WORKERS="3", APP_THREADS="5")
    assert result.returncode == 0, result.stderr
    assert (settings["worker_class"], settings["workers"], settings["threads"]) == (worker_class, str(workers), str(threads))
    assert settings["preload_app"] == "False" and settings["control_socket_disable"] == "True"
    assert settings["forwarder_headers"] == "[]"  # no header may set SCRIPT_NAME or PATH_INFO
    assert settings["bind"] == "['0.0.0.0:8000']" and settings["accesslog"] == "-"
    assert int(settings["timeout"]) > 5 + 2 * 2 and settings["wsgi_app"] == "app.wsgi:application"

    # APP_ACCESS_LOG=off (the stacks, behind nginx, which logs every request) drops the line.
    settings, result = print_config(APP_ACCESS_LOG="off")
    assert result.returncode == 0 and settings["accesslog"] == "None", result.stderr
    settings, result = print_config(APP_ACCESS_LOG="maybe")
    assert result.returncode != 0 and "APP_ACCESS_LOG='maybe': say on or off" in result.stderr

    # gunicorn's master runs the config: it must not import psycopg2 or the pool.
    probe = ("import runpy, sys; runpy.run_path(%r); "
             "assert not {'psycopg2', 'pool', 'app.wsgi'} & set(sys.modules), sorted(sys.modules)") % config
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=gunicorn_env(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_gunicorn_process_also_serves_on_a_unix_socket(db: Cluster) -> None:
    """APP_BIND_UNIX: the Docker stack's nginx reaches the sync workers there (no TCP
    connection per request, so no TIME_WAIT per request in nginx's network namespace)."""
    require_gunicorn()
    home = Path(tempfile.mkdtemp(prefix="app-unix-"))
    path = home / "app-process.sock"
    port = Cluster.free_ports(1)[0]
    env = dict(gunicorn_env(), **app_environ(db, "process"), APP_BIND=f"127.0.0.1:{port}",
               APP_BIND_UNIX=str(path), APP_PROCESS_WORKERS="2")
    log = home / "gunicorn.log"
    server = spawn_gunicorn("process", port, env, log)
    try:
        wait_until_serving(server)  # over TCP, as the healthcheck and the direct port are

        class UnixConnection(http.client.HTTPConnection):
            def connect(self) -> None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(5)
                self.sock.connect(str(path))

        for _ in range(3):  # one connection per request: sync workers close after each
            conn = UnixConnection("localhost")
            try:
                conn.request("GET", "/items/1")
                resp = conn.getresponse()
                body = json.loads(resp.read())
            finally:
                conn.close()
            assert resp.status == 200 and body["id"] == 1, body
    finally:
        stop_server(server)
        assert "unhandled error" not in log.read_text(), log.read_text()[-3000:]
        shutil.rmtree(home, ignore_errors=True)
    assert not path.exists()  # a clean stop removes the socket file


def test_gunicorn_refuses_process_mode_under_threads() -> None:
    require_gunicorn()
    result = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "app/gunicorn_threaded.py", "--print-config"],
                            cwd=ROOT, env=gunicorn_env(APP_POOL_MODE="process"), capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "APP_POOL_MODE=process needs threads=1" in result.stderr


def test_gunicorn_serves_every_endpoint(server: Server, db: Cluster) -> None:
    names = endpoint_names(db)
    health = server.request("GET", "/healthz")
    assert health.status == 200 and health.json["mode"] == server.mode
    stats = server.request("GET", "/stats")
    assert stats.status == 200 and stats.json["mode"] == server.mode and stats.json["pid"] != os.getpid()
    if server.mode != "nopool":  # two worker processes: they share one health board
        assert stats.json["shared_state"], stats.json

    item = server.request("GET", "/items/7")
    assert item.status == 200 and item.json["name"] == "item-7" and names[item.served_by] in REPLICAS
    listing = server.request("GET", "/items?limit=3")
    assert listing.status == 200 and len(listing.json["items"]) == 3 and names[listing.served_by] in REPLICAS

    created = server.request("POST", "/items", json.dumps({"name": f"via {server.mode}"}).encode(),
                             {"Content-Type": "application/json"})
    assert created.status == 201 and names[created.served_by] == "primary"
    db.wait_replayed(timeout=10)
    assert server.request("GET", created.headers["location"]).json["name"] == f"via {server.mode}"

    assert server.request("GET", "/items/0").status == 400
    assert server.request("GET", "/items/999999999").status == 404
    assert server.request("GET", "/nowhere").status == 404
    reply = server.request("DELETE", "/items/1")
    assert reply.status == 405 and reply.headers["allow"] == "GET, HEAD"
    assert server.request("POST", "/items", b'{"name": "a"}', {"Content-Type": "text/plain"}).status == 415
    assert server.request("POST", "/items", b"x" * 5000, {"Content-Type": "application/json"}).status == 413
    # A chunked upload reaches the app without CONTENT_LENGTH: 411.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("POST", "/items", body=iter([b'{"name": "a"}']), encode_chunked=True,
                     headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
        assert conn.getresponse().status == 411
    finally:
        conn.close()


def test_stats_all_reports_every_worker_of_the_per_process_app(servers: dict[str, Server]) -> None:
    """GET /stats?all=1 answers for the whole app, not just the worker that answered: the
    per-process app's workers share a health board (pool/board.py)."""
    server = servers["process"]
    for _ in range(40):  # spread over the sync workers: each builds its pool on its first request
        assert server.request("GET", "/items/1").status in (200, 404)
    reply = server.request("GET", "/stats?all=1")
    assert reply.status == 200
    host = reply.json
    assert host["scope"] == "host" and host["shared_state"] is True
    assert host["processes"] >= 2 and len({w["pid"] for w in host["workers"]}) == host["processes"]
    assert all(e["workers_up"] >= 2 and e["workers_down"] == 0 for e in host["endpoints"])
    assert server.request("GET", "/stats?all=2").status == 400
    threaded = servers["threaded"].request("GET", "/stats?all=1").json
    # off by default in threaded mode, but app/gunicorn_threaded.py turns it on for 2+ workers
    assert threaded["scope"] == "host" and threaded["shared_state"] is True
    # ...on a board of its own: two apps on one host (the native stack) reported each other's
    # workers as their own, and learnt outages from each other (found by a new user's trial)
    assert {w["mode"] for w in host["workers"]} == {"process"}, host["workers"]
    assert {w["mode"] for w in threaded["workers"]} == {"threaded"}, threaded["workers"]
    assert threaded["board"] != host["board"]
    assert "scope" not in servers["nopool"].request("GET", "/stats?all=1").json


def test_every_response_names_the_worker_that_answered(servers: dict[str, Server]) -> None:
    """X-Worker is the answering process's pid, on every response (errors included): what the
    load tests use to report how each per-process worker came through an outage."""
    server = servers["process"]
    seen = set()
    for _ in range(40):
        reply = server.request("GET", "/items/1")
        seen.add(reply.headers["x-worker"])
        stats = server.request("GET", "/stats")
        assert stats.headers["x-worker"] == str(stats.json["pid"])
    workers = {str(w["pid"]) for w in server.request("GET", "/stats?all=1").json["workers"]}
    assert len(seen) >= 2 and seen <= workers, (seen, workers)
    assert server.request("GET", "/nope").headers["x-worker"] in workers
    assert server.request("POST", "/items", b"{").headers["x-worker"] in workers


def test_gunicorn_ignores_a_script_name_header(server: Server) -> None:
    """gunicorn would take SCRIPT_NAME (and PATH_INFO) from a local client's header, and answer a
    SCRIPT_NAME that is not a prefix of the path with its own HTML 500."""
    for name, value in (("SCRIPT_NAME", "/elsewhere"), ("SCRIPT_NAME", "/items"),
                        ("PATH_INFO", "/stats")):
        reply = server.request("GET", "/items/1", headers={name: value})  # check_reply: JSON, no 500
        assert reply.status == 200 and reply.json["id"] == 1, (name, value, reply)


def test_gunicorn_logs_a_client_reset_mid_body_at_info(server: Server) -> None:
    """A client that sends half its body and resets: no traceback, no 500 in the access log."""
    mark = server.log.stat().st_size
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        sock.sendall(b"POST /items HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 2000\r\n\r\n" + b'{"name": "' + b"x" * 100)
        time.sleep(0.3)  # let the worker block in wsgi.input.read()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
    finally:
        sock.close()

    def logged() -> str:
        with open(server.log, "rb") as f:
            f.seek(mark)
            return f.read().decode("utf-8", "replace")

    wait_for(lambda: '"POST /items HTTP/1.1" 400' in logged(), 10, f"the access log line ({server.mode})")
    text = logged()
    assert "[INFO] client went away while sending the body of POST '/items'" in text, text
    assert "Traceback" not in text and "unhandled error" not in text and '" 500 ' not in text, text


@pytest.mark.slow
def test_gunicorn_survives_a_replica_kill(servers: dict[str, Server], db: Cluster) -> None:
    """Reads stream into all three servers; replica1 is SIGKILLed, then restarted. Not one read
    may fail, and each server must be reading from replica1 again within 10 s of its restart."""
    replica1 = f"127.0.0.1:{db.port('replica1')}"
    stop = threading.Event()
    lock = threading.Lock()
    failures: list[str] = []
    last_seen: dict[str, float] = {}  # mode -> when replica1 last answered that server
    counts = dict.fromkeys(MODES, 0)

    def reader(server: Server, seed: int) -> None:
        n = seed
        while not stop.is_set():
            n += 1
            target = f"/items/{n % 10000 + 1}" if n % 4 else "/items?limit=5"
            try:
                reply = server.request("GET", target, timeout=10)
                ok = reply.status == 200
                detail = f"{reply.status} {reply.body[:200]!r}"
            except Exception as exc:  # noqa: BLE001 - refused, reset, timeout or a failed check
                ok, detail = False, repr(exc)
            with lock:
                counts[server.mode] += 1
                if not ok:
                    failures.append(f"{server.mode} GET {target}: {detail}")
                elif reply.served_by == replica1:
                    last_seen[server.mode] = time.monotonic()

    threads = [threading.Thread(target=reader, args=(server, i * 1000), daemon=True)
               for server in servers.values() for i in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: set(last_seen) == set(MODES), 10, "replica1 serving every server before the kill")
        time.sleep(0.3)
        db.kill("replica1")
        at_kill = dict(counts)
        time.sleep(1.5)  # reads keep flowing on replica2 meanwhile
        during_outage = {m: counts[m] - at_kill[m] for m in MODES}
        db.start_node("replica1")
        restarted = time.monotonic()
        wait_for(lambda: all(last_seen[m] > restarted for m in MODES), 10,
                 f"replica1 back in X-Served-By on every server (last seen: {last_seen})")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
        heal(db)
    assert not failures, f"{len(failures)} failed reads of {sum(counts.values())}: {failures[:10]}"
    assert all(during_outage.values()), f"a server stalled while replica1 was down: {during_outage}"


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
