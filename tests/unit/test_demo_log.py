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
    rid = re.search(r"detector explain (\S+)", out).group(1)
    assert main(["explain", rid]) == 0
    assert "Why:" in capsys.readouterr().out
    cmd = re.search(r"detector backtest (.+?) \\\n\s+(.+)\n", out)
    args = (cmd.group(1) + " " + cmd.group(2)).split()
    assert main(["backtest", *args, "--no-model"]) == 0
    assert "money (expected cost): allowed" in capsys.readouterr().out
    assert (tmp_path / "var" / "demo" / "backtest.html").is_file()
