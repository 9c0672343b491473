"""The node's web page: static files of static/ (no build step, nothing from another site), and the headers that
keep it to itself. Plain Python, no Flask: app.py serves what `asset` names.

The page is the same for every role and holds no data: it learns the node's role and mode from the API
(GET /identity) and reads everything else from the API too, with the key the user typed (sent as X-API-Key).
So it is served without the key (policy.Action.PAGE), like /health.
"""
from __future__ import annotations

import re
from pathlib import Path

from errors import NotFound

STATIC = Path(__file__).resolve().parent / "static"
INDEX = "index.html"
ASSET_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}\.(html|js|css|svg|png)")
MEDIA_TYPES = {"html": "text/html", "js": "text/javascript", "css": "text/css", "svg": "image/svg+xml",
               "png": "image/png"}
# Everything the page loads comes from the node (default-src 'self'): no inline script or style, no other site,
# no plugins, no framing by another page. blob: is for the downloads the page builds from the API's answers.
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
                           "frame-ancestors 'none'; form-action 'none'")
HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}


def asset(name: str) -> tuple[Path, str]:
    """(path, media type) of a file of the page, or NotFound naming it."""
    match = ASSET_NAME.fullmatch(name or "")
    path = STATIC / name if match else None
    if path is None or not path.is_file():
        raise NotFound(f"the page has no file {name!r}")
    return path, MEDIA_TYPES[match.group(1)]
