"""What fencing the decisions costs: one worker with and without it, in the same run (not a test).

    .venv/bin/python bench/bench_fencing.py [--bootstrap HOST:PORT] [--requests 20000]
        [--rate 500] [--seconds 20] [--rounds 2] [--no-model]

Decisions are fenced by default (``DETECTOR_FENCE_DECISIONS=1``: each range batch's decisions
in one Kafka transaction per partition, see detector/stream/delivery.py). Each round runs, with
fencing on and off (alternating which goes first): a backlog drain (decisions/s, worker CPU per
decision) and a paced run at ``--rate`` (decision latency p50/p99), as bench_stream.py does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import bench_stream as bs  # noqa: E402  (also puts the repository and tests/ on sys.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrap", default=os.environ.get("DETECTOR_KAFKA_BOOTSTRAP"))
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-model", action="store_true", help="rules only (no isolation forest)")
    args = ap.parse_args()
    bs.NO_MODEL = args.no_model
    bootstrap, broker = bs.start_kafka(args.bootstrap)
    tmp = Path(tempfile.mkdtemp(prefix="bench-fencing-"))
    runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    try:
        for k in range(args.rounds):
            for mode in (("on", "off") if k % 2 == 0 else ("off", "on")):
                os.environ["DETECTOR_FENCE_DECISIONS"] = "1" if mode == "on" else "0"
                tp = bs.run_throughput(bootstrap, args.requests, tmp)
                lat = bs.run_latency(bootstrap, args.rate, args.seconds, tmp)
                r = {"fencing": mode, "decisions_per_s": tp["decisions_per_s"],
                     "worker_cpu_ms_per_decision": 1000.0 * tp["worker_cpu_s"] / max(tp["decisions"], 1),
                     "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"],
                     "worker_cpu_share_at_rate": lat["worker_cpu_share"]}
                runs[mode].append(r)
                print(f"round {k + 1}, fencing {mode}: {r['decisions_per_s']:,.0f} decisions/s, "
                      f"{r['worker_cpu_ms_per_decision']:.2f} ms CPU/decision; at "
                      f"{args.rate:,.0f} req/s p50 {r['p50_ms']:.0f} ms p99 {r['p99_ms']:.0f} ms "
                      f"(worker CPU {r['worker_cpu_share_at_rate']:.0%} of a core)", flush=True)

        def mean(mode: str, key: str) -> float:
            return sum(float(r[key]) for r in runs[mode]) / len(runs[mode])

        summary = {key: {"on": mean("on", key), "off": mean("off", key),
                         "on_over_off": mean("on", key) / mean("off", key)}
                   for key in ("decisions_per_s", "worker_cpu_ms_per_decision", "p50_ms", "p99_ms")}
        print("fencing on / off: " + ", ".join(
            f"{key} {v['on']:,.1f} vs {v['off']:,.1f} (x{v['on_over_off']:.2f})"
            for key, v in summary.items()), flush=True)
        print(json.dumps({"rate": args.rate, "requests": args.requests, "runs": runs,
                          "summary": summary}, indent=2))
    except bs.NoProgress as exc:
        print(f"bench_fencing: FAILED: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        os.environ.pop("DETECTOR_FENCE_DECISIONS", None)
        bs.stop_kafka(broker)


if __name__ == "__main__":
    main()
