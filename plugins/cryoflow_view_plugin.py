"""The cryoflow session view as an Airflow 3 plugin: a FastAPI app in the API server and an
entry in the UI's navigation.

The app (``cryoflow.view.app``) is mounted at ``<base_url>/cryoflow/view``; every route of it
depends on Airflow's own authentication (``get_user``) and asks the configured auth manager for
DAG access (see that module). The navigation entry shows the app's index page inside the Airflow
UI at ``<base_url>/plugin/cryoflow-sessions``.

This file is executed by the plugins manager in every Airflow component, so it stays light: the
app and its imports (Airflow's API server, SQLAlchemy queries, numpy, Pillow) load on its first
request, in the API server only.
"""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import urlsplit

from airflow.configuration import conf
from airflow.plugins_manager import AirflowPlugin

PREFIX = "/cryoflow/view"  # = cryoflow.view.app.PREFIX
UI_ROUTE = "cryoflow-sessions"  # = cryoflow.view.app.UI_ROUTE


class LazyViewApp:
    """An ASGI app that imports and hands every request to ``cryoflow.view.app.app`` (itself
    behind Airflow's authentication on every route), importing it on the first request."""

    def __init__(self) -> None:
        self._app: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        if self._app is None:
            with self._lock:
                if self._app is None:
                    from cryoflow.view.app import app

                    self._app = app
        return self._app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await self.get()(scope, receive, send)

    def __repr__(self) -> str:
        return "<cryoflow session view (cryoflow.view.app:app)>"


def _base_path() -> str:
    path = urlsplit(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")
    return path


view_app = LazyViewApp()


class CryoflowViewPlugin(AirflowPlugin):
    name = "cryoflow_session_view"
    fastapi_apps = [
        {"app": view_app, "url_prefix": PREFIX, "name": "cryoflow session view"},
    ]
    external_views = [
        {
            "name": "Sessions",
            "href": f"{_base_path()}{PREFIX}/",
            "icon": f"{_base_path()}{PREFIX}/icon.svg",
            "url_route": UI_ROUTE,
            "destination": "nav",
            "nav_top_level": True,
        },
    ]
