"""The native topology (native/cluster.py) against real PostgreSQL servers: primary + 2 streaming
replicas on free loopback ports in a temporary directory. No mocks.

Skips when no PostgreSQL server binaries are installed, except under CI=true or
REQUIRE_NATIVE=1, where that is a failure. Tests run in file order and share one cluster; the
destructive ones (kill) come last and leave the cluster streaming again.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

psycopg2 = pytest.importorskip("psycopg2")
import psycopg2.errors  # noqa: E402
import psycopg2.extras  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from native.cluster import REPLICAS, Cluster, ClusterError, find_bindir  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    try:
        find_bindir()
    except ClusterError as e:
        if os.environ.get("CI") == "true" or os.environ.get("REQUIRE_NATIVE") == "1":
            pytest.fail(str(e))
        pytest.skip(str(e))
    # mkdtemp, not tmp_path: when run as root the servers run as the postgres user, which cannot
    # enter /tmp/pytest-of-root (0700).
    c = Cluster(tempfile.mkdtemp(prefix="native-test-"), ports=Cluster.free_ports(3), durable=False)
    try:
        c.start(timeout=60)
        yield c
    finally:
        c.destroy()


@contextlib.contextmanager
def connect(cluster, node, user="app", **kw):
    conn = psycopg2.connect(cluster.dsn(node, user), **kw)
    try:
        yield conn
    finally:
        conn.close()


def fetch(cluster, node, sql, params=None, user="app"):
    with connect(cluster, node, user) as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall()


def insert_items(cluster, names):
    with connect(cluster, "primary") as conn:
        with conn, conn.cursor() as cur:
            cur.executemany("INSERT INTO items (name) VALUES (%s)", [(n,) for n in names])


def test_cluster_streams_to_both_replicas(cluster):
    assert cluster.replication_state() == {"replica1": "streaming", "replica2": "streaming"}
    ids = {node: cluster.psql(node, "SELECT system_identifier FROM pg_control_system()")
           for node in cluster.nodes}
    assert len(set(ids.values())) == 1, ids
    assert cluster.psql("primary", "SELECT pg_is_in_recovery()") == "f"
    for replica in REPLICAS:
        assert cluster.psql(replica, "SELECT pg_is_in_recovery()") == "t"
        assert cluster.psql(replica, "SELECT status FROM pg_stat_wal_receiver") == "streaming"


def test_seeded_table_and_insert_replicates(cluster):
    assert fetch(cluster, "primary", "SELECT count(*) FROM items WHERE name LIKE 'item-%%'") == [(10000,)]
    name = f"t-{uuid.uuid4()}"
    insert_items(cluster, [name])
    cluster.wait_replayed(timeout=10)
    for replica in REPLICAS:
        assert fetch(cluster, replica, "SELECT name FROM items WHERE name = %s", (name,)) == [(name,)]


@pytest.mark.parametrize("sql", [
    "CREATE TABLE evil (id int)",
    "CREATE TEMP TABLE evil (id int)",
    "UPDATE items SET name = 'x' WHERE id = 1",
    "DELETE FROM items WHERE id = 1",
    "TRUNCATE items",
    "ALTER TABLE items ADD COLUMN evil int",
])
def test_app_role_is_least_privilege(cluster, sql):
    with connect(cluster, "primary") as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM items")
        assert cur.fetchone()[0] >= 10000
        cur.execute("INSERT INTO items (name) VALUES ('allowed') RETURNING id")
        assert cur.fetchone()[0] > 10000
        conn.rollback()
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            cur.execute(sql)


def test_app_role_cannot_replicate(cluster):
    with pytest.raises(psycopg2.OperationalError, match="no pg_hba.conf entry for replication"):
        psycopg2.connect(cluster.dsn("primary", "app"),
                         connection_factory=psycopg2.extras.PhysicalReplicationConnection)
    # Positive control: the same kind of connection works for the replication role.
    with connect(cluster, "primary", "replication",
                 connection_factory=psycopg2.extras.PhysicalReplicationConnection) as conn:
        cur = conn.cursor()
        cur.execute("IDENTIFY_SYSTEM")
        assert cur.fetchone()[0] == cluster.psql("primary", "SELECT system_identifier FROM pg_control_system()")


def test_replication_role_cannot_read_items(cluster):
    with pytest.raises(psycopg2.OperationalError, match="permission denied for database"):
        psycopg2.connect(cluster.dsn("primary", "replication"))
    repl = cluster.env["REPL_USER"]
    assert cluster.psql("primary", f"SELECT has_table_privilege('{repl}', 'items', 'SELECT'), "
                                   f"rolsuper FROM pg_roles WHERE rolname = '{repl}'") == "f|f"


def test_init_primary_script_is_idempotent(cluster):
    """Re-running compose/postgres/init-primary.sh (as a container restart might) changes nothing."""
    before = fetch(cluster, "primary", "SELECT count(*), max(id) FROM items")
    cluster._run_init_script()
    assert fetch(cluster, "primary", "SELECT count(*), max(id) FROM items") == before
    assert cluster.psql("primary", "SELECT string_agg(slot_name, ',' ORDER BY slot_name) "
                                   "FROM pg_replication_slots") == "replica1,replica2"
    assert cluster.replication_state() == {"replica1": "streaming", "replica2": "streaming"}
    with connect(cluster, "primary") as conn:  # passwords re-applied, still valid
        assert conn.server_version >= 150000


@pytest.mark.parametrize("node", ["primary", "replica2"])
@pytest.mark.parametrize("user", ["app", "postgres"])
def test_wrong_password_rejected(cluster, node, user):
    dsn = cluster.conninfo_without_password(node, user)[0] + " password=wrong"
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(dsn)


def test_passwords_stored_as_scram_and_never_in_files_or_logs(cluster):
    rows = cluster.psql("primary", "SELECT rolname, rolpassword FROM pg_authid "
                                   "WHERE rolpassword IS NOT NULL ORDER BY 1").splitlines()
    assert {r.split("|")[0] for r in rows} == {"app", "postgres", "replicator"}
    assert all(r.split("|")[1].startswith("SCRAM-SHA-256$") for r in rows)
    secrets = [cluster.env[k] for k in ("APP_PASSWORD", "REPL_PASSWORD", "POSTGRES_PASSWORD")]
    for replica in REPLICAS:
        auto = (cluster.datadir(replica) / "postgresql.auto.conf").read_text()
        assert "passfile=" in auto and f"primary_slot_name = '{replica}'" in auto
        assert "password" not in auto and not any(s in auto for s in secrets)
    for node in cluster.nodes:
        text = cluster.logfile(node).read_text()
        assert not any(s in text for s in secrets), f"a password appears in the {node} log"


def test_killed_replica_resumes_from_slot_without_reclone(cluster):
    data = cluster.datadir("replica1")
    marker = data / "native-test-marker"
    marker.write_text("survives a restart, not a re-clone\n")
    st = data.stat()
    if os.geteuid() == 0:
        os.chown(marker, st.st_uid, st.st_gid)
    backups_before = cluster.logfile("primary").read_text().count("BASE_BACKUP")

    cluster.kill("replica1")
    assert not cluster.is_running("replica1")
    # The slot is inactive but keeps WAL for it.
    assert cluster.psql("primary", "SELECT active, restart_lsn IS NOT NULL FROM pg_replication_slots "
                                   "WHERE slot_name = 'replica1'") == "f|t"
    names = [f"while-down-{uuid.uuid4()}" for _ in range(200)]
    insert_items(cluster, names)

    cluster.start_node("replica1")
    cluster.wait_streaming(timeout=15)
    cluster.wait_replayed(timeout=15)
    assert marker.exists()
    assert cluster.logfile("primary").read_text().count("BASE_BACKUP") == backups_before
    got = fetch(cluster, "replica1", "SELECT count(*) FROM items WHERE name = ANY(%s)", (names,))
    assert got == [(200,)]


def test_killed_primary_recovers_and_replicas_reconnect(cluster):
    cluster.kill("primary")
    assert not cluster.is_running("primary")
    # Replicas stay up and keep serving reads while the primary is down.
    for replica in REPLICAS:
        assert fetch(cluster, replica, "SELECT count(*) > 0 FROM items") == [(True,)]

    cluster.start_node("primary")
    assert "database system was not properly shut down" in cluster.log_tail("primary", 50)
    cluster.wait_streaming(timeout=20)
    name = f"after-crash-{uuid.uuid4()}"
    insert_items(cluster, [name])
    cluster.wait_replayed(timeout=10)
    for replica in REPLICAS:
        assert fetch(cluster, replica, "SELECT count(*) FROM items WHERE name = %s", (name,)) == [(1,)]


def test_start_on_existing_basedir_resumes(cluster):
    cluster.stop("replica2")
    ident = cluster.psql("primary", "SELECT system_identifier FROM pg_control_system()")
    Cluster(cluster.basedir, ports=list(cluster.ports.values()), durable=False).start(timeout=30)
    assert cluster.is_running("replica2")
    assert cluster.psql("replica2", "SELECT system_identifier FROM pg_control_system()") == ident
    assert cluster.replication_state() == {"replica1": "streaming", "replica2": "streaming"}
