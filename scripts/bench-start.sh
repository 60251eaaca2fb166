#!/usr/bin/env bash
# Benchmark: time from `bot-bottle start --headless` (provider `command` running `true`) to
# exit, against a bare `docker run --rm --network none` of the same image, both measured in
# this run with warm images, with the tripwire (the default: a second container that owns the
# bottle's network namespace) and without. Also reports the peak RSS of the host-side process.
# Usage: scripts/bench-start.sh [RUNS]   (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-10}"
bash scripts/bootstrap.sh
cargo build --quiet --release -p bot-bottle
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
bin="$target_dir/x86_64-unknown-linux-gnu/release/bot-bottle"
work=$(mktemp -d /tmp/bot-bottle-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/p/.bot-bottle/agents" "$work/p/.bot-bottle/bottles"
[ "$(id -u)" = 0 ] && chown 1000:1000 "$work/p"
printf -- '---\nprovider: command\ncommand: ["true"]\nbottles: plain\n---\n' >"$work/p/.bot-bottle/agents/bench.md"
printf -- '---\negress:\n  rules: []\n---\n' >"$work/p/.bot-bottle/bottles/plain.md"
export BOT_BOTTLE_HOME="$work/home" BOT_BOTTLE_LOOPBACK_ONLY=1
cd "$work/p"
"$bin" trust >/dev/null
image=$("$bin" start bench --headless --prompt x --dry-run --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["image"]["tag"])')
# Warm-up: builds the images once (not measured), then one untimed run of each.
"$bin" start bench --headless --prompt x --json >/dev/null
docker run --rm --network none "$image" true
python3 - "$bin" "$image" "$runs" <<'PY'
import json, os, statistics, subprocess, sys, time
bin, image, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
def timed(argv):
    """Wall time, stdout and peak RSS (KiB) of one process, from wait4's rusage."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{argv[0]} exited {proc.returncode}")
    return seconds, out, usage.ru_maxrss
bare, ours, sealed, slugs, rss = [], [], [], [], []
start = [bin, "start", "bench", "--headless", "--prompt", "x", "--json"]
for _ in range(runs):
    bare.append(timed(["docker", "run", "--rm", "--network", "none", image, "true"])[0])
    seconds, out, peak = timed(start)
    ours.append(seconds)
    rss.append(peak)
    slugs.append(json.loads(out)["slug"])
    # Without the tripwire: one container instead of two.
    os.environ["BOT_BOTTLE_TRIPWIRE"] = "off"
    seconds, out, _ = timed(start)
    del os.environ["BOT_BOTTLE_TRIPWIRE"]
    sealed.append(seconds)
    slugs.append(json.loads(out)["slug"])
peak_kib = max(rss)
for slug in slugs:
    subprocess.run([bin, "destroy", slug], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
b, o, s = statistics.median(bare), statistics.median(ours), statistics.median(sealed)
print(f"bottle start, {runs} runs, medians:")
print(f"  docker run --rm --network none:          {b*1000:8.1f} ms")
print(f"  bot-bottle start --headless:              {o*1000:8.1f} ms  ratio {o/b:.2f}x (target <= 1.25x)")
print(f"  the same, BOT_BOTTLE_TRIPWIRE=off:        {s*1000:8.1f} ms  ratio {s/b:.2f}x")
print(f"  peak RSS of the host-side bot-bottle process (gateway included): {peak_kib/1024:.1f} MiB")
PY
