"""End-to-end stream benchmark through a real Kafka broker (not a test).

    .venv/bin/python bench/bench_stream.py [--bootstrap HOST:PORT] [--requests 30000]
        [--rounds 3] [--rates half] [--seconds 20] [--no-model] [--no-ip-key] [--skip-ceiling]
        [--py-spy FILE]

Measures, in one run, against one worker (``python -m detector.stream.worker``, all tables on,
the shipped model in models/ unless --no-model; requests keyed by IP as the README asks of the
web tier unless --no-ip-key):

1. ceiling: a bare Faust pass-through agent (topic -> topic, no tables) draining a backlog;
2. throughput: the detector draining a backlog of simulated requests (decisions/s between the
   first and the last decision's Kafka timestamps);
   each round runs 1 then 2 back to back and prints their **ratio** (the machine's load changes
   between rounds; within a round both see about the same); the summary gives the median round;
3. latency at each offered rate (``half``: half the median sustained rate): requests sent at
   that pace with ``ts`` = send time; latency = decision's Kafka timestamp - request's Kafka
   timestamp; p50 / p95 / p99.

The run fails with a clear message (``the detector worker made no progress for 30 s``) when no
new decision arrives for 30 s, instead of waiting. ``--py-spy FILE`` records the worker's
profile (py-spy, raw collapsed stacks) during the first throughput round.

Starts its own broker with tests/kafka_broker.py unless ``--bootstrap`` (or
DETECTOR_KAFKA_BOOTSTRAP) names one. Against a secured cluster, set the DETECTOR_KAFKA_SECURITY_*,
DETECTOR_KAFKA_SASL_* and DETECTOR_KAFKA_SSL_* variables as for a worker: every client here
(and the workers it starts) connects with them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # noqa: E402

from detector.config import load_settings  # noqa: E402
from detector.stream.io import request_key, stop_consumer, topic_partitions  # noqa: E402
from detector.stream.kafka_security import client_kwargs, faust_credentials  # noqa: E402

KEY_BY_IP = True  # requests keyed by IP as the README asks of the web tier (--no-ip-key: keyless)
NO_MODEL = False  # --no-model: rules only


def start_kafka(bootstrap: str | None) -> tuple[str, Any]:
    """``(bootstrap, None)`` for a given broker, else a broker started here with
    tests/kafka_broker.py: ``(its bootstrap, the broker)``; :func:`stop_kafka` stops it."""
    if bootstrap:
        return bootstrap, None
    from kafka_broker import KafkaBroker

    broker = KafkaBroker()
    return broker.start(), broker


def stop_kafka(broker: Any) -> None:
    """Stop a broker :func:`start_kafka` started (None: nothing to stop)."""
    if broker is not None:
        broker.stop()


def security() -> dict[str, Any]:
    """aiokafka security options from the DETECTOR_KAFKA_* environment (PLAINTEXT by default)."""
    return client_kwargs(load_settings(check_files=True))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))] if xs else float("nan")


# --------------------------------------------------------------------------- ceiling


def passthrough_main(bootstrap: str, src: str, dst: str, n: int, out: str) -> None:
    """Child process: a bare Faust agent copying ``src`` to ``dst``; writes its rate to ``out``."""
    import faust

    app = faust.App(f"bench-pt-{uuid.uuid4().hex[:6]}", broker=f"kafka://{bootstrap}",
                    broker_credentials=faust_credentials(load_settings()), store="memory://",
                    web_enabled=False, autodiscover=False,
                    topic_partitions=4, producer_linger=0.001, stream_buffer_maxsize=8192)
    raw: dict[str, Any] = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw",
                           "value_serializer": "raw"}
    source, sink = app.topic(src, **raw), app.topic(dst, **raw)
    state = {"n": 0, "t0": 0.0, "cpu0": 0.0}

    @app.agent(source)
    async def copy(stream: Any) -> None:
        async for event in stream.events():
            if state["n"] == 0:
                state["t0"], state["cpu0"] = time.monotonic(), time.process_time()
            await sink.send(key=event.message.key, value=event.message.value)
            state["n"] += 1
            if state["n"] >= n:
                rate = (n - 1) / (time.monotonic() - state["t0"])
                cpu_ms = 1000 * (time.process_time() - state["cpu0"]) / (n - 1)
                Path(out).write_text(json.dumps({"passthrough_per_s": rate,
                                                 "passthrough_cpu_ms": cpu_ms}))
                os._exit(0)

    sys.argv = [sys.argv[0], "worker", "-l", "warn", "--without-web"]
    app.main()


# --------------------------------------------------------------------------- helpers


async def produce(bootstrap: str, topic: str, rows: list[bytes], rate: float | None = None,
                  stamp: bool = False) -> float:
    """Send rows (optionally paced, optionally with ts = send time); returns seconds taken."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=1, **security())
    await producer.start()
    t0 = time.monotonic()
    try:
        for i, row in enumerate(rows):
            if rate:
                ahead = i / rate - (time.monotonic() - t0)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            now = time.time()
            if stamp:
                obj = json.loads(row)
                obj["ts"] = now
                row = json.dumps(obj).encode()
            await producer.send(topic, value=row, timestamp_ms=int(now * 1000),
                                key=request_key(row) if KEY_BY_IP else None)
        await producer.flush()
    finally:
        await producer.stop()
    return time.monotonic() - t0


NO_PROGRESS_S = 30.0  # the worker made no decision for this long: the run fails, loudly


class NoProgress(RuntimeError):
    """The detector worker stopped producing decisions before the run was complete."""


async def consume(bootstrap: str, topic: str, n: int, timeout: float,
                  no_progress_s: float = NO_PROGRESS_S, log: Path | None = None) -> list[Any]:
    """The first ``n`` records of ``topic`` (from the beginning), or what came within ``timeout``;
    raises :class:`NoProgress` when nothing new arrives for ``no_progress_s``."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                enable_auto_commit=False, fetch_max_wait_ms=50,
                                isolation_level="read_committed", **security())
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in await topic_partitions(consumer, topic)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while len(out) < n and time.monotonic() < deadline:
            for recs in (await consumer.getmany(timeout_ms=200, max_records=10000)).values():
                out.extend(recs)
                last_new = time.monotonic()
            if time.monotonic() - last_new > no_progress_s:
                raise NoProgress(
                    f"the detector worker made no progress for {no_progress_s:.0f} s: "
                    f"{len(out):,} of {n:,} decisions on {topic}"
                    + (f"; worker log: {log}" if log is not None else ""))
        return out
    finally:
        await stop_consumer(consumer)


class Worker:
    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self.port = free_port()
        self.env = {**os.environ, **env, "DETECTOR_WEB_PORT": str(self.port),
                    "DETECTOR_DATA_DIR": str(tmp / f"w{self.port}"), "DETECTOR_LOG_LEVEL": "WARNING"}
        self.log = tmp / f"worker-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Worker:
        with self.log.open("wb") as fh:
            self.proc = subprocess.Popen(  # noqa: S603
                [sys.executable, "-m", "detector.stream.worker"], cwd=REPO, env=self.env,
                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                    h = json.loads(r.read())
                if h["lists_ready"] and h["partitions"].get("by_range"):
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.3)
        raise RuntimeError(f"worker not ready; see {self.log}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sim_rows(n: int) -> list[bytes]:
    from detector.sim.simulate import SimConfig, simulate

    days = max(n / 30000.0, 0.05)
    items = simulate(SimConfig(seed=11, duration_s=86400.0 * days, legit_per_day=25000,
                               attack_scale=1.0))
    reqs = [i.request for i in items]
    rows = [json.dumps(r).encode() for r in reqs]
    k = 0
    while len(rows) < n:  # more than the simulation made: repeat it under new request ids
        r = dict(reqs[k % len(reqs)])
        r["request_id"] = f"{r['request_id']}-{k}"
        rows.append(json.dumps(r).encode())
        k += 1
    return rows[:n]


def env_for(bootstrap: str, prefix: str, tmp: Path) -> dict[str, str]:
    (tmp / "models").mkdir(exist_ok=True)
    return {
        "DETECTOR_KAFKA_BOOTSTRAP": bootstrap, "DETECTOR_APP_ID": prefix,
        "DETECTOR_TOPIC_REQUESTS": f"{prefix}-requests", "DETECTOR_TOPIC_DECISIONS": f"{prefix}-decisions",
        "DETECTOR_TOPIC_OUTCOMES": f"{prefix}-outcomes", "DETECTOR_TOPIC_LISTS": f"{prefix}-lists",
        "DETECTOR_TOPIC_DEAD_LETTER": f"{prefix}-dlq", "DETECTOR_PARTITIONS": "4",
        # The shipped model (models/) unless --no-model: then an empty directory, rules only.
        "DETECTOR_MODELS_DIR": str(tmp / "models") if NO_MODEL else str(REPO / "models"),
        "DETECTOR_DEV_MODE": "1",  # the development PII key
        "DETECTOR_MAX_PAST_SKEW_S": "0",  # the backlog is a simulated day in the past
    }


# --------------------------------------------------------------------------- runs


def run_ceiling(bootstrap: str, n: int, tmp: Path) -> dict[str, float]:
    from kafka_broker import create_topics

    tag = uuid.uuid4().hex[:8]
    src, dst = f"bench-pt-src-{tag}", f"bench-pt-dst-{tag}"
    create_topics(bootstrap, {src: 4, dst: 4}, **security())
    asyncio.run(produce(bootstrap, src, [b'{"x": %d, "pad": "%s"}' % (i, b"x" * 150)
                                         for i in range(n)]))
    out = tmp / f"pt-{tag}.json"
    proc = subprocess.run(  # noqa: S603
        [sys.executable, __file__, "--passthrough", bootstrap, src, dst, str(n), str(out)],
        cwd=REPO, timeout=600, capture_output=True, check=False)
    if not out.is_file():
        raise RuntimeError(f"pass-through failed: {proc.stderr.decode()[-2000:]}")
    return {k: float(v) for k, v in json.loads(out.read_text()).items()}


def run_throughput(bootstrap: str, n: int, tmp: Path, py_spy: str | None = None) -> dict[str, float]:
    settings_env = env_for(bootstrap, f"bench-tp-{uuid.uuid4().hex[:8]}", tmp)
    s = load_settings(env=settings_env)
    rows = sim_rows(n)
    with Worker(settings_env, tmp) as w:
        cpu0 = w.cpu_seconds()
        t0 = time.monotonic()
        asyncio.run(produce(bootstrap, s.topic_requests, rows))
        spy = None if py_spy is None else start_py_spy(w, py_spy)
        recs = asyncio.run(consume(bootstrap, s.topic_decisions, n, timeout=600, log=w.log))
        wall = time.monotonic() - t0
        cpu = w.cpu_seconds() - cpu0  # includes the tail of the consume loop (<= 0.2 s idle)
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            spy.wait(timeout=60)
    ts = sorted(r.timestamp for r in recs)
    rate = (len(ts) - 1) / ((ts[-1] - ts[0]) / 1000.0) if len(ts) > 1 else 0.0
    return {"requests": n, "decisions": len(recs), "decisions_per_s": rate,
            "wall_s": wall, "worker_cpu_s": cpu}


def start_py_spy(w: Worker, out: str) -> subprocess.Popen[bytes]:
    """py-spy sampling the worker (raw collapsed stacks, 200 Hz) until SIGINT."""
    assert w.proc is not None
    exe = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen(  # noqa: S603
        [str(exe if exe.is_file() else "py-spy"), "record", "-f", "raw", "-r", "200", "-o", out,
         "--pid", str(w.proc.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_latency(bootstrap: str, rate: float, seconds: float, tmp: Path) -> dict[str, float]:
    settings_env = env_for(bootstrap, f"bench-lat-{uuid.uuid4().hex[:8]}", tmp)
    s = load_settings(env=settings_env)
    n = int(rate * seconds)
    rows = sim_rows(n)
    with Worker(settings_env, tmp) as w:
        cpu0 = w.cpu_seconds()
        took = asyncio.run(produce(bootstrap, s.topic_requests, rows, rate=rate, stamp=True))
        cpu = w.cpu_seconds() - cpu0
        recs = asyncio.run(consume(bootstrap, s.topic_decisions, n, timeout=120, log=w.log))
    pairs = sorted((json.loads(r.value)["request_ts"], r.timestamp / 1000.0) for r in recs)
    lat = [decided - sent for sent, decided in pairs]  # in request order (not partition order)
    warm = lat[int(len(lat) * 0.1):]  # skip the first 10 %: connections and caches warming up
    return {"offered_per_s": rate, "achieved_offered_per_s": n / took, "decisions": len(recs),
            "p50_ms": pct(warm, 50) * 1000, "p95_ms": pct(warm, 95) * 1000,
            "p99_ms": pct(warm, 99) * 1000, "max_ms": max(warm) * 1000 if warm else float("nan"),
            "worker_cpu_share": cpu / took}


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--passthrough":
        passthrough_main(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrap", default=os.environ.get("DETECTOR_KAFKA_BOOTSTRAP"))
    ap.add_argument("--requests", type=int, default=30000)
    ap.add_argument("--rounds", type=int, default=3, help="ceiling + throughput rounds (ratio each)")
    ap.add_argument("--rates", default="half",
                    help="offered rates for the latency runs, comma-separated; 'half': half the "
                         "median sustained rate")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--skip-ceiling", action="store_true")
    ap.add_argument("--no-model", action="store_true", help="rules only (no isolation forest)")
    ap.add_argument("--no-ip-key", action="store_true",
                    help="produce requests without a key (every request takes the by-ip hop)")
    ap.add_argument("--py-spy", metavar="FILE", help="profile the worker in the first round")
    args = ap.parse_args()
    global KEY_BY_IP, NO_MODEL
    KEY_BY_IP, NO_MODEL = not args.no_ip_key, args.no_model
    bootstrap, broker = start_kafka(args.bootstrap)
    tmp = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    results: dict[str, Any] = {"bootstrap": bootstrap, "cpus": os.cpu_count(), "model": not NO_MODEL,
                               "requests_keyed_by_ip": KEY_BY_IP, "rounds": []}
    try:
        for i in range(max(args.rounds, 1)):
            rnd: dict[str, Any] = {}
            if not args.skip_ceiling:
                ceiling = run_ceiling(bootstrap, args.requests, tmp)
                rnd["ceiling_passthrough_per_s"] = ceiling["passthrough_per_s"]
                rnd["ceiling_cpu_ms_per_msg"] = ceiling["passthrough_cpu_ms"]
            tp = rnd["throughput"] = run_throughput(bootstrap, args.requests, tmp,
                                                    args.py_spy if i == 0 else None)
            line = (f"round {i + 1}: detector {tp['decisions_per_s']:,.0f} decisions/s "
                    f"({tp['decisions']:,} decisions, worker CPU {tp['worker_cpu_s']:.1f} s = "
                    f"{1000 * tp['worker_cpu_s'] / max(tp['decisions'], 1):.2f} ms per decision)")
            if "ceiling_passthrough_per_s" in rnd:
                rnd["ratio"] = tp["decisions_per_s"] / rnd["ceiling_passthrough_per_s"]
                cpu_ms = 1000 * tp["worker_cpu_s"] / max(tp["decisions"], 1)
                rnd["cpu_ratio"] = rnd["ceiling_cpu_ms_per_msg"] / cpu_ms
                line += (f"; bare Faust pass-through {rnd['ceiling_passthrough_per_s']:,.0f} msg/s "
                         f"({rnd['ceiling_cpu_ms_per_msg']:.2f} ms CPU per message); "
                         f"ratio {rnd['ratio']:.0%} (CPU per message: {rnd['cpu_ratio']:.0%})")
            print(line, flush=True)
            results["rounds"].append(rnd)
        rates = [r["throughput"]["decisions_per_s"] for r in results["rounds"]]
        results["sustained_per_s"] = median(rates)
        ratios = [r["ratio"] for r in results["rounds"] if "ratio" in r]
        if ratios:
            results["ratio_median"] = median(ratios)
            cpu_ratios = [r["cpu_ratio"] for r in results["rounds"] if "cpu_ratio" in r]
            results["cpu_ratio_median"] = median(cpu_ratios)
            print(f"ratio (detector / bare Faust, same run): median {median(ratios):.0%} "
                  f"(rounds: {', '.join(f'{r:.0%}' for r in ratios)}); target >= 50%; "
                  f"CPU per message, pass-through / detector: median {median(cpu_ratios):.0%}",
                  flush=True)
        results["latency"] = []
        for r in (r for r in args.rates.split(",") if r):
            rate = results["sustained_per_s"] / 2 if r == "half" else float(r)
            lat = run_latency(bootstrap, round(rate), args.seconds, tmp)
            results["latency"].append(lat)
            print(f"latency @ {lat['offered_per_s']:,.0f} req/s offered "
                  f"({lat['achieved_offered_per_s']:,.0f} achieved, {lat['decisions']:,} decisions): "
                  f"p50 {lat['p50_ms']:.0f} ms  p95 {lat['p95_ms']:.0f} ms  p99 {lat['p99_ms']:.0f} ms  "
                  f"max {lat['max_ms']:.0f} ms  (worker CPU {lat['worker_cpu_share']:.0%} of a core)",
                  flush=True)
        print(json.dumps(results, indent=2))
    except NoProgress as exc:
        print(f"bench_stream: FAILED: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        stop_kafka(broker)


if __name__ == "__main__":
    main()
