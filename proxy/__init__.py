"""keyroute: a key-affinity HTTP routing proxy."""

__version__ = "0.1.0"
