"""The test network guard holds in the pytest process and in the child Python processes tests start."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap

import pytest

from _netguard import ENV_VAR, NetworkBlockedError, subprocess_env

# TEST-NET-1 (RFC 5737): never routed; the guard must refuse before any packet could leave
OUTSIDE = ("192.0.2.1", 80)

CHILD = textwrap.dedent(
    """
    import json, socket, sys

    if getattr(socket.socket.connect, "__module__", None) != "_netguard":
        sys.exit("no guard installed: not trying any address")  # never reach out when the guard is missing

    def attempt(fn):
        try:
            fn()
        except OSError as exc:
            return type(exc).__name__
        return "ok"

    def outside():
        with socket.socket() as s:
            s.settimeout(2)
            s.connect(("192.0.2.1", 80))

    def loopback():
        with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5) as s:
            s.sendall(b"hi")

    print(json.dumps({
        "connect": attempt(outside),
        "connect_ex": attempt(lambda: socket.socket().connect_ex(("192.0.2.1", 443))),
        "resolve": attempt(lambda: socket.getaddrinfo("example.invalid", 443)),
        "create_connection": attempt(lambda: socket.create_connection(("example.invalid", 443), timeout=2)),
        "loopback": attempt(loopback),
    }))
    """
)


def test_in_process_guard_blocks_outside_addresses() -> None:
    with socket.socket() as s, pytest.raises(NetworkBlockedError, match="192.0.2.1"):
        s.connect(OUTSIDE)
    with pytest.raises(NetworkBlockedError, match="example.invalid"):
        socket.getaddrinfo("example.invalid", 443)


def test_child_process_started_with_subprocess_env_is_guarded_but_loopback_works() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(10)
        port = server.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(port)],
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        conn, _ = server.accept()
        with conn:
            assert conn.recv(2) == b"hi"  # the loopback connection really reached us
    result = json.loads(proc.stdout)
    blocked = {k: v for k, v in result.items() if k != "loopback"}
    assert blocked == dict.fromkeys(blocked, "NetworkBlockedError"), result
    assert result["loopback"] == "ok"


def test_sitecustomize_does_nothing_without_the_switch() -> None:
    """PYTHONPATH alone (no GRAPHDISTILL_TEST_NO_NETWORK=1) leaves a child's sockets untouched."""
    code = "import socket; print(getattr(socket.socket.connect, '__module__', 'builtin'))"

    def connect_module(env: dict[str, str]) -> str:
        run = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    env = subprocess_env()
    assert connect_module(env) == "_netguard"
    del env[ENV_VAR]
    assert connect_module(env) != "_netguard"
