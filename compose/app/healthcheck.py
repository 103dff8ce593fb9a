#!/usr/bin/env python3
"""Container healthcheck: GET /healthz on the local gunicorn must answer 200 within 4 s.

The port comes from APP_BIND (default 0.0.0.0:8000). Standard library only.
"""
import os
import sys
import urllib.error
import urllib.request

port = os.environ.get("APP_BIND", "0.0.0.0:8000").rsplit(":", 1)[-1]
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=4) as resp:
        print(resp.status, resp.read(300).decode("utf-8", "replace"))
except urllib.error.HTTPError as exc:
    print(exc.code, exc.read(300).decode("utf-8", "replace"))
    sys.exit(1)
except OSError as exc:
    print(f"no answer: {exc}")
    sys.exit(1)
