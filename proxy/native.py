"""The compiled fast path, or the pure-Python one: all compiled, or none.

The data plane's modules (``COMPILED``) are compiled by Cython from their own
``.py`` source, with the C types their ``.pxd`` files declare, and
``proxy/http1/_cheads.pyx`` is a twin of ``proxy/http1/heads.py`` (same input,
same bytes out, with the per-header work in C); see setup.py. Python imports
a built extension module before a ``.py`` of the same name. When the build is
missing, incomplete or older than its source, or ``KEYROUTE_NO_EXTENSIONS``
is set, the finder below loads every compiled module from its source instead
(all of them: the compiled modules reach into each other's C types), and
keyroute says so at startup, in ``/-/healthz`` and as ``keyroute_native 0``.
The pure path is the reference the tests hold the compiled one to.

``proxy/__init__.py`` imports this module, so the choice is made before any
of those modules is imported.
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
COMPILED = (
    "proxy.metrics",
    "proxy.routing",
    "proxy.runtime",
    "proxy.http1.wire",
    "proxy.http1.client",
    "proxy.http1.exchange",
    "proxy.http1.upstream",
)
# Compiled from a .pyx: the twin of the .py named here.
TWINS = {"proxy.http1._cheads": "proxy.http1.heads"}

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _path(module: str, ext: str) -> str:
    return os.path.join(_ROOT, *module.split(".")) + ext


def _built(module: str) -> str | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = _path(module, suffix)
        if os.path.exists(path):
            return path
    return None


def _why_pure() -> str:
    """Why the pure-Python path runs, or "" if the compiled one does."""
    if os.environ.get(NO_EXTENSIONS_ENV):
        return f"{NO_EXTENSIONS_ENV} is set"
    sources = {m: [_path(m, ".py"), _path(m, ".pxd")] for m in COMPILED}
    sources.update({m: [_path(m, ".pyx"), _path(m, ".pxd")] for m in TWINS})
    for module, files in sources.items():
        built = _built(module)
        if built is None:
            return f"the compiled extension is not built (no {module} module; run pip install -e .)"
        for path in files:
            # An editable install builds in place: a source edited since the
            # build means the compiled module is not the source any more. (A
            # second's grace: installing a wheel writes its files in any order.)
            if os.path.exists(path) and os.path.getmtime(path) > os.path.getmtime(built) + 1.0:
                return (
                    f"the compiled extension is older than {os.path.relpath(path, _ROOT)} (run pip install -e . again)"
                )
    return ""


class _FromSource(importlib.abc.MetaPathFinder):
    """Loads the compiled modules from their .py files."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in COMPILED:
            return None
        return importlib.util.spec_from_file_location(fullname, _path(fullname, ".py"))


ACTIVE = False  # the compiled path is in use
WHY_NOT = _why_pure()  # why not, when it is not

if WHY_NOT:
    sys.meta_path.insert(0, _FromSource())
else:
    ACTIVE = True
