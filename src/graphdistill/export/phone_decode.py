"""The answer decoder's step as a phone runs it: the same function as :meth:`Student.decode_step`, in fewer ops.

``Student.decode_step`` is the reference (eager PyTorch, the student's own ``[L, 2, B, H, T, hd]`` cache, batch
any size). Exported, every operator costs XNNPACK a fixed ~0.3-1 µs however small its tensor, and a one-token
step is nearly all such operators, so :class:`PhoneDecodeStep` computes the same numbers (batch 1) with fewer
and cheaper ones. The export's parity gate checks its answers against the reference's, token for token.

- Each layer's cached keys, cached values, cross-attention keys and cross-attention values are separate
  inputs: views of the runner's one ``kv_cache`` array and one ``cross_kv`` array, handed over without a
  copy. Picked out of one input inside the graph, they were copied at every step (~80 KB).
- Self-attention reads the cache *without* this position and takes this position's own key and value on the
  side: one softmax over ``[cached scores | own score]``, then ``probs_cached @ V_cache + p_own * v_own``. The
  cache is never written inside the graph (the masked blend that wrote it cost ~25 µs per step).
- Which cached positions exist is one row of a constant ``[T, T]`` table, looked up by ``position`` (an
  embedding lookup), instead of arange/compare/cast operators outside the XNNPACK graph.
- Every layer norm feeds a linear layer, so its scale and shift are folded into that layer (``W·diag(g)``,
  ``W·b + bias``; the final norm into the tied output embedding): ``LN(x)·W^T + c = norm(x)·(W·diag(g))^T +
  (W·b + c)``. The normalisation itself: for ExecuTorch, mean and variance as one-row linear layers (XNNPACK's
  mean needs reshapes and transposes around it); for ONNX, LayerNormalization without scale and shift.

Measured on the demo student (float XNNPACK, 1 thread, interleaved runs on a 2-core Xeon): 213 µs per step
with the reference's formulation (:mod:`.phone_ops`), 139 µs with this one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphdistill.student.config import POINTER_KEYS
from graphdistill.student.model import BOS_ID
from graphdistill.student.phone_ops import NEG

# buffers whose linear layer computes a norm's mean or variance: int8 export must leave them float
# (graphdistill.export.quantize skips linear layers whose weight is named with this prefix)
NORM_MEAN = "norm_mean"


class FoldedNorm(nn.Module):
    """``linear(layer_norm(x))`` with the norm's scale and shift folded into the linear layer's weights."""

    def __init__(self, ln: nn.LayerNorm, weight: Tensor, bias: Tensor | None, fused: bool) -> None:
        super().__init__()
        d = ln.normalized_shape[0]
        self.fused, self.eps = fused, float(ln.eps)
        with torch.no_grad():
            w = (weight * ln.weight[None, :]).detach().clone()
            b = (weight @ ln.bias + (bias if bias is not None else 0.0)).detach().clone()
        # parameters, not buffers: int8 conversion replaces a quantized parameter by its int8 copy, while an
        # unused float buffer would stay in the program (a float copy of every such weight)
        self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = nn.Parameter(b, requires_grad=False)
        self.register_buffer(NORM_MEAN, torch.full((1, d), 1.0 / d))
        self.register_buffer(NORM_MEAN + "_eps", torch.tensor([self.eps]))

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            y = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        else:
            mean_w = getattr(self, NORM_MEAN)
            xc = x - F.linear(x, mean_w)
            y = xc * torch.rsqrt(F.linear(xc * xc, mean_w, getattr(self, NORM_MEAN + "_eps")))
        return F.linear(y, self.weight, self.bias)


class PhoneDecodeStep(nn.Module):
    """``(token [1,1], position [1], cross_kv.{l}.{key,value} [1,H,M,hd] for each layer l, kv_cache.{l}.{key,value}
    [1,H,T,hd] for each layer l[, ptr_keys [1,D,K], ptr_bias [1,K], ptr_vocab [1,K,V]]) -> (scores [1,V],
    kv_new [L,2,1,H,1,hd])``: :meth:`Student.decode_step` for batch 1 with ``cross_kv``, in the inputs' order of
    :func:`input_names`. With the copy path (a student with object tokens) ``scores`` are the next token's
    probabilities (the mixture itself: its argmax is the log-probabilities' argmax, so the log is not taken);
    without it, the vocabulary logits. ``fused_norms``: ONNX's LayerNormalization; otherwise one-row linear
    layers (ExecuTorch)."""

    def __init__(self, student: Any, fused_norms: bool = False) -> None:
        super().__init__()
        cfg = student.config
        self.student = student  # the embeddings and the layers without a norm before them, as they are
        self.d, self.heads, self.hd = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.t_max, self.n_ctx, self.n_layers = cfg.max_answer_len, int(student.n_ctx), cfg.dec_layers
        t = torch.arange(self.t_max)
        # row p: 0 for the cached positions < p, NEG for p and after (this position comes in on the side)
        self.key_bias: Tensor
        self.register_buffer("key_bias", (t[None, :] >= t[:, None]).to(torch.float32) * NEG)
        self.qkv, self.q_x, self.ffn_in = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for layer in student.dec:
            if len(layer.ffn.layers) != 2:
                raise ValueError("PhoneDecodeStep expects a two-layer feed-forward block")
            self.qkv.append(FoldedNorm(layer.ln1, layer.qkv.weight, layer.qkv.bias, fused_norms))
            self.q_x.append(FoldedNorm(layer.ln2, layer.q_x.weight, layer.q_x.bias, fused_norms))
            ffn_in = layer.ffn.layers[0]
            self.ffn_in.append(FoldedNorm(layer.ln3, ffn_in.weight, ffn_in.bias, fused_norms))
        self.copy = hasattr(student, "ptr_q")
        self.cont = hasattr(student, "ptr_cont")  # the copy goes on where it left off (``ptr_next``)
        self.vocab = int(student.tok_emb.weight.shape[0])
        if self.copy:  # one linear after the final norm: [vocabulary logits | pointer query | gate (| cont)]
            extra = [student.ptr_cont] if self.cont else []
            w = torch.cat(
                [
                    student.tok_emb.weight,
                    student.ptr_q.weight,
                    student.ptr_gate.weight,
                    *(m.weight for m in extra),
                ]
            )
            b = torch.cat(
                [torch.zeros(self.vocab), student.ptr_q.bias, student.ptr_gate.bias, *(m.bias for m in extra)]
            )
            self.logits = FoldedNorm(student.dec_norm, w, b, fused_norms)
        else:
            self.logits = FoldedNorm(student.dec_norm, student.tok_emb.weight, None, fused_norms)

    def forward(self, token: Tensor, position: Tensor, *kv: Tensor) -> tuple[Tensor, Tensor]:
        s, d, h, hd, t_max, m = self.student, self.d, self.heads, self.hd, self.t_max, self.n_ctx
        n = self.n_layers
        n_ptr = len(pointer_inputs(self.copy, self.cont)) + (1 if self.cont else 0)  # + prev_token
        if len(kv) != 4 * n + n_ptr:
            raise ValueError(
                f"decode step takes {4 * n} key/value inputs (+{n_ptr} copy-path inputs), got {len(kv)}"
            )
        cross, cache = kv[: 2 * n], kv[2 * n : 4 * n]
        scale = 1.0 / math.sqrt(hd)
        x = (s.tok_emb(token) + s.a_pos(position.view(1, 1))).view(1, d)
        bias = F.embedding(position, self.key_bias).view(1, 1, t_max)  # [1, 1, T]
        follows = before = None
        if self.cont:  # the copy slots that follow one holding this token / the token before: lookups in
            # ptr_next [1,V,K] (like the embedding lookups, outside XNNPACK, before its one call)
            follows = torch.index_select(kv[4 * n + 3], 1, token.view(1))
            before = torch.index_select(kv[4 * n + 3], 1, kv[4 * n + 4].view(1))
        new = []
        for i, layer in enumerate(s.dec):
            qkv = self.qkv[i](x)
            q = (qkv[:, :d] * scale).view(h, 1, hd)
            k, v = qkv[:, d : 2 * d], qkv[:, 2 * d :]
            kh, vh = k.view(h, 1, hd), v.view(h, 1, hd)
            scores_cached = torch.bmm(q, cache[2 * i].view(h, t_max, hd).transpose(1, 2)) + bias  # [H,1,T]
            score_own = torch.bmm(q, kh.transpose(1, 2))  # [H,1,1]
            p = torch.softmax(torch.cat([scores_cached, score_own], dim=-1), dim=-1)
            att = torch.bmm(p[..., :t_max], cache[2 * i + 1].view(h, t_max, hd)) + p[..., t_max:] * vh
            x = x + layer.proj(att.view(1, d))
            qx = self.q_x[i](x).view(h, 1, hd)
            kx, vx = cross[2 * i].view(h, m, hd), cross[2 * i + 1].view(h, m, hd)
            px = torch.softmax(torch.bmm(qx, kx.transpose(1, 2)) * scale, dim=-1)
            x = x + layer.proj_x(torch.bmm(px, vx).view(1, d))
            x = x + layer.ffn.layers[1](F.gelu(self.ffn_in[i](x)))
            new.append(torch.stack([kh.view(1, h, 1, hd), vh.view(1, h, 1, hd)]))
        out = self.logits(x)
        if not self.copy:
            return out, torch.stack(new)
        ptr_keys, ptr_bias, ptr_vocab = kv[4 * n : 4 * n + 3]  # [1,D,K], [1,K], [1,K,V]
        v = self.vocab
        k = ptr_bias.shape[-1]
        q = out[:, v : v + d].view(1, 1, d)
        pointed = torch.bmm(q, ptr_keys) * (1.0 / math.sqrt(d)) + ptr_bias.view(1, 1, k)  # [1,1,K]
        if follows is not None and before is not None:  # as Student.copy_mix
            both = follows * F.pad(before[..., :-1], (1, 0))
            pointed = pointed + out[:, v + d + 1 : v + d + 2].view(1, 1, 1) * follows
            pointed = pointed + out[:, v + d + 2 :].view(1, 1, 1) * both
        w = torch.softmax(torch.cat([out[:, v + d : v + d + 1].view(1, 1, 1), pointed], dim=-1), dim=-1)
        probs = w[..., :1].view(1, 1) * torch.softmax(out[:, :v], dim=-1) + torch.bmm(
            w[..., 1:], ptr_vocab
        ).view(1, v)
        return probs, torch.stack(new)


# the copy path's per-query inputs, encode's outputs of the same names (the student's own keys); ``ptr_next``
# only for a student whose copies go on where they left off (``Student.ptr_cont``)
POINTER_INPUTS = POINTER_KEYS


def pointer_inputs(copy: bool, cont: bool = False) -> tuple[str, ...]:
    """The copy path's inputs a step takes: none, :data:`POINTER_INPUTS` without ``ptr_next``, or all."""
    return POINTER_INPUTS[: (4 if cont else 3)] if copy else ()


def input_names(n_layers: int, copy: bool = False, cont: bool = False) -> list[str]:
    """The step's inputs in order: token, position, every layer's cross-attention key and value, every
    layer's cached key and value, then (with the copy path) :func:`pointer_inputs` and, when copies go on
    where they left off, ``prev_token`` (the token read at the step before; <bos> at position 0)."""
    kinds = ("key", "value")
    return [
        "token",
        "position",
        *(f"cross_kv.{i}.{k}" for i in range(n_layers) for k in kinds),
        *(f"kv_cache.{i}.{k}" for i in range(n_layers) for k in kinds),
        *pointer_inputs(copy, cont),
        *(["prev_token"] if copy and cont else []),
    ]


def step_inputs(
    token: Tensor,
    position: Tensor,
    cross_kv: Tensor,
    kv_cache: Tensor,
    pointer: tuple[Tensor, ...] = (),
    prev_token: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """The student's ``cross_kv`` [L,2,1,H,M,hd] and ``kv_cache`` [L,2,1,H,T,hd] -> the step's inputs (views),
    followed by the copy path's ``pointer`` inputs (``ptr_keys`` [1,D,K], ``ptr_bias``, ``ptr_vocab``[,
    ``ptr_next``]) and, with ``ptr_next``, ``prev_token`` [1,1] (None: <bos>)."""
    n = cross_kv.shape[0]
    prev: tuple[Tensor, ...] = ()
    if len(pointer) == len(POINTER_INPUTS):
        prev = (torch.full_like(token, BOS_ID) if prev_token is None else prev_token,)
    return (
        token,
        position,
        *(cross_kv[i, j] for i in range(n) for j in range(2)),
        *(kv_cache[i, j] for i in range(n) for j in range(2)),
        *pointer,
        *prev,
    )
