"""The trace viewer's static files (``static/``: index.html, app.js, app.css), served at ``/ui``
by :mod:`gateway.http.ui`. Plain JavaScript, no build step, nothing loaded from elsewhere."""

from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"

__all__ = ["STATIC_DIR"]
