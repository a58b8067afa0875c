"""Fixtures for integration tests against a real Apache Kafka broker.

``kafka_bootstrap`` (session): ``DETECTOR_KAFKA_BOOTSTRAP`` if set (a broker
that is already running), else a broker started by ``tools/kafka/kafka.sh``
for the whole session and stopped at its end.  A broker that cannot be
started or reached FAILS the tests, it never skips them.

Environment:
  DETECTOR_KAFKA_BOOTSTRAP   use this broker instead of starting one
  DETECTOR_KAFKA_DIR         broker dir to use (kept after the run, for debugging)
  KAFKA_START_TIMEOUT        seconds to wait for the broker (default 90)
"""

from __future__ import annotations

import os
import re
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parents[1])
if _TESTS_DIR not in sys.path:  # make tests/kafka_broker.py importable as kafka_broker
    sys.path.insert(0, _TESTS_DIR)

from kafka_broker import KafkaBroker, KafkaBrokerError, wait_for_broker  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    # pyproject.toml registers the marker too; only add it when it does not.
    if not any(str(m).startswith("integration") for m in config.getini("markers")):
        config.addinivalue_line(
            "markers", "integration: needs a real Apache Kafka broker (tools/kafka/kafka.sh)"
        )
    if not any(str(m).startswith("faults") for m in config.getini("markers")):
        config.addinivalue_line(
            "markers", "faults: fault injection against the broker and workers (make soak: long)"
        )


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap servers (``host:port``) of a real, running Kafka broker."""
    given = os.environ.get("DETECTOR_KAFKA_BOOTSTRAP", "").strip()
    if given:
        unreachable: KafkaBrokerError | None = None
        try:
            wait_for_broker(given, timeout=30)
        except KafkaBrokerError as exc:
            unreachable = exc
        if unreachable is not None:
            pytest.fail(
                f"DETECTOR_KAFKA_BOOTSTRAP={given} is set but no broker answers there:\n{unreachable}",
                pytrace=False,
            )
        yield given
        return

    broker = KafkaBroker(
        os.environ.get("DETECTOR_KAFKA_DIR") or None,
        start_timeout=float(os.environ.get("KAFKA_START_TIMEOUT", "90")),
    )
    error: KafkaBrokerError | None = None
    try:
        bootstrap = broker.start()
    except KafkaBrokerError as exc:
        error = exc
    if error is not None:  # fail outside the except: one clean message, no chained traceback
        pytest.fail(f"could not start a Kafka broker with tools/kafka/kafka.sh:\n{error}", pytrace=False)
    try:
        yield bootstrap
    finally:
        broker.stop()


@pytest.fixture
def fresh_topic_prefix(request: pytest.FixtureRequest) -> str:
    """A topic-name prefix unique to this test (legal Kafka topic characters only)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name).strip("-.")[:40]
    return f"it-{name}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL server (Debian's initdb/pg_ctl, temp dir, free port) for the session."""
    from pg_server import PostgresError, PostgresServer

    error: PostgresError | None = None
    try:
        server = PostgresServer()
        url = server.start()
    except PostgresError as exc:
        error = exc
    if error is not None:
        pytest.fail(f"could not start PostgreSQL:\n{error}", pytrace=False)
    try:
        yield url
    finally:
        server.stop()
