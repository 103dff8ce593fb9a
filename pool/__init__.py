"""A PostgreSQL connection pool for Python web servers: psycopg2 and the standard library only.

Copy this folder into your project and ``import pool``::

    import pool
    p = pool.Pool("host=db1 dbname=app user=app", replicas=["host=db2 ...", "host=db3 ..."],
                  mode="threaded")          # or "process" for single-threaded worker processes
    with p.connection() as conn: ...        # the primary; commit on success, rollback on error
    row = p.fetchone("SELECT ...", (1,), readonly=True)   # a replica, balanced, retried once

pool/README.md (it travels with this folder) is the reference: the design, every option, the
two modes, how failures are handled and the invariants the tests hold the code to.
"""

from .core import Checkout, Pool
from .errors import EndpointRefused, EndpointUnavailable, PoolError, PoolTimeout, QueryTimeout

__all__ = ["Pool", "Checkout", "PoolError", "PoolTimeout", "EndpointUnavailable",
           "EndpointRefused", "QueryTimeout"]
__version__ = "0.2.0"
