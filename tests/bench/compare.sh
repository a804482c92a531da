#!/usr/bin/env bash
# tests/bench/compare.sh [SECONDS]: echod (both handler modes) against peer echo servers,
# side by side on 127.0.0.1, driven by two load clients. Not a test: a benchmark to run by hand.
#
#   bash tests/bench/compare.sh 3            # the README's performance table (about 15 min)
#   CONNS="50" LENS="64" REPS=2 CLIENTS=echo-load bash tests/bench/compare.sh 2   # a quick look
#
# Servers (SERVERS=...): echod-thread, echod-event (this repository's release build on the
#   bundled config with handler = thread / event), tokio-echo (tokio, one task per connection),
#   thread-echo (std, one OS thread per connection), mio-echo (one thread, one epoll loop: the
#   efficiency floor), all three in tests/bench/peers/; apache-worker, apache-event,
#   apache-prefork (Apache httpd with mod_echo, apache-echo.sh; apt installs apache2-bin).
# A/B variants: EXTRA="name=command;name2=command2" adds servers started by a command of your own,
#   where the word PORT is replaced by a free port (the command must stay in the foreground),
#   e.g. EXTRA="buf4k=target/release/echod --config /tmp/buf4k.toml --listen 127.0.0.1:PORT".
# Clients (CLIENTS=...): echo-load (this repository's harness, one thread, every byte verified,
#   '\n'-terminated payloads so mod_echo works; also measures connection churn) and teb
#   (tcp-echo-benchmark from crates.io, installed under tests/bench/peers/target/tools on
#   first use). Both run with -c CONNS -l/-s LEN for SECONDS.
# Matrix: CONNS="1 50 500" x LENS="64 4096" x clients, REPS=3 rounds, plus echo-load churn at
#   CHURN=50 connections. Each cell runs the servers back to back and the order flips every
#   round, so drift hits all alike. Every server first passes echo_check.py.
# Pinning: PIN=1 (default) runs servers on CPU 1 and clients on CPU 0 (taskset).
# Reported: responses/s (mean over rounds, ratio to tokio-echo, ± half the min-max range;
#   "!" where the client saw errors or mismatches), server CPU µs per response (the process
#   tree's utime+stime over the run, ratio to mio-echo), peak RSS, PSS sampled mid-run at the
#   top connection count, and how many connections waited unaccepted in the backlog.
# Raw rows: $OUT/raw.tsv. Every process started is stopped by PID on exit.
set -uo pipefail
DUR=${1:-3}
CONNS=${CONNS:-"1 50 500"}; LENS=${LENS:-"64 4096"}; REPS=${REPS:-3}; CHURN=${CHURN:-50}
SERVERS=${SERVERS:-"echod-thread echod-event tokio-echo thread-echo mio-echo apache-worker"}
CLIENTS=${CLIENTS:-"echo-load teb"}
declare -A EXTRA_CMD
IFS=';' read -ra extras <<<"${EXTRA:-}"
for e in "${extras[@]}"; do [[ -n $e ]] && EXTRA_CMD[${e%%=*}]=${e#*=} && SERVERS+=" ${e%%=*}"; done
BENCH=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$BENCH/../.." && pwd)
OUT=${OUT:-$(mktemp -d /tmp/echod-compare.XXXX)}
MAXC=$(tr ' ' '\n' <<<"$CONNS" | sort -n | tail -1)
SPIN=(); CPIN=(); [[ ${PIN:-1} == 1 ]] && SPIN=(taskset -c 1) CPIN=(taskset -c 0)
ulimit -n "$(ulimit -Hn)"
T0=$SECONDS QLEN=0 HZ=$(getconf CLK_TCK)

cargo build -q --release --manifest-path "$ROOT/Cargo.toml" --bin echod --bin echo-load || exit 1
cargo build -q --release --manifest-path "$BENCH/peers/Cargo.toml" || exit 1
LOAD=$ROOT/target/release/echo-load
TEB=${TEB:-$BENCH/peers/target/tools/bin/tcp-echo-benchmark}
if [[ " $CLIENTS " == *" teb "* && ! -x $TEB ]]; then
    cargo install -q --locked --root "$BENCH/peers/target/tools" tcp-echo-benchmark || exit 1
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
tree() {  # PID and all its descendants
    ps -e -o pid=,ppid= | awk -v r="$1" '{pp[$1]=$2} END {in_[r]=1; do {n=0; for (p in pp)
        if (!(p in in_) && (pp[p] in in_)) {in_[p]=1; n++}} while (n); for (p in in_) if (p in pp) print p}'
}
sum_kb() {  # sum_kb FILE FIELD ROOTPID: sum "FIELD: N kB" of /proc/*/FILE over the tree
    for p in $(tree "$3"); do cat "/proc/$p/$1" 2>/dev/null; done | awk -v f="$2:" '$1==f {s+=$2} END {print s+0}'
}
cpu_ticks() {  # utime+stime of a process tree, in clock ticks
    for p in $(tree "$1"); do cat "/proc/$p/stat" 2>/dev/null; done | sed 's/.*) //' | awk '{s += $12 + $13} END {print s+0}'
}

declare -A PORT ROOTPID PSS QMAX
start() {  # start NAME: launch on a free port, set PORT[NAME] and ROOTPID[NAME]
    local n=$1 p; p=$(free_port); PORT[$n]=$p
    case $n in
        echod-thread|echod-event)
            sed "s/^handler = .*/handler = \"${n#echod-}\"/" "$ROOT/config/echod.toml" >"$OUT/$n.toml"
            "${SPIN[@]}" "$ROOT/target/release/echod" --config "$OUT/$n.toml" --listen "127.0.0.1:$p" \
                2>>"$OUT/$n.log" & ROOTPID[$n]=$! ;;
        tokio-echo|thread-echo|mio-echo)
            "${SPIN[@]}" "$BENCH/peers/target/release/$n" "127.0.0.1:$p" 2>>"$OUT/$n.log" & ROOTPID[$n]=$! ;;
        apache-*) "${SPIN[@]}" "$BENCH/apache-echo.sh" "$p" "${n#apache-}" start >>"$OUT/$n.log" 2>&1 \
                      && ROOTPID[$n]=$(cat "/tmp/lab-apache-$p/apache.pid") ;;
        *) [[ -n ${EXTRA_CMD[$n]:-} ]] || { echo "unknown server $n" >&2; return 1; }
           (cd "$ROOT" && exec "${SPIN[@]}" bash -c "exec ${EXTRA_CMD[$n]//PORT/$p}") >>"$OUT/$n.log" 2>&1 & ROOTPID[$n]=$! ;;
    esac
    for _ in $(seq 100); do ss -Hltn "sport = :$p" | grep -q . && break; sleep 0.1; done
    ss -Hltn "sport = :$p" | grep -q . || { echo "$n did not listen on $p (see $OUT/$n.log)" >&2; return 1; }
    python3 "$BENCH/echo_check.py" "$p" >/dev/null || { echo "$n on $p failed echo_check.py" >&2; return 1; }
}
stop() {  # stop NAME: SIGTERM the root pid, then SIGKILL any of its tree still alive after 5 s
    local n=$1 r=${ROOTPID[$1]:-} pids; [[ -n $r ]] || return 0
    pids=$(tree "$r")
    case $n in apache-*) "$BENCH/apache-echo.sh" "${PORT[$n]}" "${n#apache-}" stop ;; *) kill "$r" ;; esac 2>/dev/null
    for _ in $(seq 50); do
        wait "$r" 2>/dev/null
        ps -o stat= -p "${pids//$'\n'/,}" 2>/dev/null | grep -qv Z || break; sleep 0.1
    done
    for p in $pids; do kill -0 "$p" 2>/dev/null && kill -9 "$p"; done
    unset "ROOTPID[$n]"
}
cleanup() { for n in "${!ROOTPID[@]}"; do stop "$n"; done; }
trap cleanup EXIT; trap 'exit 130' INT TERM

# bench CLIENT SERVER CONNS LEN [churn]: sets RPS, FLAG (ok or what went wrong) and CPU
# (server µs per response).
bench() {
    local cl=$1 s=$2 c=$3 l=$4 churn=${5:-} f=$OUT/last.out rc t0 secs=$DUR
    kill -0 "${ROOTPID[$s]}" 2>/dev/null || { RPS=0 FLAG="server not running" CPU=0; return; }
    t0=$(cpu_ticks "${ROOTPID[$s]}")
    if [[ $cl == teb ]]; then
        timeout $((DUR + 20)) "${CPIN[@]}" "$TEB" -a "127.0.0.1:${PORT[$s]}" -c "$c" -l "$l" -t "$DUR" >"$f" 2>&1 &
    else
        secs=$(awk "BEGIN {print $DUR + 0.5}")
        timeout $((DUR + 20)) "${CPIN[@]}" "$LOAD" --addr "127.0.0.1:${PORT[$s]}" -c "$c" -s "$l" -d "$DUR" \
            --warmup 0.5 -t 1 --lines --json ${churn:+--churn} >"$f" 2>"$OUT/last.err" &
    fi
    local cp=$!
    if ((c == MAXC)) && [[ -z $churn ]]; then  # mid-run: server PSS, connections still in its accept queue
        sleep "$(awk "BEGIN {print $secs / 2}")"
        local k; k=$(sum_kb smaps_rollup Pss "${ROOTPID[$s]}"); ((k > ${PSS[$s]:-0})) && PSS[$s]=$k
        QLEN=$(ss -Hltn "sport = :${PORT[$s]}" | awk '{print $2}'); ((QLEN > ${QMAX[$s]:-0})) && QMAX[$s]=$QLEN
    fi
    wait "$cp"; rc=$?
    local ticks=$(( $(cpu_ticks "${ROOTPID[$s]}") - t0 ))
    FLAG=ok
    if [[ $cl == teb ]]; then
        RPS=$(grep -o '[0-9]* response/sec' "$f" | cut -d' ' -f1)
        if ((rc)) || [[ -z $RPS ]] || grep -qiE 'error|panick' "$f"; then
            FLAG="rc=$rc:$(grep -iE 'error|panick' "$f" | sort | uniq -c | head -2 | tr -s ' \n' ' ')"
        fi
    else
        read -r RPS bad < <(python3 -c 'import json,sys
try: j = json.load(open(sys.argv[1])); print(round(j["rps"]), j["errors"] + j["mismatches"])
except Exception: print(0, -1)' "$f")
        ((rc == 0 && bad == 0)) || FLAG="rc=$rc errors+mismatches=$bad"
    fi
    RPS=${RPS:-0}
    CPU=$(awk -v t="$ticks" -v hz="$HZ" -v r="$RPS" -v d="$secs" 'BEGIN {n = r * d; printf "%.2f", n ? t / hz * 1e6 / n : 0}')
}

for s in $SERVERS; do start "$s" || exit 1; done
echo "servers: $(for s in $SERVERS; do printf '%s=127.0.0.1:%s ' "$s" "${PORT[$s]}"; done)" >&2
first=${CLIENTS%% *}
for s in $SERVERS; do  # warm-up until the server accepts all MAXC connections (Apache spawns slowly)
    for _ in $(seq 8); do bench "$first" "$s" "$MAXC" 64; ((QLEN == 0)) && break; done
done; QMAX=() PSS=()
printf 'round\tclient\tconns\tlen\tserver\trps\tcpu_us\tflag\n' >"$OUT/raw.tsv"
row() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" | tee -a "$OUT/raw.tsv" >&2; }
order=($SERVERS)
for ((r = 1; r <= REPS; r++)); do
    for c in $CONNS; do for l in $LENS; do for cl in $CLIENTS; do for s in "${order[@]}"; do
        bench "$cl" "$s" "$c" "$l"; row "$r" "$cl" "$c" "$l" "$s" "$RPS" "$CPU" "$FLAG"
    done; done; done; done
    if [[ " $CLIENTS " == *" echo-load "* ]]; then
        for s in "${order[@]}"; do bench echo-load "$s" "$CHURN" 64 churn; row "$r" echo-load-churn "$CHURN" 64 "$s" "$RPS" "$CPU" "$FLAG"; done
    fi
    order=($(printf '%s\n' "${order[@]}" | tac))
done
for s in $SERVERS; do printf 'mem\t%s\t%s\t%s\t%s\n' "$s" "$(sum_kb status VmHWM "${ROOTPID[$s]}")" "${PSS[$s]:-0}" "${QMAX[$s]:-0}"; done >"$OUT/mem.tsv"
cleanup

python3 - "$OUT" "$SERVERS" "$MAXC" <<'EOF'
import sys, collections, statistics as st
out, servers, maxc = sys.argv[1], sys.argv[2].split(), sys.argv[3]
runs, cpu, flags = collections.defaultdict(list), collections.defaultdict(list), collections.defaultdict(list)
for line in open(f"{out}/raw.tsv").read().splitlines()[1:]:
    r, cl, c, l, s, rps, us, flag = line.split("\t")
    runs[cl, int(c), int(l), s].append(int(rps)); cpu[cl, int(c), int(l), s].append(float(us))
    if flag != "ok": flags[cl, int(c), int(l), s].append(f"round {r}: {flag}")
def table(title, data, base, fmt):
    base = base if base in servers else servers[0]
    title = title.replace("BASE", base)
    print(f"\n{title}\n")
    print("| client | conns | len | " + " | ".join(servers) + " |")
    print("|---|---:|---:|" + "---:|" * len(servers))
    for cl, c, l in sorted({k[:3] for k in data}, key=lambda k: (k[0], k[1], k[2])):
        ref = st.mean(data[cl, c, l, base])
        cells = [fmt(data[cl, c, l, s], ref) + (" !" if (cl, c, l, s) in flags else "") for s in servers]
        print(f"| {cl} | {c} | {l} | " + " | ".join(cells) + " |")
def rate(v, ref):
    m = st.mean(v)
    return f"{m:,.0f} ({m / (ref or 1):.2f}x) ±{(max(v) - min(v)) / 2 / (m or 1) * 100:.0f}%"
def micro(v, ref):
    m = st.mean(v)
    return f"{m:.1f} ({m / (ref or 1):.2f}x)"
table("responses/s (ratio to BASE; higher is better):", runs, "tokio-echo", rate)
table("server CPU µs per response (ratio to BASE, lower is better; mio-echo is the one-thread epoll floor):", cpu, "mio-echo", micro)
mem = {s: list(map(int, m)) for _, s, *m in (x.split("\t") for x in open(f"{out}/mem.tsv"))}
print("\n| memory | " + " | ".join(servers) + " |")
print("|---|" + "---:|" * len(servers))
print(f"| peak RSS MiB (ΣVmHWM) | " + " | ".join(f"{mem[s][0] / 1024:.1f}" for s in servers) + " |")
print(f"| PSS MiB @{maxc} conns | " + " | ".join(f"{mem[s][1] / 1024:.1f}" for s in servers) + " |")
print(f"| max unaccepted @{maxc} | " + " | ".join(str(mem[s][2]) for s in servers) + " |")
for k, v in sorted(flags.items()): print(f"\n! {' '.join(map(str, k))}: {'; '.join(v)}", end="")
print()
EOF
echo "total runtime: $((SECONDS - T0)) s; raw results in $OUT" >&2
