#!/usr/bin/env bash
# PostgreSQL server binaries (Debian packages) for the decision-log integration tests, which run
# initdb/pg_ctl on a temp dir and a free loopback port (tests/pg_server.py). Idempotent.
set -euo pipefail
find_bin() {
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && { echo "$d"; return 0; }
  done
  return 1
}
if dir=$(find_bin); then
  echo "postgresql: $dir"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq postgresql >/dev/null
echo "postgresql: $(find_bin)"
