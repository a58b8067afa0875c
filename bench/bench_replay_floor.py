"""Benchmark: `detector replay` (shipped model) against the floor of the same work, same file.

The floor does only what any replay of this file cannot avoid: decode each JSON line, parse its
phone number with ``phonenumbers`` (cached by the raw string, as the detector does), one mmdb
lookup of its IP, and three dict updates (per IP, per number, per IP x number). Replay does all of
the detector's work (validation, enrichment, the window counts of both stages, rules, the model,
one decision per request, serialized to JSONL). Both run in this process, pinned to one core.

    python bench/bench_replay_floor.py [--seeds 3] [--no-model] [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

import maxminddb
import orjson
import phonenumbers

from detector.config import load_settings
from detector.core.ipintel import IpIntel
from detector.core.pipeline import Detector
from detector.replay import replay
from detector.runtime import build_context, build_model_watcher, tune_gc
from detector.sim import SimConfig, build_ip_databases, simulate


def floor(lines: list[bytes], country_db: Path) -> float:
    """Seconds for the unavoidable work on ``lines``."""
    reader = maxminddb.open_database(str(country_db), maxminddb.MODE_MMAP_EXT)
    cache: dict[str, phonenumbers.PhoneNumber] = {}
    per_ip: dict[str, int] = {}
    per_number: dict[str, int] = {}
    per_pair: dict[tuple[str, str], int] = {}
    t0 = time.perf_counter()
    for line in lines:
        obj = orjson.loads(line)
        raw = obj["phone_number"]
        num = cache.get(raw)
        if num is None:
            try:
                num = cache[raw] = phonenumbers.parse(raw, obj.get("country_hint"))
            except phonenumbers.NumberParseException:
                num = cache[raw] = phonenumbers.PhoneNumber()
        ip = obj["ip"]
        reader.get(ip)
        nkey = f"{num.country_code}{num.national_number}"
        per_ip[ip] = per_ip.get(ip, 0) + 1
        per_number[nkey] = per_number.get(nkey, 0) + 1
        per_pair[(ip, nkey)] = per_pair.get((ip, nkey), 0) + 1
    took = time.perf_counter() - t0
    reader.close()
    return took


def run_replay(lines: list[bytes], dbs: dict[str, Path], use_model: bool) -> tuple[float, int, str]:
    settings = load_settings()
    ctx = build_context(settings)
    model = "off"
    if use_model:
        watcher = build_model_watcher(settings)
        ctx.model = watcher.current() if watcher is not None else None
        model = ctx.model.version if ctx.model is not None else "MISSING"
    intel = IpIntel.from_paths(dbs["country"], dbs["asn"], dbs["anonymous"],
                               hosting_asn_file=dbs.get("hosting_asns"))
    out = io.StringIO()
    t0 = time.perf_counter()
    summary = replay(lines, Detector(ctx, intel), out=out, rejects=io.StringIO())
    took = time.perf_counter() - t0
    intel.close()
    return took, summary.decisions, model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3, help="best of N for each figure")
    ap.add_argument("--no-model", action="store_true")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    tune_gc()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "day.jsonl"
        with path.open("w") as fh:
            for s in range(args.seeds):
                for it in simulate(SimConfig(seed=1000 + s, start=1795305600.0 + s * 86400)):
                    fh.write(json.dumps(it.request) + "\n")
        lines = path.read_bytes().splitlines()
        dbs = build_ip_databases(Path(tmp) / "ipdb")
        t_floor = min(floor(lines, dbs["country"]) for _ in range(args.repeat))
        runs = [run_replay(lines, dbs, not args.no_model) for _ in range(args.repeat)]
    t_replay, decisions, model = min(runs)
    n = len(lines)
    f_rate, r_rate = n / t_floor, n / t_replay
    print(f"requests: {n:,} ({args.seeds} simulated days)  model: {model}  one core, best of {args.repeat}")
    print(f"floor  (decode, cached parse, mmdb lookup, 3 dict updates): {f_rate:>9,.0f} req/s")
    print(f"replay (`detector replay`, {decisions:,} decisions to JSONL):    {r_rate:>9,.0f} req/s")
    print(f"replay / floor: {100 * r_rate / f_rate:.1f}%")


if __name__ == "__main__":
    main()
