"""The test network guard: sockets to non-loopback addresses and name lookups other than localhost raise.

Used twice: ``conftest.py`` installs it around every test in the pytest process, and ``sitecustomize.py``
(next to this file) installs it for the whole life of a child Python process that a test starts with
:func:`subprocess_env` (the CLI runs in ``test_demo.py`` / ``test_quickstart.py``), so a hidden download
fails there too. Loopback stays allowed (a local Chroma server, the test's own listeners).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from pathlib import Path

ENV_VAR = "GRAPHDISTILL_TEST_NO_NETWORK"  # "1": sitecustomize.py installs the guard at interpreter start
TESTS_DIR = Path(__file__).resolve().parent

real_connect = socket.socket.connect
real_connect_ex = socket.socket.connect_ex
real_getaddrinfo = socket.getaddrinfo


class NetworkBlockedError(OSError):
    """A test (or a process a test started) tried to reach a non-loopback address."""


def is_local(address: object) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    if isinstance(address, tuple) and address:
        host = address[0]
        if isinstance(host, bytes):
            host = host.decode()
        if host in ("localhost", ""):
            return True
        try:
            return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
        except ValueError:
            return False
    return False


def _is_ip_literal(host: object) -> bool:
    try:
        ipaddress.ip_address(host.decode() if isinstance(host, bytes) else str(host))
    except ValueError:
        return False
    return True  # connect() decides whether the address is allowed


def guarded_connect(self: socket.socket, address: object) -> None:
    if not is_local(address):
        raise NetworkBlockedError(f"test tried to open a network connection to {address!r}")
    real_connect(self, address)  # type: ignore[arg-type]


def guarded_connect_ex(self: socket.socket, address: object) -> int:
    if not is_local(address):
        raise NetworkBlockedError(f"test tried to open a network connection to {address!r}")
    return real_connect_ex(self, address)  # type: ignore[arg-type]


def guarded_getaddrinfo(host: object, *args: object, **kwargs: object) -> object:
    if host not in (None, "localhost", b"localhost") and not _is_ip_literal(host):
        raise NetworkBlockedError(f"test tried to resolve {host!r}")
    return real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]


PATCHES = [
    (socket.socket, "connect", guarded_connect),
    (socket.socket, "connect_ex", guarded_connect_ex),
    (socket, "getaddrinfo", guarded_getaddrinfo),
]


def install() -> None:
    """Guard this process for good (a child process: nothing to undo)."""
    for owner, name, fn in PATCHES:
        setattr(owner, name, fn)


def subprocess_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment for a child Python process that must be guarded like the tests themselves."""
    env = dict(os.environ if base is None else base)
    env.update(extra)
    env[ENV_VAR] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH", "")) if p)
    return env
