"""Kafka security settings, their translation into client options, topic retention configs."""

from __future__ import annotations

import ssl
import subprocess
import uuid
from pathlib import Path

import faust
import pytest

from detector.cli import main
from detector.config import Secret, load_settings, parse_duration_s
from detector.core.errors import ConfigError
from detector.stream import io, kafka_security, retention

SASL = {
    "DETECTOR_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "DETECTOR_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    "DETECTOR_KAFKA_SASL_USERNAME": "alice",
    "DETECTOR_KAFKA_SASL_PASSWORD": "pa55-word-7f3a",
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA and a client certificate whose key is encrypted (openssl, as tools/kafka/kafka.sh)."""
    d = tmp_path_factory.mktemp("pki")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)  # noqa: S603, S607

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=t",
        "-keyout", "ca.key", "-out", "ca.pem")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=c", "-keyout", "plain.key",
        "-out", "c.csr")
    run("x509", "-req", "-in", "c.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "client.pem", "-days", "2")
    run("pkcs8", "-topk8", "-v2", "aes-256-cbc", "-in", "plain.key", "-out", "client.key",
        "-passout", "pass:keypass")
    return {"ca": d / "ca.pem", "cert": d / "client.pem", "key": d / "client.key"}


def test_defaults_are_plaintext_loopback_web_and_seven_day_retention() -> None:
    s = load_settings(env={})
    assert s.kafka_security_protocol == "PLAINTEXT" and s.web_bind == "127.0.0.1"
    assert kafka_security.client_kwargs(s) == {"security_protocol": "PLAINTEXT"}
    assert kafka_security.faust_credentials(s) is None
    assert s.retention_internal == s.retention_changelog == s.retention_decisions == 7 * 86400
    assert s.retention_list_tombstones == 86400


def test_password_is_a_secret_never_in_repr_or_description() -> None:
    s = load_settings(env=SASL)
    assert isinstance(s.kafka_sasl_password, Secret)
    assert s.kafka_sasl_password.get_secret_value() == "pa55-word-7f3a"
    for text in (repr(s), str(s), kafka_security.describe(s), repr(kafka_security.faust_credentials(s))):
        assert "pa55-word-7f3a" not in text
    assert kafka_security.describe(s) == "SASL_SSL, SCRAM-SHA-512 as user 'alice', system CAs"


def test_password_file_one_trailing_newline_stripped(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_text("from-a-file \n")
    env = {**SASL, "DETECTOR_KAFKA_SASL_PASSWORD_FILE": str(f)}
    del env["DETECTOR_KAFKA_SASL_PASSWORD"]
    s = load_settings(env=env)
    assert s.kafka_sasl_password == Secret("from-a-file ")


@pytest.mark.parametrize(("change", "message"), [
    ({"DETECTOR_KAFKA_SECURITY_PROTOCOL": "TLS"},
     "DETECTOR_KAFKA_SECURITY_PROTOCOL: expected one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"),
    ({"DETECTOR_KAFKA_SASL_MECHANISM": "GSSAPI"},
     "DETECTOR_KAFKA_SASL_MECHANISM: expected one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512"),
    ({"DETECTOR_KAFKA_SASL_USERNAME": ""}, "DETECTOR_KAFKA_SASL_USERNAME: required with SASL_SSL"),
    ({"DETECTOR_KAFKA_SASL_PASSWORD": ""}, "DETECTOR_KAFKA_SASL_PASSWORD (or DETECTOR_KAFKA_SASL_PASSWORD_FILE): required"),
    ({"DETECTOR_KAFKA_SASL_PASSWORD_FILE": "/nonexistent/pw"},
     "DETECTOR_KAFKA_SASL_PASSWORD and DETECTOR_KAFKA_SASL_PASSWORD_FILE are both set"),
    ({"DETECTOR_KAFKA_SECURITY_PROTOCOL": "SSL"},
     "DETECTOR_KAFKA_SASL_MECHANISM is set but DETECTOR_KAFKA_SECURITY_PROTOCOL is SSL"),
    ({"DETECTOR_KAFKA_SSL_CAFILE": "/nonexistent/ca.pem"},
     "DETECTOR_KAFKA_SSL_CAFILE: file '/nonexistent/ca.pem' does not exist"),
    ({"DETECTOR_KAFKA_SSL_CERTFILE": "/x.pem"}, "set both (client certificate and its key) or neither"),
    ({"DETECTOR_KAFKA_SSL_CHECK_HOSTNAME": "maybe"},
     "DETECTOR_KAFKA_SSL_CHECK_HOSTNAME: expected true or false, got 'maybe'"),
    ({"DETECTOR_RETENTION_INTERNAL": "10m"}, "DETECTOR_RETENTION_INTERNAL: expected at least 3600 s"),
    ({"DETECTOR_RETENTION_CHANGELOG": "12h"}, "table windows span 24 h"),
    ({"DETECTOR_RETENTION_DECISIONS": "forever"}, "DETECTOR_RETENTION_DECISIONS: expected seconds"),
])
def test_bad_security_settings_name_the_variable(change: dict[str, str], message: str) -> None:
    env = {**SASL, **change}
    with pytest.raises(ConfigError) as err:
        load_settings(env=env)
    assert message in str(err.value)
    assert "pa55-word-7f3a" not in str(err.value)


def test_sasl_plaintext_settings_without_protocol_are_refused() -> None:
    with pytest.raises(ConfigError, match="DETECTOR_KAFKA_SASL_USERNAME is set but .* PLAINTEXT"):
        load_settings(env={"DETECTOR_KAFKA_SASL_USERNAME": "alice"})
    with pytest.raises(ConfigError, match="DETECTOR_KAFKA_SSL_CAFILE is set but .* PLAINTEXT"):
        load_settings(env={"DETECTOR_KAFKA_SSL_CAFILE": "/etc/hosts"})


def test_sasl_ssl_client_kwargs_and_faust_credentials(pki: dict[str, Path]) -> None:
    s = load_settings(env={**SASL, "DETECTOR_KAFKA_SASL_MECHANISM": "scram-sha-256",
                           "DETECTOR_KAFKA_SSL_CAFILE": str(pki["ca"]),
                           "DETECTOR_KAFKA_SSL_CERTFILE": str(pki["cert"]),
                           "DETECTOR_KAFKA_SSL_KEYFILE": str(pki["key"]),
                           "DETECTOR_KAFKA_SSL_KEY_PASSWORD": "keypass"})
    kw = kafka_security.client_kwargs(s)
    assert {k: v for k, v in kw.items() if k != "ssl_context"} == {
        "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "alice", "sasl_plain_password": "pa55-word-7f3a"}
    ctx = kw["ssl_context"]
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert any(c["subject"] == ((("commonName", "t"),),) for c in ctx.get_ca_certs())
    creds = kafka_security.faust_credentials(s)
    assert isinstance(creds, faust.SASLCredentials)
    assert creds.protocol.value == "SASL_SSL" and creds.mechanism.value == "SCRAM-SHA-256"
    assert creds.username == "alice" and creds.ssl_context is not None


def test_ssl_only_with_hostname_check_off(pki: dict[str, Path]) -> None:
    s = load_settings(env={"DETECTOR_KAFKA_SECURITY_PROTOCOL": "SSL",
                           "DETECTOR_KAFKA_SSL_CAFILE": str(pki["ca"]),
                           "DETECTOR_KAFKA_SSL_CHECK_HOSTNAME": "false"})
    kw = kafka_security.client_kwargs(s)
    assert kw["security_protocol"] == "SSL" and "sasl_mechanism" not in kw
    assert kw["ssl_context"].check_hostname is False
    assert kw["ssl_context"].verify_mode == ssl.CERT_REQUIRED  # the chain is still verified
    assert isinstance(kafka_security.faust_credentials(s), faust.SSLCredentials)
    assert "hostname check OFF" in kafka_security.describe(s)


def test_sasl_plaintext_has_no_tls() -> None:
    s = load_settings(env={**SASL, "DETECTOR_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                           "DETECTOR_KAFKA_SASL_MECHANISM": "PLAIN"})
    kw = kafka_security.client_kwargs(s)
    assert kw["security_protocol"] == "SASL_PLAINTEXT" and "ssl_context" not in kw
    assert kafka_security.faust_credentials(s).protocol.value == "SASL_PLAINTEXT"


def test_wrong_key_password_is_a_clear_error(pki: dict[str, Path]) -> None:
    s = load_settings(env={"DETECTOR_KAFKA_SECURITY_PROTOCOL": "SSL",
                           "DETECTOR_KAFKA_SSL_CERTFILE": str(pki["cert"]),
                           "DETECTOR_KAFKA_SSL_KEYFILE": str(pki["key"]),
                           "DETECTOR_KAFKA_SSL_KEY_PASSWORD": "not-it"})
    with pytest.raises(kafka_security.KafkaConnectError, match="cannot load the client certificate"):
        kafka_security.client_kwargs(s)


def test_cli_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    for k, v in SASL.items():
        monkeypatch.setenv(k, v)
    missing = tmp_path / "nope.pem"
    assert main(["topics", "--security-protocol", "ssl", "--ssl-cafile", str(missing)]) == 2
    err = capsys.readouterr().err
    # --security-protocol SSL replaced SASL_SSL, so the SASL settings are now an error
    assert "DETECTOR_KAFKA_SASL_MECHANISM is set but DETECTOR_KAFKA_SECURITY_PROTOCOL is SSL" in err


def test_a_bad_setting_is_a_clean_error_not_a_traceback(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DETECTOR_KAFKA_SECURITY_PROTOCOL", "SASL")
    assert main(["topics"]) == 2
    assert "configuration error: DETECTOR_KAFKA_SECURITY_PROTOCOL" in capsys.readouterr().err


def test_bootstrap_hosts() -> None:
    assert kafka_security.bootstrap_hosts("b-1.msk:9096,b-2.msk:9096") == [("b-1.msk", 9096),
                                                                           ("b-2.msk", 9096)]


# --------------------------------------------------------------------------- retention


def test_durations() -> None:
    assert parse_duration_s("X", "7d") == 604800.0
    assert parse_duration_s("X", "36h") == 129600.0
    for bad in ("", "-1d", "0", "inf", "nan", "7 days"):
        with pytest.raises(ConfigError, match="X: expected"):
            parse_duration_s("X", bad)


def test_every_topic_spec_has_a_retention() -> None:
    s = load_settings(env={"DETECTOR_RETENTION_DECISIONS": "2d", "DETECTOR_APP_ID": "a"})
    specs = io.topic_specs(s)
    assert {f"a-{t}-changelog" for t in retention.CHANGELOG_TABLES} <= set(specs)
    for name, (_, cfg) in specs.items():
        if name == s.topic_lists:
            assert cfg["cleanup.policy"] == "compact" and cfg["delete.retention.ms"] == "86400000"
        else:
            assert int(cfg["retention.ms"]) >= 86400000, name
            assert int(cfg["segment.ms"]) <= 86400000, name
    assert specs[s.topic_decisions][1]["retention.ms"] == str(2 * 86400 * 1000)
    assert specs["a-seen-changelog"][1]["cleanup.policy"] == "compact,delete"


def test_app_declares_internal_topics_and_changelogs_with_retention_and_a_closed_web() -> None:
    from detector.core.ipintel import IpIntel
    from detector.runtime import build_context
    from detector.stream.app import StreamRuntime, make_app
    from detector.stream.web_surface import ClosedWeb

    s = load_settings(env={"DETECTOR_RETENTION_INTERNAL": "3d"}, app_id=f"t-{uuid.uuid4().hex[:6]}")
    rt = StreamRuntime(s, build_context(s), IpIntel(), None)
    app = make_app(s, rt=rt, web=False, prometheus=False)
    assert set(rt.tables) == set(retention.CHANGELOG_TABLES)
    for name, table in rt.tables.items():
        topic = table.changelog_topic
        assert topic.get_topic_name() == retention.changelog_topic(s, name)
        assert topic.config == retention.changelog_config(s)
    for key in ("by_ip", "by_range"):
        assert rt.topics[key].config["retention.ms"] == str(3 * 86400 * 1000)
    assert app.conf.web_bind == "127.0.0.1"
    assert not (app.conf.web_tables_enabled or app.conf.web_router_enabled
                or app.conf.web_stats_enabled or app.conf.web_graph_enabled)
    assert isinstance(app.web, ClosedWeb)
    assert app.web.blueprints._enabled == []  # no built-in Faust view at all
