"""Stream subcommands of ``detector`` (worker, produce, tail, lists); wired to detector.stream."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def add_commands(sub: Any, add_core_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    """Filled in once detector.stream lands."""
