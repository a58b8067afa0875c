"""The demo's dialer and web tier: agent capacity through the day, and what the pre-check answers.

:func:`decide_with_dialer` decides the day's requests with a simulated dialer in the loop
(:mod:`detector.sim.dialer`): every ``tick_s`` the dialer publishes its queue state, signed with
its own Ed25519 key; the state is verified as a worker verifies it (the dialer's public key
trusted, :class:`~detector.core.capacity.QueueStateVerifier`) and applied to the detector's
capacity gate before the requests at or after its time, exactly as ``detector replay
--queue-states`` applies a file of them (``detector.replay._with_queue_states``). The callbacks the
detector allows join the dialer's queue, so deflections drain it.

:func:`precheck_lines` asks :func:`detector.core.precheck.precheck` -- the function behind
``GET /v1/precheck`` -- about a few visitors of the day, against the end-of-day state.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from detector.core.capacity import (
    CapacityGate,
    CapacityPolicy,
    QueueStateSigner,
    QueueStateVerifier,
    trust_class,
)
from detector.core.ipintel import IpIntel
from detector.core.mask import mask_ip
from detector.core.pipeline import Detector
from detector.core.precheck import precheck
from detector.core.records import CallbackRequest, Decision
from detector.sim.dialer import DialerSim

TICK_S = 30.0  # the dialer publishes twice a minute (the policy's stale_after_s is 60 s)


@dataclass
class QueueSeries:
    """What the dialer published (signed wire dicts) and the tier each state put the gate in."""

    wire: list[dict[str, Any]] = field(default_factory=list)
    tiers: list[tuple[float, int, float, int, int]] = field(default_factory=list)
    # (ts, tier, pressure, callbacks_waiting, agents_available)


def decide_with_dialer(det: Detector, reqs: Sequence[CallbackRequest], dialer: DialerSim, *,
                       tick_s: float = TICK_S) -> tuple[list[Decision], QueueSeries]:
    """Every request's decision, with the dialer's signed queue state applied every ``tick_s``."""
    key = Ed25519PrivateKey.generate()  # the demo dialer's own key, for this run only
    signer, verifier = QueueStateSigner(key), QueueStateVerifier([key.public_key()])
    gate = det.ctx.capacity = CapacityGate()
    policy = det.ctx.policy.capacity
    series = QueueSeries()
    decisions: list[Decision] = []

    def decide(segment: list[CallbackRequest]) -> None:
        for d in det.process_many(segment):
            if d.action == "allow":
                dialer.admit()
            decisions.append(d)

    tick = dialer.start
    segment: list[CallbackRequest] = []
    for req in reqs:
        if req.ts >= tick:
            decide(segment)
            segment = []
            while tick <= req.ts:
                dialer.advance(tick)
                wire = signer.sign(dialer.state())
                state = verifier.verify(dialer.dialer_id.encode(), json.dumps(wire).encode(), now=tick)
                gate.apply(state, policy, received_at=tick)
                series.wire.append(wire)
                series.tiers.append((tick, gate.tier, gate.last_pressure, state.callbacks_waiting,
                                     state.agents_available))
                tick += tick_s
        segment.append(req)
    decide(segment)
    return decisions, series


def _hhmm(ts: float) -> str:
    return time.strftime("%H:%M", time.gmtime(ts))


@dataclass
class CapacitySummary:
    lines: list[str]
    minutes_over: float
    max_tier: int
    deflected: Counter[str]  # by trust class
    blocked: int  # agent_capacity on a block (must stay 0: capacity only deflects)
    after_drain: int  # agent_capacity deflections after the last episode ended (must be 0)


def _episodes(tiers: Sequence[tuple[float, int, float, int, int]], tick_s: float
              ) -> list[tuple[float, float, int]]:
    """(start, end, highest tier) of each stretch with a tier above 0."""
    out: list[tuple[float, float, int]] = []
    start, top = None, 0
    for ts, tier, *_ in tiers:
        if tier > 0 and start is None:
            start, top = ts, tier
        elif tier > 0:
            top = max(top, tier)
        elif start is not None:
            out.append((start, ts, top))
            start = None
    if start is not None:
        out.append((start, tiers[-1][0] + tick_s, top))
    return out


def capacity_lines(decisions: Sequence[Decision], reqs: dict[str, CallbackRequest],
                   label: dict[str, str], series: QueueSeries, dialer: DialerSim,
                   policy: CapacityPolicy, *, tick_s: float = TICK_S) -> CapacitySummary:
    episodes = _episodes(series.tiers, tick_s)
    minutes = sum(e - s for s, e, _ in episodes) / 60.0
    top = max((t for _, _, t in episodes), default=0)
    deflected: Counter[str] = Counter()
    who: Counter[str] = Counter()
    blocked = 0
    for d in decisions:
        if "agent_capacity" not in d.reasons:
            continue
        if d.action != "deflect":
            blocked += 1
            continue
        req = reqs[d.request_id]
        new_ip = bool(d.counts.get("ip_fresh"))
        deflected[trust_class(req.authenticated, new_ip, d.risk, policy)] += 1
        who["legitimate" if label.get(d.request_id, "").startswith("legit") else "attack"] += 1
    last_end = episodes[-1][1] if episodes else None
    after = 0 if last_end is None else sum(
        1 for d in decisions if d.request_ts >= last_end and "agent_capacity" in d.reasons)
    staffed = f"{min(dialer.staffing)}-{max(dialer.staffing)}"
    lines = ["", f"Agent capacity (a simulated dialer: {staffed} agents by half hour, "
                 f"{dialer.avg_handle_s:.0f} s a callback, signed queue state every {tick_s:.0f} s):"]
    if not episodes:
        lines.append("  the queue stayed within capacity all day: nothing deflected for agent capacity")
        return CapacitySummary(lines, 0.0, 0, deflected, blocked, 0)
    peak = max(series.tiers, key=lambda t: t[2])
    lines.append(f"  over capacity {minutes:,.0f} min in {len(episodes)} episode(s), highest tier {top}; "
                 f"peak {peak[3]:,} callbacks waiting for {peak[4]} agents at {_hhmm(peak[0])} UTC "
                 f"(pressure {peak[2]:.1f})")
    for s, e, t in episodes[:4]:
        lines.append(f"    {_hhmm(s)}-{_hhmm(e)} UTC  tier {t}")
    total = sum(deflected.values())
    lines.append(f"  deflected to chat (agent_capacity): {total:,} = "
                 f"{deflected['low']:,} low-trust (unauthenticated, new IP or risky), "
                 f"{deflected['unauthenticated']:,} other unauthenticated, "
                 f"{deflected['authenticated']:,} authenticated; "
                 f"{who['attack']:,} attack, {who['legitimate']:,} legitimate; {blocked:,} blocked")
    assert last_end is not None
    nxt = [d for d in decisions if last_end <= d.request_ts < last_end + 3600
           and label.get(d.request_id, "").startswith("legit")]
    served = sum(1 for d in nxt if d.action == "allow")
    lines.append(f"  queue drained at {_hhmm(last_end)} UTC: served again, {after:,} agent_capacity "
                 f"deflections after it; {served:,} of the next hour's {len(nxt):,} legitimate "
                 "requests allowed")
    return CapacitySummary(lines, minutes, top, deflected, blocked, after)


def pick_visitors(items: Sequence[Any], intel: IpIntel) -> list[tuple[str, str, bool]]:
    """(what, IP, authenticated) of a few illustrative visitors of the day: the busiest IP of a
    flood, an anonymiser or datacentre IP, and a customer (unauthenticated, then logged in)."""
    per_ip: Counter[tuple[str, str]] = Counter()
    for it in items:
        ip = it.request.get("ip")
        if isinstance(ip, str):
            per_ip[(it.scenario, ip)] += 1
    out: list[tuple[str, str, bool]] = []
    floods = [(n, ip, scn) for (scn, ip), n in per_ip.items() if scn.endswith("_flood")]
    if floods:
        n, ip, scn = max(floods)
        out.append((f"the busiest IP of a flood ({scn}, {n:,} requests)", ip, False))
    for (scn, ip), _ in sorted(per_ip.items()):
        info = intel.lookup(ip)
        if scn == "anonymous_ip" and (info.tor_exit or info.public_proxy or info.anonymous_vpn
                                      or info.hosting):
            out.append(("an anonymiser / datacentre IP (anonymous_ip)", ip, False))
            break
    legit = sorted(ip for (scn, ip) in per_ip if scn == "legit")
    if legit:
        ip = legit[len(legit) // 2]
        out.append(("a customer (legit), not logged in", ip, False))
        out.append(("the same customer, logged in", ip, True))
    return out


def precheck_lines(det: Detector, intel: IpIntel, visitors: Iterable[tuple[str, str, bool]],
                   now: float) -> tuple[list[str], list[dict[str, Any]]]:
    """What ``GET /v1/precheck`` would answer for each visitor at ``now`` (masked IPs only)."""
    lines = ["", f"Web pre-check (GET /v1/precheck, the same core function) at the end of the day "
                 f"({_hhmm(now)} UTC):"]
    answers = []
    for what, ip, auth in visitors:
        res = precheck(intel.lookup(ip), auth, det.ip_stores.ip.get(ip), det.ctx,
                       view=det.population, country=None, now=now)
        answers.append({"what": what, **res.to_dict()})
        shown = "show callback" if res.show_callback else "HIDE callback"
        why = ", ".join(res.reasons) or "-"
        lines.append(f"  {mask_ip(ip):<14} {what:<52} {shown}  reasons: {why}")
    lines.append('  on a worker (DETECTOR_PRECHECK_TOKEN set): curl -H "Authorization: Bearer '
                 '$DETECTOR_PRECHECK_TOKEN" "http://<worker>:6066/v1/precheck?ip=<ip>&authenticated=1"')
    return lines, answers


def write_queue_states(series: QueueSeries, path: Any) -> None:
    """The dialer's signed states as JSONL (``detector replay --queue-states`` reads them)."""
    with open(path, "w", encoding="utf-8") as fh:
        for wire in series.wire:
            fh.write(json.dumps(wire) + "\n")


__all__ = ["QueueSeries", "capacity_lines", "decide_with_dialer", "pick_visitors",
           "precheck_lines", "write_queue_states"]
