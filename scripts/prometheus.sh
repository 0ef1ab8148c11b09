#!/usr/bin/env bash
#! Makes sure `prometheus` and `promtool` are on PATH, for the tests that run a real Prometheus
#! server (tests/prometheus.rs) and check the alert rules (scripts/check-monitoring). When one
#! is missing and this runs as root, the Debian package `prometheus` is installed (without
#! recommends, with no service left running); otherwise it stops and says what to install.
set -euo pipefail

install() {
  if [ "$(id -u)" != 0 ]; then
    echo "error: prometheus or promtool was not found. Install it (Debian/Ubuntu: \`apt-get install --no-install-recommends prometheus\`, which provides promtool; or a Prometheus release tarball) and put it on PATH, or run this script as root to install it." >&2
    exit 1
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: promtool was not found and there is no apt-get to install it with; install promtool (it ships with Prometheus) and put it on PATH." >&2
    exit 1
  fi
  echo "prometheus or promtool not found: installing the Debian package prometheus..." >&2
  # Keep the package's maintainer scripts from starting the prometheus service: policy-rc.d
  # answering 101 forbids invoke-rc.d to start anything. Only ours is removed afterwards.
  local policy=/usr/sbin/policy-rc.d ours=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    ours=1
  fi
  local before
  before="$(pgrep -x prometheus || true)"
  export DEBIAN_FRONTEND=noninteractive
  local rc=0
  if ! apt-get install -y --no-install-recommends prometheus >&2; then
    # The package lists may be missing or stale on a fresh machine.
    apt-get update >&2 && apt-get install -y --no-install-recommends prometheus >&2 || rc=$?
  fi
  if [ -n "$ours" ]; then rm -f "$policy"; fi
  # Nothing may keep running: stop a prometheus that appeared during the installation (ours).
  local pid
  for pid in $(pgrep -x prometheus || true); do
    if ! grep -qx "$pid" <<<"$before"; then
      echo "stopping the prometheus server (pid $pid) the package started" >&2
      kill "$pid" 2>/dev/null || true
    fi
  done
  if [ "$rc" != 0 ] || ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    echo "error: installing the Debian package prometheus failed, or it did not provide prometheus and promtool; install them by hand." >&2
    exit 1
  fi
}

if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  install
fi
