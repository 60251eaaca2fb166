#!/usr/bin/env bash
# Gateway benchmark: small HTTPS GETs at concurrency 1 and 32 (req/s, p50, p99) and 1 MiB
# downloads, direct vs squid (CONNECT tunnel) vs mitmdump (intercepting) vs the bot-bottle
# gateway (intercepting, 20-rule policy, full gitleaks DLP set), all on loopback in one run;
# prints peak RSS and ratios. The baselines are installed from Debian when missing.
# Usage: scripts/bench-gateway.sh [--seconds N] [--big N] [--rounds N] [--skip-others]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v squid >/dev/null 2>&1 || ! command -v mitmdump >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  APT_OPTS=(-o Acquire::Retries=5 -o Acquire::http::Timeout=60 -o DPkg::Lock::Timeout=300)
  timeout 600 $SUDO apt-get "${APT_OPTS[@]}" update -q >/dev/null
  timeout 1200 $SUDO env DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTS[@]}" install -y -q \
    --no-install-recommends squid mitmproxy >/dev/null
fi
exec cargo bench --quiet -p bot-bottle-egress --bench gateway -- "$@"
