"""The replication topology of the reference stack, and the operations that change it.

    state.py  which node is the primary now, which nodes are fenced (must be rewound before they
              may start): a directory of tiny files both stacks read, the container entrypoint
              with plain sh
    ops.py    promote (failover or switchover), rejoin (pg_rewind), follow, lag a replica
              (pg_wal_replay_pause), status: one implementation, ``ReplicaSet``, over a few
              primitives each stack provides (native/cluster.py, compose/stackctl.py)

Standard library only: compose/stackctl.py runs with a bare python3.
"""

from .ops import (OpError, ReplicaSet, event_writer, fmt_bytes, format_status, lsn,
                  sync_standby_names)
from .state import INITIAL_PRIMARY, NODES, StateDir, Topology

__all__ = ["INITIAL_PRIMARY", "NODES", "OpError", "ReplicaSet", "StateDir", "Topology",
           "event_writer", "fmt_bytes", "format_status", "lsn", "sync_standby_names"]
