"""`graphdistill doctor`: the stack's versions, the weights, the torch device, the offline settings."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import platform
from typing import Any

from graphdistill.commands._common import console, print_json

STACK = [
    "graphdistill",
    "torch",
    "torchvision",
    "langgraph",
    "langchain-core",
    "transformers",
    "ultralytics",
    "segment-anything",
    "mobilesam-mirror",
    "open_clip_torch",
    "sentence-transformers",
    "chromadb",
    "timm",
    "tokenizers",
    "onnx",
    "onnxruntime",
    "executorch",
    "torchao",
    "pyarrow",
]


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("doctor", help="versions, weights status, torch device and offline settings")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_doctor)


def collect() -> dict[str, Any]:
    from graphdistill import weights
    from graphdistill._env import home, offline_status

    versions: dict[str, str | None] = {}
    for dist in STACK:
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    device: dict[str, object] = {"python": platform.python_version(), "machine": platform.machine()}
    try:
        import torch

        device.update(
            torch=torch.__version__,
            cuda_available=torch.cuda.is_available(),
            cuda_device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            threads=torch.get_num_threads(),
            default_device="cuda" if torch.cuda.is_available() else "cpu",
        )
    except ImportError:
        device["torch"] = None
    return {
        "versions": versions,
        "device": device,
        "home": str(home()),
        "weights": [weights.verify(n) for n in weights.REGISTRY],
        "offline": offline_status(),
    }


def _doctor(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print_json(info)
        return 0
    con = console()
    con.print("[bold]graphdistill doctor[/]")
    con.print(f"cache: {info['home']}")
    con.print("[bold]stack[/]")
    for k, v in info["versions"].items():
        con.print(f"  {k:<24} {v or '[red]not installed[/]'}")
    con.print("[bold]device[/]")
    for k, v in info["device"].items():
        con.print(f"  {k:<24} {v}")
    con.print("[bold]weights[/]")
    for w in info["weights"]:
        state = "ok" if w["sha256_ok"] else ("MISMATCH" if w["present"] else "missing")
        con.print(f"  {w['name']:<24} {state:<9} {w['path']}")
    con.print("[bold]offline settings in force[/]")
    for k, v in info["offline"].items():
        con.print(f"  {k:<24} {v}")
    return 0
