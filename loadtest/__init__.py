"""Load tests for the reference deployment: Locust scenarios and the harness that runs them.

    python -m loadtest run scaling|failover [--target replica|primary] ...   (docs/loadtest.md)

Modules: ``locustfile.py`` and ``shape.py`` are what Locust loads (the only modules importing
locust, in Locust's own process); the harness is ``__main__`` (CLI), ``scenarios`` (what each
scenario runs and measures), ``runner`` (Locust as a subprocess, progress), ``stack`` (kill and
start nodes in the Docker or the native stack), ``analysis`` (figures from the per-request logs),
``durability`` (every acknowledged write exists everywhere), ``plots`` and ``report``
(summary.json/.md). Importing this package imports nothing.
"""
