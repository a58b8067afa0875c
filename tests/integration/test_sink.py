"""`detector sink` end to end: decisions and outcomes from a real Kafka broker into a real
PostgreSQL (Debian's binaries, temp dir, free port) and into SQLite; idempotent under
redelivery, no raw IP or number stored, bad messages dead-lettered, purge, explain on the log."""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import replace
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from kafka_broker import create_topics

from detector.config import load_settings
from detector.core.decide import DecisionContext
from detector.core.pipeline import Detector
from detector.core.policy import load_policy
from detector.sim import SimConfig, simulate
from detector.sink.consumer import purge, run_sink
from detector.sink.rows import normalize_number, number_hash
from detector.sink.store import open_store

pytestmark = pytest.mark.integration
KEY = "sink-test-key"


def _decisions(n_legit: int = 2000):
    from detector.core.parse import parse_request

    items = simulate(SimConfig(seed=11, legit_per_day=n_legit, duration_s=6 * 3600, attack_scale=0.3))
    reqs = sorted((parse_request(it.request) for it in items), key=lambda r: r.ts)
    det = Detector(DecisionContext(load_policy(), pii_key=KEY.encode()))
    return reqs, [d.to_dict() for d in det.process_many(reqs)]


async def _produce(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None:
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await p.start()
    try:
        for k, v in messages:
            await p.send(topic, v, key=k)
        await p.flush()
    finally:
        await p.stop()


async def _sink_until(settings, done, timeout: float = 90.0):
    stop = asyncio.Event()
    task = asyncio.create_task(run_sink(settings, stop=stop))
    t0 = time.monotonic()
    try:
        while not done():
            if task.done():
                return await task
            if time.monotonic() - t0 > timeout:
                raise AssertionError("sink did not store everything in time")
            await asyncio.sleep(0.2)
        took = time.monotonic() - t0
    finally:
        stop.set()
    stats = await asyncio.wait_for(task, 30)
    return stats, took


async def _read_dlq(bootstrap: str, topic: str, n: int):
    c = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    await c.start()
    out = []
    try:
        t0 = time.monotonic()
        while len(out) < n and time.monotonic() - t0 < 30:
            for recs in (await c.getmany(timeout_ms=500)).values():
                out.extend(json.loads(r.value) for r in recs)
    finally:
        await c.stop()
    return out


@pytest.fixture(params=["sqlite", "postgresql"])
def sink_db(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'decisions.sqlite'}"
    return request.getfixturevalue("postgres_url")


def test_sink_kafka_to_database(kafka_bootstrap, fresh_topic_prefix, sink_db, tmp_path, capsys):
    s = replace(load_settings(env={}), kafka_bootstrap=kafka_bootstrap, sink_db=sink_db, pii_hash_key=KEY,
                topic_decisions=f"{fresh_topic_prefix}-decisions", topic_outcomes=f"{fresh_topic_prefix}-outcomes",
                topic_dead_letter=f"{fresh_topic_prefix}-dlq", app_id=fresh_topic_prefix, sink_batch=500)
    create_topics(kafka_bootstrap, {s.topic_decisions: 4, s.topic_outcomes: 4, s.topic_dead_letter: 4})
    reqs, decisions = _decisions()
    allowed = [d for d in decisions if d["action"] == "allow"]
    # A decision near its spend budget names the breaker (JSON column); far from it, null.
    allowed[7]["budget"] = {"scope": "+447", "kind": "prefix", "spend_1h": 61.5, "limit_1h": 100.0,
                            "spend_24h": 80.25, "limit_24h": 600.0, "open": False, "source": "default"}
    outcomes = [{"request_id": d["request_id"], "phone_number": d["enrichment"]["e164"],
                 "outcome": "completed", "ts": d["request_ts"] + 120, "duration_s": 95.0} for d in allowed[:50]]
    msgs = [(d["request_id"].encode(), json.dumps(d).encode()) for d in decisions]
    bad = [(b"x", b"{not json"), (b"y", json.dumps({"request_id": "r-bad", "action": "maybe"}).encode())]
    asyncio.run(_produce(kafka_bootstrap, s.topic_decisions, msgs + bad))
    asyncio.run(_produce(kafka_bootstrap, s.topic_outcomes, [(o["request_id"].encode(), json.dumps(o).encode())
                                                             for o in outcomes]))
    store = open_store(sink_db)
    try:
        def complete() -> bool:
            return store.count() == len(decisions) and store.count("outcomes") == len(outcomes)

        stats, took = asyncio.run(_sink_until(s, complete))
        rate = len(decisions) / took
        with capsys.disabled():
            print(f"\nsink {sink_db.split(':')[0]}: {len(decisions)} decisions via Kafka in {took:.2f} s "
                  f"({rate:,.0f} rows/s end to end)")
        assert stats.dead_letters == 2
        dlq = asyncio.run(_read_dlq(kafka_bootstrap, s.topic_dead_letter, 2))
        assert sorted(d["error_kind"] for d in dlq) == ["malformed_json", "missing_field"]

        # Redelivery: the same decisions again (another consumer group reads from the start).
        asyncio.run(_produce(kafka_bootstrap, s.topic_decisions, msgs[:300]))
        n_reasons = store.count("decision_reasons")
        again = replace(s, app_id=fresh_topic_prefix + "-again")
        asyncio.run(_sink_once(again, store, len(decisions)))
        assert store.count() == len(decisions)
        assert store.count("decision_reasons") == n_reasons
        assert n_reasons >= sum(len(d["reasons"]) for d in decisions)

        # Rows: masked, hashed, indexed look-ups; no raw IP or number anywhere.
        d0 = next(d for d in decisions if d["action"] != "allow" and d["enrichment"]["e164"])
        row = store.get(d0["request_id"])
        assert row is not None and row["action"] == d0["action"] and row["reasons"] == ",".join(d0["reasons"])
        assert row["number_e164"] is None and "•" in row["number_masked"]
        assert row["number_hash"] == number_hash(normalize_number(d0["enrichment"]["e164"]), KEY.encode())
        dump = json.dumps([store.get(d["request_id"]) for d in decisions[:500]], default=str)
        for req in reqs[:500]:
            assert req.ip not in dump
        assert not any(d["enrichment"]["e164"] in dump for d in decisions[:500] if d["enrichment"]["e164"])
        assert store.by_number_hash(row["number_hash"])[0]["number_hash"] == row["number_hash"]
        assert {r["request_id"] for r in store.by_reason(d0["reasons"][0], 10_000)} >= {d0["request_id"]}
        o = store.get(outcomes[0]["request_id"])
        assert o["outcome"] == "completed" and o["outcome_duration_s"] == 95.0

        # Cost at risk (migration 0002): the money columns round-trip and add up in SQL.
        priced = allowed[7]
        assert priced["cost_per_min"] is not None
        prow = store.get(priced["request_id"])
        assert (prow["cost_per_min"], prow["currency"], prow["budget"]) == (
            priced["cost_per_min"], "EUR", priced["budget"])
        assert prow["expected_cost"] == pytest.approx(priced["expected_cost"])
        money = {r["action"]: r["money"] for r in store._rows(
            "SELECT action, sum(expected_cost) AS money FROM decision_log GROUP BY action")}
        for action in ("allow", "block"):
            assert money[action] == pytest.approx(sum(d["expected_cost"] for d in decisions
                                                      if d["action"] == action)), action
        assert money["block"] > money["allow"] > 0  # the simulated day's attacks cost more

        if sink_db.startswith("postgresql"):  # the Grafana table panel's SQL on the real database
            from tests.unit.test_observability_files import sql_panels

            for where, sql in sql_panels():
                sql = re.sub(r"\$__unixEpochFilter\((\w+)\)", r"\1 BETWEEN 0 AND 9999999999", sql)
                rows = store._rows(sql)
                assert rows, where
                assert all(r["action"] != "allow" and "•" in r["number"] for r in rows if r["number"] != "(no number)")
                assert {r["request_id"] for r in rows} <= {d["request_id"] for d in decisions}

        # Retention: everything is older than 1 day (simulated time in 2026-11), so purge empties.
        assert purge(store, replace(s, sink_retention_days=1)) >= len(decisions)
        assert store.count() == 0 and store.count("decision_reasons") == 0
    finally:
        store.close()


async def _sink_once(settings, store, expected: int):
    """Run a sink in a new consumer group until it has read everything again (no new rows)."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_sink(settings, stop=stop))
    await asyncio.sleep(6)
    stop.set()
    stats = await asyncio.wait_for(task, 30)
    assert stats.decisions >= expected  # it re-wrote every decision...
    return stats


def test_a_version_1_postgresql_log_is_migrated_to_cost_at_risk(postgres_url):
    """A decision log created before cost at risk (migration 0001 only, with rows) gets the money
    columns and a decision_log view that shows them; its old rows read as NULL / 0."""
    import uuid

    import psycopg

    name = f"mig_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    url = postgres_url.rsplit("/", 1)[0] + "/" + name
    try:
        first = Path(__file__).parents[2] / "detector/sink/migrations/postgresql/0001_decision_log.sql"
        with psycopg.connect(url) as conn:
            conn.execute(first.read_text())
            conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                         "applied_at REAL NOT NULL)")
            conn.execute("INSERT INTO schema_migrations VALUES (1, '0001_decision_log.sql', 0)")
            conn.execute("INSERT INTO decisions (request_id, decided_at, request_ts, action, silent, risk, "
                         "reasons, monitored_reasons, policy_version, number_masked, ip_hash, enrichment, "
                         "counts, stored_at) VALUES ('old', 1, 1, 'block', true, 1, 'denied_prefix', '', "
                         "'v1', '(no number)', 'h', '{}', '{}', 1)")
        with open_store(url) as store:
            old = store.get("old")
            assert (old["cost_per_min"], old["expected_cost"], old["currency"], old["budget"]) == (None, 0, None, None)
            assert old["outcome"] is None and old["reasons"] == "denied_prefix"
            applied = store._rows("SELECT name FROM schema_migrations ORDER BY version")
            assert [r["name"] for r in applied] == ["0001_decision_log.sql", "0002_cost_at_risk.sql"]
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
