"""Per-scenario evaluation: replay labelled traffic three ways (rules only, model only, combined).

Each mode replays the whole day through a fresh :class:`~detector.core.pipeline.Detector`, so the
window counts and outstanding-callback state are those the mode itself produces. A request that
does not parse is dead-lettered by the worker: it is counted as *rejected* (stopped).

Rates (per scenario and mode): ``stop = (deflected + blocked + rejected) / requests`` and
``allow = allowed / requests``. For legitimate traffic a *visit* (one browser session asking for a
callback, possibly several times) is **served** when at least one of its requests was allowed:
an impatient customer's repeat submissions are blocked as duplicates of the outstanding callback
by design, so per-request allow rates understate what the customer gets.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from detector.core.decide import DecisionContext, Scorer
from detector.core.errors import ConfigError, InputError
from detector.core.ipintel import IpIntel
from detector.core.lists import ListIndex
from detector.core.parse import parse_request
from detector.core.pipeline import Detector
from detector.core.policy import Policy, load_policy
from detector.core.records import Action, CallbackRequest, Decision

MODES: tuple[str, ...] = ("rules", "model", "combined")
LEGIT_VISITS = "legit customers (visits)"


class Labelled(Protocol):
    """A request (wire-format dict) with its ground truth; the simulator's ``LabeledRequest``."""

    @property
    def request(self) -> dict[str, Any]: ...
    @property
    def scenario(self) -> str: ...
    @property
    def attack(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class LabelledRow:
    """A :class:`Labelled` read from JSONL files."""

    request: dict[str, Any]
    scenario: str
    attack: bool


@dataclass
class Tally:
    """Outcomes of one scenario under one mode."""

    requests: int = 0
    allowed: int = 0
    deflected: int = 0
    blocked: int = 0
    rejected: int = 0  # did not parse: dead-lettered

    def add(self, action: Action | None) -> None:
        self.requests += 1
        if action is None:
            self.rejected += 1
        elif action == Action.ALLOW:
            self.allowed += 1
        elif action == Action.DEFLECT:
            self.deflected += 1
        else:
            self.blocked += 1

    @property
    def stopped(self) -> int:
        return self.requests - self.allowed

    @property
    def stop_rate(self) -> float:
        return self.stopped / self.requests if self.requests else 0.0

    @property
    def allow_rate(self) -> float:
        return self.allowed / self.requests if self.requests else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests, "allowed": self.allowed, "deflected": self.deflected,
            "blocked": self.blocked, "rejected": self.rejected,
            "stop_rate": round(self.stop_rate, 6), "allow_rate": round(self.allow_rate, 6),
        }  # fmt: skip


@dataclass
class ScenarioRow:
    scenario: str
    attack: bool
    modes: dict[str, Tally] = field(default_factory=lambda: {m: Tally() for m in MODES})


@dataclass
class EvalReport:
    """Rows per scenario (attacks first, then legitimate labels), plus the legit-visits row."""

    rows: list[ScenarioRow]
    model_version: str | None
    policy_version: str
    threshold: float | None = None
    source: str = ""

    def row(self, scenario: str) -> ScenarioRow:
        for r in self.rows:
            if r.scenario == scenario:
                return r
        raise KeyError(scenario)

    def totals(self, mode: str) -> Tally:
        """Sum over the request rows (not the visits row) of one mode."""
        t = Tally()
        for r in self.rows:
            if r.scenario == LEGIT_VISITS:
                continue
            m = r.modes[mode]
            t.requests += m.requests
            t.allowed += m.allowed
            t.deflected += m.deflected
            t.blocked += m.blocked
            t.rejected += m.rejected
        return t

    def shortfalls(self, attack_min: float = 0.95, legit_min: float = 0.99, mode: str = "combined"
                   ) -> list[str]:
        """Targets missed in ``mode``: attacks stopped >= attack_min, legit visits served >= legit_min,
        and plain ``legit`` requests allowed >= legit_min."""
        out = []
        for r in self.rows:
            t = r.modes[mode]
            if r.attack and t.stop_rate < attack_min:
                out.append(f"{r.scenario}: {t.stop_rate:.1%} stopped < {attack_min:.0%}")
            if r.scenario in ("legit", LEGIT_VISITS) and t.allow_rate < legit_min:
                out.append(f"{r.scenario}: {t.allow_rate:.1%} allowed < {legit_min:.0%}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "policy_version": self.policy_version,
            "model_version": self.model_version,
            "threshold": self.threshold,
            "scenarios": {
                r.scenario: {"attack": r.attack, **{m: r.modes[m].to_dict() for m in MODES}}
                for r in self.rows
            },
        }

    def render(self) -> str:
        """A text table: stop % for attacks, allow % for legitimate traffic, per mode."""
        head = (f"{'scenario':<26} {'n':>6}  {'rules':>7} {'model':>7} {'combined':>8}   "
                f"combined: {'allow':>6} {'deflect':>7} {'block':>6} {'reject':>6}")  # fmt: skip
        lines = [
            f"evaluation of {self.source or 'labelled traffic'}",
            f"policy {self.policy_version}, model {self.model_version or 'none'}"
            + (f" (threshold {self.threshold:.4f})" if self.threshold is not None else ""),
            "attack rows: % stopped (deflected + blocked + rejected); "
            "legit rows: % allowed (visits: % served)",
            head,
            "-" * len(head),
        ]
        for i, r in enumerate(self.rows):
            if i and (r.attack != self.rows[i - 1].attack or r.scenario == LEGIT_VISITS):
                lines.append("-" * len(head))
            rates = [r.modes[m].stop_rate if r.attack else r.modes[m].allow_rate for m in MODES]
            c = r.modes["combined"]
            lines.append(
                f"{r.scenario:<26} {c.requests:>6}  {rates[0]:>7.1%} {rates[1]:>7.1%} "
                f"{rates[2]:>8.1%}   {'':>9} {c.allowed:>6} {c.deflected:>7} {c.blocked:>6} "
                f"{c.rejected:>6}"
            )
        short = self.shortfalls()
        lines.append("targets (combined: attacks >= 95% stopped, legit >= 99% allowed): "
                     + ("met" if not short else "MISSED: " + "; ".join(short)))  # fmt: skip
        return "\n".join(lines)


def replay_labelled(
    labelled: Sequence[Labelled], ctx: DecisionContext, intel: IpIntel
) -> list[Decision | None]:
    """One decision per item (None where the request does not parse), in input order.

    Requests are processed in event-time order (stable), as the stream would see them.
    """
    parsed: list[tuple[int, CallbackRequest]] = []
    out: list[Decision | None] = [None] * len(labelled)
    for i, item in enumerate(labelled):
        try:
            parsed.append((i, parse_request(item.request)))
        except InputError:
            continue
    parsed.sort(key=lambda p: p[1].ts)
    det = Detector(ctx, intel)
    for (i, _), decision in zip(parsed, det.process_many(req for _, req in parsed), strict=True):
        out[i] = decision
    return out


def _context(policy: Policy, lists: ListIndex | None, model: Scorer | None, mode: str) -> DecisionContext:
    fresh = lists if lists is not None else ListIndex.from_policy(dict(policy.deny), dict(policy.allow))
    return DecisionContext(
        policy=policy, lists=fresh, model=None if mode == "rules" else model,
        use_rules=mode != "model", use_model=mode != "rules",
    )


def evaluate(
    labelled: Sequence[Labelled], policy: Policy, intel: IpIntel, scorer: Scorer | None,
    *, lists: ListIndex | None = None, source: str = "",
) -> EvalReport:
    """Replay ``labelled`` rules only, model only and combined; tally per scenario.

    ``lists`` (static deny/allow entries) defaults to those of ``policy``; it is not mutated.
    """
    rows: dict[str, ScenarioRow] = {}
    visits: dict[str, dict[str, bool]] = {m: {} for m in MODES}
    for item in labelled:
        if item.scenario not in rows:
            rows[item.scenario] = ScenarioRow(item.scenario, bool(item.attack))
    for mode in MODES:
        snapshot = None if lists is None else ListIndex(lists.entries())
        decisions = replay_labelled(labelled, _context(policy, snapshot, scorer, mode), intel)
        for item, d in zip(labelled, decisions, strict=True):
            action = None if d is None else d.action
            rows[item.scenario].modes[mode].add(action)
            if not item.attack:
                key = _visit_key(item.request)
                visits[mode][key] = visits[mode].get(key, False) or action == Action.ALLOW
    ordered = sorted(rows.values(), key=lambda r: (not r.attack, r.scenario))
    if any(not r.attack for r in ordered):
        vrow = ScenarioRow(LEGIT_VISITS, False)
        for mode in MODES:
            for served in visits[mode].values():
                vrow.modes[mode].add(Action.ALLOW if served else Action.DEFLECT)
        ordered.append(vrow)
    threshold = getattr(scorer, "threshold", None)
    return EvalReport(ordered, scorer.version if scorer is not None else None, policy.version,
                      threshold, source)  # fmt: skip


def _visit_key(request: dict[str, Any]) -> str:
    session = request.get("session_id")
    return f"s:{session}" if session else f"r:{request.get('request_id')}"


# --------------------------------------------------------------------------- data sources


@contextlib.contextmanager
def simulator_intel() -> Iterator[IpIntel]:
    """IP enrichment that matches the simulator's address plan (databases in a temp dir)."""
    from detector.sim.ipdb import build_ip_databases

    with tempfile.TemporaryDirectory(prefix="detector-ipdb-") as tmp:
        paths = build_ip_databases(Path(tmp))
        intel = IpIntel.from_paths(
            country_db=paths["country"], asn_db=paths["asn"], anonymous_db=paths["anonymous"],
            hosting_asn_file=paths["hosting_asns"],
        )  # fmt: skip
        try:
            yield intel
        finally:
            intel.close()


def simulated(seeds: Iterable[int], **config: Any) -> list[list[Labelled]]:
    """One simulated day (or ``config``) per seed."""
    from detector.sim.simulate import SimConfig, simulate

    return [list(simulate(SimConfig(seed=s, **config))) for s in seeds]


def read_labelled_jsonl(requests_path: Path | str, labels_path: Path | str | None) -> list[Labelled]:
    """Requests JSONL (+ labels side file, matched by ``request_id``, else by line).

    Without labels every request is presumed legitimate (scenario ``unlabelled``). Lines that are
    not JSON objects are kept as ``{"raw": line}`` so that they count as rejected requests.
    """
    requests: list[dict[str, Any]] = []
    for line in Path(requests_path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        requests.append(obj if isinstance(obj, dict) else {"raw": line})
    if labels_path is None:
        return [LabelledRow(r, "unlabelled", False) for r in requests]
    labels: list[dict[str, Any]] = []
    for n, line in enumerate(Path(labels_path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            lab = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{labels_path}:{n}: not JSON: {exc}") from exc
        if not isinstance(lab, dict) or "scenario" not in lab:
            raise ConfigError(f"{labels_path}:{n}: expected an object with 'scenario', got {line!r}")
        labels.append(lab)
    by_id = {lab["request_id"]: lab for lab in labels if "request_id" in lab}
    out: list[Labelled] = []
    for i, req in enumerate(requests):
        lab = by_id.get(req.get("request_id")) if by_id else None
        if lab is None:
            if by_id or i >= len(labels):
                raise ConfigError(f"{labels_path}: no label for request {i + 1} "
                                  f"(request_id {req.get('request_id')!r})")  # fmt: skip
            lab = labels[i]
        attack = lab.get("attack", lab["scenario"] not in ("legit", "legit_repeat", "legit_traveller"))
        out.append(LabelledRow(req, str(lab["scenario"]), bool(attack)))
    return out


def evaluate_jsonl(
    requests_path: Path | str, labels_path: Path | str, *, policy: Policy | None = None,
    intel: IpIntel | None = None, scorer: Scorer | None = None, lists: ListIndex | None = None,
) -> EvalReport:
    """:func:`evaluate` on JSONL files (requests + labels side file, as ``detector simulate`` writes)."""
    labelled = read_labelled_jsonl(requests_path, labels_path)
    pol = policy or load_policy()
    return evaluate(labelled, pol, intel or IpIntel(), scorer, lists=lists, source=str(requests_path))


def eval_default(
    seeds: Sequence[int] = (201, 202), *, scorer: Scorer | None = None, policy: Policy | None = None,
    models_dir: Path | str = "models", name: str = "default",
) -> EvalReport:
    """Evaluate on held-out simulator days (``seeds``), with the shipped model unless ``scorer``."""
    from detector.core.model import load_model

    pol = policy or load_policy()
    model = scorer if scorer is not None else load_model(models_dir, name)
    days = simulated(seeds)
    with simulator_intel() as intel:
        return _evaluate_days(days, pol, intel, model, seeds)


def _evaluate_days(
    days: Sequence[Sequence[Labelled]], policy: Policy, intel: IpIntel, scorer: Scorer | None,
    seeds: Sequence[int],
) -> EvalReport:
    """Each day replayed on its own (seeds share a calendar day), tallies summed."""
    reports = [evaluate(day, policy, intel, scorer) for day in days]
    return merge_reports(reports, source=f"simulator seeds {', '.join(map(str, seeds))}")


def merge_reports(reports: Sequence[EvalReport], source: str = "") -> EvalReport:
    """Sum the tallies of several reports (same policy and model) row by row."""
    rows: dict[str, ScenarioRow] = {}
    for rep in reports:
        for r in rep.rows:
            acc = rows.setdefault(r.scenario, ScenarioRow(r.scenario, r.attack))
            for m in MODES:
                a, b = acc.modes[m], r.modes[m]
                a.requests += b.requests
                a.allowed += b.allowed
                a.deflected += b.deflected
                a.blocked += b.blocked
                a.rejected += b.rejected
    ordered = sorted(rows.values(), key=lambda r: (not r.attack, r.scenario == LEGIT_VISITS, r.scenario))
    first = reports[0]
    return EvalReport(ordered, first.model_version, first.policy_version, first.threshold, source)


def evaluate_cli(settings: Any, args: Any) -> EvalReport:
    """``detector evaluate [DATA --labels L] [--seeds 201,202] [--no-model]`` (wired by the CLI)."""
    from detector.runtime import build_context, build_intel

    ctx = build_context(settings)
    scorer: Scorer | None = None
    if not getattr(args, "no_model", False):
        from detector.core.model import load_model

        scorer = load_model(settings.models_dir, settings.model_name)
    if getattr(args, "data", None):
        if getattr(args, "labels", None) is None:
            raise ConfigError("evaluate DATA needs --labels (the side file `detector simulate` writes)")
        return evaluate_jsonl(args.data, args.labels, policy=ctx.policy, intel=build_intel(settings),
                              scorer=scorer, lists=ctx.lists)  # fmt: skip
    seeds = [int(s) for s in str(getattr(args, "seeds", "201,202")).split(",") if s.strip()]
    days = simulated(seeds)
    with simulator_intel() as intel:
        return _evaluate_days(days, ctx.policy, intel, scorer, seeds)
