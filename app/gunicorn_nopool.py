"""gunicorn, no-pool baseline: the threaded config's workers and threads, a new database
connection per request (APP_POOL_MODE=nopool).

    python -m gunicorn -c app/gunicorn_nopool.py app.wsgi:application
"""

import os
import sys

os.environ.setdefault("APP_POOL_MODE", "nopool")
# gunicorn runs this file in the master; make the repository root importable for app.*.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from app.gunicorn_threaded import *  # noqa: E402,F401,F403  (the same workers and threads)
