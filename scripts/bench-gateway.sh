#!/usr/bin/env bash
# Gateway benchmark: small HTTPS GETs at concurrency 1 and 32 (req/s, p50, p99) and 1 MiB
# downloads, direct vs squid (CONNECT tunnel) vs mitmdump (intercepting) vs the bot-bottle
# gateway (intercepting, 20-rule policy, full gitleaks DLP set), all on loopback in one run;
# prints peak RSS and ratios. squid and mitmdump are skipped with a note when not installed.
# Usage: scripts/bench-gateway.sh [--seconds N] [--big N]
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench --quiet -p bot-bottle-egress --bench gateway -- "$@"
