"""Through a real broker: >= 10,000 malformed messages interleaved with valid requests.

The worker must stay up, give every valid request exactly one decision, dead-letter every bad
message with its specific reason (never ``internal_error``), and write no phone number or IP
from the input to its log.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from detector.config import load_settings
from tests.integration.test_pipeline import _read_all, decisions_for, detector_env, workers

pytestmark = pytest.mark.integration

N_VALID = 1_000
N_BAD = 10_200


def _phone(i: int) -> str:
    return f"+447946{i:06d}"


def _ip(i: int) -> str:
    return f"198.51.{100 + (i // 250) % 20}.{i % 250 + 1}"


def _bad_messages(now: float, rng: random.Random) -> list[tuple[bytes, str]]:
    """(message, expected error kind); each quotes a number and an IP that must not be logged."""

    def req(i: int, **over: object) -> dict[str, object]:
        d: dict[str, object] = {"request_id": f"bad-{i}", "ts": now - 60, "phone_number": _phone(i),
                                "ip": _ip(i)}
        d.update(over)
        return d

    def js(d: dict[str, object]) -> bytes:
        return json.dumps(d).encode()

    makers = [
        lambda i: (f"{_phone(i)} from {_ip(i)} is not json {{".encode(), "malformed_json"),
        lambda i: (b"\xff\xfe" + _phone(i).encode() + b"\xc3\x28" + _ip(i).encode(), "malformed_json"),
        lambda i: (b'{"request_id": "b", "ts": ' + b"9" * 5000 + b', "phone_number": "'
                   + _phone(i).encode() + b'", "ip": "' + _ip(i).encode() + b'"}', "malformed_json"),
        lambda i: (js(req(i, ts=1e300)), "invalid_field"),
        lambda i: (js(req(i, ts=-5)), "invalid_field"),
        lambda i: (js(req(i, ts="9" * 5000)), "invalid_field"),
        lambda i: (js(req(i, phone_number=int(_phone(i)[1:]))), "invalid_field"),
        lambda i: (js(req(i, ip=[_ip(i)])), "invalid_field"),
        lambda i: (js(req(i, ip=_ip(i) + ".9")), "invalid_field"),
        lambda i: (js({"request_id": f"bad-{i}", "ts": now, "phone_number": _phone(i)}), "missing_field"),
        lambda i: (js(req(i, user_agent=_phone(i) * 600)), "invalid_field"),
        lambda i: (js(req(i, request_id="r" * 20_000)), "message_too_large"),
        lambda i: (b'{"p": "' + _phone(i).encode() + b'", "a": ' + b"[" * 2000 + b"]" * 2000 + b"}",
                   "malformed_json"),
        lambda i: (js(req(i, ts=4_070_908_800)), "event_time_out_of_range"),  # 2099
        lambda i: (js(req(i, ts=now - 3 * 86400)), "event_time_out_of_range"),
        lambda i: (b"[" + js(req(i)) + b"]", "malformed_json"),
        lambda i: (b"", "malformed_json"),
    ]
    out = [makers[i % len(makers)](i) for i in range(N_BAD - 20)]
    # a few very large ones: 1 MB would exceed Kafka's default message size, 200 KB does not
    out += [(b"[" * 100_000 + b"]" * 100_000, "message_too_large") for _ in range(10)]
    out += [(js(req(i, request_id="x" * 200_000)), "message_too_large") for i in range(10)]
    rng.shuffle(out)
    return out


def test_ten_thousand_malformed_messages_do_not_stop_the_worker(
    kafka_bootstrap: str, fresh_topic_prefix: str, tmp_path: Path
) -> None:
    env = detector_env(kafka_bootstrap, fresh_topic_prefix, 1, tmp_path)
    settings = load_settings(env=env)
    rng = random.Random(12)
    now = time.time()
    valid = [{"request_id": f"ok-{i}", "ts": now - 1800 + i, "phone_number": _phone(200_000 + i),
              "ip": _ip(300 + i)} for i in range(N_VALID)]
    bad = _bad_messages(now, rng)
    rows: list[tuple[bytes | None, bytes, str | None]] = []  # key, value, expected kind
    every = len(bad) // len(valid)
    bi = 0
    for v in valid:
        rows.append((str(v["ip"]).encode(), json.dumps(v).encode(), None))
        for _ in range(every):
            if bi < len(bad):
                rows.append((None, *bad[bi]))
                bi += 1
    rows += [(None, *b) for b in bad[bi:]]
    assert sum(1 for r in rows if r[2] is not None) >= 10_000

    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5,
                                    max_request_size=1_048_576)
        await producer.start()
        try:
            for key, value, _ in rows:
                await producer.send(settings.topic_requests, value=value, key=key)
            await producer.flush()
        finally:
            await producer.stop()

    t0 = time.monotonic()
    with workers(env, tmp_path, n=1, partitions=1) as (w,):
        asyncio.run(send())
        got = decisions_for(settings, {str(v["request_id"]) for v in valid}, timeout=120.0,
                            linger=2.0)
        dlq = asyncio.run(_read_all(settings, settings.topic_dead_letter,
                                    lambda recs: len(recs) >= len(bad), timeout=60.0, linger=1.0))
        assert w.alive() and (w.health() or {}).get("status") == "ok"
        log_text = w.log_path.read_text(errors="replace")
    elapsed = time.monotonic() - t0

    assert {rid: len(ds) for rid, ds in got.items() if len(ds) != 1} == {}
    extra = sorted(set(got) - {str(v["request_id"]) for v in valid})
    assert not extra, f"{len(extra)} bad messages were decided, e.g. {[got[r][0] for r in extra[:3]]}"
    assert len(got) == N_VALID
    # every bad message dead-lettered once, with its reason (offsets are send order: one partition)
    expected = [kind for _, _, kind in rows]
    kinds = {}
    for rec in dlq:
        d = json.loads(rec.value)
        kinds[d["offset"]] = d["error_kind"]
        raw = base64.b64decode(d["original_b64"])
        assert raw == rows[d["offset"]][1][:len(raw)]
    assert len(dlq) == len(bad)
    wrong = {o: (k, expected[o]) for o, k in kinds.items() if k != expected[o]}
    assert not wrong, f"{len(wrong)} wrong reasons, e.g. {list(wrong.items())[:5]}"
    assert "internal_error" not in kinds.values()
    # no input number or IP in the worker's log (nor a traceback)
    leaked = [s for i in range(N_BAD) for s in (_phone(i), _ip(i)) if s in log_text]
    leaked += [s for v in valid for s in (str(v["phone_number"]), str(v["ip"])) if s in log_text]
    assert not leaked, f"{len(leaked)} identifiers in the worker log, e.g. {leaked[:3]}"
    assert "Traceback" not in log_text
    assert elapsed < 150, elapsed
