"""Benchmark: isolation-forest scoring cost per request, packed NumPy forest vs scikit-learn.

Uses the shipped ``models/default`` artefact (or trains a forest on random data when absent) and
real simulator feature rows. For batch sizes 1, 100 and 1000 it times:

* ``ForestScorer.score`` / ``score_batch``: what ``decide`` calls (score + threshold + top features)
* ``PackedForest.score_samples``: the raw packed walk
* ``IsolationForest.score_samples``: scikit-learn, a forest of the same size and parameters

and prints mean, p50, p95, p99 in microseconds *per request* (batch time / batch size).

    python bench/bench_scoring.py [--models-dir models] [--name default] [--repeat 2000]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from detector.core.model import ForestScorer, PackedForest, load_model
from detector.core.policy import load_policy
from detector.evaluate import simulator_intel
from detector.sim import SimConfig, simulate
from detector.train import build_matrix, train

TARGET_US = 100.0


def timeit(fn: Callable[[], Any], batch: int, repeat: int) -> np.ndarray:
    """Per-request microseconds of ``repeat`` calls (after a warm-up)."""
    for _ in range(min(50, repeat)):
        fn()
    out = np.empty(repeat)
    for i in range(repeat):
        t0 = time.perf_counter()
        fn()
        out[i] = (time.perf_counter() - t0) * 1e6 / batch
    return out


def line(label: str, us: np.ndarray) -> str:
    p50, p95, p99 = np.percentile(us, [50, 95, 99])
    return f"{label:<44} {us.mean():>9.1f} {p50:>9.1f} {p95:>9.1f} {p99:>9.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", type=Path, default=Path("models"))
    ap.add_argument("--name", default="default")
    ap.add_argument("--repeat", type=int, default=2000, help="timed calls at batch size 1")
    args = ap.parse_args()

    items = simulate(SimConfig(seed=301))  # a day: enough rows for max_samples up to ~20k
    with simulator_intel() as intel:
        X, _ = build_matrix(items, load_policy(), intel)
    rng = np.random.default_rng(0)
    X = X[rng.permutation(len(X))]

    card = args.models_dir / f"{args.name}.json"
    if card.is_file():
        scorer = load_model(args.models_dir, args.name)
        params = json.loads(card.read_text())["params"]
        source = f"artefact {scorer.version}"
    else:
        params = {"n_estimators": 100, "max_samples": 256, "random_state": 0}
        source = "no artefact: forest trained on these rows"
        scorer = ForestScorer(PackedForest.from_sklearn(train(X, seed=0)), 0.7, "bench")
    # scikit-learn on a forest of the same size and parameters, for comparison
    forest = train(X, n_estimators=params["n_estimators"], max_samples=params["max_samples"], seed=0)
    packed = scorer.forest

    print(f"scoring cost per request, microseconds ({source}; {packed.n_trees} trees, "
          f"max depth {packed.max_depth}, {X.shape[1]} features)")
    print(f"{'':<44} {'mean':>9} {'p50':>9} {'p95':>9} {'p99':>9}")
    row = [float(v) for v in X[0]]
    results: dict[str, np.ndarray] = {}
    for batch in (1, 100, 1000):
        reps = args.repeat if batch == 1 else max(20, args.repeat // batch * 5)
        rows = X[:batch]
        as_lists = [[float(v) for v in r] for r in rows]
        if batch == 1:
            results["score1"] = timeit(lambda: scorer.score(row), 1, reps)
            print(line("ForestScorer.score (1 row, list in)", results["score1"]))
        else:
            print(line(f"ForestScorer.score_batch ({batch} rows)",
                       timeit(lambda rows=as_lists: scorer.score_batch(rows), batch, reps)))
        print(line(f"PackedForest.score_samples ({batch} rows)",
                   timeit(lambda rows=rows: packed.score_samples(rows), batch, reps)))
        sk_reps = max(5, min(reps, 200 if batch == 1 else 20))
        print(line(f"sklearn IsolationForest.score_samples ({batch})",
                   timeit(lambda rows=rows: forest.score_samples(rows), batch, sk_reps)))
    mean1 = results["score1"].mean()
    verdict = "OK" if mean1 <= TARGET_US else "OVER TARGET"
    print(f"target: <= {TARGET_US:.0f} us per request at batch size 1 -> {mean1:.1f} us ({verdict})")


if __name__ == "__main__":
    main()
