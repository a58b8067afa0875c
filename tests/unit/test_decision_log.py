"""The decision log on SQLite (rows, migrations, idempotence, purge) and `detector explain`."""

import json
import sqlite3
from pathlib import Path

import pytest

from detector.cli import main
from detector.core.decide import DecisionContext, decide
from detector.core.mask import mask_number
from detector.core.policy import load_policy, parse_policy
from detector.core.records import Counts, Enrichment, IpCounts, RangeCounts
from detector.explain import explain_row, render
from detector.sink.rows import decision_row, normalize_number, number_hash, outcome_row
from detector.sink.store import open_store
from tests.unit.test_decide import GB_IP, GB_MOBILE, REQ, ip

KEY = b"test-key"
MIGRATIONS = sorted(p.name for p in (Path(__file__).parents[2] / "detector/sink/migrations/sqlite").glob("*.sql"))


CLEAN = Enrichment(GB_MOBILE, GB_IP)


def _decision(counts=None, enr=CLEAN, policy=None, rid="r1"):
    counts = Counts() if counts is None else counts
    from dataclasses import replace

    req = replace(REQ, request_id=rid)
    return decide(req, enr, counts, DecisionContext(policy=policy or load_policy(), pii_key=KEY),
                  decided_at=REQ.ts + 0.01).to_dict()


VELO = Counts(IpCounts(ip_15m=3), RangeCounts(number_15m=9, number_1h=12, number_24h=3))


@pytest.mark.parametrize(("e164", "masked"), [
    ("+447700900123", "+44 7700 9•• •23"),
    ("+33612345678", "+33 6 12 34 •• 78"),
    (None, "(no number)"),
])
def test_mask_number(e164, masked):
    assert mask_number(e164) == masked


def test_rows_hash_and_mask_numbers_unless_allowed():
    d = _decision(VELO)
    row = decision_row(d, KEY)
    assert row["number_e164"] is None and "e164" not in row["enrichment"] and "range_key" not in row["enrichment"]
    assert row["number_hash"] == number_hash("+447400123456", KEY) != number_hash("+447400123456", b"other")
    assert row["number_masked"] == mask_number("+447400123456")
    assert "81.2.69.142" not in json.dumps(row) and "447400123456" not in json.dumps(row).replace(
        row["number_hash"], "")
    kept = decision_row(d, KEY, store_numbers=True)
    assert kept["number_e164"] == "+447400123456" and kept["enrichment"]["e164"] == "+447400123456"
    out = outcome_row({"request_id": "r1", "phone_number": "+44 7400 123456", "outcome": "completed",
                       "ts": REQ.ts + 60, "duration_s": 30}, KEY)
    assert out["number_hash"] == row["number_hash"] and "phone_number" not in out
    assert normalize_number("07400 123456", "GB") == "+447400123456"


def test_store_migrations_upserts_and_purge(tmp_path):
    url = f"sqlite:///{tmp_path / 'log.sqlite'}"
    rows = [decision_row(_decision(VELO, rid=f"r{i}"), KEY) for i in range(5)]
    with open_store(url) as s:
        assert s.migrate() == []  # already applied by open_store
        s.write(rows)
        s.write(rows[:2])  # redelivered: replaced, not duplicated
        s.write([], [outcome_row({"request_id": "r1", "phone_number": "+447400123456", "outcome": "busy",
                                  "ts": REQ.ts + 5}, KEY)])
        assert s.count() == 5
        assert s.count("decision_reasons") == sum(len(r["reasons"].split(",")) for r in rows)
        assert s.get("r1")["outcome"] == "busy"
        assert len(s.by_number_hash(rows[0]["number_hash"])) == 5
        assert [r["request_id"] for r in s.by_reason("velocity_number")] != []
        assert len(list(s.between(REQ.ts, REQ.ts + 1))) == 5
    with open_store(url) as s:  # reopening applies nothing twice
        assert s.count() == 5
        assert s._rows("SELECT count(*) AS n FROM schema_migrations")[0]["n"] == len(MIGRATIONS)
        assert s.purge(REQ.ts + 10) == 6
        assert s.count() == 0 and s.count("decision_reasons") == 0


def test_explain_names_counts_and_thresholds():
    d = _decision(VELO, Enrichment(GB_MOBILE, ip(country="FR")))
    row = decision_row(d, KEY)
    row.update(outcome="completed", outcome_ts=REQ.ts + 60, outcome_duration_s=42.0)
    ex = explain_row(row, load_policy())
    assert ex["action"] == "block" and ex["silent"] is True
    velo = next(r for r in ex["reasons"] if r["code"] == "velocity_number")
    assert velo["crossed"] == [{"count_key": "number_15m", "count": 9, "threshold": 7},
                               {"count_key": "number_1h", "count": 12, "threshold": 9}]
    text = render(ex)
    assert "BLOCKED" in text and "Silent: yes" in text
    assert "9 requests to this number in 15 minutes (limit 7)" in text
    assert "12 requests to this number in 1 hour (limit 9)" in text
    assert "IP country (FR) differs from the number's (GB)" in text
    assert "completed" in text and "42 s talk time" in text
    assert "+447400123456" not in text and mask_number("+447400123456") in text
    other = explain_row(row, parse_policy({"version": "v2"}))
    assert "thresholds shown are from v2" in render(other)


def test_explain_monitored_rule():
    pol = parse_policy({"rules": {"anonymous_ip": {"mode": "monitor"}}})
    row = decision_row(_decision(enr=Enrichment(GB_MOBILE, ip(tor_exit=True)), policy=pol), KEY)
    text = render(explain_row(row, pol))
    assert "ALLOWED" in text and "Monitored rules" in text and "anonymous_ip: the request came through Tor" in text


def test_explain_cli_by_id_and_number(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DETECTOR_PII_HASH_KEY", KEY.decode())
    db = f"sqlite:///{tmp_path / 'log.sqlite'}"
    with open_store(db) as s:
        s.write([decision_row(_decision(VELO), KEY)])
    assert main(["explain", "r1", "--db", db]) == 0
    assert "9 requests to this number in 15 minutes (limit 7)" in capsys.readouterr().out
    assert main(["explain", "--number", "07400 123456", "--country-hint", "GB", "--db", db, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["request_id"] == "r1" and out[0]["reasons"][0]["code"]
    assert main(["explain", "--number", "+447700900999", "--db", db]) == 1
    monkeypatch.setenv("DETECTOR_PII_HASH_KEY", "another-key")
    assert main(["explain", "--number", "+447400123456", "--db", db]) == 1  # keyed: no match without the key


def test_cost_at_risk_columns_round_trip_and_a_version_1_log_is_migrated(tmp_path):
    """Migration 0002 adds cost_per_min, expected_cost, currency and budget to a log made by
    version 1 (its rows keep NULL / 0), and new rows carry them through the decision_log view."""
    path = tmp_path / "old.sqlite"
    old = sqlite3.connect(path)
    old.executescript((Path(__file__).parents[2] / "detector/sink/migrations/sqlite" / MIGRATIONS[0]).read_text())
    old.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                "applied_at REAL NOT NULL)")
    old.execute("INSERT INTO schema_migrations VALUES (1, ?, 0)", (MIGRATIONS[0],))
    old.execute("INSERT INTO decisions (request_id, decided_at, request_ts, action, silent, risk, reasons, "
                "monitored_reasons, policy_version, number_masked, ip_hash, enrichment, counts, stored_at) "
                "VALUES ('old', 1, 1, 'allow', 0, 0, '', '', 'v1', '(no number)', 'h', '{}', '{}', 1)")
    old.commit()
    old.close()
    d = _decision(rid="new")
    d.update(cost_per_min=0.02, expected_cost=0.08, currency="EUR",
             budget={"scope": "GB", "kind": "country", "spend_1h": 1.5, "limit_1h": 150.0,
                     "spend_24h": 9.0, "limit_24h": 1000.0, "open": False, "source": "default"})
    with open_store(f"sqlite:///{path}") as s:
        s.write([decision_row(d, KEY)])
        old_row, new_row = s.get("old"), s.get("new")
    assert (old_row["cost_per_min"], old_row["expected_cost"], old_row["budget"]) == (None, 0, None)
    assert (new_row["cost_per_min"], new_row["expected_cost"], new_row["currency"]) == (0.02, 0.08, "EUR")
    assert new_row["budget"]["scope"] == "GB" and new_row["outcome"] is None


def test_a_negative_or_non_numeric_cost_is_an_invalid_field():
    from detector.core.errors import InvalidField

    for bad in (-1, "cheap", float("nan"), True):
        with pytest.raises(InvalidField, match="expected_cost"):
            decision_row({**_decision(), "expected_cost": bad}, KEY)
