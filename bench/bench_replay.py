"""Benchmark: ``detector replay`` throughput on one core, all enrichment on.

Simulates a labelled day (several seeds for more volume), builds the simulator's IP databases,
and runs the requests through ``Detector.process`` (parse is timed separately) with and without
the shipped model. Prints throughput and per-request latency percentiles.

    python bench/bench_replay.py [--seeds 3] [--no-model]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from detector.config import load_settings
from detector.core.ipintel import IpIntel
from detector.core.parse import parse_request
from detector.core.pipeline import Detector
from detector.runtime import build_context, build_model_watcher, tune_gc
from detector.sim import SimConfig, build_ip_databases, simulate


def run(seeds: int, use_model: bool) -> None:
    tune_gc()  # as `detector replay` and the worker do
    raw: list[str] = []
    for s in range(seeds):
        items = simulate(SimConfig(seed=1000 + s, start=1795305600.0 + s * 86400))
        raw += [json.dumps(it.request) for it in items]
    settings = load_settings()
    ctx = build_context(settings)
    model = "off"
    if use_model:
        watcher = build_model_watcher(settings)
        ctx.model = watcher.current() if watcher is not None else None
        model = ctx.model.version if ctx.model is not None else "missing"
    with tempfile.TemporaryDirectory() as tmp:
        dbs = build_ip_databases(Path(tmp))
        intel = IpIntel.from_paths(dbs["country"], dbs["asn"], dbs["anonymous"],
                                   hosting_asn_file=dbs.get("hosting_asns"))
        t0 = time.perf_counter()
        reqs = [parse_request(line) for line in raw]
        t_parse = time.perf_counter() - t0
        reqs.sort(key=lambda r: r.ts)
        det = Detector(ctx, intel)
        lat = np.empty(len(reqs))
        t0 = time.perf_counter()
        for i, r in enumerate(reqs):
            a = time.perf_counter_ns()
            det.process(r)
            lat[i] = time.perf_counter_ns() - a
        total = time.perf_counter() - t0
    n = len(reqs)
    us = lat / 1000.0
    print(f"requests: {n:,}  model: {model}")
    print(f"parse:    {n / t_parse:,.0f} req/s")
    print(f"decide:   {n / total:,.0f} req/s (enrich + both stages + decide + commit)")
    print(f"end-to-end (parse + decide): {n / (total + t_parse):,.0f} req/s")
    print("latency per request (us): "
          + "  ".join(f"p{p}={np.percentile(us, p):.1f}" for p in (50, 95, 99, 99.9))
          + f"  mean={us.mean():.1f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--no-model", action="store_true")
    args = ap.parse_args()
    run(args.seeds, not args.no_model)


if __name__ == "__main__":
    main()
