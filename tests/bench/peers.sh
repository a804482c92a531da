#!/usr/bin/env bash
# tests/bench/peers.sh [SECONDS]: echod vs the lab's peer servers, measured with echo-load,
# in one run, as ratios to tokio-echo. Not a test: a benchmark to run by hand.
#
#   bash tests/bench/peers.sh 3              # defaults below
#   CONNS="1 50 500" SIZES="64 4096" CHURN=50 REPS=3 SERVERS="echod tokio-echo thread-echo mio-echo apache-worker"
#
# Servers run pinned to CPU 1 and echo-load (one thread) to CPU 0 (PIN=0 to share both), like
# ../shared/lab/compare.sh. Each cell runs the servers back to back and the order flips every
# round, so drift hits all alike. Payloads are '\n'-terminated (--lines) for every server,
# because Apache's mod_echo echoes whole lines only. Every echoed byte is verified; a cell with
# errors or mismatches is flagged "!". Processes are stopped by PID.
# Besides responses/s it reports server CPU time per response (process tree, from /proc),
# which does not depend on how fast the client is: churn, for one, is client-bound here.
set -uo pipefail
DUR=${1:-3}
CONNS=${CONNS:-"1 50 500"}; SIZES=${SIZES:-"64 4096"}; CHURN=${CHURN:-50}; REPS=${REPS:-3}
SERVERS=${SERVERS:-"echod tokio-echo thread-echo mio-echo apache-worker"}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LAB=${LAB:-$ROOT/../shared/lab}
OUT=${OUT:-$(mktemp -d /tmp/echod-peers.XXXX)}
SPIN=(); CPIN=(); [[ ${PIN:-1} == 1 ]] && SPIN=(taskset -c 1) CPIN=(taskset -c 0)
ulimit -n "$(ulimit -Hn)"

cargo build -q --release --manifest-path "$ROOT/Cargo.toml" || exit 1
cargo build -q --release --manifest-path "$LAB/peers/Cargo.toml" || exit 1
LOAD=$ROOT/target/release/echo-load

tree() {  # PID and all its descendants
    ps -e -o pid=,ppid= | awk -v r="$1" '{pp[$1]=$2} END {in_[r]=1; do {n=0; for (p in pp)
        if (!(p in in_) && (pp[p] in in_)) {in_[p]=1; n++}} while (n); for (p in in_) if (p in pp) print p}'
}
cpu_ticks() {  # utime+stime of a process tree, in clock ticks
    for p in $(tree "$1"); do cat "/proc/$p/stat" 2>/dev/null; done | sed 's/.*) //' | awk '{s += $12 + $13} END {print s+0}'
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
declare -A PORT PID
start() {
    local n=$1 p; p=$(free_port); PORT[$n]=$p
    case $n in
        echod) "${SPIN[@]}" "$ROOT/target/release/echod" --config "$ROOT/config/echod.toml" --listen "127.0.0.1:$p" \
                   2>"$OUT/echod.log" & PID[$n]=$! ;;
        tokio-echo|thread-echo|mio-echo) "${SPIN[@]}" "$LAB/peers/target/release/$n" "127.0.0.1:$p" 2>"$OUT/$n.log" & PID[$n]=$! ;;
        apache-*) "${SPIN[@]}" "$LAB/apache-echo.sh" "$p" "${n#apache-}" start >"$OUT/$n.log" 2>&1 \
                      && PID[$n]=$(cat "/tmp/lab-apache-$p/apache.pid") ;;
        *) echo "unknown server $n" >&2; return 1 ;;
    esac
    for _ in $(seq 100); do ss -Hltn "sport = :$p" | grep -q . && return 0; sleep 0.1; done
    echo "$n did not listen on $p" >&2; return 1
}
stop_all() {
    for n in "${!PID[@]}"; do
        case $n in apache-*) "$LAB/apache-echo.sh" "${PORT[$n]}" "${n#apache-}" stop >/dev/null 2>&1 ;;
                   *) kill "${PID[$n]}" 2>/dev/null; wait "${PID[$n]}" 2>/dev/null ;; esac
    done
}
trap stop_all EXIT; trap 'exit 130' INT TERM

for s in $SERVERS; do start "$s" || exit 1; done
run() {  # run SERVER CONNS SIZE [--churn] -> appends a TSV row
    local s=$1 c=$2 l=$3; shift 3
    local t0; t0=$(cpu_ticks "${PID[$s]}")
    "${CPIN[@]}" "$LOAD" --addr "127.0.0.1:${PORT[$s]}" -c "$c" -s "$l" -d "$DUR" --warmup 0.5 -t 1 --lines --json "$@" \
        >"$OUT/last.json" 2>/dev/null
    local ticks=$(( $(cpu_ticks "${PID[$s]}") - t0 ))
    python3 - "$OUT/last.json" "$s" "$c" "$l" "${1:-}" "$ticks" "$(getconf CLK_TCK)" >>"$OUT/raw.tsv" <<'PY'
import json, sys
f, s, c, l, mode, ticks, hz = sys.argv[1:]
try: j = json.load(open(f))
except Exception: j = {"rps": 0, "errors": -1, "mismatches": -1, "latency_us": {"p99": 0}, "responses": 0}
# CPU per response over the whole run (warm-up included on both sides of the ratio).
n = j.get("responses", 0) * (1 + 0.5 / max(j.get("duration_s", 1), 1e-9))
us = int(ticks) / int(hz) * 1e6 / n if n else 0
print("\t".join(map(str, [s, c, l, mode or "closed", round(j["rps"]), j["errors"], j["mismatches"], j["latency_us"]["p99"], round(us, 2)])))
PY
}
for s in $SERVERS; do run "$s" "${CONNS##* }" 64 >/dev/null; done  # warm-up (Apache spawns children)
: >"$OUT/raw.tsv"
order=($SERVERS)
for ((r = 1; r <= REPS; r++)); do
    for c in $CONNS; do for l in $SIZES; do for s in "${order[@]}"; do run "$s" "$c" "$l"; done; done; done
    for s in "${order[@]}"; do run "$s" "$CHURN" 64 --churn; done
    order=($(printf '%s\n' "${order[@]}" | tac))
done
stop_all; trap - EXIT

python3 - "$OUT/raw.tsv" "$SERVERS" <<'PY'
import sys, statistics as st, collections
rows = [l.split("\t") for l in open(sys.argv[1]).read().splitlines()]
servers = sys.argv[2].split()
cells = collections.defaultdict(list); bad = set()
for s, c, l, mode, rps, err, mism, p99, cpu in rows:
    key = (mode.lstrip("-"), int(c), int(l)); cells[key, s].append((int(rps), float(cpu)))
    if int(err) != 0 or int(mism) != 0: bad.add((key, s))
base = "tokio-echo" if "tokio-echo" in servers else servers[0]
print("| mode | conns | size | " + " | ".join(servers) + " |")
print("|---|---:|---:|" + "---:|" * len(servers))
for key in sorted({k for k, _ in cells}, key=lambda k: (k[0] != "closed", k[1], k[2])):
    ref = st.mean(r for r, _ in cells[key, base]) or 1
    out = []
    for s in servers:
        v = [r for r, _ in cells[key, s]]; m = st.mean(v)
        out.append(f"{m:,.0f} ({m / ref:.2f}x) ±{(max(v) - min(v)) / 2 / (m or 1) * 100:.0f}%" + (" !" if (key, s) in bad else ""))
    print(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(out) + " |")
print()
print("server CPU µs per response (lower is better; ratio to mio-echo, the one-thread epoll floor, if present):")
floor = "mio-echo" if "mio-echo" in servers else base
print("| mode | conns | size | " + " | ".join(servers) + " |")
print("|---|---:|---:|" + "---:|" * len(servers))
for key in sorted({k for k, _ in cells}, key=lambda k: (k[0] != "closed", k[1], k[2])):
    ref = st.mean(c for _, c in cells[key, floor]) or 1
    out = [f"{st.mean(c for _, c in cells[key, s]):.1f} ({st.mean(c for _, c in cells[key, s]) / ref:.2f}x)" for s in servers]
    print(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(out) + " |")
PY
echo "raw results: $OUT/raw.tsv (server conns size mode rps errors mismatches p99_us cpu_us_per_response)" >&2
