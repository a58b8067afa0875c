"""``detector backtest``: what a candidate policy (and/or model) would have changed on recorded traffic.

Recorded requests are replayed twice through the same :class:`~detector.core.pipeline.Detector`
(so the same ``decide_many``): once with the policy and model in use, once with the candidate,
each with its own fresh window state. Decisions are paired by request id and the changes
reported: transitions (allow -> deflect/block and back), by reason, by destination country and by
hour; with dialer outcomes, newly stopped requests whose call had completed with talk time
(likely false positives) and newly allowed ones an agent marked as spam; with labels, the stop
rate per scenario under both. Samples show masked numbers only.

From the decision log (``--from-log START END``) the stored decisions are re-decided from their
recorded enrichment and counts under both policies (the log keeps no raw IP, and no number unless
``DETECTOR_SINK_STORE_NUMBERS`` is on, so IP/number deny lists and denied prefixes can only act
where the number was stored; counts, including the outstanding-callback mark, are as recorded).
"""

from __future__ import annotations

import json
import marshal
import multiprocessing
import os
import sys
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from detector.core.decide import DecisionContext, Scorer, decide_many
from detector.core.errors import ConfigError, InputError
from detector.core.ipintel import IpIntel
from detector.core.lists import ListIndex
from detector.core.mask import mask_number
from detector.core.parse import parse_request, parse_ts
from detector.core.phone import time_zone_of
from detector.core.pipeline import Detector
from detector.core.policy import Policy, load_policy
from detector.core.population import PopulationCounts
from detector.core.records import (
    CallbackRequest,
    Counts,
    Decision,
    Enrichment,
    IpCounts,
    IpInfo,
    PhoneInfo,
    RangeCounts,
)
from detector.replay import decide_all

STOPPED = ("deflect", "block")
SAMPLES_PER_KIND = 8


@dataclass
class Change:
    request_id: str
    ts: float
    country: str
    number: str  # masked
    before: str
    after: str
    before_reasons: tuple[str, ...]
    after_reasons: tuple[str, ...]

    @property
    def kind(self) -> str:
        return f"{self.before}->{self.after}"

    def to_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "ts": self.ts, "country": self.country, "number": self.number,
                "before": self.before, "after": self.after, "before_reasons": list(self.before_reasons),
                "after_reasons": list(self.after_reasons)}


@dataclass
class BacktestReport:
    source: str
    baseline: dict[str, Any]  # policy / model versions
    candidate: dict[str, Any]
    requests: int = 0
    stopped_before: int = 0
    stopped_after: int = 0
    transitions: Counter[str] = field(default_factory=Counter)
    newly_stopped_by_reason: Counter[str] = field(default_factory=Counter)
    newly_allowed_by_reason: Counter[str] = field(default_factory=Counter)
    by_country: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    by_hour: dict[int, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    samples: dict[str, list[Change]] = field(default_factory=lambda: defaultdict(list))
    outcomes: dict[str, int] | None = None
    scenarios: dict[str, dict[str, Any]] | None = None
    # Money (expected cost, core/spend.py): allowed under each policy, and what the changes move.
    currency: str | None = None
    money_allowed_before: float = 0.0
    money_allowed_after: float = 0.0
    money_newly_stopped: float = 0.0  # the baseline's expected cost of requests newly stopped
    money_newly_allowed: float = 0.0  # the candidate's expected cost of requests newly allowed

    @property
    def newly_stopped(self) -> int:
        return sum(n for k, n in self.transitions.items() if k.startswith("allow->"))

    @property
    def newly_allowed(self) -> int:
        return sum(n for k, n in self.transitions.items() if k.endswith("->allow"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "baseline": self.baseline, "candidate": self.candidate,
            "requests": self.requests, "stopped_before": self.stopped_before,
            "stopped_after": self.stopped_after, "transitions": dict(self.transitions),
            "newly_stopped": self.newly_stopped, "newly_allowed": self.newly_allowed,
            "newly_stopped_by_reason": dict(self.newly_stopped_by_reason),
            "newly_allowed_by_reason": dict(self.newly_allowed_by_reason),
            "by_country": {k: dict(v) for k, v in sorted(self.by_country.items())},
            "by_hour": {_hour_label(h): dict(v) for h, v in sorted(self.by_hour.items())},
            "samples": {k: [c.to_dict() for c in v] for k, v in self.samples.items()},
            "outcomes": self.outcomes, "scenarios": self.scenarios,
            "money": {"currency": self.currency, "allowed_before": round(self.money_allowed_before, 4),
                      "allowed_after": round(self.money_allowed_after, 4),
                      "newly_stopped": round(self.money_newly_stopped, 4),
                      "newly_allowed": round(self.money_newly_allowed, 4)},
        }

    def render_text(self) -> str:
        n = max(self.requests, 1)
        lines = [
            f"backtest of {self.source}: {self.requests:,} requests",
            f"baseline  policy {self.baseline['policy']}, model {self.baseline['model'] or 'none'}: "
            f"{self.stopped_before:,} stopped ({self.stopped_before / n:.2%})",
            f"candidate policy {self.candidate['policy']}, model {self.candidate['model'] or 'none'}: "
            f"{self.stopped_after:,} stopped ({self.stopped_after / n:.2%})",
            f"newly stopped: {self.newly_stopped:,}   newly allowed: {self.newly_allowed:,}",
            "changes: " + (", ".join(f"{k}={v:,}" for k, v in self.transitions.most_common()) or "none"),
        ]
        if self.currency:
            cur = self.currency
            lines.append(f"money (expected cost): allowed {self.money_allowed_before:,.2f} {cur} -> "
                         f"{self.money_allowed_after:,.2f} {cur}; newly stopped "
                         f"{self.money_newly_stopped:,.2f} {cur}, newly allowed "
                         f"{self.money_newly_allowed:,.2f} {cur}")
        if self.newly_stopped_by_reason:
            lines.append("newly stopped, by reason: " + ", ".join(
                f"{r}={v:,}" for r, v in self.newly_stopped_by_reason.most_common(10)))
        if self.newly_allowed_by_reason:
            lines.append("newly allowed, reasons they had: " + ", ".join(
                f"{r}={v:,}" for r, v in self.newly_allowed_by_reason.most_common(10)))
        top = sorted(self.by_country.items(), key=lambda kv: -sum(kv[1].values()))[:8]
        if top:
            lines.append("by destination country: " + ", ".join(
                f"{cc} +{c['newly_stopped']}/-{c['newly_allowed']}" for cc, c in top))
        if self.outcomes is not None:
            o = self.outcomes
            lines.append(f"outcomes: {o['newly_stopped_completed']:,} newly stopped requests had a completed "
                         f"call with talk time (likely false positives); {o['newly_allowed_spam']:,} newly "
                         f"allowed ones were marked spam by an agent")
        if self.scenarios:
            lines.append(f"{'scenario':<24} {'n':>7} {'stop before':>12} {'stop after':>11}")
            for scn, s in self.scenarios.items():
                lines.append(f"{scn:<24} {s['requests']:>7,} {s['stop_before']:>12.1%} "
                             f"{s['stop_after']:>11.1%}")
        for kind, samples in self.samples.items():
            lines.append(f"samples {kind}:")
            for c in samples[:3]:
                lines.append(f"  {c.request_id}  {c.number:<20} {c.country:<3} "
                             f"{','.join(c.before_reasons) or '-'} => {','.join(c.after_reasons) or '-'}")
        return "\n".join(lines)


def _hour_label(h: int) -> str:
    return datetime.fromtimestamp(h * 3600, UTC).strftime("%Y-%m-%d %H:00")


def compare(
    pairs: Iterable[tuple[Decision, Decision | Side]], report: BacktestReport,
    outcomes: dict[str, dict[str, Any]] | None = None, labels: dict[str, str] | None = None,
) -> BacktestReport:
    """Fill ``report`` from (baseline, candidate) decisions of the same requests."""
    scen: dict[str, Counter[str]] = defaultdict(Counter)
    o_fp = o_fn = 0
    for a, b in pairs:
        report.requests += 1
        before, after = str(a.action), str(b.action)
        report.stopped_before += before != "allow"
        report.stopped_after += after != "allow"
        report.currency = report.currency or a.currency or b.currency
        report.money_allowed_before += a.expected_cost if before == "allow" else 0.0
        report.money_allowed_after += b.expected_cost if after == "allow" else 0.0
        if labels is not None:
            c = scen[labels.get(a.request_id, "unlabelled")]
            c["requests"] += 1
            c["before"] += before != "allow"
            c["after"] += after != "allow"
        if before == after:
            continue
        change = Change(a.request_id, a.request_ts, str(a.enrichment.get("number_country") or "??"),
                        mask_number(a.enrichment.get("e164")), before, after, a.reasons, b.reasons)
        report.transitions[change.kind] += 1
        hour = int(a.request_ts // 3600)
        if before == "allow":
            report.money_newly_stopped += a.expected_cost
            report.newly_stopped_by_reason.update(b.reasons)
            report.by_country[change.country]["newly_stopped"] += 1
            report.by_hour[hour]["newly_stopped"] += 1
            o = (outcomes or {}).get(a.request_id)
            if o and o.get("outcome") == "completed" and float(o.get("duration_s") or 0) > 0:
                o_fp += 1
        elif after == "allow":
            report.money_newly_allowed += b.expected_cost
            report.newly_allowed_by_reason.update(a.reasons)
            report.by_country[change.country]["newly_allowed"] += 1
            report.by_hour[hour]["newly_allowed"] += 1
            o = (outcomes or {}).get(a.request_id)
            if o and o.get("outcome") == "agent_marked_spam":
                o_fn += 1
        else:
            report.by_country[change.country]["changed_stop"] += 1
            report.by_hour[hour]["changed_stop"] += 1
        if len(report.samples[change.kind]) < SAMPLES_PER_KIND:
            report.samples[change.kind].append(change)
    if outcomes is not None:
        report.outcomes = {"newly_stopped_completed": o_fp, "newly_allowed_spam": o_fn,
                           "outcomes_read": len(outcomes)}
    if labels is not None:
        report.scenarios = {
            s: {"requests": c["requests"], "stop_before": c["before"] / c["requests"],
                "stop_after": c["after"] / c["requests"]}
            for s, c in sorted(scen.items(), key=lambda kv: (kv[0].startswith("legit"), kv[0]))
        }
    return report


class Side(NamedTuple):
    """What :func:`compare` reads of a candidate decision (all it needs of that side; the
    baseline side's enrichment and timestamps are read from the baseline decision)."""

    action: str
    reasons: tuple[str, ...]
    expected_cost: float
    currency: str | None


def side_of(d: Decision) -> Side:
    return Side(str(d.action), d.reasons, d.expected_cost, d.currency)


def replay_both(
    requests: Sequence[CallbackRequest], base: DecisionContext, cand: DecisionContext,
    intel: IpIntel, *, jobs: int = 1,
) -> list[tuple[Decision, Decision | Side]]:
    """Both runs through the same detector code, each with fresh state, paired in request order.

    ``jobs=2``: the candidate's run in a second process (forked, so it starts from this one's
    contexts and requests without copying them) while this one runs the baseline: about half
    the wall time on two cores. That process sends back each decision's :class:`Side` only
    (a whole decision costs ~20 us to send and rebuild, a fifth of deciding it)."""
    reqs = sorted(requests, key=lambda r: r.ts)
    if jobs < 2:
        a = decide_all(Detector(base, intel), reqs)
        b = decide_all(Detector(cand, intel), reqs)
        return list(zip(a, b, strict=True))
    with _Forked(lambda: [tuple(side_of(d)) for d in decide_all(Detector(cand, intel), reqs)]) as child:
        a = decide_all(Detector(base, intel), reqs)
        sides = [Side._make(s) for s in child.result()]
    return list(zip(a, sides, strict=True))


def default_jobs() -> int:
    """2 where the candidate can run beside the baseline: Linux (fork) with two usable CPUs."""
    if sys.platform != "linux" or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return 2 if len(os.sched_getaffinity(0)) >= 2 else 1


class _Forked:
    """Run ``fn`` (returning what ``marshal`` sends: exact tuples, lists, strings, numbers) in a
    forked child process; :meth:`result` waits for its value. An error in the child is raised
    here with its traceback's text; a child that dies is an error too. Leaving the block early
    (an error here) stops the child."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._fn = fn
        mp = multiprocessing.get_context("fork")
        self._recv, self._send = mp.Pipe(duplex=False)
        self._proc = mp.Process(target=self._run, name="backtest-candidate", daemon=True)

    def _run(self) -> None:  # in the child
        self._recv.close()
        try:
            payload = marshal.dumps((True, self._fn()))
        except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
            payload = marshal.dumps((False, traceback.format_exc()))
        self._send.send_bytes(payload)
        self._send.close()

    def __enter__(self) -> _Forked:
        self._proc.start()
        self._send.close()  # the child holds the only write end: its exit ends our read
        return self

    def result(self) -> Any:
        try:
            # our own forked child over an anonymous pipe: nothing else can write it
            ok, value = marshal.loads(self._recv.recv_bytes())  # noqa: S302
        except EOFError:
            self._proc.join()
            raise RuntimeError(f"backtest: the candidate's replay process exited with code "
                               f"{self._proc.exitcode} before sending its decisions") from None
        if not ok:
            raise RuntimeError(f"backtest: the candidate's replay failed in its process:\n{value}")
        return value

    def __exit__(self, *exc: object) -> None:
        if self._proc.is_alive() and exc[0] is not None:
            self._proc.terminate()
        self._proc.join()
        self._recv.close()


def read_requests(path: Path) -> list[CallbackRequest]:
    """Valid requests of a JSONL file (invalid lines are what the worker dead-letters: skipped),
    one per request id."""
    out: dict[str, CallbackRequest] = {}
    with path.open("rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                req = parse_request(line)
            except InputError:
                continue
            out.setdefault(req.request_id, req)
    return list(out.values())


def read_jsonl_by_id(path: Path, what: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{n}: {what} line is not JSON: {exc}") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get("request_id"), str):
            raise ConfigError(f"{path}:{n}: expected a {what} object with a request_id")
        out[obj["request_id"]] = obj
    return out


# --------------------------------------------------------------------------- from the decision log


def _from_row(row: dict[str, Any]) -> tuple[CallbackRequest, Enrichment, Counts]:
    enr = row.get("enrichment") or {}
    e164 = row.get("number_e164")
    phone = PhoneInfo(e164, True, True, bool(enr.get("number_valid")), enr.get("number_country"), None,
                      str(enr.get("number_type") or "UNKNOWN"),
                      e164[:-3] if e164 else None, time_zone=time_zone_of(e164))  # fmt: skip
    flags = set(enr.get("anonymity") or ())
    ip = IpInfo("", 4, str(enr.get("ip_scope") or "global"), enr.get("ip_country"), enr.get("asn"),
                anonymous_vpn="anonymous_vpn" in flags, tor_exit="tor_exit" in flags,
                public_proxy="public_proxy" in flags, residential_proxy="residential_proxy" in flags,
                hosting="hosting" in flags)
    c = row.get("counts") or {}
    rng: dict[str, Any] = {k: int(c.get(k, 0)) for k in RangeCounts.__slots__ if k != "pending"}  # type: ignore[attr-defined]
    pop_defaults = PopulationCounts()
    pop = PopulationCounts(**{k: type(getattr(pop_defaults, k))(c.get(k, getattr(pop_defaults, k)))
                              for k in PopulationCounts.__slots__})  # type: ignore[attr-defined]
    counts = Counts(IpCounts(**{k: int(c.get(k, 0)) for k in IpCounts.__slots__}),  # type: ignore[attr-defined]
                    RangeCounts(**rng, pending=bool(c.get("pending"))), pop)
    req = CallbackRequest(row["request_id"], float(row["request_ts"]), e164 or "", "",
                          authenticated=False)
    return req, Enrichment(phone, ip), counts


def redecide_rows(rows: Sequence[dict[str, Any]], base: DecisionContext, cand: DecisionContext
                  ) -> list[tuple[Decision, Decision]]:
    """Re-decide decision-log rows under both contexts. Decisions are priced, but no spend
    breaker acts: the log holds no spend history to replay them against."""
    items = [_from_row(r) for r in rows]
    ats = [r["decided_at"] for r in rows]
    a = decide_many(items, base, decided_at=0.0, decided_ats=ats)
    b = decide_many(items, cand, decided_at=0.0, decided_ats=ats)
    return list(zip(a, b, strict=True))


# --------------------------------------------------------------------------- CLI glue


def _ctx(policy: Policy, base_lists: ListIndex, model: Scorer | None, pii_key: bytes,
         rates: Any = None) -> DecisionContext:
    lists = ListIndex.from_policy(dict(policy.deny), dict(policy.allow))
    for e in base_lists.entries():
        if e.source != "policy":
            lists.add(e)
    ctx = DecisionContext(policy=policy, lists=lists, model=model, pii_key=pii_key)
    if rates is not None:
        ctx.rates = rates
    return ctx


def _epoch(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return parse_ts(text)


def backtest_cli(settings: Any, args: Any) -> BacktestReport:
    from detector.core.model import load_model
    from detector.runtime import build_context, build_intel

    base_ctx = build_context(settings)
    candidate = load_policy(args.candidate)
    base_model = cand_model = None
    if not getattr(args, "no_model", False):
        try:
            base_model = load_model(settings.models_dir, settings.model_name)
        except Exception as exc:  # noqa: BLE001 - a missing model is said, not fatal
            raise ConfigError(f"backtest: cannot load model {settings.model_name!r}: {exc} "
                              "(use --no-model for rules only)") from exc
        cand_model = (load_model(settings.models_dir, args.candidate_model)
                      if args.candidate_model else base_model)
    key = settings.pii_hash_key.encode("utf-8")
    base = _ctx(base_ctx.policy, base_ctx.lists, base_model, key, base_ctx.rates)
    cand = _ctx(candidate, base_ctx.lists, cand_model, key, base_ctx.rates)
    outcomes = read_jsonl_by_id(args.outcomes, "outcome") if args.outcomes else None
    labels = ({k: str(v.get("scenario")) for k, v in read_jsonl_by_id(args.labels, "label").items()}
              if args.labels else None)
    versions = ({"policy": base.policy.version, "model": getattr(base_model, "version", None)},
                {"policy": candidate.version, "model": getattr(cand_model, "version", None)})
    if args.from_log:
        from detector.sink.store import open_store

        start, end = (_epoch(t) for t in args.from_log)
        with open_store(settings.sink_db) as store:
            rows = list(store.between(start, end))
            if outcomes is None:
                outcomes = {r["request_id"]: {"outcome": r["outcome"], "duration_s": r["outcome_duration_s"]}
                            for r in rows if r.get("outcome")}
        pairs: Sequence[tuple[Decision, Decision | Side]] = redecide_rows(rows, base, cand)
        source = f"decision log {args.from_log[0]} .. {args.from_log[1]}"
    else:
        if args.requests is None:
            raise ConfigError("backtest needs REQUESTS.jsonl or --from-log START END")
        intel = build_intel(settings)
        jobs = getattr(args, "jobs", None) or default_jobs()
        pairs = replay_both(read_requests(args.requests), base, cand, intel, jobs=jobs)
        intel.close()
        source = str(args.requests)
    report = compare(pairs, BacktestReport(source, *versions), outcomes, labels)
    if args.html:
        from detector.backtest_html import write_html

        write_html(report, args.html)
    if args.json_out:
        args.json_out.write_text(json.dumps(report.to_dict(), indent=1), encoding="utf-8")
    return report
