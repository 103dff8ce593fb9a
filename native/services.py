"""The sample app's three services under gunicorn on the host, against a native Cluster, with
Debian's nginx in front of them.

The same services as docker-compose.yml's app-threaded, app-process and app-nopool, with the same
gunicorn configs (app/gunicorn_<mode>.py) and pool settings, and the same nginx configuration
(compose/nginx/nginx.conf.template):

    nginx on 127.0.0.1:APP_THREADED_PORT / APP_PROCESS_PORT / APP_NOPOOL_PORT (8001-8003)
      -> gunicorn on 127.0.0.1:APP_THREADED_DIRECT_PORT / ..._DIRECT_PORT (18001-18003)

Without nginx on the host (NATIVE_NGINX=none forces that) gunicorn listens on 8001-8003 itself,
with no buffering proxy in front: slow clients can then hold its workers (README: the stack).

    from native.services import start_services, stop_services, service_status
    start_services(cluster)                 # idempotent; waits until each answers /healthz
    start_services(cluster, ports={"app-threaded": 28001, ...}, direct={...})   # tests: free ports
    stop_services(cluster)                  # SIGTERM (graceful), SIGKILL after a grace period

Never as root: started by root, gunicorn and nginx run as NATIVE_APP_OSUSER, else the user who
ran sudo (SUDO_USER), else a dedicated system user `pgpool-stack` (created if missing). Otherwise
they run as the caller. nginx keeps everything it writes under <basedir>/nginx/ and <basedir>/log/
(its config, pid file and temp directories; never /etc/nginx, /var/lib/nginx or port 80).

gunicorn runs with the interpreter running this code (sys.executable), so call it from the
project venv (`make venv`; the Makefile uses $(VPY) -m native); see app_interpreter() for the
one exception. Each service is a detached process
group; its pid file is <basedir>/run/<service>.pid and its log <basedir>/log/<service>.log
(gunicorn's error log, and its access log only where no nginx is in front: APP_ACCESS_LOG;
nginx-access.log and nginx-error.log for nginx).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import pwd
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

from .cluster import NODES, REPLICAS, REPO_ROOT, Cluster, ClusterError

__all__ = ["SERVICES", "PROXY", "service_ports", "direct_ports", "find_nginx", "start_services",
           "stop_services", "service_status"]

log = logging.getLogger("native")

# service name -> (APP_POOL_MODE / gunicorn config, port variable, default port)
SERVICES = {
    "app-threaded": ("threaded", "APP_THREADED_PORT", 8001),
    "app-process": ("process", "APP_PROCESS_PORT", 8002),
    "app-nopool": ("nopool", "APP_NOPOOL_PORT", 8003),
}
# gunicorn's own ports when nginx is in front: service name -> (variable, default)
DIRECT_PORTS = {
    "app-threaded": ("APP_THREADED_DIRECT_PORT", 18001),
    "app-process": ("APP_PROCESS_DIRECT_PORT", 18002),
    "app-nopool": ("APP_NOPOOL_DIRECT_PORT", 18003),
}
PROXY = "nginx"
NGINX_FILES = REPO_ROOT / "compose" / "nginx"
# Who runs the services when we are root (see the module docstring).
APP_OSUSER = "pgpool-stack"
# Passed through from the caller's environment when set (sizing and timeouts, as in compose).
PASSTHROUGH = ("APP_WORKERS", "APP_THREADS", "APP_PROCESS_WORKERS", "APP_TIMEOUT",
               "APP_GRACEFUL_TIMEOUT", "APP_MAX_BODY", "APP_KEEPALIVE", "POOL_TIMEOUT",
               "POOL_CONNECT_TIMEOUT")
# nginx knobs (compose/nginx/render.sh) passed through the same way.
NGINX_KNOBS = ("NGINX_WORKER_PROCESSES", "NGINX_MAX_CONN_PER_CLIENT", "NGINX_CLIENT_HEADER_TIMEOUT",
               "NGINX_CLIENT_BODY_TIMEOUT", "NGINX_MAX_BODY")


def service_ports(environ=None) -> dict[str, int]:
    """The public port of each app (nginx's, or gunicorn's own where there is no nginx)."""
    environ = os.environ if environ is None else environ
    return {name: int(environ.get(var) or default) for name, (_, var, default) in SERVICES.items()}


def direct_ports(environ=None) -> dict[str, int]:
    """gunicorn's own port of each app while nginx is in front (for comparisons)."""
    environ = os.environ if environ is None else environ
    return {name: int(environ.get(var) or default) for name, (var, default) in DIRECT_PORTS.items()}


def find_nginx() -> str | None:
    """Path of the nginx binary: NATIVE_NGINX (a path, or "none" to run without), else nginx on
    PATH or /usr/sbin/nginx (not on a normal user's PATH on Debian). None if there is none."""
    wanted = os.environ.get("NATIVE_NGINX", "").strip()
    if wanted.lower() == "none":
        return None
    if wanted:
        if not os.access(wanted, os.X_OK):
            raise ClusterError(f"NATIVE_NGINX={wanted!r} is not an executable")
        return wanted
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def service_user() -> pwd.struct_passwd | None:
    """The OS user to run gunicorn and nginx as: None (the caller) unless we are root; then
    NATIVE_APP_OSUSER, else SUDO_USER, else APP_OSUSER, created as a system user if missing."""
    if os.geteuid() != 0:
        return None
    sudo_user = os.environ.get("SUDO_USER", "")
    name = os.environ.get("NATIVE_APP_OSUSER") or (sudo_user if sudo_user not in ("", "root") else APP_OSUSER)
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        if name != APP_OSUSER:
            raise ClusterError(f"NATIVE_APP_OSUSER/SUDO_USER names {name!r}, which is not an OS user") from None
        log.info("creating the system user %s to run the app services as (never root)", name)
        proc = subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                               "--shell", "/usr/sbin/nologin", name], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ClusterError(f"cannot create the system user {name!r} (useradd: {proc.stderr.strip()}); "
                               "create an unprivileged user and set NATIVE_APP_OSUSER") from None
        user = pwd.getpwnam(name)
    if user.pw_uid == 0:
        raise ClusterError(f"{name!r} is root: the app services never run as root; set NATIVE_APP_OSUSER")
    return user


def _as_user(user: pwd.struct_passwd | None) -> dict:
    """Popen keywords that drop to `user` (no supplementary groups of root's)."""
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def app_interpreter(user: pwd.struct_passwd | None) -> tuple[str, dict]:
    """(python, extra environment) with which `user` can run the app: this interpreter (the
    project venv's), or else the system's python3 of the same version with the venv's packages
    on PYTHONPATH. Why the second: a venv made from a Python under root's home (pyenv, as on
    the build machines) cannot be entered by the user root drops to. ClusterError if neither
    can import the app, saying what to fix."""
    probe = "import gunicorn, psycopg2, pool, app.application"
    candidates = [(sys.executable, {})]
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    system = shutil.which(version, path="/usr/local/bin:/usr/bin:/bin")
    if user is not None and system and os.path.realpath(system) != os.path.realpath(sys.executable):
        paths = dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib"))
        candidates.append((system, {"PYTHONPATH": os.pathsep.join(paths)}))
    errors = []
    for python, extra in candidates:
        try:
            proc = subprocess.run([python, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True,
                                  env=_user_env({**os.environ, **extra}, user), timeout=60, **_as_user(user))
        except OSError as exc:  # not even executable for the user
            errors.append(f"{python}: {exc.strerror}")
            continue
        if proc.returncode == 0:
            return python, extra
        errors.append(f"{python}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    who = f"{user.pw_name!r} (we are root)" if user else "this user"
    raise ClusterError(f"the app services run as {who}, who cannot import the app from {REPO_ROOT} "
                       f"({'; '.join(errors)}). Make the checkout and its .venv readable by that "
                       "user, or set NATIVE_APP_OSUSER to one who can read them.")


def _user_env(env: dict, user: pwd.struct_passwd | None) -> dict:
    if user is not None:
        env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # the checkout may not be theirs to write
    return env


def _pidfile(cluster: Cluster, name: str) -> Path:
    return cluster.socket_dir / f"{name}.pid"


def _logfile(cluster: Cluster, name: str) -> Path:
    # nginx writes its own error log there too (-e and error_log), next to its output.
    return cluster.basedir / "log" / ("nginx-error.log" if name == PROXY else f"{name}.log")


def _alive(pid: int) -> bool:
    """pid exists and is not a zombie (PID 1 may reap late)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def _marker(cluster: Cluster, name: str) -> str:
    """What the command line of our process for service `name` contains."""
    if name == PROXY:
        return str(_nginx_dir(cluster) / "nginx.conf")
    return f"gunicorn_{SERVICES[name][0]}.py"


def _running_pid(cluster: Cluster, name: str) -> int | None:
    """The service's master pid, if its pid file names a live gunicorn (or nginx) of ours."""
    try:
        pid = int(_pidfile(cluster, name).read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None
    if not _alive(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if _marker(cluster, name) not in cmdline:
            return None  # the pid was reused by something else
    except OSError:
        pass
    return pid


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _nginx_dir(cluster: Cluster) -> Path:
    return cluster.basedir / "nginx"


def _healthz(port: int, timeout: float = 3.0) -> tuple[int, dict | str]:
    """(status, body) of GET /healthz; status 0 if nothing answered."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(300).decode("utf-8", "replace")
    except (OSError, ValueError) as exc:
        return 0, str(exc)


def _service_env(cluster: Cluster, name: str, port: int, user: pwd.struct_passwd | None,
                 behind_nginx: bool) -> dict:
    mode = SERVICES[name][0]
    # Nothing of the caller's database/pool/app settings leaks in except the listed knobs.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "POOL_", "APP_"))}
    env.update({k: os.environ[k] for k in PASSTHROUGH if os.environ.get(k)})
    if mode == "threaded" and os.environ.get("POOL_MAX_SIZE"):
        env["POOL_MAX_SIZE"] = os.environ["POOL_MAX_SIZE"]  # the process config sizes its own
    env.update(
        APP_POOL_MODE=mode,
        APP_BIND=f"127.0.0.1:{port}",
        POOL_PRIMARY=cluster.dsn("primary"),
        POOL_REPLICAS=",".join(cluster.dsn(r) for r in REPLICAS),
        # Every node as a candidate (the pool finds the primary and follows a promotion): the
        # same DSNs, in the order primary, replica1, replica2.
        POOL_NODES=",".join(cluster.dsn(n) for n in NODES),
        PYTHONUNBUFFERED="1",
        # nginx logs every request (nginx-access.log, with the server that answered); a second
        # line from gunicorn would cost each request CPU for nothing. Alone, gunicorn logs them.
        APP_ACCESS_LOG=os.environ.get("APP_ACCESS_LOG") or ("off" if behind_nginx else "on"),
    )
    return _user_env(env, user)


def start_services(cluster: Cluster, ports: dict[str, int] | None = None,
                   direct: dict[str, int] | None = None, timeout: float = 60) -> dict[str, int]:
    """Start every service that is not running yet (gunicorn x 3, then nginx in front of them if
    the host has it); wait until all answer /healthz with 200 on their public ports.
    `ports`: public ports (default service_ports()); `direct`: gunicorn's own ports behind nginx
    (default direct_ports()). Returns {service: public port}."""
    if importlib.util.find_spec("gunicorn") is None or importlib.util.find_spec("psycopg2") is None:
        raise ClusterError(f"{sys.executable} cannot import gunicorn and psycopg2: run the native "
                           "stack with the project venv (make venv; .venv/bin/python -m native up)")
    public = {**service_ports(), **(ports or {})}
    nginx = find_nginx()
    backend = {**direct_ports(), **(direct or {})} if nginx else public
    user = service_user()
    python, python_env = app_interpreter(user)
    (cluster.basedir / "log").mkdir(exist_ok=True)
    started = {}
    for name, (mode, _, _) in SERVICES.items():
        if _running_pid(cluster, name):
            log.info("%s: already running (pid file %s)", name, _pidfile(cluster, name))
            continue
        env = {**_service_env(cluster, name, backend[name], user, nginx is not None), **python_env}
        started[name] = _spawn(cluster, name, [python, "-m", "gunicorn", "-c", f"app/gunicorn_{mode}.py",
                                               "app.wsgi:application"], env, user)
        log.info("%s: gunicorn (%s) on 127.0.0.1:%d, pid %d%s, log %s", name, mode, backend[name],
                 started[name].pid, f" as {user.pw_name}" if user else "", _logfile(cluster, name))
    _wait_healthy(cluster, {name: backend[name] for name in SERVICES}, started, timeout)
    if nginx is None:
        log.warning("nginx not found: the apps answer on %s directly, with no buffering proxy in "
                    "front (slow clients can hold every gunicorn worker). Install Debian's nginx "
                    "(apt-get install nginx) and run `make up` again to put it in front.",
                    ", ".join(str(p) for p in public.values()))
        return public
    if not _running_pid(cluster, PROXY):
        proc = _start_nginx(cluster, nginx, public, backend, user)
        started = {PROXY: proc}
        log.info("nginx: 127.0.0.1:%s -> gunicorn %s, pid %d%s, logs %s", "/".join(map(str, public.values())),
                 "/".join(map(str, backend.values())), proc.pid, f" as {user.pw_name}" if user else "",
                 cluster.basedir / "log" / "nginx-*.log")
    else:
        started = {}
    _wait_healthy(cluster, {PROXY: port for port in public.values()}, started, timeout, via=public)
    return public


def _spawn(cluster: Cluster, name: str, argv: list[str], env: dict,
           user: pwd.struct_passwd | None) -> subprocess.Popen:
    """Start a service as a detached process group (it survives this CLI; stop_services signals
    the group), its output appended to its log, its pid in its pid file."""
    with open(_logfile(cluster, name), "ab") as out:
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, **_as_user(user))
    _pidfile(cluster, name).write_text(f"{proc.pid}\n")
    return proc


def _start_nginx(cluster: Cluster, nginx: str, public: dict[str, int], backend: dict[str, int],
                 user: pwd.struct_passwd | None) -> subprocess.Popen:
    """Render compose/nginx/nginx.conf.template into <basedir>/nginx/ (render.sh, as the
    container does), check it with `nginx -t` as the service user, then start nginx in the
    foreground of its own process group (`daemon off`: the pid we record is its master)."""
    home = _nginx_dir(cluster)
    run_dir, logs = home / "run", cluster.basedir / "log"
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(NGINX_FILES / "json-errors.conf", home / "json-errors.conf")
    error_log, access_log = _logfile(cluster, PROXY), logs / "nginx-access.log"
    env = {k: os.environ[k] for k in NGINX_KNOBS if os.environ.get(k)}
    env.update({f"NGINX_LISTEN_{n.split('-')[1].upper()}": f"127.0.0.1:{public[n]}" for n in SERVICES})
    env.update({f"NGINX_UPSTREAM_{n.split('-')[1].upper()}": f"127.0.0.1:{backend[n]}" for n in SERVICES})
    env.update(NGINX_RUN_DIR=str(run_dir), NGINX_ERROR_LOG=str(error_log), NGINX_ACCESS_LOG=str(access_log),
               PATH=os.environ.get("PATH", "/usr/bin:/bin"))
    conf = home / "nginx.conf"
    proc = subprocess.run(["sh", str(NGINX_FILES / "render.sh"), str(NGINX_FILES / "nginx.conf.template"),
                           str(conf)], env=env, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise ClusterError(f"nginx: rendering its configuration failed: {proc.stderr.strip()}", PROXY)
    for path in (error_log, access_log):
        path.touch()
    if user is not None:  # nginx opens its logs and temp files as the service user
        for path in (home, run_dir, error_log, access_log):
            os.chown(path, user.pw_uid, user.pw_gid)
    argv = [nginx, "-p", str(home), "-c", str(conf), "-e", str(error_log)]
    check = subprocess.run([*argv, "-t", "-q"], capture_output=True, text=True, timeout=30, **_as_user(user))
    if check.returncode != 0:
        raise ClusterError(f"nginx -t failed for {conf}: {(check.stderr or check.stdout).strip()}", PROXY)
    return _spawn(cluster, PROXY, [*argv, "-g", "daemon off;"], _user_env({"PATH": env["PATH"]}, user), user)


def _wait_healthy(cluster: Cluster, targets: dict[str, int], started: dict[str, subprocess.Popen],
                  timeout: float, via: dict[str, int] | None = None) -> None:
    """Wait until GET /healthz answers 200 on every port; a service that exits meanwhile is an
    error with its log's tail. `targets`: service -> port, or (nginx) `via`: app -> public port."""
    checks = [(name, port) for name, port in (via or targets).items()]
    owner = {port: (PROXY if via else name) for name, port in checks}
    deadline = time.monotonic() + timeout
    pending = dict.fromkeys(port for _, port in checks)
    while pending:
        for port in list(pending):
            status, body = _healthz(port, timeout=2)
            pending[port] = (status, body)
            if status == 200:
                del pending[port]
                continue
            name = owner[port]
            proc = started.get(name)
            if (proc is not None and proc.poll() is not None) or (
                    proc is None and not _running_pid(cluster, name)):
                raise ClusterError(f"{name} exited while starting (port {port} in use?); "
                                   f"log {_logfile(cluster, name)}:\n"
                                   f"{_log_tail(_logfile(cluster, name))}", name)
        if not pending:
            break
        if time.monotonic() > deadline:
            details = "; ".join(f"{owner[p]} :{p}: {s} {str(b)[:200]}" for p, (s, b) in pending.items())
            raise ClusterError(f"services not healthy after {timeout:.0f}s: {details}")
        time.sleep(0.2)


def stop_services(cluster: Cluster, grace: float = 15) -> None:
    """SIGTERM each running service's master (gunicorn: graceful; nginx: fast), SIGKILL its
    group after `grace` seconds; remove the pid files."""
    pids = {}
    for name in (PROXY, *SERVICES):  # nginx first: no request reaches a stopping gunicorn
        pid = _running_pid(cluster, name)
        if pid:
            log.info("%s: stopping gunicorn pid %d", name, pid)
            try:
                os.kill(pid, signal.SIGTERM)
                pids[name] = pid
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for name, pid in pids.items():
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            log.warning("%s: still running after %.0fs; SIGKILL", name, grace)
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for name in (PROXY, *SERVICES):
        _pidfile(cluster, name).unlink(missing_ok=True)


def service_status(cluster: Cluster, ports: dict[str, int] | None = None,
                   direct: dict[str, int] | None = None) -> list[dict]:
    """One dict per service (nginx last): service, port (where it listens: gunicorn's direct
    port while nginx runs, else its public one; nginx: the public ports), pid (or None), healthz
    status through that port (0 = no answer)."""
    ports = {**service_ports(), **(ports or {})}
    behind = {**direct_ports(), **(direct or {})}
    proxy_pid = _running_pid(cluster, PROXY)
    rows = []
    for name in SERVICES:
        pid = _running_pid(cluster, name)
        port = behind[name] if proxy_pid else ports[name]
        rows.append({"service": name, "port": port, "pid": pid,
                     "healthz": _healthz(port, timeout=2)[0] if pid else 0})
    if proxy_pid:
        codes = {_healthz(p, timeout=2)[0] for p in ports.values()}
        rows.append({"service": PROXY, "port": "/".join(map(str, ports.values())), "pid": proxy_pid,
                     "healthz": codes.pop() if len(codes) == 1 else min(codes)})
    return rows
