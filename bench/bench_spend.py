"""Benchmark: cost at risk and spend breakers (detector/core/spend.py, detector/core/rates.py).

1. The price of the money features on the replay path: the same simulated day through
   ``Detector.process_many`` with pricing (in ``decide``) and the breaker step (``settle``), and
   with both replaced by no-ops, after a warm-up run, alternating A/B and B/A runs in one
   process; decisions/s (CPU time) and the ratio of the best runs.
2. ``RateDeck.lookup`` per call: the packaged sample (about 100 prefixes) and a synthetic deck of
   50,000 prefixes (a carrier's deck is tens of thousands of lines).
3. Money on held-out simulator seeds (shipped policy and model, declared campaigns): expected
   spend allowed, avoided (attacks stopped) and leaked (attacks allowed), and the requests the
   default breakers deflected, by population.

    python bench/bench_spend.py [--seeds 601,602,603] [--runs 3] [--skip-money]
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from collections.abc import Callable

from detector.core import decide, pipeline, spend
from detector.core.decide import DecisionContext
from detector.core.parse import parse_request
from detector.core.pipeline import Detector
from detector.core.policy import load_policy
from detector.core.rates import packaged_rate_deck, parse_rate_deck
from detector.evaluate import policy_with_campaigns, simulator_intel
from detector.runtime import tune_gc
from detector.sim import SimConfig, simulate
from detector.sim.populations import campaign_windows


def _day(seed: int) -> tuple[list, dict[str, str], SimConfig]:
    cfg = SimConfig(seed=seed)
    label: dict[str, str] = {}
    reqs = []
    for it in simulate(cfg):
        r = parse_request(it.request)
        label[r.request_id] = it.scenario
        reqs.append(r)
    reqs.sort(key=lambda r: r.ts)
    return reqs, label, cfg


def step_cost(runs: int) -> None:
    reqs, _, cfg = _day(1000)
    policy, _ = policy_with_campaigns(load_policy(), {}, campaign_windows(cfg))
    identity: Callable = lambda d, *a, **k: d  # noqa: E731
    unpriced: Callable = lambda *a, **k: (None, 0.0, None)  # noqa: E731
    real_settle, real_price = spend.settle, decide.price_decision
    rates: dict[str, list[float]] = {"with": [], "without": []}

    def once(mode: str) -> float:
        pipeline.spend.settle = real_settle if mode == "with" else identity  # type: ignore[attr-defined]
        decide.price_decision = real_price if mode == "with" else unpriced  # type: ignore[attr-defined]
        det = Detector(DecisionContext(policy), intel)
        t0 = time.process_time()
        n = sum(1 for _ in det.process_many(reqs))
        return n / (time.process_time() - t0)

    with simulator_intel() as intel:
        once("with")  # warm-up (caches of phonenumbers and the IP databases), not counted
        for i in range(runs):
            for mode in (("with", "without") if i % 2 else ("without", "with")):
                rates[mode].append(once(mode))
    pipeline.spend.settle, decide.price_decision = real_settle, real_price  # type: ignore[attr-defined]
    best = {m: max(v) for m, v in rates.items()}
    print(f"replay, rules + IP enrichment, {len(reqs):,} requests, best of {runs} (CPU time):")
    print(f"  without pricing and breakers: {best['without']:,.0f} decisions/s")
    print(f"  with pricing and breakers:    {best['with']:,.0f} decisions/s  "
          f"(ratio {best['with'] / best['without']:.3f}; every run: "
          f"{', '.join(f'{a:,.0f}/{b:,.0f}' for a, b in zip(rates['with'], rates['without'], strict=True))})")


def lookup_cost() -> None:
    rng = random.Random(7)
    numbers = [f"+{rng.choice(['44', '33', '49', '34', '31', '353', '252', '1'])}{rng.randrange(10**9):09d}"
               for _ in range(200_000)]
    lines = ["+,0.5,EUR,rest"] + [f"+{p},0.01,EUR,x" for p in sorted({str(rng.randrange(10, 10**6))
                                                                    for _ in range(60_000)})][:50_000]
    synthetic = parse_rate_deck("\n".join(lines), "synthetic")
    for name, deck in (("packaged sample", packaged_rate_deck()), ("synthetic", synthetic)):
        t0 = time.perf_counter()
        for e164 in numbers:
            deck.lookup(e164)
        took = time.perf_counter() - t0
        print(f"  RateDeck.lookup, {name} ({len(deck):,} lines, {len(deck._lengths)} lengths): "
              f"{took / len(numbers) * 1e9:,.0f} ns per number")


def money(seeds: list[int]) -> None:
    from detector.core.model import load_model

    model = load_model("models", "default")
    print("| seed | allowed | avoided (attacks stopped) | leaked (attacks allowed) | legitimate stopped "
          "| breaker deflections: unannounced surge / other legitimate / attack |")
    print("|---|---:|---:|---:|---:|---|")
    for seed in seeds:
        reqs, label, cfg = _day(seed)
        policy, _ = policy_with_campaigns(load_policy(), {}, campaign_windows(cfg))
        with simulator_intel() as intel:
            decisions = list(Detector(DecisionContext(policy, model=model), intel).process_many(reqs))
        allowed = avoided = leaked = legit_stopped = 0.0
        trips: Counter[str] = Counter()
        for d in decisions:
            scn = label[d.request_id]
            attack = not scn.startswith("legit")
            if d.action == "allow":
                allowed += d.expected_cost
                leaked += d.expected_cost if attack else 0.0
            elif attack:
                avoided += d.expected_cost
            else:
                legit_stopped += d.expected_cost
            if "spend_budget_exceeded" in d.reasons:
                trips["attack" if attack else "surge" if scn == "legit_surge" else "legit"] += 1
        print(f"| {seed} | {allowed:,.0f} EUR | {avoided:,.0f} EUR | {leaked:,.0f} EUR | "
              f"{legit_stopped:,.0f} EUR | {trips['surge']:,} / {trips['legit']:,} / {trips['attack']:,} |",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", default="601,602,603")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-money", action="store_true")
    args = ap.parse_args()
    tune_gc()
    step_cost(args.runs)
    lookup_cost()
    if not args.skip_money:
        money([int(s) for s in args.seeds.split(",")])


if __name__ == "__main__":
    main()
