"""The worker's HTTP surface: ``/metrics`` and ``/healthz``, nothing else.

Faust serves, by default, ``/table/<name>/<key>/`` (table contents: decisions with the full
phone number, IP x number pairs), ``/router/`` (which worker owns which key, every worker's URL)
and, in debug mode, ``/`` statistics, ``/assignment/`` and ``/graph/``; with statistics off it
serves a production index at ``/``. None of them is authenticated. The detector turns every one
off: the Faust settings below, and a web driver with no built-in blueprints at all, so a Faust
upgrade that adds a view or flips a default does not open a door. Only the routes the app adds
itself (``app.page``) are served.
"""

from __future__ import annotations

from typing import Any, ClassVar

from faust.web.drivers.aiohttp import Web

# faust-streaming 0.15 settings that gate its built-in views (faust/web/base.py BLUEPRINT_FLAGS).
CLOSED_WEB_SETTINGS: dict[str, Any] = {
    "web_tables_enabled": False,
    "web_router_enabled": False,
    "web_stats_enabled": False,
    "web_graph_enabled": False,
    "web_metrics_enabled": False,
}


class ClosedWeb(Web):
    """Faust's aiohttp web server without any built-in view (table, router, stats, assignment,
    graph, performance, production index)."""

    default_blueprints: ClassVar[list[Any]] = []
    production_blueprints: ClassVar[list[Any]] = []
    debug_blueprints: ClassVar[list[Any]] = []
    optional_blueprints: ClassVar[list[Any]] = []
