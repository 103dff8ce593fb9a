"""Host-side helper for mk/stack.mk's Docker targets (standard library only).

    python compose/stackctl.py wait [--timeout 180] [--services primary replica1 ...]
        Poll until the named services (default: all) are up: database containers healthy,
        each named replica streaming according to the primary's pg_stat_replication, each app
        answering GET /healthz with 200 on its direct port, nginx answering it on all three
        public ports. A progress line every few seconds; exits 1 (with `docker compose ps` and
        the failing services' last log lines) on timeout or if a container has exited.
    python compose/stackctl.py urls
        Print the published endpoints (URLs that answer 200).
    python compose/stackctl.py status | promote NODE | rejoin NODE | lag-replica NODE --seconds N
                               | restore | current-primary
        The replication topology (topology/): which node is primary, its timeline, each
        replica's upstream and lag; make a replica the primary (switchover if the primary runs:
        it is stopped first; failover if it is down); an old primary back as a replica through
        pg_rewind; pause a replica's WAL replay for a while; back to the initial topology; the
        current primary's name. --events FILE appends one {event, t} JSON line per step.

Runs `docker compose` with the repository's docker-compose.yml; COMPOSE_PROJECT_NAME and the
port variables (.env, exported by the Makefile) are honoured. SQL runs inside the containers
(`docker compose exec ... psql` as the OS user postgres over the socket: peer authentication,
so no superuser password is needed on the host).
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository's topology package (standard library only)

from topology import OpError, ReplicaSet, Topology, event_writer, format_status  # noqa: E402
COMPOSE = ["docker", "compose", "-f", str(ROOT / "docker-compose.yml")]
DB = ("primary", "replica1", "replica2")
# Public ports (nginx) and each app's own gunicorn port (for comparisons), per app.
APPS = {"app-threaded": ("APP_THREADED_PORT", 8001), "app-process": ("APP_PROCESS_PORT", 8002),
        "app-nopool": ("APP_NOPOOL_PORT", 8003)}
DIRECT = {"app-threaded": ("APP_THREADED_DIRECT_PORT", 18001),
          "app-process": ("APP_PROCESS_DIRECT_PORT", 18002),
          "app-nopool": ("APP_NOPOOL_DIRECT_PORT", 18003)}
PROXY = "nginx"
ROUTES_HINT = "(also /, /items?limit=5, /healthz, /stats)"
DB_PORTS = {"primary": ("PRIMARY_PORT", 15432), "replica1": ("REPLICA1_PORT", 15433),
            "replica2": ("REPLICA2_PORT", 15434)}
STATE_DIR = "/var/lib/stack"  # the `topology` volume inside the database containers
PASSFILE = "/var/lib/postgresql/replication.pgpass"
PSQL = "exec psql -X -q -A -t -v ON_ERROR_STOP=1 -h /var/run/postgresql -U postgres -d postgres 2>&1"


def port(table: dict, name: str) -> int:
    var, default = table[name]
    return int(os.environ.get(var) or default)


def compose(*args: str, timeout: float = 30, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*COMPOSE, *args], capture_output=True, text=True, timeout=timeout,
                          input=input)


def containers() -> dict[str, dict]:
    """service -> {State, Health, ...} from `docker compose ps --all --format json`."""
    out = compose("ps", "--all", "--format", "json").stdout.strip()
    if not out:
        return {}
    rows = json.loads(out) if out.startswith("[") else [json.loads(l) for l in out.splitlines() if l]
    return {r["Service"]: r for r in rows}


class PsqlSession:
    """One psql inside a node's container for the life of this process, fed over stdin.

    A `docker compose exec` costs 0.1 s on an idle machine and half a second or more under load,
    and a promotion makes a few dozen queries; in a session each costs about a millisecond. After
    each query the session echoes a marker line, so the output up to it is the query's. psql
    runs with ON_ERROR_STOP, so an error ends the session (its output ends with the message) and
    the next query opens a new one."""

    END = "__stackctl_end_of_query__"

    def __init__(self, node: str) -> None:
        self.node = node
        self.proc = subprocess.Popen([*COMPOSE, "exec", "-T", node, "sh", "-c", PSQL],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True, name=f"psql-{node}").start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)  # EOF: psql (or the exec) ended

    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, query: str, timeout: float) -> str:
        query = query.strip()
        if not query.endswith(";"):
            query += ";"  # a pending statement would swallow the marker below
        try:
            self.proc.stdin.write(f"{query}\n\\echo {self.END}\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # it has ended: its last words are in the queue
        out, deadline = [], time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                raise OpError(f"[{self.node}] psql did not answer within {timeout:.0f}s") from None
            if line == self.END:
                return "\n".join(out).strip()
            if line is None:
                raise OpError(f"[{self.node}] psql failed: {chr(10).join(out).strip()[-1000:] or 'no answer'}")
            out.append(line)

    def close(self) -> None:
        if self.alive():
            self.proc.kill()


class DockerReplicaSet(ReplicaSet):
    """topology.ReplicaSet's primitives for the compose stack."""

    kind = "docker"

    PS_TTL = 1.0  # seconds a `docker compose ps` answer is reused (each costs ~0.5 s)

    def __init__(self, say=None, on_event=None) -> None:
        super().__init__(say, on_event)
        self._config: dict | None = None
        self._ps: tuple[float, dict] = (0.0, {})
        self._sessions: dict[str, PsqlSession] = {}
        # This process's own reading of the state volume, dropped whenever something else may
        # have changed it: an entrypoint clears its node's fence when it starts.
        self._topology: Topology | None = None

    def containers(self) -> dict[str, dict]:
        """containers(), reused for PS_TTL; stop() and start() forget it (they change it)."""
        at, ps = self._ps
        if time.monotonic() - at > self.PS_TTL:
            ps = containers()
            self._ps = (time.monotonic(), ps)
        return ps

    def config(self) -> dict:
        """`docker compose config` (addresses, roles, the state volume's and image's names)."""
        if self._config is None:
            proc = compose("config", "--format", "json", timeout=60)
            if proc.returncode != 0:
                raise OpError(f"docker compose config failed: {proc.stderr.strip()[-500:]}")
            self._config = json.loads(proc.stdout)
        return self._config

    def address(self, node: str) -> str:
        return self.config()["services"][node]["networks"]["db"]["ipv4_address"]

    def running(self, node: str) -> bool:
        return self.containers().get(node, {}).get("State") == "running"

    def exec(self, node: str, *cmd: str, input: str | None = None, timeout: float = 30) -> str:
        try:
            proc = compose("exec", "-T", node, *cmd, input=input, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise OpError(f"[{node}] {cmd[0]} did not answer within {timeout:.0f}s") from None
        if proc.returncode != 0:
            raise OpError(f"[{node}] {cmd[0]} failed: {(proc.stderr or proc.stdout).strip()[-1000:]}")
        return proc.stdout.strip()

    def sql(self, node: str, query: str, timeout: float = 30) -> str:
        session = self._sessions.get(node)
        if session is None or not session.alive():
            session = self._sessions[node] = PsqlSession(node)
        return session.run(query, timeout)

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()

    def _forget(self, node: str) -> None:
        """After this process stopped or started ``node``."""
        self._ps = (0.0, {})
        self._topology = None
        session = self._sessions.pop(node, None)
        if session is not None:
            session.close()

    def stop(self, node: str) -> None:
        proc = compose("stop", node, timeout=90)  # SIGINT: fast shutdown (stop_grace_period 30s)
        self._forget(node)
        if proc.returncode != 0:
            raise OpError(f"docker compose stop {node} failed: {proc.stderr.strip()}")

    def start(self, node: str) -> None:
        """`docker compose start`; then wait until the server answers, with progress (a fenced
        node first waits for the primary and runs pg_rewind in its entrypoint)."""
        proc = compose("start", node, timeout=90)
        self._forget(node)
        if proc.returncode != 0:
            raise OpError(f"docker compose start {node} failed: {proc.stderr.strip()}")
        t0 = last = time.monotonic()
        while True:
            state = containers().get(node, {}).get("State")
            if state in ("exited", "dead"):
                logs = compose("logs", "--no-color", "--tail", "15", node).stdout
                raise OpError(f"{node} exited while starting; its last log lines:\n{logs}")
            if state == "running":
                try:
                    self.sql(node, "SELECT 1", timeout=10)
                    return
                except OpError:
                    pass
            now = time.monotonic()
            if now - t0 > 300:
                raise OpError(f"{node} does not answer 300s after its start (make logs SERVICE={node})")
            if now - last >= 5:
                self.say(f"  waiting for {node} to start ({now - t0:.0f}s; `make logs SERVICE={node}` "
                         "shows what it does)")
                last = now
            time.sleep(0.5)

    def _state_node(self) -> str | None:
        ps = self.containers()
        return next((n for n in DB if ps.get(n, {}).get("State") == "running"), None)

    def topology(self) -> Topology:
        if self._topology is None:
            self._topology = self._read_topology()
        return self._topology

    def _read_topology(self) -> Topology:
        listing = ("cd %s 2>/dev/null || exit 0; for f in primary rewind-*; do "
                   "[ -e \"$f\" ] && printf '%%s=%%s\\n' \"$f\" \"$(head -n 1 \"$f\")\"; done; true" % STATE_DIR)
        node = self._state_node()
        if node is not None:
            out = self.exec(node, "sh", "-c", listing)
        else:  # no node runs: read the volume through a throwaway container of the same image
            cfg = self.config()
            proc = subprocess.run(["docker", "run", "--rm", "--network", "none", "-v",
                                   f"{cfg['volumes']['topology']['name']}:{STATE_DIR}:ro",
                                   "--entrypoint", "sh", cfg["services"]["primary"]["image"],
                                   "-c", listing], capture_output=True, text=True, timeout=120)
            if proc.returncode != 0:
                raise OpError(f"cannot read the topology volume: {proc.stderr.strip()[-500:]}")
            out = proc.stdout
        return Topology.from_files(dict(line.split("=", 1) for line in out.splitlines() if "=" in line))

    def _write_state(self, script: str, *args: str) -> None:
        self._topology = None
        node = self._state_node()
        if node is None:
            raise OpError("no database container is running: `make up` first")
        self.exec(node, "sh", "-c", script, "sh", *args)

    def set_primary(self, node: str) -> None:
        self._write_state(f'printf "%s\\n" "$1" > {STATE_DIR}/.primary.tmp && '
                          f'mv {STATE_DIR}/.primary.tmp {STATE_DIR}/primary', node)

    def set_rewind(self, node: str, needed: bool) -> None:
        self._write_state(f'{"touch" if needed else "rm -f"} "{STATE_DIR}/rewind-$1"', node)

    def upstream_conninfo(self, node: str, primary: str) -> str:
        repl_user = self.config()["services"][node]["environment"]["REPL_USER"]
        return (f"host={primary} hostaddr={self.address(primary)} port=5432 user={repl_user} "
                f"passfile={PASSFILE}")

    def node_at(self, host: str, port: str) -> str | None:
        if host in DB:
            return host
        return next((n for n in DB if self.address(n) == host), None)

    def replication(self) -> dict[str, str]:
        """{replica: walsender state} on the current primary; {} if it does not answer."""
        try:
            return self.replication_states(self.topology().primary)
        except (OpError, subprocess.TimeoutExpired, ValueError):
            return {}


def healthz(port_number: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port_number}/healthz", timeout=3) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def wait(services: list[str], timeout: float) -> int:
    """Database nodes: the current primary healthy, every other node streaming from it (and
    healthy), except fenced ones (a former primary waiting for `make rejoin`); apps: /healthz 200."""
    rs = DockerReplicaSet()
    try:
        return _wait(rs, services, timeout)
    finally:
        rs.close()


def _wait(rs: DockerReplicaSet, services: list[str], timeout: float) -> int:
    t0 = time.monotonic()
    last_line, last_print = "", 0.0
    while True:
        ps = containers()
        state, done = {}, True
        try:
            topo = rs._read_topology()  # fresh each time: entrypoints clear their fences
        except (OpError, subprocess.TimeoutExpired, ValueError):
            topo = Topology()
        primary = topo.primary
        repl = rs.replication() if any(s in DB and s != primary for s in services) else {}
        for svc in services:
            c = ps.get(svc)
            if svc in topo.rewind and (c is None or c.get("State") != "running"):
                state[svc], ok = "fenced", True  # not expected to run before `make rejoin`
            elif c is None:
                state[svc], ok = "missing", False
            elif c.get("State") != "running":
                state[svc], ok = c.get("State", "?"), False
                if c.get("State") in ("exited", "dead") and time.monotonic() - t0 > 5:
                    return fail(services, f"{svc} is {c.get('State')} ({c.get('Status', '')})")
            elif svc in APPS:
                code = healthz(port(DIRECT, svc))
                state[svc], ok = (f"/healthz {code}" if code else "no answer"), code == 200
            elif svc == PROXY:
                codes = sorted({healthz(port(APPS, app)) for app in APPS})
                state[svc], ok = "/healthz " + "/".join(map(str, codes)), codes == [200]
            elif svc in DB and svc != primary:
                state[svc] = repl.get(svc, "?")
                ok = state[svc] == "streaming" and c.get("Health") == "healthy"
                if state[svc] == "streaming" and not ok:
                    state[svc] += f" ({c.get('Health') or 'starting'})"
            else:
                state[svc] = c.get("Health") or "running"
                ok = state[svc] == "healthy"
            done = done and ok
        elapsed = time.monotonic() - t0
        line = "  ".join(f"{k}={v}" for k, v in state.items())
        if done:
            print(f"ready after {elapsed:.0f}s: {line}", flush=True)
            return 0
        if elapsed > timeout:
            return fail(services, f"not ready after {timeout:.0f}s: {line}")
        if line != last_line or time.monotonic() - last_print > 5:
            print(f"[{elapsed:4.0f}s] waiting: {line}", flush=True)
            last_line, last_print = line, time.monotonic()
        time.sleep(1)


def fail(services: list[str], message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    print(compose("ps", "--all").stdout, file=sys.stderr)
    ps = containers()
    for svc in services:
        c = ps.get(svc, {})
        if c.get("State") != "running" or c.get("Health") not in (None, "", "healthy"):
            logs = compose("logs", "--no-color", "--tail", "25", svc).stdout
            print(f"--- last log lines of {svc} ---\n{logs}", file=sys.stderr)
    return 1


def urls() -> int:
    for name in APPS:
        print(f"{name:13} http://127.0.0.1:{port(APPS, name)}/items/1  {ROUTES_HINT}  "
              f"(nginx; gunicorn direct: :{port(DIRECT, name)})")
    db, user = os.environ.get("APP_DB", "app"), os.environ.get("APP_USER", "app")
    for name in DB:
        print(f"{name:13} postgresql://{user}@127.0.0.1:{port(DB_PORTS, name)}/{db}  "
              "(password: APP_PASSWORD in .env)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="stackctl.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wait")
    w.add_argument("--timeout", type=float, default=180)
    w.add_argument("--services", nargs="+", default=[*DB, *APPS, PROXY], choices=[*DB, *APPS, PROXY])
    sub.add_parser("urls")
    sub.add_parser("status")
    sub.add_parser("restore")
    sub.add_parser("current-primary")
    for name in ("promote", "rejoin", "lag-replica"):
        p = sub.add_parser(name)
        p.add_argument("node", choices=DB)
        p.add_argument("--events", metavar="FILE")
        if name == "lag-replica":
            p.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args(argv)
    if args.cmd == "wait":
        return wait(args.services, args.timeout)
    if args.cmd == "urls":
        return urls()
    rs = DockerReplicaSet(say=lambda text: print(text, file=sys.stderr, flush=True),
                          on_event=event_writer(getattr(args, "events", None)))
    try:
        return _run(rs, args)
    finally:
        rs.close()


def _run(rs: DockerReplicaSet, args: argparse.Namespace) -> int:
    try:
        if args.cmd == "current-primary":
            print(rs.topology().primary)
            return 0
        if args.cmd == "promote":
            rs.promote(args.node)
        elif args.cmd == "rejoin":
            rs.rejoin(args.node)
        elif args.cmd == "lag-replica":
            rs.lag_replica(args.node, args.seconds)
            return 0
        elif args.cmd == "restore":
            changed = not rs.topology().initial
            rs.restore_initial()  # also starts any node that is down
            if not changed:
                return 0
        print(format_status(rs.status()))
    except (OpError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
