#!/bin/sh
# Create the database contract on a freshly initdb'd, running primary. Idempotent: running it
# again changes nothing except re-applying passwords, attributes and grants from the environment.
#
# Connection: standard libpq environment (PGHOST, PGPORT, PGUSER, PGPASSWORD/PGPASSFILE, ...);
# PGUSER defaults to postgres and PGDATABASE to postgres. Inside a container run it as the OS user
# postgres over the Unix socket (peer auth); the native stack runs it over TCP with a password.
#
# Required environment: APP_DB APP_USER APP_PASSWORD REPL_USER REPL_PASSWORD REWIND_USER REWIND_PASSWORD
# Optional:             POSTGRES_PASSWORD  (sets the superuser's password too)
#                       REPL_SLOTS         (default "replica1 replica2": physical slots to create)
#                       INIT_WAIT_SECONDS  (default 30: how long to wait for the server to accept)
#                       PSQL               (default psql)
#
# What it creates (see /tmp/contract.md "Database contract"):
#   role app_owner NOLOGIN; database $APP_DB owned by app_owner; table items (owned by app_owner)
#   seeded with 10,000 rows; login role $APP_USER with CONNECT, USAGE on schema public,
#   SELECT+INSERT on items, USAGE on items_id_seq and nothing else; login role $REPL_USER with
#   REPLICATION and nothing else; login role $REWIND_USER with EXECUTE on the four functions
#   pg_rewind calls on its source (pg_ls_dir, pg_stat_file, pg_read_binary_file x2), membership in
#   pg_checkpoint and CONNECT on database postgres, instead of a superuser (`make rejoin`); one
#   physical slot per name in REPL_SLOTS.
#   PUBLIC loses all privileges on $APP_DB (CONNECT, TEMP) and on schema public, and CONNECT
#   and TEMP on every other database (postgres, template1, template0).
#
# Secrets: passwords never go on a command line (ps) or into the server log. psql reads them from
# its environment with \getenv (psql 15+) and uses them as :'var' literals; the SQL arrives on
# stdin; the session turns statement logging off before ALTER ROLE ... PASSWORD, and
# password_encryption=scram-sha-256 makes the server store SCRAM verifiers only.
set -eu

: "${APP_DB:?APP_DB is required}"
: "${APP_USER:?APP_USER is required}"
: "${APP_PASSWORD:?APP_PASSWORD is required}"
: "${REPL_USER:?REPL_USER is required}"
: "${REPL_PASSWORD:?REPL_PASSWORD is required}"
: "${REWIND_USER:?REWIND_USER is required}"
: "${REWIND_PASSWORD:?REWIND_PASSWORD is required}"
REPL_SLOTS=${REPL_SLOTS:-replica1 replica2}
INIT_WAIT_SECONDS=${INIT_WAIT_SECONDS:-30}
PSQL=${PSQL:-psql}
PGUSER=${PGUSER:-postgres}
PGDATABASE=${PGDATABASE:-postgres}
export PGUSER PGDATABASE APP_PASSWORD REPL_PASSWORD REWIND_PASSWORD
# Exported only if set, so \getenv sees it; empty means "leave the superuser password alone".
if [ -n "${POSTGRES_PASSWORD:-}" ]; then export POSTGRES_PASSWORD; fi

log() { printf '%s\n' "init-primary: $*" >&2; }

# Slot names become SQL literals via psql variables, but keep them to what a slot name allows.
for slot in $REPL_SLOTS; do
    case $slot in
        *[!a-z0-9_]*) log "invalid slot name '$slot' (allowed: a-z 0-9 _)"; exit 2 ;;
    esac
done

# Wait for the server (a container's primary may still be starting).
waited=0
until "$PSQL" -X -q -t -A -c 'select 1' >/dev/null 2>&1; do
    if [ "$waited" -ge "$INIT_WAIT_SECONDS" ]; then
        log "server not accepting connections after ${INIT_WAIT_SECONDS}s; last error:"
        "$PSQL" -X -q -t -A -c 'select 1' >&2 || true
        exit 1
    fi
    sleep 1
    waited=$((waited + 1))
done

if [ "$("$PSQL" -X -q -t -A -c 'select pg_is_in_recovery()')" = t ]; then
    log "refusing to run: the server is a standby (pg_is_in_recovery() = true)"
    exit 1
fi

log "creating roles, database $APP_DB, table items, slots: $REPL_SLOTS"

# Identifiers and slot names are passed with -v (not secret); passwords only through \getenv.
"$PSQL" -X -q -v ON_ERROR_STOP=1 \
    -v app_db="$APP_DB" -v app_user="$APP_USER" -v repl_user="$REPL_USER" \
    -v rewind_user="$REWIND_USER" \
    -v slots="$REPL_SLOTS" <<'SQL'
-- Nothing in this session may end up in the server log (statements carry passwords).
SET log_statement = 'none';
SET log_min_duration_statement = -1;
SET log_min_error_statement = 'panic';
SET password_encryption = 'scram-sha-256';
SET client_min_messages = warning;

\getenv app_pw APP_PASSWORD
\getenv repl_pw REPL_PASSWORD
\getenv rewind_pw REWIND_PASSWORD
\getenv pg_pw POSTGRES_PASSWORD

-- Roles ------------------------------------------------------------------------------------------
SELECT 'CREATE ROLE app_owner NOLOGIN'
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app_owner') \gexec
ALTER ROLE app_owner NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;

SELECT format('CREATE ROLE %I LOGIN', :'app_user')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'app_user') \gexec
ALTER ROLE :"app_user" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
    PASSWORD :'app_pw';

SELECT format('CREATE ROLE %I LOGIN REPLICATION', :'repl_user')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'repl_user') \gexec
ALTER ROLE :"repl_user" LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS
    PASSWORD :'repl_pw';

-- pg_rewind's source role: it reads the new primary's files through these functions only (the
-- documented alternative to a superuser). No REPLICATION: pg_rewind uses a normal session.
SELECT format('CREATE ROLE %I LOGIN', :'rewind_user')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'rewind_user') \gexec
ALTER ROLE :"rewind_user" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
    PASSWORD :'rewind_pw';
GRANT EXECUTE ON FUNCTION pg_catalog.pg_ls_dir(text, boolean, boolean) TO :"rewind_user";
GRANT EXECUTE ON FUNCTION pg_catalog.pg_stat_file(text, boolean) TO :"rewind_user";
GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text) TO :"rewind_user";
GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean) TO :"rewind_user";
-- Explicit, so it keeps working where PUBLIC's CONNECT on postgres is revoked.
GRANT CONNECT ON DATABASE postgres TO :"rewind_user";
-- pg_rewind reads the source's timeline from its control file, current only after a checkpoint
-- (the pg_rewind docs: CHECKPOINT a freshly promoted source first); pg_checkpoint allows exactly
-- that.
GRANT pg_checkpoint TO :"rewind_user";

-- Optional superuser password (\getenv leaves pg_pw unset when POSTGRES_PASSWORD is not exported).
\if :{?pg_pw}
ALTER ROLE postgres PASSWORD :'pg_pw';
\endif

-- Database ---------------------------------------------------------------------------------------
SELECT format('CREATE DATABASE %I OWNER app_owner', :'app_db')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'app_db') \gexec
ALTER DATABASE :"app_db" OWNER TO app_owner;
-- PUBLIC would otherwise have CONNECT and TEMP on every new database.
REVOKE ALL ON DATABASE :"app_db" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"app_db" TO :"app_user";
-- ... and it has them on the databases initdb made: without this the app role could log in to
-- postgres and template1 and create TEMP tables there. Superusers are not affected.
SELECT format('REVOKE CONNECT, TEMPORARY ON DATABASE %I FROM PUBLIC', datname)
  FROM pg_database WHERE datname <> :'app_db' \gexec

-- Physical replication slots, reserving WAL from now on (bounded by max_slot_wal_keep_size).
SELECT format('SELECT pg_create_physical_replication_slot(%L, true)', s)
  FROM unnest(string_to_array(:'slots', ' ')) AS s
 WHERE s <> '' AND NOT EXISTS (SELECT FROM pg_replication_slots WHERE slot_name = s) \gexec

-- Objects inside the app database ---------------------------------------------------------------
\connect :"app_db"
SET log_statement = 'none';
SET client_min_messages = warning;

-- PG 15+ already withholds CREATE on public from PUBLIC; say it explicitly (and drop USAGE too:
-- only the app role needs it).
REVOKE ALL ON SCHEMA public FROM PUBLIC;

-- Created as app_owner so the table and its sequence are owned by it (the schema's owner is
-- pg_database_owner = app_owner, so it may create there).
SET ROLE app_owner;
CREATE TABLE IF NOT EXISTS items (
    id         bigserial PRIMARY KEY,
    name       text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO items (name)
SELECT 'item-' || n FROM generate_series(1, 10000) AS n
 WHERE NOT EXISTS (SELECT FROM items);
RESET ROLE;
ANALYZE items;

GRANT USAGE ON SCHEMA public TO :"app_user";
GRANT SELECT, INSERT ON TABLE items TO :"app_user";
GRANT USAGE ON SEQUENCE items_id_seq TO :"app_user";
SQL

log "done"
