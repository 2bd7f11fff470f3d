"""The compiled fast path, or the pure-Python one.

``proxy/http1/_cheads.pyx`` (Cython) is a twin of ``proxy/http1/heads.py``:
same input, same bytes out, with the per-header work in C. It is used when
it was built and ``KEYROUTE_NO_EXTENSIONS`` is not set; otherwise the pure
path runs, and says so at startup, in ``/-/healthz`` and as
``keyroute_native 0``. The pure path is the reference the tests hold the
compiled one to.
"""

from __future__ import annotations

import os

from .http1 import heads

NO_EXTENSIONS_ENV = "KEYROUTE_NO_EXTENSIONS"

rewrite_request = heads.rewrite_request
ACTIVE = False  # the compiled twin is in use
WHY_NOT = ""  # why not, when it is not

if os.environ.get(NO_EXTENSIONS_ENV):
    WHY_NOT = f"{NO_EXTENSIONS_ENV} is set"
else:
    try:
        from .http1 import _cheads
    except ImportError as exc:
        WHY_NOT = f"the compiled extension is not built ({exc})"
    else:
        # An editable install builds in place: a .pyx edited since the build
        # means the compiled module is not the source any more.
        source = os.path.join(os.path.dirname(heads.__file__), "_cheads.pyx")
        built = _cheads.__file__ or ""
        if os.path.exists(source) and built and os.path.getmtime(source) > os.path.getmtime(built):
            WHY_NOT = "the compiled extension is older than _cheads.pyx (run pip install -e . again)"
        else:
            rewrite_request = _cheads.rewrite_request
            ACTIVE = True
