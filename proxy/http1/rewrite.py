"""The head rewrites in use: the compiled twins (``_cheads.pyx``) on the
compiled path, ``heads.py``'s functions, their reference, otherwise."""

from __future__ import annotations

from .. import native
from . import heads

rewrite_request = heads.rewrite_request
rewrite_response = heads.rewrite_response
if native.ACTIVE:
    from . import _cheads

    rewrite_request = _cheads.rewrite_request
    rewrite_response = _cheads.rewrite_response
