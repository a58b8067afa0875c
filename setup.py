"""Build of the one C extension, detector.core._popcount (everything else is in pyproject.toml).

Optional: without a C compiler the install still succeeds and detector/core/population.py runs
its Python code (the reference), with the same results, slower (see README, "Replay and backtest
speed")."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "detector.core._popcount",
            ["detector/core/_popcount.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers", "-Wno-cast-function-type"],
        )
    ]
)
