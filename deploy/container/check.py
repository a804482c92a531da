#!/usr/bin/env python3
"""Checks the Containerfile and the Kubernetes manifests without a container
engine or a cluster (neither exists on the CI machine). Run by check.sh,
which provides the two PyPI packages used here:

- `dockerfile`: the Containerfile is parsed by buildkit's own parser; its
  stages and instructions are checked, then both stages are rehearsed on
  the host: the build stage's RUN in a directory holding only what its
  COPY lines bring in (proves the build context is complete), the runtime
  stage as its USER with its files, config and ENTRYPOINT (echo, /healthz,
  /livez, graceful stop on its STOPSIGNAL);
- `kubernetes-validate`: every manifest against the Kubernetes OpenAPI
  schemas in strict mode (unknown fields are errors), for the oldest
  version the manifests need and the newest the package ships; then the
  manifests are cross-checked with the echod config they carry (ports,
  probes, grace period against shutdown_delay + shutdown_timeout), and that
  config is run like the image's.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request

import dockerfile
import yaml  # comes with kubernetes-validate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RELEASE = os.path.join(ROOT, "target", "release")
K8S_VERSIONS = ["1.30.0", "1.37.0"]  # preStop `sleep` needs 1.30


def fail(msg):
    print(f"check: FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def ok(msg):
    print(f"check: ok: {msg}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stages(cmds):
    """[(name, [commands])] per FROM."""
    out = []
    for c in cmds:
        if c.cmd == "FROM":
            name = c.value[2] if len(c.value) == 3 and c.value[1].upper() == "AS" else str(len(out))
            out.append((name, []))
        elif out:
            out[-1][1].append(c)
    return out


def one(cmds, name):
    found = [c for c in cmds if c.cmd == name]
    if len(found) != 1:
        fail(f"runtime stage: expected one {name}, found {len(found)}")
    return found[0]


def check_containerfile():
    cmds = dockerfile.parse_file(os.path.join(ROOT, "Containerfile"))
    st = stages(cmds)
    if len(st) < 2:
        fail("Containerfile: a multi-stage build (build, runtime) was expected")
    (build_name, build), (run_name, runtime) = st[0], st[-1]
    user = one(runtime, "USER").value[0]
    uid = user.split(":")[0]
    if not uid.isdigit() or int(uid) == 0:
        fail(f"runtime USER must be a numeric non-root uid, got {user}")
    entry = one(runtime, "ENTRYPOINT")
    if not entry.json:
        fail("ENTRYPOINT must be exec (JSON) form, so echod is PID 1 and gets the stop signal")
    if one(runtime, "STOPSIGNAL").value[0] != "SIGTERM":
        fail("STOPSIGNAL must be SIGTERM (echod's graceful stop)")
    arg = next(c for c in cmds if c.cmd == "ARG" and c.value[0].startswith("RUST_VERSION="))
    manifest = tomllib.load(open(os.path.join(ROOT, "Cargo.toml"), "rb"))
    want = manifest["package"]["rust-version"]
    if isinstance(want, dict):  # rust-version.workspace = true
        want = manifest["workspace"]["package"]["rust-version"]
    if arg.value[0].split("=")[1] != want:
        fail(f"ARG RUST_VERSION {arg.value[0]} differs from Cargo.toml rust-version {want}")
    ok(f"Containerfile parses; stages {build_name} -> {run_name}; runs as uid {uid}; exec ENTRYPOINT; Rust {want}")
    return build, runtime, int(uid), list(entry.value)


def rehearse_build(build):
    """The build stage's COPYs into an empty directory, then its RUN there."""
    ctx = tempfile.mkdtemp(prefix="echod-build-")
    try:
        for c in build:
            if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags):
                *srcs, _ = c.value
                for s in srcs:
                    src = os.path.join(ROOT, s)
                    if os.path.isdir(src):
                        shutil.copytree(src, os.path.join(ctx, s))
                    else:
                        shutil.copy(src, os.path.join(ctx, s))
        run = next(c for c in build if c.cmd == "RUN").value[0]
        env = dict(os.environ, ECHOD_GIT_COMMIT="containerfile-check")
        # Share compiled dependencies with the main build; only echod itself
        # is compiled from the copied sources.
        env["CARGO_TARGET_DIR"] = os.path.join(ROOT, "target", "container-check")
        run = run.replace("target/release/", os.path.join(env["CARGO_TARGET_DIR"], "release") + "/")
        r = subprocess.run(["sh", "-c", run], cwd=ctx, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            fail(f"build stage RUN failed in a context of only its COPYs:\n{r.stderr[-3000:]}")
        out = os.path.join(env["CARGO_TARGET_DIR"], "release", "echod")
        v = subprocess.run([out, "--version"], capture_output=True, text=True).stdout.strip()
        ok(f"build stage: its COPYs are a complete build context; built `{v}`")
    finally:
        shutil.rmtree(ctx)


def serve_as(uid, argv, config_text, label):
    """Runs echod as `uid` with config_text (ports moved to free loopback
    ones); checks an echo, /healthz, /livez, then a graceful stop."""
    port, mport = free_port(), free_port()
    text = config_text.replace('"0.0.0.0:7007"', f'"127.0.0.1:{port}"').replace(
        '"0.0.0.0:9107"', f'"127.0.0.1:{mport}"'
    )
    if f"127.0.0.1:{port}" not in text or f"127.0.0.1:{mport}" not in text:
        fail(f"{label}: expected listen 0.0.0.0:7007 and metrics_listen 0.0.0.0:9107")
    root = tempfile.mkdtemp(prefix="echod-rootfs-")
    os.chmod(root, 0o755)
    cfg = os.path.join(root, "echod.toml")
    with open(cfg, "w") as f:
        f.write(text)
    os.chmod(cfg, 0o644)
    args = [a if a != "/etc/echod/echod.toml" else cfg for a in argv]
    args[0] = os.path.join(RELEASE, os.path.basename(args[0]))
    cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"] + args
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 10
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{mport}/healthz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                fail(f"{label}: /healthz never answered 200: {proc.stderr.read()[-2000:]}")
            time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"container check\n")
            got = b""
            while len(got) < 16:
                got += s.recv(64)
            if got != b"container check\n":
                fail(f"{label}: echo returned {got!r}")
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/livez", timeout=2) as r:
            assert r.status == 200
        owner = os.stat(f"/proc/{proc.pid}").st_uid
        if owner != uid:
            fail(f"{label}: echod runs as uid {owner}, not {uid}")
        cfg_toml = tomllib.loads(config_text)
        proc.send_signal(signal.SIGTERM)
        limit = cfg_toml.get("shutdown_delay", 0) + 5
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            fail(f"{label}: no exit within {limit}s of SIGTERM")
        if code != 0:
            fail(f"{label}: exit {code} after SIGTERM: {proc.stderr.read()[-2000:]}")
        ok(f"{label}: as uid {uid}: echo, /healthz 200, /livez 200, SIGTERM -> exit 0")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(root)


def rehearse_runtime(runtime, uid, entry):
    """The runtime stage: the files it COPYs from the context exist; then
    the image's config served as the image's user."""
    config = None
    for c in runtime:
        if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags):
            src, dst = c.value
            if not os.path.exists(os.path.join(ROOT, src)):
                fail(f"runtime COPY source {src} does not exist")
            if dst == "/etc/echod/echod.toml":
                config = open(os.path.join(ROOT, src)).read()
    if config is None:
        fail("runtime stage copies no /etc/echod/echod.toml")
    expose = {int(p) for p in one(runtime, "EXPOSE").value}
    if expose != {7007, 9107}:
        fail(f"EXPOSE {expose} does not match the config's ports 7007, 9107")
    serve_as(uid, entry, config, "runtime stage")
    return config


def check_manifests(uid, entry):
    path = os.path.join(ROOT, "deploy", "kubernetes", "echod.yaml")
    venv_bin = os.path.dirname(sys.executable)
    for v in K8S_VERSIONS:
        r = subprocess.run(
            [os.path.join(venv_bin, "kubernetes-validate"), "--strict", "-k", v, path], capture_output=True, text=True
        )
        if r.returncode != 0:
            fail(f"kubernetes-validate {v}:\n{r.stdout}{r.stderr}")
        ok(f"kubernetes-validate --strict -k {v}: {len(r.stdout.splitlines())} resources pass")
    docs = {d["kind"]: d for d in yaml.safe_load_all(open(path)) if d}
    for kind in ["ConfigMap", "Deployment", "Service", "PodDisruptionBudget"]:
        if kind not in docs:
            fail(f"{path}: no {kind}")
    config_text = docs["ConfigMap"]["data"]["echod.toml"]
    cfg = tomllib.loads(config_text)
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    if f"0.0.0.0:{ports['echo']}" not in cfg["listen"] or cfg["metrics_listen"] != f"0.0.0.0:{ports['metrics']}":
        fail("containerPorts do not match the ConfigMap's listen / metrics_listen")
    if (c["readinessProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["path"]) != ("/healthz", "/livez"):
        fail("readiness must probe /healthz (503 while stopping), liveness /livez (200 while draining)")
    if pod["securityContext"]["runAsUser"] != uid:
        fail(f"runAsUser {pod['securityContext']['runAsUser']} differs from the image's USER {uid}")
    pre = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    need = pre + cfg.get("shutdown_delay", 0) + cfg.get("shutdown_timeout", 30)
    grace = pod["terminationGracePeriodSeconds"]
    if grace <= need:
        fail(f"terminationGracePeriodSeconds {grace} <= preStop {pre} + shutdown_delay + shutdown_timeout = {need}")
    if c["args"] != entry[1:]:
        fail(f"container args {c['args']} differ from the image's ENTRYPOINT {entry[1:]}")
    if [m["mountPath"] for m in c["volumeMounts"]] != ["/etc/echod"]:
        fail("the ConfigMap must be mounted at /etc/echod, where the ENTRYPOINT reads echod.toml")
    ok(f"manifests agree with their config: ports, probes, uid, grace {grace}s > {need}s")
    serve_as(uid, entry, config_text, "ConfigMap config")


def main():
    for b in ["echod", "echo-load"]:
        if not os.path.exists(os.path.join(RELEASE, b)):
            fail(f"build first: cargo build --release ({b} missing)")
    build, runtime, uid, entry = check_containerfile()
    rehearse_runtime(runtime, uid, entry)
    check_manifests(uid, entry)
    rehearse_build(build)


if __name__ == "__main__":
    main()
