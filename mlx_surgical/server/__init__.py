"""The training server: `app.py` (FastAPI routes that only translate, and `serve`), `guard.py`
(the checks every request passes), `workspace.py` (requests confined to the workspace, uploads, removing runs) and `static/` (the
dashboard, plain HTML/CSS/JS with uPlot, calling only the REST API)."""

from .app import create_app, serve

__all__ = ["create_app", "serve"]
