#!/usr/bin/env bash
# debian/build.sh: builds the Debian package, target/debian/echod_<version>-1_<arch>.deb, and
# prints its path on the last line.
#
# What goes in is listed in Cargo.toml ([package.metadata.deb]); this script makes the files
# that are generated rather than kept in git, under target/assets/:
#   - man pages and bash/zsh/fish completions, from the clap definitions
#     (examples/dist-assets.rs);
#   - /etc/echod/echod.toml: config/echod.toml listening on port 7 on all addresses, its pid in
#     /run/echod/echod.pid (the postinst finds the master there to upgrade it), the
#     README's systemd recipe (a conffile: dpkg keeps local edits on upgrade);
#   - the units, with ExecStart pointing at /usr/bin/echod.
# Needs cargo-deb (installed here with `cargo install --locked cargo-deb` if missing) and
# dpkg-dev (dpkg-shlibdeps, for the package's dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null 2>&1 || cargo install --locked cargo-deb >&2

A=target/assets
rm -rf "$A"
cargo run -q --release --example dist-assets -- "$A" >&2
gzip -9n "$A"/man/*
mkdir -p "$A/systemd"
sed 's|/usr/local/bin/echod|/usr/bin/echod|g' systemd/echod.service >"$A/systemd/echod.service"
cp systemd/echod.socket "$A/systemd/echod.socket"
grep -q '^ExecStart=/usr/bin/echod --config /etc/echod/echod.toml$' "$A/systemd/echod.service"
grep -q '^ExecReload=/usr/bin/echod --check-config --quiet --config /etc/echod/echod.toml$' "$A/systemd/echod.service"
sed -e 's|^listen = .*|listen = ["[::]:7", "0.0.0.0:7"]|' -e 's|^pid_file = .*|pid_file = "/run/echod/echod.pid"|' \
    config/echod.toml >"$A/echod.toml"
grep -q '^listen = \["\[::\]:7", "0.0.0.0:7"\]$' "$A/echod.toml"
grep -q '^pid_file = "/run/echod/echod.pid"$' "$A/echod.toml"

# ECHOD_DEB_REVISION: another Debian revision (debian/test.sh builds a second one to upgrade to).
cargo deb --strip ${ECHOD_DEB_REVISION:+--deb-revision "$ECHOD_DEB_REVISION"} >&2
ls -t target/debian/echod_*.deb | head -1
