"""Signed control plane: what each key may sign, every reject reason, key files."""

from __future__ import annotations

import json
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from detector import keys
from detector.cli import main
from detector.config import load_settings
from detector.core.errors import ConfigError, UntrustedEntry
from detector.core.lists import make_entry
from detector.core.pipeline import learn
from detector.core.policy import load_policy
from detector.core.records import Outcome
from detector.core.signing import REJECT_REASONS, Signer, Verifier
from detector.core.state import RangeStores

NOW = 1795341600.0
SOC = Signer(Ed25519PrivateKey.generate())
WORKER = Signer(Ed25519PrivateKey.generate())
OTHER = Signer(Ed25519PrivateKey.generate())


def verifier() -> Verifier:
    return Verifier(soc=[SOC.public_key()], worker=[WORKER.public_key()])


def reason(key: bytes | None, value) -> str:
    raw = value if value is None or isinstance(value, bytes) else json.dumps(value).encode()
    with pytest.raises(UntrustedEntry) as exc:
        verifier().verify(key, raw, now=NOW)
    assert exc.value.reason in REJECT_REASONS
    return exc.value.reason


ALLOW_SO = make_entry("allow", "country", "SO", reason="x", source="soc")
LEARNED = make_entry("deny", "number", "+447700900123", reason="agent_marked_spam", source="learned",
                     expires_at=NOW + 86400, added_at=NOW)


def test_soc_signed_entry_is_accepted_and_unsigned_one_refused():
    v = verifier().verify(b"allow:country:SO", json.dumps(SOC.sign(ALLOW_SO, signed_at=NOW)).encode(), now=NOW)
    assert (v.entry, v.role, v.op) == (ALLOW_SO, "soc", "add")
    assert reason(b"allow:country:SO", ALLOW_SO.to_dict()) == "unsigned"
    assert reason(b"allow:country:SO", None) == "unsigned_tombstone"


def test_every_signed_field_is_covered():
    for name, new in (("value", "SE"), ("expires_at", NOW + 1), ("added_at", 5.0), ("reason", "y"),
                      ("action", "deny")):
        wire = SOC.sign(ALLOW_SO, signed_at=NOW)
        wire[name] = new
        key = f"{wire['action']}:country:{wire['value']}".encode()
        assert reason(key, wire) == "bad_signature", name
    wire = SOC.sign(ALLOW_SO, signed_at=NOW)
    wire["sig"]["signed_at"] = NOW + 1
    assert reason(b"allow:country:SO", wire) == "bad_signature"
    wire = SOC.sign(ALLOW_SO, signed_at=NOW)
    wire["sig"]["op"] = "remove"
    assert reason(b"allow:country:SO", wire) == "bad_signature"


def test_workers_may_sign_learned_denies_only():
    assert verifier().verify(b"deny:number:+447700900123", WORKER.sign(LEARNED, signed_at=NOW),
                             now=NOW).role == "worker"
    allow = make_entry("allow", "country", "SO", source="learned")
    assert reason(b"allow:country:SO", WORKER.sign(allow, signed_at=NOW)) == "not_permitted"
    prefix = make_entry("allow", "prefix", "+252", source="learned")
    assert reason(b"allow:prefix:+252", WORKER.sign(prefix, signed_at=NOW)) == "not_permitted"
    as_soc = make_entry("deny", "number", "+447700900123", source="soc")
    assert reason(b"deny:number:+447700900123", WORKER.sign(as_soc, signed_at=NOW)) == "not_permitted"
    # and the SOC key signs SOC entries, not entries claiming to be learned or policy
    assert reason(b"deny:number:+447700900123", SOC.sign(LEARNED, signed_at=NOW)) == "not_permitted"


def test_other_reject_reasons():
    assert reason(b"allow:country:SO", OTHER.sign(ALLOW_SO, signed_at=NOW)) == "unknown_key"
    assert reason(b"allow:country:SE", SOC.sign(ALLOW_SO, signed_at=NOW)) == "key_mismatch"
    assert reason(b"allow:country:SO", SOC.sign(ALLOW_SO, signed_at=NOW + 3600)) == "signed_in_future"
    assert reason(b"allow:country:SO", b"\xff") == "malformed"
    assert reason(b"allow:country:SO", b"[" * 100_000) == "malformed"
    for bad_sig in ("x", {"alg": "hmac"}, {"alg": "ed25519", "op": "add", "kid": "0" * 16,
                                             "signed_at": NOW, "sig": "!!"}):
        wire = SOC.sign(ALLOW_SO, signed_at=NOW)
        wire["sig"] = bad_sig
        assert reason(b"allow:country:SO", wire) == "malformed"
    wire = SOC.sign(ALLOW_SO, signed_at=NOW)
    wire["source"] = "+447700900123"  # a number must never reach the source label
    assert reason(b"allow:country:SO", wire) == "malformed"


def test_an_older_signed_message_is_refused_as_a_replay():
    v = verifier()
    add = SOC.sign(ALLOW_SO, signed_at=NOW)
    remove = SOC.sign(ALLOW_SO, signed_at=NOW + 60, op="remove")
    v.verify(b"allow:country:SO", add, now=NOW + 60)
    assert v.verify(b"allow:country:SO", remove, now=NOW + 60).op == "remove"
    with pytest.raises(UntrustedEntry) as exc:
        v.verify(b"allow:country:SO", add, now=NOW + 120)
    assert exc.value.reason == "replayed"


def test_learned_denies_are_rate_limited_per_number():
    policy = load_policy()
    stores = RangeStores()
    spam = [Outcome(f"r{i}", "+447700900123", "agent_marked_spam", NOW + 600 * i) for i in range(8)]
    results = [learn(stores, o, "+447700900123", policy, deny_interval_s=3600.0) for o in spam]
    assert [e is not None for e, _ in results] == [True, False, False, False, False, False, True, False]
    assert [limited for _, limited in results] == [False, True, True, True, True, True, False, True]
    other, _ = learn(stores, Outcome("x", "+447700900124", "agent_marked_spam", NOW), "+447700900124",
                     policy, deny_interval_s=3600.0)
    assert other is not None  # per number


def test_keys_generate_writes_a_0600_private_key_and_loads(tmp_path):
    assert main(["keys", "generate", "--out", str(tmp_path), "--name", "soc"]) == 0
    private, public = tmp_path / "soc.key", tmp_path / "soc.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert main(["keys", "generate", "--out", str(tmp_path), "--name", "soc"]) == 2  # no overwrite
    s = load_settings(env={"DETECTOR_SOC_PRIVATE_KEY": str(private),
                           "DETECTOR_SOC_PUBLIC_KEYS": str(public)})
    signer = keys.soc_signer(s)
    v = keys.verifier(s)
    entry = make_entry("deny", "ip", "203.0.113.7")
    assert v.verify(b"deny:ip:203.0.113.7", signer.sign(entry, signed_at=NOW), now=NOW).entry == entry
    private.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        keys.soc_signer(s)
    with pytest.raises(ConfigError, match="DETECTOR_SOC_PRIVATE_KEY"):
        keys.soc_signer(load_settings(env={}))
    (tmp_path / "bad.pub").write_text("not a key")
    with pytest.raises(ConfigError, match="DETECTOR_WORKER_PUBLIC_KEYS"):
        keys.verifier(load_settings(env={"DETECTOR_WORKER_PUBLIC_KEYS": str(tmp_path / "bad.pub")}))


def test_lists_file_stays_trusted_without_signatures(tmp_path):
    from detector.runtime import build_context

    f = tmp_path / "lists.jsonl"
    f.write_text(json.dumps({"action": "allow", "kind": "country", "value": "SO", "source": "soc"}) + "\n")
    ctx = build_context(load_settings(env={"DETECTOR_LISTS_FILE": str(f)}))
    assert ctx.lists.match("+252901234567", "SO", "1.2.3.4", None, None, now=NOW)[1] is True
