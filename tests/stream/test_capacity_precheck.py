"""The stream adapters of agent capacity and the pre-check, without a broker: the web surface's
allow-list, the pre-check view (token, parameters, owner routing, forwarding), and the
queue-state reader's verification and metrics."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from aiokafka.partitioner import murmur2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from multidict import MultiDict

from detector import metrics
from detector.config import load_settings
from detector.core import state
from detector.core.capacity import QueueState, QueueStateSigner, QueueStateVerifier
from detector.core.ipintel import IpIntel
from detector.core.lists import make_entry
from detector.core.windows import Window
from detector.runtime import build_context
from detector.stream import capacity, precheck
from detector.stream.app import StreamRuntime, make_app
from detector.stream.tables import pack_value
from detector.stream.web_surface import SERVED_PATHS, UnlistedRoute

TOKEN = "t" * 40
T = 1795341600.0


def build(token: str | None = TOKEN, **env: str) -> tuple[Any, StreamRuntime]:
    e = {"DETECTOR_PARTITIONS": "4", **env}
    if token is not None:
        e["DETECTOR_PRECHECK_TOKEN"] = token
    s = load_settings(env=e, app_id=f"t-{uuid.uuid4().hex[:6]}")
    rt = StreamRuntime(s, build_context(s), IpIntel(), None)
    app = make_app(s, rt=rt, web=True, prometheus=False)
    return app, rt


def counter(metric: Any, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get()) if labels else float(metric._value.get())


# --------------------------------------------------------------------------- the web surface


def test_the_worker_serves_only_the_allow_listed_paths() -> None:
    app, _ = build()
    assert set(app.web.views) == {"/healthz", "/v1/precheck"}  # /metrics comes with prometheus
    assert SERVED_PATHS == {"/metrics", "/healthz", "/v1/precheck"}
    with pytest.raises(UnlistedRoute, match="refusing '/table/ip'"):
        @app.page("/table/ip")
        async def leak(self: Any, request: Any) -> Any:  # pragma: no cover - never registered
            return None
    app, _ = build(token=None)
    assert "/v1/precheck" not in app.web.views  # no token: no route (404)


# --------------------------------------------------------------------------- the pre-check view


class View:
    def json(self, value: Any, *, status: int = 200, headers: Any = None) -> tuple[int, Any, Any]:
        return status, value, headers

    def bytes(self, value: bytes, *, content_type: str, status: int) -> tuple[int, Any, Any]:
        return status, json.loads(value), content_type


class Request:
    def __init__(self, query: str, token: str | None = TOKEN, hop: bool = False) -> None:
        pairs = [tuple(p.split("=", 1)) for p in query.split("&") if p]
        self.query = MultiDict(pairs)
        self.query_string = query
        self.headers: dict[str, str] = {}
        if token is not None:
            self.headers["Authorization"] = f"Bearer {token}"
        if hop:
            self.headers[precheck.HOP_HEADER] = "1"


class Consumer:
    def topic_partitions(self, topic: str) -> int:
        return 4


class Router:
    def __init__(self, changelog: str) -> None:
        self.changelog = changelog

    def table_metadata(self, name: str) -> dict[str, Any]:
        assert name == "ip"
        return {"http://127.0.0.1:1111": {self.changelog: [0, 1]},
                "http://127.0.0.1:2222/": {self.changelog: [2, 3]}}


class Response:
    status = 200

    async def read(self) -> bytes:
        return b'{"show_callback": false, "reasons": ["velocity_ip"]}'

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        return None


class HttpClient:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []

    def get(self, url: str, *, headers: dict[str, str], timeout: Any) -> Response:
        self.calls.append((url, headers))
        return Response()


class FakeApp:
    def __init__(self, rt: StreamRuntime) -> None:
        self.consumer = Consumer()
        self.router = Router(rt.tables["ip"].changelog_topic.get_topic_name())
        self.http_client = HttpClient()
        self.rebalancing = False


def ip_on(partitions: set[int]) -> str:
    for i in range(1, 250):
        ip = f"86.12.{i}.9"
        if (murmur2(ip.encode()) & 0x7FFFFFFF) % 4 in partitions:
            return ip
    raise AssertionError


@pytest.fixture
def view() -> tuple[precheck.Precheck, StreamRuntime, FakeApp]:
    _, rt = build()
    rt.generation = 1
    rt.active = {"by_ip": {0, 1}}
    fake = FakeApp(rt)
    return precheck.Precheck(fake, rt, TOKEN), rt, fake


@pytest.mark.asyncio
async def test_a_local_ip_is_answered_here_from_the_ip_table(view: Any) -> None:
    handler, rt, fake = view
    ip = ip_on({0, 1})
    status, body, _ = await handler.handle(View(), Request(f"ip={ip}"))
    assert (status, body) == (200, {"show_callback": True, "reasons": []})
    rt.ctx.lists.add(make_entry("deny", "ip", ip, reason="t"))
    before = counter(metrics.PRECHECK_REQUESTS, "hidden")
    status, body, _ = await handler.handle(View(), Request(f"ip={ip}&authenticated=1"))
    assert (status, body) == (200, {"show_callback": False, "reasons": ["denylist_ip"]})
    assert counter(metrics.PRECHECK_REQUESTS, "hidden") == before + 1
    assert not fake.http_client.calls


@pytest.mark.asyncio
async def test_an_ip_owned_elsewhere_is_forwarded_once_with_the_token(view: Any) -> None:
    handler, _, fake = view
    ip = ip_on({2, 3})
    status, body, _ = await handler.handle(View(), Request(f"ip={ip}&country=gb"))
    assert (status, body) == (200, {"show_callback": False, "reasons": ["velocity_ip"]})
    ((url, headers),) = fake.http_client.calls
    assert url == f"http://127.0.0.1:2222/v1/precheck?ip={ip}&country=gb"
    assert headers == {"Authorization": f"Bearer {TOKEN}", precheck.HOP_HEADER: "1"}
    # a forwarded request that lands on a worker that does not own the partition: 503, no loop
    status, body, _ = await handler.handle(View(), Request(f"ip={ip}", hop=True))
    assert status == 503 and "moved" in body["error"] and len(fake.http_client.calls) == 1


@pytest.mark.asyncio
async def test_token_parameters_and_rebalances(view: Any) -> None:
    handler, rt, fake = view
    ip = ip_on({0})
    for token in (None, "wrong", TOKEN[:-1], TOKEN + "x"):
        status, body, headers = await handler.handle(View(), Request(f"ip={ip}", token=token))
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    for query, param in (("", "'ip'"), ("ip=999.1.1.1", "'ip'"), (f"ip={ip}&ip={ip}", "'ip'"),
                         (f"ip={ip}&authenticated=maybe", "'authenticated'"),
                         (f"ip={ip}&country=GBR", "'country'")):
        status, body, _ = await handler.handle(View(), Request(query))
        assert status == 400 and param in body["error"], query
        assert "999.1.1.1" not in body["error"]
    status, body, _ = await handler.handle(View(), Request(f"ip=::ffff:{ip}"))
    assert status == 200  # IPv4-mapped IPv6: the same IP, the same partition
    fake.rebalancing = True
    status, body, _ = await handler.handle(View(), Request(f"ip={ip}"))
    assert status == 503
    fake.rebalancing, rt.generation = False, None
    assert (await handler.handle(View(), Request(f"ip={ip}")))[0] == 503


@pytest.mark.asyncio
async def test_the_ip_never_reaches_the_log(view: Any, caplog: pytest.LogCaptureFixture) -> None:
    handler, rt, _ = view
    ip = ip_on({0})
    # A bug in the state (a value of another table under an IP): internal error.
    rt.tables["ip"].data[ip.encode()] = pack_value(0, 2**31, {}, state.pack(Window()))
    status, body, _ = await handler.handle(View(), Request(f"ip={ip}"))
    assert status == 500 and body == {"error": "internal error"}
    assert ip not in caplog.text and "precheck: internal error" in caplog.text


# --------------------------------------------------------------------------- the queue-state reader


def test_queue_states_are_verified_applied_and_refusals_counted() -> None:
    key = Ed25519PrivateKey.generate()
    _, rt = build(token=None)
    stream = rt.capacity
    stream.verifier = QueueStateVerifier([key.public_key()])
    assert rt.ctx.capacity is stream.gate
    wire = QueueStateSigner(key).sign(QueueState("lon-1", T, 30, 5, 240.0))
    assert stream.apply_message(rt, b"lon-1", json.dumps(wire).encode(), now=T)
    assert counter(metrics.CAPACITY_TIER) == 3 and counter(metrics.CAPACITY_PRESSURE) == 4.8
    assert counter(metrics.CAPACITY_STALE) == 0 and counter(metrics.CAPACITY_DIALERS) == 1
    before = {r: counter(metrics.QUEUE_STATE_REJECTED, r) for r in ("unsigned", "bad_signature")}
    unsigned = QueueState("lon-1", T + 5, 0, 5, 240.0).to_dict()
    assert not stream.apply_message(rt, b"lon-1", json.dumps(unsigned).encode(), now=T + 5)
    forged = {**QueueStateSigner(key).sign(QueueState("lon-1", T + 6, 30, 5, 240.0)),
              "callbacks_waiting": 0}
    assert not stream.apply_message(rt, b"lon-1", json.dumps(forged).encode(), now=T + 6)
    assert counter(metrics.QUEUE_STATE_REJECTED, "unsigned") == before["unsigned"] + 1
    assert counter(metrics.QUEUE_STATE_REJECTED, "bad_signature") == before["bad_signature"] + 1
    assert stream.gate.level(T + 6, rt.policy.capacity).tier == 3  # neither was applied
    capacity.update_gauges(rt, T + 120)
    assert counter(metrics.CAPACITY_STALE) == 1 and counter(metrics.CAPACITY_TIER) == 0


def test_the_queue_state_topic_is_declared_with_retention() -> None:
    _, rt = build(token=None, DETECTOR_RETENTION_INTERNAL="2d")
    topic = rt.topics["queue_state"]
    assert topic.get_topic_name() == f"{rt.settings.app_id}-queue-state"
    assert topic.config["retention.ms"] == str(2 * 86400 * 1000) and topic.partitions == 1
    from detector.stream import io

    assert io.topic_specs(rt.settings)[f"{rt.settings.app_id}-queue-state"][0] == 1
    s = load_settings(env={"DETECTOR_TOPIC_QUEUE_STATE": "dialer-queue"})
    assert capacity.queue_state_topic(s) == "dialer-queue"


def test_decisions_deflected_for_capacity_are_counted_by_mode() -> None:
    enforce, monitor = (counter(metrics.CAPACITY_DEFLECTIONS, m) for m in ("enforce", "monitor"))
    base = {"action": "deflect", "silent": False, "risk": 0.0, "enrichment": {}, "model": None}
    metrics.observe_decision({**base, "reasons": ["agent_capacity"], "monitored_reasons": []})
    metrics.observe_decision({**base, "action": "allow", "reasons": [],
                              "monitored_reasons": ["agent_capacity"]})
    metrics.observe_decision({**base, "reasons": ["anonymous_ip"], "monitored_reasons": []})
    assert counter(metrics.CAPACITY_DEFLECTIONS, "enforce") == enforce + 1
    assert counter(metrics.CAPACITY_DEFLECTIONS, "monitor") == monitor + 1
