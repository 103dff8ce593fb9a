"""What gunicorn loads: ``gunicorn -c app/gunicorn_<mode>.py app.wsgi:application``.

Importing this module reads and checks the settings but opens no connection: without
``--preload`` (the configs never set it) it is imported in each worker after the fork, and the
database pool is built on that worker's first request.
"""

from .application import create_app

application = create_app()
