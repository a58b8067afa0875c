"""The dashboards and alerts work against a real Prometheus scraping a real detector worker.

A real Kafka broker (fixture ``kafka_bootstrap``), one detector worker
(``python -m detector.stream.worker``) with an active and a shadow model, IP databases and a
lists file, and a real Prometheus (Debian package, tools/prometheus/install.sh) scraping the
worker every second and evaluating prometheus/alerts.yml. The worker gets a simulated day of
traffic (legit customers and every attack scenario), malformed messages (dead letters),
redelivered requests (duplicates), list changes on the lists topic and dialer outcomes.

Then every PromQL query of every dashboard panel must run and return data, every alert
expression must run and every series selector in it must match series, and every rule must
evaluate without error. A missing ``prometheus`` binary or a worker that does not start FAILS.

Environment:
  PROMETHEUS_BIN          prometheus binary (default: on PATH, else /usr/bin/prometheus)
  DETECTOR_IT_KEEP_DIR    keep the worker/Prometheus dir (logs, TSDB) here for debugging
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kafka_broker import create_topics

pytestmark = [pytest.mark.integration, pytest.mark.prometheus]

ROOT = Path(__file__).resolve().parents[2]
PARTITIONS = 2
GRAFANA_MACROS = {"$__rate_interval": "1m", "$__interval": "1s", "$__range": "1h",
                  "$__range_s": "3600", "$__interval_ms": "1000"}
START_TIMEOUT_S = 120.0
PROCESS_TIMEOUT_S = 300.0


# --- small helpers ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback only
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def tail(path: Path, lines: int = 80) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def substitute_macros(expr: str) -> str:
    for macro in sorted(GRAFANA_MACROS, key=len, reverse=True):
        expr = expr.replace(macro, GRAFANA_MACROS[macro])
    return expr


_TOKEN = re.compile(
    r'"(?:[^"\\]|\\.)*"'                       # string
    r"|\[[^\]]*\]"                             # range / subquery
    r"|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?[smhdwy]?"  # number or duration
    r"|(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?P<matchers>\s*\{[^}]*\})?"
    r"|\{[^}]*\}"                              # selector without a metric name
)
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_KEYWORDS = {"and", "or", "unless", "offset", "bool", "group_left", "group_right", "inf", "nan",
             "Inf", "NaN", "atan2"}


def selectors(expr: str) -> set[str]:
    """Series selectors (``name{matchers}``) of a PromQL expression.

    >>> sorted(selectors('sum by (le) (rate(a_bucket{x="1.5"}[5m])) > 1e-9 and on() up'))
    ['a_bucket{x="1.5"}', 'up']
    """
    text = _GROUPING.sub(" ", substitute_macros(expr))
    out = set()
    for m in _TOKEN.finditer(text):
        name = m.group("name")
        if not name or name in _KEYWORDS or text[m.end():].lstrip().startswith("("):
            continue
        out.add(name + re.sub(r"\s+", "", m.group("matchers") or ""))
    return out


def test_selector_extraction() -> None:
    expr = ('(time() - max(detector_last_decision_timestamp_seconds)) > 300 and on() '
            'sum(increase(detector_requests_total[10m])) > 10 or on() group_left '
            'rate(x_total{reason=~"a|b", le="0.25"}[$__rate_interval] offset 10m) > 1e-9')
    assert selectors(expr) == {"detector_last_decision_timestamp_seconds",
                               "detector_requests_total", 'x_total{reason=~"a|b",le="0.25"}'}


@dataclass
class Query:
    where: str
    expr: str
    instant: bool = False


def dashboard_queries() -> list[Query]:
    out = []
    for path in sorted((ROOT / "grafana" / "dashboards").glob("*.json")):
        dash = json.loads(path.read_text(encoding="utf-8"))
        stack = list(dash["panels"])
        while stack:
            p = stack.pop(0)
            stack.extend(p.get("panels", []))
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append(Query(f"{path.name} / {p['title']} / {t['refId']}",
                                     substitute_macros(t["expr"]), bool(t.get("instant"))))
    return out


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((ROOT / "prometheus" / "alerts.yml").read_text(encoding="utf-8"))
    return [r for g in doc["groups"] for r in g["rules"]]


# --- Prometheus ------------------------------------------------------------------------------


def prometheus_binary() -> str:
    given = os.environ.get("PROMETHEUS_BIN")
    path = given or shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(path).is_file():
        pytest.fail(f"no Prometheus binary at {path}: run tools/prometheus/install.sh", pytrace=False)
    return path


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        status, body = http_get(f"{self.url}/api/v1/{path}?{query}", timeout=30)
        doc = json.loads(body)
        if status != 200 or doc.get("status") != "success":
            raise AssertionError(f"{path} {params}: HTTP {status}: {doc.get('error') or body[:300]!r}")
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("query", query=expr)["result"]

    def query_range(self, expr: str, seconds: float = 120.0, step: float = 2.0) -> list[dict[str, Any]]:
        end = time.time()
        return self.api("query_range", query=expr, start=end - seconds, end=end, step=step)["result"]

    def scalar(self, expr: str) -> float:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else math.nan

    def series(self, selector: str, seconds: float = 3600.0) -> list[dict[str, str]]:
        end = time.time()
        return self.api("series", **{"match[]": selector, "start": end - seconds, "end": end})


def start_prometheus(workdir: Path, worker_port: int) -> Prometheus:
    binary = prometheus_binary()
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ROOT / "prometheus" / "alerts.yml")],
        "scrape_configs": [{
            "job_name": "detector",
            "metrics_path": "/metrics",
            "static_configs": [{"targets": [f"127.0.0.1:{worker_port}"]}],
        }],
    }
    cfg = workdir / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(config), encoding="utf-8")
    log = workdir / "prometheus.log"
    with log.open("wb") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(  # noqa: S603
            [binary, f"--config.file={cfg}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT, cwd=workdir,
        )
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited with {proc.returncode}:\n{tail(log)}", pytrace=False)
        try:
            if http_get(f"{prom.url}/-/ready", timeout=2)[0] == 200:
                return prom
        except OSError:
            pass
        time.sleep(0.2)
    stop(proc)
    pytest.fail(f"prometheus not ready after 60s:\n{tail(log)}", pytrace=False)


def stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# --- the worker and its traffic ----------------------------------------------------------------


@dataclass
class Traffic:
    requests: list[dict[str, Any]]
    malformed: list[bytes]
    duplicates: list[dict[str, Any]]
    outcomes: list[dict[str, Any]]
    list_updates: list[tuple[str, dict[str, Any] | None]]  # key, value (None = tombstone)
    topics: dict[str, str] = field(default_factory=dict)
    queue_states: list[tuple[bytes, bytes]] = field(default_factory=list)  # the dialer's


def make_traffic(now: float, soc: Any = None) -> Traffic:
    from detector.sim import SimConfig, simulate

    cfg = SimConfig(seed=11, legit_per_day=3000, attack_scale=0.5)
    shift = now - cfg.end  # the simulated day ends now
    requests = []
    for item in simulate(cfg):
        req = dict(item.request)
        req["ts"] = round(float(req["ts"]) + shift, 3)
        requests.append(req)
    malformed = [b"{not json", b"", b"[1, 2]", b'{"ts": 1}',
                 json.dumps({"request_id": "x", "ts": now, "phone_number": 12, "ip": "1.2.3.4"}).encode()]
    malformed = malformed * 8
    duplicates = requests[-40:]
    outcomes = [{"request_id": r["request_id"], "phone_number": r["phone_number"],
                 "outcome": outcome, "ts": now, "duration_s": 30.0}
                for r, outcome in zip(requests[-300:-200],
                                      ["completed", "no_answer", "busy", "machine", "agent_marked_spam"] * 20,
                                      strict=True)]
    list_updates: list[tuple[str, dict[str, Any] | None]] = [
        ("deny:ip:203.0.113.7", {"action": "deny", "kind": "ip", "value": "203.0.113.7",
                                 "reason": "soc test", "added_at": now, "source": "soc"}),
        ("deny:prefix:+88234", {"action": "deny", "kind": "prefix", "value": "+88234",
                                "reason": "IRSF range", "added_at": now, "source": "soc"}),
        ("allow:number:+442079460018", {"action": "allow", "kind": "number",
                                        "value": "+442079460018", "added_at": now, "source": "soc"}),
        ("deny:ip:203.0.113.7", None),  # a bare tombstone: refused (removals are signed records)
    ]
    if soc is not None:  # signed by the SOC key, as `detector lists add` does
        from detector.core.lists import entry_from_dict

        list_updates = [(k, None if v is None else soc.sign(entry_from_dict(v), signed_at=now))
                        for k, v in list_updates]
    return Traffic(requests, malformed, duplicates, outcomes, list_updates)


async def produce(bootstrap: str, traffic: Traffic) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        t = traffic.topics
        for key, value in traffic.list_updates:
            await producer.send(t["lists"], None if value is None else json.dumps(value).encode(),
                                key=key.encode())
        for key, value in traffic.queue_states:
            await producer.send(t["queue_state"], value, key=key)
        await producer.flush()
        step = max(1, len(traffic.requests) // len(traffic.malformed))
        for i, req in enumerate(traffic.requests):
            await producer.send(t["requests"], json.dumps(req).encode(),
                                key=req["phone_number"].encode())
            if i % step == 0 and i // step < len(traffic.malformed):
                await producer.send(t["requests"], traffic.malformed[i // step])
        for req in traffic.duplicates:  # redelivery: same request id again
            await producer.send(t["requests"], json.dumps(req).encode(),
                                key=req["phone_number"].encode())
        for out in traffic.outcomes:
            await producer.send(t["outcomes"], json.dumps(out).encode(),
                                key=out["phone_number"].encode())
        await producer.flush()
    finally:
        await producer.stop()


PRECHECK_TOKEN = "prom-it-" + uuid.uuid4().hex + uuid.uuid4().hex


def queue_states(dialer_key: Any) -> list[tuple[bytes, bytes]]:
    """The dialer's signed queue states (over capacity, then drained) and one unsigned (refused)."""
    from detector.core.capacity import QueueState, QueueStateSigner

    signer, now = QueueStateSigner(dialer_key), time.time()
    states = [QueueState("dialer-1", now + i, waiting, 5, 240.0)
              for i, waiting in enumerate((30, 12, 2))]
    out = [(b"dialer-1", json.dumps(signer.sign(s)).encode()) for s in states]
    forged = QueueState("dialer-1", now + 10, 0, 50, 60.0)
    return [*out, (b"dialer-1", json.dumps(forged.to_dict()).encode())]


def prechecks(stack: Stack) -> None:
    """A few GET /v1/precheck calls (answered, refused without the token, a bad parameter)."""
    url = f"http://127.0.0.1:{stack.worker_port}/v1/precheck"
    ips = {r["ip"] for r in stack.traffic.requests[-50:]}
    for ip in sorted(ips):
        request = urllib.request.Request(f"{url}?ip={ip}",
                                         headers={"Authorization": f"Bearer {PRECHECK_TOKEN}"})
        with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310 - loopback only
            assert resp.status == 200
    assert http_get(f"{url}?ip=203.0.113.7")[0] == 401
    time.sleep(3)  # scraped


def train_models(workdir: Path, ip_settings: dict[str, Path]) -> Path:
    """An active ("default") and a shadow model trained on another simulated day."""
    from detector.config import load_settings
    from detector.runtime import build_intel
    from detector.sim import SimConfig, simulate, write_jsonl
    from detector.train import train_from_jsonl

    models = workdir / "models"
    data, labels = workdir / "train.jsonl", workdir / "train.labels.jsonl"
    write_jsonl(simulate(SimConfig(seed=5, legit_per_day=4000, attack_scale=0.3)), data, labels)
    intel = build_intel(load_settings(**ip_settings))
    train_from_jsonl(data, labels, models, "default", seed=0, intel=intel)
    train_from_jsonl(data, labels, models, "shadow", seed=1, intel=intel)
    return models


@dataclass
class Stack:
    prom: Prometheus
    worker: subprocess.Popen[bytes]
    worker_log: Path
    worker_port: int
    traffic: Traffic

    def diagnostics(self) -> str:
        return (f"--- worker log ---\n{tail(self.worker_log)}\n"
                f"--- prometheus log ---\n{tail(self.prom.log, 30)}")


def start_worker(workdir: Path, env: dict[str, str], port: int) -> tuple[subprocess.Popen[bytes], Path]:
    log = workdir / "worker.log"
    with log.open("wb") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "detector.stream.worker"],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=workdir,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"worker exited with {proc.returncode}:\n{tail(log)}", pytrace=False)
        try:
            if http_get(f"http://127.0.0.1:{port}/healthz", timeout=2)[0] == 200:
                return proc, log
        except OSError:
            pass
        time.sleep(0.5)
    stop(proc)
    pytest.fail(f"worker /healthz not OK after {START_TIMEOUT_S:.0f}s:\n{tail(log)}", pytrace=False)


def wait_until_processed(stack: Stack) -> None:
    """Until the worker decided (almost) every valid request and the counters stop moving."""
    prom = stack.prom
    expected = 0.95 * len(stack.traffic.requests)
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    last, still_since = -1.0, time.monotonic()
    while time.monotonic() < deadline:
        if stack.worker.poll() is not None:
            pytest.fail(f"worker died (exit {stack.worker.returncode}):\n{stack.diagnostics()}",
                        pytrace=False)
        decided = prom.scalar("sum(detector_decisions_total)")
        outcomes = prom.scalar("sum(detector_outcomes_total)")
        if decided != last:
            last, still_since = decided, time.monotonic()
        elif (decided >= expected and outcomes >= len(stack.traffic.outcomes)
              and time.monotonic() - still_since > 3):
            time.sleep(3)  # a few more scrapes with the final values
            return
        time.sleep(1)
    pytest.fail(f"after {PROCESS_TIMEOUT_S:.0f}s: {last} decisions (expected >= {expected:.0f}), "
                f"{prom.scalar('sum(detector_outcomes_total)')} outcomes\n{stack.diagnostics()}",
                pytrace=False)


@pytest.fixture(scope="module")
def stack(kafka_bootstrap: str) -> Iterator[Stack]:
    from detector.sim import build_ip_databases

    keep = os.environ.get("DETECTOR_IT_KEEP_DIR")
    workdir = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="detector-prom-it-"))
    workdir.mkdir(parents=True, exist_ok=True)
    prefix = f"it-prometheus-{uuid.uuid4().hex[:12]}"
    topics = {"requests": f"{prefix}-requests", "decisions": f"{prefix}-decisions",
              "outcomes": f"{prefix}-outcomes", "lists": f"{prefix}-lists",
              "dead_letter": f"{prefix}-requests-dlq"}
    create_topics(kafka_bootstrap, {name: PARTITIONS for name in topics.values()},
                  compact={topics["lists"]}, exist_ok=True)

    dbs = build_ip_databases(workdir / "ipdb")
    ip_settings = {"geoip_country_db": dbs["country"], "geoip_asn_db": dbs["asn"],
                   "anonymous_ip_db": dbs["anonymous"], "hosting_asn_file": dbs["hosting_asns"]}
    models = train_models(workdir, ip_settings)
    from detector.core.signing import Signer
    from detector.keys import generate, load_private

    generate(workdir / "keys", "soc")
    generate(workdir / "keys", "worker")
    generate(workdir / "keys", "dialer")
    soc = Signer(load_private(workdir / "keys" / "soc.key", "soc"))
    lists_file = workdir / "lists.jsonl"
    lists_file.write_text(
        json.dumps({"action": "deny", "kind": "prefix", "value": "+88351", "source": "policy"}) + "\n"
        + json.dumps({"action": "deny", "kind": "asn", "value": "64511", "source": "soc"}) + "\n",
        encoding="utf-8")

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DETECTOR_")}
    env.update({
        "DETECTOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "DETECTOR_APP_ID": f"{prefix}-app",
        "DETECTOR_TOPIC_REQUESTS": topics["requests"],
        "DETECTOR_TOPIC_DECISIONS": topics["decisions"],
        "DETECTOR_TOPIC_OUTCOMES": topics["outcomes"],
        "DETECTOR_TOPIC_LISTS": topics["lists"],
        "DETECTOR_TOPIC_DEAD_LETTER": topics["dead_letter"],
        "DETECTOR_PARTITIONS": str(PARTITIONS),
        "DETECTOR_WEB_PORT": str(port),
        "DETECTOR_DATA_DIR": str(workdir / "data"),
        "DETECTOR_MODELS_DIR": str(models),
        "DETECTOR_MODEL_NAME": "default",
        "DETECTOR_SHADOW_MODEL": "shadow",
        "DETECTOR_LISTS_FILE": str(lists_file),
        "DETECTOR_GEOIP_COUNTRY_DB": str(dbs["country"]),
        "DETECTOR_GEOIP_ASN_DB": str(dbs["asn"]),
        "DETECTOR_ANONYMOUS_IP_DB": str(dbs["anonymous"]),
        "DETECTOR_HOSTING_ASN_FILE": str(dbs["hosting_asns"]),
        "DETECTOR_LOG_LEVEL": "INFO",
        "DETECTOR_DEV_MODE": "1",
        "DETECTOR_SOC_PUBLIC_KEYS": str(workdir / "keys" / "soc.pub"),
        "DETECTOR_WORKER_PRIVATE_KEY": str(workdir / "keys" / "worker.key"),
        "DETECTOR_DIALER_PUBLIC_KEYS": str(workdir / "keys" / "dialer.pub"),
        "DETECTOR_PRECHECK_TOKEN": PRECHECK_TOKEN,
    })
    worker, worker_log = start_worker(workdir, env, port)
    prom = None
    try:
        prom = start_prometheus(workdir, port)
        traffic = make_traffic(time.time(), soc=soc)
        traffic.topics = {**topics, "queue_state": f"{prefix}-app-queue-state"}
        traffic.queue_states = queue_states(load_private(workdir / "keys" / "dialer.key", "dialer"))
        the_stack = Stack(prom, worker, worker_log, port, traffic)
        asyncio.run(produce(kafka_bootstrap, traffic))
        wait_until_processed(the_stack)
        prechecks(the_stack)
        yield the_stack
    finally:
        if prom is not None:
            stop(prom.proc)
        stop(worker)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


# --- the checks ----------------------------------------------------------------------------------


def test_prometheus_scrapes_the_worker(stack: Stack) -> None:
    up = stack.prom.query('up{job="detector"}')
    assert [r["value"][1] for r in up] == ["1"], f"{up}\n{stack.diagnostics()}"


def test_worker_exports_every_detector_metric(stack: Stack) -> None:
    """Every metric of detector/metrics.py reaches Prometheus (labelled ones need a first value)."""
    from detector.metrics import REGISTRY

    suffix = {"counter": "_total", "histogram": "_count", "info": "_info", "gauge": ""}
    expected = {fam.name + suffix[fam.type] for fam in REGISTRY.collect()}
    missing = sorted(expected - set(stack.prom.api("label/__name__/values")))
    assert not missing, f"never exported by the worker (or never given a value): {missing}"


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    problems = []
    for q in dashboard_queries():
        try:
            result = stack.prom.query(q.expr) if q.instant else stack.prom.query_range(q.expr)
        except AssertionError as exc:
            problems.append(f"{q.where}: ERROR {exc}")
            continue
        values = ([r["value"] for r in result] if q.instant
                  else [v for r in result for v in r["values"]])
        if not values:
            problems.append(f"{q.where}: no data for {q.expr}")
        elif not any(math.isfinite(float(v[1])) for v in values):
            problems.append(f"{q.where}: only NaN/Inf for {q.expr}")
    assert not problems, "\n".join(problems)


def test_every_alert_expression_runs_on_real_series(stack: Stack) -> None:
    problems = []
    for rule in alert_rules():
        try:
            stack.prom.query(rule["expr"])  # empty = not firing, which is fine
        except AssertionError as exc:
            problems.append(f"{rule['alert']}: ERROR {exc}")
        for sel in sorted(selectors(rule["expr"])):
            if not stack.prom.series(sel):
                problems.append(f"{rule['alert']}: selector {sel} matches no series")
    assert not problems, "\n".join(problems)


def test_every_rule_evaluates_without_error(stack: Stack) -> None:
    time.sleep(2)  # at least one evaluation after the last scrape
    groups = stack.prom.api("rules")["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(rules) == {r["alert"] for r in alert_rules()}
    bad = {name: (r.get("health"), r.get("lastError")) for name, r in rules.items()
           if r.get("health") != "ok" or r.get("lastError")}
    assert not bad, bad


def test_watchdog_fires(stack: Stack) -> None:
    firing = stack.prom.query('ALERTS{alertname="DetectorWatchdog", alertstate="firing"}')
    assert firing, stack.prom.api("alerts")
