"""int8 for the two runtimes, calibrated on real training inputs.

- ExecuTorch: PT2E static quantization (torchao ``prepare_pt2e`` / ``convert_pt2e``) with ExecuTorch's
  ``XNNPACKQuantizer``: symmetric per-channel int8 weights, int8 activations into them, observers calibrated
  by running the prepared graph on calibration inputs; XNNPACK then runs the quantized ops. Element-wise ops,
  softmax and norms stay float. What is quantized depends on where the bytes are: with a trunk started from
  a YOLO detector its convolutions hold most of the bytes and the work, so they are int8 too
  (:data:`QUANTIZED_WITH_CONVS`); with a small trunk built from scratch they hold few of the bytes, and int8
  convolutions were slower than float ones on x86 CPUs without int8 dot-product instructions and moved the
  outputs more, so only the linear layers are (:data:`QUANTIZED`).
- ONNX: both programs through onnxruntime's ``quantize_dynamic`` on the matrix products and the embedding
  table (:data:`DYNAMIC_OPS`; per-channel int8 weights, activation ranges computed per call). Static QDQ over
  every op changed answers, moved boxes and broke masks against the float model on the demo student, and its
  QDQ convolutions ran slower than float; dynamic kept the answers and masks, runs faster than float and
  needs no calibration data.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from graphdistill._lazy import require
from graphdistill.export.phone_decode import NORM_MEAN
from graphdistill.student.trunks import DFL_BINS

log = logging.getLogger(__name__)

QUANTIZED = ("linear",)  # XNNPACKQuantizer pattern names quantized for ExecuTorch
# with a YOLO trunk the convolutions are most of the bytes and the work, and int8 halves their time
QUANTIZED_WITH_CONVS = ("linear", "conv")


class Int8Embedding(torch.nn.Module):
    """A student's word table stored as int8 with one float scale per word (symmetric, per row) and widened to
    float32 after the lookup: a quarter of the bytes of the largest float tensor an int8 ExecuTorch program
    would keep (XNNPACK quantizes products, not lookups; the tied output layer has its own int8 copy).
    ``weight`` is the dequantised float32 table, for code that reads it."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127.0
        self.table: torch.Tensor
        self.scale: torch.Tensor
        self.register_buffer("table", torch.round(w / scale).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)

    @property
    def weight(self) -> torch.Tensor:
        return self.table.float() * self.scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        f = torch.nn.functional
        return f.embedding(ids, self.table).float() * f.embedding(ids, self.scale)


@contextmanager
def int8_embedding(model: Any) -> Iterator[None]:
    """Within the block ``model.tok_emb`` is an :class:`Int8Embedding` of its table; the float32 embedding is
    put back after."""
    emb = model.tok_emb
    model.tok_emb = Int8Embedding(emb.weight)
    try:
        yield
    finally:
        model.tok_emb = emb


def quantize_pt2e(
    module: Any,
    example: tuple[Any, ...],
    calibration: Sequence[tuple[Any, ...]],
    patterns: tuple[str, ...] = QUANTIZED,
    float_modules: Sequence[str] = (),
) -> Any:
    """An eval ``nn.Module`` -> a torch.export-able int8 graph module (PT2E, XNNPACK quantizer) with the
    XNNPACKQuantizer patterns whose names start with one of ``patterns`` quantized, except inside the
    submodules named in ``float_modules`` (qualified names, ``"trunk.layers.8"``: it and everything under it
    stay float; mixed precision, as ``benchmarks/int8_noise.py`` uses it to find where int8 moves outputs)."""
    torch = require("torch")
    pt2e = require("torchao.quantization.pt2e.quantize_pt2e", purpose="int8 export")
    xq = require("executorch.backends.xnnpack.quantizer.xnnpack_quantizer", purpose="int8 export")

    class Quantizer(xq.XNNPACKQuantizer):  # type: ignore[misc,name-defined]
        # int8 where most of the weights are: the linear layers (see the module docstring for why not the
        # convolutions). Adds, muls and concatenations stay float: in the phone-friendly graph they carry the
        # attention biases (0 / -1e9), which one int8 scale per tensor cannot represent, and the residual
        # stream, whose range varies most; their cost is negligible next to the matmuls.
        SUPPORTED_PATTERNS = [
            p for p in xq.XNNPACKQuantizer.SUPPORTED_PATTERNS if p.name.startswith(patterns)
        ]

    quantizer = Quantizer().set_global(xq.get_symmetric_quantization_config(is_per_channel=True))
    # never observe the bool attention masks, nor anything inside float_modules
    quantizer.set_filter_function(lambda node: _float_only(node) and not _inside(node, float_modules))
    graph = torch.export.export(module, example).module()
    prepared = pt2e.prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for args in calibration:
            prepared(*args)
    return pt2e.convert_pt2e(prepared)


def _float_only(node: Any) -> bool:
    """Quantize a node only when it and every tensor it reads are floating point, and it is not one of the
    linear layers of :data:`FLOAT_ONLY`."""
    if any(name in str(a.target) for a in node.all_input_nodes for name in FLOAT_ONLY):
        return False
    vals = [node.meta.get("val")] + [a.meta.get("val") for a in node.all_input_nodes]
    return all(getattr(getattr(v, "dtype", None), "is_floating_point", True) for v in vals)


def _inside(node: Any, modules: Sequence[str]) -> bool:
    """Whether ``node`` was traced inside one of ``modules`` (qualified names) or a submodule of one."""
    if not modules:
        return False
    paths = [str(v[0]) for v in (node.meta.get("nn_module_stack") or {}).values()]
    return any(p == m or p.startswith(m + ".") for p in paths for m in modules)


# linear layers that must stay float, by the name of their weight: a layer norm's mean/variance rows
# (phone_decode.NORM_MEAN: one int8 scale for the residual stream would shift every norm) and the DFL's bin
# values 0..15 (trunks.dfl_decode: int8 would move every box side by up to 5 %)
FLOAT_ONLY = (NORM_MEAN, DFL_BINS)


# dynamic int8 for the matrix products (and the embedding table): ONNX Runtime's ConvInteger is slower than
# its float convolution on x86, and the backbone's convolutions are a small share of the bytes
DYNAMIC_OPS = ["MatMul", "Gemm", "Gather"]


def quantize_onnx(src: Path, dst: Path) -> str:
    """Float ONNX -> int8 ONNX (dynamic, :data:`DYNAMIC_OPS`). Returns the method, for the manifest."""
    q = require("onnxruntime.quantization", purpose="int8 export")
    q.quantize_dynamic(
        str(src),
        str(dst),
        weight_type=q.QuantType.QInt8,
        op_types_to_quantize=DYNAMIC_OPS,
        per_channel=True,
    )
    return "dynamic"
