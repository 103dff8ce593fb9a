"""gunicorn, process mode: single-threaded sync workers, each with its own lock-free pool.

    python -m gunicorn -c app/gunicorn_process.py app.wsgi:application

Workers: APP_PROCESS_WORKERS, by default APP_WORKERS x APP_THREADS, the same number of requests
in flight as the threaded config, so the two compare at equal concurrency. A sync worker serves
one request at a time and so holds at most one connection per endpoint: POOL_MAX_SIZE defaults
to 2, and a larger value inherited from a shared environment changes nothing (connections are
opened on demand only).

Sync workers have no keep-alive and expect a buffering proxy in front in production; a request
blocked longer than APP_TIMEOUT gets its whole worker killed (see deploy-lessons section 3.4).
"""

import os
import sys

os.environ.setdefault("APP_POOL_MODE", "process")
# gunicorn runs this file in the master; make the repository root importable for app.*.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from app.gunicorn_common import *  # noqa: E402,F401,F403  (bind, logs, timeouts, hooks)
from app.gunicorn_common import env_int  # noqa: E402

worker_class = "sync"
threads = 1  # sync with threads > 1 would silently become gthread
workers = env_int("APP_PROCESS_WORKERS", env_int("APP_WORKERS", 2) * env_int("APP_THREADS", 8))
os.environ.setdefault("POOL_MAX_SIZE", "2")
# Its workers share a health board (process mode's default), one of the app's own: another app
# on the host (the native stack's threaded one) keeps its, so each reports only its workers.
os.environ.setdefault("POOL_SHARED_STATE", "app-process")
proc_name = "app-" + os.environ["APP_POOL_MODE"]
