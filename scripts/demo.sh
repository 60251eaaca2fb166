#!/usr/bin/env bash
# The main job, end to end on a fresh machine: a real Claude Code CLI in a sealed bottle,
# talking through the egress gateway to a scripted Anthropic Messages API on loopback.
# It writes a file into the workspace, and the audit trail shows every request it made.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
bash scripts/bootstrap.sh

echo "demo: building bot-bottle and the scripted model fixture" >&2
cargo build --quiet -p bot-bottle -p bot-bottle-testkit --bins
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
bin="$target_dir/x86_64-unknown-linux-gnu/debug"

work=$(mktemp -d /tmp/bot-bottle-demo.XXXXXX)
export BOT_BOTTLE_HOME="${BOT_BOTTLE_HOME:-$work/home}"
project="$work/project"
mkdir -p "$project/.bot-bottle/agents" "$project/.bot-bottle/bottles"
# The agent runs as uid 1000 (never root); give it the demo workspace.
[ "$(id -u)" = 0 ] && chown 1000:1000 "$project"

key="sk-ant-api03-demo-key-not-a-secret"
fixture_out="$work/fixture.json"
"$bin/bot-bottle-fixture" --kind anthropic --expect-key "$key" \
  --write-file /workspace/hello.txt --content $'hello from inside a sealed bottle\n' >"$fixture_out" &
fixture_pid=$!
trap 'kill $fixture_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do [ -s "$fixture_out" ] && break; sleep 0.1; done
addr=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["addr"])' "$fixture_out")

cat >"$project/.bot-bottle/agents/implementer.md" <<AGENT
---
provider: claude
bottles: claude-api
---
You implement small, well-tested changes.
AGENT
cat >"$project/.bot-bottle/bottles/claude-api.md" <<BOTTLE
---
egress:
  audit: all
  rules:
    - host: api.anthropic.com
      port: 80
      methods: [POST]
      paths: ["/v1/messages*"]
env:
  ANTHROPIC_BASE_URL: http://api.anthropic.com
  ANTHROPIC_API_KEY: $key
---
BOTTLE

cd "$project"
echo "demo: the plan" >&2
"$bin/bot-bottle" start implementer --headless --prompt "Write hello.txt" --dry-run
# The gateway routes api.anthropic.com to the loopback fixture and refuses anything
# that is not loopback: the demo cannot reach the internet.
export BOT_BOTTLE_UPSTREAM_OVERRIDES="api.anthropic.com=$addr" BOT_BOTTLE_LOOPBACK_ONLY=1
out=$("$bin/bot-bottle" start implementer --headless --prompt "Write hello.txt" --json)
slug=$(printf '%s' "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["slug"])')
echo
echo "== the agent wrote $project/hello.txt:"
cat "$project/hello.txt"
echo
echo "== audit trail of $slug ($BOT_BOTTLE_HOME/state/$slug/egress.jsonl):"
"$bin/bot-bottle" audit "$slug"
"$bin/bot-bottle" audit verify "$slug"
echo
echo "Try: BOT_BOTTLE_HOME=$BOT_BOTTLE_HOME $bin/bot-bottle ps"
echo "     BOT_BOTTLE_HOME=$BOT_BOTTLE_HOME $bin/bot-bottle destroy $slug"
