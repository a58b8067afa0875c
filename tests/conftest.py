"""Root test configuration.

hypothesis is imported up front: its pytest plugin otherwise imports it at the terminal summary,
after Faust/mode have raised the recursion limit, which trips CPython 3.11's "AST constructor
recursion depth mismatch" while compiling it (the run then fails after every test passed).
"""

import os

import hypothesis  # noqa: F401

# The tests run with the development PII hash key (workers and replay refuse it otherwise);
# tests of that refusal remove the variable with monkeypatch.
os.environ.setdefault("DETECTOR_DEV_MODE", "1")
