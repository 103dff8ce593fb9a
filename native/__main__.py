"""python -m native up|down|status|kill NODE|start NODE|stop NODE|psql [NODE]

Runs the reference database topology natively in .stack/native (override: NATIVE_BASEDIR) on the
ports PRIMARY_PORT/REPLICA1_PORT/REPLICA2_PORT (default 15432-15434; the root Makefile exports
.env, and the environment wins). Data survives `down`; `down --purge` deletes it.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .cluster import NODES, REPO_ROOT, Cluster, ClusterError


def basedir() -> str:
    return os.environ.get("NATIVE_BASEDIR") or str(REPO_ROOT / ".stack" / "native")


# --- hook for the app services ----------------------------------------------------------------
# A later task launches the sample app under gunicorn (threaded / process / no-pool services on
# APP_THREADED_PORT, APP_PROCESS_PORT, APP_NOPOOL_PORT) against this cluster. Put that in its own
# module and call it from these two functions; cluster.dsn(node) gives each endpoint's DSN.
def start_services(cluster: Cluster) -> None:
    """Called by `up` after the database is streaming. No app services yet."""


def stop_services(cluster: Cluster) -> None:
    """Called by `down` before the database stops. No app services yet."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m native", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="create or resume the cluster; wait until both replicas stream")
    down = sub.add_parser("down", help="stop all nodes (fast shutdown), keep the data")
    down.add_argument("--purge", action="store_true", help="also delete the data (basedir)")
    sub.add_parser("status", help="show nodes, roles and replication state")
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
            start_services(cluster)
            for node in NODES:  # no passwords on stdout: they are in .env / the environment
                print(f"{node:9} {cluster.conninfo_without_password(node)[0]}")
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
            return 0 if all(r["running"] for r in rows) else 3
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
