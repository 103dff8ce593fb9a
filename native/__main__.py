"""python -m native up|down|status|replication|kill NODE|start NODE|stop NODE|psql [NODE]

Runs the reference database topology natively in .stack/native (override: NATIVE_BASEDIR) on the
ports PRIMARY_PORT/REPLICA1_PORT/REPLICA2_PORT (default 15432-15434; the root Makefile exports
.env, and the environment wins), plus the sample app's three gunicorn services on
APP_THREADED_PORT/APP_PROCESS_PORT/APP_NOPOOL_PORT (default 8001-8003; `up --no-apps` skips them).
Data survives `down`; `down --purge` deletes it.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .cluster import NODES, REPO_ROOT, Cluster, ClusterError


REPLICATION_SQL = """
SELECT format('%-9s %-10s %-9s sent=%s replay=%s lag=%s', s.slot_name,
              coalesce(r.state, 'inactive'), s.wal_status, r.sent_lsn, r.replay_lsn,
              coalesce(r.replay_lag::text, '-'))
  FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
 ORDER BY s.slot_name
"""


def basedir() -> str:
    return os.environ.get("NATIVE_BASEDIR") or str(REPO_ROOT / ".stack" / "native")


# --- the app services -------------------------------------------------------------------------
# The sample app under gunicorn (threaded / process / no-pool services on APP_THREADED_PORT,
# APP_PROCESS_PORT, APP_NOPOOL_PORT) against this cluster: see native/services.py.
def start_services(cluster: Cluster) -> None:
    """Called by `up` after the database is streaming: start the apps, wait for /healthz."""
    from .services import start_services as start
    start(cluster)


def stop_services(cluster: Cluster) -> None:
    """Called by `down` before the database stops."""
    from .services import stop_services as stop
    stop(cluster)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m native", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="create or resume the cluster; wait until both replicas stream; "
                                   "start the app services")
    up.add_argument("--no-apps", action="store_true", help="database nodes only")
    down = sub.add_parser("down", help="stop all nodes (fast shutdown), keep the data")
    down.add_argument("--purge", action="store_true", help="also delete the data (basedir)")
    sub.add_parser("status", help="show nodes, roles and replication state, and the app services")
    sub.add_parser("replication", help="pg_stat_replication and pg_replication_slots on the primary")
    for name, text in (("kill", "SIGKILL a node and all its processes (like docker kill)"),
                       ("start", "start a stopped/killed node"),
                       ("stop", "stop one node (fast shutdown)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("node", choices=NODES)
    p = sub.add_parser("psql", help="interactive psql on a node (default primary)")
    p.add_argument("node", nargs="?", default="primary", choices=NODES)
    p.add_argument("-U", "--user", default="postgres", help="postgres (default), app or replication")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s native: %(message)s", datefmt="%H:%M:%S")
    try:
        cluster = Cluster(basedir())
        if args.cmd == "up":
            cluster.start()
            if not args.no_apps:
                start_services(cluster)
            for node in NODES:  # no passwords on stdout: they are in .env / the environment
                print(f"{node:9} {cluster.conninfo_without_password(node)[0]}")
            if not args.no_apps:
                from .services import service_ports
                for name, port in service_ports().items():
                    print(f"{name:12} http://127.0.0.1:{port}/")
        elif args.cmd == "down":
            stop_services(cluster)
            if args.purge:
                cluster.destroy()
            else:
                cluster.stop_all("fast")
        elif args.cmd == "status":
            if not os.path.isdir(basedir()):
                print(f"no cluster in {basedir()}")
                return 3
            rows = cluster.status()
            for row in rows:
                state = "running" if row["running"] else "stopped"
                print(f"{row['node']:9} 127.0.0.1:{row['port']:<6} {state:8} {row['role']:8} "
                      f"{row['replication']}")
            from .services import service_status
            apps = service_status(cluster)
            for app in apps:
                state = f"pid {app['pid']}" if app["pid"] else "stopped"
                health = f"/healthz {app['healthz']}" if app["pid"] else ""
                print(f"{app['service']:12} 127.0.0.1:{app['port']:<6} {state:10} {health}")
            return 0 if all(r["running"] for r in rows) else 3
        elif args.cmd == "replication":
            print(f"{'slot':9} {'state':10} {'wal':9} positions")
            print(cluster.psql("primary", REPLICATION_SQL, dbname="postgres"))
        elif args.cmd == "kill":
            cluster.kill(args.node)
        elif args.cmd == "start":
            cluster.start_node(args.node)
        elif args.cmd == "stop":
            cluster.stop(args.node)
        elif args.cmd == "psql":
            conninfo, password = cluster.conninfo_without_password(args.node, args.user)
            os.execve(cluster._bin("psql"), ["psql", conninfo], cluster._client_env(password))
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
