"""The compiled fast path, or the pure-Python one.

``proxy/http1/__init__.py`` decides which (all compiled, or none): the data
plane's modules compiled by Cython from their own source, and
``proxy/http1/_cheads.pyx``, a twin of ``proxy/http1/heads.py`` (same input,
same bytes out, with the per-header work in C). When the pure path runs it
says so at startup, in ``/-/healthz`` and as ``keyroute_native 0``. The pure
path is the reference the tests hold the compiled one to.
"""

from __future__ import annotations

from . import http1
from .http1 import heads

NO_EXTENSIONS_ENV = http1.NO_EXTENSIONS_ENV

rewrite_request = heads.rewrite_request
ACTIVE = False  # the compiled path is in use
WHY_NOT = http1.WHY_PURE  # why not, when it is not

if not WHY_NOT:
    try:
        from .http1 import _cheads
    except ImportError as exc:
        WHY_NOT = f"the compiled extension does not load ({exc})"
    else:
        rewrite_request = _cheads.rewrite_request
        ACTIVE = True
