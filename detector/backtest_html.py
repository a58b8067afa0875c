"""The backtest's HTML report: one self-contained file (inline CSS, inline SVG charts, a few lines
of inline script; no CDN, no network) that a SOC analyst opens in a browser.

Charts: changes over time (newly stopped / newly allowed per hour), changes by reason and by
destination country. The inline script checks on load that every chart has a non-zero size and
records the count in ``<body data-charts-rendered>`` (the browser test reads it).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

from detector.backtest import BacktestReport, _hour_label

STOP, ALLOW, OTHER = "#c0392b", "#1e8449", "#7f8c8d"

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1c2833;background:#fbfcfc}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d5d8dc}
.sub{color:#566573;margin-bottom:16px} .cards{display:flex;gap:12px;flex-wrap:wrap}
.card{background:#fff;border:1px solid #d5d8dc;border-radius:6px;padding:10px 14px;min-width:150px}
.card b{display:block;font-size:22px} .stop{color:#c0392b} .allow{color:#1e8449}
table{border-collapse:collapse;background:#fff;font-size:13px} td,th{border:1px solid #d5d8dc;padding:4px 8px;text-align:left}
th{background:#f2f3f4} td.n{text-align:right;font-variant-numeric:tabular-nums}
.chart{background:#fff;border:1px solid #d5d8dc;border-radius:6px;padding:8px;margin:6px 0;display:block}
.legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 12px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:16px}
"""

SCRIPT = """
(function(){
  var charts=document.querySelectorAll('svg.chart'), ok=0;
  charts.forEach(function(c){var r=c.getBoundingClientRect(); if(r.width>0&&r.height>0&&c.querySelector('rect,path,polyline')){ok++;}
    else{console.error('chart not rendered: '+c.id);}});
  document.body.setAttribute('data-charts-rendered', String(ok));
  document.body.setAttribute('data-charts-total', String(charts.length));
})();
"""


def _bars(chart_id: str, title: str, rows: Sequence[tuple[str, float, float]], width: int = 560) -> str:
    """Horizontal grouped bars: label, newly stopped, newly allowed."""
    rows = list(rows[:15]) or [("(no changes)", 0, 0)]
    bar_h, gap, left = 9, 8, 170
    height = len(rows) * (2 * bar_h + gap) + 30
    top = max(max(a, b) for _, a, b in rows) or 1
    scale = (width - left - 60) / top
    parts = [f'<svg class="chart" id="{chart_id}" role="img" aria-label="{escape(title)}" '
             f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">']
    y = 20
    for label, a, b in rows:
        parts.append(f'<text x="{left - 6}" y="{y + bar_h + 3}" text-anchor="end" font-size="11">'
                     f'{escape(label[:28])}</text>')
        for val, color, dy in ((a, STOP, 0), (b, ALLOW, bar_h)):
            w = max(val * scale, 1 if val else 0.5)
            parts.append(f'<rect x="{left}" y="{y + dy}" width="{w:.1f}" height="{bar_h - 1}" fill="{color}">'
                         f'<title>{escape(label)}: {val:,.0f}</title></rect>')
            if val:
                parts.append(f'<text x="{left + w + 4:.1f}" y="{y + dy + bar_h - 2}" font-size="10">{val:,.0f}</text>')
        y += 2 * bar_h + gap
    parts.append("</svg>")
    return "".join(parts)


def _timeline(chart_id: str, report: BacktestReport, width: int = 1100, height: int = 260) -> str:
    hours = sorted(report.by_hour)
    if hours:
        hours = list(range(hours[0], hours[-1] + 1))
    else:
        hours = [0]
    left, bottom, top_pad = 50, 40, 14
    plot_w, plot_h = width - left - 10, height - bottom - top_pad
    peak = max((max(report.by_hour[h]["newly_stopped"], report.by_hour[h]["newly_allowed"])
                for h in hours if h in report.by_hour), default=0) or 1
    bw = plot_w / len(hours)
    parts = [f'<svg class="chart" id="{chart_id}" role="img" aria-label="changes over time" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}">',
             f'<line x1="{left}" y1="{top_pad + plot_h}" x2="{width - 10}" y2="{top_pad + plot_h}" stroke="#909497"/>',
             f'<line x1="{left}" y1="{top_pad}" x2="{left}" y2="{top_pad + plot_h}" stroke="#909497"/>']
    for frac in (0.5, 1.0):
        yy = top_pad + plot_h * (1 - frac)
        parts.append(f'<text x="{left - 4}" y="{yy + 4:.1f}" text-anchor="end" font-size="10">{peak * frac:,.0f}</text>'
                     f'<line x1="{left}" y1="{yy:.1f}" x2="{width - 10}" y2="{yy:.1f}" stroke="#eaeded"/>')
    for i, h in enumerate(hours):
        c: dict[str, int] = report.by_hour.get(h, {})
        x = left + i * bw
        for val, color, off in ((c.get("newly_stopped", 0), STOP, 0.1), (c.get("newly_allowed", 0), ALLOW, 0.5)):
            hh = plot_h * val / peak
            parts.append(f'<rect x="{x + bw * off:.1f}" y="{top_pad + plot_h - hh:.1f}" width="{bw * 0.4:.1f}" '
                         f'height="{max(hh, 0):.1f}" fill="{color}"><title>{_hour_label(h) if h else ""}: '
                         f'{val:,}</title></rect>')
        step = max(1, len(hours) // 12)
        if i % step == 0 and h:
            parts.append(f'<text x="{x + bw / 2:.1f}" y="{height - 22}" text-anchor="middle" font-size="10">'
                         f'{_hour_label(h)[5:13]}h</text>')
    parts.append("</svg>")
    return "".join(parts)


def _table(head: list[str], rows: list[list[Any]]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(
            f'<td class="n">{v:,}</td>' if isinstance(v, int) else f"<td>{escape(str(v))}</td>" for v in r) + "</tr>")
    out.append("</table>")
    return "".join(out)


def render_html(report: BacktestReport) -> str:
    n = max(report.requests, 1)
    reasons = sorted(set(report.newly_stopped_by_reason) | set(report.newly_allowed_by_reason),
                     key=lambda r: -(report.newly_stopped_by_reason[r] + report.newly_allowed_by_reason[r]))
    by_reason = [(r, report.newly_stopped_by_reason[r], report.newly_allowed_by_reason[r]) for r in reasons]
    countries = sorted(report.by_country.items(), key=lambda kv: -sum(kv[1].values()))
    by_country = [(cc, c["newly_stopped"], c["newly_allowed"]) for cc, c in countries]
    legend = (f'<div class="legend"><span style="background:{STOP}"></span>newly stopped'
              f'<span style="background:{ALLOW}"></span>newly allowed</div>')
    body = [
        f"<h1>Backtest: {escape(report.candidate['policy'])} vs {escape(report.baseline['policy'])}</h1>",
        f'<div class="sub">{escape(report.source)}: {report.requests:,} requests. Baseline model '
        f"{escape(str(report.baseline['model']))}, candidate model {escape(str(report.candidate['model']))}. "
        "Numbers are masked.</div>",
        '<div class="cards">',
        f"<div class='card'>stopped, baseline<b>{report.stopped_before / n:.2%}</b>{report.stopped_before:,}</div>",
        f"<div class='card'>stopped, candidate<b>{report.stopped_after / n:.2%}</b>{report.stopped_after:,}</div>",
        f"<div class='card'>newly stopped<b class='stop'>{report.newly_stopped:,}</b>allow &rarr; deflect/block</div>",
        f"<div class='card'>newly allowed<b class='allow'>{report.newly_allowed:,}</b>deflect/block &rarr; allow</div>",
    ]
    if report.currency:
        cur = escape(report.currency)
        body.append(f"<div class='card'>spend newly stopped<b class='stop'>{report.money_newly_stopped:,.2f}"
                    f"</b>{cur}, expected cost</div><div class='card'>spend newly allowed<b class='allow'>"
                    f"{report.money_newly_allowed:,.2f}</b>{cur}, expected cost</div>")
    if report.outcomes is not None:
        body.append(f"<div class='card'>likely false positives<b class='stop'>"
                    f"{report.outcomes['newly_stopped_completed']:,}</b>newly stopped, call had completed</div>"
                    f"<div class='card'>likely misses<b class='allow'>{report.outcomes['newly_allowed_spam']:,}"
                    f"</b>newly allowed, agent marked spam</div>")
    body.append("</div>")
    body += ["<h2>Changes over time (per hour, UTC)</h2>", legend, _timeline("chart-time", report),
             '<div class="grid"><div><h2>By reason</h2>', legend,
             _bars("chart-reason", "changes by reason", by_reason), "</div>",
             "<div><h2>By destination country</h2>", legend,
             _bars("chart-country", "changes by destination country", by_country), "</div></div>",
             "<h2>Transitions</h2>",
             _table(["change", "requests"], [[k, v] for k, v in report.transitions.most_common()])]
    if report.scenarios:
        body += ["<h2>Stop rate per scenario (labels)</h2>",
                 _table(["scenario", "requests", "stopped, baseline", "stopped, candidate"],
                        [[s, v["requests"], f"{v['stop_before']:.1%}", f"{v['stop_after']:.1%}"]
                         for s, v in report.scenarios.items()])]
    body.append("<h2>Samples (masked)</h2>")
    for kind, samples in report.samples.items():
        body += [f"<h3>{escape(kind)}</h3>",
                 _table(["request id", "time (UTC)", "number", "country", "reasons before", "reasons after"],
                        [[c.request_id, datetime.fromtimestamp(c.ts, UTC).strftime("%Y-%m-%d %H:%M"),
                          c.number, c.country, ", ".join(c.before_reasons) or "-",
                          ", ".join(c.after_reasons) or "-"] for c in samples])]
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>Backtest {escape(report.candidate['policy'])}</title><style>{CSS}</style></head>"
            f"<body>{''.join(body)}<script>{SCRIPT}</script></body></html>")


def write_html(report: BacktestReport, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report), encoding="utf-8")
    return path
