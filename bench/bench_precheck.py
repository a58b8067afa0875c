"""GET /v1/precheck under load, on one worker that also decides a steady request stream (not a test).

    .venv/bin/python bench/bench_precheck.py [--bootstrap HOST:PORT] [--rate 500]
        [--stream-rate 200] [--seconds 20] [--concurrency 16] [--no-model]

One worker (``python -m detector.stream.worker``, 4 partitions, the shipped model unless
--no-model, ``DETECTOR_PRECHECK_TOKEN`` set) on a real broker (started with tests/kafka_broker.py
unless ``--bootstrap``). The HTTP load generator is an aiohttp client on loopback (``wrk`` is not
installed here; this is the fallback the issue names), in this process; the request stream is
produced by a child process (keyed by IP, ``ts`` = send time), so neither paces the other.

Latency is measured twice: by the client (answer time - due time: everything, including the
client's own scheduling on a shared machine) and in the worker (``detector_precheck_seconds``,
the handler alone, from the histogram buckets: coarse).

Phases, one after the other, each ``--seconds`` long:

1. ``idle``: pre-checks open-loop at ``--rate`` (request i is due at t0 + i/rate whatever the
   answers before it; latency = answer time - due time, so a stall counts for every request
   that waited behind it), no request stream;
2. ``stream``: the request stream alone at ``--stream-rate`` (decision latency: the decision's
   Kafka timestamp - the request's);
3. ``both``: the two together: the figure of the issue (target p99 <= 20 ms at 500 req/s);
4. ``closed``: ``--concurrency`` connections asking back to back, with the stream: the most
   pre-checks per second the worker answers while deciding.

IPs asked: half from the request stream (state in the ``ip`` table), half never seen. Ratios are
of figures measured in the same run (the machine is shared and noisy; absolute figures differ by
machine). Prints a table and the JSON of every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import bench_stream  # noqa: E402
from bench_stream import Worker, env_for, pct, produce, sim_rows  # noqa: E402

from detector.config import load_settings  # noqa: E402

TOKEN = "bench-" + uuid.uuid4().hex + uuid.uuid4().hex


# --------------------------------------------------------------------------- the request stream


def stream_main(bootstrap: str, topic: str, rate: float, seconds: float, tag: str) -> None:
    """Child process: the web tier's request stream, ``rate`` per second for ``seconds``."""
    n = int(rate * seconds)
    rows = []
    for row in sim_rows(n):
        obj = json.loads(row)
        obj["request_id"] = f"{tag}-{obj['request_id']}"
        rows.append(json.dumps(obj).encode())
    asyncio.run(produce(bootstrap, topic, rows, rate=rate, stamp=True))


def start_stream(bootstrap: str, topic: str, rate: float, seconds: float,
                 tag: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # noqa: S603
        [sys.executable, __file__, "--stream", bootstrap, topic, str(rate), str(seconds), tag],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stream_ips(n: int) -> list[str]:
    return sorted({json.loads(r)["ip"] for r in sim_rows(n)})


# --------------------------------------------------------------------------- the load generator


async def open_loop(url: str, ips: list[str], rate: float, seconds: float) -> dict[str, Any]:
    """Pre-checks due at a fixed rate; latency measured from each one's due time."""
    import aiohttp

    n = int(rate * seconds)
    lat: list[float] = []
    status: Counter[str] = Counter()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    rnd = random.Random(1)
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def one(ip: str, due: float) -> None:
            try:
                async with session.get(url, params={"ip": ip}) as resp:
                    await resp.read()
                    status[str(resp.status)] += 1
            except Exception as exc:  # counted, never fatal: the run reports it
                status[type(exc).__name__] += 1
                return
            lat.append(loop.time() - due)

        for _ in range(50):  # warm the connection pool and the worker's code paths
            await one(rnd.choice(ips), loop.time())
        lat.clear()
        status.clear()
        tasks = []
        t0 = loop.time() + 0.05
        for i in range(n):
            due = t0 + i / rate
            ahead = due - loop.time()
            if ahead > 0:
                await asyncio.sleep(ahead)
            tasks.append(asyncio.create_task(one(rnd.choice(ips), due)))
        await asyncio.gather(*tasks)
        took = loop.time() - t0
    return {"offered_per_s": rate, "answered": len(lat), "answered_per_s": len(lat) / took,
            "status": dict(status), "p50_ms": pct(lat, 50) * 1000, "p99_ms": pct(lat, 99) * 1000,
            "max_ms": max(lat) * 1000 if lat else float("nan")}


async def closed_loop(url: str, ips: list[str], concurrency: int, seconds: float) -> dict[str, Any]:
    """``concurrency`` clients asking back to back: the most answers per second."""
    import aiohttp

    lat: list[float] = []
    status: Counter[str] = Counter()
    rnd = random.Random(2)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as session:
        end = loop.time() + seconds

        async def client() -> None:
            while loop.time() < end:
                t = loop.time()
                async with session.get(url, params={"ip": rnd.choice(ips)}) as resp:
                    await resp.read()
                    status[str(resp.status)] += 1
                lat.append(loop.time() - t)

        t0 = loop.time()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        took = loop.time() - t0
    return {"concurrency": concurrency, "answered_per_s": len(lat) / took, "status": dict(status),
            "p50_ms": pct(lat, 50) * 1000, "p99_ms": pct(lat, 99) * 1000}


# --------------------------------------------------------------------------- server side


def handler_buckets(port: int) -> dict[float, float]:
    """The worker's ``detector_precheck_seconds{route="local"}`` cumulative buckets (le -> count)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith("detector_precheck_seconds_bucket{") and 'route="local"' in line:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float("inf") if le == "+Inf" else float(le)] = float(line.split()[-1])
    return out


def handler_quantiles(before: dict[float, float], after: dict[float, float]) -> dict[str, float]:
    """p50 / p99 (ms) of the handler time in the worker between two bucket snapshots, linear
    within a bucket as Prometheus' histogram_quantile (coarse: the bucket bounds)."""
    les = sorted(after)
    counts = [after[le] - before.get(le, 0.0) for le in les]
    total = counts[-1] if counts else 0.0
    out: dict[str, float] = {"answered": total}
    for name, q in (("p50_ms", 0.5), ("p99_ms", 0.99)):
        rank, lo, prev = q * total, 0.0, 0.0
        value = float("nan")
        for le, c in zip(les, counts, strict=True):
            if c >= rank and total:
                hi = le if le != float("inf") else lo
                value = lo + (hi - lo) * ((rank - prev) / (c - prev) if c > prev else 1.0)
                break
            lo, prev = le, c
        out[name] = value * 1000
    return out


# --------------------------------------------------------------------------- phases


async def read_decisions(bootstrap: str, topic: str, tag: str, expected: int) -> list[float]:
    """Decision latencies (s) of the requests tagged ``tag``, in request order, once all are
    decided (or nothing new came for 10 s)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from detector.stream.io import stop_consumer, topic_partitions

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                enable_auto_commit=False, fetch_max_wait_ms=50,
                                **bench_stream.security())
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in await topic_partitions(consumer, topic)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        got: list[tuple[float, float]] = []
        last_new = time.monotonic()
        while len(got) < expected and time.monotonic() - last_new < 10.0:
            for recs in (await consumer.getmany(timeout_ms=200, max_records=10000)).values():
                last_new = time.monotonic()
                for r in recs:
                    d = json.loads(r.value)
                    if d["request_id"].startswith(tag + "-"):
                        got.append((d["request_ts"], r.timestamp / 1000.0 - d["request_ts"]))
        return [lat for _, lat in sorted(got)]
    finally:
        await stop_consumer(consumer)


def decision_latency(bootstrap: str, topic: str, tag: str, expected: int) -> dict[str, Any]:
    lat = asyncio.run(read_decisions(bootstrap, topic, tag, expected))
    warm = lat[int(len(lat) * 0.1):]
    return {"decisions": len(lat), "expected": expected, "p50_ms": pct(warm, 50) * 1000,
            "p99_ms": pct(warm, 99) * 1000}


def run(bootstrap: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    prefix = f"bench-pre-{uuid.uuid4().hex[:8]}"
    env = {**env_for(bootstrap, prefix, tmp), "DETECTOR_PRECHECK_TOKEN": TOKEN}
    s = load_settings(env=env)
    known = stream_ips(int(args.stream_rate * args.seconds))
    rnd = random.Random(3)
    ips = known[: 500] + [f"{rnd.randint(11, 200)}.{rnd.randint(0, 255)}.{rnd.randint(0, 255)}."
                          f"{rnd.randint(1, 254)}" for _ in range(500)]
    out: dict[str, Any] = {"rate": args.rate, "stream_rate": args.stream_rate,
                           "seconds": args.seconds, "model": not bench_stream.NO_MODEL,
                           "loadavg_start": os.getloadavg()[0], "cpus": os.cpu_count()}
    with Worker(env, tmp) as w:
        url = f"http://127.0.0.1:{w.port}/v1/precheck"
        # seed the ip table, then let the worker settle
        seed = start_stream(bootstrap, s.topic_requests, args.stream_rate, 5.0, "seed")
        seed.wait(timeout=120)
        time.sleep(3.0)

        cpu0, t0, h0 = w.cpu_seconds(), time.monotonic(), handler_buckets(w.port)
        out["idle"] = asyncio.run(open_loop(url, ips, args.rate, args.seconds))
        out["idle"]["worker_cpu_share"] = (w.cpu_seconds() - cpu0) / (time.monotonic() - t0)
        out["idle"]["handler"] = handler_quantiles(h0, handler_buckets(w.port))

        cpu0, t0 = w.cpu_seconds(), time.monotonic()
        child = start_stream(bootstrap, s.topic_requests, args.stream_rate, args.seconds, "alone")
        child.wait(timeout=args.seconds * 3 + 60)
        out["stream_cpu_share"] = (w.cpu_seconds() - cpu0) / (time.monotonic() - t0)
        out["stream"] = decision_latency(bootstrap, s.topic_decisions, "alone",
                                         int(args.stream_rate * args.seconds))

        cpu0, t0 = w.cpu_seconds(), time.monotonic()
        child = start_stream(bootstrap, s.topic_requests, args.stream_rate, args.seconds + 4, "both")
        time.sleep(2.0)  # the stream is flowing before the pre-checks start
        h0 = handler_buckets(w.port)
        out["both"] = asyncio.run(open_loop(url, ips, args.rate, args.seconds))
        out["both"]["handler"] = handler_quantiles(h0, handler_buckets(w.port))
        child.wait(timeout=args.seconds * 3 + 60)
        out["both"]["worker_cpu_share"] = (w.cpu_seconds() - cpu0) / (time.monotonic() - t0)
        out["both_decisions"] = decision_latency(bootstrap, s.topic_decisions, "both",
                                                 int(args.stream_rate * (args.seconds + 4)))

        child = start_stream(bootstrap, s.topic_requests, args.stream_rate, args.seconds + 4, "closed")
        time.sleep(2.0)
        out["closed"] = asyncio.run(closed_loop(url, ips, args.concurrency, args.seconds))
        child.wait(timeout=args.seconds * 3 + 60)
    out["loadavg_end"] = os.getloadavg()[0]
    return out


def report(r: dict[str, Any]) -> None:
    idle, both, closed = r["idle"], r["both"], r["closed"]
    print(f"\npre-check on one worker, {r['rate']:.0f} req/s offered open-loop, "
          f"{r['stream_rate']:.0f} req/s decided alongside, {r['seconds']:.0f} s per phase "
          f"(model {'on' if r['model'] else 'off'})")
    print(f"load average {r['loadavg_start']:.1f} at the start, {r['loadavg_end']:.1f} at the end "
          f"({r['cpus']} CPUs)")
    print(f"{'phase':<34}{'answered/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
          f"{'handler p50/p99':>18}  status / worker CPU")
    for name, x in (("idle worker (no request stream)", idle), ("while deciding the stream", both)):
        h = x["handler"]
        print(f"{name:<34}{x['answered_per_s']:>11,.0f}{x['p50_ms']:>9.2f}{x['p99_ms']:>9.2f}"
              f"{x['max_ms']:>9.1f}{h['p50_ms']:>9.2f}/{h['p99_ms']:<8.2f}  {x['status']} / "
              f"{x['worker_cpu_share']:.0%} of a core")
    print(f"{'closed loop, ' + str(closed['concurrency']) + ' connections + stream':<34}"
          f"{closed['answered_per_s']:>11,.0f}{closed['p50_ms']:>9.2f}{closed['p99_ms']:>9.2f}"
          f"{'':>9}  {closed['status']}")
    s, sb = r["stream"], r["both_decisions"]
    print(f"decision latency p50 / p99: stream alone {s['p50_ms']:.0f} / {s['p99_ms']:.0f} ms "
          f"({s['decisions']:,} decisions, worker {r['stream_cpu_share']:.0%} of a core); "
          f"with the pre-checks {sb['p50_ms']:.0f} / {sb['p99_ms']:.0f} ms ({sb['decisions']:,})")
    print(f"ratios (same run): pre-check p99 while deciding / idle = "
          f"{both['p99_ms'] / idle['p99_ms']:.2f}; decision p99 with pre-checks / without = "
          f"{sb['p99_ms'] / s['p99_ms']:.2f}")
    verdict = "met" if both["p99_ms"] <= 20.0 and both["answered_per_s"] >= 0.98 * r["rate"] else "NOT met"
    print(f"target p99 <= 20 ms at {r['rate']:.0f} req/s while deciding: {verdict}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--stream":
        stream_main(sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5]), sys.argv[6])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrap", default=os.environ.get("DETECTOR_KAFKA_BOOTSTRAP"))
    ap.add_argument("--rate", type=float, default=500.0, help="pre-checks per second (open loop)")
    ap.add_argument("--stream-rate", type=float, default=200.0, help="requests per second decided")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--no-model", action="store_true", help="rules only (no isolation forest)")
    args = ap.parse_args()
    bench_stream.NO_MODEL = args.no_model
    bootstrap, broker = bench_stream.start_kafka(args.bootstrap)
    tmp = Path(tempfile.mkdtemp(prefix="bench-precheck-"))
    try:
        results = run(bootstrap, args, tmp)
        report(results)
        print(json.dumps(results, indent=2))
    finally:
        bench_stream.stop_kafka(broker)


if __name__ == "__main__":
    main()
