"""Population counters across workers, on a real broker: a surge spread over every partition is
seen by both workers (each counts its own requests at once and merges the other's deltas, published
every second), and the stream's population signals equal the replay path's for requests decided
in replay order. (Requests decided at the same moment on different partitions may or may not
see each other: the documented tolerance is the requests in flight in the last ~1.1 s.)"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from test_pipeline import T0, decisions_for, detector_env, one_each, produce_by_ip, req, workers

from detector.config import load_settings
from detector.core.ipintel import IpIntel
from detector.core.parse import parse_request
from detector.core.pipeline import Detector
from detector.runtime import build_context

pytestmark = pytest.mark.integration

# GB mobile numbers spread over the plan: one request per number and per IP (every key quiet).
SURGE = [req(f"s{i}", T0 + i * 0.4, f"+4477{(i * 7919) % 100:02d}{900000 + i:06d}",
             f"81.{2 + i % 3}.{i // 250}.{i % 250 + 1}") for i in range(300)]


def _probe_ips(partitions: int) -> list[str]:
    """One IP per partition of the requests topic (the producer's murmur2 partitioner)."""
    from aiokafka.partitioner import murmur2

    found: dict[int, str] = {}
    for i in range(1, 250):
        ip = f"86.12.{i}.9"
        found.setdefault((murmur2(ip.encode()) & 0x7FFFFFFF) % partitions, ip)
        if len(found) == partitions:
            break
    return [found[p] for p in range(partitions)]


PROBES = [req(f"q{i}", T0 + 200.0 + i, f"+4478{i:02d}{100000 + i * 13:06d}", ip)
          for i, ip in enumerate(_probe_ips(4))]
POP_KEYS = ("country_10m", "country_surge_factor", "country_surging", "global_10m", "prefix_24h")


def test_a_surge_spread_over_all_partitions_is_seen_by_both_workers(
    kafka_bootstrap: str, fresh_topic_prefix: str, tmp_path: Path
) -> None:
    env = detector_env(kafka_bootstrap, fresh_topic_prefix, 4, tmp_path)
    settings = load_settings(env={**env, "DETECTOR_DEV_MODE": "1"})
    with workers(env, tmp_path, n=2, partitions=4) as procs:
        produce_by_ip(settings, SURGE)
        decisions_for(settings, {r["request_id"] for r in SURGE}, timeout=240.0, linger=0.0)
        time.sleep(2.0)  # the documented bound: one publish interval plus one fetch
        got: dict[str, Any] = {}
        for probe in PROBES:  # one per partition, one after the other: replay order, both workers
            produce_by_ip(settings, [probe])
            got.update(one_each(decisions_for(settings, {probe["request_id"]}, timeout=120.0, linger=0.0)))
            time.sleep(1.5)
        owned = [set(p.health()["partitions"]["by_range"]) for p in procs]  # type: ignore[index]
        assert owned[0] and owned[1] and not owned[0] & owned[1]  # both workers decided probes

    ctx = build_context(settings)
    det = Detector(ctx, IpIntel())
    replay: dict[str, dict[str, Any]] = {}
    for row in SURGE + PROBES:
        d = det.process(parse_request(row))
        replay[d.request_id] = d.to_dict()
    # valid GB numbers (a few +44 7... numbers are Jersey, Guernsey or the Isle of Man: other regions)
    gb = sum(1 for r in SURGE if replay[r["request_id"]]["enrichment"]["number_country"] == "GB")
    assert gb >= 280
    for probe in PROBES:
        stream_counts = got[probe["request_id"]]["counts"]
        replay_counts = replay[probe["request_id"]]["counts"]
        # every GB surge request was counted by one worker or the other; both see all of them
        assert stream_counts["country_10m"] > gb, (probe["request_id"], stream_counts)
        assert {k: stream_counts[k] for k in POP_KEYS} == {k: replay_counts[k] for k in POP_KEYS}
        assert "country_surge" in got[probe["request_id"]]["reasons"]
