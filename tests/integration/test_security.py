"""Kafka TLS + SASL, the worker's HTTP surface and topic retention, on a real broker.

One broker for the module, started by tools/kafka/kafka.sh with a SASL_SSL listener: a test CA,
broker and client certificates made with openssl, SCRAM users created at format time
(``kafka-storage format --add-scram``). The worker (mutual TLS + SCRAM-SHA-512, password from a
file) and the CLI (``topics``, ``produce``, ``lists``, ``tail``; SCRAM-SHA-256 and PLAIN, password
from the environment) connect only through the SASL_SSL listener.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_pipeline import list_keys

from detector.config import load_settings
from detector.stream import io, retention

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "alice-" + uuid.uuid4().hex[:16]  # also: must never show in a log or an error
WRONG = "wrong-" + uuid.uuid4().hex[:16]
FAIL_FAST_S = 20.0  # a refused client must give up within this (measured: about 1-2 s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def tls_broker() -> Iterator[Any]:
    from kafka_broker import KafkaBroker, KafkaBrokerError

    broker = KafkaBroker(sasl_ssl=True, scram_users={"alice": PASSWORD},
                         start_timeout=float(os.environ.get("KAFKA_START_TIMEOUT", "90")))
    error: KafkaBrokerError | None = None
    try:
        broker.start()
    except KafkaBrokerError as exc:
        error = exc
    if error is not None:
        pytest.fail(f"could not start a SASL_SSL Kafka broker with tools/kafka/kafka.sh:\n{error}",
                    pytrace=False)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("security")


PII_HASH_KEY = secrets.token_hex(32)


def secure_env(broker: Any, prefix: str, tmp: Path, mechanism: str = "SCRAM-SHA-512",
               password: str = PASSWORD) -> dict[str, str]:
    (tmp / "models").mkdir(exist_ok=True)
    return {
        # a deployment as it should be: a real PII hash key (no development mode) and signed lists
        "DETECTOR_PII_HASH_KEY": PII_HASH_KEY,
        **list_keys(tmp),
        "DETECTOR_KAFKA_BOOTSTRAP": broker.tls.bootstrap,
        "DETECTOR_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "DETECTOR_KAFKA_SASL_MECHANISM": mechanism,
        "DETECTOR_KAFKA_SASL_USERNAME": "alice",
        "DETECTOR_KAFKA_SASL_PASSWORD": password,
        "DETECTOR_KAFKA_SSL_CAFILE": str(broker.tls.cafile),
        "DETECTOR_APP_ID": prefix,
        "DETECTOR_TOPIC_REQUESTS": f"{prefix}-requests",
        "DETECTOR_TOPIC_DECISIONS": f"{prefix}-decisions",
        "DETECTOR_TOPIC_OUTCOMES": f"{prefix}-outcomes",
        "DETECTOR_TOPIC_LISTS": f"{prefix}-lists",
        "DETECTOR_TOPIC_DEAD_LETTER": f"{prefix}-dlq",
        "DETECTOR_PARTITIONS": "1",
        "DETECTOR_MODELS_DIR": str(tmp / "models"),
        "DETECTOR_LOG_LEVEL": "INFO",
    }


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DETECTOR_")}
    return {**base, **extra}


def cli(env: dict[str, str], *args: str, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603
        [sys.executable, "-m", "detector.cli", *args], cwd=REPO, env=clean_env(env),
        capture_output=True, text=True, timeout=timeout, check=False)


class Worker:
    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self.port = free_port()
        self.log_path = tmp / f"worker-{self.port}.log"
        self.env = clean_env({**env, "DETECTOR_WEB_PORT": str(self.port),
                              "DETECTOR_DATA_DIR": str(tmp / f"worker-{self.port}")})
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(  # noqa: S603
                [sys.executable, "-m", "detector.stream.worker"], cwd=REPO, env=self.env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=3) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> dict[str, Any]:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"worker exited:\n{self.log()}"
            try:
                status, body = self.get("/healthz")
                h = json.loads(body)
                if status == 200 and h["lists_ready"] and h["partitions"].get("by_range"):
                    return dict(h)
            except (OSError, ValueError):
                pass
            time.sleep(0.3)
        raise AssertionError(f"worker not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def secure_worker(tls_broker: Any, tmp_module: Path) -> Iterator[tuple[Worker, dict[str, str]]]:
    """One worker over SASL_SSL with SCRAM-SHA-512 and a client certificate (mutual TLS); its
    password comes from a file, its client key is encrypted (password from a file too)."""
    prefix = f"sec-{uuid.uuid4().hex[:8]}"
    env = secure_env(tls_broker, prefix, tmp_module)
    secret = tmp_module / "sasl-password"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    worker_env = {k: v for k, v in env.items() if k != "DETECTOR_KAFKA_SASL_PASSWORD"}
    worker_env.update({
        "DETECTOR_KAFKA_SASL_PASSWORD_FILE": str(secret),
        "DETECTOR_KAFKA_SSL_CERTFILE": str(tls_broker.tls.client_cert),
        "DETECTOR_KAFKA_SSL_KEYFILE": str(tls_broker.tls.client_key),
        "DETECTOR_KAFKA_SSL_KEY_PASSWORD_FILE": str(tls_broker.tls.client_key_password_file),
    })
    t0 = time.monotonic()
    w = Worker(worker_env, tmp_module).start()
    try:
        w.wait_ready()
        sys.stderr.write(f"secure worker ready in {time.monotonic() - t0:.1f} s\n")
        yield w, env
    except BaseException:
        sys.stderr.write(w.log()[-4000:] + "\n")
        raise
    finally:
        w.kill()


def request(rid: str, phone: str, ip: str) -> dict[str, Any]:
    return {"request_id": rid, "ts": time.time(), "phone_number": phone, "ip": ip}


# ------------------------------------------------------------------------- SASL_SSL end to end


def test_worker_and_cli_over_sasl_ssl(secure_worker: tuple[Worker, dict[str, str]],
                                      tmp_module: Path) -> None:
    w, env = secure_worker
    t0 = time.monotonic()
    # `detector topics` with SCRAM-SHA-256 (flags on top of the environment): all exist already.
    r = cli({**env, "DETECTOR_KAFKA_SASL_MECHANISM": "PLAIN"}, "topics",
            "--sasl-mechanism", "SCRAM-SHA-256")
    assert r.returncode == 0, r.stderr
    assert "nothing (all exist)" in r.stdout, r.stdout

    # The SOC denies one number (PLAIN over TLS); the worker picks the entry up.
    denied = "+442079460077"
    r = cli({**env, "DETECTOR_KAFKA_SASL_MECHANISM": "PLAIN"}, "lists", "add", "deny", "number",
            denied, "--reason", "sasl test")
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 30
    while json.loads(w.get("/healthz")[1])["lists"] < 1:
        assert time.monotonic() < deadline, "the worker never read the list entry"
        time.sleep(0.3)
    r = cli(env, "lists", "show")
    assert r.returncode == 0 and f"deny  number  {denied}" in r.stdout, (r.stdout, r.stderr)

    rows = [request(f"s{i}", f"+4420794600{10 + i}", f"81.2.69.{10 + i}") for i in range(20)]
    rows.append(request("s-denied", denied, "81.2.69.99"))
    path = tmp_module / "requests.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    r = cli(env, "produce", str(path))
    assert r.returncode == 0, r.stderr
    assert f"produced {len(rows)} messages" in r.stderr, r.stderr

    r = cli(env, "tail", "-n", str(len(rows)), "--from-beginning", "--full", timeout=90)
    assert r.returncode == 0, r.stderr
    got = {d["request_id"]: d for d in map(json.loads, r.stdout.splitlines())}
    assert set(got) == {x["request_id"] for x in rows}
    assert got["s-denied"]["action"] == "block"
    assert got["s-denied"]["reasons"][0] == "denylist_number", got["s-denied"]
    sys.stderr.write(f"SASL_SSL CLI round trip (topics, lists, produce, tail): "
                     f"{time.monotonic() - t0:.1f} s\n")

    # The password is a secret: not in the worker's log, not in any CLI output.
    assert PASSWORD not in w.log()
    assert "SASL_SSL, SCRAM-SHA-512 as user 'alice'" in w.log()
    assert PASSWORD not in r.stdout + r.stderr


# ------------------------------------------------------------------------- failing fast


@pytest.mark.parametrize("command", [["topics"], ["tail", "-n", "1"], ["lists", "show"],
                                     ["produce", "REQUESTS"]])
def test_wrong_password_fails_fast_with_a_clear_error(tls_broker: Any, tmp_module: Path,
                                                      command: list[str]) -> None:
    env = secure_env(tls_broker, f"bad-{uuid.uuid4().hex[:6]}", tmp_module, password=WRONG)
    path = tmp_module / "one.jsonl"
    path.write_text(json.dumps(request("x", "+442079460018", "81.2.69.1")) + "\n")
    args = [str(path) if a == "REQUESTS" else a for a in command]
    t0 = time.monotonic()
    r = cli(env, *args, timeout=60)
    took = time.monotonic() - t0
    sys.stderr.write(f"wrong password, detector {command[0]}: exit {r.returncode} after {took:.1f} s\n")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert took < FAIL_FAST_S
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("detector: "), r.stderr
    assert f"cannot connect to Kafka at {tls_broker.tls.bootstrap}" in last
    assert "SASL_SSL, SCRAM-SHA-512 as user 'alice'" in last
    assert "Authentication failed" in last and "DETECTOR_KAFKA_SASL_PASSWORD" in last
    assert WRONG not in r.stderr and "Traceback" not in r.stderr


def test_worker_with_a_wrong_password_exits_fast(tls_broker: Any, tmp_module: Path) -> None:
    env = secure_env(tls_broker, f"badw-{uuid.uuid4().hex[:6]}", tmp_module, password=WRONG)
    w = Worker(env, tmp_module)
    t0 = time.monotonic()
    w.start()
    assert w.proc is not None
    try:
        code = w.proc.wait(timeout=60)
    finally:
        w.kill()
    took = time.monotonic() - t0
    sys.stderr.write(f"wrong password, worker: exit {code} after {took:.1f} s\n")
    log = w.log()
    assert code == 2, log
    assert took < FAIL_FAST_S + 10, log  # + interpreter and Faust import time
    assert "detector worker: topics: cannot connect to Kafka" in log
    assert "Authentication failed" in log and WRONG not in log


def test_missing_or_wrong_ca_fails_with_a_clear_error(tls_broker: Any, tmp_module: Path) -> None:
    env = secure_env(tls_broker, f"ca-{uuid.uuid4().hex[:6]}", tmp_module)
    missing = str(tmp_module / "no-such-ca.pem")
    r = cli({**env, "DETECTOR_KAFKA_SSL_CAFILE": missing}, "topics", timeout=30)
    assert r.returncode == 2, r.stderr
    assert f"DETECTOR_KAFKA_SSL_CAFILE: file '{missing}' does not exist" in r.stderr

    w = Worker({**env, "DETECTOR_KAFKA_SSL_CAFILE": missing}, tmp_module).start()
    assert w.proc is not None
    try:
        assert w.proc.wait(timeout=30) == 2
    finally:
        w.kill()
    assert "DETECTOR_KAFKA_SSL_CAFILE: file" in w.log() and "does not exist" in w.log()

    # A CA that did not sign the broker's certificate (the system's CAs): refused, and said so.
    env.pop("DETECTOR_KAFKA_SSL_CAFILE")
    t0 = time.monotonic()
    r = cli(env, "topics", timeout=60)
    assert r.returncode == 1, r.stderr
    assert time.monotonic() - t0 < FAIL_FAST_S
    assert "TLS certificate not trusted" in r.stderr and "DETECTOR_KAFKA_SSL_CAFILE" in r.stderr


# ------------------------------------------------------------------------- HTTP surface


def test_worker_serves_only_metrics_and_healthz(secure_worker: tuple[Worker, dict[str, str]]) -> None:
    w, _ = secure_worker
    status, body = w.get("/metrics")
    assert status == 200 and "detector_" in body
    status, body = w.get("/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    # Faust's default views: table contents, router, statistics, assignment, graph, performance.
    for path in ("/table/", "/table/seen/", "/table/seen/s1/", "/table/pair/", "/router/",
                 "/router/seen/s1/", "/", "/assignment/", "/graph/", "/performance/",
                 "/stats/", "/signal/",
                 "/v1/precheck", "/v1/precheck?ip=81.2.69.160"):  # no DETECTOR_PRECHECK_TOKEN: no route
        status, body = w.get(path)
        assert status == 404, f"{path} is served ({status}): {body[:200]}"
    # Bound to loopback by default (DETECTOR_WEB_BIND): not reachable on another local address.
    assert w.env.get("DETECTOR_WEB_BIND") is None
    addrs = _non_loopback_addresses()
    for addr in addrs[:1]:
        with pytest.raises(OSError), socket.create_connection((addr, w.port), timeout=2):
            pass


def _non_loopback_addresses() -> list[str]:
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5,  # noqa: S607
                             check=False).stdout.split()
    except OSError:
        return []
    return [a for a in out if ":" not in a and not a.startswith("127.")]


# ------------------------------------------------------------------------- retention


def test_every_topic_the_detector_creates_has_retention(
        secure_worker: tuple[Worker, dict[str, str]]) -> None:
    _, env = secure_worker
    settings = load_settings(env=env)
    configs = asyncio.run(_describe(settings, list(io.topic_specs(settings))))
    day = 86_400_000
    for name, (_, want) in io.topic_specs(settings).items():
        got = configs[name]
        if name == settings.topic_lists:
            assert got["cleanup.policy"] == "compact", name
            assert got["delete.retention.ms"] == str(day), name
            continue
        assert got["retention.ms"] == str(7 * day), (name, got["retention.ms"])
        assert int(got["segment.ms"]) <= day, name
        assert got["cleanup.policy"] == ("compact,delete" if name.endswith("-changelog")
                                         else "delete"), name
        assert {k: got[k] for k in want} == want, name
    assert {retention.changelog_topic(settings, t) for t in retention.CHANGELOG_TABLES} <= set(configs)


async def _describe(settings: Any, topics: list[str]) -> dict[str, dict[str, str]]:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    from detector.stream.kafka_security import client_kwargs

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, **client_kwargs(settings))
    await admin.start()
    try:
        resp = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, t) for t in topics])
    finally:
        await admin.close()
    out: dict[str, dict[str, str]] = {}
    for r in resp:
        for res in r.to_object()["resources"]:
            assert res["error_code"] == 0, res
            out[res["resource_name"]] = {c["config_names"]: c["config_value"]
                                         for c in res["config_entries"]}
    return out
