#!/bin/sh
# Entrypoint of the reference deployment's PostgreSQL image (runs as the OS user postgres).
#
#   ROLE=primary   empty volume: initdb (scram) into data.init, install the stack config, run
#                  init-primary.sh against a temporary server that listens on the Unix socket
#                  only (so nothing sees a half-initialised primary over TCP), stop it, rename
#                  data.init -> data. Then (and on every later start) exec postgres.
#   ROLE=replica   empty volume: wait for the primary over TCP (with progress messages), then
#                  pg_basebackup -R -X stream -S <slot> -c fast into data.clone using a 0600
#                  passfile (postgresql.auto.conf records passfile=..., never a password), rename
#                  data.clone -> data. Any failure exits non-zero: a replica NEVER falls back to
#                  initdb (that would silently turn it into an independent primary).
#                  Existing data: exec postgres, which resumes streaming from its slot.
#
# On every start the shared files are (re)installed into the data directory: stack.conf (a copy
# of compose/postgres/postgresql.conf, included from postgresql.conf) and pg_hba.conf (the
# template with @REPL_USER@ and @CLIENT_CIDR@ filled in). Arguments are passed to postgres, e.g.
# `command: ["-c", "max_slot_wal_keep_size=2GB"]` in docker-compose.yml.
#
# Environment
#   ROLE                  primary | replica (required)
#   NODE_NAME             cluster_name (shows in ps, and as application_name in the primary's
#                         pg_stat_replication); default: primary, or the slot name for a replica
#   REPL_USER, REPL_PASSWORD   replication role (both roles: pg_hba / the replica's passfile)
#   CLIENT_CIDR           where TCP clients may connect from (default samenet: the container's
#                         own subnets, i.e. the compose network)
#   primary only:         POSTGRES_PASSWORD, APP_DB, APP_USER, APP_PASSWORD (first start only),
#                         REPL_SLOTS (default "replica1 replica2")
#   replica only:         REPLICATION_SLOT (default NODE_NAME), UPSTREAM_HOST (default primary),
#                         UPSTREAM_PORT (default 5432), UPSTREAM_WAIT_SECONDS (default 300),
#                         UPSTREAM_HOSTADDR (optional: the primary's IP; recorded as hostaddr= in
#                         primary_conninfo so the walreceiver never waits on DNS for a dead primary)
set -eu

ROOT=/var/lib/postgresql
PGDATA=${PGDATA:-$ROOT/data}
STACK_FILES=${STACK_FILES:-/usr/local/share/stack}
SOCKET_DIR=/var/run/postgresql
PASSFILE=$ROOT/replication.pgpass
ROLE=${ROLE:-}
CLIENT_CIDR=${CLIENT_CIDR:-samenet}

log() { printf '%s stack-entrypoint[%s]: %s\n' "$(date -u '+%Y-%m-%d %H:%M:%S UTC')" "${NODE_NAME:-$ROLE}" "$*" >&2; }
die() {
    log "FATAL: $*"
    exit 1
}

[ "$(id -u)" != 0 ] || die "must not run as root (the image's USER is postgres)"
case $ROLE in
primary) NODE_NAME=${NODE_NAME:-primary} ;;
replica)
    REPLICATION_SLOT=${REPLICATION_SLOT:-${NODE_NAME:-}}
    [ -n "$REPLICATION_SLOT" ] || die "ROLE=replica needs NODE_NAME or REPLICATION_SLOT (e.g. replica1)"
    NODE_NAME=${NODE_NAME:-$REPLICATION_SLOT}
    ;;
*) die "set ROLE=primary or ROLE=replica (got '${ROLE}')" ;;
esac
: "${REPL_USER:?REPL_USER is required}"
case $REPL_USER in *[!a-z0-9_]* | [0-9]*) die "REPL_USER='$REPL_USER': use a plain lower-case identifier" ;; esac
case $NODE_NAME in *[!a-z0-9_]*) die "NODE_NAME='$NODE_NAME': use a-z, 0-9 and _ only" ;; esac
case $CLIENT_CIDR in *[!0-9a-z.:/]*) die "CLIENT_CIDR='$CLIENT_CIDR' is not an address range" ;; esac
umask 077

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

# Run the server in the foreground as PID 1, without the secrets in its environment (the
# walreceiver is a libpq client and would pick up PG* variables).
run_postgres() {
    install_config "$PGDATA"
    unset POSTGRES_PASSWORD APP_PASSWORD REPL_PASSWORD PGPASSWORD PGHOST PGPORT PGUSER PGDATABASE
    log "starting postgres ($ROLE, cluster_name=$NODE_NAME)"
    exec postgres -D "$PGDATA" -c "cluster_name=$NODE_NAME" "$@"
}

init_primary() {
    : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is required to initialise the primary}"
    : "${REPL_PASSWORD:?REPL_PASSWORD is required to initialise the primary}"
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
    if ! PGHOST=$SOCKET_DIR PGPORT=5432 PGUSER=postgres PGDATABASE=postgres INIT_WAIT_SECONDS=30 \
        REPL_SLOTS=${REPL_SLOTS:-replica1 replica2} sh "$STACK_FILES/init-primary.sh"; then
        pg_ctl -D "$tmp" -m immediate -w -s stop || true
        die "init-primary.sh failed; the volume keeps no data directory, so the next start retries"
    fi
    pg_ctl -D "$tmp" -m fast -w -t 60 -s stop || die "the temporary server did not stop"
    mv "$tmp" "$PGDATA"
    log "primary initialised"
}

write_passfile() {
    : "${REPL_PASSWORD:?REPL_PASSWORD is required (replication passfile)}"
    esc() { printf '%s' "$1" | sed 's/[\\:]/\\&/g'; }
    printf '*:*:*:%s:%s\n' "$(esc "$REPL_USER")" "$(esc "$REPL_PASSWORD")" >"$PASSFILE.tmp"
    chmod 0600 "$PASSFILE.tmp"
    mv "$PASSFILE.tmp" "$PASSFILE"
}

# Poll the primary ($target) with pg_isready until it accepts connections; progress every 5 s.
wait_for_upstream() {
    limit=${UPSTREAM_WAIT_SECONDS:-300}
    start=$(date +%s)
    last=-100
    while :; do
        if out=$(pg_isready -d "$target" -t 2 2>&1); then
            log "primary $UPSTREAM_HOST:$UPSTREAM_PORT accepts connections"
            return 0
        fi
        waited=$(($(date +%s) - start))
        if [ "$waited" -ge "$limit" ]; then
            die "primary $UPSTREAM_HOST:$UPSTREAM_PORT not ready after ${waited}s (last: $out)"
        fi
        if [ $((waited - last)) -ge 5 ]; then
            log "waiting for the primary $UPSTREAM_HOST:$UPSTREAM_PORT (${waited}s/${limit}s): $out"
            last=$waited
        fi
        sleep 1
    done
}

clone_replica() {
    UPSTREAM_HOST=${UPSTREAM_HOST:-primary}
    UPSTREAM_PORT=${UPSTREAM_PORT:-5432}
    case $UPSTREAM_HOST$UPSTREAM_PORT${UPSTREAM_HOSTADDR:-} in *[!A-Za-z0-9_.:-]*) die "bad UPSTREAM_HOST/PORT/HOSTADDR" ;; esac
    target="host=$UPSTREAM_HOST${UPSTREAM_HOSTADDR:+ hostaddr=$UPSTREAM_HOSTADDR} port=$UPSTREAM_PORT"
    wait_for_upstream
    tmp=$ROOT/data.clone
    rm -rf "$tmp"
    mkdir -m 0700 "$tmp"
    log "pg_basebackup from $UPSTREAM_HOST:$UPSTREAM_PORT using slot $REPLICATION_SLOT"
    if ! pg_basebackup -D "$tmp" -w -R -X stream -S "$REPLICATION_SLOT" -c fast \
        --label="stack $NODE_NAME" \
        -d "$target user=$REPL_USER passfile=$PASSFILE"; then
        rm -rf "$tmp"
        die "pg_basebackup failed (see above); the data directory stays empty. Fix the cause" \
            "and start this container again. Not falling back to initdb."
    fi
    auto=$tmp/postgresql.auto.conf
    if grep -q 'password=' "$auto"; then
        rm -rf "$tmp"
        die "pg_basebackup -R wrote a password into postgresql.auto.conf; refusing to keep it"
    fi
    if ! grep -q 'passfile=' "$auto" || ! grep -q "primary_slot_name = '$REPLICATION_SLOT'" "$auto" ||
        [ ! -f "$tmp/standby.signal" ]; then
        die "unexpected result of pg_basebackup -R (no passfile/slot/standby.signal): $(cat "$auto")"
    fi
    mv "$tmp" "$PGDATA"
    log "cloned from the primary"
}

if [ "$ROLE" = primary ]; then
    if [ -f "$PGDATA/PG_VERSION" ]; then
        [ ! -f "$PGDATA/standby.signal" ] ||
            die "$PGDATA is a standby's data directory (standby.signal); refusing to run it as the primary"
        log "existing data directory; skipping initialisation"
    else
        init_primary
    fi
else
    # The walreceiver reads the passfile on every (re)connect, so keep it current.
    write_passfile
    if [ -f "$PGDATA/PG_VERSION" ]; then
        [ -f "$PGDATA/standby.signal" ] ||
            die "$PGDATA has no standby.signal; refusing to start a replica as a primary"
        log "existing data directory; resuming streaming from slot $REPLICATION_SLOT"
    else
        clone_replica
    fi
fi
run_postgres "$@"
