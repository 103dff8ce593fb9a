"""Shared fixtures: a real primary and two streaming replicas, and pools of both modes.

The cluster runs from the local PostgreSQL server binaries on free loopback ports, once per
session; `db` makes sure every node runs and streams before and after each test, so a test may
stop, kill or restart servers freely. Without the binaries the database tests skip, except under
CI (CI=true or REQUIRE_DB=1), where a skip would hide a broken setup and fails instead.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile

import pytest

import pool
from native.cluster import REPLICAS, Cluster, find_bindir
from pgutil import throwaway_cluster

# A password only this test session uses: tests assert it never leaks into messages or logs.
APP_PASSWORD = f"pw-{secrets.token_hex(8)}"

# Shared health boards (pool/board.py) of this session only, in a directory removed at the end:
# never the machine's /dev/shm, where a running stack's pools keep theirs.
BOARD_DIR = tempfile.mkdtemp(prefix="pool-boards-")
os.environ["POOL_BOARD_DIR"] = BOARD_DIR


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(BOARD_DIR, ignore_errors=True)


def require(reason: str) -> None:
    """Skip for a missing prerequisite, or fail when the run must not skip (CI)."""
    if os.environ.get("CI") == "true" or os.environ.get("REQUIRE_DB") == "1":
        pytest.fail(f"required prerequisite missing: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def cluster():
    try:
        find_bindir()
    except Exception as exc:  # noqa: BLE001 - any reason means "no servers here"
        require(f"PostgreSQL server binaries not found: {exc}")
    with throwaway_cluster("pool-tests-", env={"APP_PASSWORD": APP_PASSWORD}) as c:
        yield c


def heal(c: Cluster) -> None:
    """Every node running and streaming, in the initial topology (a test may have promoted a
    replica: restore_initial switches back, rejoining fenced nodes through pg_rewind)."""
    c.restore_initial()
    c.wait_streaming(timeout=30)


@pytest.fixture
def db(cluster):
    """The cluster with every node up and streaming, before and after the test."""
    heal(cluster)
    yield cluster
    heal(cluster)


@pytest.fixture(params=["threaded", "process"])
def mode(request):
    return request.param


@pytest.fixture(autouse=True)
def own_default_board(monkeypatch):
    """Each test is a host of its own: the default board (process mode's) starts empty, as it
    does on a machine that just booted, rather than holding what an earlier test's servers did."""
    monkeypatch.setenv("POOL_BOARD_DIR", tempfile.mkdtemp(dir=BOARD_DIR))


@pytest.fixture
def board_path(tmp_path):
    """A shared health board of the test's own (process mode shares one by default), so no
    test sees what an earlier one put on the default board."""
    return str(tmp_path / "board")


@pytest.fixture
def pool_factory(db, board_path):
    """Build pools over the test cluster; every pool made is closed after the test."""
    made = []

    def make(replicas=REPLICAS, primary="primary", **kwargs):
        kwargs.setdefault("timeout", 2.0)
        kwargs.setdefault("shared_state", board_path)
        p = pool.Pool(db.dsn(primary), replicas=[db.dsn(r) for r in replicas], **kwargs)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


@pytest.fixture
def make_pool(pool_factory, mode):
    """pool_factory for the mode under test: tests using it run once per mode."""
    return lambda **kwargs: pool_factory(mode=mode, **kwargs)
