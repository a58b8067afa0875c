"""Benchmark: enrichment and model scoring per request, as replay does them, on simulated days.

Times, in CPU time of this process, over every request of ``--seeds`` simulated days (in order,
each run with empty caches, as one replay sees them):

* ``enrich_phone`` (the number cache empty at the start: most numbers are new) and, for
  reference, ``phonenumbers.parse`` alone on the same text;
* ``IpIntel.lookup`` with the simulator's three databases (a new ``IpIntel`` per run);
* ``ForestScorer.score_batch`` on the feature rows replay scores, in batches of 256.

    python bench/bench_enrich.py [--seeds 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import phonenumbers

from detector.config import load_settings
from detector.core import phone, pipeline
from detector.core.features import features
from detector.core.ipintel import IpIntel
from detector.core.model import load_model
from detector.core.parse import parse_request
from detector.core.pipeline import Detector
from detector.runtime import build_context
from detector.sim import SimConfig, build_ip_databases, simulate


def best_cpu(fn: Callable[[], None], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        c0 = time.process_time()
        fn()
        best = min(best, time.process_time() - c0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    reqs = [parse_request(it.request)
            for s in range(args.seeds)
            for it in simulate(SimConfig(seed=1000 + s, start=1795305600.0 + s * 86400))]
    n = len(reqs)
    settings = load_settings()
    with tempfile.TemporaryDirectory() as tmp:
        dbs = build_ip_databases(Path(tmp) / "ipdb")

        def new_intel() -> IpIntel:
            return IpIntel.from_paths(dbs["country"], dbs["asn"], dbs["anonymous"],
                                      hosting_asn_file=dbs.get("hosting_asns"))

        # the feature rows of a one-at-a-time pass (replay scores the same rows in batches, plus a
        # few scored both ways for a pending mark)
        captured: list[list[float]] = []
        original = pipeline.decide

        def recording_decide(req, enr, counts, dctx, **kw):  # type: ignore[no-untyped-def]
            captured.append(features(req, enr, counts, dctx.policy))
            return original(req, enr, counts, dctx, **kw)

        det = Detector(build_context(settings), new_intel())
        pipeline.decide = recording_decide  # type: ignore[assignment]
        try:
            for req in reqs:
                det.process(req)
        finally:
            pipeline.decide = original  # type: ignore[assignment]
        rows = captured

        def run_phone() -> None:
            phone.set_cache_size(200_000)
            for req in reqs:
                phone.enrich_phone(req.phone_number, req.country_hint)

        def run_parse() -> None:
            cache: dict[tuple[str, str | None], object] = {}
            for req in reqs:
                key = (req.phone_number, req.country_hint)
                if key in cache:
                    continue
                text = phone._clean(req.phone_number)
                try:
                    cache[key] = phonenumbers.parse(
                        text, None if text.startswith("+") else req.country_hint)
                except phonenumbers.NumberParseException:
                    cache[key] = None

        def run_ip() -> None:
            intel = new_intel()
            for req in reqs:
                intel.lookup(req.ip)
            intel.close()

        scorer = load_model(settings.models_dir, settings.model_name)
        batches = [rows[i:i + 256] for i in range(0, len(rows), 256)]

        def run_model() -> None:
            for b in batches:
                scorer.score_batch(b)

        print(f"{n:,} requests ({args.seeds} simulated days), CPU time, best of {args.repeat}")
        for name, fn in (("enrich_phone", run_phone), ("  phonenumbers.parse alone", run_parse),
                         ("IpIntel.lookup", run_ip), ("score_batch (256 rows)", run_model)):
            took = best_cpu(fn, args.repeat)
            print(f"{name:28s} {1e6 * took / n:6.1f} us/request")


if __name__ == "__main__":
    main()
