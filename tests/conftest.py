"""Test-wide guards: no outbound network, offline switches on, weights cache shared across tests."""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphdistill._env import apply_offline_env

apply_offline_env()

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_getaddrinfo = socket.getaddrinfo


class NetworkBlockedError(OSError):
    """A test tried to reach a non-loopback address."""


def _is_local(address: object) -> bool:
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


def _guarded_connect(self: socket.socket, address: object) -> None:
    if not _is_local(address):
        raise NetworkBlockedError(f"test tried to open a network connection to {address!r}")
    _real_connect(self, address)  # type: ignore[arg-type]


def _guarded_connect_ex(self: socket.socket, address: object) -> int:
    if not _is_local(address):
        raise NetworkBlockedError(f"test tried to open a network connection to {address!r}")
    return _real_connect_ex(self, address)  # type: ignore[arg-type]


def _guarded_getaddrinfo(host: object, *args: object, **kwargs: object) -> object:
    if host not in (None, "localhost", b"localhost") and not _is_ip_literal(host):
        raise NetworkBlockedError(f"test tried to resolve {host!r}")
    return _real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", _guarded_connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", _guarded_getaddrinfo)
    yield


@pytest.fixture(scope="session")
def weights_home() -> Path:
    """The shared weights cache (fetched once by `make setup`; real-model tests reuse it)."""
    from graphdistill._env import home

    return home()


@pytest.fixture
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty GRAPHDISTILL_HOME for tests that must not touch the shared cache."""
    monkeypatch.setenv("GRAPHDISTILL_HOME", str(tmp_path / "gdhome"))
    return tmp_path / "gdhome"


def pytest_report_header(config: pytest.Config) -> str:
    return f"graphdistill home: {os.environ.get('GRAPHDISTILL_HOME', '~/.cache/graphdistill')}"
