"""``detector explain``: one decision from the decision log, in words a support agent can read.

Each reason gets a sentence; a velocity or distinct-count reason names the count from the
decision's ``counts`` and the threshold it crossed, taken from the policy in use (a warning says
so when the decision was made under another policy version). The model's top features, the
silent flag, monitored rules, and the dialer's outcome follow.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from detector.core.decide import VELOCITY_RULES
from detector.core.policy import Policy

SENTENCES = {
    "invalid_number": "the number is not a valid phone number",
    "destination_not_allowed": "the number's country ({number_country}) is not one we call back",
    "denied_prefix": "the number starts with a prefix we never call (premium rate / revenue-share)",
    "anonymous_ip": "the request came through Tor or a public/residential proxy",
    "vpn_ip": "the request came through a consumer VPN",
    "hosting_ip": "the request came from a hosting provider (a server, not a home or phone)",
    "geo_mismatch": "the visitor's IP country ({ip_country}) differs from the number's ({number_country})",
    "ip_not_global": "the IP address is private or reserved (the web tier forwards the wrong address)",
    "unauthenticated": "the visitor was not logged in",
    "duplicate_pending": "a callback to this number was already on its way",
    "anomalous_pattern": "the model found the request unlike normal traffic",
    "combined_risk": "several weaker signals together crossed the risk threshold",
    "agent_capacity": "the callback queue was over what the agents could serve in time "
                      "(agent-capacity protection): the visitor was offered chat instead",
}
LIST_KINDS = {"ip": "IP address", "cidr": "IP network", "asn": "network (ASN)", "number": "number",
              "prefix": "number prefix", "country": "country"}
COUNT_WORDS = {
    "number": "requests to this number", "ip": "requests from this IP",
    "pair": "requests from this IP to this number",
    "range": "requests to this number's range",
    "ip_distinct_numbers": "different numbers from this IP",
    "number_distinct_ips": "different IPs for this number",
    "range_distinct_ips": "different IPs for this number range",
    "range_distinct_numbers": "different numbers in this range",
    "ip_distinct_countries": "phone countries from this IP",
}
WINDOWS = {"15m": "15 minutes", "1h": "1 hour", "24h": "24 hours"}


def _count_sentence(key: str, count: Any, limit: int) -> str:
    base, _, window = key.rpartition("_")
    return f"{count} {COUNT_WORDS.get(base, base)} in {WINDOWS.get(window, window)} (limit {limit})"


def reason_details(code: str, row: dict[str, Any], policy: Policy) -> dict[str, Any]:
    """One reason: its code, a sentence, and the counts/thresholds it crossed."""
    enr = row.get("enrichment") or {}
    counts = row.get("counts") or {}
    crossed: list[dict[str, Any]] = [
        {"count_key": key, "count": counts.get(attr), "threshold": policy.velocity[key]}
               for key, attr, rc in VELOCITY_RULES
               if rc == code and key in policy.velocity and isinstance(counts.get(attr), int)
               and counts[attr] > policy.velocity[key]]
    if crossed:
        text = "; ".join(_count_sentence(c["count_key"], c["count"], c["threshold"]) for c in crossed)
    elif code.startswith("denylist_"):
        text = f"the {LIST_KINDS.get(code[9:], code[9:])} is on a deny list (SOC, learned or policy entry)"
    elif code.startswith("number_type_"):
        text = f"the number is a {code[12:].replace('_', ' ')} number"
    elif code in SENTENCES:
        fmt = {"number_country": enr.get("number_country") or row.get("number_country") or "?",
               "ip_country": enr.get("ip_country") or row.get("ip_country") or "?"}
        text = SENTENCES[code].format(**fmt)
    elif code == "spend_budget_exceeded":
        text = _budget_sentence(row)
    elif "surge" in code or "attack" in code:
        text = f"surge / under-attack mode applied ({code})"
    else:
        text = f"rule {code} fired (see the policy)"
    rule = policy.rules.get(code)
    return {"code": code, "text": text, "crossed": crossed,
            "rule_action": None if rule is None else str(rule.action)}


def _budget_sentence(row: dict[str, Any]) -> str:
    b = row.get("budget") or {}
    cur = row.get("currency") or ""
    if not b:
        return "the spend budget of the destination was exhausted (spend circuit breaker open)"
    return (f"allowed spend to {b.get('kind', 'scope')} {b.get('scope', '?')} reached its budget "
            f"(spend circuit breaker open): {b.get('spend_1h', 0):.2f} {cur} in the last hour "
            f"(budget {b.get('limit_1h', 0):.2f}), {b.get('spend_24h', 0):.2f} in 24 hours "
            f"(budget {b.get('limit_24h', 0):.2f}; {b.get('source', 'default')} budget)")


def explain_row(row: dict[str, Any], policy: Policy) -> dict[str, Any]:
    """The JSON form of ``detector explain`` for one decision-log row."""
    reasons = [r for r in str(row.get("reasons") or "").split(",") if r]
    monitored = [r for r in str(row.get("monitored_reasons") or "").split(",") if r]
    model = row.get("model") or {}
    out: dict[str, Any] = {
        "request_id": row["request_id"],
        "decided_at": row["decided_at"],
        "action": row["action"],
        "silent": bool(row["silent"]),
        "risk": row["risk"],
        "number": row.get("number_e164") or row.get("number_masked"),
        "number_country": row.get("number_country"),
        "policy_version": row["policy_version"],
        "thresholds_from_policy": policy.version,
        "policy_matches": policy.version == row["policy_version"],
        "reasons": [reason_details(r, row, policy) for r in reasons],
        "monitored_reasons": [reason_details(r, row, policy) for r in monitored],
        "model": {"version": row.get("model_version"), "anomaly": model.get("anomaly"),
                  "is_anomalous": model.get("is_anomalous"), "top_features": model.get("top_features") or []},
        "cost": {"cost_per_min": row.get("cost_per_min"), "expected_cost": row.get("expected_cost"),
                 "currency": row.get("currency"), "budget": row.get("budget"),
                 "legit_minutes": policy.spend.legit_minutes, "pumped_minutes": policy.spend.pumped_minutes},
        "outcome": None if not row.get("outcome") else {
            "outcome": row["outcome"], "ts": row.get("outcome_ts"),
            "duration_s": row.get("outcome_duration_s")},
    }
    return out


def _when(ts: float | None) -> str:
    return "?" if ts is None else datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


ACTION_WORDS = {"allow": "ALLOWED: the callback was placed in the dialer's queue",
                "deflect": "DEFLECTED: not called back; the visitor was offered chat or a number to call",
                "block": "BLOCKED: not called back"}


def render(ex: dict[str, Any]) -> str:
    """The text form of :func:`explain_row`."""
    lines = [f"Request {ex['request_id']}  ({_when(ex['decided_at'])}, number {ex['number']}, "
             f"{ex['number_country'] or 'unknown country'})",
             ACTION_WORDS.get(ex["action"], ex["action"]) + f"  (risk {ex['risk']:.2f})"]
    if ex["action"] != "allow":
        lines.append("Silent: yes: the visitor was told the callback was booked" if ex["silent"]
                     else "Silent: no: the visitor was told we could not call back")
    if ex["reasons"]:
        lines.append("Why:")
        lines += [f"  - {r['code']}: {r['text']}" for r in ex["reasons"]]
    else:
        lines.append("Why: no rule fired")
    m = ex["model"]
    if m.get("anomaly") is not None:
        feats = ", ".join(m["top_features"]) or "none stood out"
        lines.append(f"Model {m['version']}: anomaly {m['anomaly']:.2f}"
                     f"{' (over its threshold)' if m['is_anomalous'] else ''}; top features: {feats}")
    if ex["monitored_reasons"]:
        lines.append("Monitored rules (reported only, they did not change the decision):")
        lines += [f"  - {r['code']}: {r['text']}" for r in ex["monitored_reasons"]]
    c = ex.get("cost") or {}
    cur = c.get("currency") or ""
    if c.get("cost_per_min") is not None:
        lines.append(f"Cost: {c['cost_per_min']:.4f} {cur}/min; expected {c.get('expected_cost') or 0:.2f} "
                     f"{cur} (risk-weighted between {c['legit_minutes']:g} min for a legitimate callback "
                     f"and {c['pumped_minutes']:g} min for a pumped one)")
        b = c.get("budget")
        if b and "spend_budget_exceeded" not in {r["code"] for r in ex["reasons"]}:
            lines.append(f"Spend budget ({b['kind']} {b['scope']}): {b['spend_1h']:.2f} of "
                         f"{b['limit_1h']:.2f} {cur} in the last hour, {b['spend_24h']:.2f} of "
                         f"{b['limit_24h']:.2f} in 24 hours")
    elif cur:  # priced, but the deck has no rate for it (or the number is not valid)
        lines.append("Cost: unknown (not a valid number, or no rate for it in the rate deck)")
    o = ex["outcome"]
    lines.append("Dialer outcome: " + ("none reported" if o is None else
                 f"{o['outcome']} at {_when(o['ts'])}, {o['duration_s']:.0f} s talk time"))
    if not ex["policy_matches"]:
        lines.append(f"Note: decided under policy {ex['policy_version']}; thresholds shown are from "
                     f"{ex['thresholds_from_policy']} (the policy configured here).")
    return "\n".join(lines)
