"""Every Prometheus metric of the detector, in one module.

Label values come from small fixed sets: action, reason code, error kind, stage, table, list kind,
outcome, ISO country code, phonenumbers type. Never a phone number, IP or user id.

All metrics live on ``REGISTRY`` (not the global default registry) so tests can build several
apps; the worker serves it on ``/metrics`` next to Faust's own sensors.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

REGISTRY = CollectorRegistry(auto_describe=True)
NS = "detector"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
UNIT_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)

REQUESTS = Counter(
    f"{NS}_requests_total", "Callback requests received (valid or not).", registry=REGISTRY
)
DECISIONS = Counter(
    f"{NS}_decisions_total",
    "Decisions produced, by action and silent flag.",
    ["action", "silent"],
    registry=REGISTRY,
)
DECISION_REASONS = Counter(
    f"{NS}_decision_reasons_total",
    "Reason codes attached to decisions (one request may add several).",
    ["reason", "action"],
    registry=REGISTRY,
)
DECISIONS_BY_DEST = Counter(
    f"{NS}_decisions_by_destination_total",
    "Decisions by destination country and number type (bounded sets).",
    ["country", "number_type", "action"],
    registry=REGISTRY,
)
DEAD_LETTERS = Counter(
    f"{NS}_dead_letters_total",
    "Messages sent to the dead-letter topic.",
    ["topic", "kind"],
    registry=REGISTRY,
)
DUPLICATES = Counter(
    f"{NS}_duplicates_total",
    "Redelivered requests recognised by request id (not decided twice).",
    ["stage"],
    registry=REGISTRY,
)
RISK = Histogram(
    f"{NS}_risk",
    "Combined risk of decisions (0..1, higher = riskier).",
    buckets=UNIT_BUCKETS,
    registry=REGISTRY,
)
MODEL_SCORE = Histogram(
    f"{NS}_model_anomaly",
    "Isolation-forest anomaly (0..1, higher = riskier).",
    ["model"],
    buckets=UNIT_BUCKETS,
    registry=REGISTRY,
)
DECISION_LATENCY = Histogram(
    f"{NS}_decision_latency_seconds",
    "Request time (Kafka timestamp) to decision produced.",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
STAGE_SECONDS = Histogram(
    f"{NS}_stage_seconds",
    "Processing time per event per stage (ingest, ingest_ip = ingest counting per IP itself, ip, "
    "range = counting, range_decide = deciding a batch).",
    ["stage"],
    buckets=STAGE_BUCKETS,
    registry=REGISTRY,
)
TABLE_KEYS = Gauge(
    f"{NS}_table_keys", "Live keys per table on this worker.", ["table"], registry=REGISTRY
)
LIST_ENTRIES = Gauge(
    f"{NS}_list_entries",
    "Active deny/allow list entries by kind.",
    ["action", "kind"],
    registry=REGISTRY,
)
LIST_CHANGES = Counter(
    f"{NS}_list_changes_total",
    "List entries added or removed, by source.",
    ["op", "source"],
    registry=REGISTRY,
)
OUTSTANDING = Gauge(
    f"{NS}_outstanding_callbacks", "Numbers with a callback still outstanding.", registry=REGISTRY
)
OUTCOMES = Counter(
    f"{NS}_outcomes_total", "Dialer outcomes received, by outcome.", ["outcome"], registry=REGISTRY
)
MESSAGES_SENT = Counter(f"{NS}_messages_sent_total",
                        "Messages the worker produced, per topic (decisions, internal, DLQ, lists).",
                        ["topic"], registry=REGISTRY)
REREADS = Counter(
    f"{NS}_stream_rereads_total",
    "Times a stage saw a later offset than the one it expected and read the skipped ones again.",
    ["stage"],
    registry=REGISTRY,
)
CONSUMER_LAG = Gauge(
    f"{NS}_consumer_lag_messages",
    "Messages not yet consumed, per topic.",
    ["topic"],
    registry=REGISTRY,
)
LAST_DECISION = Gauge(
    f"{NS}_last_decision_timestamp_seconds",
    "Wall-clock time of the last decision produced.",
    registry=REGISTRY,
)
MODEL_INFO = Info(f"{NS}_model", "Active model artefact.", registry=REGISTRY)
MODEL_LOADED = Gauge(
    f"{NS}_model_loaded", "1 when a model is loaded and scoring.", registry=REGISTRY
)
MODEL_AGE = Gauge(
    f"{NS}_model_trained_timestamp_seconds", "When the active model was trained.", registry=REGISTRY
)
MODEL_TRAIN_SCORE_MEAN = Gauge(
    f"{NS}_model_training_anomaly_mean",
    "Mean anomaly on the model's training data (drift baseline).",
    registry=REGISTRY,
)
POLICY_INFO = Info(f"{NS}_policy", "Active policy file.", registry=REGISTRY)
MONITORED_HITS = Counter(
    f"{NS}_monitored_hits_total",
    "Hits of rules in monitor mode (reported in monitored_reasons, not acted on), by reason code.",
    ["reason"],
    registry=REGISTRY,
)
POLICY_RELOADS = Counter(
    f"{NS}_policy_reloads_total",
    "Policy files (and rate decks) picked up by a running worker without a restart.",
    registry=REGISTRY,
)
POLICY_RELOAD_FAILURES = Counter(
    f"{NS}_policy_reload_failures_total",
    "New policy files or rate decks rejected (invalid); the previous one keeps running.",
    registry=REGISTRY,
)
SINK_ROWS = Counter(
    f"{NS}_sink_rows_total",
    "Rows upserted by `detector sink`, by kind (decision, outcome).",
    ["kind"],
    registry=REGISTRY,
)
SINK_PURGED = Counter(
    f"{NS}_sink_purged_rows_total", "Rows deleted by the sink's retention purge.", registry=REGISTRY
)
for _kind in ("decision", "outcome"):
    SINK_ROWS.labels(_kind)
IP_SIGNALS = Gauge(
    f"{NS}_ip_signal_enabled",
    "1 when an IP data source is configured.",
    ["source"],
    registry=REGISTRY,
)


# Reason labels of MONITORED_HITS: the running policy's codes (set at start and on reload), else "other".
KNOWN_REASONS: set[str] = set()


def set_known_reasons(codes: Any) -> None:
    """The reason codes the running policy can emit (``Policy.reason_codes()``)."""
    KNOWN_REASONS.clear()
    KNOWN_REASONS.update(codes)
    for code in (*KNOWN_REASONS, "other"):  # every series exists from the start, at 0
        child(MONITORED_HITS, code)


def reason_label(code: str) -> str:
    return code if code in KNOWN_REASONS else "other"


# Country labels: ISO alpha-2 or "unknown"; anything else is coerced so cardinality stays bounded.
def country_label(cc: str | None) -> str:
    return cc if cc and len(cc) == 2 and cc.isalpha() and cc.isupper() else "unknown"


@lru_cache(maxsize=8192)
def child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, memoized: the hot path calls it several times per request and
    ``labels()`` validates and locks each time. Not for metrics that are ever ``clear()``-ed."""
    return metric.labels(*labels)


UNDER_ATTACK = Gauge(
    f"{NS}_under_attack",
    "1 while a scope is in under-attack mode (surging): scope global or country; country is an "
    "ISO code or '-' for global.",
    ["scope", "country"],
    registry=REGISTRY,
)
SURGE_FACTOR = Gauge(
    f"{NS}_surge_factor",
    "Requests in the last 10 minutes over the scope's baseline (population counters).",
    ["scope", "country"],
    registry=REGISTRY,
)
POPULATION_SCOPES = Gauge(
    f"{NS}_population_scopes",
    "Scopes (overall, countries, number blocks) held by this worker's population view.",
    registry=REGISTRY,
)
POPULATION_MESSAGES = Counter(
    f"{NS}_population_messages_total",
    "Population deltas read from the population topic (all workers, this one's included).",
    registry=REGISTRY,
)
POPULATION_BAD_MESSAGES = Counter(
    f"{NS}_population_bad_messages_total",
    "Malformed messages on the population topic (skipped).",
    registry=REGISTRY,
)


def observe_decision(d: dict, latency_s: float | None = None) -> None:
    """Record one decision (a ``Decision.to_dict()``) in the decision metrics."""
    import time

    action = d["action"]
    child(DECISIONS, action, "true" if d["silent"] else "false").inc()
    for reason in d["reasons"]:
        child(DECISION_REASONS, reason, action).inc()
    monitored = d.get("monitored_reasons") or ()
    for reason in monitored:
        child(MONITORED_HITS, reason_label(reason)).inc()
    if "agent_capacity" in d["reasons"]:
        child(CAPACITY_DEFLECTIONS, "enforce").inc()
    elif "agent_capacity" in monitored:
        child(CAPACITY_DEFLECTIONS, "monitor").inc()
    enr = d.get("enrichment") or {}
    child(DECISIONS_BY_DEST, country_label(enr.get("number_country")),
          str(enr.get("number_type") or "UNKNOWN"), action).inc()
    RISK.observe(d["risk"])
    model = d.get("model") or {}
    if model.get("version") and model.get("anomaly") is not None:
        child(MODEL_SCORE, "active").observe(model["anomaly"])
    if model.get("shadow_version") and model.get("shadow_anomaly") is not None:
        MODEL_SCORE.labels("shadow").observe(model["shadow_anomaly"])
    if latency_s is not None:
        DECISION_LATENCY.observe(max(latency_s, 0.0))
    observe_spend(d)
    LAST_DECISION.set(time.time())


# --------------------------------------------------------------------------- signed control plane
LIST_REJECTED = Counter(
    f"{NS}_list_rejected_total",
    "detector-lists messages refused (unsigned, badly signed, not permitted...), by reason.",
    ["reason"],
    registry=REGISTRY,
)
LEARNED = Counter(
    f"{NS}_learned_entries_total",
    "Deny entries learned from dialer outcomes: published (signed), rate_limited (one per number "
    "per DETECTOR_LEARNED_DENY_INTERVAL_S), local_only (no worker key to sign with).",
    ["result"],
    registry=REGISTRY,
)
LEARNED_RESULTS = ("published", "rate_limited", "local_only")


def _init_fixed_labels() -> None:
    from detector.core.lists import SOURCES
    from detector.core.signing import REJECT_REASONS

    for reason in REJECT_REASONS:  # every series exists from the start, at 0
        LIST_REJECTED.labels(reason)
    for result in LEARNED_RESULTS:
        LEARNED.labels(result)
    for op in ("add", "remove"):
        for source in SOURCES:
            LIST_CHANGES.labels(op, source)


_init_fixed_labels()


def bounded(value: str, allowed: tuple[str, ...] | frozenset[str], other: str = "other") -> str:
    """``value`` when it is in the fixed set ``allowed``, else ``other``: a label value can never
    be a phone number, an IP or anything else from a message."""
    return value if value in allowed else other


# --- liveness of the stream (detector.stream.guard): fixed label sets, see STAGES there
STAGE_PROGRESS_AGE = Gauge(
    f"{NS}_stage_last_progress_age_seconds",
    "Seconds since the stage last made progress (ingest/ip/outcome: an event processed; "
    "range: a batch decided and sent) or had nothing to do; 0 while idle.",
    ["stage"],
    registry=REGISTRY,
)
STAGE_STALLED = Gauge(
    f"{NS}_stage_stalled",
    "1 when the stage has input (consumer lag or an undecided batch) but made no progress "
    "for the stall threshold (30 s), else 0.",
    ["stage"],
    registry=REGISTRY,
)
BROKER_REACHABLE = Gauge(
    f"{NS}_broker_reachable",
    "1 when the worker's last Kafka metadata probe (every 5 s) succeeded within 10 s, else 0.",
    registry=REGISTRY,
)
INTERNAL_ERRORS = Counter(
    f"{NS}_internal_errors_total",
    "Requests that failed with an unexpected exception (a bug): each went to the dead-letter "
    "topic with error kind internal_error.",
    ["stage"],
    registry=REGISTRY,
)
KAFKA_WAITS = Counter(
    f"{NS}_kafka_slow_waits_total",
    "Waits on Kafka that passed their warning threshold, by operation.",
    ["operation"],
    registry=REGISTRY,
)
LOG_SUPPRESSED = Counter(
    f"{NS}_log_lines_suppressed_total",
    "Log lines dropped by the rate limiter (same logger and message more than 5 times in 10 s).",
    registry=REGISTRY,
)


# --- money: cost at risk and spend circuit breakers (detector/core/spend.py) -----------------
SPEND_ALLOWED = Counter(
    f"{NS}_spend_allowed_total",
    "Expected cost of allowed callbacks (rate deck price x risk-weighted minutes), in the rate "
    "deck's currency, by destination country (the policy's countries, else other).",
    ["country"],
    registry=REGISTRY,
)
SPEND_AVOIDED = Counter(
    f"{NS}_spend_avoided_total",
    "Expected cost of stopped (deflected or blocked) callbacks: money not spent, estimated, in the "
    "rate deck's currency, by destination country (the policy's countries, else other).",
    ["country"],
    registry=REGISTRY,
)
SPEND_BREAKERS_OPEN = Gauge(
    f"{NS}_spend_breakers_open",
    "Spend circuit breakers open (allowed spend at or over a budget: requests there are deflected "
    "or blocked with spend_budget_exceeded), by scope kind (country, prefix) and country.",
    ["kind", "country"],
    registry=REGISTRY,
)
SPEND_BUDGET_RATIO = Gauge(
    f"{NS}_spend_budget_ratio",
    "Allowed spend over budget of the tightest spend scope (the larger of the hour and day "
    "windows; >= 1: open), by scope kind and country.",
    ["kind", "country"],
    registry=REGISTRY,
)
RATE_DECK_INFO = Info(f"{NS}_rate_deck", "Active rate deck: version (content digest), currency, "
                      "source file, prefixes.", registry=REGISTRY)
MAX_SPEND_COUNTRIES = 64
SPEND_COUNTRIES: set[str] = set()


def set_spend_countries(policy: Any) -> None:
    """Country labels of the money metrics: the policy's allowed countries and the countries it
    budgets (at most MAX_SPEND_COUNTRIES, alphabetical); anything else is "other"."""
    codes = sorted(set(policy.allowed_countries) | set(policy.spend.countries))[:MAX_SPEND_COUNTRIES]
    SPEND_COUNTRIES.clear()
    SPEND_COUNTRIES.update(codes)
    for cc in (*codes, "other"):  # every series exists from the start, at 0
        child(SPEND_ALLOWED, cc)
        child(SPEND_AVOIDED, cc)


def spend_country(cc: str | None) -> str:
    return cc if cc in SPEND_COUNTRIES else "other"


def set_rate_deck_info(deck: Any) -> None:
    RATE_DECK_INFO.info({"version": str(deck.version), "currency": str(deck.currency),
                         "source": str(deck.source), "prefixes": str(len(deck))})


def observe_spend(d: dict) -> None:
    """Money allowed / avoided of one decision (a ``Decision.to_dict()``)."""
    cost = d.get("expected_cost") or 0.0
    if cost > 0:
        cc = spend_country((d.get("enrichment") or {}).get("number_country"))
        child(SPEND_ALLOWED if d["action"] == "allow" else SPEND_AVOIDED, cc).inc(cost)


for _kind in ("country", "prefix"):  # present from the start (0: nothing open)
    SPEND_BREAKERS_OPEN.labels(_kind, "other").set(0)
    SPEND_BUDGET_RATIO.labels(_kind, "other").set(0)
# --- agent capacity (detector.stream.capacity) and the web tier's pre-check (stream.precheck)
CAPACITY_TIER = Gauge(
    f"{NS}_capacity_tier",
    "Agent-capacity tier in force (0 normal; 1 deflects low-trust requests, 2 every "
    "unauthenticated one, 3 authenticated customers too); 0 while the queue state is stale.",
    registry=REGISTRY,
)
CAPACITY_PRESSURE = Gauge(
    f"{NS}_capacity_pressure",
    "Callbacks waiting over what the available agents can serve within the allowed time "
    "(last queue state; > 1 = over capacity).",
    registry=REGISTRY,
)
CAPACITY_STALE = Gauge(
    f"{NS}_capacity_state_stale",
    "1 when no dialer queue state is fresh (none received, or none for stale_after_s): capacity "
    "unknown, decisions fail open to normal.",
    registry=REGISTRY,
)
CAPACITY_DIALERS = Gauge(
    f"{NS}_capacity_dialers",
    "Dialers whose latest queue state this worker holds.",
    registry=REGISTRY,
)
CAPACITY_STATE_AGE = Gauge(
    f"{NS}_capacity_state_age_seconds",
    "Seconds since the newest queue state (-1: none received).",
    registry=REGISTRY,
)
CAPACITY_DEFLECTIONS = Counter(
    f"{NS}_capacity_deflections_total",
    "Callbacks deflected for agent capacity (reason agent_capacity; mode monitor: would have "
    "been), requests that would otherwise have been allowed.",
    ["mode"],
    registry=REGISTRY,
)
QUEUE_STATES = Counter(
    f"{NS}_queue_states_total",
    "Dialer queue states verified and applied.",
    registry=REGISTRY,
)
QUEUE_STATE_REJECTED = Counter(
    f"{NS}_queue_state_rejected_total",
    "Queue-state messages refused (unsigned, badly signed, unknown key, replayed...), by reason.",
    ["reason"],
    registry=REGISTRY,
)
PRECHECK_RESULTS = ("shown", "hidden", "forwarded", "unauthorized", "bad_request", "unavailable",
                    "error")
PRECHECK_REQUESTS = Counter(
    f"{NS}_precheck_requests_total",
    "GET /v1/precheck answers of this worker: shown / hidden (answered here), forwarded (to the "
    "worker owning the IP's partition), unauthorized, bad_request, unavailable (rebalancing), "
    "error (a bug).",
    ["result"],
    registry=REGISTRY,
)
PRECHECK_SECONDS = Histogram(
    f"{NS}_precheck_seconds",
    "Time to answer GET /v1/precheck in the worker (route local: answered here; forwarded: "
    "including the hop to the owning worker).",
    ["route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
    registry=REGISTRY,
)
