#!/usr/bin/env bash
# The whole test suite, as CI runs it: prerequisites, formatting, lints, every test
# (the Docker ones included: they need the engine that bootstrap starts).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export BOT_BOTTLE_LOOPBACK_ONLY=1
echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test" >&2
# Docker tests build images (once per content hash) and run bottles; two at a time
# fit 2 cores without starving the engine.
cargo test --workspace --locked -- --test-threads="${BOT_BOTTLE_TEST_THREADS:-2}"
