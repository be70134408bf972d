"""The student -> two ONNX graphs, ``encode.onnx`` and ``decode_step.onnx`` (static shapes, batch 1)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from graphdistill._lazy import require
from graphdistill.export.quantize import quantize_onnx
from graphdistill.student.phone_ops import phone_friendly

log = logging.getLogger(__name__)

OPSET = 18


def export_onnx(
    programs: dict[str, tuple[Any, tuple[Any, ...]]],
    names: dict[str, tuple[list[str], list[str]]],
    out_dir: Path,
    *,
    quantize: str = "none",
) -> dict[str, Any]:
    """``programs``: name -> (eval module, example inputs); ``names``: name -> (input names, output names).
    Writes ``out_dir/<name>.onnx``; returns {"files": name -> file, "quantization": name -> method}."""
    torch = require("torch")
    require("onnx", purpose="ONNX export")
    files: dict[str, str] = {}
    methods: dict[str, str] = {}
    for name, (module, example) in programs.items():
        inputs, outputs = names[name]
        path = out_dir / f"{name}.onnx"
        target = path.with_suffix(".float.onnx") if quantize == "int8" else path
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)  # its fused encoder-layer op has no ONNX symbolic
        try:
            # explicit attention and cache writes (graphdistill.student.phone_ops); ONNX keeps its fused
            # LayerNormalization
            with torch.no_grad(), warnings.catch_warnings(), phone_friendly(decompose_norms=False):
                # the TorchScript exporter is deprecated in favour of dynamo=True, but gives the same graph
                # here in seconds and handles the fused attention ops; the parity gate checks the result
                warnings.filterwarnings("ignore", "You are using the legacy TorchScript", DeprecationWarning)
                torch.onnx.export(
                    module,
                    example,
                    str(target),
                    input_names=inputs,
                    output_names=outputs,
                    opset_version=OPSET,
                    dynamo=False,  # the TorchScript exporter: static shapes, fast, no onnxscript rewrites
                )
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        if quantize == "int8":  # dynamic int8: no calibration data (see graphdistill.export.quantize)
            methods[name] = quantize_onnx(target, path)
            target.unlink()
        files[name] = path.name
    return {"files": files, "quantization": methods}
