#!/usr/bin/env bash
# tests/bench/idle.sh [CONNECTIONS] [MODE]: how much memory echod needs to hold many idle
# connections. Not a test: a measurement to run by hand (as root for more than ~19,000).
#
#   bash tests/bench/idle.sh 10000 event     # PSS of the whole tree at 10,000 idle connections
#   bash tests/bench/idle.sh 50000 event     # 50,000 (raises RLIMIT_NOFILE; needs root)
#   bash tests/bench/idle.sh 5000 thread
#
# Starts echod (release build, bundled config with handler = MODE, idle_timeout = 0) with
# WORKERS workers (default: one per 18,000 connections, at least 2) listening on PORTS ports
# (default: one per 20,000 connections, since one client address has about 28,000 ephemeral
# ports per destination). Python client processes (one per 18,000 connections) open
# CONNECTIONS connections spread over the ports and echo 8 bytes on every one (so each is known
# to be served, not waiting in a backlog); then the Pss of echod's process tree (master +
# workers, /proc/PID/smaps_rollup) is sampled while all are held. Everything is closed and
# echod stopped by PID.
#
# Beyond one process's RLIMIT_NOFILE (20,000 on this project's machines, and not raisable
# without CAP_SYS_RESOURCE), it is the prefork model that holds the load: each worker process
# has its own fd table and holds only its share.
set -euo pipefail
N=${1:-10000}; MODE=${2:-event}
PER=18000; CLIENTS=$(( (N + PER - 1) / PER )); WORKERS=${WORKERS:-$(( CLIENTS > 2 ? CLIENTS : 2 ))}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PORTS=${PORTS:-$(( (N + 19999) / 20000 ))}
OUT=$(mktemp -d /tmp/echod-idle.XXXX)
need=$(( (N + CLIENTS - 1) / CLIENTS + 100 ))
if (( $(ulimit -Hn) < need )); then ulimit -Hn "$need" 2>/dev/null || { echo "need RLIMIT_NOFILE >= $need" >&2; exit 1; }; fi
ulimit -Sn "$(ulimit -Hn)"

cargo build -q --release --manifest-path "$ROOT/Cargo.toml" --bin echod
# Listen ports below the ephemeral range: tens of thousands of client connections take
# ephemeral source ports, and a listen port among them could be taken first (bind: Address
# already in use). Each is checked free by binding it.
ports=$(python3 - "$PORTS" <<'PY'
import socket, sys
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
want, found = int(sys.argv[1]), []
for port in range(max(1024, low - 5000), low):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port)); found.append(port)
    except OSError:
        pass
    finally:
        s.close()
    if len(found) == want:
        break
print(" ".join(map(str, found)))
PY
)
listen=(); addrs=()
for port in $ports; do listen+=(--listen "127.0.0.1:$port"); addrs+=("127.0.0.1:$port"); done
(( ${#addrs[@]} == PORTS )) || { echo "found only ${#addrs[@]} of $PORTS free ports below the ephemeral range" >&2; exit 1; }
sed -e "s/^handler = .*/handler = \"$MODE\"/" -e "s/^workers = .*/workers = $WORKERS/" -e "s/^idle_timeout = .*/idle_timeout = 0/" \
    -e "s/^threads_per_worker = .*/threads_per_worker = $(( N / WORKERS + 100 ))/" \
    -e "s/^worker_connections = .*/worker_connections = $(( N / WORKERS + 100 ))/" \
    -e "s/^backlog = .*/backlog = 4096/" "$ROOT/config/echod.toml" >"$OUT/echod.toml"
"$ROOT/target/release/echod" --config "$OUT/echod.toml" "${listen[@]}" 2>"$OUT/echod.log" &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null' EXIT
for _ in $(seq 100); do grep -q "ready:" "$OUT/echod.log" && break; sleep 0.1; done
grep -q "ready:" "$OUT/echod.log" || { echo "echod did not become ready:" >&2; cat "$OUT/echod.log" >&2; exit 1; }

pss() {  # Pss of PID and its children, kB
    for p in $1 $(ps -o pid= --ppid "$1"); do cat "/proc/$p/smaps_rollup" 2>/dev/null; done | awk '$1=="Pss:" {s+=$2} END {print s+0}'
}
before=$(pss $PID)
cat >"$OUT/client.py" <<'EOF'
import socket, sys, time, os
n, flag, addrs = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
socks, t0 = [], time.time()
for i in range(n):
    host, port = addrs[i % len(addrs)].rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=30)
    socks.append(s)
for i, s in enumerate(socks):          # every connection is served: 8 bytes echoed back
    s.sendall(i.to_bytes(8, "big"))
for i, s in enumerate(socks):
    got = b""
    while len(got) < 8:
        chunk = s.recv(8 - len(got))
        if not chunk: sys.exit(f"connection {i} closed")
        got += chunk
    if got != i.to_bytes(8, "big"): sys.exit(f"connection {i}: wrong echo")
print(f"{n} connections opened and echoed in {time.time() - t0:.1f} s", flush=True)
open(flag, "w").close()
release = os.path.join(os.path.dirname(flag), "release")
deadline = time.time() + 120
while not os.path.exists(release) and time.time() < deadline:
    time.sleep(0.1)
for s in socks: s.close()
EOF
pids=()
for ((c = 0; c < CLIENTS; c++)); do
    share=$(( N / CLIENTS + (c < N % CLIENTS ? 1 : 0) ))
    python3 "$OUT/client.py" "$share" "$OUT/held.$c" "${addrs[@]}" & pids+=($!)
done
for _ in $(seq 1200); do
    (( $(ls "$OUT"/held.* 2>/dev/null | wc -l) == CLIENTS )) && break
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || break 2; done
    sleep 0.1
done
(( $(ls "$OUT"/held.* 2>/dev/null | wc -l) == CLIENTS )) || { echo "a client failed" >&2; wait; exit 1; }
sleep 2; held=$(pss $PID)
active=$(kill -USR1 $PID; sleep 0.5; grep 'stats: ' "$OUT/echod.log" | tail -1 | grep -o 'active=[0-9]*')
touch "$OUT/release"; wait "${pids[@]}"
echo "mode=$MODE workers=$WORKERS connections=$N ports=$PORTS: echod tree PSS $((before / 1024)) MiB idle -> $((held / 1024)) MiB holding ($active)"
