"""A primary and two streaming replicas from the local PostgreSQL server binaries.

This is the same topology as the containerised deployment (it uses the same files from
compose/postgres/: postgresql.conf, the pg_hba.conf template and init-primary.sh), run as plain
processes on 127.0.0.1, for pytest fixtures and for `python -m native`.

    from native.cluster import Cluster
    c = Cluster("/tmp/x", ports=Cluster.free_ports(3), durable=False)
    c.start()                       # initdb + init + 2 x pg_basebackup, or resume existing data
    psycopg2.connect(c.dsn("replica1"))
    c.kill("primary"); c.start_node("primary"); c.wait_streaming()
    c.promote("replica1")           # switchover (primary running: stopped first) or failover
    c.rejoin("primary")             # the old primary back as a replica, through pg_rewind
    c.lag_replica("replica2", 5)    # pause WAL replay for 5 s, then let it catch up
    c.restore_initial()             # `primary` the primary again, everything streaming
    c.destroy()

Layout of basedir (kept small so Unix socket paths stay short):

    .native-cluster        marker + settings (JSON): ports, pg version; destroy() insists on it
    primary/ replica1/ replica2/    data directories (0700, owned by the server's OS user)
    log/<node>.log         each node's server log (stderr of the postmaster)
    run/                   Unix socket directory (never /var/run/postgresql)
    replication.pgpass     passfile for primary_conninfo and pg_rewind's source (0600)
    topology/              which node is the primary now, and which are fenced (topology/state.py;
                           the same layout the Docker stack keeps in its `topology` volume)

Roles can change: promote() makes a replica the primary and rejoin() brings the old primary back
as a replica (the procedures are topology.ReplicaSet's, shared with the Docker stack). Every method
that talks to "the primary" asks the topology which node that is; start_node() starts a node as
the topology says (a fenced former primary goes through pg_rewind first), so a crash restart never
revives an old primary next to the new one.

Root: initdb and postgres refuse to run as root, so when this runs as root every server-side
binary (initdb, pg_ctl/postgres, pg_basebackup) runs as the `postgres` OS user (override with
NATIVE_PG_OSUSER) and the directories are chowned to it; basedir and all its parents must be
traversable by that user (a 0700 directory such as /tmp/pytest-of-root is not). As a normal user
everything runs as that user. Clients (psql, init-primary.sh) always run as the caller, over TCP
with scram passwords.
"""
from __future__ import annotations

import concurrent.futures
import grp
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

from topology import INITIAL_PRIMARY, OpError, ReplicaSet, StateDir, Topology, sync_standby_names

__all__ = ["Cluster", "ClusterError", "NODES", "REPLICAS", "load_env", "find_bindir"]

log = logging.getLogger("native")

NODES = ("primary", "replica1", "replica2")
REPLICAS = NODES[1:]

REPO_ROOT = Path(__file__).resolve().parent.parent
POSTGRES_FILES = REPO_ROOT / "compose" / "postgres"
ENV_FILE = REPO_ROOT / ".env"

# The committed .env values (throwaway local defaults), used if .env cannot be read.
DEFAULT_ENV = {
    "PRIMARY_PORT": "15432",
    "REPLICA1_PORT": "15433",
    "REPLICA2_PORT": "15434",
    "APP_DB": "app",
    "APP_USER": "app",
    "APP_PASSWORD": "app-local-only",
    "REPL_USER": "replicator",
    "REPL_PASSWORD": "replicator-local-only",
    "REWIND_USER": "rewinder",
    "REWIND_PASSWORD": "rewinder-local-only",
    "POSTGRES_PASSWORD": "postgres-local-only",
    "SYNC": "off",
}
PORT_KEYS = ("PRIMARY_PORT", "REPLICA1_PORT", "REPLICA2_PORT")
MARKER = ".native-cluster"
_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]*$")


class ClusterError(OpError):
    """Something went wrong with a node; the message names the node and ends with its log tail.
    (A topology.OpError, the error of the promote/rejoin procedures, so one except clause catches
    both.)"""

    def __init__(self, message: str, node: str | None = None, log_tail: str | None = None):
        self.node = node
        self.log_tail = log_tail
        text = f"[{node}] {message}" if node else message
        if log_tail:
            text += f"\n--- last lines of the {node} server log ---\n{log_tail}"
        super().__init__(text)


def load_env(environ: dict | None = None, env_file: Path | str | None = ENV_FILE) -> dict:
    """DEFAULT_ENV, overlaid by the repo's .env file, overlaid by `environ` (known keys only)."""
    env = dict(DEFAULT_ENV)
    if env_file and Path(env_file).is_file():
        for line in Path(env_file).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, _, value = line.partition("=")
                if key.strip() in env:
                    env[key.strip()] = value.strip().strip("'\"")
    for key in env:
        if environ and environ.get(key):
            env[key] = environ[key]
    return env


def _version_key(path: Path) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", path.parent.name)) or (0,)


def find_bindir() -> Path:
    """PG_BINDIR, else the newest /usr/lib/postgresql/<N>/bin, else wherever initdb is on PATH."""
    wanted = ("initdb", "pg_ctl", "postgres", "pg_basebackup", "psql", "pg_isready")
    candidates: list[Path] = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(Path(os.environ["PG_BINDIR"]))
    else:
        candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
        which = shutil.which("initdb")
        if which:
            candidates.append(Path(which).resolve().parent)
    for cand in candidates:
        if all(os.access(cand / exe, os.X_OK) for exe in wanted):
            return cand
    raise ClusterError(
        "no PostgreSQL server binaries found (looked in "
        + (", ".join(map(str, candidates)) or "/usr/lib/postgresql/*/bin and PATH")
        + f"; need {', '.join(wanted)}). Install the server package (e.g. apt-get install "
        "postgresql-15) or set PG_BINDIR to the directory holding initdb and pg_ctl."
    )


def _conninfo(**params) -> str:
    """libpq key=value string with proper quoting."""
    parts = []
    for key, value in params.items():
        if value is None:
            continue
        value = str(value)
        if value == "" or re.search(r"[\s'\\]", value):
            value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        parts.append(f"{key}={value}")
    return " ".join(parts)


def _pgpass_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process from /proc, or None if it does not exist."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = data.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    if Path("/proc").is_dir():
        st = _proc_stat(pid)
        return st is not None and st[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _proc_stat(int(entry.name))
            if st:
                children.setdefault(st[1], []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Cluster:
    """Primary + replica1 + replica2 on 127.0.0.1 in `basedir`.

    Cluster(basedir, ports=(p, p1, p2), env=None, durable=None)

    ports: TCP ports of primary, replica1, replica2 (default: PRIMARY_PORT, REPLICA1_PORT,
      REPLICA2_PORT from env). env: credentials/names as in .env (APP_DB, APP_USER, APP_PASSWORD,
      REPL_USER, REPL_PASSWORD, REWIND_USER, REWIND_PASSWORD, POSTGRES_PASSWORD, SYNC); missing
      keys come from load_env() (the repo's .env plus the process environment). SYNC=on:
      synchronous replication, synchronous_standby_names 'ANY 1 (<the two other nodes>)' on
      every node (written to node.conf at each start; apply_sync() applies a change to running
      nodes with a reload). durable=False: throwaway test cluster, fsync=off and
      no syncing in initdb/pg_basebackup/pg_rewind (fine for SIGKILL tests, unsafe for an OS
      crash); recorded in basedir, so None (the default) means "as created", or True for a new
      cluster, and `python -m native` run against a test cluster keeps it throwaway.
    """

    nodes = NODES
    replicas = REPLICAS

    def __init__(self, basedir, ports=None, env: dict | None = None, durable: bool | None = None):
        self.basedir = Path(basedir).absolute()
        base_env = load_env(os.environ)
        self.env = {**base_env, **(env or {})}
        if ports is None:
            ports = [int(self.env[k]) for k in PORT_KEYS]
        if len(ports) != 3:
            raise ValueError("ports must be (primary, replica1, replica2)")
        self.ports = dict(zip(NODES, (int(p) for p in ports)))
        # None: as the cluster in basedir was created (so `python -m native` run against a test
        # cluster keeps it throwaway), else durable.
        self.durable = self._state().get("durable", True) if durable is None else durable
        for key in ("APP_DB", "APP_USER", "REPL_USER", "REWIND_USER"):
            if not _NAME_RE.match(self.env[key]):
                raise ValueError(f"{key}={self.env[key]!r}: use a plain lower-case identifier")
        sync = self.env["SYNC"].strip().lower()
        if sync not in ("on", "off"):
            raise ValueError(f"SYNC={self.env['SYNC']!r}: use on or off")
        self.sync = sync == "on"
        self.state = StateDir(self.basedir / "topology")
        self.bindir = find_bindir()
        self.pg_major = self._pg_major()
        self._osuser = self._server_osuser()

    # ------------------------------------------------------------------ small helpers / paths
    @staticmethod
    def free_ports(n: int = 3) -> list[int]:
        """n distinct currently-free TCP ports on 127.0.0.1 (bound at once, then released)."""
        socks = []
        try:
            for _ in range(n):
                s = socket.socket()
                s.bind(("127.0.0.1", 0))
                socks.append(s)
            return [s.getsockname()[1] for s in socks]
        finally:
            for s in socks:
                s.close()

    def datadir(self, node: str) -> Path:
        return self.basedir / self._check(node)

    def logfile(self, node: str) -> Path:
        return self.basedir / "log" / f"{self._check(node)}.log"

    @property
    def socket_dir(self) -> Path:
        return self.basedir / "run"

    @property
    def passfile(self) -> Path:
        return self.basedir / "replication.pgpass"

    def port(self, node: str) -> int:
        return self.ports[self._check(node)]

    def _check(self, node: str) -> str:
        if node not in NODES:
            raise ValueError(f"unknown node {node!r}; nodes are {', '.join(NODES)}")
        return node

    def _bin(self, name: str) -> str:
        return str(self.bindir / name)

    def _pg_major(self) -> int:
        out = subprocess.run([self._bin("postgres"), "--version"], capture_output=True, text=True).stdout
        m = re.search(r"(\d+)(?:\.\d+)?", out)
        if not m:
            raise ClusterError(f"cannot parse `postgres --version` output: {out!r}")
        major = int(m.group(1))
        if major < 15:
            raise ClusterError(f"PostgreSQL {major} in {self.bindir}: need 15 or newer (psql \\getenv)")
        return major

    def _server_osuser(self):
        """pwd entry of the OS user to run server binaries as, or None for 'the caller'."""
        if os.geteuid() != 0:
            return None
        name = os.environ.get("NATIVE_PG_OSUSER", "postgres")
        try:
            return pwd.getpwnam(name)
        except KeyError:
            raise ClusterError(
                f"running as root, but there is no OS user {name!r} to run the PostgreSQL server "
                "as (initdb/postgres refuse root). Create it (useradd --system postgres), set "
                "NATIVE_PG_OSUSER, or run as a normal user."
            ) from None

    def _chown(self, path: Path) -> None:
        if self._osuser:
            os.chown(path, self._osuser.pw_uid, self._osuser.pw_gid)

    def _write_private(self, path: Path, text: str, mode: int = 0o600) -> None:
        """Write a file readable only by the server's OS user."""
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        self._chown(tmp)
        os.replace(tmp, path)

    def _server_env(self) -> dict:
        # A clean environment: no PG* variables may leak into the servers (the walreceiver is a
        # libpq client and would pick up PGPASSWORD/PGHOST & co).
        home = self._osuser.pw_dir if self._osuser else os.environ.get("HOME", str(self.basedir))
        return {"PATH": f"{self.bindir}:/usr/bin:/bin", "LC_ALL": "C", "LANG": "C", "HOME": home}

    def _client_env(self, password: str | None = None) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["PATH"] = f"{self.bindir}:{env.get('PATH', '/usr/bin:/bin')}"
        env["PGCONNECT_TIMEOUT"] = "5"
        env["PGSSLMODE"] = "disable"
        if password is not None:
            env["PGPASSWORD"] = password
        return env

    def _run_server_tool(self, args: list, node: str | None, timeout: float, what: str):
        """Run initdb/pg_ctl/pg_basebackup as the server's OS user; raise ClusterError on failure."""
        kwargs = {}
        if self._osuser:
            kwargs = dict(user=self._osuser.pw_uid, group=self._osuser.pw_gid, extra_groups=[])
        log.debug("%s: %s", node or "cluster", " ".join(map(str, args)))
        try:
            proc = subprocess.run(
                [str(a) for a in args], cwd=self.basedir, env=self._server_env(),
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                start_new_session=True, **kwargs,
            )
        except subprocess.TimeoutExpired as e:
            raise self._error(node, f"{what} did not finish within {timeout:.0f}s "
                                    f"(output: {(e.stdout or '')}{(e.stderr or '')})") from None
        if proc.returncode != 0:
            raise self._error(node, f"{what} failed (exit {proc.returncode}): "
                                    f"{(proc.stdout + proc.stderr).strip()}")
        return proc

    def log_tail(self, node: str, lines: int = 25) -> str:
        try:
            with open(self.logfile(node), "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                text = f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return "(no log file yet)"
        return "\n".join(text.splitlines()[-lines:])

    def _error(self, node: str | None, message: str) -> ClusterError:
        return ClusterError(message, node, self.log_tail(node) if node else None)

    # ------------------------------------------------------------------ basedir
    def _state(self) -> dict:
        try:
            return json.loads((self.basedir / MARKER).read_text())
        except FileNotFoundError:
            return {}

    def _save_state(self, **changes) -> None:
        state = {**self._state(), **changes}
        (self.basedir / MARKER).write_text(json.dumps(state, indent=1) + "\n")

    def _prepare_basedir(self) -> None:
        if self._osuser:
            self._check_traversable()
        self.basedir.mkdir(parents=True, exist_ok=True)
        state = self._state()
        if not state:
            if any(self.basedir.iterdir()):
                raise ClusterError(f"{self.basedir} is not empty and has no {MARKER} marker; "
                                   "refusing to use it")
            self._save_state(ports=self.ports, pg_major=self.pg_major, initialized=False,
                             durable=self.durable)
        else:
            if state.get("ports") != self.ports:
                raise ClusterError(f"{self.basedir} was created with ports {state.get('ports')}, "
                                   f"now asked for {self.ports}; use the same ports or destroy() it")
            if state.get("pg_major") != self.pg_major:
                raise ClusterError(f"{self.basedir} holds PostgreSQL {state.get('pg_major')} data, "
                                   f"binaries are {self.pg_major}; destroy() it first")
        sock = self.socket_dir / ".s.PGSQL.65535"
        if len(str(sock)) > 100:
            raise ClusterError(f"basedir path too long for a Unix socket path ({sock}); use a shorter one")
        os.chmod(self.basedir, 0o755)  # the server's OS user must traverse it; secrets are 0600/0700
        for sub, mode in (("log", 0o755), ("run", 0o755)):
            (self.basedir / sub).mkdir(exist_ok=True)
            os.chmod(self.basedir / sub, mode)
            self._chown(self.basedir / sub)

    def _check_traversable(self) -> None:
        """The server runs as another user: every parent of basedir must let it through."""
        uid, gid = self._osuser.pw_uid, self._osuser.pw_gid
        groups = {gid} | {g.gr_gid for g in grp.getgrall() if self._osuser.pw_name in g.gr_mem}
        for parent in self.basedir.parents:  # basedir itself is made 0755 by us
            if not parent.exists():
                continue
            st = parent.stat()
            if st.st_uid == uid:
                ok = st.st_mode & stat.S_IXUSR
            elif st.st_gid in groups:
                ok = st.st_mode & stat.S_IXGRP
            else:
                ok = st.st_mode & stat.S_IXOTH
            if not ok:
                raise ClusterError(
                    f"the server runs as OS user {self._osuser.pw_name!r} (we are root), which cannot "
                    f"enter {parent} (mode {stat.filemode(st.st_mode)}); choose a basedir whose "
                    "parents are world-traversable, e.g. one made by tempfile.mkdtemp()")

    # ------------------------------------------------------------------ configuration files
    def _write_node_conf(self, node: str) -> None:
        lines = [
            "# Written by native/cluster.py on every start of this node; included after stack.conf.",
            f"port = {self.ports[node]}",
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{self.socket_dir}'",
            # cluster_name shows in `ps` and is the walreceiver's application_name on the primary.
            f"cluster_name = '{node}'",
        ]
        if not self.durable:
            lines += ["# durable=False: throwaway test cluster (survives SIGKILL, not an OS crash)",
                      "fsync = off"]
        # Not before init-primary.sh has run: its writes would wait for standbys that do not
        # exist yet. The value names the two other nodes, so it is right whoever is primary.
        if self.sync and self._state().get("initialized"):
            lines += ["# SYNC=on: a commit waits until one other node has flushed it",
                      f"synchronous_standby_names = '{sync_standby_names(node)}'"]
        self._write_private(self.datadir(node) / "node.conf", "\n".join(lines) + "\n")

    def _install_config(self, node: str) -> None:
        data = self.datadir(node)
        shutil.copyfile(POSTGRES_FILES / "postgresql.conf", data / "stack.conf")
        self._chown(data / "stack.conf")
        hba = (POSTGRES_FILES / "pg_hba.conf").read_text()
        hba = hba.replace("@REPL_USER@", self.env["REPL_USER"]).replace("@CLIENT_CIDR@", "127.0.0.1/32")
        self._write_private(data / "pg_hba.conf", hba)
        conf = data / "postgresql.conf"
        text = conf.read_text()
        if "include 'stack.conf'" not in text:
            text += "\n# reference deployment settings (native/cluster.py)\ninclude 'stack.conf'\ninclude 'node.conf'\n"
            conf.write_text(text)
        self._write_node_conf(node)

    # ------------------------------------------------------------------ cluster lifecycle
    def start(self, timeout: float = 60) -> None:
        """Create the cluster, or resume an existing one in its current topology (the recorded
        primary first; a fenced former primary rejoins through pg_rewind), and wait until every
        replica streams. Then apply SYNC to every node."""
        t0 = time.monotonic()
        self._prepare_basedir()
        state = self._state()
        topo = self.topology()
        primary = topo.primary
        if not (self.datadir(primary) / "PG_VERSION").exists():
            if primary != INITIAL_PRIMARY:
                raise ClusterError(f"the topology says {primary} is the primary, but it has no data "
                                   "directory; destroy() the cluster (make clean) to start over", primary)
            self._initdb()
        self._write_passfile()
        self.start_node(primary, timeout)
        if not state.get("initialized"):
            self._run_init_script()
            self._save_state(initialized=True)

        def bring_up(replica):
            data = self.datadir(replica)
            # No standby.signal on a node that is not fenced: an interrupted clone (-R writes the
            # file last). A fenced former primary has none either, and is rewound, not re-cloned.
            if not (data / "PG_VERSION").exists() or (
                    not (data / "standby.signal").exists() and replica not in topo.rewind):
                self._clone(replica, primary, timeout)
            self.start_node(replica, timeout)

        with concurrent.futures.ThreadPoolExecutor(len(topo.standbys)) as ex:
            for fut in [ex.submit(bring_up, r) for r in topo.standbys]:
                fut.result()
        self.wait_streaming(timeout)
        self.apply_sync()
        log.info("cluster up in %.1fs: %s (%s)", time.monotonic() - t0,
                 ", ".join(f"{n} :{self.ports[n]}" for n in (primary, *topo.standbys)), self.basedir)

    def _write_passfile(self) -> None:
        # One passfile for every node: the replication role for primary_conninfo, the rewind role
        # for pg_rewind's source. '*' for host/port/db: the same lines work in the container
        # topology (host=primary).
        lines = [f"*:*:*:{_pgpass_escape(self.env[user])}:{_pgpass_escape(self.env[pw])}\n"
                 for user, pw in (("REPL_USER", "REPL_PASSWORD"), ("REWIND_USER", "REWIND_PASSWORD"))]
        self._write_private(self.passfile, "".join(lines))

    def apply_sync(self) -> None:
        """Rewrite each node's node.conf for the current SYNC setting and reload the running
        nodes (synchronous_standby_names takes effect on reload, no restart)."""
        for node in NODES:
            if (self.datadir(node) / "PG_VERSION").exists():
                self._write_node_conf(node)
                if self.is_running(node):
                    self.psql(node, "SELECT pg_reload_conf()", dbname="postgres")

    def _initdb(self) -> None:
        data = self.datadir("primary")
        if data.exists():
            shutil.rmtree(data)  # a half-made data dir from an interrupted initdb
        data.mkdir(mode=0o700)
        self._chown(data)
        pwfile = self.basedir / "initdb.pw"
        self._write_private(pwfile, self.env["POSTGRES_PASSWORD"] + "\n")
        args = [self._bin("initdb"), "-D", data, "-U", "postgres", f"--pwfile={pwfile}",
                "--auth-local=peer", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C"]
        if not self.durable:
            args.append("--no-sync")
            if self.pg_major >= 18:
                args.append("--no-data-checksums")  # default on since 18; off for speed
        log.info("primary: initdb (PostgreSQL %d, %s)", self.pg_major, self.bindir)
        try:
            self._run_server_tool(args, None, 120, "initdb")
        finally:
            pwfile.unlink(missing_ok=True)

    def _run_init_script(self) -> None:
        log.info("primary: running compose/postgres/init-primary.sh")
        env = self._client_env(self.env["POSTGRES_PASSWORD"])
        env.update(PGHOST="127.0.0.1", PGPORT=str(self.ports["primary"]), PGUSER="postgres",
                   PGDATABASE="postgres", PSQL=self._bin("psql"), INIT_WAIT_SECONDS="10",
                   REPL_SLOTS=" ".join(REPLICAS),
                   **{k: self.env[k] for k in ("APP_DB", "APP_USER", "APP_PASSWORD", "REPL_USER",
                                              "REPL_PASSWORD", "REWIND_USER", "REWIND_PASSWORD")})
        proc = subprocess.run(["sh", str(POSTGRES_FILES / "init-primary.sh")], env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise self._error("primary", f"init-primary.sh failed (exit {proc.returncode}):\n"
                                         f"{(proc.stdout + proc.stderr).strip()}")

    def _clone(self, replica: str, source: str, timeout: float) -> None:
        data = self.datadir(replica)
        if data.exists():
            shutil.rmtree(data)  # no standby.signal: an interrupted clone
        data.mkdir(mode=0o700)
        self._chown(data)
        user = self.env["REPL_USER"]
        conninfo = _conninfo(host="127.0.0.1", port=self.ports[source], user=user,
                             passfile=self.passfile)
        args = [self._bin("pg_basebackup"), "-D", data, "-d", conninfo, "-w", "-R",
                "-X", "stream", "-S", replica, "-c", "fast", f"--label=native {replica}"]
        if not self.durable:
            args.append("--no-sync")
        if source != INITIAL_PRIMARY:  # init-primary.sh made the initial primary's slots
            self.replica_set().create_slots(source, [replica])
        log.info("%s: pg_basebackup from %s using slot %s", replica, source, replica)
        self._run_server_tool(args, replica, timeout, "pg_basebackup")
        self._check_no_password(replica)
        self._write_node_conf(replica)

    def _check_no_password(self, replica: str) -> None:
        auto = (self.datadir(replica) / "postgresql.auto.conf").read_text()
        if "password=" in auto or self.env["REPL_PASSWORD"] in auto:
            raise self._error(replica, "postgresql.auto.conf contains a password; expected passfile=")
        if "passfile=" not in auto or f"primary_slot_name = '{replica}'" not in auto:
            raise self._error(replica, f"unexpected postgresql.auto.conf after pg_basebackup -R:\n{auto}")

    # ------------------------------------------------------------------ single nodes
    def pid(self, node: str) -> int | None:
        """Postmaster pid from postmaster.pid if that process is alive, else None."""
        try:
            pid = int((self.datadir(node) / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None
        if not _alive(pid):
            return None
        # Guard against a stale postmaster.pid whose pid now belongs to something else (we are
        # about to SIGKILL it): a postmaster's working directory is its data directory.
        try:
            if os.readlink(f"/proc/{pid}/cwd") != str(self.datadir(node).resolve()):
                return None
        except FileNotFoundError:
            return None
        except (PermissionError, OSError):
            pass  # no /proc or not ours to inspect: trust the pid file
        return pid

    def is_running(self, node: str) -> bool:
        return self.pid(node) is not None

    def start_node(self, node: str, timeout: float = 60, split_brain: bool = False) -> None:
        """Start one node (no-op if running) as the topology says, and wait until it accepts
        connections. After a kill() this is a crash restart: the primary does crash recovery, a
        replica resumes streaming from its slot (no new base backup), pointed at whichever node
        is the primary now. A fenced node (a former primary) is first rewound onto the primary's
        timeline with pg_rewind and starts as its replica.

        split_brain=True starts a fenced former primary as it is, as a second primary: only for
        tests of what clients do when two nodes accept writes."""
        self._check(node)
        if self.is_running(node):
            return
        data = self.datadir(node)
        if not (data / "PG_VERSION").exists():
            raise ClusterError(f"{data} has no cluster; call start() first", node)
        topo = self.topology()
        rewind = node in topo.rewind and not split_brain
        if node == topo.primary:
            if node in topo.rewind and not split_brain:
                # A promotion of another node was interrupted after fencing this one; another
                # node may already accept writes.
                raise ClusterError("fenced but still recorded as the primary: a promotion was "
                                   "interrupted; finish it with promote(<a replica>), then rejoin "
                                   "this node", node)
            if (data / "standby.signal").exists():
                raise ClusterError("the topology says this node is the primary, but its data "
                                   "directory is a standby's (standby.signal)", node)
        elif rewind:
            self._rewind(node, topo.primary, timeout)
        elif node in topo.rewind:
            log.warning("%s: starting a fenced former primary as it is (split_brain=True): two "
                        "nodes accept writes now", node)
        elif not (data / "standby.signal").exists():
            raise ClusterError("standby.signal missing: refusing to start a replica as a primary "
                               "(a former primary comes back through rejoin())", node)
        else:
            self._set_upstream(node, topo.primary)
        self._install_config(node)
        self._clear_stale_locks(node)
        log.info("%s: starting on 127.0.0.1:%d", node, self.ports[node])
        self._run_server_tool([self._bin("pg_ctl"), "start", "-D", data, "-l", self.logfile(node),
                               "-w", "-t", int(timeout), "-s"], node, timeout + 5, "pg_ctl start")
        self.wait_ready(node, timeout)
        if rewind:
            self.state.set_rewind(node, False)  # a proper replica now: no second rewind on restart
            self.replica_set().drop_stale_slots(node)

    def _upstream_conninfo(self, node: str, primary: str) -> str:
        return _conninfo(host="127.0.0.1", port=self.ports[primary], user=self.env["REPL_USER"],
                         passfile=self.passfile)

    def _set_upstream(self, node: str, primary: str) -> None:
        """primary_conninfo -> ``primary`` and primary_slot_name -> ``node`` in a stopped standby's
        postgresql.auto.conf, where pg_basebackup -R put them (ALTER SYSTEM's file)."""
        auto = self.datadir(node) / "postgresql.auto.conf"
        text = auto.read_text() if auto.exists() else ""
        keep = [line for line in text.splitlines()
                if not re.match(r"\s*(primary_conninfo|primary_slot_name)\s*=", line)]
        keep += [f"primary_conninfo = '{self._upstream_conninfo(node, primary)}'",
                 f"primary_slot_name = '{node}'"]
        self._write_private(auto, "\n".join(keep) + "\n")

    def _rewind(self, node: str, primary: str, timeout: float) -> None:
        """pg_rewind a stopped former primary (or a replica that got ahead of the new primary)
        onto ``primary``'s timeline, as the rewind role, and make it a standby of ``primary``."""
        if not self.is_running(primary):
            raise ClusterError(f"cannot rewind: the primary ({primary}) is not running", node)
        data = self.datadir(node)
        self._write_passfile()
        self.replica_set().create_slots(primary, [node])  # keeps its WAL from now on
        # pg_rewind first runs single-user crash recovery on a target that was not shut down
        # cleanly, and single-user mode refuses a standby.signal; the file is written again below.
        (data / "standby.signal").unlink(missing_ok=True)
        source = _conninfo(host="127.0.0.1", port=self.ports[primary], user=self.env["REWIND_USER"],
                           dbname="postgres", passfile=self.passfile)
        # The source's control file must show its current timeline (see ReplicaSet.promote).
        self.psql(primary, "CHECKPOINT", user="rewind", dbname="postgres", timeout=120)
        args = [self._bin("pg_rewind"), "-D", data, f"--source-server={source}", "--progress"]
        if not self.durable:
            args.append("--no-sync")
        t0 = time.monotonic()
        log.info("%s: pg_rewind onto %s's timeline", node, primary)
        proc = self._run_server_tool(args, node, max(timeout, 300), "pg_rewind")
        said = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        log.info("%s: %s (%.1fs)", node, said[-1] if said else "pg_rewind done", time.monotonic() - t0)
        self._write_private(data / "standby.signal", "")
        self._set_upstream(node, primary)

    def stop(self, node: str, mode: str = "fast", timeout: float = 60) -> None:
        """pg_ctl stop -m smart|fast|immediate; no-op if the node is not running."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError("mode must be smart, fast or immediate")
        if not self.is_running(node):
            return
        log.info("%s: stopping (%s)", node, mode)
        self._run_server_tool([self._bin("pg_ctl"), "stop", "-D", self.datadir(node), "-m", mode,
                               "-w", "-t", int(timeout), "-s"], node, timeout + 5, "pg_ctl stop")

    def restart(self, node: str, mode: str = "fast", timeout: float = 60) -> None:
        self.stop(node, mode, timeout)
        self.start_node(node, timeout)

    def kill(self, node: str, timeout: float = 10) -> None:
        """SIGKILL the postmaster and every process below it, like `docker kill` of the container.

        PostgreSQL puts each child (backend, walsender, checkpointer, ...) in its own session via
        setsid(), so killing the postmaster's process group alone would leave them running and
        attached to shared memory; we freeze the postmaster (SIGSTOP, so it cannot fork), collect
        its descendants from /proc and SIGKILL them all."""
        pid = self.pid(node)
        if pid is None:
            log.info("%s: kill: not running", node)
            return
        log.info("%s: SIGKILL postmaster %d and its children", node, pid)
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            return
        victims = [pid, *_descendants(pid)]
        for victim in victims:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while any(_alive(v) for v in victims):
            if time.monotonic() > deadline:
                raise self._error(node, f"processes still alive {timeout}s after SIGKILL: "
                                        f"{[v for v in victims if _alive(v)]}")
            time.sleep(0.02)
        self._clear_stale_locks(node)

    def stall(self, node: str) -> list[int]:
        """SIGSTOP the postmaster and every process below it, like `docker pause`: a server
        stuck on a dead disk or a frozen VM. Its kernel still accepts connections and ACKs
        packets, so only a client-side deadline notices. ``resume`` undoes it."""
        pid = self.pid(node)
        if pid is None:
            raise self._error(node, "stall: not running")
        log.info("%s: SIGSTOP postmaster %d and its children", node, pid)
        os.kill(pid, signal.SIGSTOP)  # first, so it forks nothing new while we collect its children
        victims = [pid, *_descendants(pid)]
        for victim in victims[1:]:
            try:
                os.kill(victim, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        return victims

    def resume(self, node: str) -> None:
        """SIGCONT a stalled node's processes (``stall``)."""
        pid = self.pid(node)
        if pid is None:
            raise self._error(node, "resume: not running")
        log.info("%s: SIGCONT postmaster %d and its children", node, pid)
        for victim in [*_descendants(pid), pid]:  # the children first: the postmaster reaps them
            try:
                os.kill(victim, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def _clear_stale_locks(self, node: str) -> None:
        """Remove lock files whose postmaster is a zombie.

        After a SIGKILL the dead postmaster's parent (pg_ctl) is gone, and the process that
        inherits it may reap it late or never (PID 1 on this machine is slow to reap). A zombie's
        pid still passes kill(pid, 0), so the next postmaster would refuse to start ("lock file
        ... already exists", for postmaster.pid and for the socket's .lock file). The zombie has
        no processes left, so the files are stale; a restarted container never sees the old pid."""
        for lock in (self.datadir(node) / "postmaster.pid",
                     self.socket_dir / f".s.PGSQL.{self.ports[node]}.lock"):
            try:
                pid = int(lock.read_text().split("\n", 1)[0])
            except (FileNotFoundError, ValueError):
                continue
            st = _proc_stat(pid)
            if st and st[0] == "Z":
                log.debug("%s: removing %s (pid %d is a zombie)", node, lock, pid)
                lock.unlink(missing_ok=True)

    def wait_ready(self, node: str, timeout: float = 30) -> None:
        """Wait until the node accepts connections (pg_isready over TCP)."""
        deadline = time.monotonic() + timeout
        while True:
            proc = subprocess.run([self._bin("pg_isready"), "-q", "-h", "127.0.0.1", "-p",
                                   str(self.ports[self._check(node)]), "-t", "2"],
                                  env=self._client_env(), capture_output=True)
            if proc.returncode == 0:
                return
            if not self.is_running(node):
                raise self._error(node, "server is not running")
            if time.monotonic() > deadline:
                raise self._error(node, f"not accepting connections after {timeout}s")
            time.sleep(0.05)

    # ------------------------------------------------------------------ replication state
    def replication_state(self) -> dict:
        """{slot: state} from the current primary: 'streaming', 'catchup', ..., or '' if the slot
        is inactive."""
        out = self.psql(self.topology().primary, "SELECT s.slot_name, coalesce(r.state, '') "
                                   "FROM pg_replication_slots s "
                                   "LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid "
                                   "ORDER BY 1", dbname="postgres")
        return dict(line.split("|", 1) for line in out.splitlines() if line)

    def wait_streaming(self, timeout: float = 30, nodes=None) -> None:
        """Wait until each replica's slot on the primary has a walsender in state 'streaming'
        (nodes: default every node but the current primary)."""
        topo = self.topology()
        nodes = topo.standbys if nodes is None else nodes
        deadline = time.monotonic() + timeout
        states: dict = {}
        while True:
            try:
                states = self.replication_state()
                if all(states.get(n) == "streaming" for n in nodes):
                    return
            except ClusterError:
                if not self.is_running(topo.primary) or time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                lagging = [n for n in nodes if states.get(n) != "streaming"]
                raise self._error(lagging[0], f"replicas {lagging} not streaming after {timeout}s "
                                              f"(primary reports {states})")
            for n in nodes:
                if not self.is_running(n):
                    raise self._error(n, "replica is not running (wait_streaming)")
            time.sleep(0.05)

    def wait_replayed(self, timeout: float = 30, nodes=None) -> None:
        """Wait until each replica (default: every node but the current primary) has replayed up
        to the primary's current WAL position."""
        topo = self.topology()
        nodes = topo.standbys if nodes is None else nodes
        target = self.psql(topo.primary, "SELECT pg_current_wal_lsn()", dbname="postgres")
        deadline = time.monotonic() + timeout
        pending = list(nodes)
        while pending:
            node = pending[0]
            done = self.psql(node, f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn",
                             dbname="postgres")
            if done == "t":
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise self._error(node, f"has not replayed up to {target} after {timeout}s")
            time.sleep(0.02)

    # ------------------------------------------------------------------ clients
    def _credentials(self, user: str) -> tuple[str, str]:
        aliases = {"app": self.env["APP_USER"], "replication": self.env["REPL_USER"],
                   "rewind": self.env["REWIND_USER"]}
        name = aliases.get(user, user)
        passwords = {self.env["APP_USER"]: self.env["APP_PASSWORD"],
                     self.env["REPL_USER"]: self.env["REPL_PASSWORD"],
                     self.env["REWIND_USER"]: self.env["REWIND_PASSWORD"],
                     "postgres": self.env["POSTGRES_PASSWORD"]}
        if name not in passwords:
            raise ValueError(f"unknown user {user!r}: use 'app', 'replication', 'rewind', 'postgres' or "
                             f"{', '.join(passwords)}")
        return name, passwords[name]

    def dsn(self, node: str, user: str = "app", dbname: str | None = None) -> str:
        """libpq key=value DSN: host=127.0.0.1 port dbname (APP_DB) user password.
        user: 'app' (APP_USER), 'replication' (REPL_USER), 'rewind' (REWIND_USER), 'postgres', or
        a literal role name."""
        conninfo, password = self.conninfo_without_password(node, user, dbname)
        return f"{conninfo} {_conninfo(password=password)}"

    def conninfo_without_password(self, node: str, user: str = "app",
                                  dbname: str | None = None) -> tuple[str, str]:
        """(DSN without the password, password): for tools that take PGPASSWORD instead."""
        name, password = self._credentials(user)
        return _conninfo(host="127.0.0.1", port=self.ports[self._check(node)],
                         dbname=dbname or self.env["APP_DB"], user=name), password

    def psql(self, node: str, sql: str, user: str = "postgres", dbname: str | None = None,
             timeout: float = 30) -> str:
        """Run SQL (from stdin, ON_ERROR_STOP) with psql; return unaligned tuples-only output."""
        conninfo, password = self.conninfo_without_password(node, user, dbname)
        proc = subprocess.run([self._bin("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                               "-d", conninfo + " application_name=native-psql", "-f", "-"], input=sql, capture_output=True,
                              text=True, env=self._client_env(password), timeout=timeout)
        if proc.returncode != 0:
            user_name = conninfo.split(" user=", 1)[1].split()[0]
            raise ClusterError(f"psql as {user_name} failed: {proc.stderr.strip()}", node)
        return proc.stdout.strip()

    # ------------------------------------------------------------------ teardown / status
    def stop_all(self, mode: str = "fast") -> None:
        """Stop replicas, then the primary (so replicas receive the final WAL)."""
        topo = self.topology()
        for node in (*topo.standbys, topo.primary):
            self.stop(node, mode)

    def destroy(self) -> None:
        """Stop every node immediately and remove basedir (only if it carries our marker)."""
        if not self.basedir.exists():
            return
        if not (self.basedir / MARKER).exists() and any(self.basedir.iterdir()):
            raise ClusterError(f"{self.basedir} has no {MARKER} marker; not deleting it")
        for node in NODES:
            try:
                self.stop(node, "immediate", timeout=20)
            except ClusterError:
                self.kill(node)
        shutil.rmtree(self.basedir)
        log.info("destroyed %s", self.basedir)

    def status(self) -> list[dict]:
        """One dict per node: node, port, running, role (primary/standby), replication."""
        rows = []
        primary = self.topology().primary
        try:
            repl = self.replication_state() if self.is_running(primary) else {}
        except ClusterError:
            repl = {}
        for node in NODES:
            row = {"node": node, "port": self.ports[node], "running": self.is_running(node),
                   "role": "", "replication": ""}
            if row["running"]:
                try:
                    rec = self.psql(node, "SELECT pg_is_in_recovery()", dbname="postgres", timeout=5)
                    row["role"] = "standby" if rec == "t" else "primary"
                except ClusterError as e:
                    row["role"] = f"? ({str(e).splitlines()[0]})"
            if node != primary:
                row["replication"] = repl.get(node, "") or ("slot inactive" if repl else "")
            rows.append(row)
        return rows

    # ------------------------------------------------------------------ topology
    def topology(self) -> Topology:
        """Which node is the primary now, and which are fenced (see topology/state.py)."""
        return self.state.read()

    def replica_set(self, on_event=None) -> "NativeReplicaSet":
        """The promote/rejoin/lag procedures (topology.ReplicaSet) over this cluster."""
        return NativeReplicaSet(self, on_event=on_event)

    def promote(self, replica: str, on_event=None) -> None:
        """Make a running replica the primary: a switchover if the primary runs (it is stopped
        first, fenced), a failover if it is down. The other replica follows without a restart.
        on_event(name, epoch seconds) marks the steps (promote, fenced, promoted, followed)."""
        self.replica_set(on_event).promote(replica)

    def rejoin(self, node: str, on_event=None) -> None:
        """A fenced former primary (or any non-primary node) back as a replica of the current
        primary, through pg_rewind; its slot on the primary is created first."""
        self.replica_set(on_event).rejoin(node)

    def lag_replica(self, replica: str, seconds: float, on_event=None) -> None:
        """Pause WAL replay on a replica for ``seconds``, then resume and wait until it caught up
        (events paused, resumed, caught_up)."""
        self.replica_set(on_event).lag_replica(replica, seconds)

    def restore_initial(self) -> None:
        """Every node running and the initial topology (`primary` the primary), by a switchover
        back if needed."""
        self.replica_set().restore_initial()

    def replication_status(self) -> dict:
        """topology.ReplicaSet.status(): role, timeline, upstream and lag of every node."""
        return self.replica_set().status()


class NativeReplicaSet(ReplicaSet):
    """topology.ReplicaSet's primitives for a native Cluster."""

    kind = "native"

    def __init__(self, cluster: Cluster, say=None, on_event=None) -> None:
        super().__init__(say or log.info, on_event)
        self.cluster = cluster

    def running(self, node: str) -> bool:
        return self.cluster.is_running(node)

    def sql(self, node: str, query: str, timeout: float = 30) -> str:
        try:
            return self.cluster.psql(node, query, dbname="postgres", timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ClusterError(f"psql did not answer within {timeout:.0f}s", node) from None

    def stop(self, node: str) -> None:
        self.cluster.stop(node, "fast")

    def start(self, node: str) -> None:
        self.cluster.start_node(node)

    def topology(self) -> Topology:
        return self.cluster.topology()

    def set_primary(self, node: str) -> None:
        self.cluster.state.set_primary(node)

    def set_rewind(self, node: str, needed: bool) -> None:
        self.cluster.state.set_rewind(node, needed)

    def upstream_conninfo(self, node: str, primary: str) -> str:
        return self.cluster._upstream_conninfo(node, primary)

    def node_at(self, host: str, port: str) -> str | None:
        by_port = {str(p): n for n, p in self.cluster.ports.items()}
        return by_port.get(str(port)) if host in ("127.0.0.1", "localhost") else None
