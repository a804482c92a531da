#!/usr/bin/env bash
# tests/bench/fleet.sh [SECONDS]: two echod behind HAProxy (deploy/haproxy, PROXY v2,
# /healthz checks) against the same two echod loaded directly. Not a test: a benchmark to
# run by hand (about 2 min with the defaults); needs haproxy (apt-get install haproxy).
#
#   bash tests/bench/fleet.sh 5
#   CONNS="50" REPS=2 bash tests/bench/fleet.sh 3      # a quick look
#
# Both echod run deploy/haproxy/echod-backend.toml with two listeners each: the PROXY one
# HAProxy sends to, and a plain one for the direct runs, so every path hits the same
# processes. Three paths: direct (echo-load --addr A --addr B on the plain listeners;
# connections alternate over the two), direct with a PROXY v2 header (the same on the PROXY
# listeners, echo-load --proxy v2: what parsing the header costs echod) and through HAProxy
# (echo-load --addr FRONTEND). Matrix: CONNS="50 500" x LEN=64 B, plus
# connection churn (--churn) at CHURN=50; REPS rounds, paths alternating in each. Everything
# shares the machine's CPUs (no pinning: HAProxy is the extra hop being measured).
# Reported: responses/s (mean over rounds, ± half the min-max range), each path's ratio to
# direct, p50 and p99 latency of the last round, and errors (must be 0). Every process started is
# stopped by PID on exit.
set -uo pipefail
DUR=${1:-5}
CONNS=${CONNS:-"50 500"}; LEN=${LEN:-64}; REPS=${REPS:-3}; CHURN=${CHURN:-50}
BENCH=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$BENCH/../.." && pwd)
OUT=${OUT:-$(mktemp -d /tmp/echod-fleet.XXXX)}
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
[[ -x $HAPROXY ]] || { echo "haproxy not found: apt-get install haproxy" >&2; exit 1; }
ulimit -n "$(ulimit -Hn)"

cargo build -q --release --manifest-path "$ROOT/Cargo.toml" --bin echod --bin echo-load || exit 1
ECHOD=$ROOT/target/release/echod
LOAD=$ROOT/target/release/echo-load

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done; }
trap cleanup EXIT INT TERM

P=$(free_port); Q=$(free_port); M=$(free_port); F=$(free_port)
for i in 2 3; do
    sed -e "s|\"0.0.0.0:7007\"|\"127.0.0.$i:$P\", \"127.0.0.$i:$Q\"|" \
        -e "s|\"0.0.0.0:9107\"|\"127.0.0.$i:$M\"|" \
        -e "s|^proxy_protocol = true|proxy_protocol = [\"127.0.0.$i:$P\"]|" \
        -e 's|\["10.0.0.5", "10.0.0.6"\]|["127.0.0.1"]|' \
        -e 's|^max_connections_per_ip = 100|max_connections_per_ip = 0|' \
        -e 's|^shutdown_delay = 5|shutdown_delay = 0|' \
        "$ROOT/deploy/haproxy/echod-backend.toml" > "$OUT/echod$i.toml"
    printf 'workers = 1\nlog_level = "warn"\n' >> "$OUT/echod$i.toml"
    "$ECHOD" --config "$OUT/echod$i.toml" 2>"$OUT/echod$i.log" &
    PIDS+=($!)
done
sed -e "s|bind :7   # ADDR frontend|bind 127.0.0.1:$F|" \
    -e "s|10.0.0.11:7007|127.0.0.2:$P|" -e "s|10.0.0.12:7007|127.0.0.3:$P|" \
    -e "s|check port 9107|check port $M|" -e "s|/run/haproxy/echod.sock|$OUT/haproxy.sock|" \
    -e "s|log stdout format raw local0 info|log stdout format raw local0 warning|" \
    "$ROOT/deploy/haproxy/haproxy.cfg" > "$OUT/haproxy.cfg"
"$HAPROXY" -db -f "$OUT/haproxy.cfg" >"$OUT/haproxy.log" 2>&1 &
PIDS+=($!)

# Both servers UP in HAProxy's eyes (its stats socket), else give up.
python3 - "$OUT/haproxy.sock" <<'EOF' || { echo "backends never came UP; see $OUT" >&2; exit 1; }
import socket, sys, time
deadline = time.time() + 15
while time.time() < deadline:
    try:
        s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b"show stat\n")
        text = b"".join(iter(lambda: s.recv(65536), b"")).decode()
        rows = [l.split(",") for l in text.splitlines()[1:] if l.startswith("echod,echod")]
        if len(rows) == 2 and all(r[17].startswith("UP") for r in rows):
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.2)
sys.exit(1)
EOF

# run LABEL ARGS...: one echo-load run; appends "label rps p50 p99 errors" to raw.tsv.
run() {
    local label=$1; shift
    "$LOAD" --json -d "$DUR" -s "$LEN" "$@" > "$OUT/last.json" 2>/dev/null
    python3 - "$label" "$OUT/last.json" >> "$OUT/raw.tsv" <<'EOF'
import json, sys
r = json.load(open(sys.argv[2]))
print(sys.argv[1], r["rps"], r["latency_us"]["p50"], r["latency_us"]["p99"], r["errors"] + r["mismatches"], sep="\t")
EOF
}
direct=(--addr "127.0.0.2:$Q" --addr "127.0.0.3:$Q")
proxied=(--addr "127.0.0.2:$P" --addr "127.0.0.3:$P" --proxy v2)
through=(--addr "127.0.0.1:$F")
# paths LOAD-ARGS...: each path once, in an order that flips every round.
paths() {
    local order=(direct proxied haproxy); (( rep % 2 )) || order=(haproxy proxied direct)
    for p in "${order[@]}"; do
        case $p in
            direct) run "direct-$case" "${direct[@]}" "$@" ;;
            proxied) run "proxied-$case" "${proxied[@]}" "$@" ;;
            haproxy) run "haproxy-$case" "${through[@]}" "$@" ;;
        esac
    done
}
: > "$OUT/raw.tsv"
for rep in $(seq "$REPS"); do
    for c in $CONNS; do case=$c; paths -c "$c"; done
    case=churn; paths -c "$CHURN" --churn
    echo "round $rep of $REPS done" >&2
done

python3 - "$OUT/raw.tsv" "$LEN" "$DUR" "$REPS" <<'EOF'
import collections, sys
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    label, rps, p50, p99, errors = line.split("\t")
    rows[label].append((float(rps), int(p50), int(p99), int(errors)))
def fig(label):
    v = rows[label]; rps = [r[0] for r in v]
    mean = sum(rps) / len(rps); half = (max(rps) - min(rps)) / 2
    return mean, half, v[-1][1], v[-1][2], sum(r[3] for r in v)
print(f"\nTwo echod (event, 1 worker each): direct, direct with a PROXY v2 header, through HAProxy; "
      f"{sys.argv[2]} B messages, {sys.argv[3]} s x {sys.argv[4]} rounds\n")
print("| load | direct resp/s | + PROXY v2 header | through HAProxy | p50 / p99 µs: direct, + header, HAProxy | errors |")
print("|---|---:|---:|---:|---|---:|")
for case in dict.fromkeys(l.split("-", 1)[1] for l in rows):
    d, p, h = fig(f"direct-{case}"), fig(f"proxied-{case}"), fig(f"haproxy-{case}")
    name = f"{case} connections" if case != "churn" else "churn (connect, 1 echo, close)"
    print(f"| {name} | {d[0]:,.0f} ± {d[1]:,.0f} | {p[0]:,.0f} ± {p[1]:,.0f} ({p[0]/d[0]:.2f}x) | "
          f"{h[0]:,.0f} ± {h[1]:,.0f} ({h[0]/d[0]:.2f}x) | {d[2]} / {d[3]}, {p[2]} / {p[3]}, {h[2]} / {h[3]} | "
          f"{d[4] + p[4] + h[4]} |")
EOF
echo "raw rows: $OUT/raw.tsv"
