"""Build of the C extensions detector.core._popcount and _forest (the rest is in pyproject.toml).

Optional: without a C compiler the install still succeeds and detector/core/population.py and model.py run
their Python code (the reference), with the same results, slower (see README, "Replay and backtest
speed")."""

from setuptools import Extension, setup

# No -ffast-math or the like: the results must be the Python reference's, bit for bit.
FLAGS = ["-O3", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers",
         "-Wno-cast-function-type"]

setup(
    ext_modules=[
        Extension(f"detector.core.{name}", [f"detector/core/{name}.c"], optional=True,
                  extra_compile_args=FLAGS)
        for name in ("_popcount", "_forest")
    ]
)
