#!/usr/bin/env bash
# tests/bench/access-log.sh [ROUNDS]: what the connection log (access_log = true) costs.
# Not a test: a measurement to run by hand (docs/PERFORMANCE.md, "The connection log").
#
#   bash tests/bench/access-log.sh          # 3 rounds, HANDLER=event
#   HANDLER=thread bash tests/bench/access-log.sh 3
#
# For each round, with access_log off and on (the order alternates between rounds), starts
# target/release/echod (workers = 1, the server tree on CPU 1, its log to a file) and runs
# echo-load on CPU 0: 50 connections x 64 B for 5 s, then churn (connect, one echo, close)
# on 50 connections for 5 s. Prints each run's rate and the server's CPU microseconds per
# echo (master and worker, from /proc), then the on/off ratios. echod is stopped by PID.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
ROUNDS=${1:-3}
HANDLER=${HANDLER:-event}
ECHOD=$ROOT/target/release/echod
LOAD=$ROOT/target/release/echo-load
[ -x "$ECHOD" ] && [ -x "$LOAD" ] || { echo "build first: cargo build --release" >&2; exit 1; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
cpu_of() { # PID...: user+system seconds of these processes
    # Fields counted after the name's ")": a worker's name ("echod: worker 0") has spaces.
    local total=0
    for p in "$@"; do
        total=$(sed 's/.*) //' "/proc/$p/stat" | awk -v t="$total" '{ print t + ($12 + $13) / 100 }')
    done
    echo "$total"
}

results=$(mktemp /tmp/echod-access-bench.XXXX)
trap 'rm -f "$results"' EXIT
run() { # ROUND LOG(on|off)
    local dir port pid workers before after steady churn
    dir=$(mktemp -d /tmp/echod-access.XXXX)
    chmod 0755 "$dir" # run as root, echod reads its file as `user` (nobody)
    port=$(free_port)
    local on=false; [ "$2" = on ] && on=true
    printf 'listen = ["127.0.0.1:%s"]\nworkers = 1\nhandler = "%s"\naccess_log = %s\nstats_interval = 0\n' \
        "$port" "$HANDLER" "$on" > "$dir/echod.toml"
    taskset -c 1 "$ECHOD" --config "$dir/echod.toml" 2> "$dir/log" &
    pid=$!
    for _ in $(seq 100); do grep -q "ready:" "$dir/log" && break; sleep 0.1; done
    grep -q "ready:" "$dir/log" || { cat "$dir/log" >&2; exit 1; }
    workers=$(pgrep -P "$pid" | tr '\n' ' ')
    for kind in steady churn; do
        local flags=(-c 50 -s 64 -d 5)
        [ "$kind" = churn ] && flags+=(--churn)
        # shellcheck disable=SC2086
        before=$(cpu_of "$pid" $workers)
        json=$(taskset -c 0 "$LOAD" --addr "127.0.0.1:$port" "${flags[@]}" --json || true)
        # shellcheck disable=SC2086
        after=$(cpu_of "$pid" $workers)
        python3 -c 'import json, sys
j = json.loads(sys.argv[1]); cpu = float(sys.argv[3]) - float(sys.argv[2])
us = cpu * 1e6 / max(j["responses"], 1)
print("%s %s %s %.0f %.2f %s" % (sys.argv[4], sys.argv[5], sys.argv[6], j["rps"], us, j["errors"]))' \
            "$json" "$before" "$after" "$1" "$2" "$kind" >> "$results"
    done
    kill "$pid"; wait "$pid" 2>/dev/null || true
    lines=$(grep -c "] connection listener=" "$dir/log" || true)
    echo "round $1, access_log $2: $lines connection lines logged"
    rm -rf "$dir"
}

for round in $(seq "$ROUNDS"); do
    if [ $((round % 2)) -eq 1 ]; then run "$round" off; run "$round" on; else run "$round" on; run "$round" off; fi
done
python3 - "$results" "$HANDLER" <<'PY'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1])]
print(f"handler = {sys.argv[2]}; round log kind rate/s cpu_us_per_echo errors")
for r in rows:
    print("  " + " ".join(r))
for kind in ("steady", "churn"):
    def med(log, col):
        return statistics.median(float(r[col]) for r in rows if r[1] == log and r[2] == kind)
    rate = med("on", 3) / med("off", 3)
    cpu = med("on", 4) / med("off", 4)
    print(f"{kind}: access_log on/off, medians: rate {rate:.3f}x, server CPU per echo {cpu:.3f}x")
PY
