"""The sample service: a small JSON API over the ``items`` table, served by gunicorn.

Endpoints::

    GET  /                the routes, as JSON                         200
    GET  /items/<id>      one item, read from a replica              200, 400, 404
    GET  /items?limit=N   the N newest items (1..100, default 10)     200, 400
    POST /items           {"name": "..."} on the primary              201 + Location, 400, 411, 413, 415
    GET  /healthz         can this worker serve reads right now?      200, 503
    GET  /stats           this worker's pool statistics, pid, mode    200

Every response carries ``X-Worker: <pid>`` (the gunicorn worker that answered) and, where a
database server answered, ``X-Served-By: host:port``; a database outage
is a 503 with ``Retry-After: 1``; anything unforeseen is a bare JSON 500 (the traceback goes to
the server log only). ``APP_POOL_MODE`` picks the database access: ``threaded`` or ``process`` (one
``pool.Pool`` per worker process, built lazily on its first request) or ``nopool`` (a new
connection per request: the baseline the pool is measured against).

Why plain WSGI and no framework
-------------------------------
The service exists to exercise and measure the pool, so everything between gunicorn and the
pool should be small, visible and cost next to nothing per request. Five routes, one table and
JSON in and out need a router of twenty lines, not a framework: with the standard library only
(``json``, ``re``, ``urllib.parse``) plus psycopg2 and the pool, there is no second dependency
tree to pin in the container image, no framework overhead or hidden behaviour (its own
connection handling, middleware, thread-locals, error pages that may leak a traceback) in the
benchmark numbers, and every status code the service can answer is visible in ``handlers.py``
and ``errors.py``. The price is a few helpers a framework would provide (body limits, content
negotiation, 405 with ``Allow``), written once in ``http.py`` and ``routing.py`` and tested.

Layout: ``application.py`` (the WSGI callable and the error mapping), ``routing.py``,
``http.py`` (request parsing and JSON responses), ``errors.py``, ``handlers.py`` (the endpoints
and input validation), ``db.py`` (the pooled and the no-pool database access), ``config.py``,
``wsgi.py`` (what gunicorn loads) and the gunicorn configs ``gunicorn_<mode>.py``.

This package module imports nothing on purpose: gunicorn's master process loads the configs that
live here, and it must not import psycopg2 or the pool, let alone connect (see ``wsgi.py``).
"""
