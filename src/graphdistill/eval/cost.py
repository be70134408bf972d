"""What the student saves: latency, size and memory of the whole teacher graph against the student.

Everything is measured in one process on one machine with the same inputs: warm (each predictor runs the
inputs once before the clock starts), the median of every timed query. Sizes count every teacher model the
graph's nodes actually use (their registry weight files plus converted caches, e.g. the safetensors copy of
the GGUF LLM) against the student's ``model.safetensors``. Memory is the peak increase of this process's
resident set size while a predictor is loaded and queried (sampled every few ms): run the student first,
then the teacher, so that each number is that model's own cost.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import struct
import threading
import time
import types
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

Predict = Callable[[np.ndarray, str], Any]
Progress = Callable[[str, int, int], None]  # (what, done, total)


# --------------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    """This process's current resident set size."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # Linux without psutil: /proc
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Context manager: the peak RSS reached inside the block, and its increase over the RSS at entry."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def increase(self) -> int:
        return max(0, self.peak - self.start)


# --------------------------------------------------------------------------------------------------------
# Latency
# --------------------------------------------------------------------------------------------------------


def median_latency(
    predict: Predict,
    inputs: Sequence[tuple[np.ndarray, str]],
    *,
    warmup: int = 1,
    repeats: int = 3,
    label: str = "predict",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run every input ``warmup`` times untimed, then ``repeats`` times timed; the median in milliseconds.

    Returns ``{"median_ms", "mean_ms", "min_ms", "max_ms", "n_timed", "outputs"}`` (``outputs``: the last
    output per input, so callers can reuse them without running again).
    """
    if not inputs:
        raise ValueError("median_latency needs at least one input")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    total = len(inputs) * (warmup + repeats)
    done = 0
    outputs: list[Any] = [None] * len(inputs)
    for _ in range(warmup):
        for i, (image, question) in enumerate(inputs):
            outputs[i] = predict(image, question)
            done += 1
            if progress:
                progress(label, done, total)
    times: list[float] = []
    for _ in range(repeats):
        for i, (image, question) in enumerate(inputs):
            t0 = time.perf_counter()
            outputs[i] = predict(image, question)
            times.append((time.perf_counter() - t0) * 1000.0)
            done += 1
            if progress:
                progress(label, done, total)
    log.info("%s: median %.1f ms over %d queries", label, statistics.median(times), len(times))
    return {
        "median_ms": float(statistics.median(times)),
        "mean_ms": float(statistics.fmean(times)),
        "min_ms": float(min(times)),
        "max_ms": float(max(times)),
        "n_timed": len(times),
        "outputs": outputs,
    }


# --------------------------------------------------------------------------------------------------------
# Size
# --------------------------------------------------------------------------------------------------------


def path_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of a file, or of every file under a folder."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def safetensors_params(path: str | os.PathLike[str]) -> int:
    """Number of tensor elements in a ``.safetensors`` file, read from its header alone (no torch)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return sum(int(np.prod(v["shape"])) for k, v in header.items() if k != "__metadata__")


def student_footprint(run: str | os.PathLike[str]) -> dict[str, Any]:
    model = Path(run) / "model.safetensors"
    if not model.exists():
        raise FileNotFoundError(f"student run {run}: {model.name} is missing")
    return {"path": str(model), "bytes": path_bytes(model), "params": safetensors_params(model)}


_NOT_WALKED = (
    types.ModuleType,
    type,
    types.FunctionType,
    types.MethodType,
    types.BuiltinFunctionType,
    str,
    bytes,
    int,
    float,
    bool,
    np.ndarray,
)


def _torch_modules(obj: Any, depth: int = 3, seen: set[int] | None = None) -> list[Any]:
    """Every torch ``nn.Module`` reachable from ``obj`` through a few attribute hops (adapters keep their
    models under different names: ``model``, ``_model.model``, ``predictor.model`` ...)."""
    import torch

    seen = set() if seen is None else seen
    if id(obj) in seen or depth < 0:
        return []
    seen.add(id(obj))
    if isinstance(obj, _NOT_WALKED):  # library modules, classes, functions: never an adapter's model
        return []
    if isinstance(obj, torch.nn.Module):
        return [obj]
    found: list[Any] = []
    if isinstance(obj, (list, tuple)):
        values: Iterable[Any] = obj
    elif isinstance(obj, dict):
        values = obj.values()
    elif isinstance(getattr(obj, "__dict__", None), dict):
        values = obj.__dict__.values()
    else:
        return found
    for value in values:
        if value is None or isinstance(value, _NOT_WALKED):
            continue
        found.extend(_torch_modules(value, depth - 1, seen))
    return found


def count_params(modules: Iterable[Any]) -> int:
    """Parameters of the modules together, each shared tensor counted once."""
    seen: set[int] = set()
    total = 0
    for m in modules:
        for p in m.parameters():
            key = p.data_ptr() if p.numel() else id(p)
            if key not in seen:
                seen.add(key)
                total += p.numel()
    return total


def graph_models(graph: Any) -> list[dict[str, Any]]:
    """The models the graph's nodes declare: ``[{node, model_id, weights_sha256, adapter}]`` (adapter may
    be None when the node metadata names a model but the adapter object cannot be reached)."""
    builder = getattr(graph, "builder", None)
    nodes = getattr(builder, "nodes", None) or {}
    found: list[dict[str, Any]] = []
    for name, spec in nodes.items():
        meta = getattr(spec, "metadata", None) or {}
        sha = meta.get("graphdistill_weights_sha256")
        if not sha:
            continue
        runnable = getattr(spec, "runnable", None)
        runner = getattr(runnable, "func", runnable)
        decl = getattr(runner, "decl", None)
        found.append(
            {
                "node": name,
                "model_id": meta.get("graphdistill_model_id"),
                "weights_sha256": sha,
                "adapter": getattr(decl, "model", None),
            }
        )
    return found


def _weights_files(sha256: str) -> list[Path]:
    """The registry weight with this sha256 and its converted caches (``$GRAPHDISTILL_HOME/converted``)."""
    from graphdistill import weights
    from graphdistill._env import home

    files: list[Path] = []
    for spec in weights.REGISTRY.values():
        if spec.sha256 == sha256:
            p = weights.cached_path(spec.name)
            if p.exists():
                files.append(p)
    conv = home() / "converted"
    if conv.is_dir():
        files.extend(sorted(conv.glob(f"*-{sha256[:16]}")))
    return files


def teacher_footprint(graph: Any | None = None) -> dict[str, Any]:
    """Bytes and parameters of every model the teacher graph uses.

    With ``graph`` the models come from its nodes' metadata (sha256 of the weights each node loaded) and the
    parameters from the live adapters; without it the default registry weights are assumed and
    ``params`` is None.
    """
    from graphdistill import weights

    entries: list[dict[str, Any]] = []
    if graph is not None:
        by_sha: dict[str, dict[str, Any]] = {}
        for m in graph_models(graph):
            e = by_sha.setdefault(
                m["weights_sha256"], {"model_id": m["model_id"], "nodes": [], "adapters": []}
            )
            e["nodes"].append(m["node"])
            if m["adapter"] is not None:
                e["adapters"].append(m["adapter"])
        for sha, e in by_sha.items():
            files = _weights_files(sha)
            modules = [mod for a in e["adapters"] for mod in _torch_modules(a)]
            entries.append(
                {
                    "model_id": e["model_id"],
                    "weights_sha256": sha,
                    "nodes": e["nodes"],
                    "files": [str(f) for f in files],
                    "bytes": sum(path_bytes(f) for f in files),
                    "params": count_params(modules) if modules else None,
                }
            )
    else:
        for spec in weights.REGISTRY.values():
            files = _weights_files(spec.sha256)
            entries.append(
                {
                    "model_id": spec.model_id,
                    "weights_sha256": spec.sha256,
                    "nodes": [],
                    "files": [str(f) for f in files],
                    "bytes": sum(path_bytes(f) for f in files) or spec.size,
                    "params": None,
                }
            )
    params = [e["params"] for e in entries]
    return {
        "models": entries,
        "bytes": sum(e["bytes"] for e in entries),
        "params": sum(params) if params and all(p is not None for p in params) else None,
        "assumed_defaults": graph is None,
    }


# --------------------------------------------------------------------------------------------------------
# Predictors
# --------------------------------------------------------------------------------------------------------


def teacher_predict(graph: Any) -> Predict:
    """The whole teacher graph as ``(image, question) -> final output`` (one ``invoke``)."""

    def predict(image: np.ndarray, question: str) -> Any:
        return graph.invoke({"image": image, "question": question})

    return predict


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    if a is None or b is None or b == 0:
        return None
    return float(a) / float(b)
