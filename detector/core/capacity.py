"""Agent-capacity protection: the dialer's queue state, its signature, and the bar it raises.

The contact centre's dialer publishes its queue state (``<app>-queue-state``, see
``detector/schemas/queue-state.schema.json``)::

    {"dialer_id": "lon-1", "ts": 1795341600.0, "callbacks_waiting": 42, "agents_available": 6,
     "avg_handle_s": 240.0, "serve_within_s": 600.0,
     "sig": {"alg": "ed25519", "kid": "<16 hex>", "sig": "<base64 of 64 bytes>"}}

**Pressure** (higher = more overloaded): the callbacks waiting over what the available agents can
serve within the time allowed, summed over the dialers whose state is fresh::

    pressure = sum(callbacks_waiting) / sum(agents_available * serve_within_s / avg_handle_s)

``serve_within_s`` is the message's when it has one, else the policy's ``[capacity]
serve_within_s``. A dialer with callbacks waiting and no agent has no capacity: pressure is
:data:`PRESSURE_MAX` (the top tier) unless other dialers have agents.

**Tiers** (policy ``[capacity] tiers``, the pressures entering tier 1, 2, 3) raise the bar in steps;
each tier deflects (to chat or a call-in number, never a silent block) what the tiers below it do
and more:

======  =========================================================================================
tier    deflected (``agent_capacity``), when the request would otherwise be allowed
======  =========================================================================================
1       low-trust requests: not authenticated, and a new IP (its first request in 24 h) or a
        combined risk >= ``low_trust_risk``
2       every unauthenticated request
3       authenticated customers too
======  =========================================================================================

*Hysteresis*: a tier is entered at its pressure and left only when the pressure falls below that
times ``exit_ratio``, so the bar does not flap as the queue hovers around a threshold; it steps
down tier by tier as the queue drains.

*Stale state fails open*: when no dialer has published for ``stale_after_s`` (the dialer or its
link is down), the capacity is unknown and the detector decides as if the queue were normal.

**Signature.** Queue state changes decisions, so it is a control message: every message is
signed with a dialer's Ed25519 key (the ``detector keys`` files; workers trust the public keys in
``DETECTOR_DIALER_PUBLIC_KEYS``). The signature covers :data:`DOMAIN` and the sorted compact JSON
of every field but ``sig``; the Kafka key must be the ``dialer_id``; a message not newer than the
last accepted one of its dialer is refused (``replayed``). Refused messages are counted by reason
(:data:`REJECT_REASONS`), never applied.

Pure: no Kafka, no clock (callers pass ``now``).

>>> from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
>>> key = Ed25519PrivateKey.generate()
>>> wire = QueueStateSigner(key).sign(QueueState("lon-1", 1.8e9, 10, 5, 240.0))
>>> gate = CapacityGate()
>>> gate.apply(QueueStateVerifier([key.public_key()]).verify(b"lon-1", wire, now=1.8e9), CapacityPolicy())
>>> gate.level(1.8e9 + 1, CapacityPolicy())
Level(tier=2, pressure=1.6, stale=False)
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from detector.core.errors import InputError, InvalidField, MissingField, UntrustedEntry
from detector.core.parse import decode_json, parse_ts
from detector.core.signing import key_and_signature

DOMAIN = b"detector-queue-state/v1\n"
MAX_QUEUE_STATE_BYTES = 2048  # a valid message is about 250 bytes
MAX_SIGNING_SKEW_S = 300.0  # a message dated further ahead of the worker's clock is refused
PRESSURE_MAX = 1000.0  # callbacks waiting and no agent at all
DIALER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
TIERS = 3
# Why a queue-state message was refused: the fixed label set of detector_queue_state_rejected_total.
REJECT_REASONS = (
    "malformed",  # not a valid queue state or signature block
    "unsigned",  # no signature
    "unknown_key",  # signed by a key the worker does not trust (or no dialer key configured)
    "bad_signature",  # the signature does not verify (a field was changed, or forged)
    "key_mismatch",  # the Kafka key is not the dialer_id
    "replayed",  # not newer than the last state accepted from this dialer
    "signed_in_future",  # ts further ahead of the worker's clock than MAX_SIGNING_SKEW_S
)
TRUST_CLASSES = ("low", "unauthenticated", "authenticated")  # deflected from tier 1, 2, 3


@dataclass(frozen=True, slots=True)
class QueueState:
    """One dialer's queue at ``ts`` (epoch seconds, the dialer's clock)."""

    dialer_id: str
    ts: float
    callbacks_waiting: int  # callbacks accepted and not yet dialled
    agents_available: int  # agents staffed on callbacks (busy or idle), not only idle ones
    avg_handle_s: float  # mean seconds an agent spends on one callback (talk + wrap-up)
    serve_within_s: float | None = None  # the dialer's own target; None: the policy's

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dialer_id": self.dialer_id, "ts": self.ts,
                               "callbacks_waiting": self.callbacks_waiting,
                               "agents_available": self.agents_available,
                               "avg_handle_s": self.avg_handle_s}
        if self.serve_within_s is not None:
            out["serve_within_s"] = self.serve_within_s
        return out


@dataclass(frozen=True, slots=True)
class CapacityPolicy:
    """The ``[capacity]`` policy section (see ``default_policy.toml``)."""

    serve_within_s: float = 300.0
    stale_after_s: float = 60.0
    tiers: tuple[float, ...] = (1.0, 1.5, 3.0)  # pressure entering tier 1, 2, 3
    exit_ratio: float = 0.75
    low_trust_risk: float = 0.3


@dataclass(frozen=True, slots=True)
class Level:
    """The capacity tier at some time (0 = normal), the pressure it came from, and whether the
    queue state was stale (then the tier is 0: fail open)."""

    tier: int
    pressure: float
    stale: bool


# --------------------------------------------------------------------------- parsing


def _number(obj: Mapping[str, Any], name: str, lo: float, hi: float, *, integer: bool,
            required: bool = True) -> float | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise MissingField(name)
        return None
    what = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            integer and not isinstance(value, int)):
        raise InvalidField(name, f"{what} in [{lo:g}, {hi:g}]", value)
    if not (math.isfinite(value) and lo <= value <= hi):
        raise InvalidField(name, f"{what} in [{lo:g}, {hi:g}]", value)
    return value


def parse_queue_state(raw: bytes | str | Mapping[str, Any]) -> QueueState:
    """A :class:`QueueState` from a message (its ``sig`` ignored), or a precise :class:`InputError`."""
    obj = raw if isinstance(raw, Mapping) else decode_json(raw, max_bytes=MAX_QUEUE_STATE_BYTES)
    dialer = obj.get("dialer_id")
    if dialer is None:
        raise MissingField("dialer_id")
    if not isinstance(dialer, str) or not DIALER_ID.match(dialer):
        raise InvalidField("dialer_id", "1-64 letters, digits, '.', '_' or '-'", dialer)
    if obj.get("ts") is None:
        raise MissingField("ts")
    ts = parse_ts(obj["ts"])
    waiting = _number(obj, "callbacks_waiting", 0, 10**7, integer=True)
    agents = _number(obj, "agents_available", 0, 10**6, integer=True)
    handle = _number(obj, "avg_handle_s", 1, 86400, integer=False)
    within = _number(obj, "serve_within_s", 1, 86400, integer=False, required=False)
    assert waiting is not None and agents is not None and handle is not None
    return QueueState(dialer, ts, int(waiting), int(agents), float(handle),
                      None if within is None else float(within))


# --------------------------------------------------------------------------- signing


def key_id(public_key: Ed25519PublicKey) -> str:
    """16 hex digits naming a public key (as :func:`detector.core.signing.key_id`)."""
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def canonical(state: QueueState) -> bytes:
    r"""The bytes a signature covers: the domain tag and sorted compact JSON of every field but
    ``sig``, numbers written as JavaScript's ``JSON.stringify`` writes them (an integral value
    without a decimal point, others as the shortest decimal that reads back the same), so a
    dialer in any language can sign.

    >>> canonical(QueueState("lon-1", 1795341600.5, 3, 2, 240.0))
    b'detector-queue-state/v1\n{"agents_available":2,"avg_handle_s":240,"callbacks_waiting":3,...'
    """
    body = {k: int(v) if isinstance(v, float) and v.is_integer() else v
            for k, v in state.to_dict().items()}
    return DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":"),
                               ensure_ascii=True, allow_nan=False).encode("ascii")


class QueueStateSigner:
    """Signs queue states with one dialer's Ed25519 private key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.kid = key_id(private_key.public_key())

    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def sign(self, state: QueueState) -> dict[str, Any]:
        """The wire dict of ``state`` with its signature block."""
        sig = self._key.sign(canonical(state))
        out = state.to_dict()
        out["sig"] = {"alg": "ed25519", "kid": self.kid, "sig": base64.b64encode(sig).decode("ascii")}
        return out


class QueueStateVerifier:
    """Checks signed queue states against the trusted dialer keys; keeps, per dialer, the newest
    ``ts`` it accepted (an older or equal one is a replay)."""

    def __init__(self, keys: Iterable[Ed25519PublicKey] = ()) -> None:
        self._keys = {key_id(k): k for k in keys}
        self._newest: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def verify(self, msg_key: bytes | None, value: bytes | Mapping[str, Any] | None, *,
               now: float) -> QueueState:
        """The verified state, or :class:`UntrustedEntry` with one of :data:`REJECT_REASONS`.
        Never raises anything else, whatever ``value`` holds."""
        if value is None:
            raise UntrustedEntry("malformed", "queue state: the message has no value")
        try:
            obj = value if isinstance(value, Mapping) else decode_json(
                value, max_bytes=MAX_QUEUE_STATE_BYTES)
            state = parse_queue_state(obj)
        except InputError as exc:
            raise UntrustedEntry("malformed", f"queue state: {exc}") from None
        sig = obj.get("sig")
        if sig is None:
            raise UntrustedEntry("unsigned", "queue state is not signed")
        kid, raw = _signature_block(sig)
        if msg_key is not None and msg_key != state.dialer_id.encode("utf-8"):
            raise UntrustedEntry("key_mismatch", "message key is not the queue state's dialer_id")
        public = self._keys.get(kid)
        if public is None:
            raise UntrustedEntry("unknown_key", f"queue state signed by unknown key {kid!r}")
        try:
            public.verify(raw, canonical(state))
        except InvalidSignature:
            raise UntrustedEntry("bad_signature", "queue state signature does not verify") from None
        if state.ts > now + MAX_SIGNING_SKEW_S:
            raise UntrustedEntry("signed_in_future", "queue state dated ahead of the clock")
        if state.ts <= self._newest.get(state.dialer_id, -math.inf):
            raise UntrustedEntry("replayed", "not newer than the last state of this dialer")
        self._newest[state.dialer_id] = state.ts
        return state


def _signature_block(sig: Any) -> tuple[str, bytes]:
    if not isinstance(sig, Mapping) or sig.get("alg") != "ed25519":
        raise UntrustedEntry("malformed", "sig: expected {alg: ed25519, kid, sig}")
    return key_and_signature(sig.get("kid"), sig.get("sig"))


# --------------------------------------------------------------------------- pressure and tiers


def pressure(states: Iterable[QueueState], policy: CapacityPolicy) -> float:
    """Callbacks waiting over what the agents can serve within the time allowed (see the module
    doc); 0 with nothing waiting, :data:`PRESSURE_MAX` with callbacks waiting and no agent."""
    waiting = 0
    servable = 0.0
    for s in states:
        within = s.serve_within_s if s.serve_within_s is not None else policy.serve_within_s
        waiting += s.callbacks_waiting
        servable += s.agents_available * within / s.avg_handle_s
    if waiting == 0:
        return 0.0
    if servable <= 0:
        return PRESSURE_MAX
    return min(round(waiting / servable, 6), PRESSURE_MAX)


def next_tier(tier: int, p: float, policy: CapacityPolicy) -> int:
    """The tier after pressure ``p`` at tier ``tier``: up at once to the highest tier entered,
    down one tier at a time while below the current tier's entry x ``exit_ratio``.

    >>> pol = CapacityPolicy()
    >>> [next_tier(t, p, pol) for t, p in ((0, 1.6), (2, 1.2), (2, 1.0), (2, 0.5), (1, 3.5))]
    [2, 2, 1, 0, 3]
    """
    entered = sum(1 for threshold in policy.tiers if p >= threshold)
    if entered >= tier:
        return entered
    while tier > entered and p < policy.tiers[tier - 1] * policy.exit_ratio:
        tier -= 1
    return tier


@dataclass
class CapacityGate:
    """The dialers' latest states and the tier they put the detector in.

    :meth:`apply` takes verified states in arrival order (every worker reads the one-partition
    topic in the same order, so every worker has the same tier); :meth:`level` says the tier at a
    time, 0 when the state is stale."""

    states: dict[str, QueueState] = field(default_factory=dict)
    seen_at: dict[str, float] = field(default_factory=dict)  # dialer -> freshness time
    tier: int = 0
    last_pressure: float = 0.0
    applied: int = 0

    def newest(self) -> float | None:
        return max(self.seen_at.values()) if self.seen_at else None

    def apply(self, state: QueueState, policy: CapacityPolicy, *, received_at: float | None = None
              ) -> None:
        """Take one dialer's new state. ``received_at``: the worker's clock when it arrived (the
        state counts as fresh from ``min(ts, received_at)``: a dialer clock running ahead cannot
        keep it fresh longer). Dialers silent for ``stale_after_s`` drop out of the sum."""
        at = state.ts if received_at is None else min(state.ts, received_at)
        newest = self.newest()
        if newest is not None and at - newest > policy.stale_after_s:
            self.tier = 0  # everything was stale: start again from normal (we failed open)
        self.states[state.dialer_id] = state
        self.seen_at[state.dialer_id] = max(at, self.seen_at.get(state.dialer_id, -math.inf))
        now = max(self.seen_at.values())
        for dialer in [d for d, t in self.seen_at.items() if now - t > policy.stale_after_s]:
            del self.states[dialer], self.seen_at[dialer]
        self.last_pressure = pressure(self.states.values(), policy)
        self.tier = next_tier(self.tier, self.last_pressure, policy)
        self.applied += 1

    def level(self, now: float, policy: CapacityPolicy) -> Level:
        """The tier at ``now``: 0 and ``stale`` when no dialer published in ``stale_after_s``."""
        newest = self.newest()
        if newest is None or now - newest > policy.stale_after_s:
            return Level(0, self.last_pressure, True)
        return Level(self.tier, self.last_pressure, False)


def trust_class(authenticated: bool, new_ip: bool, risk: float, policy: CapacityPolicy) -> str:
    """``authenticated``; ``low`` (not authenticated, and a new IP or risk >= ``low_trust_risk``);
    else ``unauthenticated``. One of :data:`TRUST_CLASSES`."""
    if authenticated:
        return "authenticated"
    if new_ip or risk >= policy.low_trust_risk:
        return "low"
    return "unauthenticated"


def deflects(tier: int, trust: str) -> bool:
    """Whether ``tier`` deflects a request of trust class ``trust`` (tier 1: low, 2: + the
    unauthenticated, 3: + authenticated customers).

    >>> [deflects(t, "unauthenticated") for t in range(4)]
    [False, False, True, True]
    """
    return tier >= TRUST_CLASSES.index(trust) + 1


def parse_capacity_policy(raw: Mapping[str, Any], *, error: type[Exception]) -> CapacityPolicy:
    """The ``[capacity]`` section, validated (``error`` is the policy's error class)."""
    d = CapacityPolicy()
    known = set(CapacityPolicy.__slots__)
    extra = set(raw) - known
    if extra:
        raise error(f"capacity: unknown key(s) {sorted(extra)}; known: {sorted(known)}")

    def num(name: str, lo: float, hi: float) -> float:
        value = raw.get(name, getattr(d, name))
        if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
            raise error(f"capacity.{name}: expected a number in [{lo:g}, {hi:g}], got {value!r}")
        return float(value)

    tiers = raw.get("tiers", list(d.tiers))
    if (not isinstance(tiers, list) or len(tiers) != TIERS
            or not all(isinstance(t, int | float) and not isinstance(t, bool) and 0 < t <= 1e3
                       for t in tiers)
            or any(b <= a for a, b in zip(tiers, tiers[1:], strict=False))):
        raise error(f"capacity.tiers: expected {TIERS} increasing pressures in (0, 1000] "
                    f"(entering tier 1, 2, 3), got {tiers!r}")
    return CapacityPolicy(
        serve_within_s=num("serve_within_s", 1, 86400),
        stale_after_s=num("stale_after_s", 1, 86400),
        tiers=tuple(float(t) for t in tiers),
        exit_ratio=num("exit_ratio", 0.05, 1.0),
        low_trust_risk=num("low_trust_risk", 0.0, 1.0),
    )
