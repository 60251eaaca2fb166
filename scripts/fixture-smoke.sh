#!/usr/bin/env bash
# Runs the real agent CLIs (claude, codex, pi) on this host against the scripted model
# fixtures (bot-bottle-fixture) over plain HTTP on 127.0.0.1, and checks that each one
# writes the scripted file and exits 0, and that each one fails fast on a wrong key.
#
# Nothing may reach the internet: as root, the whole run happens in a new network namespace
# with only loopback (unshare --net); and every CLI runs with a clean environment whose proxy
# variables point at a dead loopback port ($DEAD_PROXY), so stray traffic fails.
#
# Needs: the CLIs on PATH (npm install -g @anthropic-ai/claude-code @openai/codex
# @mariozechner/pi-coding-agent), python3, and Node >= 20.6 for pi. When run as root, claude
# runs as the unprivileged user $FIXTURE_USER (created if missing), because it refuses
# --dangerously-skip-permissions as root.
#
# Usage: scripts/fixture-smoke.sh [claude] [codex] [pi]    (default: all three)
#        FIXTURE_TLS=1 scripts/fixture-smoke.sh    serve HTTPS from a throwaway CA instead, trusted
#        through NODE_EXTRA_CA_CERTS (claude, pi) and SSL_CERT_FILE (codex)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
agents=("$@")
[ ${#agents[@]} -eq 0 ] && agents=(claude codex pi)
fixture_user=${FIXTURE_USER:-fixturetest}
dead_proxy=${DEAD_PROXY:-http://127.0.0.1:9}
key=test-key
work=$(mktemp -d /tmp/fixture-smoke.XXXXXX)
chmod 755 "$work"
fixture_pids=()

cleanup() {
    for pid in "${fixture_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

fail() { echo "FAIL: $*" >&2; exit 1; }

if [ -z "${FIXTURE_BIN:-}" ]; then
    (cd "$repo" && cargo build -q -p bot-bottle-testkit --bin bot-bottle-fixture)
    FIXTURE_BIN=$repo/target/x86_64-unknown-linux-gnu/debug/bot-bottle-fixture
fi

# The proxy variables only catch clients that honour them. As root, rerun inside a fresh
# network namespace that has nothing but loopback, so a direct connection fails too.
if [ "$(id -u)" -eq 0 ] && [ "${FIXTURE_NETNS:-1}" = 1 ] && [ -z "${FIXTURE_IN_NETNS:-}" ]; then
    rm -rf "$work"
    export FIXTURE_BIN FIXTURE_IN_NETNS=1
    exec unshare --net -- bash -c 'ip link set lo up && exec "$0" "$@"' "$0" "${agents[@]}"
fi
if [ -n "${FIXTURE_IN_NETNS:-}" ]; then
    echo "network: private namespace, interfaces: $(ip -brief link | awk '{print $1}' | tr '\n' ' ')"
else
    echo "network: host namespace (not root, or FIXTURE_NETNS=0); only the dead proxy guards"
fi
cp "$FIXTURE_BIN" "$work/fixture"

tls_args=()
ca_env=()
if [ "${FIXTURE_TLS:-0}" = 1 ]; then
    (cd "$work" &&
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
            -keyout ca.key -out ca.pem -subj "/CN=fixture-smoke CA" \
            -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" &&
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
            -keyout leaf.key -out leaf.csr -subj "/CN=localhost" &&
        printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >leaf.ext &&
        openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
            -extfile leaf.ext -out leaf.pem && chmod 644 ca.pem) >/dev/null 2>&1 ||
        fail "cannot make the test CA with openssl"
    tls_args=(--tls-cert "$work/leaf.pem" --tls-key "$work/leaf.key")
    ca_env=(NODE_EXTRA_CA_CERTS="$work/ca.pem" SSL_CERT_FILE="$work/ca.pem")
fi

# start_fixture KIND DIR CONTENT: starts a fixture, sets $base_url.
start_fixture() {
    local kind=$1 dir=$2 content=$3
    "$work/fixture" --kind "$kind" --expect-key "$key" --write-file hello.txt \
        --content "$content" --record "$dir/requests.json" "${tls_args[@]}" \
        >"$dir/fixture.out" 2>"$dir/fixture.err" &
    fixture_pids+=($!)
    fixture_pid=$!
    for _ in $(seq 50); do [ -s "$dir/fixture.out" ] && break; sleep 0.1; done
    base_url=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["base_url"])' "$dir/fixture.out")
    # The leaf names `localhost`, the name an intercepting gateway would present too.
    base_url=${base_url/127.0.0.1/localhost}
}

stop_fixture() {
    kill "$fixture_pid"
    wait "$fixture_pid" 2>/dev/null || true
}

# requests DIR: prints "METHOD PATH" per recorded request.
requests() {
    python3 -c 'import json,sys
for r in json.load(open(sys.argv[1])): print(r["method"], r["path"])' "$1/requests.json"
}

# as_agent_user CMD...: runs CMD as the unprivileged user when we are root.
as_agent_user() {
    if [ "$(id -u)" -eq 0 ]; then
        id "$fixture_user" >/dev/null 2>&1 || useradd -m "$fixture_user"
        runuser -u "$fixture_user" -- "$@"
    else
        "$@"
    fi
}

proxy_env=("${ca_env[@]}" HTTPS_PROXY=$dead_proxy HTTP_PROXY=$dead_proxy https_proxy=$dead_proxy
    http_proxy=$dead_proxy NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost)

# run_claude DIR KEY: runs claude -p in DIR/ws with HOME=DIR/home.
run_claude() {
    local dir=$1 api_key=$2
    mkdir -p "$dir/home" "$dir/ws"
    [ "$(id -u)" -eq 0 ] && chown -R "$fixture_user" "$dir/home" "$dir/ws"
    (cd "$dir/ws" && as_agent_user env -i PATH="$PATH" HOME="$dir/home" "${proxy_env[@]}" \
        ANTHROPIC_BASE_URL="$base_url" ANTHROPIC_API_KEY="$api_key" \
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 \
        timeout 120 claude -p "write hello.txt" --dangerously-skip-permissions \
        </dev/null >"$dir/agent.out" 2>"$dir/agent.err")
}

# run_codex DIR KEY: runs codex exec with a custom provider pointed at the fixture.
run_codex() {
    local dir=$1 api_key=$2
    mkdir -p "$dir/home" "$dir/codex-home" "$dir/ws"
    (cd "$dir/ws" && env -i PATH="$PATH" HOME="$dir/home" CODEX_HOME="$dir/codex-home" \
        "${proxy_env[@]}" FIXTURE_API_KEY="$api_key" \
        timeout 120 codex exec --skip-git-repo-check --dangerously-bypass-approvals-and-sandbox \
        -c model_provider=fixture -c model=fixture-model \
        -c model_providers.fixture.name=fixture \
        -c "model_providers.fixture.base_url=\"$base_url/v1\"" \
        -c model_providers.fixture.env_key=FIXTURE_API_KEY \
        -c model_providers.fixture.wire_api=responses \
        -c model_providers.fixture.request_max_retries=0 \
        -c model_providers.fixture.stream_max_retries=0 \
        -c analytics.enabled=false -c features.plugins=false \
        "write hello.txt" </dev/null >"$dir/agent.out" 2>"$dir/agent.err")
}

# run_pi DIR KEY: runs pi -p with the built-in anthropic provider's baseUrl overridden.
run_pi() {
    local dir=$1 api_key=$2
    mkdir -p "$dir/home/.pi/agent" "$dir/ws"
    printf '{"providers":{"anthropic":{"baseUrl":"%s"}}}\n' "$base_url" >"$dir/home/.pi/agent/models.json"
    (cd "$dir/ws" && env -i PATH="$PATH" HOME="$dir/home" "${proxy_env[@]}" \
        ANTHROPIC_API_KEY="$api_key" PI_OFFLINE=1 \
        timeout 120 pi --no-session -p "write hello.txt" \
        </dev/null >"$dir/agent.out" 2>"$dir/agent.err")
}

kind_of() { [ "$1" = codex ] && echo openai || echo anthropic; }

for agent in "${agents[@]}"; do
    case $agent in
        claude) version=$(claude --version) ;;
        codex) version=$(codex --version) ;;
        pi) version="pi $(pi --version 2>&1)" ;;
        *) fail "unknown agent \`$agent\`" ;;
    esac
    echo "== $agent ($version)"

    dir=$work/$agent-ok
    mkdir -p "$dir"
    content="hello from $agent via the fixture"
    start_fixture "$(kind_of "$agent")" "$dir" "$content"
    started=$(date +%s)
    rc=0
    "run_$agent" "$dir" "$key" || rc=$?
    stop_fixture
    [ "$rc" -eq 0 ] || { cat "$dir/agent.err" >&2; fail "$agent exited $rc"; }
    [ "$(cat "$dir/ws/hello.txt" 2>/dev/null)" = "$content" ] || fail "$agent did not write hello.txt"
    grep -qx "done" "$dir/agent.out" || fail "$agent did not print the final text \`done\`"
    echo "ok: wrote hello.txt, printed done, exit 0 in $(($(date +%s) - started))s; requests:"
    requests "$dir" | sed 's/^/    /'

    dir=$work/$agent-wrong-key
    mkdir -p "$dir"
    start_fixture "$(kind_of "$agent")" "$dir" "never written"
    rc=0
    "run_$agent" "$dir" "wrong-key" || rc=$?
    stop_fixture
    [ "$rc" -ne 0 ] || fail "$agent exited 0 with a wrong key"
    [ ! -e "$dir/ws/hello.txt" ] || fail "$agent wrote a file with a wrong key"
    count=$(requests "$dir" | wc -l)
    [ "$count" -eq 1 ] || fail "$agent sent $count requests with a wrong key (want 1: no retry)"
    echo "ok: wrong key -> 403, exit $rc after 1 request: $(tail -n1 "$dir/agent.err" "$dir/agent.out" 2>/dev/null | grep -v '^==>' | grep . | tail -n1 | cut -c1-120)"
done
echo "all passed (logs in $work)"
