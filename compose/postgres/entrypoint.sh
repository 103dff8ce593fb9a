#!/bin/sh
# Entrypoint of the reference deployment's PostgreSQL image (runs as the OS user postgres).
#
# Which role a node plays is not fixed per container: it comes from the topology state in
# $STATE_DIR (the `topology` volume, shared by the three nodes; layout in topology/state.py):
#   $STATE_DIR/primary          the current primary's name (missing: the first of STACK_NODES)
#   $STATE_DIR/rewind-<node>    <node> is fenced: a former primary, or a replica that got ahead
#                               of the new primary; it must be rewound before it may start
# `make promote` / `make rejoin` (compose/stackctl.py) change it; `make clean` deletes it with
# the data, so a fresh stack is always in the initial topology.
#
# On every start, as this node's role says:
#   the primary            empty volume (initial topology only): initdb (scram) into data.init,
#                          the stack config, init-primary.sh against a temporary server listening
#                          on the Unix socket only (nothing sees a half-initialised primary over
#                          TCP), rename data.init -> data. Existing data: just the server.
#   a replica, no data     wait for the current primary over TCP (progress messages), then
#                          pg_basebackup -R -X stream -S <this node> -c fast into data.clone with a
#                          0600 passfile (postgresql.auto.conf records passfile=..., never a
#                          password), rename data.clone -> data. Any failure exits non-zero: a
#                          replica NEVER falls back to initdb (a stray independent primary).
#   a replica, with data   primary_conninfo/primary_slot_name re-pointed at the current primary,
#                          then the server, which resumes streaming from its slot.
#   a fenced node          wait for the current primary, CHECKPOINT it, pg_rewind onto its
#                          timeline (as the rewind role), write standby.signal, clear the fence,
#                          then start as a replica (above). So a restart of an old primary, by
#                          hand or by the restart policy, never revives a second primary.
#
# stack.conf (a copy of compose/postgres/postgresql.conf, included from postgresql.conf) and
# pg_hba.conf (the template with @REPL_USER@ and @CLIENT_CIDR@ filled in) are (re)installed into
# the data directory on every start. Arguments are passed to postgres, e.g.
# `command: ["-c", "max_slot_wal_keep_size=2GB"]` in docker-compose.yml.
#
# Environment
#   NODE_NAME             this node (required; cluster_name, application_name on the primary,
#                         and the name of its replication slot)
#   STACK_NODES           "name=address ..." of every node on the compose network, the initial
#                         primary first (required; the replicas connect by hostaddr=, so libpq
#                         never waits on DNS for a dead node)
#   REPL_USER, REPL_PASSWORD       replication role (pg_hba; passfile for primary_conninfo)
#   REWIND_USER, REWIND_PASSWORD   pg_rewind's source role (passfile)
#   SYNC                  on: synchronous_standby_names 'ANY 1 (<the two other nodes>)'; off
#                         (default): asynchronous replication
#   CLIENT_CIDR           where TCP clients may connect from (default samenet: the container's
#                         own subnets, i.e. the compose network)
#   first start of the initial primary: POSTGRES_PASSWORD, APP_DB, APP_USER, APP_PASSWORD,
#                         REPL_SLOTS (default: the other nodes of STACK_NODES)
#   UPSTREAM_WAIT_SECONDS how long a replica waits for the primary (default 300)
set -eu

ROOT=/var/lib/postgresql
PGDATA=${PGDATA:-$ROOT/data}
STACK_FILES=${STACK_FILES:-/usr/local/share/stack}
STATE_DIR=${STATE_DIR:-/var/lib/stack}
SOCKET_DIR=/var/run/postgresql
PASSFILE=$ROOT/replication.pgpass
CLIENT_CIDR=${CLIENT_CIDR:-samenet}
SYNC=${SYNC:-off}

log() { printf '%s stack-entrypoint[%s]: %s\n' "$(date -u '+%Y-%m-%d %H:%M:%S UTC')" "${NODE_NAME:-?}" "$*" >&2; }
die() {
    log "FATAL: $*"
    exit 1
}

[ "$(id -u)" != 0 ] || die "must not run as root (the image's USER is postgres)"
: "${NODE_NAME:?NODE_NAME is required (primary, replica1, ...)}"
: "${STACK_NODES:?STACK_NODES is required (name=address ..., the initial primary first)}"
: "${REPL_USER:?REPL_USER is required}"
: "${REWIND_USER:?REWIND_USER is required}"
for user in "$REPL_USER" "$REWIND_USER"; do
    case $user in *[!a-z0-9_]* | [0-9]*) die "role name '$user': use a plain lower-case identifier" ;; esac
done
case $NODE_NAME in *[!a-z0-9_]*) die "NODE_NAME='$NODE_NAME': use a-z, 0-9 and _ only" ;; esac
case $STACK_NODES in *[!a-z0-9_.:=\ ]*) die "STACK_NODES='$STACK_NODES': expected name=address pairs" ;; esac
case $CLIENT_CIDR in *[!0-9a-z.:/]*) die "CLIENT_CIDR='$CLIENT_CIDR' is not an address range" ;; esac
case $SYNC in on | off) ;; *) die "SYNC='$SYNC': use on or off" ;; esac
umask 077

# --- the topology ---------------------------------------------------------------------------
node_addr() {
    for pair in $STACK_NODES; do
        if [ "${pair%%=*}" = "$1" ]; then
            printf '%s\n' "${pair#*=}"
            return 0
        fi
    done
    return 1
}
node_addr "$NODE_NAME" >/dev/null || die "NODE_NAME=$NODE_NAME is not in STACK_NODES ($STACK_NODES)"
INITIAL_PRIMARY=${STACK_NODES%%=*}
OTHERS=""
for pair in $STACK_NODES; do
    [ "${pair%%=*}" = "$NODE_NAME" ] || OTHERS="$OTHERS${OTHERS:+, }${pair%%=*}"
done
PRIMARY=$(head -n 1 "$STATE_DIR/primary" 2>/dev/null || true)
PRIMARY=${PRIMARY:-$INITIAL_PRIMARY}
node_addr "$PRIMARY" >/dev/null || die "$STATE_DIR/primary names '$PRIMARY', which is not in STACK_NODES"
# libpq target of a node on the compose network, by fixed address (no DNS lookup).
conninfo_of() { printf 'host=%s hostaddr=%s port=5432' "$1" "$(node_addr "$1")"; }

# --- configuration files --------------------------------------------------------------------
# stack.conf + include line + pg_hba.conf, idempotent, on every start.
install_config() {
    dir=$1
    cp "$STACK_FILES/postgresql.conf" "$dir/stack.conf"
    sed -e "s|@REPL_USER@|$REPL_USER|g" -e "s|@CLIENT_CIDR@|$CLIENT_CIDR|g" \
        "$STACK_FILES/pg_hba.conf" >"$dir/pg_hba.conf.tmp"
    mv "$dir/pg_hba.conf.tmp" "$dir/pg_hba.conf"
    if ! grep -q "^include 'stack.conf'" "$dir/postgresql.conf"; then
        printf "\n# reference deployment settings (stack-entrypoint)\ninclude 'stack.conf'\n" \
            >>"$dir/postgresql.conf"
    fi
}

# Every node gets the passfile: any of them may become a replica (primary_conninfo) or be
# rewound (pg_rewind's source connection). The walreceiver reads it on every (re)connect.
write_passfile() {
    : "${REPL_PASSWORD:?REPL_PASSWORD is required (passfile)}"
    : "${REWIND_PASSWORD:?REWIND_PASSWORD is required (passfile)}"
    esc() { printf '%s' "$1" | sed 's/[\\:]/\\&/g'; }
    {
        printf '*:*:*:%s:%s\n' "$(esc "$REPL_USER")" "$(esc "$REPL_PASSWORD")"
        printf '*:*:*:%s:%s\n' "$(esc "$REWIND_USER")" "$(esc "$REWIND_PASSWORD")"
    } >"$PASSFILE.tmp"
    chmod 0600 "$PASSFILE.tmp"
    mv "$PASSFILE.tmp" "$PASSFILE"
}

# A replica streams from the current primary, through its own slot: rewrite the two settings
# pg_basebackup -R wrote into postgresql.auto.conf (ALTER SYSTEM's file; `make promote` changes
# them the same way, with ALTER SYSTEM, on a running replica).
set_upstream() {
    auto=$PGDATA/postgresql.auto.conf
    touch "$auto"
    grep -v -E '^[[:space:]]*(primary_conninfo|primary_slot_name)[[:space:]]*=' "$auto" >"$auto.tmp" || true
    printf "primary_conninfo = '%s user=%s passfile=%s'\nprimary_slot_name = '%s'\n" \
        "$(conninfo_of "$PRIMARY")" "$REPL_USER" "$PASSFILE" "$NODE_NAME" >>"$auto.tmp"
    mv "$auto.tmp" "$auto"
}

# Run the server in the foreground as PID 1, without the secrets in its environment (the
# walreceiver is a libpq client and would pick up PG* variables).
run_postgres() {
    install_config "$PGDATA"
    unset POSTGRES_PASSWORD APP_PASSWORD REPL_PASSWORD REWIND_PASSWORD PGPASSWORD PGHOST PGPORT PGUSER PGDATABASE
    if [ "$SYNC" = on ]; then
        # The two *other* nodes: right whoever is primary, so a promotion needs no change.
        set -- -c "synchronous_standby_names=ANY 1 ($OTHERS)" "$@"
    fi
    role=replica
    [ -f "$PGDATA/standby.signal" ] || role=primary
    log "starting postgres ($role, cluster_name=$NODE_NAME, SYNC=$SYNC)"
    exec postgres -D "$PGDATA" -c "cluster_name=$NODE_NAME" "$@"
}

# --- the primary's first start --------------------------------------------------------------
init_primary() {
    : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is required to initialise the primary}"
    : "${APP_DB:?}" "${APP_USER:?}" "${APP_PASSWORD:?}"
    tmp=$ROOT/data.init
    rm -rf "$tmp"
    mkdir -m 0700 "$tmp"
    pwfile=$ROOT/initdb.pw
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    log "initdb (PostgreSQL $PG_MAJOR, scram-sha-256 for TCP, peer on the socket)"
    if ! initdb -D "$tmp" -U postgres --pwfile="$pwfile" --auth-local=peer \
        --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$ROOT/initdb.log" 2>&1; then
        cat "$ROOT/initdb.log" >&2
        rm -f "$pwfile"
        die "initdb failed"
    fi
    rm -f "$pwfile" "$ROOT/initdb.log"
    install_config "$tmp"

    log "temporary server (Unix socket only) for init-primary.sh"
    pg_ctl -D "$tmp" -w -t 60 -s \
        -o "-c listen_addresses='' -c unix_socket_directories=$SOCKET_DIR -c cluster_name=$NODE_NAME-init" \
        start || die "the temporary server did not start"
    slots=${REPL_SLOTS:-$(printf '%s' "$OTHERS" | tr -d ,)}
    if ! PGHOST=$SOCKET_DIR PGPORT=5432 PGUSER=postgres PGDATABASE=postgres INIT_WAIT_SECONDS=30 \
        REPL_SLOTS=$slots sh "$STACK_FILES/init-primary.sh"; then
        pg_ctl -D "$tmp" -m immediate -w -s stop || true
        die "init-primary.sh failed; the volume keeps no data directory, so the next start retries"
    fi
    pg_ctl -D "$tmp" -m fast -w -t 60 -s stop || die "the temporary server did not stop"
    mv "$tmp" "$PGDATA"
    log "primary initialised"
}

# --- replicas -------------------------------------------------------------------------------
# Poll the current primary with pg_isready until it accepts connections; progress every 5 s.
wait_for_primary() {
    limit=${UPSTREAM_WAIT_SECONDS:-300}
    start=$(date +%s)
    last=-100
    while :; do
        if out=$(pg_isready -d "$(conninfo_of "$PRIMARY")" -t 2 2>&1); then
            log "the primary ($PRIMARY) accepts connections"
            return 0
        fi
        waited=$(($(date +%s) - start))
        if [ "$waited" -ge "$limit" ]; then
            die "the primary ($PRIMARY) is not ready after ${waited}s (last: $out)"
        fi
        if [ $((waited - last)) -ge 5 ]; then
            log "waiting for the primary ($PRIMARY) (${waited}s/${limit}s): $out"
            last=$waited
        fi
        sleep 1
    done
}

clone_replica() {
    wait_for_primary
    tmp=$ROOT/data.clone
    rm -rf "$tmp"
    mkdir -m 0700 "$tmp"
    log "pg_basebackup from $PRIMARY using slot $NODE_NAME"
    if ! pg_basebackup -D "$tmp" -w -R -X stream -S "$NODE_NAME" -c fast \
        --label="stack $NODE_NAME" \
        -d "$(conninfo_of "$PRIMARY") user=$REPL_USER passfile=$PASSFILE"; then
        rm -rf "$tmp"
        die "pg_basebackup failed (see above); the data directory stays empty. Fix the cause" \
            "and start this container again. Not falling back to initdb."
    fi
    auto=$tmp/postgresql.auto.conf
    if grep -q 'password=' "$auto"; then
        rm -rf "$tmp"
        die "pg_basebackup -R wrote a password into postgresql.auto.conf; refusing to keep it"
    fi
    if ! grep -q 'passfile=' "$auto" || ! grep -q "primary_slot_name = '$NODE_NAME'" "$auto" ||
        [ ! -f "$tmp/standby.signal" ]; then
        die "unexpected result of pg_basebackup -R (no passfile/slot/standby.signal): $(cat "$auto")"
    fi
    mv "$tmp" "$PGDATA"
    log "cloned from the primary"
}

rewind_onto_primary() {
    wait_for_primary
    source="$(conninfo_of "$PRIMARY") user=$REWIND_USER dbname=postgres passfile=$PASSFILE"
    # pg_rewind takes the source's timeline from its control file, current only after a
    # checkpoint (a freshly promoted primary may not have had one yet).
    psql -X -q -d "$source" -c CHECKPOINT || die "CHECKPOINT on $PRIMARY as $REWIND_USER failed (see above)"
    # pg_rewind recovers a target that was not shut down cleanly in single-user mode first, and
    # single-user mode refuses a standby.signal; it is written again right after.
    rm -f "$PGDATA/standby.signal"
    # After a kill, postmaster.pid names PID 1. A server started normally ignores that (it *is*
    # PID 1 then), but the single-user server pg_rewind spawns for crash recovery is a grandchild
    # of PID 1 (this script) and would refuse to run. No server can be running on this volume now
    # (this container starts it, and has not yet), so the file is stale.
    rm -f "$PGDATA/postmaster.pid"
    log "fenced: pg_rewind onto $PRIMARY's timeline (this node was a primary, or got ahead of it)"
    if ! pg_rewind -D "$PGDATA" --source-server="$source" --progress; then
        die "pg_rewind failed (see above); the node stays fenced, so the next start tries again." \
            "If it keeps failing, re-clone it: stop it, delete its volume, start it."
    fi
    touch "$PGDATA/standby.signal"
    rm -f "$STATE_DIR/rewind-$NODE_NAME"
    log "rewound onto $PRIMARY's timeline; starting as its replica"
}

# --- main -----------------------------------------------------------------------------------
write_passfile
if [ "$NODE_NAME" = "$PRIMARY" ]; then
    # Fenced *and* the recorded primary: a promotion of another node was interrupted after the
    # fence. Another node may already accept writes, so never start as a primary here.
    [ ! -e "$STATE_DIR/rewind-$NODE_NAME" ] ||
        die "$NODE_NAME is fenced but still recorded as the primary: a promotion was interrupted." \
            "Finish it with \`make promote REPLICA=<replica1|replica2>\`, then \`make rejoin NODE=$NODE_NAME\`"
    if [ -f "$PGDATA/PG_VERSION" ]; then
        [ ! -f "$PGDATA/standby.signal" ] ||
            die "the topology says $NODE_NAME is the primary, but $PGDATA is a standby's (standby.signal)"
        log "the primary; existing data directory"
    elif [ "$NODE_NAME" = "$INITIAL_PRIMARY" ] && [ ! -e "$STATE_DIR/primary" ]; then
        init_primary
    else
        die "the topology says $NODE_NAME is the primary, but its volume is empty; \`make clean\`" \
            "starts the stack over"
    fi
else
    if [ ! -f "$PGDATA/PG_VERSION" ]; then
        clone_replica
    elif [ -e "$STATE_DIR/rewind-$NODE_NAME" ]; then
        rewind_onto_primary
    elif [ ! -f "$PGDATA/standby.signal" ]; then
        die "$PGDATA has no standby.signal but the topology says $NODE_NAME is a replica of" \
            "$PRIMARY; refusing to start a second primary (\`make rejoin NODE=$NODE_NAME\`)"
    fi
    set_upstream
    log "a replica of $PRIMARY; resuming streaming from slot $NODE_NAME"
fi
run_postgres "$@"
