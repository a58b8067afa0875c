"""Kafka TLS and SASL for every client: the one place that turns :class:`Settings` into options.

Every Kafka client of the detector gets its security from here, so the worker, the CLI
(``produce``, ``tail``, ``lists``, ``topics``) and the benchmarks connect the same way:

* :func:`client_kwargs` for ``AIOKafkaProducer`` / ``AIOKafkaConsumer`` / ``AIOKafkaAdminClient``
  (``security_protocol``, ``sasl_mechanism``, ``sasl_plain_username``/``password``,
  ``ssl_context``);
* :func:`faust_credentials` for the Faust app's ``broker_credentials``;
* :func:`start` starts a client within a time bound and turns a failure (bad password, unknown
  CA, wrong protocol, no broker) into one :class:`KafkaConnectError` that says what was tried
  and what the broker answered, instead of a retry loop or a bare "Unable to bootstrap".

The SASL password is a :class:`~detector.config.Secret`: it leaves it only inside the client
options and never appears in :func:`describe`, a log line or an error.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from detector.config import Settings
from detector.core.errors import DetectorError

CONNECT_TIMEOUT_S = 30.0  # a client that cannot start within this fails (never hangs)


class KafkaConnectError(DetectorError):
    """The Kafka cluster could not be reached or refused the credentials."""


def protocol(settings: Settings) -> str:
    return settings.kafka_security_protocol.upper()


def uses_tls(settings: Settings) -> bool:
    return protocol(settings) in ("SSL", "SASL_SSL")


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """A client TLS context (None without TLS): the CA file (or the system's trusted CAs), the
    client certificate and key if given, hostname verification as configured. The chain is
    always verified; turning hostname checks off only skips matching the broker's name."""
    if not uses_tls(settings):
        return None
    cafile = str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise KafkaConnectError(f"DETECTOR_KAFKA_SSL_CAFILE: cannot load CA certificates from "
                                f"{cafile!r}: {exc}") from None
    ctx.check_hostname = settings.kafka_ssl_check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    if settings.kafka_ssl_certfile is not None:
        password = settings.kafka_ssl_key_password
        try:
            ctx.load_cert_chain(str(settings.kafka_ssl_certfile),
                                str(settings.kafka_ssl_keyfile) if settings.kafka_ssl_keyfile else None,
                                password.get_secret_value() if password is not None else None)
        except (OSError, ssl.SSLError) as exc:
            raise KafkaConnectError(
                "DETECTOR_KAFKA_SSL_CERTFILE / DETECTOR_KAFKA_SSL_KEYFILE: cannot load the client "
                f"certificate {str(settings.kafka_ssl_certfile)!r} with key "
                f"{str(settings.kafka_ssl_keyfile)!r} (wrong DETECTOR_KAFKA_SSL_KEY_PASSWORD?): "
                f"{exc}") from None
    return ctx


def client_kwargs(settings: Settings) -> dict[str, Any]:
    """Security options for any aiokafka client (``**client_kwargs(s)``)."""
    out: dict[str, Any] = {"security_protocol": protocol(settings)}
    ctx = ssl_context(settings)
    if ctx is not None:
        out["ssl_context"] = ctx
    if protocol(settings).startswith("SASL_"):
        assert settings.kafka_sasl_password is not None  # config validated it
        out["sasl_mechanism"] = (settings.kafka_sasl_mechanism or "").upper()
        out["sasl_plain_username"] = settings.kafka_sasl_username
        out["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    return out


def faust_credentials(settings: Settings) -> Any:
    """The Faust app's ``broker_credentials`` (None for PLAINTEXT)."""
    import faust

    proto = protocol(settings)
    if proto == "PLAINTEXT":
        return None
    ctx = ssl_context(settings)
    if proto == "SSL":
        return faust.SSLCredentials(ctx)
    assert settings.kafka_sasl_password is not None  # config validated it
    creds = faust.SASLCredentials(username=settings.kafka_sasl_username,
                                  password=settings.kafka_sasl_password.get_secret_value(),
                                  ssl_context=ctx,
                                  mechanism=(settings.kafka_sasl_mechanism or "").upper())
    assert creds.protocol.value == proto
    return creds


def describe(settings: Settings) -> str:
    """How we connect, for logs and errors (never the password).

    >>> describe(Settings())
    'PLAINTEXT (no TLS, no authentication)'
    """
    proto = protocol(settings)
    parts = [proto]
    if proto.startswith("SASL_"):
        parts.append(f"{(settings.kafka_sasl_mechanism or '').upper()} as user "
                     f"{settings.kafka_sasl_username!r}")
    if uses_tls(settings):
        parts.append(f"CA {str(settings.kafka_ssl_cafile)!r}" if settings.kafka_ssl_cafile
                     else "system CAs")
        if settings.kafka_ssl_certfile:
            parts.append(f"client certificate {str(settings.kafka_ssl_certfile)!r}")
        if not settings.kafka_ssl_check_hostname:
            parts.append("hostname check OFF")
    if proto == "PLAINTEXT":
        return "PLAINTEXT (no TLS, no authentication)"
    return ", ".join(parts)


def bootstrap_hosts(bootstrap: str) -> list[tuple[str, int]]:
    """``host:port`` pairs of a bootstrap string (port 9092 when absent; ``[v6]:port``).

    >>> bootstrap_hosts("a:9093, b,[::1]:19092")
    [('a', 9093), ('b', 9092), ('::1', 19092)]
    """
    out = []
    for part in (p.strip() for p in bootstrap.split(",")):
        if not part:
            continue
        if part.startswith("["):
            host, _, rest = part[1:].partition("]")
            port = rest.lstrip(":") or "9092"
        else:
            host, _, port = part.rpartition(":") if part.count(":") == 1 else (part, "", "9092")
        out.append((host, int(port)))
    return out


async def diagnose(settings: Settings, timeout: float = 10.0) -> str:
    """Connect, authenticate and ask each bootstrap broker for metadata once; the causes of
    the failures (what the broker said, and which setting to check)."""
    from aiokafka.conn import create_conn
    from aiokafka.errors import KafkaConnectionError
    from aiokafka.protocol.metadata import MetadataRequest

    kwargs = client_kwargs(settings)
    wrong_protocol = (f"the broker closed the connection: does this listener speak "
                      f"{protocol(settings)}? check DETECTOR_KAFKA_SECURITY_PROTOCOL and the port")
    causes = []
    for host, port in bootstrap_hosts(settings.kafka_bootstrap):
        where = f"{host}:{port}"
        try:
            conn = await asyncio.wait_for(
                create_conn(host, port, request_timeout_ms=int(timeout * 1000), **kwargs), timeout)
        except TimeoutError:
            causes.append(f"{where}: no answer within {timeout:.0f} s")
            continue
        except ssl.SSLCertVerificationError as exc:
            causes.append(f"{where}: TLS certificate not trusted ({exc.verify_message}); "
                          "check DETECTOR_KAFKA_SSL_CAFILE and DETECTOR_KAFKA_SSL_CHECK_HOSTNAME")
            continue
        except ConnectionRefusedError:
            causes.append(f"{where}: connection refused (nothing listens there; check "
                          "DETECTOR_KAFKA_BOOTSTRAP)")
            continue
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError,
                KafkaConnectionError) as exc:
            causes.append(f"{where}: {str(exc) or type(exc).__name__} ({wrong_protocol})")
            continue
        except Exception as exc:
            text = str(exc) or type(exc).__name__
            if "SaslAuthentication" in text or "Authentication failed" in text:
                text += (" (check DETECTOR_KAFKA_SASL_USERNAME, DETECTOR_KAFKA_SASL_PASSWORD and "
                         "DETECTOR_KAFKA_SASL_MECHANISM)")
            causes.append(f"{where}: {text}")
            continue
        try:
            await asyncio.wait_for(conn.send(MetadataRequest([])), timeout)
        except Exception as exc:
            causes.append(f"{where}: connected, but the first request failed: "
                          f"{str(exc) or type(exc).__name__} ({wrong_protocol})")
        finally:
            conn.close()
    return "; ".join(causes) if causes else "every broker answers a metadata request now (retry?)"


async def start(client: Any, settings: Settings, what: str,
                timeout: float = CONNECT_TIMEOUT_S) -> None:
    """``await client.start()`` within ``timeout``; on failure close the client and raise
    :class:`KafkaConnectError` naming the bootstrap, the security settings and the cause."""
    try:
        await asyncio.wait_for(client.start(), timeout)
        return
    except Exception as exc:
        first = exc
    try:
        closer = getattr(client, "stop", None) or client.close
        await asyncio.wait_for(closer(), 5.0)
    except Exception:  # noqa: S110 - the client never started; nothing else to release
        pass
    if isinstance(first, TimeoutError):
        cause = f"no connection within {timeout:.0f} s; {await diagnose(settings)}"
    else:
        cause = await diagnose(settings)
    raise KafkaConnectError(
        f"{what}: cannot connect to Kafka at {settings.kafka_bootstrap} with "
        f"{describe(settings)}: {cause}") from None
