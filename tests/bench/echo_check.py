#!/usr/bin/env python3
"""echo_check.py PORT: check that 127.0.0.1:PORT echoes bytes back unchanged.

tcp-echo-benchmark does not verify the echoed bytes, so tests/bench/compare.sh runs this
once per server before measuring. Payloads are random and end in '\\n' (Apache mod_echo
is line-based); sizes 1, 64, 4096 and 100000, each on its own connection, then
20 messages of 4096 on one connection. Exit status 1 on any mismatch.
"""
import os
import socket
import sys


def roundtrip(sock, size):
    data = os.urandom(size - 1).replace(b"\n", b"x") + b"\n"
    sock.sendall(data)
    got = b""
    while len(got) < size:
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got == data


port = int(sys.argv[1])
try:
    ok = True
    for size in (1, 64, 4096, 100000):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            ok &= roundtrip(s, size)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        ok &= all(roundtrip(s, 4096) for _ in range(20))
except OSError as e:
    sys.exit(f"echo FAILED: {e!r}")
print("echo ok" if ok else "echo MISMATCH")
sys.exit(0 if ok else 1)
