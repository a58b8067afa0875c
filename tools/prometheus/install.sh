#!/usr/bin/env bash
# Install Prometheus and promtool from Debian's `prometheus` package, for the rule unit tests
# (promtool test rules) and the integration test that runs a real Prometheus server.
#
#   tools/prometheus/install.sh          install if absent, print versions
#
# Runs as root (or through sudo when available). The package's service is never started:
# a policy-rc.d that denies every start is in place while apt-get runs (an existing one is kept),
# and if a prometheus daemon was started anyway (systemd hosts), it is stopped and disabled.
# Only Debian's own repositories are used.
#
# Environment:
#   PROMETHEUS_BIN / PROMTOOL_BIN   where to expect the binaries (default /usr/bin/...)
set -euo pipefail

PROMETHEUS_BIN="${PROMETHEUS_BIN:-/usr/bin/prometheus}"
PROMTOOL_BIN="${PROMTOOL_BIN:-/usr/bin/promtool}"

log() { printf '[prometheus/install.sh] %s\n' "$*" >&2; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    log "ERROR: must run as root (or with sudo) to apt-get install prometheus"; exit 1
  fi
fi

if [ -x "$PROMETHEUS_BIN" ] && [ -x "$PROMTOOL_BIN" ]; then
  log "already installed"
else
  POLICY=/usr/sbin/policy-rc.d
  ADDED_POLICY=0
  if [ ! -e "$POLICY" ]; then
    # 101 = "action not allowed": invoke-rc.d will not start the freshly installed service.
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod 0755 "$POLICY"
    ADDED_POLICY=1
  fi
  cleanup() { if [ "$ADDED_POLICY" = 1 ]; then $SUDO rm -f "$POLICY"; fi; }
  trap cleanup EXIT

  log "apt-get install prometheus (Debian package: prometheus + promtool)"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    prometheus >&2

  # On a systemd host policy-rc.d is honoured by deb-systemd-invoke too; be certain anyway.
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now prometheus.service >/dev/null 2>&1 || true
  elif [ -x /etc/init.d/prometheus ]; then
    $SUDO /etc/init.d/prometheus stop >/dev/null 2>&1 || true
  fi
  cleanup
  trap - EXIT
fi

[ -x "$PROMETHEUS_BIN" ] || { log "ERROR: $PROMETHEUS_BIN missing after install"; exit 1; }
[ -x "$PROMTOOL_BIN" ] || { log "ERROR: $PROMTOOL_BIN missing after install"; exit 1; }

"$PROMETHEUS_BIN" --version 2>&1 | head -n1
"$PROMTOOL_BIN" --version 2>&1 | head -n1
