"""Benchmark: decision-log writes (rows/s) into SQLite and a real PostgreSQL, batches of 500.

Decisions come from a replay of a simulated day; each batch is one transaction (upsert of the
decision rows + their reasons), as `detector sink` writes a poll's records. PostgreSQL is a
throwaway server started like the tests start it (tests/pg_server.py).

    python bench/bench_sink.py [--legit 20000] [--batch 500]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from pg_server import PostgresServer  # noqa: E402

from detector.core.decide import DecisionContext  # noqa: E402
from detector.core.parse import parse_request  # noqa: E402
from detector.core.pipeline import Detector  # noqa: E402
from detector.core.policy import load_policy  # noqa: E402
from detector.sim import SimConfig, simulate  # noqa: E402
from detector.sink.rows import decision_row  # noqa: E402
from detector.sink.store import open_store  # noqa: E402


def write_all(url: str, rows: list[dict], batch: int) -> float:
    with open_store(url) as store:
        t0 = time.perf_counter()
        for i in range(0, len(rows), batch):
            store.write(rows[i:i + batch])
        took = time.perf_counter() - t0
        assert store.count() == len(rows)
    return len(rows) / took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--legit", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=500)
    args = ap.parse_args()
    reqs = sorted((parse_request(it.request) for it in simulate(SimConfig(seed=3, legit_per_day=args.legit))),
                  key=lambda r: r.ts)
    key = b"bench"
    decisions = list(Detector(DecisionContext(load_policy(), pii_key=key)).process_many(reqs))
    t0 = time.perf_counter()
    rows = [decision_row(d.to_dict(), key) for d in decisions]
    print(f"{len(rows):,} decisions; row building {len(rows) / (time.perf_counter() - t0):,.0f} rows/s")
    with tempfile.TemporaryDirectory() as tmp:
        rate = write_all(f"sqlite:///{tmp}/d.sqlite", rows, args.batch)
        print(f"SQLite (WAL, file):  {rate:>9,.0f} rows/s")
    server = PostgresServer()
    try:
        url = server.start()
        print(f"PostgreSQL 15 (local): {write_all(url, rows, args.batch):>7,.0f} rows/s")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
