#!/usr/bin/env bash
# tests/bench/scrape-flood.sh [ECHOD] [ROUNDS]: what a /metrics flood costs echo traffic.
# Not a test: a measurement to run by hand (README, "Metrics").
#
#   bash tests/bench/scrape-flood.sh                          # target/release/echod, 2 rounds
#   bash tests/bench/scrape-flood.sh /tmp/old/echod 2         # another build, to compare
#
# Starts ECHOD (workers = 64, event mode, metrics on) on free loopback ports and measures
# connect-echo-close with echo-load (--churn -c 4 -t 1 -d 4) twice: alone, then while 16
# Python threads scrape /metrics in a loop. Prints p50/p99 and rate of both, the scrapes
# done, and the master's CPU seconds over the run. echod is stopped by PID.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
ECHOD=${1:-$ROOT/target/release/echod}
ROUNDS=${2:-2}
LOAD=$ROOT/target/release/echo-load
[ -x "$ECHOD" ] && [ -x "$LOAD" ] || { echo "build first: cargo build --release" >&2; exit 1; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

flood() { # PORT SECONDS THREADS: scrape in a loop; prints how many scrapes were answered
    python3 - "$@" <<'PY'
import socket, sys, threading, time
addr, secs, n = ("127.0.0.1", int(sys.argv[1])), float(sys.argv[2]), int(sys.argv[3])
done = [0]
def run():
    end = time.time() + secs
    while time.time() < end:
        s = socket.create_connection(addr)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        while s.recv(65536):
            pass
        s.close()
        done[0] += 1
threads = [threading.Thread(target=run) for _ in range(n)]
[t.start() for t in threads]
[t.join() for t in threads]
print(done[0])
PY
}

summary() { # LABEL JSON
    python3 -c 'import json, sys
j = json.loads(sys.argv[2]); l = j["latency_us"]
print("%s: p50 %s us, p99 %s us, %.0f/s, errors %s" % (sys.argv[1], l["p50"], l["p99"], j["rps"], j["errors"]))' "$1" "$2"
}

for round in $(seq "$ROUNDS"); do
    dir=$(mktemp -d /tmp/echod-flood.XXXX)
    port=$(free_port); mport=$(free_port)
    printf 'listen = ["127.0.0.1:%s"]\nmetrics_listen = "127.0.0.1:%s"\nworkers = 64\nhandler = "event"\nevent_threads = 1\n' \
        "$port" "$mport" > "$dir/echod.toml"
    "$ECHOD" --config "$dir/echod.toml" 2> "$dir/log" &
    pid=$!
    trap 'kill $pid 2>/dev/null; rm -rf "$dir"' EXIT
    for _ in $(seq 100); do grep -q "ready:" "$dir/log" && break; sleep 0.1; done
    # echo-load exits 3 when a run had errors; the summary reports them, so
    # a run with errors is shown, not a reason to stop the script.
    alone=$("$LOAD" --addr "127.0.0.1:$port" --churn -c 4 -t 1 -d 4 --json || true)
    flood "$mport" 5 16 > "$dir/scrapes" &
    fp=$!
    sleep 0.5
    flooded=$("$LOAD" --addr "127.0.0.1:$port" --churn -c 4 -t 1 -d 4 --json || true)
    wait "$fp"
    cpu=$(awk '{ print ($14 + $15) / 100 }' "/proc/$pid/stat")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    echo "round $round ($ECHOD): $(cat "$dir/scrapes") scrapes in 5 s; master CPU ${cpu} s"
    summary "  churn alone" "$alone"
    summary "  churn under the flood" "$flooded"
    rm -rf "$dir"; trap - EXIT
done
