"""A PostgreSQL connection pool for Python web servers: psycopg2 and the standard library only.

Copy this folder into your project and ``import pool``::

    import pool
    p = pool.Pool("host=db1 dbname=app user=app", replicas=["host=db2 ...", "host=db3 ..."],
                  mode="threaded")          # or "process" for single-threaded worker processes
    with p.connection() as conn: ...        # the primary; commit on success, rollback on error
    row = p.fetchone("SELECT ...", (1,), readonly=True)   # a replica, balanced, retried once

See README.md for the design, every option, and how failures are handled.
"""

from .core import Checkout, Pool
from .errors import EndpointUnavailable, PoolError, PoolTimeout

__all__ = ["Pool", "Checkout", "PoolError", "PoolTimeout", "EndpointUnavailable"]
__version__ = "0.1.0"
