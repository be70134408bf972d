"""What ``graphdistill ui`` shows, opened read-only and checked once: the trace store, and optionally the
filtered dataset, the evaluated run and an ONNX bundle.

``STORE`` may also be a demo's output folder (``graphdistill demo --out OUT``): its ``store/``, ``dataset/``,
``run/`` and first ONNX bundle under ``bundles/`` are found there unless a flag names another.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphdistill.errors import GraphdistillError

if TYPE_CHECKING:
    from graphdistill.dataset import Dataset
    from graphdistill.eval.result import EvalResult
    from graphdistill.runner.manifest import Manifest
    from graphdistill.store.trace_store import TraceStore

log = logging.getLogger(__name__)

# the ONNX bundles a demo writes, the int8 one first (the one a phone ships)
DEMO_BUNDLES = ("onnx-int8", "onnx-none")


class UIError(GraphdistillError, ValueError):
    """An input of ``graphdistill ui`` that cannot be shown; the message names it and what is wrong."""


@dataclass
class Sources:
    store: TraceStore
    dataset: Dataset | None = None
    dataset_path: Path | None = None
    run: Path | None = None
    eval: EvalResult | None = None
    bundle: Path | None = None
    manifest: Manifest | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "store": str(self.store.root),
            "dataset": str(self.dataset_path) if self.dataset_path else None,
            "run": str(self.run) if self.run else None,
            "bundle": str(self.bundle) if self.bundle else None,
            "bundle_quantize": self.manifest["quantize"] if self.manifest else None,
        }

    def close(self) -> None:
        self.store.close()


def _demo_layout(root: Path) -> dict[str, Path | None]:
    """A demo's output folder -> where its parts are (None for a part it lacks)."""
    bundle = next((root / "bundles" / b for b in DEMO_BUNDLES if (root / "bundles" / b).is_dir()), None)
    return {
        "store": root / "store",
        "dataset": root / "dataset" if (root / "dataset").is_dir() else None,
        "run": root / "run" if (root / "run" / "eval.json").is_file() else None,
        "bundle": bundle,
    }


def open_store(path: str | os.PathLike[str]) -> TraceStore:
    """A trace store opened read-only (SQLite ``mode=ro``): the UI cannot write to it."""
    from graphdistill.store.trace_store import DB_NAME, StoreError, TraceStore

    root = Path(path)
    if not root.exists():
        raise UIError(f"trace store {root}: no such folder")
    if not root.is_dir():
        raise UIError(f"trace store {root}: is a file, expected a trace store folder")
    if not (root / DB_NAME).is_file():
        raise UIError(f"trace store {root}: no {DB_NAME} there (not a trace store; record one first)")
    try:
        return TraceStore(root, readonly=True)
    except StoreError as exc:
        raise UIError(str(exc)) from exc


def open_bundle(path: str | os.PathLike[str]) -> Manifest:
    """The manifest of an ONNX bundle, checked (format, checksum, every file's sha256)."""
    from graphdistill.runner.bundle import BundleError, read_manifest

    root = Path(path)
    try:
        manifest = read_manifest(root)
    except BundleError as exc:
        raise UIError(f"bundle {root}: {exc}") from exc
    if manifest["runtime"] != "onnx":
        raise UIError(
            f"bundle {root}: its runtime is {manifest['runtime']!r}; the browser runs ONNX bundles only "
            "(graphdistill export RUN --format onnx)"
        )
    return manifest


def open_sources(
    store: str | os.PathLike[str],
    *,
    dataset: str | os.PathLike[str] | None = None,
    run: str | os.PathLike[str] | None = None,
    bundle: str | os.PathLike[str] | None = None,
) -> Sources:
    """Open and check every input; :class:`UIError` names the first that cannot be shown."""
    from graphdistill.store.trace_store import DB_NAME

    root = Path(store)
    if root.is_dir() and not (root / DB_NAME).exists() and (root / "store" / DB_NAME).is_file():
        found = _demo_layout(root)
        log.info("%s is a demo's output folder: %s", root, {k: str(v) for k, v in found.items()})
        root = found["store"] or root
        dataset = dataset if dataset is not None else found["dataset"]
        run = run if run is not None else found["run"]
        bundle = bundle if bundle is not None else found["bundle"]
    sources = Sources(open_store(root))
    try:
        if dataset is not None:
            from graphdistill.dataset import DatasetError, open_dataset

            try:
                sources.dataset = open_dataset(dataset)
            except DatasetError as exc:
                raise UIError(str(exc)) from exc
            sources.dataset_path = Path(dataset)
        if run is not None:
            from graphdistill.eval.result import EvalFileError, read_eval

            sources.run = Path(run)
            if not sources.run.is_dir():
                raise UIError(f"run {sources.run}: no such folder")
            try:
                sources.eval = read_eval(sources.run)
            except EvalFileError as exc:
                raise UIError(f"run {sources.run}: {exc}") from exc
            if sources.dataset is None and Path(str(sources.eval["dataset"])).is_dir():
                from graphdistill.dataset import open_dataset

                sources.dataset_path = Path(str(sources.eval["dataset"]))
                sources.dataset = open_dataset(sources.dataset_path)
        if bundle is not None:
            sources.manifest = open_bundle(bundle)
            sources.bundle = Path(bundle)
    except BaseException:
        sources.close()
        raise
    return sources
