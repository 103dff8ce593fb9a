"""Native (no Docker) reference topology: a primary and two streaming replicas from the local
PostgreSQL binaries. See native/cluster.py for the API and `python -m native --help` for the CLI."""
from .cluster import NODES, REPLICAS, Cluster, ClusterError, find_bindir, load_env

__all__ = ["Cluster", "ClusterError", "NODES", "REPLICAS", "find_bindir", "load_env"]
