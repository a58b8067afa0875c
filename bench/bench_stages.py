"""The stream stages' own CPU per request, without Kafka or Faust's consumer (not a test).

    .venv/bin/python bench/bench_stages.py [--requests 30000] [--chunk 200] [--no-model] [--profile]

Runs the worker's stage code (``detector.stream.app``: ingest with the IP stage, the range
stage's batcher and its flush) on simulated requests keyed by IP, with every Kafka send captured
in memory (a resolved future), in chunks of ``--chunk`` requests (ingest the chunk, range-stage
the chunk, flush: what one worker does with a backlog). Prints microseconds per request per
part and the messages and bytes each request sends. ``bench_stream.py`` measures the whole
worker against a real broker; this one isolates what the detector itself adds, so a change to
the stages can be measured in seconds and without the noise of a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from aiokafka.partitioner import murmur2  # noqa: E402

from detector.config import load_settings  # noqa: E402

PARTITIONS = 4


def sim_rows(n: int) -> list[bytes]:
    from detector.sim.simulate import SimConfig, simulate

    days = max(n / 30000.0, 0.05)
    items = simulate(SimConfig(seed=11, duration_s=86400.0 * days, legit_per_day=25000,
                               attack_scale=1.0))
    reqs = [i.request for i in items]
    rows = [json.dumps(r).encode() for r in reqs]
    k = 0
    while len(rows) < n:
        r = dict(reqs[k % len(reqs)])
        r["request_id"] = f"{r['request_id']}-{k}"
        rows.append(json.dumps(r).encode())
        k += 1
    return rows[:n]


def partition_of(key: bytes) -> int:
    return (murmur2(key) & 0x7FFFFFFF) % PARTITIONS


def build(no_model: bool) -> tuple[Any, dict[str, list[tuple[bytes | None, bytes | None, int | None]]]]:
    from detector.core.ipintel import IpIntel
    from detector.runtime import build_context, build_model_watcher
    from detector.stream.app import StreamRuntime, make_app

    env = {"DETECTOR_MODELS_DIR": str(REPO / "bench" / "no-models") if no_model
           else str(REPO / "models")}
    settings = load_settings(env=env, app_id="bench-stages", partitions=PARTITIONS,
                             max_past_skew_s=0.0)
    rt = StreamRuntime(settings, build_context(settings), IpIntel(), build_model_watcher(settings))
    make_app(settings, rt=rt, web=False, prometheus=False)
    sent: dict[str, list[tuple[bytes | None, bytes | None, int | None]]] = {}

    async def publish(channel: Any, key: bytes | None, value: bytes | None,
                      partition: int | None = None) -> Any:
        sent.setdefault(channel.get_topic_name(), []).append((key, value, partition))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    rt.publish = publish
    rt.lists_ready.set()
    rt.gate_offsets = False
    rt.ip_partitions = PARTITIONS
    every = set(range(PARTITIONS))
    rt.active = {"requests": every, "outcomes": every, "by_ip": every, "by_range": every}
    return rt, sent


async def run(rows: list[bytes], chunk: int, no_model: bool) -> dict[str, Any]:
    from detector.stream.app import ingest_one
    from detector.stream.io import request_key

    rt, sent = build(no_model)
    by_range = rt.topics["by_range"].get_topic_name()
    offsets: Counter[int] = Counter()
    t_ingest = t_range = t_flush = 0.0
    keyed = [(request_key(r), r) for r in rows]
    for start in range(0, len(keyed), chunk):
        n_rng = len(sent.get(by_range, []))
        t0 = time.process_time()
        for i, (key, raw) in enumerate(keyed[start:start + chunk], start):
            p = partition_of(key) if key else 0
            await ingest_one(rt, key, raw, partition=p, offset=i, timestamp=None,
                             ack=lambda: None)
        t1 = time.process_time()
        for key, value, _ in sent.get(by_range, [])[n_rng:]:
            assert key is not None
            p = partition_of(key)
            rt.batcher.add(value, p, offsets[p], lambda: None)
            offsets[p] += 1
        t2 = time.process_time()
        await rt.flush_batches()
        t3 = time.process_time()
        t_ingest, t_range, t_flush = t_ingest + t1 - t0, t_range + t2 - t1, t_flush + t3 - t2
    n = len(rows)
    msgs = {topic: len(v) for topic, v in sent.items()}
    size = {topic: sum(len(x[1] or b"") + len(x[0] or b"") for x in v) for topic, v in sent.items()}
    return {"requests": n, "decisions": msgs.get(rt.topics["decisions"].get_topic_name(), 0),
            "us_per_request": {"ingest+ip": 1e6 * t_ingest / n, "range": 1e6 * t_range / n,
                               "flush (decide, send)": 1e6 * t_flush / n,
                               "total": 1e6 * (t_ingest + t_range + t_flush) / n},
            "messages_per_request": {t: round(m / n, 3) for t, m in sorted(msgs.items())},
            "bytes_per_request": {t: round(b / n) for t, b in sorted(size.items())},
            "table_keys": {name: len(t.data) for name, t in rt.tables.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=30000)
    ap.add_argument("--chunk", type=int, default=200)
    ap.add_argument("--no-model", action="store_true")
    ap.add_argument("--profile", action="store_true", help="cProfile, top 30 by own time")
    args = ap.parse_args()
    rows = sim_rows(args.requests)
    from detector.runtime import tune_gc

    tune_gc()  # as the worker does
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
    res = asyncio.run(run(rows, args.chunk, args.no_model))
    if args.profile:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
