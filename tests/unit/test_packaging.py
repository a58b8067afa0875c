"""The shipped model travels inside the wheel, and a detector run outside the repository finds it
(``models/`` was once read relative to the working directory only, so a pip-installed worker ran
with no model at all)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_wheel_carries_the_default_model(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(REPO)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"detector/_models/default.json", "detector/_models/default.npz"} <= names
    assert "detector/data/rate-deck.sample.csv" in names  # the demo prices with it, anywhere


def test_outside_the_repository_the_packaged_model_loads(tmp_path: Path, monkeypatch) -> None:
    from detector.config import load_settings
    from detector.core.model import load_model

    monkeypatch.chdir(tmp_path)  # no ./models here
    settings = load_settings(env={})
    assert settings.models_dir.name == "_models" and settings.models_dir.is_dir()
    assert load_model(settings.models_dir, settings.model_name).version.startswith("default-")
    (tmp_path / "models").mkdir()  # a deployment's own models/ without that model: still packaged
    assert load_settings(env={}).models_dir.name == "_models"
    assert load_settings(env={"DETECTOR_MODELS_DIR": "mine"}).models_dir == Path("mine")  # explicit wins
