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


class Secret:
    """A secret string (password) that never shows in a repr, a log line or a traceback.

    >>> s = Secret("hunter2"); (repr(s), str(s), s.get_secret_value())
    ("Secret('**********')", '**********', 'hunter2')
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __str__(self) -> str:
        return "**********"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


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
    topic_queue_state: str = ""  # the dialers' queue state; empty: <app_id>-queue-state
    partitions: int = 4
    replication: int = 1
    web_port: int = 6066
    batch_ms: int = 30  # time a stage may wait to gather work (fetch wait, flush, 2x linger)
    fence_decisions: bool = True  # decisions in per-partition Kafka transactions (zombie fencing)
    data_dir: Path = Path("var/worker")
    # Where the stream tables live (README "The stream: memory per key"): "memory" (Faust's
    # memory store, rebuilt from the changelogs at each start) or "rocksdb" (Faust's RocksDB store
    # via rocksdict, one database per table partition on local disk: flat memory, a restart reads
    # only the changelog written since).
    table_store: str = "memory"
    table_dir: Path | None = None  # rocksdb: the databases' directory (None: <data_dir>/.../tables)
    rocksdb_write_buffer_mb: int = 4  # rocksdb, per table partition: memtable size (2 of them) ...
    rocksdb_block_cache_mb: int = 8  # ... and read cache
    # Policy, lists, IP data
    policy: Path | None = None
    lists_file: Path | None = None
    policy_reload_s: float = 5.0  # how often a worker checks the policy file for changes
    rate_deck: Path | None = None  # CSV prefix -> cost per minute (None: the packaged ILLUSTRATIVE sample)
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
    dialer_private_key: Path | None = None  # `detector queue-state publish` signs with it
    dialer_public_keys: tuple[Path, ...] = ()  # workers accept queue states signed by these
    # Logging
    log_level: str = "INFO"
    # Decision log (`detector sink`, `detector explain`)
    sink_db: str = "sqlite:///var/decisions.sqlite"  # or postgresql://user:pass@host:port/db
    sink_store_numbers: bool = False  # store the E.164 number itself (else keyed hash + masked)
    sink_retention_days: float = 90.0
    sink_batch: int = 500
    # --- Kafka security, HTTP surface, topic retention --------------------------------------
    # Read and validated by _load_security() / _check_security() at the end of this module;
    # turned into client options by detector/stream/kafka_security.py.
    kafka_security_protocol: str = "PLAINTEXT"  # PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL
    kafka_sasl_mechanism: str | None = None  # PLAIN, SCRAM-SHA-256, SCRAM-SHA-512
    kafka_sasl_username: str | None = None
    kafka_sasl_password: Secret | None = None  # or DETECTOR_KAFKA_SASL_PASSWORD_FILE
    kafka_ssl_cafile: Path | None = None  # None: the system's trusted CAs
    kafka_ssl_certfile: Path | None = None  # client certificate (mutual TLS) ...
    kafka_ssl_keyfile: Path | None = None  # ... and its private key
    kafka_ssl_key_password: Secret | None = None  # or DETECTOR_KAFKA_SSL_KEY_PASSWORD_FILE
    kafka_ssl_check_hostname: bool = True
    web_bind: str = "127.0.0.1"  # address of /metrics and /healthz (0.0.0.0 in containers)
    web_host: str = "127.0.0.1"  # the host other workers reach this one at (precheck forwarding)
    precheck_token: Secret | None = None  # bearer token of GET /v1/precheck; None: no such route
    # Seconds (env: a number of seconds or 90s, 15m, 12h, 7d) topics keep their messages.
    retention_inputs: float = 7 * 86400.0  # requests, outcomes (when the detector creates them)
    retention_internal: float = 7 * 86400.0  # <app>-by-ip, <app>-by-range
    retention_changelog: float = 7 * 86400.0  # table changelogs (compact + delete)
    retention_decisions: float = 7 * 86400.0
    retention_dead_letter: float = 7 * 86400.0
    retention_list_tombstones: float = 86400.0  # lists topic (compacted): removals kept this long


_FILES = ("policy", "lists_file", "geoip_country_db", "geoip_asn_db", "anonymous_ip_db", "hosting_asn_file",
          "rate_deck", "connection_type_db", "mobile_asn_file", "soc_private_key", "worker_private_key",
          "dialer_private_key")
_PATHS = {*_FILES, "models_dir", "data_dir", "table_dir"}
_PATH_LISTS = {"soc_public_keys", "worker_public_keys", "dialer_public_keys"}  # comma-separated
_INTS = {"partitions", "replication", "web_port", "batch_ms", "sink_batch", "rocksdb_write_buffer_mb",
         "rocksdb_block_cache_mb"}
_FLOATS = {"model_reload_s", "policy_reload_s", "sink_retention_days", "max_future_skew_s", "max_past_skew_s",
           "learned_deny_interval_s"}
_BOOLS = {"sink_store_numbers", "dev_mode", "fence_decisions"}
TABLE_STORES = ("memory", "rocksdb")
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


def default_models_dir(name: str = "default") -> Path:
    """``./models`` when it holds the model ``name`` (a checkout, or a deployment's own models),
    else the copy of the shipped model inside the installed package (a ``pip install`` run
    from anywhere still loads the default model)."""
    local = Path("models")
    if (local / f"{name}.json").is_file():
        return local
    from importlib import resources

    packaged = Path(str(resources.files("detector").joinpath("_models")))
    return packaged if (packaged / f"{name}.json").is_file() else local


def load_settings(
    env: Mapping[str, str] | None = None, *, check_files: bool = True, **overrides: Any
) -> Settings:
    """Settings from ``env`` (default: ``os.environ``) with explicit ``overrides`` (CLI flags) on top."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for name in Settings.__slots__:  # type: ignore[attr-defined]
        if name in _SECURITY_FIELDS:
            continue
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
    values.update(_load_security(env))
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "models_dir" not in values:
        values["models_dir"] = default_models_dir(str(values.get("model_name", "default")))
    s = replace(Settings(), **values)
    _check_security(s, check_files=check_files)
    if s.partitions < 1:
        raise ConfigError(f"{_env_name('partitions')}: expected >= 1, got {s.partitions}")
    if s.table_store not in TABLE_STORES:
        raise ConfigError(f"{_env_name('table_store')}: expected one of {', '.join(TABLE_STORES)}, "
                          f"got {s.table_store!r}")
    if s.table_store == "rocksdb":
        try:
            import rocksdict  # noqa: F401
        except ImportError:
            raise ConfigError(f"{_env_name('table_store')}=rocksdb needs rocksdict: "
                              "pip install 'callback-fraud-detector[rocksdb]'") from None
    for name in ("rocksdb_write_buffer_mb", "rocksdb_block_cache_mb"):
        if not 1 <= getattr(s, name) <= 4096:
            raise ConfigError(f"{_env_name(name)}: expected 1 to 4096 (MiB), got {getattr(s, name)}")
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


# --- Kafka security, HTTP surface, topic retention -------------------------------------------

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_SECRET_FIELDS = ("kafka_sasl_password", "kafka_ssl_key_password", "precheck_token")
_SSL_FILES = ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile")
_RETENTIONS = ("retention_inputs", "retention_internal", "retention_changelog", "retention_decisions",
               "retention_dead_letter", "retention_list_tombstones")
_SECURITY_FIELDS = frozenset((
    "kafka_security_protocol", "kafka_sasl_mechanism", "kafka_sasl_username", *_SECRET_FIELDS,
    *_SSL_FILES, "kafka_ssl_check_hostname", "web_bind", "web_host", *_RETENTIONS,
))
MIN_PRECHECK_TOKEN_CHARS = 32  # e.g. secrets.token_hex(16); a short token can be guessed
_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
MIN_RETENTION_S = 3600.0  # below this, a worker down for a deploy could lose unread messages
MIN_CHANGELOG_RETENTION_S = 86400.0  # the core's longest window is 24 h


def parse_duration_s(var: str, text: str) -> float:
    """Seconds from ``604800``, ``90s``, ``15m``, ``12h`` or ``7d``; ConfigError naming ``var``.

    >>> parse_duration_s("X", "7d"), parse_duration_s("X", "15m"), parse_duration_s("X", "90")
    (604800.0, 900.0, 90.0)
    """
    t = text.strip().lower()
    unit = _DURATION_UNITS.get(t[-1:])
    try:
        value = float(t[:-1] if unit else t) * (unit or 1.0)
    except ValueError:
        raise ConfigError(f"{var}: expected seconds or a duration like 12h or 7d, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{var}: expected a positive duration, got {text!r}")
    return value


def _read_secret(env: Mapping[str, str], name: str) -> Secret | None:
    """``DETECTOR_X`` or the contents of the file named by ``DETECTOR_X_FILE`` (one trailing
    newline stripped), never both."""
    var = _env_name(name)
    value, path = env.get(var) or None, env.get(var + "_FILE") or None
    if value is not None and path is not None:
        raise ConfigError(f"{var} and {var}_FILE are both set; set one")
    if path is None:
        return None if value is None else Secret(value)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{var}_FILE: cannot read {path!r}: {exc.strerror or exc}") from None
    text = text[:-1] if text.endswith("\n") else text
    if not text:
        raise ConfigError(f"{var}_FILE: {path!r} is empty")
    return Secret(text)


def _load_security(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in _SECURITY_FIELDS:
        var = _env_name(name)
        if name in _SECRET_FIELDS:
            secret = _read_secret(env, name)
            if secret is not None:
                values[name] = secret
            continue
        raw = env.get(var)
        if raw is None or raw.strip() == "":
            continue
        if name in _SSL_FILES:
            values[name] = Path(raw)
        elif name in _RETENTIONS:
            values[name] = parse_duration_s(var, raw)
        elif name == "kafka_ssl_check_hostname":
            flag = raw.strip().lower()
            if flag not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ConfigError(f"{var}: expected true or false, got {raw!r}")
            values[name] = flag in ("1", "true", "yes", "on")
        elif name in ("kafka_security_protocol", "kafka_sasl_mechanism"):
            values[name] = raw.strip().upper()
        else:
            values[name] = raw.strip()
    return values


def _check_security(s: Settings, *, check_files: bool) -> None:
    """Fail fast on a Kafka security setting that cannot work, naming the variable."""
    protocol = s.kafka_security_protocol.upper()
    var = _env_name
    if protocol not in SECURITY_PROTOCOLS:
        raise ConfigError(f"{var('kafka_security_protocol')}: expected one of "
                          f"{', '.join(SECURITY_PROTOCOLS)}, got {s.kafka_security_protocol!r}")
    sasl = protocol.startswith("SASL_")
    tls = protocol in ("SSL", "SASL_SSL")
    if sasl:
        mech = (s.kafka_sasl_mechanism or "").upper()
        if mech not in SASL_MECHANISMS:
            raise ConfigError(f"{var('kafka_sasl_mechanism')}: expected one of "
                              f"{', '.join(SASL_MECHANISMS)} with {protocol}, got "
                              f"{s.kafka_sasl_mechanism!r}")
        if not s.kafka_sasl_username:
            raise ConfigError(f"{var('kafka_sasl_username')}: required with {protocol}")
        if s.kafka_sasl_password is None or not s.kafka_sasl_password.get_secret_value():
            raise ConfigError(f"{var('kafka_sasl_password')} (or {var('kafka_sasl_password')}_FILE): "
                              f"required with {protocol}")
    else:
        for name in ("kafka_sasl_mechanism", "kafka_sasl_username", "kafka_sasl_password"):
            if getattr(s, name):
                raise ConfigError(f"{var(name)} is set but {var('kafka_security_protocol')} is "
                                  f"{protocol}: set it to SASL_SSL (or SASL_PLAINTEXT) to use SASL")
    if not tls:
        for name in (*_SSL_FILES, "kafka_ssl_key_password"):
            if getattr(s, name):
                raise ConfigError(f"{var(name)} is set but {var('kafka_security_protocol')} is "
                                  f"{protocol}: set it to SSL or SASL_SSL to use TLS")
    if (s.kafka_ssl_certfile is None) != (s.kafka_ssl_keyfile is None):
        raise ConfigError(f"{var('kafka_ssl_certfile')} and {var('kafka_ssl_keyfile')}: "
                          "set both (client certificate and its key) or neither")
    if s.kafka_ssl_key_password is not None and s.kafka_ssl_keyfile is None:
        raise ConfigError(f"{var('kafka_ssl_key_password')} is set without {var('kafka_ssl_keyfile')}")
    if not s.web_bind.strip():
        raise ConfigError(f"{var('web_bind')}: expected an address such as 127.0.0.1 or 0.0.0.0")
    if not s.web_host.strip() or any(c in s.web_host for c in "/ ?#@"):
        raise ConfigError(f"{var('web_host')}: expected a host name or address other workers "
                          f"reach this one at, got {s.web_host!r}")
    token = s.precheck_token
    if token is not None:
        text = token.get_secret_value()
        if len(text) < MIN_PRECHECK_TOKEN_CHARS or not text.isascii() or not text.isprintable() \
                or " " in text:
            raise ConfigError(f"{var('precheck_token')}: expected at least "
                              f"{MIN_PRECHECK_TOKEN_CHARS} printable ASCII characters without "
                              "spaces (e.g. `python3 -c 'import secrets; print(secrets.token_hex(32))'`)")
    for name in _RETENTIONS:
        value = getattr(s, name)
        floor = MIN_CHANGELOG_RETENTION_S if name == "retention_changelog" else MIN_RETENTION_S
        if not floor <= value < float("inf"):
            raise ConfigError(f"{var(name)}: expected at least {floor:.0f} s, got {value:g} s"
                              + (" (table windows span 24 h: shorter loses counts on restart)"
                                 if name == "retention_changelog" else ""))
    if check_files:
        for name in _SSL_FILES:
            path = getattr(s, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{var(name)}: file {str(path)!r} does not exist")
