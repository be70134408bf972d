"""The student: one small multimodal model that answers, detects, segments and cites like the teacher graph.

One readable file (nanoGPT-style); its config dataclass lives in :mod:`graphdistill.student.config`. Layout::

    image ──timm mobile backbone──► stride-16 map (fine) + stride-32 map (coarse)
    coarse tokens + question tokens + R register tokens ──joint transformer encoder──► fused
    memory = [registers (R) | fused coarse tokens (Gc) | fine pixel tokens (Gf)]        [B, M, D]

    heads(memory):   Q learned object queries ──decoder layer(s) over memory[:, :R+Gc]──►
                        boxes (cx,cy,w,h ∈ 0..1), class logits (C+1, last = no-object),
                        mask embedding · fine pixel tokens ──► mask logits (MaskFormer-style, no 3×3 conv)
                     registers ──► source logits (multi-label over KB docs) and optional embedding heads
    decode_step:     one answer token per call: reads a fixed-size KV cache [L, 2, B, H, T, hd], returns the
                     logits and this position's keys/values (the caller stores them); cross-attention over
                     memory[:, :R+Gc]

Why this shape (speed target: a whole query ≤ 30 ms eager on a 2-core CPU):
- The question is fused *into* the image tokens and R register tokens by a joint encoder, so the memory the
  decoder reads has a fixed length with no padding mask: ``decode_step`` needs no question mask and export
  sees static shapes only.
- The text decoder reads only the R + Gc context tokens (e.g. 4 + 64), not the fine tokens: per-step cost
  stays small; the fine tokens exist for the mask head only (they never enter a transformer).
- Masks are a dot product of a per-query embedding with a low-resolution pixel feature map, upsampled
  bilinearly to ``mask_size`` — a prototype spent 16–18 ms in a single 3×3 conv mask head.
- Inside a step the cache is written with ``torch.where`` on a position mask (no data-dependent indexing or
  branching), so ``decode_step`` exports as one static graph; it returns only the new position's keys/values,
  which the caller stores (a runtime then copies one cache slot per token, not the whole cache).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphdistill.student import phone_ops
from graphdistill.student.config import (  # re-exported: model.StudentConfig etc. stay importable
    DEFAULT_OUTPUTS,
    HEAD_KINDS,
    PRESETS,
    SINGLE_KINDS,
    StudentConfig,
    config_from_schema,
    outputs_from_schema,
    preset,
)

__all__ = [
    "BOS_ID",
    "DEFAULT_OUTPUTS",
    "EOS_ID",
    "HEAD_KINDS",
    "PAD_ID",
    "PRESETS",
    "SINGLE_KINDS",
    "SPECIAL_TOKENS",
    "UNK_ID",
    "Student",
    "StudentConfig",
    "StudentProtocol",
    "config_from_schema",
    "count_parameters",
    "outputs_from_schema",
    "preset",
]

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
UNK_ID = 3
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]  # ids 0..3, in this order, in every tokenizer


@runtime_checkable
class StudentProtocol(Protocol):
    """What a user-supplied ``nn.Module`` must provide to be trained (:mod:`~graphdistill.student.train`)
    AND to predict and be evaluated (:mod:`~graphdistill.student.predict`, ``graphdistill eval``).

    ``forward(image [B,3,S,S], question_ids [B,Lq], question_mask [B,Lq], answer_in [B,La])`` returns a
    dict with ``answer_logits`` [B,La,V] (when the config has a text output; causal: step t sees
    ``answer_in[:, :t+1]`` only) and any of ``boxes`` [B,Q,4] (cx,cy,w,h in 0..1), ``class_logits``
    [B,Q,C+1], ``mask_logits`` [B,Q,Hm,Wm], ``source_logits`` [B,K], ``embedding:<name>`` [B,d]. Losses
    are computed for the outputs present; predict returns an empty value for an output with no head.
    ``config`` is the StudentConfig the module was built with (``cls(config)`` rebuilds it at load): sizes
    for the data loader (image_size, max_question_len, max_answer_len, mask_size, ...) and the outputs.

    That is all predict needs: it decodes the answer greedily through ``forward`` (``answer_in`` growing by
    one token a call). Optional fast path, used by predict when present (the built-in ``Student`` has it)
    and required by ``graphdistill export``: ``encode(image, question_ids, question_mask) -> memory``,
    ``heads(memory) -> dict`` (the keys above but ``answer_logits``) and
    ``generate(image, question_ids, question_mask, max_len, memory=memory) -> ids [B,n]`` (greedy, no
    <bos>, <pad> after <eos>). ``load_student`` and training check the two required members up front.
    """

    config: StudentConfig

    def __call__(
        self, image: Tensor, question_ids: Tensor, question_mask: Tensor, answer_in: Tensor
    ) -> dict[str, Tensor]: ...


# --------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int, n_layers: int = 2) -> None:
        super().__init__()
        dims = [d_in] + [d_hidden] * (n_layers - 1) + [d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.gelu(x)
        return x


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: causal self-attention (with a cache path), cross-attention, FFN."""

    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.hd = cfg.n_heads, cfg.head_dim
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.q_x = nn.Linear(d, d)
        self.kv_x = nn.Linear(d, 2 * d)
        self.proj_x = nn.Linear(d, d)
        self.ffn = MLP(d, cfg.ffn_mult * d, d)

    def _split(self, x: Tensor) -> Tensor:  # [B,T,D] -> [B,H,T,hd]
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.hd).transpose(1, 2)

    def _merge(self, x: Tensor) -> Tensor:  # [B,H,T,hd] -> [B,T,D]
        b, _, t, _ = x.shape
        return x.transpose(1, 2).reshape(b, t, self.n_heads * self.hd)

    def cross_kv(self, mem: Tensor) -> Tensor:
        """Cross-attention keys/values of the memory, [2,B,H,M,hd]: constant over a whole answer."""
        k, v = phone_ops.chunks(self.kv_x(mem), 2)
        return torch.stack([self._split(k), self._split(v)])

    def _cross(self, x: Tensor, mem: Tensor | None, kv: Tensor | None = None) -> Tensor:
        q = self._split(self.q_x(self.ln2(x)))
        if kv is None:
            assert mem is not None, "cross-attention needs the memory or its keys/values"
            kv = self.cross_kv(mem)
        return self.proj_x(self._merge(F.scaled_dot_product_attention(q, kv[0], kv[1])))

    def forward(self, x: Tensor, mem: Tensor) -> Tensor:
        """Teacher-forced pass over a whole sequence (causal)."""
        q, k, v = (self._split(t) for t in self.qkv(self.ln1(x)).chunk(3, dim=-1))
        x = x + self.proj(self._merge(F.scaled_dot_product_attention(q, k, v, is_causal=True)))
        x = x + self._cross(x, mem)
        return x + self.ffn(self.ln3(x))

    def step(
        self,
        x: Tensor,
        mem: Tensor | None,
        k_cache: Tensor,
        v_cache: Tensor,
        write: Tensor,
        valid: Tensor,
        cross: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One token ``x`` [B,1,D]; caches [B,H,T,hd] (read, not changed); ``write`` [b,1,T,1] bool, True at
        this position; ``valid`` [b,1,1,T] bool, positions ≤ this one. Returns (x, this position's key
        [B,H,1,hd], its value [B,H,1,hd]): attention sees the caches with them written in, but storing them is
        the caller's job. (Exported, the step is :class:`~graphdistill.student.phone_decode.PhoneDecodeStep`.)"""
        q, k, v = (self._split(t) for t in self.qkv(self.ln1(x)).chunk(3, dim=-1))
        k_all = torch.where(write, k, k_cache)  # static-shape write of a copy (no indexing)
        v_all = torch.where(write, v, v_cache)
        att = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=valid)
        x = x + self.proj(self._merge(att))
        x = x + self._cross(x, mem, cross)
        return x + self.ffn(self.ln3(x)), k, v

    def step_eager(self, x: Tensor, i: int, k_cache: Tensor, v_cache: Tensor, cross: Tensor) -> Tensor:
        """:meth:`step` for eager inference, same numbers in about a third of the ops: the cache is written
        in place at the Python position ``i`` and attention reads only positions ``0..i`` (no mask), so
        nothing here is static-shape or exportable. Caches [B,H,T,hd]; ``cross`` [2,B,H,M,hd]."""
        b = x.shape[0]
        qkv = self.qkv(self.ln1(x)).view(b, 1, 3, self.n_heads, self.hd).permute(2, 0, 3, 1, 4)
        k_cache[:, :, i : i + 1].copy_(qkv[1])
        v_cache[:, :, i : i + 1].copy_(qkv[2])
        att = F.scaled_dot_product_attention(qkv[0], k_cache[:, :, : i + 1], v_cache[:, :, : i + 1])
        x = x + self.proj(att.transpose(1, 2).reshape(b, 1, -1))
        q = self.q_x(self.ln2(x)).view(b, 1, self.n_heads, self.hd).transpose(1, 2)
        att = F.scaled_dot_product_attention(q, cross[0], cross[1])
        x = x + self.proj_x(att.transpose(1, 2).reshape(b, 1, -1))
        return x + self.ffn(self.ln3(x))


# --------------------------------------------------------------------------------------------------------
# The student
# --------------------------------------------------------------------------------------------------------


class Student(nn.Module):
    """See the module docstring. All methods are static-shape; no Python branches on tensor values."""

    def __init__(self, config: StudentConfig) -> None:
        super().__init__()
        import timm

        cfg = self.config = config
        d = cfg.d_model
        self.backbone = timm.create_model(
            cfg.backbone, pretrained=False, features_only=True, out_indices=(-2, -1)
        )
        info: Any = self.backbone.feature_info
        reductions = info.reduction()
        if list(reductions) != [16, 32]:
            raise ValueError(
                f"backbone {cfg.backbone!r} must give stride 16 and 32 features, got {reductions}"
            )
        c_fine, c_coarse = info.channels()
        self.grid_c = cfg.image_size // 32
        self.grid_f = cfg.image_size // 16
        self.n_ctx = cfg.num_registers + self.grid_c**2  # memory tokens the decoders read

        # fine pixel tokens exist for the mask head only: without it the memory is [registers | coarse]
        self.memory_len = self.n_ctx + (self.grid_f**2 if cfg.has_masks else 0)

        self.coarse_proj = nn.Linear(c_coarse, d)
        if cfg.has_masks:
            self.fine_proj = nn.Linear(c_fine, d)
        self.coarse_pos = nn.Parameter(torch.zeros(1, self.grid_c**2, d))
        if cfg.has_masks:
            self.fine_pos = nn.Parameter(torch.zeros(1, self.grid_f**2, d))
        self.registers = nn.Parameter(torch.zeros(1, cfg.num_registers, d))
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)  # shared by question encoder, decoder input and output
        self.q_pos = nn.Parameter(torch.zeros(1, cfg.max_question_len, d))
        if cfg.has_text:
            self.a_pos = nn.Embedding(cfg.max_answer_len, d)
        self.type_emb = nn.Parameter(torch.zeros(3, d))  # register / image / question
        enc_layer = nn.TransformerEncoderLayer(
            d,
            cfg.n_heads,
            cfg.ffn_mult * d,
            cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(enc_layer, cfg.enc_layers, enable_nested_tensor=False)
        self.enc_norm = nn.LayerNorm(d)
        if cfg.has_masks:
            self.fine_mix = nn.Linear(d, d)  # fused coarse tokens, upsampled, added to fine tokens (FPN-lite)

        # object heads (OBJECTS or DETECTIONS output; the mask head for OBJECTS only)
        if cfg.has_objects:
            self.queries = nn.Parameter(torch.zeros(1, cfg.num_queries, d))
            det_layer = nn.TransformerDecoderLayer(
                d,
                cfg.n_heads,
                cfg.ffn_mult * d,
                cfg.dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            self.det_decoder = nn.TransformerDecoder(det_layer, cfg.det_layers)
            self.det_norm = nn.LayerNorm(d)
            self.box_head = MLP(d, d, 4, n_layers=3)
            self.class_head = nn.Linear(d, cfg.num_classes + 1)
        if cfg.has_masks:
            self.mask_embed = MLP(d, d, d)
            self.pixel_proj = nn.Linear(d, d)
        # summary heads
        if cfg.has_sources:
            self.source_head = MLP(d, d, cfg.num_sources)
        self.embedding_heads = nn.ModuleDict({k: nn.Linear(d, v) for k, v in cfg.embedding_dims.items()})
        # answer decoder
        if cfg.has_text:
            self.dec = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
            self.dec_norm = nn.LayerNorm(d)
        self._init()

    def _init(self) -> None:
        cfg = self.config
        params = [self.coarse_pos, self.registers, self.q_pos, self.type_emb]
        if cfg.has_masks:
            params.insert(1, self.fine_pos)
        if cfg.has_objects:
            params.insert(-1, self.queries)
        for p in params:
            nn.init.normal_(p, std=0.02)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        if cfg.has_text:
            nn.init.normal_(self.a_pos.weight, std=0.02)
        if cfg.has_objects:
            with torch.no_grad():  # start boxes near a mid-sized centred box and "no object" favoured
                last = self.box_head.layers[-1]
                assert isinstance(last, nn.Linear)
                last.bias.copy_(torch.tensor([0.0, 0.0, -1.0, -1.0]))
                self.class_head.bias[-1] = 2.0

    def _need_text(self, what: str) -> None:
        if not self.config.has_text:
            raise RuntimeError(
                f"Student.{what}: this student has no text head (its teacher graph declares no TEXT output; "
                f"outputs: {self.config.outputs})"
            )

    # ---- export-facing API ------------------------------------------------------------------------------

    def encode(self, image: Tensor, question_ids: Tensor, question_mask: Tensor) -> Tensor:
        """image [B,3,S,S] normalised, question_ids [B,Lq] int64, question_mask [B,Lq] bool (True = token)
        -> memory [B, R + Gc + Gf, D] (``[B, R + Gc, D]`` without a mask head: see ``memory_len``)."""
        b = image.shape[0]
        fine, coarse = self.backbone(image)
        coarse_t = self.coarse_proj(coarse.flatten(2).transpose(1, 2)) + self.coarse_pos + self.type_emb[1]
        lq = question_ids.shape[1]
        q_t = self.tok_emb(question_ids) + self.q_pos[:, :lq] + self.type_emb[2]
        regs = self.registers.expand(b, -1, -1) + self.type_emb[0]
        x = torch.cat([regs, coarse_t, q_t], dim=1)
        if phone_ops.active():  # the same layers, with an additive key bias instead of a bool mask
            keep = torch.zeros(b, self.n_ctx, dtype=x.dtype, device=image.device)
            pad_bias = (question_mask == 0).to(x.dtype) * phone_ops.NEG
            bias = torch.cat([keep, pad_bias], dim=1).view(b, 1, 1, -1)
            last = len(self.encoder.layers) - 1
            for i, layer in enumerate(self.encoder.layers):
                # only the context tokens leave the encoder: in the last layer the question tokens are keys
                # and values, nothing is computed for them as queries
                x = phone_ops.encoder_layer(layer, x, bias, n_out=self.n_ctx if i == last else None)
            x = phone_ops.layer_norm(self.enc_norm, x)
        else:
            keep_b = torch.ones(b, self.n_ctx, dtype=torch.bool, device=image.device)
            pad = ~torch.cat([keep_b, question_mask.to(torch.bool)], dim=1)  # True = ignore (PyTorch's way)
            x = self.enc_norm(self.encoder(x, src_key_padding_mask=pad))
        # phone-friendly, the last layer returned the context tokens only (a no-op slice exports as a copy)
        ctx = x if x.shape[1] == self.n_ctx else x[:, : self.n_ctx]
        if not self.config.has_masks:
            return ctx
        # fine pixel tokens: projected stride-16 features + upsampled fused coarse tokens (question-aware)
        g = self.grid_c
        # fine_mix (a linear map) commutes with bilinear upsampling, whose weights sum to 1: it mixes the Gc
        # coarse tokens before upsampling, not the Gf upsampled ones
        coarse_ctx = self.fine_mix(ctx[:, self.config.num_registers :])
        up = coarse_ctx.transpose(1, 2).reshape(b, -1, g, g)
        up = F.interpolate(up, size=(self.grid_f, self.grid_f), mode="bilinear", align_corners=False)
        fine_t = self.fine_proj(fine.flatten(2).transpose(1, 2)) + self.fine_pos
        fine_t = fine_t + up.flatten(2).transpose(1, 2)
        return torch.cat([ctx, fine_t], dim=1)

    def heads(self, memory: Tensor) -> dict[str, Tensor]:
        """memory -> boxes [B,Q,4] (cx,cy,w,h ∈ 0..1), class_logits [B,Q,C+1], mask_logits [B,Q,Hm,Wm],
        source_logits [B,K] and ``embedding:<name>`` [B,d] — only the keys whose head exists (the config's
        ``outputs``): no boxes/class_logits without an OBJECTS/DETECTIONS output, no mask_logits without
        OBJECTS, no source_logits without SOURCES."""
        cfg = self.config
        b = memory.shape[0]
        ctx = memory[:, : self.n_ctx]
        out: dict[str, Tensor] = {}
        if cfg.has_objects:
            h = self.queries.expand(b, -1, -1)
            if phone_ops.active():
                for layer in self.det_decoder.layers:
                    h = phone_ops.decoder_layer(layer, h, ctx)
                h = phone_ops.layer_norm(self.det_norm, h)
            else:
                h = self.det_norm(self.det_decoder(h, ctx))
            out["boxes"] = self.box_head(h).sigmoid()
            out["class_logits"] = self.class_head(h)
            if cfg.has_masks:
                pix = self.pixel_proj(memory[:, self.n_ctx :])  # [B,Gf²,D]
                m = torch.einsum("bqd,bpd->bqp", self.mask_embed(h), pix) / math.sqrt(cfg.d_model)
                m = m.reshape(b, cfg.num_queries, self.grid_f, self.grid_f)
                m = F.interpolate(
                    m, size=(cfg.mask_size, cfg.mask_size), mode="bilinear", align_corners=False
                )
                out["mask_logits"] = m
        summary = phone_ops.mean_tokens(ctx[:, : cfg.num_registers])
        if cfg.has_sources:
            out["source_logits"] = self.source_head(summary)
        for name, head in self.embedding_heads.items():
            out[f"embedding:{name}"] = head(summary)
        return out

    def empty_cache(self, batch: int, device: torch.device | None = None) -> Tensor:
        self._need_text("empty_cache")
        cfg = self.config
        return torch.zeros(
            cfg.dec_layers, 2, batch, cfg.n_heads, cfg.max_answer_len, cfg.head_dim, device=device
        )

    def cross_kv(self, memory: Tensor) -> Tensor:
        """Every decoder layer's cross-attention keys/values, [L,2,B,H,R+Gc,hd]; compute once per query
        and pass to :meth:`decode_step` to skip re-projecting the memory at every token."""
        self._need_text("cross_kv")
        ctx = memory[:, : self.n_ctx]
        return torch.stack([layer.cross_kv(ctx) for layer in self.dec if isinstance(layer, DecoderLayer)])

    def decode_step(
        self,
        token: Tensor,
        position: Tensor,
        memory: Tensor | None,
        kv_cache: Tensor,
        cross_kv: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """token [B,1] int64, position [B,1] or [1] int64 (0 = the <bos> slot), memory [B,M,D],
        kv_cache [L,2,B,H,T,hd] holding positions < ``position``, optional cross_kv from :meth:`cross_kv`
        (same result, faster) -> (next-token logits [B,V], ``kv_new`` [L,2,B,H,1,hd]: this position's keys and
        values). The cache is only read: the caller stores ``kv_new`` at ``position`` (:meth:`write_kv`) before
        the next step, so a runtime passes a small tensor out per token instead of copying the whole cache.
        ``memory`` may be None when ``cross_kv`` is given."""
        self._need_text("decode_step")
        if memory is None and cross_kv is None:
            raise ValueError("decode_step needs the memory or its cross_kv")
        t_max = self.config.max_answer_len
        pos = position.reshape(-1, 1)  # [b,1], b ∈ {1, B}
        x = self.tok_emb(token) + self.a_pos(pos)
        ar = torch.arange(t_max, device=token.device).view(1, t_max)
        write = (ar == pos).view(-1, 1, t_max, 1)
        valid = (ar <= pos).view(-1, 1, 1, t_max)
        ctx = None if memory is None else memory[:, : self.n_ctx]
        new = []
        for i, layer in enumerate(self.dec):
            assert isinstance(layer, DecoderLayer)
            cross = None if cross_kv is None else cross_kv[i]
            x, k, v = layer.step(x, ctx, kv_cache[i, 0], kv_cache[i, 1], write, valid, cross)
            new.append(torch.stack([k, v]))
        logits = F.linear(self.dec_norm(x[:, 0]), self.tok_emb.weight)  # tied embedding
        return logits, torch.stack(new)

    @staticmethod
    def write_kv(kv_cache: Tensor, kv_new: Tensor, position: Tensor) -> Tensor:
        """``kv_cache`` [L,2,B,H,T,hd] with :meth:`decode_step`'s ``kv_new`` [L,2,B,H,1,hd] stored at
        ``position`` ([1] or [B,1]); a new tensor, the input is left as it was."""
        t_max = kv_cache.shape[4]
        at = torch.arange(t_max, device=kv_cache.device).view(1, t_max) == position.reshape(-1, 1)
        return torch.where(at.view(1, 1, -1, 1, t_max, 1), kv_new, kv_cache)

    def _decode_eager(self, token: Tensor, i: int, kv_cache: Tensor, cross_kv: Tensor) -> Tensor:
        """:meth:`decode_step` for eager generation: writes ``kv_cache`` in place, returns the logits."""
        x = self.tok_emb(token) + self.a_pos.weight[i]
        for layer, kv, cross in zip(self.dec, kv_cache, cross_kv, strict=True):
            assert isinstance(layer, DecoderLayer)
            x = layer.step_eager(x, i, kv[0], kv[1], cross)
        return F.linear(self.dec_norm(x[:, 0]), self.tok_emb.weight)

    def decode_full(self, answer_in: Tensor, memory: Tensor) -> Tensor:
        """Teacher forcing: answer_in [B,La] -> logits [B,La,V] (no cache)."""
        self._need_text("decode_full")
        la = answer_in.shape[1]
        x = self.tok_emb(answer_in) + self.a_pos.weight[:la]
        ctx = memory[:, : self.n_ctx]
        for layer in self.dec:
            x = layer(x, ctx)
        return self.dec_norm(x) @ self.tok_emb.weight.T

    def forward(
        self, image: Tensor, question_ids: Tensor, question_mask: Tensor, answer_in: Tensor
    ) -> dict[str, Tensor]:
        memory = self.encode(image, question_ids, question_mask)
        out = self.heads(memory)
        if self.config.has_text:
            out["answer_logits"] = self.decode_full(answer_in, memory)
        return out

    @torch.no_grad()
    def generate(
        self,
        image: Tensor,
        question_ids: Tensor,
        question_mask: Tensor,
        max_len: int | None = None,
        *,
        memory: Tensor | None = None,
        use_cache: bool = True,
        stop_at_eos: bool = True,
    ) -> Tensor:
        """Greedy answer ids [B, max_len] (without <bos>); after <eos> every position is <pad>.
        ``use_cache=False`` recomputes the whole prefix each step (the reference the cache must match);
        ``stop_at_eos=False`` always runs all ``max_len`` steps (benchmarks: a fixed answer length)."""
        self._need_text("generate")
        t_max = self.config.max_answer_len
        n = min(max_len or t_max - 1, t_max - 1)
        if memory is None:
            memory = self.encode(image, question_ids, question_mask)
        b = memory.shape[0]
        dev = memory.device
        tok = torch.full((b, 1), BOS_ID, dtype=torch.long, device=dev)
        seq = tok
        cache = self.empty_cache(b, dev)
        cross = self.cross_kv(memory) if use_cache else None
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        out = []
        for i in range(n):
            if use_cache:
                assert cross is not None
                logits = self._decode_eager(tok, i, cache, cross)
            else:
                logits = self.decode_full(seq, memory)[:, -1]
            nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, PAD_ID), nxt)
            out.append(nxt)
            done = done | (nxt == EOS_ID)
            tok = nxt.view(b, 1)
            if not use_cache:
                seq = torch.cat([seq, tok], dim=1)
            if stop_at_eos and bool(done.all()):
                break
        ids = torch.stack(out, dim=1)
        if ids.shape[1] < n:
            ids = F.pad(ids, (0, n - ids.shape[1]), value=PAD_ID)
        return ids


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
