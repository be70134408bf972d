"""Phone-friendly formulations of the student's layers, used while a program is traced for export.

In eager PyTorch the student uses the fused ops (``F.layer_norm``, ``scaled_dot_product_attention``,
``nn.TransformerEncoderLayer``). Traced for ExecuTorch, those become operators XNNPACK does not take: every
layer norm, every boolean attention mask (``where``/``logical_not``/``any``) and every cache write by ``where``
then runs in ExecuTorch's portable kernels and splits the XNNPACK graph into many small delegate calls. For a
decoder this small, that per-call overhead, not arithmetic, is most of a decode step.

Inside :func:`phone_friendly` the same parameters compute the same function with operators XNNPACK does take:

- layer norm as ``mean``/``sub``/``mul``/``rsqrt`` over a ``[1, N, D, 1]`` view (XNNPACK's ``mean.dim`` takes
  only the two innermost dims of a 4-D tensor) — only when ``decompose_norms`` (ONNX has a fused
  LayerNormalization and keeps it);
- attention as ``matmul``/``softmax``/``matmul`` with an additive float bias instead of a boolean mask.

The answer decoder's step is exported as :class:`graphdistill.export.phone_decode.PhoneDecodeStep`, which goes
further for the one-token case (no cache write inside the graph, norms folded into the next linear layer).

The export's parity gate compares the traced program with the eager model, so the two stay equal.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NEG = -1e9  # additive bias of a masked attention position (exp underflows to exactly 0)


@dataclass
class _Mode:
    on: bool = False
    decompose_norms: bool = False


_state = threading.local()


def _mode() -> _Mode:
    mode = getattr(_state, "mode", None)
    if mode is None:
        mode = _state.mode = _Mode()
    return mode


@contextmanager
def phone_friendly(decompose_norms: bool = True) -> Iterator[None]:
    """Trace the student with the formulations above (for this thread, until the block ends), and, when
    Ultralytics is loaded (a trunk started from a YOLO detector), its blocks too (:func:`ultralytics_blocks`)."""
    mode = _mode()
    saved = (mode.on, mode.decompose_norms)
    mode.on, mode.decompose_norms = True, decompose_norms
    try:
        with ultralytics_blocks():
            yield
    finally:
        mode.on, mode.decompose_norms = saved


# --------------------------------------------------------------------------------------------------------
# Ultralytics' blocks, as XNNPACK takes them
# --------------------------------------------------------------------------------------------------------
# A YOLO trunk traced as Ultralytics writes it leaves ~70 nodes outside XNNPACK in ~17 pieces: channel splits
# (``chunk``/``split`` -> ``split_with_sizes``) in every C2f/C3k2/C2PSA block and C2PSA's 4-D attention
# matmuls (-> ``expand_copy``). The same arithmetic with slices and 3-D ``bmm`` is delegated whole. These
# forwards replace the classes' own while a program is traced (class attributes: the export holds no teacher
# running in another thread), and are checked against Ultralytics' own by the parity gate and the tests.


def _c2f_forward(self: Any, x: Tensor) -> Tensor:
    t = self.cv1(x)
    y = [t[:, : self.c], t[:, self.c :]]
    y.extend(m(y[-1]) for m in self.m)
    out: Tensor = self.cv2(torch.cat(y, 1))
    return out


def _c2psa_forward(self: Any, x: Tensor) -> Tensor:
    t = self.cv1(x)
    out: Tensor = self.cv2(torch.cat((t[:, : self.c], self.m(t[:, self.c :])), 1))
    return out


def _attention_forward(self: Any, x: Tensor) -> Tensor:
    b, c, h, w = x.shape
    n, heads, kd = h * w, self.num_heads, self.key_dim
    qkv = self.qkv(x).view(b * heads, 2 * kd + self.head_dim, n)
    q, k, v = qkv[:, :kd], qkv[:, kd : 2 * kd], qkv[:, 2 * kd :]
    attn = torch.bmm((q * self.scale).transpose(1, 2), k).softmax(dim=-1)  # [B*heads, N, N]
    out = torch.bmm(v, attn.transpose(1, 2)).view(b, c, h, w) + self.pe(v.reshape(b, c, h, w))
    return self.proj(out)  # type: ignore[no-any-return]


@contextmanager
def ultralytics_blocks() -> Iterator[None]:
    """Ultralytics' C2f (and so C3k2), C2PSA and Attention blocks with :func:`_c2f_forward`,
    :func:`_c2psa_forward` and :func:`_attention_forward` until the block ends; nothing when Ultralytics is
    not imported."""
    import sys

    block = sys.modules.get("ultralytics.nn.modules.block")
    if block is None:
        yield
        return
    swaps = [(block.C2f, _c2f_forward), (block.C2PSA, _c2psa_forward), (block.Attention, _attention_forward)]
    saved = [(cls, cls.__dict__["forward"]) for cls, _ in swaps]
    try:
        for cls, fn in swaps:
            cls.forward = fn
        yield
    finally:
        for cls, fn in saved:
            cls.forward = fn


def active() -> bool:
    return _mode().on


def layer_norm(ln: nn.LayerNorm, x: Tensor) -> Tensor:
    """``ln(x)``; decomposed into XNNPACK-supported ops inside ``phone_friendly(decompose_norms=True)``."""
    mode = _mode()
    if not (mode.on and mode.decompose_norms):
        plain: Tensor = ln(x)
        return plain
    d = x.shape[-1]
    x4 = x.reshape(1, -1, d, 1)
    mu = x4.mean(dim=(2, 3), keepdim=True)
    xc = x4 - mu
    var = (xc * xc).mean(dim=(2, 3), keepdim=True)
    y = (xc * torch.rsqrt(var + ln.eps)).reshape(x.shape)
    return y * ln.weight + ln.bias


def mean_tokens(x: Tensor) -> Tensor:
    """``x.mean(dim=1)`` for [B, T, D]; as a mean over the two innermost dims of a [B, D, T, 1] view, keeping
    them, when phone-friendly (the only ``mean.dim`` XNNPACK takes)."""
    if not active():
        return x.mean(dim=1)
    b, t, d = x.shape
    return x.transpose(1, 2).reshape(b, d, t, 1).mean(dim=(2, 3), keepdim=True).reshape(b, d)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Softmax attention, [B,H,Tq,hd] x [B,H,Tk,hd]. ``mask``: bool (True = attend) or a float bias added to
    the scores (0 or :data:`NEG`); phone-friendly code passes the float form. The explicit form uses 3-D
    ``bmm`` (a 4-D ``matmul`` traces to ``expand_copy`` copies outside XNNPACK)."""
    if not active():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    b, h, tq, hd = q.shape
    tk = k.shape[2]
    scores = torch.bmm(q.reshape(b * h, tq, hd), k.reshape(b * h, tk, hd).transpose(1, 2))
    scores = scores.view(b, h, tq, tk) * (1.0 / math.sqrt(hd))
    if mask is not None:
        scores = scores + (mask if mask.is_floating_point() else (~mask).to(q.dtype) * NEG)
    probs = torch.softmax(scores, dim=-1).view(b * h, tq, tk)
    return torch.bmm(probs, v.reshape(b * h, tk, hd)).view(b, h, tq, hd)


def chunks(x: Tensor, n: int) -> list[Tensor]:
    """``x.chunk(n, -1)``; as slices when phone-friendly (``split_with_sizes`` is not an XNNPACK op)."""
    if not active():
        return list(x.chunk(n, dim=-1))
    size = x.shape[-1] // n
    return [x[..., i * size : (i + 1) * size] for i in range(n)]


def _split(x: Tensor, heads: int) -> Tensor:  # [B,T,D] -> [B,H,T,hd]
    b, t, d = x.shape
    return x.view(b, t, heads, d // heads).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:  # [B,H,T,hd] -> [B,T,D]
    b, h, t, hd = x.shape
    return x.transpose(1, 2).reshape(b, t, h * hd)


def _mha(
    mha: nn.MultiheadAttention, x: Tensor, mem: Tensor, bias: Tensor | None, n_queries: int | None = None
) -> Tensor:
    """``nn.MultiheadAttention`` (batch_first, packed in-projection) with explicit attention. The packed
    projection is applied whole and its output sliced: a linear on a *slice* of a weight is not a constant
    weight, and XNNPACK would leave it to a portable ``addmm``. ``n_queries``: self-attention for the first
    ``n_queries`` tokens of ``x`` only (all of them keys and values)."""
    w, b = mha.in_proj_weight, mha.in_proj_bias
    assert w is not None and b is not None
    if x is mem:
        q, k, v = chunks(F.linear(x, w, b), 3)
        if n_queries is not None:
            q = q[:, :n_queries]
    else:
        q = chunks(F.linear(x, w, b), 3)[0]
        _, k, v = chunks(F.linear(mem, w, b), 3)
    h = mha.num_heads
    out = attention(_split(q, h), _split(k, h), _split(v, h), bias)
    proj: Tensor = mha.out_proj(_merge(out))
    return proj


def _ffn(layer: nn.TransformerEncoderLayer | nn.TransformerDecoderLayer, x: Tensor) -> Tensor:
    out: Tensor = layer.linear2(F.gelu(layer.linear1(x)))
    return out


def encoder_layer(
    layer: nn.TransformerEncoderLayer, x: Tensor, bias: Tensor | None, n_out: int | None = None
) -> Tensor:
    """A ``norm_first``, GELU, eval-mode ``nn.TransformerEncoderLayer``; ``bias`` [B,1,1,T] on the keys.
    ``n_out``: compute the output of the first ``n_out`` tokens only (every token is still a key and value):
    the layer's result for those tokens is unchanged, the rest is never computed."""
    h = layer_norm(layer.norm1, x)
    if n_out is None:
        x = x + _mha(layer.self_attn, h, h, bias)
    else:
        x = x[:, :n_out] + _mha(layer.self_attn, h, h, bias, n_queries=n_out)
    return x + _ffn(layer, layer_norm(layer.norm2, x))


def decoder_layer(layer: nn.TransformerDecoderLayer, x: Tensor, mem: Tensor) -> Tensor:
    """A ``norm_first``, GELU, eval-mode ``nn.TransformerDecoderLayer`` without masks."""
    h = layer_norm(layer.norm1, x)
    x = x + _mha(layer.self_attn, h, h, None)
    x = x + _mha(layer.multihead_attn, layer_norm(layer.norm2, x), mem, None)
    return x + _ffn(layer, layer_norm(layer.norm3, x))
