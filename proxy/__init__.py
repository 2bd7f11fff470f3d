"""keyroute: a key-affinity HTTP routing proxy."""

# Chooses the compiled data plane or the pure-Python one before any of its
# modules is imported (see native.py).
from . import native as native

__version__ = "0.1.0"
