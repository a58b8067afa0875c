"""Build of the C extensions detector.core._popcount, _forest and _keyed (the rest: pyproject.toml).

Optional: without a C compiler (or OpenSSL's headers, for _keyed) the install still succeeds and
detector/core/population.py, model.py and pii.py run their Python code (the reference), with the
same results, slower (see README, "Replay and backtest speed")."""

from setuptools import Extension, setup

# No -ffast-math or the like: the results must be the Python reference's, bit for bit.
FLAGS = ["-O3", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers",
         "-Wno-cast-function-type"]

setup(
    ext_modules=[
        *(Extension(f"detector.core.{name}", [f"detector/core/{name}.c"], optional=True,
                    extra_compile_args=FLAGS)
          for name in ("_popcount", "_forest")),
        # OpenSSL's SHA-256 (the library Python's hashlib uses; headers: Debian's libssl-dev).
        # SHA256_Init & co. are deprecated in OpenSSL 3 (still there): see _keyed.c for why.
        Extension("detector.core._keyed", ["detector/core/_keyed.c"], optional=True,
                  libraries=["crypto"], extra_compile_args=[*FLAGS, "-Wno-deprecated-declarations"]),
    ]
)
