"""make watch / make demo: the pool's failover, live in the terminal (python -m watch --help).

model.py computes every figure from recorded samples (pure, tested); live.py does the I/O and
the drawing, with rich; __main__.py is the command line and the demo script.
"""
