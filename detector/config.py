"""Settings: the only module that reads the environment. Every CLI flag has an env var here.

Fails fast: :func:`load_settings` validates everything and raises :class:`ConfigError` naming the
variable and what was wrong.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from detector.core.errors import ConfigError

ENV_PREFIX = "DETECTOR_"


@dataclass(frozen=True, slots=True)
class Settings:
    # Kafka / Faust
    kafka_bootstrap: str = "127.0.0.1:9092"
    app_id: str = "callback-fraud-detector"
    topic_requests: str = "callback-requests"
    topic_decisions: str = "callback-decisions"
    topic_outcomes: str = "callback-outcomes"
    topic_lists: str = "detector-lists"
    topic_dead_letter: str = "callback-requests-dlq"
    partitions: int = 4
    replication: int = 1
    web_port: int = 6066
    batch_ms: int = 30  # time a stage may wait to gather work (fetch wait, flush, 2x linger)
    data_dir: Path = Path("var/worker")
    # Policy, lists, IP data
    policy: Path | None = None
    lists_file: Path | None = None
    policy_reload_s: float = 5.0  # how often a worker checks the policy file for changes
    geoip_country_db: Path | None = None
    geoip_asn_db: Path | None = None
    anonymous_ip_db: Path | None = None
    ip_list_files: Mapping[str, Path] = field(default_factory=dict)  # kind -> path
    hosting_asn_file: Path | None = None
    connection_type_db: Path | None = None  # GeoIP2 Connection-Type mmdb (Cellular = carrier NAT)
    mobile_asn_file: Path | None = None  # mobile carriers' ASNs, one per line
    # Model
    models_dir: Path = Path("models")
    model_name: str = "default"
    shadow_model: str | None = None
    model_reload_s: float = 10.0
    # Privacy
    pii_hash_key: str = field(default="change-me-in-production", repr=False)  # a secret
    dev_mode: bool = False  # allows the development PII key (DETECTOR_DEV_MODE=1 or --dev)
    # Input checks: event time vs the clock (0 = that side unchecked)
    max_future_skew_s: float = 300.0
    max_past_skew_s: float = 86400.0
    # Signed control plane (detector-lists): Ed25519 PEM key files
    soc_private_key: Path | None = None  # `detector lists` signs with it
    soc_public_keys: tuple[Path, ...] = ()  # workers accept SOC entries signed by these
    worker_private_key: Path | None = None  # a worker signs learned entries with it
    worker_public_keys: tuple[Path, ...] = ()  # learned entries accepted when signed by these
    learned_deny_interval_s: float = 3600.0  # at most one learned deny per number per interval
    # Logging
    log_level: str = "INFO"
    # Decision log (`detector sink`, `detector explain`)
    sink_db: str = "sqlite:///var/decisions.sqlite"  # or postgresql://user:pass@host:port/db
    sink_store_numbers: bool = False  # store the E.164 number itself (else keyed hash + masked)
    sink_retention_days: float = 90.0
    sink_batch: int = 500


_FILES = ("policy", "lists_file", "geoip_country_db", "geoip_asn_db", "anonymous_ip_db", "hosting_asn_file",
          "connection_type_db", "mobile_asn_file", "soc_private_key", "worker_private_key")
_PATHS = {*_FILES, "models_dir", "data_dir"}
_PATH_LISTS = {"soc_public_keys", "worker_public_keys"}  # comma-separated
_INTS = {"partitions", "replication", "web_port", "batch_ms", "sink_batch"}
_FLOATS = {"model_reload_s", "policy_reload_s", "sink_retention_days", "max_future_skew_s", "max_past_skew_s",
           "learned_deny_interval_s"}
_BOOLS = {"sink_store_numbers", "dev_mode"}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _env_name(name: str) -> str:
    aliases = {
        "geoip_country_db": "GEOIP_COUNTRY_DB",
        "geoip_asn_db": "GEOIP_ASN_DB",
        "anonymous_ip_db": "ANONYMOUS_IP_DB",
        "kafka_bootstrap": "KAFKA_BOOTSTRAP",
    }
    return ENV_PREFIX + aliases.get(name, name.upper())


def _parse_list_files(var: str, text: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, path = part.partition("=")
        if not sep or kind not in ("tor", "vpn", "proxy", "hosting"):
            raise ConfigError(
                f"{var}: expected kind=path[,kind=path] with kind in tor|vpn|proxy|hosting, got {part!r}"
            )
        out[kind] = Path(path)
    return out


def load_settings(
    env: Mapping[str, str] | None = None, *, check_files: bool = True, **overrides: Any
) -> Settings:
    """Settings from ``env`` (default: ``os.environ``) with explicit ``overrides`` (CLI flags) on top."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for name in Settings.__slots__:  # type: ignore[attr-defined]
        if name == "ip_list_files":
            var = ENV_PREFIX + "IP_LISTS"
            if env.get(var):
                values[name] = _parse_list_files(var, env[var])
            continue
        var = _env_name(name)
        raw = env.get(var)
        if raw is None or raw == "":
            continue
        if name in _BOOLS:
            if raw.strip().lower() not in (*_TRUE, *_FALSE):
                raise ConfigError(f"{var}: expected 1/true/yes or 0/false/no, got {raw!r}")
            values[name] = raw.strip().lower() in _TRUE
            continue
        if name in _PATH_LISTS:
            values[name] = tuple(Path(p.strip()) for p in raw.split(",") if p.strip())
            continue
        if len(raw) > 4096 and name != "pii_hash_key":
            raise ConfigError(f"{var}: value of {len(raw)} characters is too long")
        try:
            if name in _INTS:
                values[name] = int(raw)
            elif name in _FLOATS:
                values[name] = float(raw)
                if not math.isfinite(values[name]) or values[name] < 0:
                    raise ConfigError(f"{var}: expected a finite number >= 0, got {raw!r}")
            elif name in _PATHS:
                values[name] = Path(raw)
            else:
                values[name] = raw
        except ValueError:
            raise ConfigError(f"{var}: expected a number, got {raw!r}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    s = replace(Settings(), **values)
    if s.partitions < 1:
        raise ConfigError(f"{_env_name('partitions')}: expected >= 1, got {s.partitions}")
    if not 1 <= s.batch_ms <= 1000:
        raise ConfigError(f"{_env_name('batch_ms')}: expected 1 to 1000 (milliseconds), got {s.batch_ms}")
    if not check_files:
        return s
    for name in _FILES:
        p = getattr(s, name)
        if p is not None and not Path(p).is_file():
            raise ConfigError(f"{_env_name(name)}: file {str(p)!r} does not exist")
    for name in _PATH_LISTS:
        for p in getattr(s, name):
            if not Path(p).is_file():
                raise ConfigError(f"{_env_name(name)}: file {str(p)!r} does not exist")
    for kind, p in s.ip_list_files.items():
        if not p.is_file():
            raise ConfigError(f"{ENV_PREFIX}IP_LISTS: {kind} list {str(p)!r} does not exist")
    return s


def settings_from_args(args: Any) -> Settings:
    """Settings from the environment with every CLI flag named like a Settings field on top."""
    over = {n: getattr(args, n) for n in Settings.__slots__ if getattr(args, n, None) is not None}  # type: ignore[attr-defined]
    return load_settings(**over)
