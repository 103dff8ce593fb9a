"""python -m native up|down|status|replication|kill NODE|start NODE|stop NODE|psql [NODE]
                   stall NODE|resume NODE
                   promote NODE|rejoin NODE|lag-replica NODE --seconds N|restore|current-primary

Runs the reference database topology natively in .stack/native (override: NATIVE_BASEDIR) on the
ports PRIMARY_PORT/REPLICA1_PORT/REPLICA2_PORT (default 15432-15434; the root Makefile exports
.env, and the environment wins), plus the sample app's three gunicorn services on
APP_THREADED_PORT/APP_PROCESS_PORT/APP_NOPOOL_PORT (default 8001-8003; `up --no-apps` skips them),
behind the host's nginx when it has one (gunicorn then on APP_*_DIRECT_PORT, default 18001-18003).
Data survives `down`; `down --purge` deletes it.

Roles can change: `promote replica1` makes a replica the primary (a switchover if the primary is
running: it is stopped first; a failover if it is down), `rejoin primary` brings the old primary
back as a replica through pg_rewind, and `up` returns to the initial topology (a switchover back
if needed). `replication` shows which node is primary, its timeline, and each replica's upstream
and lag. SYNC=on (in .env or the environment) makes replication synchronous; `up` applies it.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from topology import OpError, event_writer, format_status

from .cluster import NODES, REPO_ROOT, Cluster


# Every URL printed answers 200; GET / lists the routes.
ROUTES_HINT = "(also /, /items?limit=5, /healthz, /stats)"


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
    sub.add_parser("current-primary", help="print the name of the node that is the primary now")
    sub.add_parser("restore", help="every node up, in the initial topology (a switchover back "
                                   "to `primary`, fenced nodes rejoined, if needed)")
    sub.add_parser("replication", help="which node is primary, its timeline, each replica's "
                                       "upstream and lag (bytes and seconds), the slots")
    for name, text in (
            ("promote", "make a replica the primary (switchover if the primary runs, failover if "
                        "it is down); the other replica follows"),
            ("rejoin", "a former primary back as a replica of the current one (pg_rewind)"),
            ("lag-replica", "pause WAL replay on a replica for --seconds, then resume and wait "
                            "until it caught up")):
        p = sub.add_parser(name, help=text)
        p.add_argument("node", choices=NODES)
        p.add_argument("--events", metavar="FILE",
                       help="append one {event, t} JSON line (epoch seconds) per step")
        if name == "lag-replica":
            p.add_argument("--seconds", type=float, default=10)
    for name, text in (("kill", "SIGKILL a node and all its processes (like docker kill)"),
                       ("start", "start a stopped/killed node"),
                       ("stop", "stop one node (fast shutdown)"),
                       ("stall", "SIGSTOP a node and all its processes (like docker pause): a "
                                 "stalled server, whose kernel still ACKs"),
                       ("resume", "SIGCONT a stalled node (like docker unpause)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("node", choices=NODES)
    p = sub.add_parser("psql", help="interactive psql on a node (default primary)")
    p.add_argument("node", nargs="?", default="primary", choices=NODES)
    p.add_argument("-U", "--user", default="postgres", help="postgres (default), app or replication")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s native: %(message)s", datefmt="%H:%M:%S")
    on_event = event_writer(getattr(args, "events", None))
    try:
        cluster = Cluster(basedir())
        if args.cmd == "up":
            cluster.start()
            if not cluster.topology().initial:
                cluster.restore_initial()
            if not args.no_apps:
                start_services(cluster)
            for node in NODES:  # no passwords on stdout: they are in .env / the environment
                print(f"{node:9} {cluster.conninfo_without_password(node)[0]}")
            if not args.no_apps:
                from .services import PROXY, direct_ports, find_nginx, service_ports
                behind = direct_ports() if find_nginx() else {}
                for name, port in service_ports().items():
                    direct = f"   (gunicorn direct: :{behind[name]})" if behind else ""
                    print(f"{name:12} http://127.0.0.1:{port}/items/1  {ROUTES_HINT}{direct}")
                print(f"{PROXY:12} in front of the apps" if behind else
                      f"{PROXY:12} NOT RUNNING: not installed; the apps answer directly (no buffering proxy)")
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
        elif args.cmd == "restore":
            changed = not cluster.topology().initial
            cluster.restore_initial()  # also starts any node that is down
            if changed:
                print(format_status(cluster.replication_status()))
        elif args.cmd == "current-primary":
            print(cluster.topology().primary)
        elif args.cmd == "replication":
            print(format_status(cluster.replication_status()))
        elif args.cmd == "promote":
            cluster.promote(args.node, on_event)
            print(format_status(cluster.replication_status()))
        elif args.cmd == "rejoin":
            cluster.rejoin(args.node, on_event)
            print(format_status(cluster.replication_status()))
        elif args.cmd == "lag-replica":
            cluster.lag_replica(args.node, args.seconds, on_event)
        elif args.cmd == "kill":
            cluster.kill(args.node)
        elif args.cmd == "start":
            cluster.start_node(args.node)
        elif args.cmd == "stop":
            cluster.stop(args.node)
        elif args.cmd == "stall":
            cluster.stall(args.node)
        elif args.cmd == "resume":
            cluster.resume(args.node)
        elif args.cmd == "psql":
            conninfo, password = cluster.conninfo_without_password(args.node, args.user)
            os.execve(cluster._bin("psql"), ["psql", conninfo], cluster._client_env(password))
    except OpError as e:  # ClusterError included
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
