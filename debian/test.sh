#!/usr/bin/env bash
# debian/test.sh: builds the Debian package, inspects it, installs it on this machine with dpkg,
# checks what got installed, and removes it again. Run by .ci/run; needs root (or sudo), dpkg-dev,
# lintian and systemd (for systemd-analyze).
#
# Checks: every expected path is in the package; lintian reports no error; after `dpkg -i`
# the installed units pass `systemd-analyze verify`, the installed config passes
# `echod --check-config` (also without --config: it is the file found) and listens on port 7 on all addresses, `echod --version` names this
# checkout's commit, the man pages render, the completions are in place, and nothing was
# enabled or started. Then `dpkg --purge` leaves no file behind.
set -euo pipefail
cd "$(dirname "$0")/.."
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
fail() { echo "debian/test.sh: $*" >&2; exit 1; }

deb=$(bash debian/build.sh | tail -1)
echo "== package: $deb"
dpkg-deb --info "$deb" | sed -n '/Package:/,/Description:/p'
contents=$(dpkg-deb --contents "$deb" | awk '{print $6}' | sed 's|^\./|/|')
for path in /usr/bin/echod /usr/bin/echo-load /etc/echod/echod.toml \
    /usr/lib/systemd/system/echod.service /usr/lib/systemd/system/echod.socket \
    /usr/share/man/man8/echod.8.gz /usr/share/man/man1/echo-load.1.gz /usr/share/man/man5/echod.toml.5.gz \
    /usr/share/bash-completion/completions/echod /usr/share/bash-completion/completions/echo-load \
    /usr/share/zsh/vendor-completions/_echod /usr/share/zsh/vendor-completions/_echo-load \
    /usr/share/fish/vendor_completions.d/echod.fish /usr/share/fish/vendor_completions.d/echo-load.fish \
    /usr/share/doc/echod/copyright /usr/share/doc/echod/changelog.Debian.gz /usr/share/doc/echod/README.md \
    /usr/share/doc/echod/docs/DESIGN.md /usr/share/doc/echod/docs/OPERATIONS.md /usr/share/doc/echod/docs/TESTING.md \
    /usr/share/doc/echod/docs/PERFORMANCE.md /usr/share/doc/echod/echo-load/README.md; do
    grep -qx "$path" <<<"$contents" || fail "$path missing from the package"
done
[[ $(dpkg-deb -f "$deb" Package) == echod ]] || fail "wrong package name"
dpkg-deb -I "$deb" conffiles | grep -qx /etc/echod/echod.toml || fail "/etc/echod/echod.toml is not a conffile"
echo "== contents: $(grep -c . <<<"$contents") entries, all expected paths present"

echo "== lintian"
lintian --fail-on error --suppress-tags initial-upload-closes-no-bugs "$deb"

echo "== install"
as_root dpkg --purge echod >/dev/null 2>&1 || true
as_root dpkg -i "$deb"
trap 'as_root dpkg --purge echod >/dev/null 2>&1 || true' EXIT
systemd-analyze verify /usr/lib/systemd/system/echod.service /usr/lib/systemd/system/echod.socket
echo "systemd-analyze verify: ok"
out=$(/usr/bin/echod --check-config --config /etc/echod/echod.toml) || fail "installed config rejected"
grep -q '^listen = \["\[::\]:7", "0.0.0.0:7"\]$' <<<"$out" || fail "installed config does not listen on port 7: $out"
echo "echod --check-config: ok ($(head -1 <<<"$out"))"
# Without --config, from anywhere but a checkout, it checks the file the unit runs (#28.1).
out=$(cd / && /usr/bin/echod --check-config) || fail "echod --check-config (no --config) failed"
grep -q '^# echod .*configuration OK (/etc/echod/echod.toml)' <<<"$out" || fail "echod --check-config did not check /etc/echod/echod.toml: $(head -1 <<<"$out")"
echo "echod --check-config without --config checks /etc/echod/echod.toml: ok"
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
for bin in echod echo-load; do
    v=$(/usr/bin/$bin --version)
    [[ $v == "$bin $(dpkg-deb -f "$deb" Version | cut -d- -f1) (git $commit)" ]] || fail "$bin --version: $v"
    echo "$v"
done
# Each page renders and names what it must: echod(8) every signal the master
# handles (in its SIGNALS section), echod.toml(5) every key of the file,
# echo-load(1) every flag of --help.
page8=$(man -l /usr/share/man/man8/echod.8.gz 2>/dev/null) || fail "echod(8) does not render"
signals8=$(sed -n '/^SIGNALS/,/^FILES/p' <<<"$page8")
for sig in TERM INT QUIT HUP TTIN TTOU USR1 USR2 CHLD; do
    grep -qw "$sig" <<<"$signals8" || fail "echod(8) SIGNALS does not name $sig"
done
for section in NAME SYNOPSIS DESCRIPTION OPTIONS SIGNALS FILES ENVIRONMENT "EXIT STATUS" EXAMPLES "SEE ALSO"; do
    grep -q "^$section" <<<"$page8" || fail "echod(8) has no $section section"
done
page5=$(man -l /usr/share/man/man5/echod.toml.5.gz 2>/dev/null) || fail "echod.toml(5) does not render"
for key in $(grep -oE '^[a-z_]+ =' config/echod.toml | cut -d' ' -f1); do
    grep -qE "^ +$key = " <<<"$page5" || fail "echod.toml(5) does not document $key"
done
page1=$(man -l /usr/share/man/man1/echo-load.1.gz 2>/dev/null) || fail "echo-load(1) does not render"
for flag in $(/usr/bin/echo-load --help | grep -oE -- '--[a-z][a-z-]+' | sort -u); do
    grep -q -- "$flag" <<<"$page1" || fail "echo-load(1) does not document $flag"
done
echo "man pages: echod(8) names every signal, echod.toml(5) every key, echo-load(1) every flag"
bash -c 'source /usr/share/bash-completion/completions/echod && complete -p echod' >/dev/null \
    || fail "bash completion does not load"
for unit in echod.service echod.socket; do
    state=$(systemctl is-enabled "$unit" 2>&1 || true)
    [[ $state == disabled ]] || fail "$unit is $state after the install, not disabled"
    [[ ! -e /etc/systemd/system/multi-user.target.wants/$unit && ! -e /etc/systemd/system/sockets.target.wants/$unit ]] \
        || fail "$unit enabled"
done
if [ -d /run/systemd/system ] && systemctl is-active --quiet echod.service; then fail "echod.service was started"; fi
echo "installed, nothing enabled or started"

echo "== package upgrade of a running echod: a binary upgrade, no connection cut (#28.3)"
# The installed echod, started as root from the installed config (on a free loopback port:
# dpkg keeps the edited conffile with --force-confold), holds one connection; installing
# another revision must hand over to the new binary and keep that connection echoing.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
as_root sed -i "s|^listen = .*|listen = [\"127.0.0.1:$port\"]|; s|^shutdown_timeout = .*|shutdown_timeout = 20|" /etc/echod/echod.toml
log=$(mktemp)
as_root /usr/bin/echod --config /etc/echod/echod.toml 2>"$log" &
for _ in $(seq 100); do [ -s /run/echod/echod.pid ] && grep -q 'ready:' "$log" && break; sleep 0.1; done
old=$(cat /run/echod/echod.pid) || fail "no pid file: $(cat "$log")"
trap 'as_root kill -KILL "$old" $(cat /run/echod/echod.pid 2>/dev/null) 2>/dev/null || true; as_root dpkg --purge echod >/dev/null 2>&1 || true' EXIT
deb2=$(ECHOD_DEB_REVISION=2 bash debian/build.sh | tail -1)
python3 - "$port" "$deb2" <<'PY' || fail "the package upgrade cut or refused a connection: $(cat "$log")"
import os, socket, subprocess, sys
port, deb = int(sys.argv[1]), sys.argv[2]
held = socket.create_connection(("127.0.0.1", port), timeout=20)
def echo(s, data):
    s.sendall(data); got = b""
    while len(got) < len(data):
        chunk = s.recv(65536)
        if not chunk: raise SystemExit("connection closed by the server")
        got += chunk
    assert got == data, got
echo(held, b"before the upgrade")
subprocess.run(([] if os.geteuid() == 0 else ["sudo"]) + ["dpkg", "-i", "--force-confold", deb], check=True, stdout=subprocess.DEVNULL)
echo(held, b"after the upgrade")
fresh = socket.create_connection(("127.0.0.1", port), timeout=20)
echo(fresh, b"a new client, served by the new master")
PY
new=$(cat /run/echod/echod.pid)
[[ $new != "$old" ]] || fail "the pid file still names the old master $old: $(cat "$log")"
[[ $(readlink /proc/"$new"/exe) == /usr/bin/echod ]] || fail "the new master does not run the new /usr/bin/echod"
grep -q "upgrade: new master (pid $new) serves" "$log" || fail "no hand-over in the log: $(cat "$log")"
as_root /usr/bin/echod --config /etc/echod/echod.toml --signal quit >/dev/null
as_root kill -QUIT "$old" 2>/dev/null || true
for _ in $(seq 100); do kill -0 "$old" 2>/dev/null || break; sleep 0.1; done
echo "dpkg -i of revision 2 upgraded the running echod ($old -> $new) and the held connection kept echoing"
rm -f "$log"

echo "== purge"
as_root dpkg --purge echod
trap - EXIT
for path in /usr/bin/echod /etc/echod/echod.toml /usr/lib/systemd/system/echod.service; do
    [[ ! -e $path ]] || fail "$path left behind after purge"
done
echo "debian/test.sh: package ok"
