"""`detector demo` writes its decisions to the SQLite decision log and says how to explain one
and how to open a backtest report; the printed commands work."""

import re
import shutil
from pathlib import Path

from detector.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_demo_writes_log_and_prints_runnable_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    assert main(["demo", "--legit", "600", "--attack-scale", "0.2", "--no-model"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "var" / "decisions.sqlite").is_file()
    assert "Estimated money (EUR, the packaged ILLUSTRATIVE sample rate deck, not a real tariff" in out
    saved = re.search(r"saved: attack callbacks stopped\s+([\d,.]+) EUR", out)
    assert saved is not None and float(saved.group(1).replace(",", "")) > 0
    # agent capacity: the simulated dialer's queue went over capacity during the flood, requests
    # were deflected (never blocked) with agent_capacity, and were served again once it drained
    cap = re.search(r"over capacity (\d+) min in (\d+) episode\(s\), highest tier (\d)", out)
    assert cap is not None and int(cap.group(1)) > 0 and 1 <= int(cap.group(3)) <= 3, out
    defl = re.search(r"deflected to chat \(agent_capacity\): ([\d,]+) = ([\d,]+) low-trust .*?"
                     r"([\d,]+) other unauthenticated, ([\d,]+) authenticated; ([\d,]+) attack, "
                     r"([\d,]+) legitimate; ([\d,]+) blocked", out)
    assert defl is not None, out
    total, low, unauth, auth, attack, legit, blocked = (int(g.replace(",", "")) for g in defl.groups())
    assert total > 0 and total == low + unauth + auth == attack + legit and blocked == 0
    assert re.search(r"queue drained at \d\d:\d\d UTC: served again, 0 agent_capacity", out)
    states = (tmp_path / "var" / "demo" / "demo-queue-states.jsonl").read_text().splitlines()
    assert len(states) > 2000 and all('"sig": {"alg": "ed25519"' in line for line in states[:5])
    # the pre-check: a few visitors, masked IPs only, and how to call the real endpoint
    block = out.split("Web pre-check (GET /v1/precheck")[1].split("SOC workbench:")[0]
    answers = re.findall(r"^  (\S+)\s+.+?\s{2}(show|HIDE) callback  reasons: (.*)$", block, re.M)
    assert len(answers) >= 3 and ("HIDE", "anonymous_ip") in {(a[1], a[2].split(",")[0]) for a in answers}
    assert all("•.•" in a[0] or ":•" in a[0] for a in answers)  # never a raw IP
    assert not re.search(r"\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b", out)
    assert 'Authorization: Bearer $DETECTOR_PRECHECK_TOKEN' in block and "/v1/precheck?ip=" in block
    rid = re.search(r"detector explain (\S+)", out).group(1)
    assert main(["explain", rid]) == 0
    assert "Why:" in capsys.readouterr().out
    cmd = re.search(r"detector backtest (.+?) \\\n\s+(.+)\n", out)
    args = (cmd.group(1) + " " + cmd.group(2)).split()
    assert main(["backtest", *args, "--no-model"]) == 0
    assert "money (expected cost): allowed" in capsys.readouterr().out
    assert (tmp_path / "var" / "demo" / "backtest.html").is_file()
