"""Memory per key under a unique-key flood (not a test).

    .venv/bin/python bench/bench_memory.py [--requests 300000] [--hours 48] [--bootstrap HOST:PORT]
    .venv/bin/python bench/bench_memory.py --inprocess [--requests 300000] [--hours 48]
    .venv/bin/python bench/bench_memory.py --stores memory,rocksdb --requests 100000 --hours 24

A flood of requests that are all unique (a new IP and a new number each, numbers spread over
10 million mobile numbers), their event times spread evenly over ``--hours`` (48: the first day
is swept while the second one arrives), keyed by IP.

* default: one real worker (``python -m detector.stream.worker``, real broker). Prints the
  worker's resident memory before and after the flood (after the sweeps caught up), the live
  keys per table, the bytes per live unique request (RSS growth / live ``pair`` keys: one per
  unique request), the ERROR lines in its log, and how long SIGTERM takes to stop it.
* ``--stores memory,rocksdb``: one worker per ``DETECTOR_TABLE_STORE``, one after the other on
  the same broker, the same flood; also prints the RSS half-way (first half decided) and the
  *marginal* bytes per live request (RSS growth from half-way to the end / live requests added:
  fixed-size caches, buffers and RocksDB's memtables fill in the first half and drop out), the
  decisions/s of each store and their ratio, and the RocksDB directory's size on disk. Use
  ``--hours 24`` or less so that nothing but ``seen`` expires (live requests = requests).
* ``--inprocess``: the stage code without Kafka (as ``bench_stages.py``), fully swept every
  simulated hour; prints what the tables hold (keys and values, packed) per live request and the
  process's RSS growth. Seconds instead of minutes, and no other process in the figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

T_END = 1795341600.0  # 2026-11-22T10:00:00Z: the flood's last request (the worker's clock is not used)


def flood_rows(n: int, hours: float) -> list[tuple[bytes, bytes]]:
    """(key, value) of ``n`` unique requests: IP 2.x.y.z, number +44740xxxxxxx (a permutation of
    10^7 mobile numbers), times evenly over ``hours`` ending at T_END."""
    step = hours * 3600.0 / n
    t0 = T_END - hours * 3600.0
    rows = []
    for i in range(n):
        ip = f"2.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
        number = 7400000000 + (i * 48271) % 10_000_000
        body = {"request_id": f"flood-{i}", "ts": round(t0 + i * step, 3),
                "phone_number": f"+44{number}", "ip": ip}
        rows.append((ip.encode(), json.dumps(body).encode()))
    return rows


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            name, value = line.split(":")
            out[name] = int(value.split()[0])
    return out


def table_keys(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    keys = {}
    for line in text.splitlines():
        if line.startswith("detector_table_keys{"):
            name = line.split('table="')[1].split('"')[0]
            keys[name] = float(line.rsplit(" ", 1)[1])
    return keys


# --------------------------------------------------------------------------- real worker


async def produce_keyed(bootstrap: str, topic: str, rows: list[tuple[bytes, bytes]]) -> float:
    from aiokafka import AIOKafkaProducer
    from bench_stream import security

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, **security())
    await producer.start()
    t0 = time.monotonic()
    try:
        for key, value in rows:
            await producer.send(topic, value=value, key=key)
        await producer.flush()
    finally:
        await producer.stop()
    return time.monotonic() - t0


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_worker(bootstrap: str, n: int, hours: float, tmp: Path,
               store: str | None = None) -> dict[str, Any]:
    from bench_stream import Worker, consume, env_for

    from detector.config import load_settings

    env = env_for(bootstrap, f"bench-mem-{uuid.uuid4().hex[:8]}", tmp)
    if store is not None:
        env["DETECTOR_TABLE_STORE"] = store
    s = load_settings(env=env)
    rows = flood_rows(n, hours)
    half = n // 2
    out: dict[str, Any] = {"store": store or "memory", "requests": n, "hours": hours}
    with Worker(env, tmp) as w:
        assert w.proc is not None
        time.sleep(3)
        out["rss_before_kib"] = rss_kib(w.proc.pid)["VmRSS"]
        t0 = time.monotonic()
        asyncio.run(produce_keyed(bootstrap, s.topic_requests, rows[:half]))
        recs = asyncio.run(consume(bootstrap, s.topic_decisions, half, timeout=3600, log=w.log))
        out["rss_half_kib"] = rss_kib(w.proc.pid)["VmRSS"]
        asyncio.run(produce_keyed(bootstrap, s.topic_requests, rows[half:]))
        recs = asyncio.run(consume(bootstrap, s.topic_decisions, n, timeout=3600, log=w.log))
        out["decisions"] = len(recs)
        out["decided_in_s"] = round(time.monotonic() - t0, 1)
        out["decisions_per_s"] = round(len(recs) / out["decided_in_s"], 1)
        ids = [r.key for r in recs]
        out["duplicate_decisions"] = len(ids) - len(set(ids))
        del recs, ids
        # Let the sweeps catch up: until the live keys stop falling for two passes (~70 s).
        last, stable, deadline = None, 0, time.monotonic() + 600
        while time.monotonic() < deadline and stable < 2:
            time.sleep(35)
            keys = table_keys(w.port)
            stable = stable + 1 if keys == last else 0
            last = keys
        out["table_keys"] = last
        mem = rss_kib(w.proc.pid)
        out["rss_after_kib"], out["rss_peak_kib"] = mem["VmRSS"], mem["VmHWM"]
        live = (last or {}).get("pair", 0.0)
        out["live_unique_requests"] = live
        grown = (mem["VmRSS"] - out["rss_before_kib"]) * 1024
        out["bytes_per_live_request"] = round(grown / live) if live else None
        if hours <= 24:  # nothing but seen expired: the second half's requests are all live
            added = n - half
            out["marginal_bytes_per_live_request"] = round(
                (mem["VmRSS"] - out["rss_half_kib"]) * 1024 / added)
        out["data_dir_bytes"] = dir_bytes(Path(w.env["DETECTOR_DATA_DIR"]))
        t_stop = time.monotonic()
        w.proc.send_signal(signal.SIGTERM)
        try:
            out["sigterm_exit_code"] = w.proc.wait(timeout=60)
        except Exception:
            out["sigterm_exit_code"] = None
        out["sigterm_stop_s"] = round(time.monotonic() - t_stop, 1)
        log = w.log.read_text(errors="replace")
        out["log_error_lines"] = sum(1 for line in log.splitlines() if "[ERROR]" in line or " ERROR " in line)
        out["log_stream_not_started_lines"] = log.count("Stream has not started processing")
        out["log_lines"] = log.count("\n")
        out["worker_log"] = str(w.log)
    return out


# --------------------------------------------------------------------------- in process


def table_bytes(data: Any) -> int:
    """Keys, values and the dict itself (the memory store's dict)."""
    d = getattr(data, "data", data)
    return sys.getsizeof(d) + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in d.items())


async def run_inprocess(n: int, hours: float) -> dict[str, Any]:
    from bench_stages import build

    from detector.stream.ingest import ingest_one
    from detector.stream.sweep import sweep_tables

    rows = flood_rows(n, hours)
    rt, sent = build(no_model=False)
    rss0 = rss_kib(os.getpid())["VmRSS"]
    by_range = rt.topics["by_range"].get_topic_name()
    from bench_stages import partition_of

    offsets: dict[int, int] = {}
    chunk = 500
    last_sweep = 0.0
    for start in range(0, n, chunk):
        mark = len(sent.get(by_range, []))
        for i, (key, raw) in enumerate(rows[start:start + chunk], start):
            await ingest_one(rt, key, raw, partition=partition_of(key), offset=i, timestamp=None,
                             ack=lambda: None)
        for key_b, value, _ in sent.get(by_range, [])[mark:]:
            assert key_b is not None
            p = partition_of(key_b)
            rt.batcher.add(value, p, offsets.get(p, 0), lambda: None)
            offsets[p] = offsets.get(p, 0) + 1
        await rt.flush_batches()
        sent.clear()  # what was sent is not the worker's memory
        rt.population.take_delta()  # the worker publishes its deltas every second
        if rt.max_ts - last_sweep >= 3600:
            sweep_tables(rt, rt.max_ts)
            last_sweep = rt.max_ts
    sweep_tables(rt, rt.max_ts)
    import gc

    gc.collect()
    rss1 = rss_kib(os.getpid())["VmRSS"]
    live = len(rt.tables["pair"].data)
    per_table = {name: {"keys": len(t.data), "bytes": table_bytes(t.data)} for name, t in rt.tables.items()}
    total = sum(v["bytes"] for v in per_table.values())
    return {"requests": n, "hours": hours, "live_unique_requests": live, "tables": per_table,
            "table_bytes_per_live_request": round(total / live) if live else None,
            "population_scopes": len(rt.population),
            "rss_growth_bytes_per_live_request": round((rss1 - rss0) * 1024 / live) if live else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300_000)
    ap.add_argument("--hours", type=float, default=48.0)
    ap.add_argument("--bootstrap", default=os.environ.get("DETECTOR_KAFKA_BOOTSTRAP"))
    ap.add_argument("--inprocess", action="store_true")
    ap.add_argument("--stores", default=None,
                    help="comma-separated DETECTOR_TABLE_STORE values to compare (e.g. memory,rocksdb)")
    args = ap.parse_args()
    if args.inprocess:
        from detector.runtime import tune_gc

        tune_gc()
        print(json.dumps(asyncio.run(run_inprocess(args.requests, args.hours)), indent=2))
        return
    import bench_stream as bs

    bootstrap, broker = bs.start_kafka(args.bootstrap)
    try:
        tmp = Path(tempfile.mkdtemp(prefix="bench-mem-"))
        if not args.stores:
            print(json.dumps(run_worker(bootstrap, args.requests, args.hours, tmp), indent=2))
            return
        runs = {}
        for store in args.stores.split(","):
            runs[store] = run_worker(bootstrap, args.requests, args.hours, tmp, store=store)
            print(json.dumps(runs[store], indent=2), flush=True)
        if "memory" in runs and "rocksdb" in runs:
            m, r = runs["memory"], runs["rocksdb"]
            print(json.dumps({"rocksdb_vs_memory": {
                "decisions_per_s_ratio": round(r["decisions_per_s"] / m["decisions_per_s"], 3),
                "bytes_per_live_request": [m["bytes_per_live_request"], r["bytes_per_live_request"]],
                "marginal_bytes_per_live_request": [m.get("marginal_bytes_per_live_request"),
                                                    r.get("marginal_bytes_per_live_request")],
            }}, indent=2))
    finally:
        bs.stop_kafka(broker)


if __name__ == "__main__":
    main()
