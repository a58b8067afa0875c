"""The backtest's HTML report in a real headless Chromium (Debian's `chromium`, installed by
tools/chromium/install.sh): it loads with no console output, its three charts render with a
non-zero size, and a screenshot is taken (tests/browser/out/ keeps it for a person to look at)."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from detector.backtest import BacktestReport, compare, replay_both
from detector.backtest_html import write_html
from detector.core.decide import DecisionContext
from detector.core.ipintel import IpIntel
from detector.core.parse import parse_request
from detector.core.policy import load_policy, parse_policy
from detector.sim import SimConfig, simulate

pytestmark = pytest.mark.browser


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("chromium not found: run `bash tools/chromium/install.sh` (make setup-services)", pytrace=False)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-dev-shm-usage", "--host-resolver-rules=MAP * ~NOTFOUND", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def load(path: Path) -> tuple[str, list[str]]:
    """(DOM after scripts ran, console messages) of a page."""
    proc = _run("--enable-logging=stderr", "--v=1", "--dump-dom", path.resolve().as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]
    return proc.stdout, console


@pytest.fixture(scope="module")
def report_path(tmp_path_factory) -> Path:
    items = simulate(SimConfig(seed=4, legit_per_day=3000, duration_s=8 * 3600, attack_scale=0.5))
    reqs = [parse_request(it.request) for it in items]
    labels = {it.request["request_id"]: it.scenario for it in items}
    cand = parse_policy({"version": "stricter", "velocity": {"ip_1h": 2, "number_24h": 2}})
    pairs = replay_both(reqs, DecisionContext(load_policy()), DecisionContext(cand), IpIntel())
    report = compare(pairs, BacktestReport("sim", {"policy": "default", "model": None},
                                           {"policy": "stricter", "model": None}), {}, labels)
    assert report.newly_stopped > 0
    return write_html(report, tmp_path_factory.mktemp("bt") / "report.html")


def test_report_is_self_contained(report_path):
    text = report_path.read_text()
    assert not re.search(r"https?://|src=|@import|<link", text), "the report must not load anything"
    assert text.count('<svg class="chart"') == 3


def test_report_renders_charts_without_console_errors(report_path):
    dom, console = load(report_path)
    assert console == []
    assert 'data-charts-total="3"' in dom
    assert 'data-charts-rendered="3"' in dom


def test_a_broken_chart_is_caught(report_path, tmp_path):
    """The check can fail: a hidden chart has no size and is reported on the console."""
    bad = tmp_path / "bad.html"
    bad.write_text(report_path.read_text().replace('<svg class="chart" id="chart-country"',
                                                   '<svg class="chart" style="display:none" id="chart-country"'))
    dom, console = load(bad)
    assert 'data-charts-rendered="2"' in dom
    assert any("chart not rendered: chart-country" in ln for ln in console)


def test_screenshot(report_path):
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    shot = out / "backtest-report.png"
    shot.unlink(missing_ok=True)
    proc = _run(f"--screenshot={shot}", "--window-size=1280,1600", "--hide-scrollbars", report_path.resolve().as_uri())
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    head = shot.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", head[16:24]) == (1280, 1600)
    assert shot.stat().st_size > 30_000  # a blank page is a few kB
