"""The replay's per-key counting alone: ``ip_stage`` + ``range_stage`` + the staged number write +
the expiry index + the sweeps every 6 h of event time, on pre-enriched requests of N simulated
days (CPU time, one core, caches emptied before each run). What the replay Detector does for a
request before the population, the model and the decision.

    python bench/bench_state_stages.py [--seeds 3] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from detector.core import state
from detector.core.ipintel import IpIntel
from detector.core.pipeline import Detector, enrich, range_routing_key
from detector.replay import parse_lines
from detector.runtime import build_context, tune_gc
from detector.sim import SimConfig, build_ip_databases, simulate

sys.path.insert(0, str(Path(__file__).parent))
from bench_replay_floor import clear_process_caches  # noqa: E402


def run(items: list, ctx) -> tuple[float, float]:  # type: ignore[type-arg, no-untyped-def]
    """(CPU seconds of the whole loop, of which sweeps) for one pass over ``items``."""
    clear_process_caches()
    det = Detector(ctx)
    key, shared = ctx.pii_key, ctx.policy.shared_ip
    ip_stores, range_stores, number_store = det.ip_stores, det.range_stores, det.range_stores.number
    index = getattr(det, "_expiry", None)  # older code: full scans
    gc.collect()
    swept = 0.0
    c0 = time.process_time()
    for req, enr in items:
        state.ip_stage(ip_stores, req, enr, shared, key=key)
        rkey = range_routing_key(req, enr)
        upd = state.range_stage(range_stores, req, enr, rkey, key=key)
        number_store[upd.number_key] = upd.number_value
        if index is not None:  # as process_many files them
            b = state.counted_bucket(req.ts)
            for ix, k in zip(index, (req.ip, upd.number_key, upd.pair_key, rkey), strict=True):
                ix.bucket(b)[k] = None
        now = det.clock.observe(req.ts)
        if abs(now - det._last_sweep) > det.sweep_every_s:
            s0 = time.process_time()
            det.sweep(now)
            swept += time.process_time() - s0
    return time.process_time() - c0, swept


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    tune_gc()
    from detector.config import load_settings

    ctx = build_context(load_settings())
    lines = [json.dumps(it.request).encode() for s in range(args.seeds)
             for it in simulate(SimConfig(seed=1000 + s, start=1795305600.0 + s * 86400))]
    with tempfile.TemporaryDirectory() as tmp:
        dbs = build_ip_databases(Path(tmp) / "ipdb")
        intel = IpIntel.from_paths(dbs["country"], dbs["asn"], dbs["anonymous"],
                                   hosting_asn_file=dbs.get("hosting_asns"))
        good, _ = parse_lines(lines, None)
        good.sort(key=lambda it: it[1].ts)
        items = [(r, enrich(r, intel, ctx.policy)) for _, r in good]
        intel.close()
    best = None
    for i in range(args.repeat):
        took, swept = run(items, ctx)
        n = len(items)
        print(f"run {i + 1}: {took * 1e6 / n:.1f} us/request, of which sweeps {swept * 1e6 / n:.1f}")
        best = took if best is None else min(best, took)
    assert best is not None
    print(f"{len(items):,} requests ({args.seeds} simulated days), "
          f"best: {best * 1e6 / len(items):.1f} us/request")


if __name__ == "__main__":
    main()
