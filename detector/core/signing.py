"""Signed control plane: every entry on the ``detector-lists`` topic carries an Ed25519 signature.

Who signs what:

* the **SOC key** (``detector lists add/remove``): any entry, with ``source: soc``. Only SOC
  entries may ``allow`` anything (an allow entry opens a denied destination);
* a **worker key**: learned entries only, i.e. ``deny`` with ``source: learned``.

Workers hold public keys only (``DETECTOR_SOC_PUBLIC_KEYS``, ``DETECTOR_WORKER_PUBLIC_KEYS``), so a
compromised worker host cannot forge a SOC entry; with HMAC every verifier could also sign.
Entries from the operator's static lists file are trusted without a signature.

Wire format: the entry's fields plus ``sig``::

    {"action": "deny", "kind": "number", "value": "+447700900123", "reason": "ticket 42",
     "expires_at": 1795946400.0, "added_at": 1795341600.0, "source": "soc",
     "sig": {"alg": "ed25519", "kid": "<16 hex>", "op": "add", "signed_at": 1795341600.0,
             "sig": "<base64 of 64 bytes>"}}

The signature covers :func:`canonical` (a domain tag, then sorted compact JSON of ``op``, every
entry field and ``signed_at``), so no field (expiry, source, reason) can be changed, and the
Kafka key must equal the entry's key. A removal is a signed ``op: remove`` record under the
entry's key (it replaces the entry on the compacted topic); a bare tombstone is not trusted.
A signed message replayed later is refused by workers that saw a newer one for its key
(``replayed``) and is harmless once its signed ``expires_at`` has passed.

>>> from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
>>> from detector.core.lists import make_entry
>>> soc = Ed25519PrivateKey.generate()
>>> v = Verifier(soc=[soc.public_key()])
>>> wire = Signer(soc).sign(make_entry("deny", "number", "+447700900123"), signed_at=1.8e9)
>>> v.verify(b"deny:number:+447700900123", wire, now=1.8e9).entry.value
'+447700900123'
>>> wire["expires_at"] = 1.9e9
>>> v.verify(b"deny:number:+447700900123", wire, now=1.8e9)
Traceback (most recent call last):
...
detector.core.errors.UntrustedEntry: list entry signature does not verify
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from detector.core.errors import InputError, UntrustedEntry
from detector.core.lists import ListEntry, entry_from_dict
from detector.core.parse import MAX_TS, decode_json

DOMAIN = b"detector-lists/v1\n"
OPS = ("add", "remove")
ROLES = ("soc", "worker")
# Why an entry was refused: the fixed label set of detector_list_rejected_total{reason}.
REJECT_REASONS = (
    "malformed",  # not a valid entry or signature block
    "unsigned",  # no signature
    "unsigned_tombstone",  # a bare null value (removals must be signed records)
    "unknown_key",  # signed by a key the worker does not trust
    "bad_signature",  # the signature does not verify (a field was changed, or forged)
    "key_mismatch",  # the Kafka key is not the entry's action:kind:value
    "not_permitted",  # a valid signature, but that key may not sign this entry
    "replayed",  # older than the newest signed message this worker saw for the key
    "signed_in_future",  # signed_at ahead of the clock
)
MAX_SIGNING_SKEW_S = 300.0


def key_id(public_key: Ed25519PublicKey) -> str:
    """16 hex digits naming a public key (SHA-256 of its raw 32 bytes)."""
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def canonical(entry: ListEntry, *, op: str, signed_at: float) -> bytes:
    """The bytes a signature covers: the domain tag and sorted compact JSON of every field."""
    body = {
        "op": op,
        "action": entry.action,
        "kind": entry.kind,
        "value": entry.value,
        "reason": entry.reason,
        "expires_at": entry.expires_at,
        "added_at": entry.added_at,
        "source": entry.source,
        "signed_at": signed_at,
    }
    return DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                               allow_nan=False).encode("ascii")


class Signer:
    """Signs list entries with one Ed25519 private key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.kid = key_id(private_key.public_key())

    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def sign(self, entry: ListEntry, *, signed_at: float, op: str = "add") -> dict[str, Any]:
        """The wire dict of ``entry`` with its signature block."""
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        sig = self._key.sign(canonical(entry, op=op, signed_at=float(signed_at)))
        out = entry.to_dict()
        out["sig"] = {"alg": "ed25519", "kid": self.kid, "op": op, "signed_at": float(signed_at),
                      "sig": base64.b64encode(sig).decode("ascii")}
        return out


@dataclass(frozen=True, slots=True)
class Verified:
    entry: ListEntry
    op: str  # add | remove
    role: str  # soc | worker
    signed_at: float


class Verifier:
    """Checks signed list entries against the trusted public keys; keeps, per entry key, the
    newest ``signed_at`` it accepted (to refuse replays of older messages)."""

    def __init__(self, soc: Iterable[Ed25519PublicKey] = (),
                 worker: Iterable[Ed25519PublicKey] = ()) -> None:
        self._keys: dict[str, tuple[str, Ed25519PublicKey]] = {}
        for role, keys in (("worker", worker), ("soc", soc)):  # a key in both lists is SOC
            for k in keys:
                self._keys[key_id(k)] = (role, k)
        self._newest: dict[str, float] = {}

    def trusted(self, role: str) -> int:
        """Number of trusted keys with ``role``."""
        return sum(1 for r, _ in self._keys.values() if r == role)

    def verify(self, msg_key: bytes | None, value: bytes | dict[str, Any] | None, *,
               now: float) -> Verified:
        """The verified entry, or :class:`UntrustedEntry` with one of :data:`REJECT_REASONS`.
        Never raises anything else, whatever ``value`` holds."""
        if value is None:
            raise UntrustedEntry("unsigned_tombstone",
                                 "a bare tombstone is not trusted; remove entries with a signed record")
        try:
            obj = value if isinstance(value, dict) else decode_json(value)
        except InputError as exc:
            raise UntrustedEntry("malformed", f"list entry: {exc}") from None
        sig = obj.get("sig")
        if sig is None:
            raise UntrustedEntry("unsigned", "list entry is not signed")
        op, signed_at, kid, raw_sig = _signature_block(sig)
        try:
            entry = entry_from_dict({k: v for k, v in obj.items() if k != "sig"})
        except InputError as exc:
            raise UntrustedEntry("malformed", f"list entry: {exc}") from None
        if msg_key is not None and msg_key != entry.key.encode("utf-8"):
            raise UntrustedEntry("key_mismatch", "message key is not the entry's action:kind:value")
        role_key = self._keys.get(kid)
        if role_key is None:
            raise UntrustedEntry("unknown_key", f"list entry signed by unknown key {kid[:16]!r}")
        role, public = role_key
        try:
            public.verify(raw_sig, canonical(entry, op=op, signed_at=signed_at))
        except InvalidSignature:
            raise UntrustedEntry("bad_signature", "list entry signature does not verify") from None
        if role == "worker" and not (entry.action == "deny" and entry.source == "learned"):
            raise UntrustedEntry("not_permitted",
                                 "a worker key may only sign learned deny entries")
        if role == "soc" and entry.source != "soc":
            raise UntrustedEntry("not_permitted", "a SOC-signed entry must have source 'soc'")
        if signed_at > now + MAX_SIGNING_SKEW_S:
            raise UntrustedEntry("signed_in_future", "list entry signed ahead of the clock")
        if signed_at < self._newest.get(entry.key, -math.inf):
            raise UntrustedEntry("replayed", "an older signed message than one already applied")
        self._newest[entry.key] = signed_at
        return Verified(entry, op, role, signed_at)


def _signature_block(sig: Any) -> tuple[str, float, str, bytes]:
    if not isinstance(sig, dict) or sig.get("alg") != "ed25519":
        raise UntrustedEntry("malformed", "sig: expected {alg: ed25519, kid, op, signed_at, sig}")
    op, signed_at, kid, b64 = sig.get("op"), sig.get("signed_at"), sig.get("kid"), sig.get("sig")
    if op not in OPS:
        raise UntrustedEntry("malformed", "sig.op: expected add or remove")
    if (isinstance(signed_at, bool) or not isinstance(signed_at, int | float)
            or not 0 <= signed_at <= MAX_TS):  # NaN fails the comparison
        raise UntrustedEntry("malformed", "sig.signed_at: expected epoch seconds")
    kid, raw = key_and_signature(kid, b64)
    return op, float(signed_at), kid, raw


def key_and_signature(kid: Any, b64: Any) -> tuple[str, bytes]:
    """A signature block's key id and its 64 signature bytes (lists and queue states alike)."""
    if not isinstance(kid, str) or len(kid) != 16:
        raise UntrustedEntry("malformed", "sig.kid: expected 16 hex digits")
    if not isinstance(b64, str) or len(b64) > 128:
        raise UntrustedEntry("malformed", "sig.sig: expected base64 of 64 bytes")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise UntrustedEntry("malformed", "sig.sig: expected base64 of 64 bytes") from None
    if len(raw) != 64:
        raise UntrustedEntry("malformed", "sig.sig: expected base64 of 64 bytes")
    return kid, raw
