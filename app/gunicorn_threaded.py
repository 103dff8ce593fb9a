"""gunicorn, threaded mode: APP_WORKERS gthread processes x APP_THREADS threads, one shared
thread-safe pool per process.

    python -m gunicorn -c app/gunicorn_threaded.py app.wsgi:application
"""

import os
import sys

os.environ.setdefault("APP_POOL_MODE", "threaded")
# gunicorn runs this file in the master; make the repository root importable for app.*.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from app.gunicorn_common import *  # noqa: E402,F401,F403  (bind, logs, timeouts, hooks)
from app.gunicorn_common import env_int, require_single_threaded_for_process_mode  # noqa: E402

worker_class = "gthread"
workers = env_int("APP_WORKERS", 2)
threads = env_int("APP_THREADS", 8)
require_single_threaded_for_process_mode(threads)
# One connection per thread per endpoint at most: no request ever waits for another's connection.
os.environ.setdefault("POOL_MAX_SIZE", str(threads))
# Several worker processes per host: they share one health board (pool/board.py), so an outage
# one worker found is not found again by the others (threaded mode leaves it off by default).
# The app's own board: another app on the host (the native stack's per-process one) keeps its.
if workers > 1:
    os.environ.setdefault("POOL_SHARED_STATE", "app-threaded")
proc_name = "app-" + os.environ["APP_POOL_MODE"]
