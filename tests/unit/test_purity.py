"""The core must import no framework (STYLE.md habit 1)."""

import ast
import doctest
import importlib
import pathlib
import pkgutil

import pytest

import detector
import detector.core

BANNED = ("faust", "aiokafka", "prometheus_client", "mode", "sklearn")
CORE = pathlib.Path(detector.core.__file__).parent


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_module_imports_no_framework(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            assert name.split(".")[0] not in BANNED, f"{path.name} imports {name}"


def _modules():
    for info in pkgutil.walk_packages(detector.__path__, "detector."):
        if not info.name.startswith(("detector.stream", "detector.sim.__main__")):
            yield info.name


@pytest.mark.parametrize("name", sorted(_modules()))
def test_doctests(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
