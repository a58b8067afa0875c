"""``detector demo``: a realistic mixed day through the detector, no services, no downloads.

Generates labelled traffic with the simulator, builds the simulator's small synthetic IP
databases, replays the day through the same decide function as the stream path (with the shipped
model when present) with a simulated dialer publishing its signed queue state (agent capacity,
:mod:`detector.demo_capacity`), and prints what a SOC analyst would want to see first, down to
what the web tier's pre-check would answer for a few visitors at the end of the day.
"""

from __future__ import annotations

import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detector.core.decide import DecisionContext
from detector.core.ipintel import IpIntel
from detector.core.pipeline import Detector
from detector.core.records import CallbackRequest, Decision
from detector.demo_capacity import CapacitySummary


def mask_range(range_key: str | None) -> str:
    """A range key with its middle digits masked, safe for a report.

    >>> mask_range("+252901234")
    '+2529••234xxx'
    """
    if not range_key or range_key.startswith("?"):
        return "(unparseable)"
    head, tail = range_key[:5], range_key[-3:] if len(range_key) > 8 else ""
    middle = "•" * max(len(range_key) - len(head) - len(tail), 0)
    return f"{head}{middle}{tail}xxx"


@dataclass
class DemoResult:
    text: str
    scenario_stop: dict[str, float]
    legit_allow: float
    legit_served: float
    decisions: int
    money_saved: float = 0.0  # expected cost of the attack requests stopped (rate deck, core/spend.py)
    money_leaked: float = 0.0  # ... of the attack requests allowed
    currency: str | None = None
    capacity: CapacitySummary | None = None  # agent capacity with the simulated dialer
    precheck: list[dict[str, Any]] = field(default_factory=list)  # the pre-check's answers


def run_demo(
    ctx: DecisionContext,
    *,
    seed: int = 7,
    legit_per_day: int = 20_000,
    attack_scale: float = 1.0,
    model_note: str = "",
    log_db: str | None = None,
    out_dir: Path | None = None,
) -> DemoResult:
    """``log_db``: also write the decisions to this decision log (``detector explain`` reads it);
    ``out_dir``: also write the day's requests and labels there (``detector backtest`` input)."""
    from detector.sim import SimConfig, build_ip_databases, simulate

    cfg = SimConfig(seed=seed, legit_per_day=legit_per_day, attack_scale=attack_scale)
    items = simulate(cfg)
    # The business declared its marketing campaign for the day, as it should (`[[campaigns]]`):
    # the announced surge is expected traffic; the unannounced one puts its country in
    # under-attack mode (its unauthenticated requests are deflected, never blocked).
    from dataclasses import replace

    from detector.evaluate import policy_with_campaigns
    from detector.sim import campaign_windows

    policy, _ = policy_with_campaigns(ctx.policy, {}, campaign_windows(cfg))
    ctx = replace(ctx, policy=policy)
    with tempfile.TemporaryDirectory(prefix="detector-demo-") as tmp:
        dbs = build_ip_databases(Path(tmp))
        intel = IpIntel.from_paths(
            country_db=dbs["country"],
            asn_db=dbs["asn"],
            anonymous_db=dbs["anonymous"],
            hosting_asn_file=dbs.get("hosting_asns"),
        )
        det = Detector(ctx, intel)
        label = {}
        reqs: list[CallbackRequest] = []
        from detector.core.parse import parse_request

        for it in items:
            req = parse_request(it.request)
            label[req.request_id] = it.scenario
            reqs.append(req)
        reqs.sort(key=lambda r: r.ts)
        # The contact centre's dialer, in the loop: staffed for the day's forecast (the legitimate
        # demand with the announced campaign, not the unannounced surge), publishing its signed
        # queue state every 30 s; the callbacks allowed join its queue (detector/demo_capacity.py).
        from detector.demo_capacity import (
            capacity_lines,
            decide_with_dialer,
            pick_visitors,
            precheck_lines,
        )
        from detector.sim.dialer import DialerSim, staffing_from_forecast

        forecast = (r.ts for r in reqs if label[r.request_id].startswith("legit")
                    and label[r.request_id] != "legit_surge")
        dialer = DialerSim("demo-dialer", staffing_from_forecast(forecast, cfg.start), cfg.start)
        decisions, series = decide_with_dialer(det, reqs, dialer)
        capacity = capacity_lines(decisions, {r.request_id: r for r in reqs}, label, series, dialer,
                                  ctx.policy.capacity)
        pre_lines, answers = precheck_lines(det, intel, pick_visitors(items, intel), cfg.end - 1)
        intel.close()
    deck = ctx.rates
    deck_note = "" if deck is None else f"{deck.currency}, " + (
        "the packaged ILLUSTRATIVE sample rate deck, not a real tariff" if "packaged" in deck.source
        else f"rate deck {deck.source}")
    result = summarize(decisions, label, model_note=model_note, deck_note=deck_note)
    result.text += "\n" + "\n".join([*capacity.lines, *pre_lines])
    result.capacity, result.precheck = capacity, answers
    if log_db is not None or out_dir is not None:
        from detector.demo_log import write_demo_outputs

        result.text += "\n" + write_demo_outputs(items, decisions, ctx, log_db, out_dir)
        if out_dir is not None:
            from detector.demo_capacity import write_queue_states

            states = out_dir / "demo-queue-states.jsonl"
            write_queue_states(series, states)
            result.text += (f"\n  the dialer's {len(series.wire):,} signed queue states: {states} "
                            "(detector replay --queue-states)")
    return result


def summarize(
    decisions: list[Decision], label: dict[str, str], *, model_note: str = "", deck_note: str = ""
) -> DemoResult:
    by_action = Counter(str(d.action) for d in decisions)
    silent = sum(1 for d in decisions if d.silent)
    reasons: Counter[str] = Counter()
    dup_pending: Counter[str] = Counter()  # silent blocks whose only reason is an outstanding callback
    per_scn: dict[str, Counter[str]] = defaultdict(Counter)
    ranges: Counter[str] = Counter()
    range_cc: dict[str, str] = {}
    for d in decisions:
        reasons.update(d.reasons)
        per_scn[label.get(d.request_id, "?")][str(d.action)] += 1
        if d.reasons == ("duplicate_pending",):
            dup_pending[label.get(d.request_id, "?")] += 1
        if d.action != "allow":
            rk = str(d.enrichment.get("range_key") or "")
            ranges[rk] += 1
            range_cc[rk] = d.enrichment.get("number_country") or "??"
    total = len(decisions)
    out = [
        f"Callback-fraud detector demo: {total:,} requests in one simulated day {model_note}".rstrip(),
        "",
        "Decisions by action:",
    ]
    for a in ("allow", "deflect", "block"):
        n = by_action.get(a, 0)
        out.append(f"  {a:<8} {n:>7,}  {100 * n / max(total, 1):5.1f}%")
    out.append(f"  (of which silent: {silent:,})")
    out += ["", "Top reasons:"]
    for r, n in reasons.most_common(15):
        out.append(f"  {r:<28} {n:>7,}")
    out += [
        "",
        f"{'scenario':<24} {'requests':>8} {'allowed':>8} {'deflected':>9} {'blocked':>8} {'stopped':>8}",
    ]
    stop: dict[str, float] = {}
    legit_n = legit_allowed = legit_dup = 0
    for scn in sorted(per_scn, key=lambda s: (not s.startswith("legit"), s)):
        c = per_scn[scn]
        n = sum(c.values())
        stopped = n - c["allow"]
        stop[scn] = stopped / n if n else 0.0
        if scn.startswith("legit") and scn != "legit_surge":  # the unannounced surge: below
            legit_n += n
            legit_allowed += c["allow"]
            legit_dup += dup_pending[scn]
        out.append(
            f"{scn:<24} {n:>8,} {c['allow']:>8,} {c['deflect']:>9,} {c['block']:>8,} "
            f"{100 * stop[scn]:>7.1f}%"
        )
    legit_allow = legit_allowed / legit_n if legit_n else 0.0
    served = (legit_allowed + legit_dup) / legit_n if legit_n else 0.0
    out += [
        "",
        f"Legitimate requests allowed: {100 * legit_allow:.2f}% ({legit_allowed:,} of {legit_n:,})",
        f"Legitimate requests served:  {100 * served:.2f}% (allowed, or a silent duplicate of a callback "
        f"already on its way: {legit_dup:,})",
    ]
    if "legit_surge" in per_scn:
        c = per_scn["legit_surge"]
        out.append(f"Unannounced marketing surge (not in the figures above): {sum(c.values()):,} requests, "
                   f"{c['deflect']:,} deflected to chat while its country was in under-attack mode "
                   "(declare campaigns in the policy's [[campaigns]])")
    out += ["", "Top offending number ranges (masked):"]
    for rk, n in ranges.most_common(8):
        out.append(f"  {mask_range(rk):<22} {range_cc.get(rk, '??'):<3} {n:>6,} stopped")
    money = _money_lines(decisions, label, deck_note)
    out += money.lines
    return DemoResult("\n".join(out), stop, legit_allow, served, total, money.saved, money.leaked,
                      money.currency)


@dataclass
class _Money:
    lines: list[str]
    saved: float
    leaked: float
    currency: str | None


def _money_lines(decisions: list[Decision], label: dict[str, str], deck_note: str) -> _Money:
    """Estimated money saved: the expected cost (rate deck x risk-weighted minutes) of the attack
    requests stopped; and what was allowed, by whom."""
    currency = next((d.currency for d in decisions if d.currency), None)
    if currency is None:
        return _Money([], 0.0, 0.0, None)
    saved_by: dict[str, float] = defaultdict(float)
    leaked, legit_allowed, legit_stopped = 0.0, 0.0, 0.0
    breaker: Counter[str] = Counter()
    for d in decisions:
        scn = label.get(d.request_id, "?")
        attack = not scn.startswith("legit")
        if d.action == "allow":
            if attack:
                leaked += d.expected_cost
            else:
                legit_allowed += d.expected_cost
        elif attack:
            saved_by[scn] += d.expected_cost
        else:
            legit_stopped += d.expected_cost
        if "spend_budget_exceeded" in d.reasons:
            breaker["attack" if attack else "surge" if scn == "legit_surge" else "legit"] += 1
    saved = sum(saved_by.values())
    top = ", ".join(f"{s} {v:,.0f}" for s, v in sorted(saved_by.items(), key=lambda kv: -kv[1])[:3])
    lines = ["", f"Estimated money ({deck_note}; expected cost = rate x risk-weighted minutes):",
             f"  saved: attack callbacks stopped   {saved:>12,.2f} {currency}  ({top})",
             f"  leaked: attack callbacks allowed  {leaked:>12,.2f} {currency}",
             f"  legitimate callbacks allowed      {legit_allowed:>12,.2f} {currency}"
             f"  (legitimate requests deflected or blocked: {legit_stopped:,.2f})",
             f"  spend circuit breakers: {sum(breaker.values()):,} requests deflected "
             f"(spend_budget_exceeded: {breaker['attack']:,} attack, {breaker['surge']:,} unannounced "
             f"surge, {breaker['legit']:,} other legitimate)"]
    return _Money(lines, saved, leaked, currency)
