"""The Faust agents with ``agent.test_context()`` (no broker): every send is captured in memory.

A small harness chains the stages by hand: what ``ingest`` sends to ``by-ip`` is put into the
``ip`` agent on the partition Kafka would pick, and so on, so the tests see the whole path.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
import zlib
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from detector.config import load_settings
from detector.core import state
from detector.core.ipintel import IpIntel
from detector.core.lists import make_entry
from detector.core.pipeline import Detector
from detector.core.records import decision_from_dict
from detector.core.signing import Signer, Verifier
from detector.runtime import build_context, build_model_watcher
from detector.stream import codec
from detector.stream.app import StreamRuntime, Sweeper, make_app, sweep_tables
from detector.stream.ledger import DIRECT, SEEN_TTL_S
from detector.stream.tables import read_head, unpack_value

pytestmark = pytest.mark.asyncio

T0 = 1795341600.0  # 2026-11-22T10:00:00Z
SOC = Signer(Ed25519PrivateKey.generate())  # the SOC tool's key (workers trust its public half)
PARTITIONS = 4


def request(rid: str, ts: float, phone: str = "+442079460018", ip: str = "81.2.69.160",
            **extra: Any) -> bytes:
    return json.dumps({"request_id": rid, "ts": ts, "phone_number": phone, "ip": ip, **extra}).encode()


def partition_of(key: bytes | None) -> int:
    return zlib.crc32(key or b"") % PARTITIONS


@dataclass
class Sent:
    key: bytes | None
    value: bytes | None
    partition: int | None

    def json(self) -> Any:
        return None if self.value is None else json.loads(self.value)

    def table_value(self) -> tuple[int, dict[int, int], Any]:
        """A changelog message's (partition, watermarks, core value)."""
        assert self.value is not None
        partition, marks, pos = unpack_value(self.value)
        return partition, marks, state.unpack(self.value, pos)


def stored(h: Harness, table: str, key: str) -> tuple[int, dict[int, int], Any]:
    """A table's stored (partition, watermarks, core value) for ``key``."""
    raw = h.rt.tables[table].data[key.encode()]
    partition, marks, pos = unpack_value(raw)
    return partition, marks, state.unpack(raw, pos) if table != "seen" else json.loads(raw[pos:])


@dataclass
class Harness:
    rt: StreamRuntime
    app: Any
    sent: dict[str, list[Sent]] = field(default_factory=lambda: defaultdict(list))
    agents: dict[str, Any] = field(default_factory=dict)

    def topic(self, name: str) -> str:
        return self.rt.topics[name].get_topic_name()

    def changelog(self, table: str) -> list[Sent]:
        return self.sent[self.rt.tables[table].changelog_topic.get_topic_name()]

    async def wait(self, pred: Callable[[], bool], timeout: float = 3.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not pred():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError("timed out waiting for the agents")
            await asyncio.sleep(0.002)

    async def put(self, agent: str, key: bytes | None, value: bytes | None, partition: int,
                  timestamp: float | None = None) -> None:
        await self.agents[agent].put(value, key=key, partition=partition, timestamp=timestamp)

    async def through(self, topic: str, agent: str, since: int) -> list[Sent]:
        """Feed what was sent to ``topic`` after index ``since`` into ``agent``."""
        out = self.sent[self.topic(topic)][since:]
        for s in out:
            await self.put(agent, s.key, s.value, partition_of(s.key))
        return out

    async def decide(self, raw: bytes, timestamp: float | None = None,
                     partition: int = 0) -> dict[str, Any] | None:
        """One raw request through ingest -> ip -> range; the decision sent, if any."""
        n_ip, n_rng = len(self.sent[self.topic("by_ip")]), len(self.sent[self.topic("by_range")])
        n_dec, n_dlq = len(self.sent[self.topic("decisions")]), len(self.sent[self.topic("dlq")])
        await self.put("ingest", None, raw, partition, timestamp)
        await self.wait(lambda: len(self.sent[self.topic("by_ip")]) > n_ip
                        or len(self.sent[self.topic("dlq")]) > n_dlq)
        if len(self.sent[self.topic("dlq")]) > n_dlq:
            return None
        await self.through("by_ip", "ip", n_ip)
        await self.wait(lambda: len(self.sent[self.topic("by_range")]) > n_rng)
        await self.through("by_range", "range", n_rng)
        await self.wait(lambda: len(self.sent[self.topic("decisions")]) > n_dec)
        return self.sent[self.topic("decisions")][-1].json()

    async def outcome(self, rid: str, phone: str, outcome: str, ts: float) -> None:
        n_rng = len(self.sent[self.topic("by_range")])
        n_cl = len(self.changelog("number"))
        raw = json.dumps({"request_id": rid, "phone_number": phone, "outcome": outcome,
                          "ts": ts}).encode()
        await self.put("outcome", None, raw, 0)
        await self.wait(lambda: len(self.sent[self.topic("by_range")]) > n_rng)
        await self.through("by_range", "range", n_rng)
        await self.wait(lambda: len(self.changelog("number")) > n_cl
                        and not self.rt.batcher.lock.locked() and len(self.rt.batcher) == 0)


def make_harness(policy_ctx: Any = None, **overrides: Any) -> Harness:
    # T0 is a fixed day in the past: no past-skew check by default (tests/stream/test_input.py).
    overrides.setdefault("max_past_skew_s", 0.0)
    overrides.setdefault("fence_decisions", False)  # no broker: decisions through rt.publish
    settings = load_settings(env={}, app_id=f"t-{uuid.uuid4().hex[:8]}", partitions=PARTITIONS,
                             **overrides)
    ctx = policy_ctx or build_context(settings)
    rt = StreamRuntime(settings, ctx, IpIntel(), None)
    rt.signer = Signer(Ed25519PrivateKey.generate())  # this worker's key for learned entries
    rt.verifier = Verifier(soc=[SOC.public_key()], worker=[rt.signer.public_key()])
    app = make_app(settings, rt=rt, web=False, prometheus=False)
    app.conf.store = "memory://"
    h = Harness(rt, app)

    async def publish(channel: Any, key: bytes | None, value: bytes | None,
                      partition: int | None = None) -> Any:
        h.sent[channel.get_topic_name()].append(Sent(key, value, partition))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    rt.publish = publish
    rt.lists_ready.set()
    rt.generation = app.consumer_generation_id
    rt.gate_offsets = False  # test_context numbers offsets per agent, not per partition
    return h


@asynccontextmanager
async def running(h: Harness) -> AsyncIterator[Harness]:
    async def flusher() -> None:  # the app's flusher task (app tasks do not run in tests)
        while True:
            await asyncio.sleep(0.002)
            await h.rt.flush_batches()

    async with AsyncExitStack() as stack:
        h.app.flow_control.resume()
        for name in ("ingest", "ip", "range", "outcome"):
            agent = getattr(h.app, f"{name}_agent")
            h.agents[name] = await stack.enter_async_context(agent.test_context())
        task = asyncio.create_task(flusher())
        try:
            yield h
        finally:
            task.cancel()


async def test_valid_request_is_forwarded_keyed_by_ip_with_its_source() -> None:
    async with running(make_harness()) as h:
        await h.put("ingest", b"any", request("r1", T0, ip="::ffff:81.2.69.160"), 2, T0)
        await h.wait(lambda: bool(h.sent[h.topic("by_ip")]))
        sent = h.sent[h.topic("by_ip")][0]
        env = sent.json()
        assert sent.key == b"81.2.69.160"  # normalized by parse_request
        assert env["r"]["request_id"] == "r1" and env["src"] == [2, 0] and env["kts"] == T0


@pytest.mark.parametrize(
    ("raw", "kind", "needle"),
    [
        (b"not json", "malformed_json", "not JSON"),
        (b"\xff\xfe", "malformed_json", "UTF-8"),
        (b"[1, 2]", "malformed_json", "JSON object"),
        (json.dumps({"request_id": "x", "ts": T0, "ip": "1.2.3.4"}).encode(), "missing_field",
         "phone_number"),
        (json.dumps({"request_id": "x", "ts": T0 * 1000, "phone_number": "1", "ip": "1.2.3.4"})
         .encode(), "invalid_field", "not milliseconds"),
        (None, "invalid_input", "no value"),
    ],
)
async def test_bad_messages_are_dead_lettered_and_the_next_one_still_decided(
    raw: bytes | None, kind: str, needle: str
) -> None:
    async with running(make_harness()) as h:
        await h.put("ingest", b"k", raw, 1)
        await h.wait(lambda: bool(h.sent[h.topic("dlq")]))
        assert not h.sent[h.topic("by_ip")]
        dl = h.sent[h.topic("dlq")][0].json()
        assert dl["error_kind"] == kind and needle in dl["error"], dl
        assert dl["topic"] == h.rt.settings.topic_requests and dl["partition"] == 1
        assert base64.b64decode(dl["original_b64"]) == (raw or b"")
        d = await h.decide(request("ok", T0))
        assert d is not None and d["request_id"] == "ok"


async def test_counts_accumulate_per_ip_number_and_pair_across_partitions() -> None:
    async with running(make_harness()) as h:
        for i in range(4):
            d = await h.decide(request(f"a{i}", T0 + i), partition=i % PARTITIONS)
            assert d is not None
        c = d["counts"]
        assert (c["ip_1h"], c["number_1h"], c["pair_1h"], c["range_1h"]) == (4, 4, 4, 4)
        d = await h.decide(request("b", T0 + 10, ip="81.2.69.161"))
        assert d is not None
        c = d["counts"]
        assert (c["ip_1h"], c["number_1h"], c["pair_1h"], c["number_distinct_ips_1h"]) == (1, 5, 1, 2)


async def test_table_writes_carry_partition_and_watermark_in_one_changelog_message() -> None:
    async with running(make_harness()) as h:
        await h.decide(request("r1", T0), partition=3)
        await h.wait(lambda: bool(h.changelog("ip")))
        ip_log = h.changelog("ip")
        assert len(ip_log) == 1
        ip_partition = partition_of(b"81.2.69.160")
        assert ip_log[0].partition == ip_partition and ip_log[0].key == b"81.2.69.160"
        partition, marks, value = ip_log[0].table_value()
        assert (partition, marks) == (ip_partition, {3: 0})  # by-ip hop from requests partition 3
        assert isinstance(value, state.IpState) and value.requests.minute_counts.tolist() == [1]
        assert ip_log[0].value == h.rt.tables["ip"].data[b"81.2.69.160"]  # the same bytes
        for table in ("number", "pair", "range", "seen"):
            (msg,) = h.changelog(table)
            assert read_head(msg.value or b"")[0] == msg.partition == partition_of(b"+442079460")
            assert unpack_value(msg.value or b"")[1] == {0: 0}  # the by-range offset


async def test_redelivered_source_message_is_not_counted_twice_at_the_ip_stage() -> None:
    async with running(make_harness()) as h:
        await h.decide(request("r1", T0))
        env = h.sent[h.topic("by_ip")][0]
        n = len(h.sent[h.topic("by_range")])
        await h.put("ip", env.key, env.value, partition_of(env.key))  # the same source message
        await h.wait(lambda: len(h.sent[h.topic("by_range")]) > n)
        first, again = (s.json() for s in h.sent[h.topic("by_range")][n - 1:])
        assert again["ipc"] == first["ipc"] == [1, 1, 1, 1, 1, 1, 1, 0]
        await h.wait(lambda: len(h.rt.ip) == 0)
        assert stored(h, "ip", "81.2.69.160")[2].requests.minute_counts.tolist() == [1]
        assert len(h.changelog("ip")) == 1  # nothing written for the redelivery


async def test_request_keyed_by_ip_on_its_by_ip_partition_is_counted_without_the_hop() -> None:
    async with running(make_harness()) as h:
        h.rt.ip_partitions = PARTITIONS  # requests and by-ip co-partitioned (set at assignment)
        ip = b"81.2.69.160"
        p = h.rt.ip_partition(ip)
        await h.put("ingest", ip, request("d1", T0), p, T0)
        await h.wait(lambda: bool(h.sent[h.topic("by_range")]))
        assert not h.sent[h.topic("by_ip")]  # no hop
        await h.wait(lambda: bool(h.changelog("ip")))
        (log,) = h.changelog("ip")
        assert log.partition == p and log.table_value()[:2] == (p, {DIRECT + p: 0})
        assert h.sent[h.topic("by_range")][0].json()["ipc"][:3] == [1, 1, 1]
        h.agents["ingest"].sent_offset = 0  # test_context numbers puts: offset 0 once more
        await h.put("ingest", ip, request("d1", T0), p, T0)  # the same message redelivered ...
        await h.wait(lambda: len(h.sent[h.topic("by_range")]) == 2)
        assert h.sent[h.topic("by_range")][1].json()["ipc"][:3] == [1, 1, 1]  # ... counted once
        # The same IP on another partition or with another key takes the hop and is counted too
        # (its source has its own watermark).
        other = (p + 1) % PARTITIONS
        d = await h.decide(request("h1", T0 + 1), partition=other)
        assert d is not None and d["counts"]["ip_1h"] == 2
        assert h.sent[h.topic("by_ip")][0].json()["src"][0] == other


async def test_without_co_partitioned_requests_every_request_takes_the_by_ip_hop() -> None:
    async with running(make_harness()) as h:
        assert h.rt.ip_partitions == 0 and h.rt.ip_partition(b"81.2.69.160") == -1
        d = await h.decide(request("k1", T0), partition=0)
        assert d is not None and len(h.sent[h.topic("by_ip")]) == 1


async def test_request_seen_again_gets_the_identical_stored_decision_and_no_recount() -> None:
    async with running(make_harness()) as h:
        first = await h.decide(request("r1", T0))
        assert first is not None
        # The same request in a new by-range message (an upstream stage was redelivered) and after
        # this process forgot what it sent (as after a restart): the stored decision goes out again.
        h.rt.decisions.clear_sent()
        n = len(h.sent[h.topic("decisions")])
        env = h.sent[h.topic("by_range")][-1]
        await h.put("range", env.key, env.value, partition_of(env.key))
        await h.wait(lambda: len(h.sent[h.topic("decisions")]) > n)
        assert h.sent[h.topic("decisions")][-1].json() == first
        # ... and no second decision while this process knows the first was delivered.
        await h.put("range", env.key, env.value, partition_of(env.key))
        await asyncio.sleep(0.05)
        assert len(h.sent[h.topic("decisions")]) == n + 1
        nxt = await h.decide(request("r2", T0 + 1))
        assert nxt is not None and nxt["counts"]["pair_1h"] == 2  # r1 counted once


async def test_allowed_request_marks_pending_and_outcome_clears_it() -> None:
    async with running(make_harness()) as h:
        d1 = await h.decide(request("r1", T0))
        assert d1 is not None and d1["action"] == "allow"
        d2 = await h.decide(request("r2", T0 + 5, ip="81.2.69.170"))
        assert d2 is not None and "duplicate_pending" in d2["reasons"]
        await h.outcome("r1", "+442079460018", "completed", T0 + 60)
        d3 = await h.decide(request("r3", T0 + 70, ip="81.2.69.171"))
        assert d3 is not None and "duplicate_pending" not in d3["reasons"]


async def test_agent_marked_spam_publishes_a_learned_deny_entry_and_blocks_the_number() -> None:
    async with running(make_harness()) as h:
        d1 = await h.decide(request("r1", T0))
        assert d1 is not None and d1["action"] == "allow"
        await h.outcome("r1", "+442079460018", "agent_marked_spam", T0 + 30)
        (msg,) = h.sent[h.topic("lists")]
        entry = codec.list_entry_from_wire(msg.value or b"")
        assert msg.key == b"deny:number:+442079460018" and entry.source == "learned"
        assert entry.expires_at == T0 + 30 + h.rt.policy.spam_deny_seconds
        d2 = await h.decide(request("r2", T0 + 100, ip="81.2.69.172"))
        assert d2 is not None and d2["action"] == "block" and "denylist_number" in d2["reasons"]


async def test_bad_outcome_is_dead_lettered() -> None:
    async with running(make_harness()) as h:
        await h.put("outcome", None, b'{"request_id": "r", "phone_number": "+44", "outcome": "x"}', 0)
        await h.wait(lambda: bool(h.sent[h.topic("dlq")]))
        dl = h.sent[h.topic("dlq")][0].json()
        assert dl["error_kind"] == "invalid_field" and "outcome" in dl["error"]


async def test_signed_list_messages_and_signed_removals_update_the_index() -> None:
    h = make_harness()
    entry = make_entry("deny", "number", "+442079460018", reason="soc")
    h.rt.apply_list_message(b"deny:number:+442079460018", codec.dumps(SOC.sign(entry, signed_at=T0)))
    assert h.rt.ctx.lists.match("+442079460018", "GB", "1.2.3.4", None, None, now=T0)[0] == ["number"]
    h.rt.apply_list_message(b"deny:number:+442079460018", b"not json", "topic")  # ignored
    h.rt.apply_list_message(b"deny:number:+442079460018", None, "topic")  # a bare tombstone: refused
    assert len(h.rt.ctx.lists) == 1
    removal = SOC.sign(entry, signed_at=T0 + 1, op="remove")
    h.rt.apply_list_message(b"deny:number:+442079460018", codec.dumps(removal))
    assert len(h.rt.ctx.lists) == 0


async def test_sweep_deletes_dead_keys_with_tombstones_in_their_own_partition() -> None:
    async with running(make_harness()) as h:
        await h.decide(request("r1", T0), partition=1)
        h.rt.active = {"by_ip": set(range(PARTITIONS)), "by_range": set(range(PARTITIONS))}
        assert sweep_tables(h.rt, T0 + 600) == []  # nothing is dead yet
        writes = sweep_tables(h.rt, T0 + 3 * 86400)
        assert {(w.table.name, w.key, w.value) for w in writes} == {
            ("ip", b"81.2.69.160", None), ("number", b"+442079460018", None),
            ("pair", b"81.2.69.160|+442079460018", None), ("range", b"+442079460", None),
            ("seen", b"r1", None),
        }
        assert {w.partition for w in writes if w.table.name != "ip"} == {partition_of(b"+442079460")}
        assert all(len(t.data) == 0 for t in h.rt.tables.values())


async def test_a_late_copy_of_a_request_sent_and_swept_is_neither_counted_nor_decided() -> None:
    """A worker catching up on a backlog moves its event-time clock an hour in seconds, while
    copies of requests re-sent by upstream stages after a crash are still on their way. A copy
    that arrives after the sweep dropped its request's stored decision is known by its sent id
    (kept SENT_LOOKBACK_S of wall clock): not counted again, not decided, not sent."""
    async with running(make_harness()) as h:
        first = await h.decide(request("r1", T0))
        assert first is not None
        h.rt.active = {"by_ip": set(range(PARTITIONS)), "by_range": set(range(PARTITIONS))}
        n = len(h.sent[h.topic("decisions")])
        after_ttl = T0 + SEEN_TTL_S + 1  # the number's and the pair's windows are still live
        assert {(w.table.name, w.key) for w in sweep_tables(h.rt, after_ttl)} == {("seen", b"r1")}
        env = h.sent[h.topic("by_range")][-1]  # r1 again in a new by-range message
        await h.put("range", env.key, env.value, partition_of(env.key))
        await asyncio.sleep(0.1)
        assert len(h.sent[h.topic("decisions")]) == n  # already on the topic: not sent again
        nxt = await h.decide(request("r2", T0 + SEEN_TTL_S + 2))
        assert nxt is not None and nxt["counts"]["pair_24h"] == 2  # r1 counted once


async def test_sweeper_works_through_the_tables_a_slice_per_tick() -> None:
    async with running(make_harness()) as h:
        for i in range(3):
            await h.decide(request(f"r{i}", T0 + i, phone=f"+4420794600{10 + i}", ip=f"81.2.69.{i}"))
        h.rt.active = {"by_ip": set(range(PARTITIONS)), "by_range": set(range(PARTITIONS))}
        sweeper = Sweeper(h.rt, slice_size=2)
        deleted = []
        for _ in range(20):
            deleted += sweeper.tick(T0 + 3 * 86400)
        assert len(deleted) == 3 + 3 + 3 + 1 + 3  # ip, number, pair, range, seen
        assert all(len(t.data) == 0 for t in h.rt.tables.values())


def _labelled_mix() -> list[bytes]:
    rows = []
    numbers = ["+442079460018", "+442079460019", "+33142685300", "+2529055512", "+447700900123"]
    ips = ["81.2.69.160", "81.2.69.161", "10.0.0.1", "203.0.113.9"]
    for i in range(80):
        rows.append(request(f"m{i}", T0 + i * 7.0, numbers[(i * 7) % 5], ips[(i * 3) % 4],
                            authenticated=i % 5 == 0))
    return rows


async def test_stream_decisions_equal_the_replay_path() -> None:
    settings = load_settings(env={})
    replay = Detector(ctx=build_context(settings))
    expected = [replay.process(codec.request_from_wire(json.loads(r))).to_dict() for r in _labelled_mix()]
    async with running(make_harness(build_context(settings))) as h:
        got = [await h.decide(r) for r in _labelled_mix()]
    assert len(got) == len(expected) == 80
    for g, e in zip(got, expected, strict=True):
        assert g is not None
        assert decision_from_dict({**g, "decided_at": 0.0}) == decision_from_dict({**e, "decided_at": 0.0})
    assert {d["action"] for d in expected} >= {"allow", "block"}


async def test_a_batch_decided_in_one_model_call_equals_the_replay_path() -> None:
    """The range stage counts a burst of requests, then decides them together (one model call);
    requests on the same number as an undecided one force the decision first. The result must
    be the replay path's, request by request, with the shipped model scoring."""
    models = Path(__file__).resolve().parents[2] / "models"
    settings = load_settings(env={"DETECTOR_MODELS_DIR": str(models)})

    def ctx_with_model() -> Any:
        ctx = build_context(settings)
        watcher = build_model_watcher(settings)
        assert watcher is not None and watcher.current() is not None
        ctx.model = watcher.current()
        return ctx

    replay = Detector(ctx=ctx_with_model())
    rows = _labelled_mix()
    expected = [replay.process(codec.request_from_wire(json.loads(r))).to_dict() for r in rows]
    async with running(make_harness(ctx_with_model())) as h:
        for i, raw in enumerate(rows):  # ingest and ip stages, one by one
            n_ip, n_rng = len(h.sent[h.topic("by_ip")]), len(h.sent[h.topic("by_range")])
            await h.put("ingest", None, raw, i % PARTITIONS, T0)
            await h.wait(lambda: len(h.sent[h.topic("by_ip")]) > n_ip)  # noqa: B023
            await h.through("by_ip", "ip", n_ip)
            await h.wait(lambda: len(h.sent[h.topic("by_range")]) > n_rng)  # noqa: B023
        batcher, offsets = h.rt.batcher, defaultdict(int)
        largest = 0
        for env in h.sent[h.topic("by_range")]:  # the range stage's burst: no await in between
            p = partition_of(env.key)
            batcher.add(env.value, p, offsets[p], lambda: None)
            offsets[p] += 1
            largest = max(largest, len(batcher.undecided))
        await batcher.flush()
        got = [s.json() for s in h.sent[h.topic("decisions")]]
    assert largest >= 3  # the mix has 5 numbers: bursts of different numbers were batched
    assert len(got) == len(expected) == 80
    by_id = {g["request_id"]: g for g in got}
    for e in expected:
        g = by_id[e["request_id"]]
        assert g["model"]["anomaly"] == e["model"]["anomaly"]
        assert decision_from_dict({**g, "decided_at": 0.0}) == decision_from_dict({**e, "decided_at": 0.0})


async def test_a_batch_that_fails_to_decide_is_decided_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from detector.stream import range_stage as app_module

    real = app_module.decide_many

    def fails_in_batches(items: Any, *args: Any, **kwargs: Any) -> Any:
        if len(items) > 1:
            raise RuntimeError("a bug that only shows in batches")
        return real(items, *args, **kwargs)

    monkeypatch.setattr(app_module, "decide_many", fails_in_batches)
    async with running(make_harness()) as h:
        phones = ["+442079460018", "+33142685300", "+447700900123"]
        for i, phone in enumerate(phones):
            n_ip = len(h.sent[h.topic("by_ip")])
            await h.put("ingest", None, request(f"f{i}", T0 + i, phone=phone), 0, T0)
            await h.wait(lambda: len(h.sent[h.topic("by_ip")]) > n_ip)  # noqa: B023
            await h.through("by_ip", "ip", n_ip)
        await h.wait(lambda: len(h.sent[h.topic("by_range")]) == 3)
        for k, env in enumerate(h.sent[h.topic("by_range")]):  # one burst, no flush in between
            h.rt.batcher.add(env.value, partition_of(env.key), k, lambda: None)
        assert len(h.rt.batcher.undecided) == 3
        await h.rt.batcher.flush()
        got = sorted(s.json()["request_id"] for s in h.sent[h.topic("decisions")])
    assert got == ["f0", "f1", "f2"]


async def test_fast_decision_encoding_equals_to_dict() -> None:
    settings = load_settings(env={})
    replay = Detector(ctx=build_context(settings))
    for raw in _labelled_mix()[:20]:
        d = replay.process(codec.request_from_wire(json.loads(raw)))
        assert codec.decision_to_wire(d) == d.to_dict()
        assert json.loads(codec.dumps(codec.decision_to_wire(d))) == json.loads(json.dumps(d.to_dict()))


async def test_stored_decision_bytes_are_the_decision_sent() -> None:
    async with running(make_harness()) as h:
        await h.decide(request("r1", T0))
        (msg,) = h.changelog("seen")
        assert msg.value == h.rt.tables["seen"].data[b"r1"]
        partition, marks, pos = unpack_value(msg.value or b"")
        assert (msg.value or b"")[pos:] == h.sent[h.topic("decisions")][0].value
        assert read_head(msg.value or b"")[1] == T0 + 3600  # expires with the seen TTL


async def test_invalid_list_entry_is_ignored_without_logging_its_value(caplog: pytest.LogCaptureFixture) -> None:
    h = make_harness()
    bad = SOC.sign(make_entry("deny", "ip", "203.0.113.99"), signed_at=T0)
    bad["value"] = "203.0.113.999"
    with caplog.at_level("WARNING", logger="detector.stream"):
        h.rt.apply_list_message(b"deny:ip:203.0.113.999", json.dumps(bad).encode(), "topic")
    assert len(h.rt.ctx.lists) == 0
    assert "deny:ip" in caplog.text and "malformed" in caplog.text
    assert "203.0.113" not in caplog.text


# --- internal errors: dead-lettered, counted, never logged with the input; the worker goes on

SECRET_PHONE, SECRET_IP = "+447700900777", "81.2.69.177"


def internal_errors(stage: str) -> float:
    from detector import metrics

    return float(metrics.INTERNAL_ERRORS.labels(stage)._value.get())


async def through_to_range(h: Harness, raw: bytes) -> None:
    """One request through ingest and the by-ip hop; what reaches by-range is put in the range agent."""
    n_ip, n_rng = len(h.sent[h.topic("by_ip")]), len(h.sent[h.topic("by_range")])
    await h.put("ingest", None, raw, 0, T0)
    await h.wait(lambda: len(h.sent[h.topic("by_ip")]) > n_ip)
    await h.through("by_ip", "ip", n_ip)
    await h.wait(lambda: len(h.sent[h.topic("by_range")]) > n_rng
                 or bool(h.sent[h.topic("dlq")]))
    await h.through("by_range", "range", n_rng)


def assert_internal_dead_letter(h: Harness, dl: dict[str, Any], stage: str, topic: str, rid: str,
                                caplog: pytest.LogCaptureFixture) -> None:
    assert dl["error_kind"] == "internal_error"
    assert dl["error"].startswith(f"{stage} stage: RuntimeError at "), dl["error"]
    assert dl["topic"] == topic
    original = json.loads(base64.b64decode(dl["original_b64"]))
    assert original["request_id"] == rid  # the request itself, for whoever replays it
    for text in [dl["error"], caplog.text]:  # neither the input nor the exception's message
        assert SECRET_PHONE not in text and SECRET_IP not in text and "boom" not in text
    assert f"{stage}: internal error processing {topic}" in caplog.text


async def test_an_exception_in_the_range_stage_dead_letters_the_request_and_the_next_is_decided(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from detector.stream import range_stage as app_module

    real = app_module.range_one

    def failing(rt: Any, env: dict[str, Any], **kwargs: Any) -> Any:
        if env.get("r", {}).get("request_id") == "bad":
            raise RuntimeError(f"boom {SECRET_PHONE} {SECRET_IP}")
        return real(rt, env, **kwargs)

    monkeypatch.setattr(app_module, "range_one", failing)
    before = internal_errors("range")
    async with running(make_harness()) as h:
        await through_to_range(h, request("bad", T0, phone=SECRET_PHONE, ip=SECRET_IP))
        await h.wait(lambda: bool(h.sent[h.topic("dlq")]))
        assert not h.sent[h.topic("decisions")]
        dl = h.sent[h.topic("dlq")][0]
        assert dl.key == b"bad"
        assert_internal_dead_letter(h, dl.json(), "range", h.topic("by_range"), "bad", caplog)
        d = await h.decide(request("good", T0 + 1, phone=SECRET_PHONE, ip=SECRET_IP))
        assert d is not None and d["request_id"] == "good"
    assert internal_errors("range") == before + 1


async def test_a_request_that_fails_alone_after_its_batch_failed_is_dead_lettered(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from detector.stream import range_stage as app_module

    real = app_module.decide_many

    def fails(items: Any, *args: Any, **kwargs: Any) -> Any:
        if any(req.request_id == "bad" for req, _, _ in items):
            raise RuntimeError(f"boom {SECRET_PHONE}")
        return real(items, *args, **kwargs)

    monkeypatch.setattr(app_module, "decide_many", fails)
    async with running(make_harness()) as h:
        for rid, phone in (("a", "+442079460018"), ("bad", SECRET_PHONE), ("c", "+33142685300")):
            n_ip = len(h.sent[h.topic("by_ip")])
            await h.put("ingest", None, request(rid, T0, phone=phone, ip=SECRET_IP), 0, T0)
            await h.wait(lambda: len(h.sent[h.topic("by_ip")]) > n_ip)  # noqa: B023
            await h.through("by_ip", "ip", n_ip)
        await h.wait(lambda: len(h.sent[h.topic("by_range")]) == 3)
        for k, env in enumerate(h.sent[h.topic("by_range")]):  # one batch
            h.rt.batcher.add(env.value, partition_of(env.key), k, lambda: None)
        await h.rt.batcher.flush()
        got = sorted(s.json()["request_id"] for s in h.sent[h.topic("decisions")])
        (dl,) = [s.json() for s in h.sent[h.topic("dlq")]]
    assert got == ["a", "c"]  # its batch neighbours are decided
    assert_internal_dead_letter(h, dl, "range", h.topic("by_range"), "bad", caplog)


async def test_an_exception_in_the_ip_stage_dead_letters_the_request(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from detector.stream.ip_stage import IpStage

    real = IpStage.count

    async def failing(self: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
        if req.request_id == "bad":
            raise RuntimeError(f"boom {SECRET_PHONE}")
        return await real(self, req, *args, **kwargs)

    monkeypatch.setattr(IpStage, "count", failing)
    before = internal_errors("ip")
    async with running(make_harness()) as h:
        n_ip = len(h.sent[h.topic("by_ip")])
        await h.put("ingest", None, request("bad", T0, phone=SECRET_PHONE, ip=SECRET_IP), 0, T0)
        await h.wait(lambda: len(h.sent[h.topic("by_ip")]) > n_ip)
        await h.through("by_ip", "ip", n_ip)
        await h.wait(lambda: bool(h.sent[h.topic("dlq")]))
        assert not h.sent[h.topic("by_range")]
        dl = h.sent[h.topic("dlq")][0]
        assert_internal_dead_letter(h, dl.json(), "ip", h.topic("by_ip"), "bad", caplog)
        d = await h.decide(request("good", T0 + 1))
        assert d is not None and d["request_id"] == "good"
    assert internal_errors("ip") == before + 1


async def test_health_reports_a_stalled_stage_and_an_unreachable_broker() -> None:
    from detector.stream.app import health

    h = make_harness()
    assert health(h.app, h.rt)["status"] == "ok"
    h.rt.watch.stalled = {"range": "range stage: no progress for 31 s with 4 events waiting"}
    h.rt.probe.reachable = False
    body = health(h.app, h.rt)
    assert body["status"] == "unhealthy"
    assert body["problems"][0].startswith("kafka broker unreachable")
    assert body["problems"][1].startswith("range stage: no progress")


async def test_a_request_counted_but_not_decided_before_a_crash_is_not_counted_twice() -> None:
    """A crash or freeze between the changelog writes of one batch can leave a request's counts
    stored but not its decision: processing it again gives the same counts, not one more."""
    from detector.stream.range_stage import decide_pending, range_one

    async with running(make_harness()) as h:
        for i in range(3):
            first = await h.decide(request(f"c{i}", T0 + i))
        assert first is not None
        env = h.sent[h.topic("by_range")][-1]
        seen = unpack_value(h.rt.tables["seen"].data.pop(b"c2"))  # its decision was not stored
        h.rt.decisions.clear_sent()  # ... so not sent either (a send waits for the stored copy)
        undecided: list[Any] = []
        result = range_one(h.rt, env.json(), partition=seen[0], offset=seen[1][0],
                           undecided=undecided)
        decide_pending(h.rt, undecided)
    assert result.decision is not None
    assert result.decision["counts"] == first["counts"]
    assert first["counts"]["pair_24h"] == first["counts"]["number_24h"] == 3


async def test_a_batch_leaves_the_events_of_partitions_it_no_longer_owns_to_their_new_owner() -> None:
    """After a rebalance the rest of a batch completes only for partitions still owned: the
    others' events are neither decided on the wire, nor written to a changelog, nor acked (their
    new owner processes them; with fencing it could not commit them anyway)."""
    from detector.stream.delivery import DirectDecisions

    class Partly(DirectDecisions):
        def owns(self, partition: int) -> bool:
            return partition != 1

    async with running(make_harness()) as h:
        msgs = []
        for rid, phone in (("kept", "+442079460018"), ("moved", "+442079460555")):
            n_ip, n = len(h.sent[h.topic("by_ip")]), len(h.sent[h.topic("by_range")])
            await h.put("ingest", None, request(rid, T0, phone=phone), 0)
            await h.wait(lambda n_ip=n_ip: len(h.sent[h.topic("by_ip")]) > n_ip)
            await h.through("by_ip", "ip", n_ip)
            await h.wait(lambda n=n: len(h.sent[h.topic("by_range")]) > n)
            msgs.append(h.sent[h.topic("by_range")][-1])
        h.rt.decisions_out = Partly(lambda k, v: h.rt.send("decisions", k, v))
        n_dec, n_seen = len(h.sent[h.topic("decisions")]), len(h.changelog("seen"))
        acked: list[str] = []
        batcher = h.rt.batcher
        async with batcher.lock:  # keep the harness's flusher out until both are in the batch
            batcher.add(msgs[0].value, 0, 10, lambda: acked.append("kept"))
            batcher.add(msgs[1].value, 1, 10, lambda: acked.append("moved"))
        await batcher.flush()
        await h.wait(lambda: len(batcher) == 0 and not batcher.lock.locked())
        assert [s.json()["request_id"] for s in h.sent[h.topic("decisions")][n_dec:]] == ["kept"]
        assert [s.key for s in h.changelog("seen")[n_seen:]] == [b"kept"]  # raw keys (tables.py)
        assert acked == ["kept"]
