"""The stacks' nginx configuration (compose/nginx/), run by the real nginx in front of a
recording upstream: what reaches gunicorn and what does not, keep-alive on both sides, request
buffering, the slow-client deadline, the per-client limit and nginx's own JSON errors; then in
front of the app's real gunicorn configs, whose own error answers must be JSON too.

Rendered by the same render.sh the container and the native stack use, with short timeouts and
small limits so each behaviour shows in a second. nginx runs unprivileged (as `nobody` when the
tests run as root), as both stacks run it. Skips without nginx, except under CI.
"""
from __future__ import annotations

import http.client
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import require
from native.cluster import Cluster
from native.services import find_nginx

ROOT = Path(__file__).resolve().parent.parent
NGINX_FILES = ROOT / "compose" / "nginx"


class Recorder(ThreadingHTTPServer):
    """An HTTP/1.1 upstream that records every request: (upstream connection, headers, when
    its body had arrived). GET /slow takes a second."""

    daemon_threads = True

    def __init__(self):
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), Handler)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so nginx's upstream keepalive can show

    def log_message(self, *args):
        pass

    def _serve(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.lock:
            self.server.requests.append({"conn": self.client_address[1], "path": self.path, "t": time.monotonic(),
                                         "headers": {k.lower(): v for k, v in self.headers.items()},
                                         "body": len(body)})
        if self.path == "/slow":
            time.sleep(1.0)
        data = json.dumps({"ok": True}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Served-By", "recorder:1")
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _serve


def start_nginx(upstreams: dict[str, str]) -> dict:
    """nginx with the stacks' configuration on three free ports, in front of `upstreams`
    ({"threaded": "127.0.0.1:port", "process": ..., "nopool": ...}); stop it with stop_nginx."""
    nginx = find_nginx()
    if nginx is None:
        require("nginx is not installed (apt-get install nginx)")
    # mkdtemp, not tmp_path: an unprivileged nginx cannot enter /tmp/pytest-of-root (0700).
    home = Path(tempfile.mkdtemp(prefix="nginx-test-", dir="/tmp"))
    os.chmod(home, 0o755)
    run = home / "run"
    run.mkdir()
    shutil.copy(NGINX_FILES / "json-errors.conf", home)
    taken = {int(u.rpartition(":")[2]) for u in upstreams.values() if not u.startswith("unix:")}
    while True:  # not a port an upstream was given
        threaded, process, nopool = Cluster.free_ports(3)
        if not taken & {threaded, process, nopool}:
            break
    env = {"PATH": os.environ["PATH"], "NGINX_RUN_DIR": str(run), "NGINX_ERROR_LOG": str(home / "error.log"),
           "NGINX_ACCESS_LOG": str(home / "access.log"),
           "NGINX_LISTEN_THREADED": f"127.0.0.1:{threaded}", "NGINX_LISTEN_PROCESS": f"127.0.0.1:{process}",
           "NGINX_LISTEN_NOPOOL": f"127.0.0.1:{nopool}",
           "NGINX_UPSTREAM_THREADED": upstreams["threaded"], "NGINX_UPSTREAM_PROCESS": upstreams["process"],
           "NGINX_UPSTREAM_NOPOOL": upstreams["nopool"],
           "NGINX_CLIENT_HEADER_TIMEOUT": "1s", "NGINX_MAX_CONN_PER_CLIENT": "2", "NGINX_MAX_BODY": "1k",
           "NGINX_WORKER_PROCESSES": "1"}
    subprocess.run(["sh", str(NGINX_FILES / "render.sh"), str(NGINX_FILES / "nginx.conf.template"),
                    str(home / "nginx.conf")], env=env, check=True)
    drop = {}
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        for path in (home, run):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        drop = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
    proc = subprocess.Popen([nginx, "-p", str(home), "-c", str(home / "nginx.conf"), "-e", str(home / "error.log"),
                             "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **drop)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", threaded), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"nginx did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
    ports = {"threaded": threaded, "process": process, "nopool": nopool}
    return {"ports": ports, "pid": proc.pid, "proc": proc, "home": home}


def stop_nginx(started: dict) -> None:
    started["proc"].terminate()
    started["proc"].wait(10)
    shutil.rmtree(started["home"], ignore_errors=True)


@pytest.fixture(scope="module")
def proxy():
    """nginx on three free ports: threaded and process in front of the recorder, nopool in
    front of a port nothing listens on."""
    recorder = Recorder()
    threading.Thread(target=recorder.serve_forever, daemon=True).start()
    (dead,) = Cluster.free_ports(1)
    try:
        started = start_nginx({"threaded": f"127.0.0.1:{recorder.server_port}",
                                "process": f"127.0.0.1:{recorder.server_port}", "nopool": f"127.0.0.1:{dead}"})
        yield {**started, "recorder": recorder}
        stop_nginx(started)
    finally:
        recorder.shutdown()


def request(port: int, method: str = "GET", path: str = "/x", body: bytes | None = None,
            headers: dict | None = None, conn: http.client.HTTPConnection | None = None):
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    return resp, resp.read(), conn


def last_seen(proxy, path: str) -> dict:
    recorded = [r for r in proxy["recorder"].requests if r["path"] == path]
    assert recorded, f"the upstream never saw {path}"
    return recorded[-1]


def test_hop_by_hop_and_underscore_headers_never_reach_the_app(proxy) -> None:
    sent = {"Keep-Alive": "timeout=99", "TE": "trailers", "Trailer": "X-T", "Upgrade": "h2c",
            "Proxy-Connection": "keep-alive", "Proxy-Authorization": "Basic eDp5", "SCRIPT_NAME": "/elsewhere",
            "PATH_INFO": "/stats", "X-Kept": "yes"}
    for mode, connection in (("threaded", None), ("process", "close")):
        resp, body, _ = request(proxy["ports"][mode], path=f"/hop-{mode}", headers=sent)
        assert resp.status == 200 and json.loads(body) == {"ok": True}
        seen = last_seen(proxy, f"/hop-{mode}")["headers"]
        for name in ("keep-alive", "te", "trailer", "upgrade", "proxy-connection", "proxy-authorization",
                     "script_name", "path_info"):
            assert name not in seen, (mode, name, seen)
        assert seen["x-kept"] == "yes" and seen["x-forwarded-for"] == "127.0.0.1"
        assert seen.get("connection") == connection, (mode, seen)  # keep-alive upstream only for gthread


def test_clients_are_kept_alive(proxy) -> None:
    conn = None
    for i in range(3):
        resp, _, conn = request(proxy["ports"]["process"], path=f"/ka-{i}", conn=conn)
        assert resp.status == 200 and not resp.will_close and resp.getheader("Connection") == "keep-alive"
    conn.close()


def test_upstream_connections_are_reused_for_gthread_only(proxy) -> None:
    for mode in ("threaded", "process"):
        for i in range(3):  # separate client connections, one after the other
            resp, _, conn = request(proxy["ports"][mode], path=f"/up-{mode}-{i}")
            conn.close()
            assert resp.status == 200
        conns = {last_seen(proxy, f"/up-{mode}-{i}")["conn"] for i in range(3)}
        assert len(conns) == (1 if mode == "threaded" else 3), (mode, conns)


def test_the_app_sees_a_request_only_once_its_body_is_complete(proxy) -> None:
    sock = socket.create_connection(("127.0.0.1", proxy["ports"]["threaded"]), timeout=5)
    body = b'{"name": "' + b"b" * 300 + b'"}'
    sock.sendall(b"POST /buffered HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:100])
    time.sleep(0.6)
    assert not [r for r in proxy["recorder"].requests if r["path"] == "/buffered"], "forwarded half a body"
    finished = time.monotonic()
    sock.sendall(body[100:])
    assert sock.recv(100).startswith(b"HTTP/1.1 200")
    sock.close()
    seen = last_seen(proxy, "/buffered")
    assert seen["t"] >= finished and seen["body"] == len(body)


def test_a_slow_header_is_cut_off_and_never_reaches_the_app(proxy) -> None:
    sock = socket.create_connection(("127.0.0.1", proxy["ports"]["threaded"]), timeout=5)
    t0 = time.monotonic()
    sock.sendall(b"GET /slowloris HTTP/1.1\r\nHost: t\r\n")
    closed = None
    for _ in range(20):  # a byte every 0.2 s: the header is never finished
        try:
            sock.sendall(b"X")
            time.sleep(0.2)
            sock.setblocking(False)
            if sock.recv(1) == b"":
                closed = time.monotonic() - t0
                break
        except BlockingIOError:
            pass
        except OSError:
            closed = time.monotonic() - t0
            break
        finally:
            sock.setblocking(True)
    sock.close()
    assert closed is not None and 0.9 <= closed < 2.5, closed  # client_header_timeout 1s, a total
    assert not [r for r in proxy["recorder"].requests if r["path"] == "/slowloris"]


def test_requests_beyond_the_per_client_limit_get_a_json_429(proxy) -> None:
    results: list[tuple[int, str, str | None]] = []

    def slow():
        resp, body, conn = request(proxy["ports"]["threaded"], path="/slow")
        results.append((resp.status, body.decode(), resp.getheader("Retry-After")))
        conn.close()

    threads = [threading.Thread(target=slow) for _ in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join()
    assert sorted(r[0] for r in results) == [200, 200, 429], results
    status, body, retry = next(r for r in results if r[0] == 429)
    assert json.loads(body) == {"error": "too many requests in progress from this client"} and retry == "1"


@pytest.mark.parametrize("case", ["413", "502", "400"])
def test_nginx_answers_its_own_errors_in_json(proxy, case) -> None:
    if case == "413":
        resp, body, _ = request(proxy["ports"]["threaded"], "POST", "/big", b"x" * 2048,
                                {"Content-Type": "application/json"})
        assert (resp.status, json.loads(body)) == (413, {"error": "the body is too large"})
    elif case == "502":  # the nopool upstream is a port nothing listens on
        resp, body, _ = request(proxy["ports"]["nopool"], path="/gone")
        assert resp.status == 502 and resp.getheader("Retry-After") == "1"
        assert json.loads(body) == {"error": "the app is not answering, retry shortly"}
    else:
        sock = socket.create_connection(("127.0.0.1", proxy["ports"]["threaded"]), timeout=5)
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")  # two Host headers
        head, _, body = sock.recv(4096).partition(b"\r\n\r\n")
        sock.close()
        assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head, head
        assert json.loads(body) == {"error": "bad request"}
        return
    assert resp.getheader("Content-Type") == "application/json"


def test_nginx_runs_unprivileged(proxy) -> None:
    pids = [proxy["pid"], *(int(p) for p in subprocess.run(["pgrep", "-P", str(proxy["pid"])],
                                                           capture_output=True, text=True).stdout.split())]
    assert len(pids) >= 2, pids  # the master and its worker
    for pid in pids:
        uid = int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                       if line.startswith("Uid:")).split()[1])
        assert uid != 0, f"nginx process {pid} runs as root"
    assert (proxy["home"] / "run" / "nginx.pid").read_text().strip() == str(proxy["pid"])


def raw_exchange(port: int, data: bytes, timeout: float = 5) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (no client library would send most of these) and read one answer:
    (status, headers with lower-case names, body)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(data)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
        head, sep, body = buf.partition(b"\r\n\r\n")
        assert sep, f"no complete answer to {data[:80]!r}: {buf[:300]!r}"
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "-1"))
        while len(body) < length or length < 0:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return int(lines[0].split()[1]), headers, body
    finally:
        sock.close()


def assert_json_error(answer: tuple[int, dict[str, str], bytes], status: int | tuple[int, ...], what) -> dict:
    got, headers, body = answer
    assert got in ((status,) if isinstance(status, int) else status), (what, got, headers, body[:300])
    assert headers.get("content-type") == "application/json", (what, headers, body[:300])
    data = json.loads(body)
    assert set(data) == {"error"} and isinstance(data["error"], str), (what, data)
    return data


H = b"\r\nHost: a\r\n\r\n"
# Requests nginx rejects before it has a URI, or with a URI it cannot use: each used to get an
# HTML 500 ("empty URI in redirect to named location") instead of a JSON 4xx.
MALFORMED = {
    "NUL escaped in the path": (b"GET /items/%00 HTTP/1.1" + H, 400),
    "escaped dot-dot above the root": (b"GET /%2e%2e/etc/passwd HTTP/1.1" + H, 400),
    "dot-dot above the root": (b"GET /../../etc/passwd HTTP/1.1" + H, 400),
    "a 9,000-character path": (b"GET /" + b"a" * 9000 + b" HTTP/1.1" + H, 414),
    "lower-case method": (b"get /items/1 HTTP/1.1" + H, 400),
    "a space in the path": (b"GET /items/ 1 HTTP/1.1" + H, 400),
    "CONNECT": (b"CONNECT evil:443 HTTP/1.1" + H, (400, 405)),
    "OPTIONS *": (b"OPTIONS * HTTP/1.1" + H, 400),
    "a raw NUL in the path": (b"GET /it\x00ems/1 HTTP/1.1" + H, 400),
    "the HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", (400, 505)),
    "not HTTP at all": (b"HELLO THERE FRIEND\r\n\r\n", 400),
    "TRACE": (b"TRACE / HTTP/1.1" + H, 405),
    "an unsupported HTTP version": (b"GET / HTTP/9.9" + H, 505),
    "Transfer-Encoding: gzip": (b"POST /items HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    "a header over 8k": (b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_requests_get_a_json_4xx_from_nginx(proxy, case) -> None:
    data, status = MALFORMED[case]
    before = len(proxy["recorder"].requests)
    for mode in ("threaded", "nopool"):  # nopool: no upstream at all, still nginx's JSON
        assert_json_error(raw_exchange(proxy["ports"][mode], data), status, (case, mode))
    assert len(proxy["recorder"].requests) == before, "a malformed request reached the upstream"
    assert "empty URI in redirect" not in (proxy["home"] / "error.log").read_text()


def test_nginx_s_error_locations_are_not_reachable_as_pages(proxy) -> None:
    """The internal locations that render nginx's errors answer a client like any unknown path
    nginx serves itself: a JSON 404, never an HTML page."""
    for path in ("/_nginx_error/400", "/_nginx_error/502"):
        assert_json_error(raw_exchange(proxy["ports"]["threaded"], f"GET {path} HTTP/1.1".encode() + H), 404, path)


# --- in front of the real gunicorn -----------------------------------------------------------


@pytest.fixture(scope="module")
def gunicorn_proxy():
    """The app's gunicorn configs (gthread and sync, this interpreter's gunicorn) with a database
    that is not there, nginx in front of them: what gunicorn rejects never reaches the app, and
    the app answers its 4xx without a query."""
    try:
        import gunicorn  # noqa: F401  (only: is it there?)
    except ImportError:
        require("gunicorn is not installed (pip install -r requirements-app.txt)")
    logdir = Path(tempfile.mkdtemp(prefix="nginx-gunicorn-"))
    threaded, process, dead = Cluster.free_ports(3)
    running = {}
    started = None
    try:
        for mode, port in (("threaded", threaded), ("process", process)):
            env = dict(os.environ, APP_BIND=f"127.0.0.1:{port}", APP_WORKERS="1", APP_THREADS="2",
                       APP_ACCESS_LOG="off", PYTHONPATH=str(ROOT),
                       POOL_PRIMARY=f"host=127.0.0.1 port={dead} dbname=app user=app")
            env.pop("APP_POOL_MODE", None)
            with open(logdir / f"{mode}.log", "wb") as out:
                running[mode] = subprocess.Popen(
                    [sys.executable, "-m", "gunicorn", "-c", f"app/gunicorn_{mode}.py", "app.wsgi:application"],
                    cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        direct = {"threaded": threaded, "process": process}
        for mode, port in direct.items():
            deadline = time.monotonic() + 20
            while True:
                try:
                    if request(port, path="/nope")[0].status == 404:
                        break
                except OSError:
                    pass
                if running[mode].poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"gunicorn ({mode}) is not serving: {(logdir / f'{mode}.log').read_text()[-2000:]}")
                time.sleep(0.1)
        started = start_nginx({"threaded": f"127.0.0.1:{threaded}", "process": f"127.0.0.1:{process}",
                               "nopool": f"127.0.0.1:{dead}"})
        yield {**started, "direct": direct, "logdir": logdir}
    finally:
        if started:
            stop_nginx(started)
        for proc in running.values():
            proc.send_signal(signal.SIGTERM)
        for proc in running.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(logdir, ignore_errors=True)


# Requests nginx passes on and gunicorn (27 above all; Debian's 23 lets some through to the app)
# refuses: its answer used to be an HTML page echoing the request line.
GUNICORN_REJECTS = {
    "a raw UTF-8 character in the path": (b"GET /\xc3\xadtems/1 HTTP/1.1" + H, 400),
    "a raw 0xff byte in the path": (b"GET /\xffitems/1 HTTP/1.1" + H, 400),
    "a control character in a header value": (b"GET /items/1 HTTP/1.1\r\nHost: a\r\nX-A: a\x01b\r\n\r\n", 400),
    "a 5,000-character path": (b"GET /" + b"a" * 5000 + b" HTTP/1.1" + H, (400, 414)),  # under nginx's 8k
}


@pytest.mark.parametrize("case", GUNICORN_REJECTS)
def test_what_gunicorn_rejects_is_a_json_4xx_without_an_echo(gunicorn_proxy, case) -> None:
    data, expected = GUNICORN_REJECTS[case]
    for mode in ("threaded", "process"):
        for where, port in (("nginx", gunicorn_proxy["ports"][mode]), ("gunicorn", gunicorn_proxy["direct"][mode])):
            status, headers, body = raw_exchange(port, data)
            if status == 404:  # Debian's gunicorn passes some on: the app's JSON 404 for the path
                expected = 404
            error = assert_json_error((status, headers, body), expected, (case, mode, where))["error"]
            assert error in ("bad request", "the request line is too large", "no such resource"), error
@pytest.mark.parametrize("method, path, body, status, message", [
    ("GET", "/nope", None, 404, "no such resource"),
    ("GET", "/items/abc", None, 400, None),
    ("POST", "/items", b"x", 415, "Content-Type must be application/json"),
    ("DELETE", "/items/1", None, 405, "method not allowed"),
])
def test_the_app_s_own_errors_pass_through_nginx_unchanged(gunicorn_proxy, method, path, body, status,
                                                           message) -> None:
    answers = []
    for port in (gunicorn_proxy["ports"]["threaded"], gunicorn_proxy["direct"]["threaded"]):
        resp, data, conn = request(port, method, path, body, {"Content-Type": "text/plain"} if body else None)
        conn.close()
        assert resp.status == status and resp.getheader("Content-Type") == "application/json", (path, resp.status, data)
        answers.append(json.loads(data))
    assert answers[0] == answers[1], answers  # the app's own words, through nginx
    assert message is None or answers[0] == {"error": message}
