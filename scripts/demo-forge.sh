#!/usr/bin/env bash
# The forge loop, end to end, against a local fake Gitea: an issue labelled for an agent
# becomes a sealed run of the real Claude Code CLI (driven by a scripted model) that reads
# the issue through its forge sidecar, clones and pushes its branch through the gateway,
# opens a pull request and signals done; a review comment resumes it and it pushes a fix;
# merging the pull request destroys the bottle. The fake Gitea serves its API and a real
# `git http-backend` over TLS on loopback and delivers signed webhooks to
# `bot-bottle orchestrate serve`. Nothing leaves the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh

echo "demo-forge: building bot-bottle and the fixtures" >&2
cargo build --quiet -p bot-bottle -p bot-bottle-testkit --bins
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
bin="$target_dir/x86_64-unknown-linux-gnu/debug"

work=$(mktemp -d /tmp/bot-bottle-forge-demo.XXXXXX)
export BOT_BOTTLE_HOME="$work/home"
mkdir -p "$BOT_BOTTLE_HOME/agents" "$BOT_BOTTLE_HOME/bottles"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# Stand-ins for real secrets: they live in this shell's environment only.
export DEMO_ANTHROPIC_KEY="sk-ant-api03-demo-key-not-a-real-secret-0123456789"
export FORGE_TOKEN="gitea-demo-token-not-a-real-secret-0123456789"
export FORGE_WEBHOOK_SECRET="demo-webhook-secret"

# A throwaway CA, and leaves for the hosts the loopback fixtures pose as. Only the gateway
# and the orchestrator trust it; a bottle trusts its own gateway's CA.
(cd "$work" &&
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
    -keyout ca.key -out ca.pem -subj "/CN=bot-bottle forge demo CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" &&
  for leaf in model:api.anthropic.com gitea:gitea.test; do
    name=${leaf%%:*} host=${leaf#*:}
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -keyout "$name.key" -out "$name.csr" -subj "/CN=$host"
    printf 'subjectAltName=DNS:%s,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' "$host" >"$name.ext"
    openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
      -extfile "$name.ext" -out "$name.pem"
  done) >/dev/null 2>&1

# The scripted model: what "the agent" decides, turn by turn. Claude Code runs each tool
# call for real inside the bottle: MCP calls to the forge sidecar, shell commands in it.
GIT='git -c user.name=agent -c user.email=agent@example.invalid'
cat >"$work/script.json" <<SCRIPT
[
  {"tool": {"name": "mcp__forge__read_issue", "input": {"number": 1}}},
  {"shell": "cd /workspace && git clone -q \"\$BOT_BOTTLE_FORGE_CLONE_URL\" widget && cd widget && git checkout -q -b \"\$BOT_BOTTLE_FORGE_BRANCH\" && printf 'def widget():\\\\n    return 42\\\\n' > widget.py && git add widget.py && $GIT commit -qm 'Fix the widget' && git push -q origin HEAD && (git push origin HEAD:main 2>&1 | tail -1 || true)"},
  {"tool": {"name": "mcp__forge__create_pr", "input": {"title": "Fix the widget", "body": "Closes #1"}}},
  {"tool": {"name": "mcp__forge__post_comment", "input": {"number": 2, "body": "I should not be able to write here"}}},
  {"tool": {"name": "mcp__forge__signal_done", "input": {"status": "done", "summary": "The widget returns 42 now (widget.py)."}}},
  {"text": "Opened the pull request."},
  {"shell": "cd /workspace/widget && printf '\\\\n# Returns the answer.\\\\n' >> widget.py && $GIT commit -qam 'Document the widget' && git push -q origin HEAD"},
  {"tool": {"name": "mcp__forge__signal_done", "input": {"status": "done", "summary": "Documented widget() as asked."}}},
  {"text": "Addressed the review."}
]
SCRIPT

model_out="$work/model.json"
"$bin/bot-bottle-fixture" --kind anthropic --expect-key "$DEMO_ANTHROPIC_KEY" \
  --tls-cert "$work/model.pem" --tls-key "$work/model.key" --script "$work/script.json" >"$model_out" &
pids+=($!)
gitea_in="$work/gitea.in"
mkfifo "$gitea_in"
gitea_out="$work/gitea.json"
"$bin/bot-bottle-fake-gitea" --tls-cert "$work/gitea.pem" --tls-key "$work/gitea.key" \
  --repo acme/widget --git-user bot --git-token-env FORGE_TOKEN --member bot-bottle:agent1 \
  --issue 'The widget is broken|widget() should return 42.|alice|agent1' \
  --issue 'Another issue|Not the run'"'"'s to touch.|carol|' <"$gitea_in" >"$gitea_out" &
pids+=($!)
exec 7>"$gitea_in"
for _ in $(seq 1 100); do [ -s "$model_out" ] && [ -s "$gitea_out" ] && break; sleep 0.1; done
json_field() { python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())[sys.argv[2]])' "$1" "$2"; }
model_addr=$(json_field "$model_out" addr)
gitea_addr=$(json_field "$gitea_out" addr)
gitea() { printf '%s\n' "$*" >&7; }

cat >"$BOT_BOTTLE_HOME/agents/implementer.md" <<'AGENT'
---
provider: claude
bottles: claude-api
---
You fix issues with small, reviewed changes.
AGENT
cat >"$BOT_BOTTLE_HOME/bottles/claude-api.md" <<'BOTTLE'
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

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export FORGE_GITEA_API="https://$gitea_addr/api/v1" FORGE_GIT_URL="https://gitea.test"
export FORGE_CA_FILE="$work/ca.pem" FORGE_BOT_USER=bot FORGE_LISTEN="127.0.0.1:$port"
# The gateway routes the fixtures' host names to loopback and refuses anything else.
export BOT_BOTTLE_UPSTREAM_OVERRIDES="api.anthropic.com=$model_addr,gitea.test=$gitea_addr"
export BOT_BOTTLE_UPSTREAM_CA="$work/ca.pem" BOT_BOTTLE_LOOPBACK_ONLY=1
bb() { "$bin/bot-bottle" "$@"; }

step "orchestrate serve (webhooks on http://127.0.0.1:$port/webhook)"
bb orchestrate serve 2>"$work/orchestrator.log" &
pids+=($!)
for _ in $(seq 1 100); do (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
gitea hook "http://127.0.0.1:$port/webhook" "$FORGE_WEBHOOK_SECRET"

wait_state() { # $1 state, $2 resume rounds
  for _ in $(seq 1 1200); do
    if bb orchestrate status --json | python3 -c '
import json, sys
rows = [r for r in json.load(sys.stdin) if r["issue"] == 1]
sys.exit(0 if rows and rows[0]["state"] == sys.argv[1] and rows[0]["resume_rounds"] >= int(sys.argv[2]) else 1)' "$1" "$2"; then
      return 0
    fi
    sleep 0.5
  done
  echo "demo-forge: timed out waiting for the run to be $1" >&2
  tail -50 "$work/orchestrator.log" >&2
  exit 1
}
show() { gitea show; sleep 0.3; tail -1 "$gitea_out" | python3 -c "$1"; }

step "alice labels issue #1 'bot-bottle:implementer' (assigned to agent1, a member of bot-bottle)"
gitea label 1 bot-bottle:implementer alice
wait_state frozen 0
bb orchestrate status
slug=$(bb orchestrate status --json | python3 -c 'import json,sys; print([r for r in json.load(sys.stdin) if r["issue"]==1][0]["slug"])')
pr=$(bb orchestrate status --json | python3 -c 'import json,sys; print([r for r in json.load(sys.stdin) if r["issue"]==1][0]["pr"])')

step "on the forge: the branch, the pull request #$pr and the comments"
show '
import json, sys
state = json.load(sys.stdin)
for ref, sha in state["refs"].items(): print(f"  {ref} {sha[:12]}")
for n, comments in state["comments"].items():
    for c in comments:
        user = c["user"]
        lines = [l for l in c["body"].splitlines() if l.strip()][:2]
        print(f"  #{n} {user}: " + " / ".join(l[:100] for l in lines))'

step "alice reviews pull request #$pr"
gitea comment "$pr" alice "Please document what widget() returns."
wait_state frozen 1
bb orchestrate status

step "widget.py on the branch bot-bottle/$slug, after the fix"
gitea file "bot-bottle/$slug" widget.py
sleep 0.3
tail -1 "$gitea_out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["file"])'

step "the audit trail of $slug (egress), then its forge operations"
bb audit "$slug"
bb audit verify "$slug"
bb audit "$slug" --log forge-ops
bb audit verify "$slug" --log forge-ops

envelope="$BOT_BOTTLE_HOME/state/$slug/provenance.json"
step "signed provenance: $envelope"
bb provenance verify "$envelope" --key "$BOT_BOTTLE_HOME/keys/provenance.ed25519.pub"

step "alice merges pull request #$pr"
gitea close "$pr" merged
wait_state destroyed 0
bb orchestrate status
echo
echo "The audit logs are kept in $BOT_BOTTLE_HOME/audit/; the last provenance at"
echo "  $BOT_BOTTLE_HOME/audit/$slug.provenance.json"
echo "Verify it with:"
echo "  BOT_BOTTLE_HOME=$BOT_BOTTLE_HOME $bin/bot-bottle provenance verify $BOT_BOTTLE_HOME/audit/$slug.provenance.json --key $BOT_BOTTLE_HOME/keys/provenance.ed25519.pub"
