import json

import pytest

from detector.cli import main
from detector.config import load_settings
from detector.core.errors import ConfigError


def test_replay_writes_one_decision_per_valid_line_and_explains_rejects(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join([
        json.dumps({"request_id": "b", "ts": 1795341700, "phone_number": "+442079460018", "ip": "81.2.69.142"}),
        "{oops",
        json.dumps({"request_id": "a", "ts": 1795341600, "phone_number": "+442079460019", "ip": "81.2.69.142"}),
        json.dumps({"request_id": "c", "ts": 1795341800, "phone_number": "+442079460020"}),
        "",
        json.dumps({"request_id": "a", "ts": 1795341600, "phone_number": "+442079460019", "ip": "81.2.69.142"}),
    ]) + "\n")
    out, rej = tmp_path / "out.jsonl", tmp_path / "rej.jsonl"
    assert main(["replay", str(src), "-o", str(out), "--rejects", str(rej), "--no-model"]) == 0
    decisions = [json.loads(x) for x in out.read_text().splitlines()]
    assert [d["request_id"] for d in decisions] == ["a", "b"]  # timestamp order, one each
    rejects = [json.loads(x) for x in rej.read_text().splitlines()]
    assert [(r["line"], r["error_kind"]) for r in rejects] == [(2, "malformed_json"), (4, "missing_field"),
                                                              (6, "duplicate_request_id")]
    assert "decisions: 2" in capsys.readouterr().err


def test_bad_policy_is_a_clean_configuration_error(tmp_path, capsys):
    pol = tmp_path / "p.toml"
    pol.write_text("[velocity]\nnumber_15m = -1\n")
    src = tmp_path / "in.jsonl"
    src.write_text("")
    assert main(["replay", str(src), "--policy", str(pol), "--no-model"]) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and "velocity.number_15m: expected a positive integer, got -1" in err


def test_missing_database_path_fails_fast(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("")
    assert main(["replay", str(src), "--geoip-country-db", str(tmp_path / "nope.mmdb"), "--no-model"]) == 2
    assert "DETECTOR_GEOIP_COUNTRY_DB" in capsys.readouterr().err


def test_settings_from_env_and_errors():
    s = load_settings({"DETECTOR_KAFKA_BOOTSTRAP": "k:1", "DETECTOR_PARTITIONS": "8"})
    assert (s.kafka_bootstrap, s.partitions) == ("k:1", 8)
    with pytest.raises(ConfigError, match="DETECTOR_PARTITIONS: expected a number, got 'many'"):
        load_settings({"DETECTOR_PARTITIONS": "many"})
    with pytest.raises(ConfigError, match="DETECTOR_IP_LISTS: expected kind=path"):
        load_settings({"DETECTOR_IP_LISTS": "tor"})
    assert load_settings({"DETECTOR_BATCH_MS": "5"}).batch_ms == 5
    with pytest.raises(ConfigError, match=r"DETECTOR_BATCH_MS: expected 1 to 1000 \(milliseconds\), got 0"):
        load_settings({"DETECTOR_BATCH_MS": "0"})


def test_simulate_then_replay_round_trip(tmp_path):
    out = tmp_path / "day.jsonl"
    assert main(["simulate", "--seed", "3", "--out", str(out), "--legit", "300", "--duration", "7200"]) == 0
    labels = tmp_path / "day.labels.jsonl"
    n = len(out.read_text().splitlines())
    assert n == len(labels.read_text().splitlines()) > 300
    dec = tmp_path / "dec.jsonl"
    assert main(["replay", str(out), "-o", str(dec), "--no-model"]) == 0
    assert len(dec.read_text().splitlines()) == n


def test_queue_state_publish_needs_the_dialer_key_and_a_valid_state(tmp_path, capsys, monkeypatch):
    from detector.keys import generate

    monkeypatch.delenv("DETECTOR_DIALER_PRIVATE_KEY", raising=False)
    args = ["queue-state", "publish", "--dialer-id", "lon-1", "--waiting", "12", "--agents", "5",
            "--handle-s", "240", "--bootstrap", "127.0.0.1:1"]
    assert main(args) == 2
    assert "DETECTOR_DIALER_PRIVATE_KEY is not set" in capsys.readouterr().err
    generate(tmp_path, "dialer")
    monkeypatch.setenv("DETECTOR_DIALER_PRIVATE_KEY", str(tmp_path / "dialer.key"))
    bad = [a if a != "12" else "-3" for a in args]
    assert main(bad) == 1  # checked before any connection
    assert "field 'callbacks_waiting': expected an integer in [0, 1e+07], got -3" in capsys.readouterr().err


def test_replay_with_queue_states(tmp_path, capsys):
    ts = 1795341600
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"request_id": f"r{i}", "ts": ts + i * 60,
                                         "phone_number": f"+4420{3000 + i:04d}0123",
                                         "ip": f"81.2.69.{i + 1}"}) for i in range(4)) + "\n")
    states = tmp_path / "q.jsonl"
    states.write_text(json.dumps({"dialer_id": "d", "ts": ts + 90, "callbacks_waiting": 30,
                                  "agents_available": 5, "avg_handle_s": 240}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["replay", str(src), "-o", str(out), "--no-model", "--queue-states", str(states)]) == 0
    reasons = [json.loads(x)["reasons"] for x in out.read_text().splitlines()]
    assert reasons == [[], [], ["agent_capacity"], []]  # r3 is 90 s after the state: stale
    assert main(["replay", str(src), "--no-model", "--queue-states", str(tmp_path / "nope")]) == 2
    assert "--queue-states: cannot read" in capsys.readouterr().err
