#!/usr/bin/env bash
# The main job, end to end on a fresh machine: a real Claude Code CLI in a sealed bottle,
# talking HTTPS to api.anthropic.com through the intercepting egress gateway, which routes
# it to a scripted Anthropic Messages API on loopback and injects the API key the bottle
# never sees.
# The scripted model first has the agent try two ways around the gateway (a direct
# connection and a DNS lookup), then write a file. The audit trail shows every request it
# made and both attempts, refused by the tripwire.
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

# The "real" API key lives only in this process's environment; the bottle gets a
# placeholder, and the gateway swaps it in on the way to api.anthropic.com.
export DEMO_ANTHROPIC_KEY="sk-ant-api03-demo-key-not-a-real-secret-0123456789"
# A throwaway CA and a certificate for api.anthropic.com, so the loopback fixture can pose
# as the real host over TLS. Only the gateway trusts this CA; the bottle trusts its
# gateway's own per-bottle CA.
(cd "$work" &&
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
    -keyout ca.key -out ca.pem -subj "/CN=bot-bottle demo origin CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" &&
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout leaf.key -out leaf.csr -subj "/CN=api.anthropic.com" &&
  printf 'subjectAltName=DNS:api.anthropic.com\nextendedKeyUsage=serverAuth\n' >leaf.ext &&
  openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
    -extfile leaf.ext -out leaf.pem) >/dev/null 2>&1
fixture_out="$work/fixture.json"
"$bin/bot-bottle-fixture" --kind anthropic --expect-key "$DEMO_ANTHROPIC_KEY" \
  --tls-cert "$work/leaf.pem" --tls-key "$work/leaf.key" \
  --shell "curl --noproxy '*' -sS -m 5 http://192.0.2.1/; getent hosts exfil.example; echo tried" \
  --write-file /workspace/hello.txt --content $'hello from inside a sealed bottle\n' >"$fixture_out" &
fixture_pid=$!
trap 'kill $fixture_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do [ -s "$fixture_out" ] && break; sleep 0.1; done
addr=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["addr"])' "$fixture_out")

cat >"$project/.bot-bottle/agents/implementer.md" <<'AGENT'
---
provider: claude
bottles: claude-api
---
You implement small, well-tested changes.
AGENT
cat >"$project/.bot-bottle/bottles/claude-api.md" <<'BOTTLE'
---
egress:
  audit: all
  rules:
    - host: api.anthropic.com
      methods: [POST]
      paths: ["/v1/messages*"]
credentials:
  - name: anthropic
    source: {env: DEMO_ANTHROPIC_KEY}
    hosts: [api.anthropic.com]
    inject: {header: x-api-key}
    env: ANTHROPIC_API_KEY
---
BOTTLE

cd "$project"
# Project manifests decide egress, mounts and credentials; a headless start uses them only
# once they were trusted as they are (an interactive start asks in its preflight).
"$bin/bot-bottle" trust
echo "demo: the plan" >&2
"$bin/bot-bottle" start implementer --headless --prompt "Write hello.txt" --dry-run
# The gateway routes api.anthropic.com to the loopback fixture and refuses anything
# that is not loopback: the demo cannot reach the internet.
export BOT_BOTTLE_UPSTREAM_OVERRIDES="api.anthropic.com=$addr" BOT_BOTTLE_LOOPBACK_ONLY=1
export BOT_BOTTLE_UPSTREAM_CA="$work/ca.pem"
out=$("$bin/bot-bottle" start implementer --headless --prompt "Write hello.txt" --json)
slug=$(printf '%s' "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["slug"])')
echo
echo "== the agent wrote $project/hello.txt:"
cat "$project/hello.txt"
echo
echo "== audit trail of $slug ($BOT_BOTTLE_HOME/state/$slug/egress.jsonl):"
"$bin/bot-bottle" audit "$slug" | tee "$work/audit.txt"
"$bin/bot-bottle" audit verify "$slug"
for reason in direct-connection dns-query; do
  grep -q "($reason)" "$work/audit.txt" || { echo "demo: no ($reason) event in the audit trail" >&2; exit 1; }
done
echo
echo "== the bottle held only a placeholder for the API key:"
docker inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "bot-bottle-$slug" | grep '^ANTHROPIC_API_KEY='
if docker inspect "bot-bottle-$slug" | grep -q "$DEMO_ANTHROPIC_KEY"; then
  echo "demo: the real key reached the bottle" >&2; exit 1
fi
echo
echo "Try: BOT_BOTTLE_HOME=$BOT_BOTTLE_HOME $bin/bot-bottle ps"
echo "     BOT_BOTTLE_HOME=$BOT_BOTTLE_HOME $bin/bot-bottle destroy $slug"
