#!/usr/bin/env bash
# Runs echod's test suite: first sets this machine up for it (the Debian or
# Ubuntu packages the tests run), then `cargo test --release`, with any
# arguments given passed on (`./test.sh --test core`). `./test.sh --setup`
# only sets the machine up.
#
# As root it installs what is missing with apt-get; as anyone else it prints
# the one `sudo apt-get install ...` line to run and stops. Tests that need
# what this machine cannot give (root for the privilege drop, an IPv6
# loopback) are skipped, and listed in one line at the end; with
# ECHOD_TEST_NO_SKIP=1 (as CI runs it) they fail instead.
set -euo pipefail
cd "$(dirname "$0")"

# What the tests run, by the package that brings it. haproxy lives in
# /usr/sbin, outside a non-root user's PATH.
need=()
has() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
has cc || need+=(gcc libc6-dev)                    # the linker rustc calls
has git || need+=(git)                             # build.rs: the commit in --version
has systemd-analyze || need+=(systemd)             # unit checks
has systemd-socket-activate || need+=(systemd)     # socket activation tests
has promtool || need+=(prometheus)                 # the exposition format check
has ss || need+=(iproute2)                         # who listens where
has ps || need+=(procps)
has python3 || need+=(python3)                     # a slow reader in the upgrade tests
has setpriv || need+=(util-linux)                  # capability tests (setpriv, prlimit)
has prlimit || need+=(util-linux)
has haproxy || need+=(haproxy)                     # tests/haproxy.rs
if [ ${#need[@]} -gt 0 ]; then
    mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
    if [ "$(id -u)" != 0 ]; then
        echo "the tests need packages this machine lacks; install them, then run ./test.sh again:" >&2
        echo "  sudo apt-get install -y --no-install-recommends ${need[*]}" >&2
        exit 1
    fi
    echo "installing the packages the tests need: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
[ "${1:-}" = --setup ] && exit 0
# Right after rustup, before a new login shell has put it on the PATH.
command -v cargo >/dev/null 2>&1 || [ ! -x "$HOME/.cargo/bin/cargo" ] || PATH="$HOME/.cargo/bin:$PATH"
if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install Rust first (https://rustup.rs), then run ./test.sh again" >&2
    exit 1
fi

# Each skipped test leaves a line here (tests/common/mod.rs, skip_or_fail).
skipped="${CARGO_TARGET_DIR:-target}/tmp/skipped"
rm -rf "$skipped"
# echod's tests drive echo-load, another package of the workspace: built
# first, so that `./test.sh --test load` does not run a stale one.
cargo build --release -p echo-load --bin echo-load
status=0
cargo test --release --no-fail-fast "$@" || status=$?
if [ -d "$skipped" ] && [ -n "$(ls -A "$skipped")" ]; then
    reasons=$(cat "$skipped"/* | cut -d' ' -f2- | sort | uniq -c | sed 's/^ *//' | paste -sd ';' | sed 's/;/; /g')
    echo "skipped $(ls "$skipped" | wc -l) test(s) this machine cannot run, by what they need: $reasons (list: ls $skipped)"
fi
exit "$status"
