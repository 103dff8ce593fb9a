"""A real name server the tests and `make bench-failures` stall: dnsmasq, answering for one
name, and a child process that sees it as its only name server.

``name_server(address)`` starts dnsmasq on ``address``:53 (a loopback address of the caller's
own, so runs never share one) answering for ``NAME`` from a hosts file (rewrite it and SIGHUP
dnsmasq to move or remove the name: then it answers "no such name", as Docker's name server does
for a stopped container); ``run_scenario`` runs one scenario of
``resolvechild.py`` in a mount namespace of its own, where /etc/resolv.conf names it: the
machine's resolver is never touched. Needs root (unshare, mount) and dnsmasq (dnsmasq-base).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
from typing import Any, Iterator

NAME = "db.pooltest"
HERE = os.path.dirname(os.path.abspath(__file__))


def missing() -> str | None:
    """Why a name server cannot be run here, or None."""
    if dnsmasq() is None:
        return "dnsmasq not installed (apt-get install dnsmasq-base)"
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "a private /etc/resolv.conf needs root and unshare(1)"
    return None


def dnsmasq() -> str | None:
    return shutil.which("dnsmasq") or ("/usr/sbin/dnsmasq" if os.path.exists("/usr/sbin/dnsmasq")
                                       else None)


@contextlib.contextmanager
def name_server(address: str, refused_address: str) -> Iterator[types.SimpleNamespace]:
    """dnsmasq on ``address``:53; also a resolv.conf naming ``refused_address``, where nothing
    listens (a name server that is down)."""
    if _taken(address):
        raise RuntimeError(f"{address}:53 is taken by another process: a run needs its own")
    with tempfile.TemporaryDirectory(prefix="pool-dns-") as where:
        os.chmod(where, 0o755)  # (dnsmasq reads its hosts file as an unprivileged user)
        resolv = os.path.join(where, "resolv.conf")
        with open(resolv, "w") as f:
            f.write(f"nameserver {address}\n")  # the C library's defaults: 5 s, 2 attempts
        refused = os.path.join(where, "refused.conf")
        with open(refused, "w") as f:
            f.write(f"nameserver {refused_address}\n")
        names = os.path.join(where, "names")
        with open(names, "w") as f:
            f.write(f"127.0.0.1 {NAME}\n")
        proc = subprocess.Popen([dnsmasq(), "--keep-in-foreground", "--no-resolv", "--no-hosts",
                                 f"--listen-address={address}", "--bind-interfaces", "--port=53",
                                 f"--addn-hosts={names}", f"--local=/{NAME.split('.', 1)[1]}/"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 10
            while not _taken(address):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("dnsmasq did not start: "
                                       + proc.stderr.read().decode(errors="replace"))
                time.sleep(0.05)
            if proc.poll() is not None:
                raise RuntimeError("dnsmasq exited")
            yield types.SimpleNamespace(pid=proc.pid, resolv=resolv, refused=refused, names=names,
                                        address=address)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()


def run_scenario(ns: types.SimpleNamespace, cluster: Any, scenario: str, mode: str) -> dict:
    """One scenario of resolvechild.py against the cluster's primary, reached as ``NAME``."""
    dsn = cluster.dsn("primary").replace("host=127.0.0.1", f"host={NAME}")
    assert f"host={NAME}" in dsn
    env = dict(os.environ, POOL_TEST_DSN=dsn, POOL_TEST_BASEDIR=str(cluster.basedir),
               POOL_TEST_PORTS=",".join(str(cluster.ports[node]) for node in cluster.ports),
               POOL_TEST_REFUSED_RESOLV=ns.refused, POOL_TEST_NAMES=ns.names,
               POOL_TEST_DNS_ADDRESS=ns.address,
               POOL_TEST_PORT=str(cluster.port("primary")),
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
    try:
        out = subprocess.run(
            ["unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"',
             ns.resolv, sys.executable, os.path.join(HERE, "resolvechild.py"), scenario, mode,
             str(ns.pid)], env=env, capture_output=True, text=True, timeout=150)
    finally:
        os.kill(ns.pid, signal.SIGCONT)  # (whatever the child did to either)
        cluster.resume("primary")
    if out.returncode != 0:
        raise RuntimeError(f"{scenario} ({mode}) failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _taken(address: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((address, 53))
        except OSError:
            return True
    return False
