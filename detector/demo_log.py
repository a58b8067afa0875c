"""The demo's outputs for the SOC workbench: its decisions in the decision log (SQLite by
default), its requests and labels as JSONL, and the commands to explain a decision and to open a
backtest report of a candidate policy on that day."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detector.core.decide import DecisionContext
from detector.core.records import Decision


def _pick(decisions: Sequence[Decision]) -> Decision | None:
    """A decision worth explaining: stopped by a count over its threshold, else any stopped one."""
    velocity = ("velocity_number", "velocity_ip", "many_numbers_per_ip", "many_ips_per_number")
    for d in decisions:
        if d.action != "allow" and d.reasons and d.reasons[0] in velocity:
            return d
    return next((d for d in decisions if d.action != "allow"), decisions[0] if decisions else None)


def write_demo_outputs(items: Sequence[Any], decisions: Sequence[Decision], ctx: DecisionContext,
                       log_db: str | None, out_dir: Path | None) -> str:
    lines = ["", "SOC workbench:"]
    if log_db is not None:
        from detector.sink.rows import decision_row
        from detector.sink.store import open_store

        rows = [decision_row(d.to_dict(), ctx.pii_key) for d in decisions]
        with open_store(log_db) as store:
            for i in range(0, len(rows), 1000):
                store.write(rows[i:i + 1000])
        db_flag = "" if log_db == "sqlite:///var/decisions.sqlite" else f" --db {log_db}"
        lines.append(f"  {len(rows):,} decisions written to the decision log {log_db}")
        pick = _pick(decisions)
        if pick is not None:
            lines.append(f"  why was a request stopped?   detector explain {pick.request_id}{db_flag}")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        req_path, lab_path = out_dir / "demo-requests.jsonl", out_dir / "demo-requests.labels.jsonl"
        with req_path.open("w", encoding="utf-8") as rf, lab_path.open("w", encoding="utf-8") as lf:
            for it in items:
                rf.write(json.dumps(it.request) + "\n")
                lf.write(json.dumps({"request_id": it.request.get("request_id"), "scenario": it.scenario,
                                     "attack": it.attack}) + "\n")
        report = out_dir / "backtest.html"
        lines += [
            "  what would a stricter policy change on this day?",
            f"    detector backtest --candidate examples/candidate-policy.toml {req_path} \\",
            f"        --labels {lab_path} --html {report}",
            f"    then open file://{report.resolve()} in a browser",
        ]
    return "\n".join(lines)
