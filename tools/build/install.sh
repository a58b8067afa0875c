#!/usr/bin/env bash
# What the C extensions (setup.py: detector/core/_popcount.c, _forest.c, _keyed.c) need to build:
# a C compiler, the C library's headers, OpenSSL's headers, and Python's headers for the Python
# that builds them. Installs Debian's gcc, libc6-dev, libssl-dev (and python3-dev when the Python
# is Debian's own and lacks its headers) when absent.
#
#   tools/build/install.sh [PYTHON]      install if absent (PYTHON: the interpreter, default python3)
#
# The extensions are optional: without them the detector runs its Python code, with the same
# decisions, slower (README, "Replay and backtest speed"). So this script never fails the setup:
# when it cannot install (not root and no sudo, no apt-get) it says what is missing and exits 0;
# `make test` then fails on the tests that check the extensions are built, naming them.
set -euo pipefail

PYTHON="${1:-python3}"
log() { printf '[build/install.sh] %s\n' "$*" >&2; }

missing=()
command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || missing+=(gcc)
[ -e /usr/include/stdio.h ] || missing+=(libc6-dev)
[ -e /usr/include/openssl/sha.h ] || missing+=(libssl-dev)
include="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null || true)"
if [ -n "$include" ] && [ ! -e "$include/Python.h" ]; then
  case "$include" in
    /usr/include/*) missing+=(python3-dev) ;;  # Debian's Python
    *) log "WARNING: $include/Python.h is missing (this Python has no headers): the C extensions will not build" ;;
  esac
fi

if [ "${#missing[@]}" -eq 0 ]; then
  log "C build tools present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO="none"; fi
fi
if [ "$SUDO" = "none" ] || ! command -v apt-get >/dev/null 2>&1; then
  log "WARNING: missing ${missing[*]} and cannot apt-get install them: the C extensions will not" \
      "build and the detector will run its Python code (same decisions, slower)"
  exit 0
fi
log "installing ${missing[*]} (Debian packages)"
if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
         --no-install-recommends "${missing[@]}" >/dev/null; }; then
  log "WARNING: apt-get could not install ${missing[*]}: the C extensions will not build"
fi
exit 0
