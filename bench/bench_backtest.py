"""Benchmark: `detector backtest`'s two replays one after the other (``--jobs 1``) against the
candidate's replay in a second process beside the baseline's (``--jobs 2``), on the same
requests, in the same run, alternating (1, 2, 1, 2, ...). Wall time: what the SOC waits for.

The candidate is the baseline policy with a tighter per-IP velocity limit (decisions change),
both with the shipped model; the simulator's IP databases. Also checks that both give the
same report.

    python bench/bench_backtest.py [--seeds 3] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from detector.backtest import BacktestReport, compare, replay_both
from detector.config import load_settings
from detector.core.decide import DecisionContext
from detector.core.ipintel import IpIntel
from detector.core.parse import parse_request
from detector.core.policy import load_policy, parse_policy
from detector.runtime import build_model_watcher, tune_gc
from detector.sim import SimConfig, build_ip_databases, simulate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    cpus = len(os.sched_getaffinity(0))
    tune_gc()
    reqs = [parse_request(json.dumps(it.request))
            for s in range(args.seeds)
            for it in simulate(SimConfig(seed=1000 + s, start=1795305600.0 + s * 86400))]
    watcher = build_model_watcher(load_settings())
    model = watcher.current() if watcher is not None else None
    base = DecisionContext(load_policy(), model=model)
    cand = DecisionContext(parse_policy({"version": "cand", "velocity": {"ip_1h": 2}}), model=model)
    walls: dict[int, list[float]] = {1: [], 2: []}
    reports: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        dbs = build_ip_databases(Path(tmp) / "ipdb")
        intel = IpIntel.from_paths(dbs["country"], dbs["asn"], dbs["anonymous"],
                                   hosting_asn_file=dbs.get("hosting_asns"))
        for _ in range(args.repeat):
            for jobs in (1, 2):
                t0 = time.perf_counter()
                pairs = replay_both(reqs, base, cand, intel, jobs=jobs)
                walls[jobs].append(time.perf_counter() - t0)
                reports.append(compare(pairs, BacktestReport("bench", {}, {})).to_dict())
                del pairs
        intel.close()
    n = len(reqs)
    print(f"requests: {n:,} ({args.seeds} simulated days), model {getattr(model, 'version', None)}, "
          f"{cpus} usable CPUs; reports identical: {all(r == reports[0] for r in reports)}")
    for i, (w1, w2) in enumerate(zip(walls[1], walls[2], strict=True), 1):
        print(f"run {i}: --jobs 1 {w1:6.2f} s ({1e6 * w1 / n:5.1f} us/request)   "
              f"--jobs 2 {w2:6.2f} s ({1e6 * w2 / n:5.1f} us/request)   ratio {w1 / w2:4.2f}x")
    b1, b2 = min(walls[1]), min(walls[2])
    print(f"best: --jobs 1 {b1:.2f} s, --jobs 2 {b2:.2f} s: {b1 / b2:.2f}x less wall time")


if __name__ == "__main__":
    main()
