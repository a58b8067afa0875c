"""Benchmark: `detector replay` (shipped model) against the floor of the same work, same file.

The floor does only what any replay of this file cannot avoid: decode each JSON line, parse its
phone number with ``phonenumbers`` (cached by the raw string, as the detector does), one mmdb
lookup of its IP, and three dict updates (per IP, per number, per IP x number). Replay does all of
the detector's work (validation, enrichment, the window counts of both stages, rules, the model,
one decision per request, serialized to JSONL). Both run in this process, pinned to one core,
alternately (floor, replay, floor, replay, ...), each replay with the detector's process-wide
caches emptied first (the number cache would otherwise hold every number of the file from the
previous run, which a real replay never has; the floor's cache is its own, new each run). Each
stops its clock before freeing what it built (the floor its tables, the replay its detector).

Both figures are printed in CPU time of this process (what a shared machine disturbs least) and
in wall time, per run and best of the runs, with their ratio: on a loaded VM the floor, which is
short, gets quiet stretches that the long replay does not, so the wall ratio is the noisier one.

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


def floor(lines: list[bytes], country_db: Path) -> tuple[float, float]:
    """(wall, CPU) seconds for the unavoidable work on ``lines``."""
    reader = maxminddb.open_database(str(country_db), maxminddb.MODE_MMAP_EXT)
    cache: dict[str, phonenumbers.PhoneNumber] = {}
    per_ip: dict[str, int] = {}
    per_number: dict[str, int] = {}
    per_pair: dict[tuple[str, str], int] = {}
    t0, c0 = time.perf_counter(), time.process_time()
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
    took = time.perf_counter() - t0, time.process_time() - c0
    reader.close()
    return took


def clear_process_caches() -> None:
    """Forget what an earlier run in this process left in the detector's memoized functions."""
    from detector.core import features, phone, pii

    # phone._cached: the LRU behind enrich_phone (older code: enrich_phone itself)
    for module, name in ((phone, "enrich_phone"), (phone, "_cached"), (phone, "_block_time_zone"),
                         (pii, "hash_id"), (pii, "hash_int"),
                         (features, "_zone"), (features, "_zone_for")):  # _zone_for: older code
        fn = getattr(module, name, None)
        if fn is not None and hasattr(fn, "cache_clear"):
            fn.cache_clear()
    getattr(phone, "_COUNTRY_ZONE", {}).clear()


def run_replay(lines: list[bytes], dbs: dict[str, Path], use_model: bool
               ) -> tuple[tuple[float, float], int, str]:
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
    clear_process_caches()
    detector = Detector(ctx, intel)
    t0, c0 = time.perf_counter(), time.process_time()
    summary = replay(lines, detector, out=out, rejects=io.StringIO())
    took = time.perf_counter() - t0, time.process_time() - c0
    # Freed after the clock stops, as the floor's tables are: a passed-in temporary would be
    # freed inside it (~2% of a replay: its window state is ~10^6 objects).
    del detector
    intel.close()
    return took, summary.decisions, model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each (alternating); best of N")
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
        floors, replays = [], []
        decisions, model = 0, ""
        for _ in range(args.repeat):
            floors.append(floor(lines, dbs["country"]))
            took, decisions, model = run_replay(lines, dbs, not args.no_model)
            replays.append(took)
    n = len(lines)
    print(f"requests: {n:,} ({args.seeds} simulated days)  model: {model}  one core, "
          f"{args.repeat} runs each, alternating; {decisions:,} decisions to JSONL per replay")
    for i, ((fw, fc), (rw, rc)) in enumerate(zip(floors, replays, strict=True), 1):
        print(f"run {i}: cpu floor {n / fc:9,.0f} req/s  replay {n / rc:7,.0f} req/s  "
              f"ratio {100 * fc / rc:5.1f}%   | wall floor {n / fw:9,.0f}  replay {n / rw:7,.0f}  "
              f"ratio {100 * fw / rw:5.1f}%")
    fc, rc = min(f[1] for f in floors), min(r[1] for r in replays)
    fw, rw = min(f[0] for f in floors), min(r[0] for r in replays)
    print(f"floor  (decode, cached parse, mmdb lookup, 3 dict updates), best: {n / fc:>9,.0f} req/s CPU "
          f"({1e6 * fc / n:.1f} us/req), {n / fw:,.0f} wall")
    print(f"replay (`detector replay`), best:                             {n / rc:>9,.0f} req/s CPU "
          f"({1e6 * rc / n:.1f} us/req), {n / rw:,.0f} wall")
    print(f"replay / floor (best of each): {100 * fc / rc:.1f}% CPU, {100 * fw / rw:.1f}% wall")


if __name__ == "__main__":
    main()
