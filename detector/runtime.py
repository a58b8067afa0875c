"""Builds the core's runtime objects (policy, lists, IP intel, model) from :class:`Settings`.

Shared by the CLI (replay, demo, evaluate) and the Faust worker so both start the same way, and
both say once, loudly, which signals are disabled.
"""

from __future__ import annotations

import logging
from pathlib import Path

from detector.config import Settings
from detector.core.decide import DecisionContext
from detector.core.errors import ConfigError, InputError
from detector.core.ipintel import IpIntel
from detector.core.lists import ListIndex, entry_from_dict
from detector.core.policy import Policy, load_policy
from detector.core.rates import RateDeck

log = logging.getLogger("detector")


def tune_gc() -> None:
    """Fewer full garbage collections: window state is many small long-lived containers, and the
    default thresholds rescan them all every few thousand requests (p99.9 x10 in bench_replay)."""
    import gc

    gc.set_threshold(50_000, 20, 100)


def load_lists_file(path: Path, index: ListIndex) -> int:
    """Add entries from a JSONL lists file (the ``detector-lists`` message format)."""
    from detector.core.parse import decode_json

    n = 0
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the lists file: {exc.strerror}") from None
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith(b"#"):
            continue
        try:
            index.add(entry_from_dict(decode_json(line)))
        except InputError as exc:
            raise ConfigError(f"{path}:{lineno}: invalid list entry: {exc}") from None
        n += 1
    return n


def check_pii_key(settings: Settings, what: str) -> None:
    """Refuse to run ``what`` with the development PII hash key (or a short one) unless the
    development flag is set: hashes under a known key are reversed by enumerating every IPv4
    address. Raises ConfigError saying how to set the key."""
    from detector.core.pii import DEV_DEFAULT_KEY, MIN_KEY_BYTES

    key = settings.pii_hash_key.encode("utf-8")
    weak = "is the development default" if settings.pii_hash_key == DEV_DEFAULT_KEY else (
        f"is shorter than {MIN_KEY_BYTES} bytes" if len(key) < MIN_KEY_BYTES else "")
    if not weak:
        return
    if settings.dev_mode:
        log.warning("pii: DETECTOR_PII_HASH_KEY %s (allowed by DETECTOR_DEV_MODE): IP hashes in "
                    "decisions can be reversed; never run like this in production", weak)
        return
    raise ConfigError(
        f"refusing to start {what}: DETECTOR_PII_HASH_KEY {weak}, so the IP hashes it writes "
        "could be reversed. Set DETECTOR_PII_HASH_KEY to a secret of at least "
        f"{MIN_KEY_BYTES} random bytes (e.g. the output of "
        "`python3 -c 'import secrets; print(secrets.token_hex(32))'`), the same on every worker; "
        "or, for development only, set DETECTOR_DEV_MODE=1 (or pass --dev)."
    )


def build_intel(settings: Settings) -> IpIntel:
    intel = IpIntel.from_paths(
        country_db=settings.geoip_country_db,
        asn_db=settings.geoip_asn_db,
        anonymous_db=settings.anonymous_ip_db,
        list_files=settings.ip_list_files,
        hosting_asn_file=settings.hosting_asn_file,
        connection_type_db=settings.connection_type_db,
        mobile_asn_file=settings.mobile_asn_file,
    )
    for line in intel.describe():
        (log.warning if "DISABLED" in line or "PURE PYTHON" in line else log.info)(
            "ip data: %s", line
        )
    from detector import metrics

    sources: dict[str, Path | None] = {
        "country_db": settings.geoip_country_db,
        "asn_db": settings.geoip_asn_db,
        "anonymous_db": settings.anonymous_ip_db,
        "hosting_asns": settings.hosting_asn_file,
        "connection_type_db": settings.connection_type_db,
        "mobile_asns": settings.mobile_asn_file,
    }
    for kind in ("tor", "vpn", "proxy", "hosting"):
        sources[f"list_{kind}"] = settings.ip_list_files.get(kind)
    for source, path in sources.items():
        metrics.IP_SIGNALS.labels(source).set(0 if path is None else 1)
    return intel


def build_policy(settings: Settings) -> Policy:
    policy = load_policy(settings.policy)
    log.info("policy %s loaded from %s", policy.version, settings.policy or "packaged default")
    return policy


def build_rate_deck(settings: Settings, policy: Policy) -> RateDeck:
    """The rate deck of ``settings`` (the packaged ILLUSTRATIVE sample when none is set, said
    loudly), checked against the policy's spend currency."""
    from detector.core.rates import load_rate_deck
    from detector.core.spend import check_currency

    deck = load_rate_deck(settings.rate_deck)
    check_currency(policy.spend, deck)
    if settings.rate_deck is None:
        log.warning("rate deck: the packaged ILLUSTRATIVE sample (%s), NOT a real tariff: money "
                    "figures and spend budgets are examples; set DETECTOR_RATE_DECK", deck.describe())
    else:
        log.info("rate deck: %s", deck.describe())
    return deck


def build_context(settings: Settings, policy: Policy | None = None) -> DecisionContext:
    policy = policy or build_policy(settings)
    lists = ListIndex.from_policy(dict(policy.deny), dict(policy.allow))
    if settings.lists_file is not None:
        n = load_lists_file(settings.lists_file, lists)
        log.info("lists: %d entries from %s", n, settings.lists_file)
    return DecisionContext(
        policy=policy, lists=lists, pii_key=settings.pii_hash_key.encode("utf-8"),
        rates=build_rate_deck(settings, policy),
    )


def build_model_watcher(settings: Settings):  # type: ignore[no-untyped-def]
    """A hot-reloading model watcher, or None when no model artefact exists (said loudly)."""
    try:
        from detector.core.model import ModelWatcher
    except ImportError:  # pragma: no cover - model module absent
        log.warning("model: DISABLED (detector.core.model not available)")
        return None
    card = settings.models_dir / f"{settings.model_name}.json"
    if not card.is_file():
        log.warning("model: DISABLED (no artefact %s; run `detector train`)", card)
    return ModelWatcher(
        settings.models_dir, settings.model_name, settings.shadow_model, settings.model_reload_s
    )
