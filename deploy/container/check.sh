#!/usr/bin/env bash
# Checks the Containerfile and deploy/kubernetes without a container engine
# or a cluster: see check.py. Needs python3-venv (Debian) and the release
# build (cargo build --release). PyPI packages go to target/ci-venv.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --bins --quiet
venv=target/ci-venv
if ! "$venv/bin/python" -c 'import dockerfile, kubernetes_validate' 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check dockerfile==3.4.0 kubernetes-validate==1.37.0
fi
exec "$venv/bin/python" deploy/container/check.py
