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
import threading
import time
import uuid
from pathlib import Path

import pytest

psycopg2 = pytest.importorskip("psycopg2")
import psycopg2.errors  # noqa: E402
import psycopg2.extras  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from native.cluster import REPLICAS, Cluster, ClusterError, find_bindir  # noqa: E402
from stackutil import check_database_privileges  # noqa: E402
from topology import OpError, format_status  # noqa: E402
from topology.ops import literal, lsn  # noqa: E402


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
    with pytest.raises(psycopg2.OperationalError, match="pg_hba.conf rejects connection"):
        psycopg2.connect(cluster.dsn("primary", "replication"))
    repl = cluster.env["REPL_USER"]
    assert cluster.psql("primary", f"SELECT has_table_privilege('{repl}', 'items', 'SELECT'), "
                                   f"rolsuper FROM pg_roles WHERE rolname = '{repl}'") == "f|f"


def test_database_privileges_are_least(cluster):
    """PUBLIC keeps no CONNECT/TEMP on postgres and template1; the replication role makes
    replication connections only (the checks shared with the stack tests)."""
    check_database_privileges(lambda node, user, dbname=None: cluster.dsn(node, user, dbname))


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
    assert {r.split("|")[0] for r in rows} == {"app", "postgres", "replicator", "rewinder"}
    assert all(r.split("|")[1].startswith("SCRAM-SHA-256$") for r in rows)
    secrets = [cluster.env[k] for k in ("APP_PASSWORD", "REPL_PASSWORD", "REWIND_PASSWORD",
                                        "POSTGRES_PASSWORD")]
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


# ----------------------------------------------------------------------- promotion and rejoin
# These change roles; each ends with restore_initial(), which the tests above rely on never
# needing (they run first) and which is itself under test here.
def upstream_port(cluster, node):
    """The port a standby's WAL receiver streams from ('' if it is not connected)."""
    return cluster.psql(node, "SELECT coalesce(sender_port::text, '') FROM pg_stat_wal_receiver")


def base_backups(cluster):
    return sum(cluster.logfile(n).read_text().count("BASE_BACKUP") for n in cluster.nodes)


def assert_initial_topology(cluster):
    assert cluster.topology().initial
    assert cluster.psql("primary", "SELECT pg_is_in_recovery()") == "f"
    assert cluster.replication_state() == {"replica1": "streaming", "replica2": "streaming"}
    for replica in REPLICAS:
        assert upstream_port(cluster, replica) == str(cluster.port("primary"))


def test_switchover_fences_the_old_primary_and_loses_nothing(cluster):
    backups = base_backups(cluster)
    names = [f"before-switchover-{uuid.uuid4()}" for _ in range(50)]
    insert_items(cluster, names)  # the last commit right before the switchover
    events = []
    cluster.promote("replica1", on_event=lambda name, at: events.append(name))

    assert events == ["promote", "fenced", "promoted", "followed"]
    assert not cluster.is_running("primary"), "a switchover stops the old primary first"
    assert cluster.topology().primary == "replica1" and cluster.topology().rewind == {"primary"}
    assert cluster.psql("replica1", "SELECT pg_is_in_recovery()") == "f"
    assert cluster.replica_set().timeline("replica1") == 2
    # replica2 followed the timeline switch without a restart or a re-clone
    cluster.wait_streaming(timeout=10, nodes=["replica2"])
    assert upstream_port(cluster, "replica2") == str(cluster.port("replica1"))
    assert fetch(cluster, "replica1", "SELECT count(*) FROM items WHERE name = ANY(%s)", (names,)) == [(50,)]
    # the new primary keeps a slot for each other node
    assert cluster.psql("replica1", "SELECT string_agg(slot_name, ',' ORDER BY slot_name) "
                                    "FROM pg_replication_slots") == "primary,replica2"
    with connect(cluster, "replica1") as conn:  # the app role writes there now
        with conn, conn.cursor() as cur:
            cur.execute("INSERT INTO items (name) VALUES ('on-replica1') RETURNING id")

    cluster.rejoin("primary")
    assert cluster.psql("primary", "SELECT pg_is_in_recovery()") == "t"
    assert upstream_port(cluster, "primary") == str(cluster.port("replica1"))
    assert cluster.psql("primary", "SELECT count(*) FROM pg_replication_slots") == "0"
    cluster.wait_replayed(timeout=10)
    assert fetch(cluster, "primary", "SELECT count(*) FROM items WHERE name = 'on-replica1'") == [(1,)]
    assert cluster.topology().rewind == frozenset()
    status = format_status(cluster.replication_status())
    assert status.startswith("primary: replica1, timeline 2, replication asynchronous"), status
    assert base_backups(cluster) == backups, "nothing was re-cloned"

    cluster.restore_initial()  # a switchover back: timeline 3
    assert_initial_topology(cluster)
    assert cluster.replica_set().timeline("primary") == 3


def test_failover_after_a_kill_and_the_old_primary_never_comes_back_as_a_primary(cluster):
    cluster.kill("primary")
    cluster.promote("replica1")
    assert cluster.topology().rewind == {"primary"}
    with connect(cluster, "replica1") as conn:
        with conn, conn.cursor() as cur:
            cur.execute("INSERT INTO items (name) VALUES ('after-failover')")
    # Starting the old primary by hand (as a restart policy would) rewinds it into a replica.
    cluster.start_node("primary")
    assert cluster.psql("primary", "SELECT pg_is_in_recovery()") == "t"
    cluster.wait_streaming(timeout=10)
    cluster.wait_replayed(timeout=10)
    assert fetch(cluster, "primary", "SELECT count(*) FROM items WHERE name = 'after-failover'") == [(1,)]
    assert cluster.topology().rewind == frozenset()
    cluster.restore_initial()
    assert_initial_topology(cluster)


def _only_replica2_receives(cluster, count=20):
    """Writes that reach replica2 but not replica1 (its WAL receiver disconnected), as when the
    primary dies with replica1 a little behind."""
    cluster.psql("replica1", "ALTER SYSTEM SET primary_conninfo = ''; SELECT pg_reload_conf()")
    names = [f"only-on-replica2-{uuid.uuid4()}" for _ in range(count)]
    insert_items(cluster, names)
    cluster.wait_replayed(timeout=10, nodes=["replica2"])
    return names


def test_failover_first_fetches_what_the_other_replica_received(cluster):
    """replica1 is behind replica2 when the primary dies: before pg_promote() it streams the
    missing WAL from replica2 (cascading replication), so those writes survive and replica2
    follows the new timeline without a rewind. With SYNC=on this is what makes the promotion of
    either replica lose nothing acknowledged."""
    backups = base_backups(cluster)
    names = _only_replica2_receives(cluster)
    cluster.kill("primary")
    cluster.promote("replica1")
    for node in ("replica1", "replica2"):
        assert fetch(cluster, node, "SELECT count(*) FROM items WHERE name = ANY(%s)", (names,)) == [(20,)]
    assert upstream_port(cluster, "replica2") == str(cluster.port("replica1"))
    assert "pg_rewind" not in cluster.logfile("replica2").read_text()[-3000:]
    assert base_backups(cluster) == backups
    cluster.restore_initial()
    assert_initial_topology(cluster)


def receive_replay(cluster, node):
    """(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()) of a standby as integers (None: NULL)."""
    receive, replay = cluster.psql(node, "SELECT coalesce(pg_last_wal_receive_lsn()::text, ''), "
                                         "coalesce(pg_last_wal_replay_lsn()::text, '')").split("|")
    return lsn(receive), lsn(replay)


def test_failover_onto_a_restarted_replica_of_an_idle_primary(cluster):
    """A restarted standby's WAL receiver asks for WAL from the start of the segment it is in and
    reports that start as received (pg_last_wal_receive_lsn()) until WAL past what it replayed
    arrives: on an idle primary, never. `make kill-replica; make start-replica; make kill-primary;
    make promote REPLICA=replica1` then found replica1 "1 MB behind" replica2 although it had
    replayed all replica2 had, and cascading could not move the number either (replica2 has
    nothing newer): 30 s later the promotion gave up. Built here without the race (nothing can
    reach replica1 after its restart: the primary is already down)."""
    names = [f"before-idle-failover-{uuid.uuid4()}" for _ in range(5)]
    insert_items(cluster, names)
    cluster.wait_replayed(timeout=10)
    cluster.kill("primary")
    cluster.kill("replica1")
    cluster.start_node("replica1")
    deadline = time.monotonic() + 10
    while receive_replay(cluster, "replica1")[0] is None:  # until recovery asks to stream
        assert time.monotonic() < deadline, "replica1 never requested streaming"
        time.sleep(0.05)
    receive, replay = receive_replay(cluster, "replica1")
    assert receive < replay == receive_replay(cluster, "replica2")[0], \
        "not the state under test: replica1 must report less received than replayed"

    t0 = time.monotonic()
    cluster.promote("replica1")
    assert time.monotonic() - t0 < 15
    assert cluster.psql("replica1", "SELECT pg_is_in_recovery()") == "f"
    cluster.wait_streaming(timeout=10, nodes=["replica2"])
    for node in ("replica1", "replica2"):
        assert fetch(cluster, node, "SELECT count(*) FROM items WHERE name = ANY(%s)", (names,)) == [(5,)]
    cluster.restore_initial()
    assert_initial_topology(cluster)


def test_failover_that_cannot_catch_up_leaves_the_replica_as_it_was(cluster):
    """When the missing WAL cannot be fetched from the other replica, the promotion gives up and
    puts the chosen replica back on its upstream and slot, so starting the primary (`make up`)
    restores the initial topology instead of leaving it streaming from the other replica."""
    before = {s: cluster.psql("replica1", f"SHOW {s}") for s in ("primary_conninfo", "primary_slot_name")}
    names = _only_replica2_receives(cluster, count=5)
    cluster.kill("primary")
    cluster.psql("replica1", f"ALTER SYSTEM SET primary_conninfo = {literal(before['primary_conninfo'])}; "
                             "SELECT pg_reload_conf()")
    assert receive_replay(cluster, "replica1")[0] < receive_replay(cluster, "replica2")[0]
    rs = cluster.replica_set()
    rs.catch_up_timeout = 2
    rs.upstream_conninfo = lambda node, primary: "host=127.0.0.1 port=1 connect_timeout=1"  # unreachable
    with pytest.raises(OpError, match="did not get replica2's WAL"):
        rs.promote("replica1")
    assert {s: cluster.psql("replica1", f"SHOW {s}") for s in before} == before
    assert cluster.psql("replica1", "SELECT pg_is_in_recovery()") == "t"
    assert cluster.topology().initial

    cluster.restore_initial()  # what `make up` does: starts the primary, waits for both replicas
    assert_initial_topology(cluster)
    cluster.wait_replayed(timeout=10)
    assert fetch(cluster, "replica1", "SELECT count(*) FROM items WHERE name = ANY(%s)", (names,)) == [(5,)]


def test_follow_rewinds_a_replica_that_got_ahead(cluster):
    """A node promoted behind the stack's back (pg_promote() by hand): replica2, ahead of it,
    cannot follow as it is; follow() rewinds it (pg_rewind, no re-clone) and those writes go."""
    backups = base_backups(cluster)
    names = _only_replica2_receives(cluster)
    cluster.kill("primary")
    assert cluster.psql("replica1", "SELECT pg_promote(true, 60)") == "t"
    cluster.state.set_rewind("primary", True)
    cluster.state.set_primary("replica1")
    cluster.replica_set().follow("replica2", "replica1")
    assert upstream_port(cluster, "replica2") == str(cluster.port("replica1"))
    for node in ("replica1", "replica2"):
        assert fetch(cluster, node, "SELECT count(*) FROM items WHERE name = ANY(%s)", (names,)) == [(0,)]
    assert base_backups(cluster) == backups
    cluster.restore_initial()
    assert_initial_topology(cluster)


def test_a_replica_down_at_the_promotion_is_rewound_at_its_start(cluster):
    cluster.kill("replica2")
    cluster.promote("replica1")
    assert cluster.topology().rewind == {"primary", "replica2"}
    cluster.start_node("replica2")  # killed, so pg_rewind first recovers it in single-user mode
    cluster.wait_streaming(timeout=15, nodes=["replica2"])
    assert upstream_port(cluster, "replica2") == str(cluster.port("replica1"))
    assert cluster.topology().rewind == {"primary"}
    cluster.restore_initial()
    assert_initial_topology(cluster)


def test_split_brain_start_then_rejoin(cluster):
    """start_node(split_brain=True) is the test hook for "the old primary restarted before it was
    fenced": two nodes accept writes, status says so, and rejoin() ends it."""
    cluster.kill("primary")
    cluster.promote("replica1")
    cluster.start_node("primary", split_brain=True)
    assert cluster.psql("primary", "SELECT pg_is_in_recovery()") == "f"
    status = cluster.replication_status()
    assert sorted(status["primaries"]) == ["primary", "replica1"]
    assert "WARNING: more than one node accepts writes" in format_status(status)
    cluster.rejoin("primary")
    assert cluster.psql("primary", "SELECT pg_is_in_recovery()") == "t"
    cluster.restore_initial()
    assert_initial_topology(cluster)


def test_promote_refuses_what_makes_no_sense(cluster):
    with pytest.raises(OpError, match="already the primary"):
        cluster.promote("primary")
    cluster.stop("replica2")
    try:
        with pytest.raises(OpError, match="replica2 is not running"):
            cluster.promote("replica2")
    finally:
        cluster.start_node("replica2")
    with pytest.raises(OpError, match="is the primary"):
        cluster.rejoin("primary")
    assert_initial_topology(cluster)


def test_lag_replica_pauses_replay_then_catches_up(cluster):
    # Lag in seconds is the age of the last replayed commit, unknown (None) until the replica has
    # replayed one since its start: give it one, as any live primary would.
    insert_items(cluster, ["before-lag"])
    cluster.wait_replayed(timeout=10)
    events = {}
    worker = threading.Thread(target=cluster.lag_replica, args=("replica2", 2.0),
                              kwargs={"on_event": lambda name, at: events.__setitem__(name, at)})
    worker.start()
    try:
        deadline = time.monotonic() + 5
        while "paused" not in events and time.monotonic() < deadline:
            time.sleep(0.02)
        name = f"during-lag-{uuid.uuid4()}"
        insert_items(cluster, [name])
        time.sleep(0.3)
        assert fetch(cluster, "replica2", "SELECT count(*) FROM items WHERE name = %s", (name,)) == [(0,)]
        assert fetch(cluster, "replica1", "SELECT count(*) FROM items WHERE name = %s", (name,)) == [(1,)]
        row = {r["node"]: r for r in cluster.replication_status()["nodes"]}["replica2"]
        assert row["replay"] == "paused" and row["lag_bytes"] > 0 and row["lag_s"] > 0
    finally:
        worker.join(20)
    assert list(events) == ["paused", "resumed", "caught_up"]
    assert 2.0 <= events["resumed"] - events["paused"] < 4
    assert fetch(cluster, "replica2", "SELECT count(*) FROM items WHERE name = %s", (name,)) == [(1,)]
    assert cluster.psql("replica2", "SELECT pg_get_wal_replay_pause_state()") == "not paused"


def test_sync_on_names_the_two_other_nodes(cluster):
    def settings():
        return {n: cluster.psql(n, "SHOW synchronous_standby_names") for n in cluster.nodes}

    assert set(settings().values()) == {""}
    sync = Cluster(cluster.basedir, ports=list(cluster.ports.values()), env={"SYNC": "on"}, durable=False)
    sync.apply_sync()
    try:
        assert settings() == {"primary": "ANY 1 (replica1, replica2)",
                              "replica1": "ANY 1 (primary, replica2)",
                              "replica2": "ANY 1 (primary, replica1)"}
        deadline = time.monotonic() + 5
        while cluster.psql("primary", "SELECT string_agg(sync_state, ',') FROM pg_stat_replication") != "quorum,quorum":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        insert_items(cluster, ["committed-synchronously"])
    finally:
        cluster.apply_sync()  # this cluster object has SYNC=off
    assert set(settings().values()) == {""}
