"""HTTP/1.1 on both sides of the proxy: the client protocol, the exchange,
pod connections and their pools, and the wire constants they share.

The compiled fast path: ``client``, ``exchange`` and ``upstream`` are
compiled by Cython from their own ``.py`` source, with the C types their
``.pxd`` files declare, and ``_cheads.pyx`` is a C twin of ``heads.py``
(see setup.py). Python imports a built extension module before a ``.py`` of
the same name; when the build is missing, incomplete or older than its
source, or ``KEYROUTE_NO_EXTENSIONS`` is set, the finder below makes every
one of them load from source instead: all compiled or none, since the
compiled modules reach into each other's C types.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType

NO_EXTENSIONS_ENV = "KEYROUTE_NO_EXTENSIONS"

# Compiled from the .py of the same name, with the .pxd beside it.
COMPILED = ("client", "exchange", "upstream")
# Compiled from a .pyx; used instead of the .py named here.
TWINS = {"_cheads": "heads"}

_HERE = os.path.dirname(os.path.abspath(__file__))


def _built(name: str) -> str | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(_HERE, name + suffix)
        if os.path.exists(path):
            return path
    return None


def _why_pure() -> str:
    """Why the pure-Python path runs, or "" if the compiled one does."""
    if os.environ.get(NO_EXTENSIONS_ENV):
        return f"{NO_EXTENSIONS_ENV} is set"
    sources = {m: [m + ".py", m + ".pxd"] for m in COMPILED}
    sources.update({twin: [twin + ".pyx"] for twin in TWINS})
    for name, files in sources.items():
        built = _built(name)
        if built is None:
            return f"the compiled extension is not built (no {name} module; run pip install -e .)"
        for f in files:
            path = os.path.join(_HERE, f)
            # An editable install builds in place: a source edited since the
            # build means the compiled module is not the source any more. (A
            # second's grace: installing a wheel writes its files in any order.)
            if os.path.exists(path) and os.path.getmtime(path) > os.path.getmtime(built) + 1.0:
                return f"the compiled extension is older than {f} (run pip install -e . again)"
    return ""


class _FromSource(importlib.abc.MetaPathFinder):
    """Loads the compiled modules of this package from their .py files."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.rpartition(".")
        if package != __name__ or name not in COMPILED:
            return None
        return importlib.util.spec_from_file_location(fullname, os.path.join(_HERE, name + ".py"))


WHY_PURE = _why_pure()
if WHY_PURE:
    sys.meta_path.insert(0, _FromSource())
