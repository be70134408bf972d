"""Test-wide guards and shared fixtures: no outbound network, offline switches on, weights cache shared across
tests, an empty in-memory filesystem."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _netguard import PATCHES
from graphdistill._env import apply_offline_env

apply_offline_env()


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test: sockets to non-loopback addresses raise. A child Python process a test starts gets the
    same guard from ``env=_netguard.subprocess_env()`` (through ``sitecustomize.py``)."""
    for owner, name, fn in PATCHES:
        monkeypatch.setattr(owner, name, fn)
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


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """For modules of tiny models: one intra-op thread is as fast as two and does not thrash a shared CPU
    (use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def mem() -> Iterator[Any]:
    """fsspec's in-memory filesystem, empty before and after the test."""
    import fsspec

    fs = fsspec.filesystem("memory")

    def clear() -> None:
        fs.store.clear()
        fs.pseudo_dirs.clear()
        fs.pseudo_dirs.append("")

    clear()
    yield fs
    clear()


def pytest_report_header(config: pytest.Config) -> str:
    return f"graphdistill home: {os.environ.get('GRAPHDISTILL_HOME', '~/.cache/graphdistill')}"
