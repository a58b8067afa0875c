"""The worker's HTTP surface: ``/metrics``, ``/healthz`` and ``/v1/precheck``, nothing else.

Faust serves, by default, ``/table/<name>/<key>/`` (table contents: decisions with the full
phone number, IP x number pairs), ``/router/`` (which worker owns which key, every worker's URL)
and, in debug mode, ``/`` statistics, ``/assignment/`` and ``/graph/``; with statistics off it
serves a production index at ``/``. None of them is authenticated. The detector turns every one
off: the Faust settings below, and a web driver with no built-in blueprints at all, so a Faust
upgrade that adds a view or flips a default does not open a door. Only the routes the app adds
itself (``app.page``) are served, and only those in :data:`SERVED_PATHS`: adding any other route
raises at start-up, so a new view is a change to this allow-list, reviewed as such.

``/v1/precheck`` (:mod:`detector.stream.precheck`) is added only when ``DETECTOR_PRECHECK_TOKEN``
is set, and answers only requests carrying that token.
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


# Every path a worker may serve: (path, what, authentication).
SERVED: tuple[tuple[str, str, str], ...] = (
    ("/metrics", "Prometheus metrics (aggregates, bounded labels, no PII)", "none"),
    ("/healthz", "status, assigned partitions, list entry count, model and policy versions", "none"),
    ("/v1/precheck", "the web tier's pre-check of one IP (only with DETECTOR_PRECHECK_TOKEN)",
     "bearer token"),
)
SERVED_PATHS = frozenset(path for path, _, _ in SERVED)


class UnlistedRoute(RuntimeError):
    """A route outside :data:`SERVED_PATHS` was added to the worker's web server."""


class ClosedWeb(Web):
    """Faust's aiohttp web server without any built-in view (table, router, stats, assignment,
    graph, performance, production index), serving only :data:`SERVED_PATHS`."""

    default_blueprints: ClassVar[list[Any]] = []
    production_blueprints: ClassVar[list[Any]] = []
    debug_blueprints: ClassVar[list[Any]] = []
    optional_blueprints: ClassVar[list[Any]] = []

    def route(self, pattern: str, handler: Any, cors_options: Any = None) -> None:
        if pattern not in SERVED_PATHS:
            raise UnlistedRoute(f"the worker's web server may serve only {sorted(SERVED_PATHS)}; "
                                f"refusing {pattern!r} (see detector/stream/web_surface.py)")
        super().route(pattern, handler, cors_options)
