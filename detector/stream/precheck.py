"""``GET /v1/precheck``: the web tier asks whether to offer the callback to a visitor at all.

HTTP contract (the README's "Pre-check for the web tier" has it with examples)::

    GET /v1/precheck?ip=203.0.113.9[&authenticated=1][&country=GB]
    Authorization: Bearer <DETECTOR_PRECHECK_TOKEN>

    200 {"show_callback": false, "reasons": ["velocity_ip"]}

* 401 without the right token (``WWW-Authenticate: Bearer``); compared in constant time.
* 404 when ``DETECTOR_PRECHECK_TOKEN`` is not set: the route does not exist, the worker's HTTP
  surface stays /metrics and /healthz (:mod:`detector.stream.web_surface`).
* 400 with ``{"error": ...}`` for a missing or invalid ``ip``, ``authenticated`` or ``country``.
* 503 with ``{"error": ...}`` while partitions move (a rebalance) or the owning worker cannot be
  reached; the web tier then shows the callback (fail open: every request is still decided).

The answer comes from :func:`detector.core.precheck.precheck`: nothing is counted, no request is
created. The ``ip`` table is partitioned by IP, so the answer must come from the worker that owns
the IP's partition (the by-ip partition: murmur2 of the normalized IP, as the producer's
partitioner). A worker that does not own it forwards the request once, over HTTP, to the owner's
URL from Faust's partition assignment (``app.router.table_metadata``: every worker's web URL,
``DETECTOR_WEB_HOST`` and ``DETECTOR_WEB_PORT``, and the table partitions it owns), with the same
token and a hop header; a forwarded request that lands on a non-owner (the assignment moved
meanwhile) is answered 503, never forwarded again. The IP is never logged, nor put in a label.
"""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any

from aiokafka.partitioner import murmur2

from detector import metrics
from detector.core.errors import InputError
from detector.core.parse import parse_ip
from detector.core.precheck import precheck

log = logging.getLogger("detector.stream.precheck")

PATH = "/v1/precheck"
HOP_HEADER = "X-Detector-Precheck-Hop"
FORWARD_TIMEOUT_S = 2.0
TRUE, FALSE = ("1", "true", "yes"), ("0", "false", "no", "")


class PrecheckError(Exception):
    def __init__(self, status: int, result: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.result = result


def parse_query(query: Any) -> tuple[str, bool, str | None]:
    """(normalized IP, authenticated, destination country) from the query string, or
    :class:`PrecheckError` 400 saying which parameter is wrong."""
    ips = query.getall("ip", [])
    if len(ips) != 1:
        raise PrecheckError(400, "bad_request",
                            "query parameter 'ip': expected exactly one IPv4 or IPv6 address")
    try:
        ip = parse_ip(ips[0])
    except InputError:
        raise PrecheckError(400, "bad_request",
                            "query parameter 'ip': expected an IPv4 or IPv6 address") from None
    flag = str(query.get("authenticated", "")).strip().lower()
    if flag not in TRUE and flag not in FALSE:
        raise PrecheckError(400, "bad_request",
                            "query parameter 'authenticated': expected 1/true or 0/false")
    country = query.get("country")
    if country is not None:
        country = str(country).strip().upper()
        if len(country) != 2 or not country.isascii() or not country.isalpha():
            raise PrecheckError(400, "bad_request",
                                "query parameter 'country': expected an ISO 3166 alpha-2 code")
    return ip, flag in TRUE, country


class Precheck:
    """The view's logic, bound to one worker's app and runtime."""

    def __init__(self, app: Any, rt: Any, token: str) -> None:
        self.app = app
        self.rt = rt
        self._expected = ("Bearer " + token).encode("utf-8")
        self._owners: dict[int, str] = {}
        self._owners_for: Any = None  # the consumer generation the owner map is for
        self._partitions = 0

    def authorized(self, header: str | None) -> bool:
        return hmac.compare_digest((header or "").encode("utf-8", "replace"), self._expected)

    def _refresh(self) -> None:
        """The by-ip partition count and each partition's owner URL, once per generation."""
        generation = self.rt.generation
        if generation == self._owners_for and self._partitions:
            return
        topic = self.rt.topics["by_ip"].get_topic_name()
        known = self.rt.partition_counts  # read from the cluster at each assignment
        self._partitions = (known[1] if known else
                            int(self.app.consumer.topic_partitions(topic) or self.rt.settings.partitions))
        owners: dict[int, str] = {}
        changelog = self.rt.tables["ip"].changelog_topic.get_topic_name()
        for url, topics in self.app.router.table_metadata("ip").items():
            for p in topics.get(changelog, ()):
                owners[int(p)] = str(url).rstrip("/")
        self._owners, self._owners_for = owners, generation

    def partition(self, ip: str) -> int:
        return (murmur2(ip.encode("utf-8")) & 0x7FFFFFFF) % self._partitions

    def answer_here(self, ip: str, authenticated: bool, country: str | None) -> dict[str, Any]:
        rt = self.rt
        result = precheck(rt.intel.lookup(ip), authenticated, rt.state_tables["ip"].peek(ip), rt.ctx,
                          view=rt.population, country=country, now=time.time())
        return result.to_dict()

    async def handle(self, view: Any, request: Any) -> Any:
        t0 = time.perf_counter()
        route = "local"
        try:
            if not self.authorized(request.headers.get("Authorization")):
                raise PrecheckError(401, "unauthorized", "a valid bearer token is required")
            ip, authenticated, country = parse_query(request.query)
            if self.rt.generation is None or getattr(self.app, "rebalancing", False):
                raise PrecheckError(503, "unavailable", "partitions are being assigned; retry")
            self._refresh()
            p = self.partition(ip)
            if p not in self.rt.active.get("by_ip", ()):
                if request.headers.get(HOP_HEADER):
                    raise PrecheckError(503, "unavailable", "the IP's partition moved; retry")
                route = "forwarded"
                return await self.forward(view, request, p)
            body = self.answer_here(ip, authenticated, country)
            metrics.child(metrics.PRECHECK_REQUESTS, "shown" if body["show_callback"] else "hidden").inc()
            return view.json(body)
        except PrecheckError as exc:
            metrics.child(metrics.PRECHECK_REQUESTS, exc.result).inc()
            headers = {"WWW-Authenticate": 'Bearer realm="detector-precheck"'} if exc.status == 401 else None
            return view.json({"error": str(exc)}, status=exc.status, headers=headers)
        except Exception as exc:  # a bug: the type only (the message may hold the IP)
            log.error("precheck: internal error (%s)", type(exc).__name__)
            metrics.child(metrics.PRECHECK_REQUESTS, "error").inc()
            return view.json({"error": "internal error"}, status=500)
        finally:
            metrics.child(metrics.PRECHECK_SECONDS, route).observe(time.perf_counter() - t0)

    async def forward(self, view: Any, request: Any, partition: int) -> Any:
        """Ask the worker owning ``partition`` (once); its answer is passed through as is."""
        import aiohttp

        url = self._owners.get(partition)
        if url is None:
            raise PrecheckError(503, "unavailable", "no worker owns the IP's partition yet; retry")
        headers = {"Authorization": request.headers.get("Authorization", ""), HOP_HEADER: "1"}
        try:
            async with self.app.http_client.get(
                    f"{url}{PATH}?{request.query_string}", headers=headers,
                    timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT_S)) as resp:
                body = await resp.read()
                status = resp.status
        except Exception as exc:
            log.warning("precheck: the owning worker did not answer (%s)", type(exc).__name__)
            raise PrecheckError(503, "unavailable", "the worker owning the IP's partition did not "
                                "answer; retry") from None
        metrics.child(metrics.PRECHECK_REQUESTS, "forwarded").inc()
        return view.bytes(body, content_type="application/json", status=status)


def install(app: Any, rt: Any) -> Precheck | None:
    """Add the route when ``DETECTOR_PRECHECK_TOKEN`` is set (called by ``make_app``); without a
    token there is no route at all (404, like any path the worker does not serve)."""
    token = rt.settings.precheck_token
    for result in metrics.PRECHECK_RESULTS:  # every series exists from the start, at 0
        metrics.child(metrics.PRECHECK_REQUESTS, result)
    for route in ("local", "forwarded"):
        metrics.child(metrics.PRECHECK_SECONDS, route)
    if token is None:
        return None
    handler = Precheck(app, rt, token.get_secret_value())

    @app.page(PATH)
    async def precheck_view(self: Any, request: Any) -> Any:
        return await handler.handle(self, request)

    return handler
