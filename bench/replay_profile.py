"""One `detector replay` of N simulated days (seeds 1000..), for profiling and A/B timing.

Prints the CPU time per request of the replay alone (what ``bench_replay_floor.py`` times, without
the floor). Under py-spy it shows where a request's time goes:

    py-spy record -r 400 -f raw -o replay.raw -- python bench/replay_profile.py 2
    python bench/replay_profile.py 2      # CPU us/request; run two checkouts alternately to compare
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_replay_floor import run_replay  # noqa: E402

from detector.runtime import tune_gc  # noqa: E402
from detector.sim import SimConfig, build_ip_databases, simulate  # noqa: E402


def main() -> None:
    days = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    tune_gc()
    lines = [json.dumps(it.request).encode()
             for s in range(days)
             for it in simulate(SimConfig(seed=1000 + s, start=1795305600.0 + s * 86400))]
    with tempfile.TemporaryDirectory() as tmp:
        dbs = build_ip_databases(Path(tmp) / "ipdb")
        (wall, cpu), n, model = run_replay(lines, dbs, True)
    print(f"{n:,} decisions ({days} simulated days), model {model}: "
          f"{1e6 * cpu / n:.1f} us CPU/request, {1e6 * wall / n:.1f} us wall")


if __name__ == "__main__":
    main()
