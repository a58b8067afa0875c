"""Two workers on four partitions against one, in the same run, through a real broker (not a test).

    .venv/bin/python bench/bench_scale.py [--bootstrap HOST:PORT] [--requests 20000]
        [--rounds 2] [--no-model]

Each round drains the same backlog of simulated requests (keyed by IP, the shipped model
unless --no-model, all tables on, decisions fenced as deployed) twice, on fresh topics with 4
partitions: once with one worker, once with two (the order alternates between rounds, so a
drift in the machine's load does not favour one). The workers are started and balanced (two
partitions each) before the backlog is produced. For each drain it reports:

* decisions/s: between the first and the last decision's Kafka timestamps;
* worker CPU: seconds used by the worker processes during the drain, and per decision;
* broker CPU (when this script started the broker) and the whole machine's busy cores
  (``/proc/stat``: other processes on a shared machine included);
* the ratio two workers / one worker, and how much of the gap the CPU explains: the rate the
  two workers would reach with the CPU they actually got at one worker's CPU per decision.

On a 2-core machine two workers cannot double the rate: the broker, the producer and the
consumer of this script and the two workers share the same two cores. The figures say how much
of one core each decision costs, which is what sizing needs (README, "Sizing").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import bench_stream as bs  # noqa: E402  (also puts the repository and tests/ on sys.path)

from detector.config import load_settings  # noqa: E402
from detector.stream import io  # noqa: E402

PARTITIONS = 4
TICK = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> tuple[float, float]:
    """(busy CPU seconds of all cores, wall) from /proc/stat's first line."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / TICK, time.monotonic()


def process_cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def health(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]
    except OSError:
        return None


def wait_balanced(workers: list[bs.Worker], timeout: float = 120.0) -> None:
    """Until the workers own every by-range partition between them, evenly."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        owned = [(health(w.port) or {}).get("partitions", {}).get("by_range", []) for w in workers]
        if (sorted(p for o in owned for p in o) == list(range(PARTITIONS))
                and max(len(o) for o in owned) - min(len(o) for o in owned) <= 1):
            time.sleep(1.0)  # let the last rebalance's preparation finish
            return
        time.sleep(0.3)
    raise RuntimeError(f"workers not balanced after {timeout:.0f} s")


def drain(bootstrap: str, n_workers: int, rows: list[bytes], tmp: Path,
          broker_pid: int | None) -> dict[str, Any]:
    env = bs.env_for(bootstrap, f"bench-scale-{n_workers}w-{uuid.uuid4().hex[:8]}", tmp)
    env["DETECTOR_PARTITIONS"] = str(PARTITIONS)
    s = load_settings(env=env)
    asyncio.run(io.acreate_topics(s))
    workers = [bs.Worker(env, tmp) for _ in range(n_workers)]
    try:
        for w in workers:
            w.__enter__()
        wait_balanced(workers)
        cpu0 = [w.cpu_seconds() for w in workers]
        broker0 = process_cpu_s(broker_pid) if broker_pid else 0.0
        me0 = time.process_time()
        busy0, wall0 = machine_busy_s()
        produce_s = asyncio.run(bs.produce(bootstrap, s.topic_requests, rows))
        recs = asyncio.run(bs.consume(bootstrap, s.topic_decisions, len(rows), timeout=900))
        busy1, wall1 = machine_busy_s()
        cpu = [w.cpu_seconds() - c for w, c in zip(workers, cpu0, strict=True)]
        broker = (process_cpu_s(broker_pid) - broker0) if broker_pid else float("nan")
        me = time.process_time() - me0
    finally:
        for w in workers:
            w.__exit__(None, None, None)
    ts = sorted(r.timestamp for r in recs)
    span = (ts[-1] - ts[0]) / 1000.0 if len(ts) > 1 else float("nan")
    wall = wall1 - wall0
    return {
        "workers": n_workers, "requests": len(rows), "decisions": len(recs),
        "decisions_per_s": (len(ts) - 1) / span if span else 0.0,
        "drain_s": span, "wall_s": wall, "produce_s": produce_s,
        "worker_cpu_s": [round(c, 2) for c in cpu],
        "worker_cpu_ms_per_decision": 1000.0 * sum(cpu) / max(len(recs), 1),
        "workers_cores": sum(cpu) / wall,
        "broker_cpu_s": broker, "bench_client_cpu_s": me,
        "machine_busy_cores": (busy1 - busy0) / wall,
    }


def summarize(one: list[dict[str, Any]], two: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(rs: list[dict[str, Any]], key: str) -> float:
        return sum(float(r[key]) for r in rs) / len(rs)

    r1, r2 = mean(one, "decisions_per_s"), mean(two, "decisions_per_s")
    c1, c2 = mean(one, "worker_cpu_ms_per_decision"), mean(two, "worker_cpu_ms_per_decision")
    cores1, cores2 = mean(one, "workers_cores"), mean(two, "workers_cores")
    # The rate two workers would reach with the CPU they got, at one worker's cost per decision:
    cpu_bound = 1000.0 * cores2 / c1
    return {
        "one_worker_decisions_per_s": r1, "two_workers_decisions_per_s": r2,
        "ratio_two_over_one": r2 / r1,
        "worker_cpu_ms_per_decision": {"one": c1, "two": c2, "ratio": c2 / c1},
        "worker_cores_used": {"one": cores1, "two": cores2},
        "machine_busy_cores": {"one": mean(one, "machine_busy_cores"),
                               "two": mean(two, "machine_busy_cores")},
        "two_workers_rate_the_cpu_they_got_allows": cpu_bound,
        "gap_explained_by_cpu": ((2 * r1 - cpu_bound) / (2 * r1 - r2)) if r2 < 2 * r1 else 1.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrap", default=os.environ.get("DETECTOR_KAFKA_BOOTSTRAP"))
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-model", action="store_true", help="rules only (no isolation forest)")
    args = ap.parse_args()
    bs.NO_MODEL = args.no_model
    broker_pid: int | None = None
    bootstrap, broker = bs.start_kafka(args.bootstrap)
    if broker is not None:
        assert broker.data_dir is not None
        pid_file = broker.data_dir / "broker.pid"
        broker_pid = int(pid_file.read_text()) if pid_file.is_file() else None
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    rows = bs.sim_rows(args.requests)
    results: dict[str, Any] = {"cpus": os.cpu_count(), "partitions": PARTITIONS,
                               "model": not args.no_model, "runs": []}
    one: list[dict[str, Any]] = []
    two: list[dict[str, Any]] = []
    try:
        for k in range(args.rounds):
            for n in ((1, 2) if k % 2 == 0 else (2, 1)):
                r = drain(bootstrap, n, rows, tmp, broker_pid)
                results["runs"].append(r)
                (one if n == 1 else two).append(r)
                print(f"round {k + 1}, {n} worker(s): {r['decisions']:,} decisions, "
                      f"{r['decisions_per_s']:,.0f}/s; worker CPU {sum(r['worker_cpu_s']):.1f} s "
                      f"({r['worker_cpu_ms_per_decision']:.2f} ms/decision, "
                      f"{r['workers_cores']:.2f} cores); broker CPU {r['broker_cpu_s']:.1f} s; "
                      f"machine busy {r['machine_busy_cores']:.2f} of {os.cpu_count()} cores",
                      flush=True)
        results["summary"] = summary = summarize(one, two)
        print(f"two workers / one worker: {summary['ratio_two_over_one']:.2f}x "
              f"({summary['two_workers_decisions_per_s']:,.0f} vs "
              f"{summary['one_worker_decisions_per_s']:,.0f} decisions/s); worker CPU per "
              f"decision x{summary['worker_cpu_ms_per_decision']['ratio']:.2f}; with the CPU they "
              f"got, two workers at one worker's cost per decision would reach "
              f"{summary['two_workers_rate_the_cpu_they_got_allows']:,.0f}/s: the CPU explains "
              f"{summary['gap_explained_by_cpu']:.0%} of the gap to 2x", flush=True)
        print(json.dumps(results, indent=2))
    except bs.NoProgress as exc:
        print(f"bench_scale: FAILED: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        bs.stop_kafka(broker)


if __name__ == "__main__":
    main()
