#!/bin/sh
# Container healthcheck (runs as the OS user postgres inside the container).
#   every node: the server accepts TCP connections (pg_isready -h 127.0.0.1). Deliberately TCP:
#               during initialisation the temporary server listens on the Unix socket only, so a
#               socket check would report a primary healthy that is about to restart.
#   a replica (standby.signal in PGDATA: roles change with `make promote`, so not a fixed
#               variable): also in recovery and its WAL receiver is streaming (queried over the
#               socket, peer auth as postgres, so the replica needs no superuser password).
set -eu
if ! out=$(pg_isready -h 127.0.0.1 -p 5432 -t 3 2>&1); then
    echo "not ready over TCP: $out"
    exit 1
fi
if [ -f "${PGDATA:-/var/lib/postgresql/data}/standby.signal" ]; then
    state=$(psql -X -q -A -t -h /var/run/postgresql -U postgres -d postgres -c \
        "SELECT pg_is_in_recovery()::text || ' ' || coalesce((SELECT status FROM pg_stat_wal_receiver), 'no-walreceiver')" 2>&1) || {
        echo "query failed: $state"
        exit 1
    }
    if [ "$state" != "true streaming" ]; then
        echo "replica not streaming (in_recovery, walreceiver status: $state)"
        exit 1
    fi
fi
echo ok
