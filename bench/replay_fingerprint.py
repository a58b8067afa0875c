"""Check that a change to the detector leaves replay's decisions byte-identical.

Replays four simulated days (seeds 1000, 1001 and 401, and seed 77 with 3x attacks) with the
shipped model and the simulator's IP databases, writes each day's decisions (JSONL) to ``OUT``
and prints their SHA-256. Run it before a change and after it, then compare:

    python bench/replay_fingerprint.py /tmp/before
    python bench/replay_fingerprint.py /tmp/after
    for f in /tmp/before/*.jsonl; do cmp "$f" /tmp/after/$(basename "$f"); done
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tempfile
import time
from pathlib import Path

from detector.config import load_settings
from detector.core.ipintel import IpIntel
from detector.core.pipeline import Detector
from detector.replay import replay
from detector.runtime import build_context, build_model_watcher, tune_gc
from detector.sim import SimConfig, build_ip_databases, simulate

DAYS = (("seed1000", 1000, 1.0), ("seed1001", 1001, 1.0), ("seed401", 401, 1.0),
        ("seed77x3", 77, 3.0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tune_gc()
    settings = load_settings()
    watcher = build_model_watcher(settings)
    with tempfile.TemporaryDirectory() as tmp:
        dbs = build_ip_databases(Path(tmp) / "ipdb")
        for name, seed, scale in DAYS:
            lines = [json.dumps(it.request).encode()
                     for it in simulate(SimConfig(seed=seed, attack_scale=scale))]
            ctx = build_context(settings)
            ctx.model = watcher.current() if watcher is not None else None
            intel = IpIntel.from_paths(dbs["country"], dbs["asn"], dbs["anonymous"],
                                       hosting_asn_file=dbs["hosting_asns"],
                                       connection_type_db=dbs.get("connection_type"))
            out, rej = io.StringIO(), io.StringIO()
            t0 = time.process_time()
            summary = replay(lines, Detector(ctx, intel), out=out, rejects=rej)
            took = time.process_time() - t0
            intel.close()
            data = out.getvalue().encode()
            (args.out / f"{name}.jsonl").write_bytes(data)
            (args.out / f"{name}.rejects.jsonl").write_text(rej.getvalue())
            print(f"{name}: {summary.decisions:,} decisions, {1e6 * took / max(len(lines), 1):.0f} "
                  f"us CPU/request, sha256 {hashlib.sha256(data).hexdigest()[:16]}")


if __name__ == "__main__":
    main()
