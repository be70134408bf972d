"""The student -> one ExecuTorch program (``model.pte``) with two methods, ``encode`` and ``decode_step``,
lowered to XNNPACK: ``torch.export`` -> ``to_edge_transform_and_lower`` -> ``to_executorch``.

Graph inputs get no planned memory (``alloc_graph_input=False``): the program reads each input where the
caller keeps it, so the runner's KV cache, cross-attention keys/values and image are not copied into the
program at every call (for a small decoder those copies are a visible share of a decode step)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from graphdistill._lazy import require
from graphdistill.export.quantize import QUANTIZED, quantize_pt2e

log = logging.getLogger(__name__)

PTE = "model.pte"


def export_executorch(
    programs: dict[str, tuple[Any, tuple[Any, ...]]],
    out_dir: Path,
    *,
    quantize: str = "none",
    calibration: dict[str, Sequence[tuple[Any, ...]]] | None = None,
    int8_patterns: tuple[str, ...] = QUANTIZED,
) -> dict[str, str]:
    """``programs``: method name -> (eval module, example inputs). Writes ``out_dir/model.pte``; returns
    method name -> file name. ``int8_patterns``: what int8 quantizes (see :func:`quantize_pt2e`)."""
    torch = require("torch")
    exir = require("executorch.exir", purpose="ExecuTorch export")
    xnn = require("executorch.backends.xnnpack.partition.xnnpack_partitioner", purpose="ExecuTorch export")
    from graphdistill.student.phone_ops import phone_friendly

    exported = {}
    # traced with the formulations XNNPACK takes whole (see graphdistill.student.phone_ops): ~3x faster
    # encode and decode steps than the fused PyTorch ops, which leave most of the graph to portable kernels
    with torch.no_grad(), phone_friendly(decompose_norms=True):
        for name, (module, example) in programs.items():
            if quantize == "int8":
                log.info("PT2E int8: calibrating %s on %d inputs", name, len((calibration or {})[name]))
                module = quantize_pt2e(module, example, (calibration or {})[name], int8_patterns)
            exported[name] = torch.export.export(module, example)
    if quantize == "int8":
        # out-variants of the quantized ops XNNPACK does not take (e.g. a per-channel dequantize of the tied
        # embedding): without them to_executorch() fails with "Missing out variants"
        require("executorch.kernels.quantized", purpose="int8 ExecuTorch export")
    log.info("lowering %s to XNNPACK", sorted(exported))
    edge = exir.to_edge_transform_and_lower(exported, partitioner=[xnn.XnnpackPartitioner()])
    passes = require("executorch.exir.passes", purpose="ExecuTorch export")
    config = exir.ExecutorchBackendConfig(
        memory_planning_pass=passes.MemoryPlanningPass(alloc_graph_input=False)
    )
    program = edge.to_executorch(config)
    (out_dir / PTE).write_bytes(program.buffer)
    return {name: PTE for name in programs}
