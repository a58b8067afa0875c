"""The observability files agree with each other and with the code, without any service running.

docker-compose.yml, Dockerfile, prometheus/ (scrape config, alert rules and their unit tests,
Alertmanager) and grafana/ (provisioning, dashboards): they parse, every file or directory they
name exists, every metric an alert or a panel queries is one the workers export
(detector/metrics.py, Faust's sensors or Prometheus itself), and ``promtool`` accepts the rules,
their unit tests and the PromQL of every panel. ``promtool`` comes from
tools/prometheus/install.sh; without it those tests skip, except under ``CI=true`` where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

try:
    import yaml
except ImportError:  # pragma: no cover - PyYAML is a dev dependency
    if os.environ.get("CI", "").lower() == "true":
        raise
    pytest.skip("PyYAML missing: pip install -e '.[dev]'", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "prometheus"
GRAFANA_DIR = ROOT / "grafana"
DASHBOARD_FILES = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
SEVERITIES = {"critical", "warning", "none"}

# Faust's prometheus sensors prefix every metric with the app name ("-" and "." become "_"), i.e.
# DETECTOR_APP_ID: dashboards match them with {__name__=~".+_<suffix>"}; this is the default.
FAUST_PREFIX = "callback_fraud_detector"
PROMETHEUS_OWN = {"up", "ALERTS", "ALERTS_FOR_STATE", "scrape_duration_seconds",
                  "scrape_samples_scraped", "scrape_samples_post_metric_relabeling",
                  "scrape_series_added"}
# Grafana's macros, replaced by plausible values so that promtool can parse panel queries.
GRAFANA_MACROS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h",
                  "$__range_s": "3600", "$__interval_ms": "15000"}


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def compose() -> dict[str, Any]:
    return load_yaml(ROOT / "docker-compose.yml")


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in load_yaml(PROM_DIR / "alerts.yml")["groups"] for r in g["rules"]]


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text(encoding="utf-8")) for p in DASHBOARD_FILES}


def panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])  # panels inside collapsed rows


def query_panels() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, dash in dashboards().items():
        for p in panels(dash):
            if p["type"] != "row":
                yield name, p


def panel_exprs() -> list[tuple[str, str]]:
    return [(f"{name}: {p['title']}", t["expr"]) for name, p in query_panels()
            for t in p.get("targets", []) if t.get("expr")]


def substitute_macros(expr: str) -> str:
    for macro in sorted(GRAFANA_MACROS, key=len, reverse=True):
        expr = expr.replace(macro, GRAFANA_MACROS[macro])
    return expr


def provisioned_sql_datasource_uid() -> str:
    ds = load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "postgres.yml")
    (pg,) = [d for d in ds["datasources"] if d["type"] == "grafana-postgresql-datasource"]
    return pg["uid"]


def sql_panels() -> list[tuple[str, str]]:
    """(where, rawSql) of every decision-log panel (run against a real PostgreSQL in
    tests/integration/test_sink.py)."""
    uid = provisioned_sql_datasource_uid()
    return [(f"{name}: {p['title']}", t["rawSql"]) for name, p in query_panels()
            for t in p.get("targets", []) if t.get("datasource", {}).get("uid") == uid and t.get("rawSql")]


def test_decision_log_panel_exists() -> None:
    panels_ = sql_panels()
    assert any("decision_log" in sql and "number_masked" in sql for _, sql in panels_), panels_
    assert not any(re.search(r"\bnumber_e164\b|\bip\b", sql) for _, sql in panels_)


def provisioned_datasource_uid() -> str:
    ds = load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")
    (prom,) = [d for d in ds["datasources"] if d["type"] == "prometheus"]
    return prom["uid"]


# --- metric names ---------------------------------------------------------------------------

_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "summary": ("", "_sum", "_count", "_created"), "info": ("_info",), "gauge": ("",),
             "stateset": ("",), "enum": ("",), "unknown": ("",)}


def family_samples(registry: Any) -> dict[str, set[str]]:
    """Family name -> every sample name it can expose, children or not (``_total``, ``_bucket``)."""
    return {fam.name: {fam.name + s for s in _SUFFIXES[fam.type]} for fam in registry.collect()}


def sample_names(registry: Any) -> set[str]:
    return set().union(*family_samples(registry).values())


def detector_metric_names() -> set[str]:
    from detector.metrics import REGISTRY

    return sample_names(REGISTRY)


def faust_metric_names() -> set[str]:
    from faust.sensors.prometheus import FaustMetrics
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    FaustMetrics.create(registry, FAUST_PREFIX)
    return sample_names(registry)


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_SELECTORS = re.compile(r"\{[^}]*\}|\[[^\]]*\]")
_NUMBERS = re.compile(r"(?<![\w:])(\d+(\.\d+)?([eE][+-]?\d+)?|\d+[smhdwy])(?![\w:])")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "offset", "bool", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan", "Inf", "NaN", "atan2", "start", "end"}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (identifiers that are not functions or keywords).

    >>> sorted(metric_names('sum by (le) (rate(x_bucket{a="b"}[5m])) > 0.25 and on() up == 1'))
    ['up', 'x_bucket']
    """
    text = _STRINGS.sub('""', substitute_macros(expr))
    text = _GROUPING.sub(" ", text)
    text = _SELECTORS.sub(" ", text)
    text = _NUMBERS.sub(" ", text)
    names = set()
    for m in _IDENT.finditer(text):
        rest = text[m.end():].lstrip()
        if rest.startswith("(") or m.group() in _KEYWORDS:
            continue  # a function call or an operator
        names.add(m.group())
    return names


def test_metric_name_extraction() -> None:
    expr = ('histogram_quantile(0.99, sum by (le) (rate(detector_decision_latency_seconds_bucket'
            '[$__rate_interval]))) > 0.25 and on() count(ALERTS{alertstate="firing"}) offset 10m'
            ' or vector(0) * 1e-9')
    assert metric_names(expr) == {"detector_decision_latency_seconds_bucket", "ALERTS"}


def all_queries() -> list[tuple[str, str]]:
    return [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()] + panel_exprs()


def test_every_queried_metric_is_exported() -> None:
    known = detector_metric_names() | faust_metric_names() | PROMETHEUS_OWN
    unknown = {(where, name) for where, expr in all_queries() for name in metric_names(expr)
               if name not in known}
    assert not unknown, (
        "metrics queried but exported by nobody (detector/metrics.py REGISTRY, Faust sensors "
        f"with prefix {FAUST_PREFIX!r}, Prometheus): {sorted(unknown)}"
    )


def test_name_regexes_match_exported_metrics() -> None:
    """``{__name__=~"..."}`` selectors (Faust's metrics, whose prefix is the app id) match names."""
    known = detector_metric_names() | faust_metric_names() | PROMETHEUS_OWN
    unmatched = []
    for where, expr in all_queries():
        for regex in re.findall(r'__name__\s*=~\s*"([^"]+)"', expr):
            if not any(re.fullmatch(regex, name) for name in known):
                unmatched.append(f"{where}: {regex}")
    assert not unmatched, f"__name__ regexes matching no exported metric: {unmatched}"


def test_every_detector_metric_is_on_a_dashboard() -> None:
    from detector.metrics import REGISTRY

    used = {name for _, expr in panel_exprs() for name in metric_names(expr)}
    missing = sorted(fam for fam, names in family_samples(REGISTRY).items() if not names & used)
    assert not missing, f"detector metrics on no dashboard panel: {missing}"


# --- docker-compose.yml and Dockerfile -----------------------------------------------------


def test_compose_parses_and_has_the_stack() -> None:
    services = compose()["services"]
    expected = {"kafka", "topics", "worker", "simulator", "prometheus", "alertmanager", "grafana"}
    assert expected <= set(services), f"missing services: {sorted(expected - set(services))}"
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, f"service {name}: neither image nor build"


def _bind_sources(svc: dict[str, Any]) -> Iterator[str]:
    for vol in svc.get("volumes", []):
        if isinstance(vol, str):
            source = vol.split(":", 1)[0]
            if source.startswith((".", "/", "~")):
                yield source
        elif vol.get("type") == "bind":
            yield vol["source"]


def test_compose_volumes_and_build_contexts_exist() -> None:
    doc = compose()
    named = set(doc.get("volumes") or {})
    problems = []
    for name, svc in doc["services"].items():
        for source in _bind_sources(svc):
            if not (ROOT / source).exists():
                problems.append(f"{name}: bind mount source {source} does not exist")
        for vol in svc.get("volumes", []):
            if isinstance(vol, str) and not vol.startswith((".", "/", "~")):
                if vol.split(":", 1)[0] not in named:
                    problems.append(f"{name}: named volume {vol} not declared under volumes:")
        build = svc.get("build")
        if build is not None:
            build = {"context": build} if isinstance(build, str) else build
            context = ROOT / build.get("context", ".")
            if not context.is_dir():
                problems.append(f"{name}: build context {context} is not a directory")
            elif not (context / build.get("dockerfile", "Dockerfile")).is_file():
                problems.append(f"{name}: {build.get('dockerfile', 'Dockerfile')} missing in {context}")
    assert not problems, "\n".join(problems)


def test_compose_depends_on_existing_services() -> None:
    services = compose()["services"]
    problems = []
    for name, svc in services.items():
        deps = svc.get("depends_on", [])
        for dep, spec in (deps.items() if isinstance(deps, dict) else ((d, {}) for d in deps)):
            if dep not in services:
                problems.append(f"{name} depends on unknown service {dep}")
            elif (spec or {}).get("condition") == "service_healthy" and "healthcheck" not in services[dep]:
                problems.append(f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck")
            elif set(services[dep].get("profiles", [])) - set(svc.get("profiles", [])):
                problems.append(f"{name} depends on {dep}, which only runs in a profile")
    assert not problems, "\n".join(problems)


def test_compose_creates_the_topics_the_workers_use() -> None:
    from detector.config import Settings

    settings = Settings()
    services = compose()["services"]
    script = " ".join(services["topics"]["command"]) if isinstance(
        services["topics"]["command"], list) else services["topics"]["command"]
    assert "/opt/kafka/bin/kafka-topics.sh" in script
    for topic in (settings.topic_requests, settings.topic_decisions, settings.topic_outcomes,
                  settings.topic_lists, settings.topic_dead_letter):
        assert re.search(rf"create {re.escape(topic)}\b", script), f"topic {topic} not created"
    assert re.search(rf"create {re.escape(settings.topic_lists)} --config cleanup.policy=compact",
                     script), "the lists topic must be compacted"
    assert services["topics"]["image"] == services["kafka"]["image"]
    env = services["worker"]["environment"]
    assert env["DETECTOR_KAFKA_BOOTSTRAP"].split(":")[0] == "kafka"
    assert str(env["DETECTOR_WEB_PORT"]) == str(settings.web_port)
    assert str(services["topics"]["environment"]["PARTITIONS"]) == str(env["DETECTOR_PARTITIONS"])


def test_dockerfile_copies_existing_files_not_dockerignored() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    ignored = {line.strip().strip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    problems = []
    for line in dockerfile.splitlines():
        parts = line.split()
        if not parts or parts[0].upper() not in ("COPY", "ADD") or any(p.startswith("--from") for p in parts):
            continue
        for source in parts[1:-1]:
            if source.startswith("--"):
                continue
            path = ROOT / source
            if not path.exists():
                problems.append(f"{line.strip()}: {source} does not exist")
            elif path.is_dir() and not any(path.iterdir()):
                problems.append(f"{line.strip()}: {source}/ is empty (git does not keep it)")
            if source.strip("/") in ignored:
                problems.append(f"{line.strip()}: {source} is excluded by .dockerignore")
    assert re.search(r'^ENTRYPOINT \["detector"\]', dockerfile, re.M)
    assert re.search(r"^FROM python:3\.11-slim", dockerfile, re.M)
    assert not problems, "\n".join(problems)


# --- Prometheus and Alertmanager -------------------------------------------------------------


def test_prometheus_config_matches_the_compose_stack() -> None:
    from detector.config import Settings

    cfg = load_yaml(PROM_DIR / "prometheus.yml")
    services = compose()["services"]
    for rule_file in cfg["rule_files"]:
        assert (PROM_DIR / rule_file).is_file(), rule_file
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "detector"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    for sd in job.get("dns_sd_configs", []):
        assert set(sd["names"]) <= set(services), sd["names"]
        assert sd["port"] == Settings().web_port
    for sc in job.get("static_configs", []):
        for target in sc["targets"]:
            assert target.split(":")[0] in services, target
    for am in cfg["alerting"]["alertmanagers"]:
        for sc in am["static_configs"]:
            for target in sc["targets"]:
                assert target.split(":")[0] in services, target
    mounts = [v for v in services["prometheus"]["volumes"] if isinstance(v, str)]
    assert any(m.startswith("./prometheus:/etc/prometheus") for m in mounts), mounts


def test_alertmanager_config_is_consistent() -> None:
    cfg = load_yaml(PROM_DIR / "alertmanager.yml")
    receivers = {r["name"] for r in cfg["receivers"]}

    def walk(route: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield route
        for child in route.get("routes", []):
            yield from walk(child)

    assert {"alertname", "severity"} <= set(cfg["route"]["group_by"])
    for route in walk(cfg["route"]):
        if "receiver" in route:
            assert route["receiver"] in receivers, route


def test_alert_rules_are_complete() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    for r in rules:
        assert r["labels"]["severity"] in SEVERITIES, r["alert"]
        assert r["annotations"]["summary"].strip(), r["alert"]
        assert len(r["annotations"]["description"]) > 80, r["alert"]
    required = {"DetectorBlockRateSpike", "DetectorDeflectRateSpike", "DetectorDestinationSurge",
                "DetectorPremiumDestinationAttempts", "DetectorRangeOrNumberTargeted",
                "DetectorDeadLetters", "DetectorDecisionLatencyHigh", "DetectorConsumerLagGrowing",
                "DetectorWorkerDown", "DetectorNoWorkers", "DetectorNoDecisions",
                "DetectorModelMissing", "DetectorModelStale", "DetectorFeatureDrift"}
    assert required <= set(names), sorted(required - set(names))


def test_alert_descriptions_name_existing_panels() -> None:
    titles = {p["title"] for _, p in query_panels()}
    problems = []
    for r in alert_rules():
        text = re.sub(r"\{\{.*?\}\}", "", r["annotations"]["description"])  # Go templates
        for quoted in re.findall(r'"([^"]+)"', text):
            if quoted not in titles:
                problems.append(f'{r["alert"]}: no dashboard panel titled "{quoted}"')
        if not re.search(r"SOC overview|Investigation", r["annotations"]["description"]):
            problems.append(f"{r['alert']}: description names no dashboard")
    assert not problems, "\n".join(problems)


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    tests = load_yaml(PROM_DIR / "alerts_test.yml")
    assert tests["rule_files"] == ["alerts.yml"]
    fired, quiet = set(), set()
    for case in tests["tests"]:
        for t in case.get("alert_rule_test", []):
            (fired if t.get("exp_alerts") else quiet).add(t["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names <= fired, f"alerts never fired by a test: {sorted(names - fired)}"
    assert quiet, "no test case asserts that an alert does NOT fire"


# --- Grafana ---------------------------------------------------------------------------------


def test_grafana_provisioning_matches_compose_mounts() -> None:
    ds = load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")
    (prom,) = [d for d in ds["datasources"] if d["type"] == "prometheus"]
    assert prom["url"].startswith("http://prometheus:9090")
    providers = load_yaml(GRAFANA_DIR / "provisioning" / "dashboards" / "dashboards.yml")["providers"]
    mounts = dict(v.split(":")[:2] for v in compose()["services"]["grafana"]["volumes"]
                  if isinstance(v, str) and v.startswith("."))
    assert mounts.get("./grafana/provisioning") == "/etc/grafana/provisioning"
    assert any(p["options"]["path"] == mounts.get("./grafana/dashboards") for p in providers)


def test_dashboards_exist() -> None:
    assert {p.name for p in DASHBOARD_FILES} >= {"soc-overview.json", "investigation.json"}


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_dashboard_panels_query_the_provisioned_datasource(path: Path) -> None:
    dash = json.loads(path.read_text(encoding="utf-8"))
    uid = provisioned_datasource_uid()
    assert dash["uid"] and 36 <= dash["schemaVersion"] <= 41
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    problems = []
    sql_uid = provisioned_sql_datasource_uid()
    for p in panels(dash):
        if p["type"] == "row":
            continue
        where = f"panel {p['id']} {p.get('title')!r}"
        if p.get("datasource", {}).get("uid") == sql_uid:  # the decision log (PostgreSQL)
            if not all(t.get("rawSql", "").strip() and t.get("datasource", {}).get("uid") == sql_uid
                       for t in p.get("targets", [])) or not p.get("targets"):
                problems.append(f"{where}: a decision-log panel needs rawSql targets on {sql_uid!r}")
            continue
        if p.get("datasource", {}).get("uid") != uid:
            problems.append(f"{where}: datasource {p.get('datasource')} is not uid {uid!r}")
        if p["type"] not in {"timeseries", "stat", "bargauge", "table", "gauge", "heatmap"}:
            problems.append(f"{where}: unexpected panel type {p['type']}")
        targets = [t for t in p.get("targets", []) if t.get("expr", "").strip()]
        if not targets:
            problems.append(f"{where}: no target with an expr")
        for t in p.get("targets", []):
            if t.get("datasource", {}).get("uid", uid) != uid:
                problems.append(f"{where}: target {t['refId']} uses datasource {t['datasource']}")
        grid = p["gridPos"]
        if grid["x"] + grid["w"] > 24:
            problems.append(f"{where}: wider than the 24-column grid")
    assert not problems, "\n".join(problems)


def test_dashboard_uids_are_unique_and_linked() -> None:
    dashes = dashboards()
    uids = [d["uid"] for d in dashes.values()]
    assert len(uids) == len(set(uids))
    for d in dashes.values():
        for link in d.get("links", []):
            if link.get("url", "").startswith("/d/"):
                assert link["url"].split("/")[2] in uids, link


# --- promtool ---------------------------------------------------------------------------------


def promtool() -> str:
    path = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
    if path is None:
        message = "promtool not installed: run tools/prometheus/install.sh"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_promtool(*args: str, cwd: Path = PROM_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True,  # noqa: S603
                          timeout=120, check=False)


def test_promtool_check_rules() -> None:
    proc = run_promtool("check", "rules", "alerts.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_check_config() -> None:
    proc = run_promtool("check", "config", "prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_test_rules() -> None:
    proc = run_promtool("test", "rules", "alerts_test.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_parses_every_panel_query(tmp_path: Path) -> None:
    """Each panel expr (Grafana macros substituted) as a recording rule: promtool parses it."""
    rules = [{"record": f"dashboard:check:{i}", "expr": substitute_macros(expr)}
             for i, (_, expr) in enumerate(panel_exprs())]
    (tmp_path / "panels.yml").write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    proc = run_promtool("check", "rules", "panels.yml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_amtool_check_config() -> None:
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.skip("amtool not installed (Debian package prometheus-alertmanager)")
    proc = subprocess.run([amtool, "check-config", str(PROM_DIR / "alertmanager.yml")],  # noqa: S603
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
