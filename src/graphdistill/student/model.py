"""The student: one small multimodal model that answers, detects, segments and cites like the teacher graph.

One readable file (nanoGPT-style); its config lives in :mod:`graphdistill.student.config`, its vision trunks in
:mod:`graphdistill.student.trunks`. Layout::

    image ──trunk──► P3, P4, P5 (strides 8/16/32)
      dense head on every cell of P3..P5: box distributions (DFL) + class logits + mask coefficients
      ──► in-graph selection: best cells, Fast NMS (same class, IoU > nms_iou), the top max_objects kept
          ──► objects: boxes, scores, classes, masks = coefficients · prototypes (P3 → stride 4), cut to the box
    object tokens   class embedding + box + score (+ the P4 feature at the box centre)   [B, K, D]
    joint encoder   [registers R | (image tokens: P5 cells) | object tokens K | question tokens]; its last layer
                    a weight-shared block run r = 1..max_depth times (recurrent depth; 1 by default)
    context         [registers | image | objects] ──► answer decoder (cross-attention), sources head (registers)
    answer          a pointer-generator decoder: each step mixes its vocabulary distribution with a copy
                    distribution over the object tokens (copying an object emits its class name's token)

Why this shape:
- **It starts from what the teacher knows.** When the graph's detector is an Ultralytics YOLO, the trunk and the
  dense head ARE that detector (``trunk="ultralytics"``): before any training the student already finds the
  teacher's objects at its own input size, and training adapts it densely, as the detector was trained
  (task-aligned one-to-many assignment, DFL), plus the detector's own per-cell outputs as soft targets.
- **Text grounded in its own objects.** The answer and the sources read object tokens built from the
  student's detections (class, box, score), so they carry to classes no training photo showed; the copy path
  lets the decoder name a detected class that no training answer named. During training the object tokens
  are the teacher's objects (teacher forcing; counterfactual replays relabel them), at inference the
  student's own, selected in the same graph (static shapes throughout: exportable as one program).
- **Masks class-agnostic inside the box** (YOLACT): prototypes learnt from the teacher's SAM masks carry to
  any class; the phone computes ``K × num_masks × (S/4)²`` multiply-adds for them.
- **The text reads pixels only when the teacher's answer does** (``text_pixels``, from the graph's dataflow:
  ``GraphSchema.reads_pixels``). visual_rag's LLM reads the detections, the question and text-retrieved facts,
  so its student's text reads the object tokens and the question only: nothing of the look of the few
  training photos to learn, and 24 context tokens instead of 220. The parts in brackets above are then absent.
- The text and mask branches read the trunk's features detached: their losses never bend the detector (on a
  few hundred photos, letting the mask loss train the neck cost the detector fidelity on unseen photos).
- ``decode_step`` reads a fixed-size KV cache ``[L, 2, B, H, T, hd]`` and returns this position's keys/values
  (the caller stores them), so it exports as one static graph.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphdistill.runner.bundle import greedy_token
from graphdistill.student import phone_ops
from graphdistill.student.config import (  # re-exported: model.StudentConfig etc. stay importable
    DEFAULT_OUTPUTS,
    HEAD_KINDS,
    POINTER_KEYS,
    PRESETS,
    SINGLE_KINDS,
    StudentConfig,
    config_from_schema,
    outputs_from_schema,
    preset,
)
from graphdistill.student.trunks import (
    DFL_BINS,
    STRIDES,
    CoefHead,
    Proto,
    TimmTrunk,
    UltralyticsTrunk,
    dfl_decode,
    make_anchors,
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
OBJECT_KEYS = ("obj_classes", "obj_boxes", "obj_scores", "obj_valid")  # teacher-forced object tokens
CONT_PRIOR = 2.0  # ptr_cont's starting bias: a copy goes on where it left off, until training says otherwise


@runtime_checkable
class StudentProtocol(Protocol):
    """What a user-supplied ``nn.Module`` must provide to be trained (:mod:`~graphdistill.student.train`)
    AND to predict and be evaluated (:mod:`~graphdistill.student.predict`, ``graphdistill eval``).

    ``forward(image [B,3,S,S], question_ids [B,Lq], question_mask [B,Lq], answer_in [B,La], objects=None)``
    returns a dict with ``answer_logits`` [B,La,V] (scores or log-probabilities; causal: step t sees
    ``answer_in[:, :t+1]`` only) when the config has a text output, and any of: the objects the module keeps,
    ``boxes`` [B,K,4] (cx,cy,w,h in 0..1 of the letterboxed canvas), ``scores`` [B,K], ``classes`` [B,K]
    (int), ``keep`` [B,K] (bool), ``mask_logits`` [B,K,Hm,Wm] (over the whole canvas; pasted inside the box);
    ``source_logits`` [B,K]; ``embedding:<name>`` [B,d]; and, for training a dense detector, ``det_dist``
    [B,4·reg_max,A], ``det_cls`` [B,C,A], ``det_coef`` [B,M,A], ``protos`` [B,M,Hp,Wp], ``det_anchors``
    [A,2], ``det_strides`` [A,1] (see :mod:`~graphdistill.student.losses`). ``objects`` (training) is the
    teacher's objects as tensors (``obj_classes``, ``obj_boxes``, ``obj_scores``, ``obj_valid``) for a module
    whose text reads objects. Losses are computed for the outputs present; predict returns an empty value for
    an output with no head. ``config`` is the StudentConfig the module was built with (``cls(config)``
    rebuilds it at load).

    That is all predict needs: it decodes the answer greedily through ``forward``. Optional fast path, used by
    predict when present (the built-in ``Student`` has it) and required by ``graphdistill export``:
    ``encode(image, question_ids, question_mask) -> dict`` (the keys above but ``answer_logits``, plus
    ``memory``) and ``generate(image, question_ids, question_mask, max_len, encoded=encoded) -> ids [B,n]``
    (greedy, no <bos>, <pad> after <eos>).
    """

    config: StudentConfig

    def __call__(
        self, image: Tensor, question_ids: Tensor, question_mask: Tensor, answer_in: Tensor
    ) -> dict[str, Tensor]: ...


@runtime_checkable
class ExportableStudent(StudentProtocol, Protocol):
    """A student with the fast path (see :class:`StudentProtocol`): ``encode`` once per query, and
    ``generate`` the answer from what it encoded. ``predict`` uses it when a module has it, and ``graphdistill
    export`` needs it (the exported programs are ``encode`` and one decode step)."""

    def encode(
        self, image: Tensor, question_ids: Tensor, question_mask: Tensor, *, depth: int = 1
    ) -> dict[str, Tensor]: ...

    def generate(
        self,
        image: Tensor,
        question_ids: Tensor,
        question_mask: Tensor,
        max_len: int | None = None,
        *,
        encoded: dict[str, Tensor] | None = None,
    ) -> Tensor: ...


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


def first_of_class(classes: Tensor, valid: Tensor) -> Tensor:
    """[B,K] bool: a valid slot whose class no earlier valid slot has (a label once, as the retriever's query
    lists it)."""
    same = (classes[:, :, None] == classes[:, None, :]) & valid[:, None, :].to(torch.bool)  # [B,j,i]
    earlier = torch.ones(classes.shape[1], classes.shape[1], device=classes.device).tril(-1).to(torch.bool)
    return valid.to(torch.bool) & ~(same & earlier).any(-1)


def mentioned(words: Tensor, question_ids: Tensor, question_mask: Tensor) -> Tensor:
    """[B,K] float: 1 where ``words`` [B,K] (token ids; <pad>/<unk> never count) is one of the question's
    tokens, else 0. The reading-comprehension "exact match" feature: the object or the document the question
    asks about ("I think I spot a spoon", "How many ties are there?") is the one the answer names first."""
    same = (words[:, :, None] == question_ids[:, None, :]) & question_mask[:, None, :].to(torch.bool)
    return same.to(torch.float32).amax(-1) * (words > UNK_ID).to(torch.float32)


def document_table(doc_tokens: list[list[int]], num_docs: int, vocab_size: int) -> tuple[Tensor, Tensor]:
    """The documents' token ids [N, L] (``PAD_ID`` after each) and each token's inverse document frequency
    over them [V]: a word only a few documents use (a class name) says what a document is about; "is", "a" say
    nothing. A token no document uses weighs the most, but adds the same to every document's score."""
    width = max([len(t) for t in doc_tokens] + [1])
    ids = torch.zeros(num_docs, width, dtype=torch.long)
    for n, toks in enumerate(doc_tokens):
        ids[n, : len(toks)] = torch.tensor(toks, dtype=torch.long)
    df = torch.zeros(num_docs, vocab_size).scatter_(1, ids.clamp(max=vocab_size - 1), 1.0).sum(0)
    idf = torch.log((num_docs + 1) / (df + 1))
    idf[PAD_ID] = 0.0
    return ids, idf


class SourceHead(nn.Module):
    """Ranks the knowledge-base documents as the teacher's retriever does: its query is the question plus the
    detected labels, each once (``teachers.retriever.labelled_query``), embedded and compared by cosine with every
    document. The student's query is the question's tokens and the kept objects' class-name words (a class
    once), and a document's score is the sum of two cosines at learned scales:

    - lexical: of the query's and the document's (``doc_tokens``, a constant) idf-weighted bags of tokens,
      counted by comparing token ids in the graph. A rare word they share, such as a class name, is what makes
      them similar, for every class alike, trained on or not;
    - semantic: of the idf-weighted means of the student's own token embeddings (shared with the question
      encoder, the object tokens and the decoder), each through a linear map (identity at first), which
      training moves to rank as the teacher's sentence embedder does (synonyms, related objects).

    Nothing is per-document: a document about a class no training row retrieved still ranks by what it says,
    and the student cannot memorise which documents the training photos retrieved."""

    def __init__(self, d: int, doc_tokens: list[list[int]], num_docs: int, vocab_size: int) -> None:
        super().__init__()
        ids, idf = document_table(doc_tokens, num_docs, vocab_size)
        present = (ids != PAD_ID).float()
        self.idf: Tensor
        self.doc_tokens: Tensor
        self.doc_weights: Tensor  # idf-weighted mean over a document's tokens, 0 on padding
        self.register_buffer("idf", idf.view(-1, 1), persistent=False)
        # int32: the program keeps this table for the comparison below, at half the bytes of int64 (the
        # bundle counts every byte); the query's ids are cast to it, the embedding lookup takes either
        self.register_buffer("doc_tokens", ids.to(torch.int32), persistent=False)
        w = idf[ids] * present
        self.register_buffer("doc_weights", w / w.sum(1, keepdim=True).clamp(min=1e-6), persistent=False)
        self.doc_norm: Tensor  # 1 / the L2 norm of a document's weights: the lexical score is a cosine
        self.register_buffer(
            "doc_norm", 1.0 / self.doc_weights.square().sum(1).sqrt().clamp(min=1e-6), persistent=False
        )
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        for lin in (self.q, self.k):  # start as the plain cosine of the two bags of embeddings
            nn.init.eye_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.log_temp = nn.Parameter(torch.tensor(math.log(2.0)))  # the semantic cosine's scale
        self.log_lex = nn.Parameter(torch.tensor(math.log(10.0)))  # the lexical cosine's scale

    def forward(self, query_ids: Tensor, query_mask: Tensor, tok_emb: nn.Embedding) -> Tensor:
        """``query_ids`` [B,J] (question tokens, then object words), ``query_mask`` [B,J] (1 = a real token)
        -> ``source_logits`` [B,N]."""
        w = F.embedding(query_ids, self.idf).squeeze(-1) * query_mask.to(self.idf.dtype)  # [B,J]
        query = (tok_emb(query_ids) * w.unsqueeze(-1)).sum(1)  # [B,d]
        words = (tok_emb(self.doc_tokens) * self.doc_weights.unsqueeze(-1)).sum(1)  # [N,d]
        keys = F.normalize(self.k(words), dim=-1)
        semantic = F.normalize(self.q(query), dim=-1) @ keys.t()
        same = (query_ids.to(self.doc_tokens.dtype)[:, :, None, None] == self.doc_tokens[None, None]).to(
            w.dtype
        )  # [B,J,N,L]
        shared = (same * w[:, :, None, None]).sum(1)  # [B,N,L]: each document token's weight in the query
        lexical = (shared * self.doc_weights).sum(-1) / (w.square().sum(1, keepdim=True).sqrt() + 1e-6)
        return semantic * self.log_temp.exp() + lexical * self.doc_norm * self.log_lex.exp()


class SpaceSourceHead(nn.Module):
    """Ranks the knowledge-base documents in the teacher retriever's own embedding space.

    The retriever compares the embedding of its query (the question and the detected labels) with each
    document's embedding. Here each document *is* the retriever's embedding of its text, projected onto the
    ``dims`` principal directions of the documents' embeddings (``doc_keys``, unit length; a constant set by the
    trainer, :meth:`set_space`, and saved with the weights), so only the query side is learnt: an
    idf-initialised weighted sum of the query tokens' embeddings (shared with the question encoder, the object
    tokens and the decoder) through a linear map into that space. Training regresses it onto the retriever's
    own query embedding (projected the same way) and ranks with it (:mod:`graphdistill.student.retrieval_kd`).
    ``doc_tokens`` is kept for the copy path, which quotes the retrieved documents."""

    def __init__(
        self, d: int, doc_tokens: list[list[int]], num_docs: int, vocab_size: int, dims: int
    ) -> None:
        super().__init__()
        ids, idf = document_table(doc_tokens, num_docs, vocab_size)
        self.doc_tokens: Tensor
        self.register_buffer("doc_tokens", ids.to(torch.int32), persistent=False)
        self.doc_keys: Tensor
        self.register_buffer("doc_keys", torch.zeros(num_docs, dims))
        self.token_weight = nn.Parameter(idf.view(-1, 1).clone())  # [V,1]: how much a token says
        self.proj = nn.Linear(d, dims)
        self.log_temp = nn.Parameter(torch.tensor(math.log(20.0)))  # the cosine's scale

    def set_space(self, doc_keys: Tensor, known: Tensor | None = None) -> None:
        """The documents' vectors in the retriever's space [N, dims] (:func:`retrieval_kd.teacher_space`) and,
        when given, the tokens training's queries hold (``known`` [V] bool): every other token's weight is 0.
        A word no training query held has an embedding nothing mapped into the retriever's space (its tied
        output row drifts with every softmax), and at its initial idf weight, the highest for a word no
        document uses, it pulled the query anywhere; the retriever's own model would know it, the student does
        not, so it says nothing here (it gets no gradient either, so it stays 0)."""
        if tuple(doc_keys.shape) != tuple(self.doc_keys.shape):
            raise ValueError(
                f"document vectors of shape {tuple(doc_keys.shape)} for a head of {tuple(self.doc_keys.shape)}"
            )
        if known is not None and tuple(known.shape) != (self.token_weight.shape[0],):
            raise ValueError(
                f"known tokens of shape {tuple(known.shape)} for a vocabulary of {self.token_weight.shape[0]}"
            )
        with torch.no_grad():
            self.doc_keys.copy_(F.normalize(doc_keys.to(self.doc_keys), dim=-1))
            if known is not None:
                self.token_weight.mul_(known.to(self.token_weight).view(-1, 1))

    def query(self, query_ids: Tensor, query_mask: Tensor, tok_emb: nn.Embedding) -> Tensor:
        """``query_ids`` [B,J], ``query_mask`` [B,J] -> the query in the retriever's space [B, dims], unit."""
        w = F.embedding(query_ids, self.token_weight).squeeze(-1) * query_mask.to(self.token_weight.dtype)
        return F.normalize(self.proj((tok_emb(query_ids) * w.unsqueeze(-1)).sum(1)), dim=-1)

    def rank(self, query: Tensor) -> Tensor:
        """A query from :meth:`query` -> ``source_logits`` [B,N]: its scaled cosine with every document."""
        return F.linear(query, self.doc_keys) * self.log_temp.exp()

    def forward(self, query_ids: Tensor, query_mask: Tensor, tok_emb: nn.Embedding) -> Tensor:
        return self.rank(self.query(query_ids, query_mask, tok_emb))


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
        out: Tensor = self.proj_x(self._merge(F.scaled_dot_product_attention(q, kv[0], kv[1])))
        return out

    def forward(self, x: Tensor, mem: Tensor) -> Tensor:
        """Teacher-forced pass over a whole sequence (causal)."""
        q, k, v = (self._split(t) for t in self.qkv(self.ln1(x)).chunk(3, dim=-1))
        x = x + self.proj(self._merge(F.scaled_dot_product_attention(q, k, v, is_causal=True)))
        x = x + self._cross(x, mem)
        out: Tensor = x + self.ffn(self.ln3(x))
        return out

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
        the caller's job. (Exported, the step is :class:`~graphdistill.export.phone_decode.PhoneDecodeStep`.)"""
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
        out: Tensor = x + self.ffn(self.ln3(x))
        return out


def box_iou_matrix(a: Tensor, b: Tensor) -> Tensor:
    """IoU of xyxy boxes, batched: a [B,N,4], b [B,M,4] -> [B,N,M] (elementwise ops only: exportable)."""
    lt = torch.maximum(a[:, :, None, :2], b[:, None, :, :2])
    rb = torch.minimum(a[:, :, None, 2:], b[:, None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = ((a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]))[:, :, None]
    area_b = ((b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]))[:, None, :]
    return inter / (area_a + area_b - inter).clamp(min=1e-6)


# --------------------------------------------------------------------------------------------------------
# The student
# --------------------------------------------------------------------------------------------------------


class Student(nn.Module):
    """See the module docstring. All inference methods are static-shape; no Python branches on tensor values."""

    def __init__(self, config: StudentConfig) -> None:
        super().__init__()
        cfg = self.config = config
        d = cfg.d_model
        if cfg.trunk == "ultralytics":
            self.trunk: nn.Module = UltralyticsTrunk(cfg.trunk_spec, cfg.num_classes)
        else:
            self.trunk = TimmTrunk(cfg.backbone, cfg.num_classes, cfg.reg_max, cfg.image_size)
        if int(self.trunk.reg_max) != cfg.reg_max:
            raise ValueError(f"the trunk's head has reg_max {self.trunk.reg_max}, the config {cfg.reg_max}")
        c3, c4, c5 = self.trunk.channels
        self.grid = [cfg.image_size // s for s in STRIDES]
        self.n_img = self.grid[2] ** 2 if cfg.text_pixels else 0  # image tokens: the P5 cells
        self.n_obj = cfg.max_objects if cfg.has_objects else 0
        self.n_ctx = cfg.num_registers + self.n_img + self.n_obj  # memory tokens the decoder reads
        self.memory_len = self.n_ctx
        anchors, strides = make_anchors(cfg.image_size)
        self.det_anchors: Tensor
        self.det_strides: Tensor
        self.register_buffer("det_anchors", anchors, persistent=False)
        self.register_buffer("det_strides", strides, persistent=False)
        self.dfl_bins: Tensor
        self.register_buffer(
            DFL_BINS, torch.arange(cfg.reg_max, dtype=torch.float32).view(1, -1), persistent=False
        )
        # Fast NMS: candidate i suppresses candidate j (ranked below it) when they overlap; a constant mask
        self.rank_above: Tensor
        self.register_buffer(
            "rank_above", torch.ones(cfg.candidates, cfg.candidates).triu(1), persistent=False
        )
        if cfg.has_masks:
            self.proto = Proto(c3, cfg.proto_channels, cfg.num_masks)
            self.coef = nn.ModuleList(CoefHead(c, cfg.num_masks) for c in (c3, c4, c5))

        # text side
        if cfg.text_pixels:
            self.img_proj = nn.Linear(c5, d)
            self.img_pos = nn.Parameter(torch.zeros(1, self.n_img, d))
        if cfg.has_objects:
            self.cls_emb = nn.Embedding(cfg.num_classes, d)
            self.class_words: (
                Tensor  # each class name's token (<pad> for none): object tokens start from words
            )
            words = cfg.class_token_ids or [PAD_ID] * cfg.num_classes
            self.register_buffer("class_words", torch.tensor(words, dtype=torch.long), persistent=False)
            self.box_emb = nn.Linear(5, d)  # cx, cy, w, h, score
            if cfg.text_pixels:
                self.obj_feat = nn.Linear(c4, d)  # the P4 cell under the box centre: colour, texture
            self.empty_obj = nn.Parameter(torch.zeros(1, 1, d))  # an unused object slot
            self.obj_mention = nn.Parameter(torch.zeros(d))  # added to the object the question names
        self.registers = nn.Parameter(torch.zeros(1, cfg.num_registers, d))
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)  # shared by question encoder, decoder input and output
        self.q_pos = nn.Parameter(torch.zeros(1, cfg.max_question_len, d))
        self.type_emb = nn.Parameter(torch.zeros(4, d))  # register / image / object / question
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
        if cfg.has_sources:
            self.source_head: SourceHead | SpaceSourceHead = (
                SpaceSourceHead(d, cfg.source_token_ids, cfg.num_sources, cfg.vocab_size, cfg.source_dims)
                if cfg.source_dims
                else SourceHead(d, cfg.source_token_ids, cfg.num_sources, cfg.vocab_size)
            )
        self.embedding_heads = nn.ModuleDict({k: nn.Linear(d, v) for k, v in cfg.embedding_dims.items()})
        if cfg.has_text:
            self.a_pos = nn.Embedding(cfg.max_answer_len, d)
            self.dec = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
            self.dec_norm = nn.LayerNorm(d)
            # the copy path: a pointer over the object tokens and the retrieved documents' tokens + a
            # "generate" slot
            if cfg.has_objects or cfg.has_sources:
                self.ptr_q = nn.Linear(d, d)
                self.ptr_gate = nn.Linear(d, 1)
            if cfg.has_objects:
                self.ptr_k = nn.Linear(d, d)
            if (
                cfg.has_sources
            ):  # a document token's key: the token and the one before it (where a copy goes on)
                self.ptr_doc = nn.Linear(d, d)
                self.ptr_doc_prev = nn.Linear(d, d)
                # how strongly to go on copying a document where the last tokens left it: added to the score of
                # each document slot whose previous slot holds the token just read (column 0) and whose two
                # previous slots hold the last two tokens read (column 1; see ``ptr_next``, :meth:`copy_mix`)
                if cfg.copy_continue:
                    self.ptr_cont = nn.Linear(d, 2)
                # added to the keys of a document that names a class the question names
                self.doc_mention = nn.Parameter(torch.zeros(d))
        self._init()

    def _init(self) -> None:
        cfg = self.config
        for p in (self.registers, self.q_pos, self.type_emb):
            nn.init.normal_(p, std=0.02)
        if cfg.text_pixels:
            nn.init.normal_(self.img_pos, std=0.02)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        if cfg.has_objects:
            nn.init.normal_(self.cls_emb.weight, std=0.02)
            nn.init.normal_(self.empty_obj, std=0.02)
        if cfg.has_text:
            nn.init.normal_(self.a_pos.weight, std=0.02)
            if hasattr(self, "ptr_gate"):
                with torch.no_grad():  # start by generating, copy only once it has learnt to
                    self.ptr_gate.bias.fill_(2.0)
            if hasattr(self, "ptr_cont"):
                with torch.no_grad():  # start from "a copy goes on"; training learns when it stops
                    nn.init.zeros_(self.ptr_cont.weight)
                    self.ptr_cont.bias.fill_(CONT_PRIOR)

    def start_from(self, start: Any) -> None:
        """Copy a teacher's offered modules (``teachers.base.StudentStart``) into the trunk and head."""
        if not isinstance(self.trunk, UltralyticsTrunk) or start.kind != "ultralytics-detect":
            raise ValueError(f"a {self.config.trunk} trunk cannot start from a {start.kind!r} offer")
        self.trunk.load_ultralytics(start.state_dict)

    def _need_text(self, what: str) -> None:
        if not self.config.has_text:
            raise RuntimeError(
                f"Student.{what}: this student has no text head (its teacher graph declares no TEXT output; "
                f"outputs: {self.config.outputs})"
            )

    # ---- vision: dense outputs and the objects selected from them --------------------------------------------

    def dense(self, feats: list[Tensor]) -> dict[str, Tensor]:
        """Every cell's box distributions ``det_dist`` [B,4·R,A], class logits ``det_cls`` [B,C,A] and, with a
        mask head, coefficients ``det_coef`` [B,M,A] and the prototypes ``protos`` [B,M,S/4,S/4]."""
        head: Any = self.trunk.head
        out = {
            "det_dist": torch.cat([head.cv2[i](f).flatten(2) for i, f in enumerate(feats)], 2),
            "det_cls": torch.cat([head.cv3[i](f).flatten(2) for i, f in enumerate(feats)], 2),
        }
        if (
            self.config.has_masks
        ):  # the mask branch reads the trunk as the text does: it never bends the detector
            own = [_text_view(f, self.training) for f in feats]
            out["det_coef"] = torch.cat([c(f).flatten(2) for c, f in zip(self.coef, own, strict=True)], 2)
            out["protos"] = self.proto(own[0])
        return out

    def decode_boxes(self, dist: Tensor) -> Tensor:
        """``det_dist`` [B,4·R,A] -> xyxy boxes in canvas pixels [B,A,4] (:func:`trunks.dfl_decode`)."""
        return dfl_decode(dist, self.det_anchors, self.det_strides, self.dfl_bins)

    def select(self, dense: dict[str, Tensor]) -> dict[str, Tensor]:
        """The objects, as the detector's own post-processing keeps them, with static shapes: the
        ``candidates`` best cells (best class each), Fast NMS among them (a candidate is dropped when one
        ranked above it, of the same class, overlaps it by IoU > ``nms_iou``: YOLACT), then the best
        ``max_objects`` left. Returns ``boxes`` [B,K,4] (cx,cy,w,h in 0..1 of the canvas), ``scores`` [B,K],
        ``classes`` [B,K] int64, ``keep`` [B,K] bool (score ≥ ``score_threshold`` and not suppressed) and,
        with a mask head, ``mask_logits`` [B,K,S/4,S/4] over the whole canvas (``coef · protos``). The slots
        after the kept objects hold the best unsuppressed candidates under the threshold, by score."""
        cfg = self.config
        boxes = self.decode_boxes(dense["det_dist"])  # [B,A,4] px
        best, label = dense["det_cls"].max(1)  # [B,A] logits: sigmoid is monotonic
        top, idx = best.topk(cfg.candidates, dim=1)
        score = top.sigmoid()
        cand = boxes.gather(1, idx[..., None].expand(-1, -1, 4))
        cls = label.gather(1, idx)
        overlap = box_iou_matrix(cand, cand) * (cls[:, :, None] == cls[:, None, :]).to(cand.dtype)
        worst = (overlap * self.rank_above).amax(dim=1)  # [B,K0]: the largest overlap with one ranked above
        free = worst <= cfg.nms_iou  # no candidate ranked above it, of its class, covers it
        keep = free & (score >= cfg.score_threshold)
        # the kept objects first, by score; then, in the slots left, the best candidates NMS did not suppress
        # but the threshold dropped: near misses, which an app's adaptive policy reads (runner.tta.near_miss)
        rank = score * free.to(score.dtype) + keep.to(score.dtype)
        kept_score, pick = rank.topk(cfg.max_objects, dim=1)
        out_boxes = cand.gather(1, pick[..., None].expand(-1, -1, 4)) / cfg.image_size
        x1, y1, x2, y2 = out_boxes.unbind(-1)
        out = {
            "boxes": torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1),
            "scores": score.gather(1, pick),
            "classes": cls.gather(1, pick),
            "keep": keep.gather(1, pick),
        }
        if cfg.has_masks:
            cell = idx.gather(1, pick)  # [B,K] cell index of each object
            coef = dense["det_coef"].gather(2, cell[:, None, :].expand(-1, cfg.num_masks, -1))  # [B,M,K]
            protos = dense["protos"]
            b, m, hp, wp = protos.shape
            out["mask_logits"] = torch.bmm(coef.transpose(1, 2), protos.view(b, m, hp * wp)).view(
                b, -1, hp, wp
            )
        del kept_score
        return out

    # ---- text: object tokens, the joint encoder, the pointer ---------------------------------------------------

    def object_tokens(
        self, objects: dict[str, Tensor], p4: Tensor, question_ids: Tensor, question_mask: Tensor
    ) -> Tensor:
        """``objects`` (``classes`` [B,K] int, ``boxes`` [B,K,4] cx,cy,w,h in 0..1, ``scores`` [B,K],
        ``valid`` [B,K] bool) -> object tokens [B,K,D]; an invalid slot is the learnt empty token. An object
        whose class name the question holds gets ``obj_mention`` (:func:`mentioned`)."""
        classes, boxes, scores, valid = (objects[k] for k in ("classes", "boxes", "scores", "valid"))
        b = p4.shape[0]
        c = classes.clamp(0, self.config.num_classes - 1)
        words = self.class_words[c]  # the class name's word: the one the copy path and documents use
        tok = self.cls_emb(c) + self.tok_emb(words) + self.box_emb(torch.cat([boxes, scores[..., None]], -1))
        if self.config.text_pixels:  # the P4 cell under the box centre: colour, texture
            _, c4, h4, w4 = p4.shape
            # the flat index in float, cast last: int8 preparation turns the scalars of integer arithmetic into
            # float constants
            ix = torch.floor((boxes[..., 0] * w4).clamp(0, w4 - 1))
            iy = torch.floor((boxes[..., 1] * h4).clamp(0, h4 - 1))
            flat = (iy * w4 + ix).long()
            cell = p4.flatten(2).gather(2, flat[:, None, :].expand(-1, c4, -1)).transpose(1, 2)  # [B,K,C4]
            tok = tok + self.obj_feat(cell)
        tok = tok + mentioned(words, question_ids, question_mask)[..., None] * self.obj_mention
        return torch.where(valid[..., None], tok, self.empty_obj.expand(b, tok.shape[1], -1))

    def context(
        self,
        p5: Tensor,
        obj_tokens: Tensor | None,
        question_ids: Tensor,
        question_mask: Tensor,
        depth: int = 1,
        keep_state: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """The joint encoder -> (memory [B, n_ctx, D] = [registers | image tokens | object tokens], state).

        ``depth`` r: the last layer (the recurrent block, weights shared) runs r times (``config.max_depth``).
        ``keep_state``: ``state`` is every token after the last iteration, before the final norm [B, n_ctx+Lq,
        D], from which :meth:`deepen` goes on (None otherwise; then the last iteration computes the context
        tokens only: the question tokens are its keys and values, nothing is computed for them as queries)."""
        self.check_depth(depth)
        b = p5.shape[0]
        parts = [self.registers.expand(b, -1, -1) + self.type_emb[0]]
        if self.config.text_pixels:
            parts.append(self.img_proj(p5.flatten(2).transpose(1, 2)) + self.img_pos + self.type_emb[1])
        if obj_tokens is not None:
            parts.append(obj_tokens + self.type_emb[2])
        lq = question_ids.shape[1]
        parts.append(self.tok_emb(question_ids) + self.q_pos[:, :lq] + self.type_emb[3])
        x = torch.cat(parts, dim=1)
        mask = self._key_mask(question_mask, x)  # once for every layer and iteration
        if depth == 1 and not keep_state and not phone_ops.active():  # PyTorch's own encoder, as trained
            return self.enc_norm(self.encoder(x, src_key_padding_mask=mask))[:, : self.n_ctx], None
        layers = list(self.encoder.layers)
        steps = layers[:-1] + [layers[-1]] * depth
        for i, layer in enumerate(steps):
            last = i == len(steps) - 1 and not keep_state
            x = self._encoder_layer(layer, x, mask, self.n_ctx if last else None)
        return self._enc_norm(x[:, : self.n_ctx]), (x if keep_state else None)

    def deepen(self, state: Tensor, question_mask: Tensor) -> tuple[Tensor, Tensor]:
        """One more iteration of the recurrent block: ``state`` after r iterations [B, n_ctx+Lq, D] (see
        :meth:`context`) -> (the state after r + 1, the memory at depth r + 1 [B, n_ctx, D]). The exported
        ``deepen`` program: the runner calls it r - 1 times after ``encode`` for depth r."""
        mask = self._key_mask(question_mask, state)
        x = self._encoder_layer(self.encoder.layers[-1], state, mask, None)
        return x, self._enc_norm(x[:, : self.n_ctx])

    def check_depth(self, depth: int) -> None:
        if not 1 <= depth <= self.config.max_depth:
            raise ValueError(
                f"depth {depth}: this student's recurrent block was trained for depths 1..{self.config.max_depth}"
                " (StudentConfig.max_depth)"
            )

    def _key_mask(self, question_mask: Tensor, x: Tensor) -> Tensor:
        """Which of the [context | question] keys the encoder ignores (question padding): PyTorch's bool
        padding mask (True = ignore), or in the phone path an additive bias [B,1,1,T] (0 or NEG)."""
        b = x.shape[0]
        if phone_ops.active():
            keep = torch.zeros(b, self.n_ctx, dtype=x.dtype, device=x.device)
            pad_bias = (question_mask == 0).to(x.dtype) * phone_ops.NEG
            return torch.cat([keep, pad_bias], dim=1).view(b, 1, 1, -1)
        keep_b = torch.ones(b, self.n_ctx, dtype=torch.bool, device=x.device)
        return ~torch.cat([keep_b, question_mask.to(torch.bool)], dim=1)

    def _encoder_layer(self, layer: Any, x: Tensor, mask: Tensor, n_out: int | None) -> Tensor:
        """One joint-encoder layer over [context | question] tokens, keys masked by :meth:`_key_mask`'s
        ``mask``; ``n_out``: only the first n_out tokens as queries (phone path; PyTorch's layer computes every
        token)."""
        if phone_ops.active():  # the same layer, with an additive key bias instead of a bool mask
            return phone_ops.encoder_layer(layer, x, mask, n_out=n_out)
        return layer(x, src_key_padding_mask=mask)  # type: ignore[no-any-return]

    def _enc_norm(self, x: Tensor) -> Tensor:
        return phone_ops.layer_norm(self.enc_norm, x) if phone_ops.active() else self.enc_norm(x)

    @property
    def n_copy(self) -> int:
        """The copy path's slots: every object slot, then every token of the ``copy_docs`` documents read."""
        cfg = self.config
        docs = self.copy_docs * self.source_head.doc_tokens.shape[1] if cfg.has_sources else 0
        return (self.n_obj if cfg.has_objects else 0) + docs

    @property
    def copy_docs(self) -> int:
        """How many of the best-ranked documents the answer decoder may copy from (the retriever's k)."""
        return min(self.config.sources_k, self.config.num_sources) if self.config.has_sources else 0

    def pointer(
        self,
        memory: Tensor,
        chosen: dict[str, Tensor] | None,
        docs: Tensor | None,
        question_ids: Tensor,
        question_mask: Tensor,
    ) -> dict[str, Tensor]:
        """The copy path's per-query inputs, one slot per object then one per token of the documents ``docs``
        [B,k] (indices): ``ptr_keys`` [B,K,D] (an object token's key; a document token's key from its word and
        the word before it, so a copy goes on where the last one left off, plus ``doc_mention`` when the
        document names a class the question names), ``ptr_bias`` [B,K] (0, or
        :data:`phone_ops.NEG` for an empty slot, padding or a class with no token) and ``ptr_vocab`` [B,K,V]
        (one-hot of each slot's token)."""
        keys, tokens, usable = [], [], []
        if chosen is not None:
            t = self.class_words[chosen["classes"].clamp(0, self.config.num_classes - 1)]  # [B,K]
            keys.append(self.object_keys(memory))
            tokens.append(t)
            usable.append(chosen["valid"].to(torch.bool) & (t > UNK_ID))
        if docs is not None:
            b, k = docs.shape
            flat = docs.reshape(-1)
            t3 = torch.index_select(self.source_head.doc_tokens, 0, flat).view(b, k, -1).long()  # [B,k,L]
            # the token before each one, <bos> before a document's first: where a copy goes on from
            prev = torch.cat([torch.full_like(t3[:, :, :1], BOS_ID), t3[:, :, :-1]], 2).view(b, -1)
            t = t3.view(b, -1)  # [B,k*L]
            key = self.ptr_doc(self.tok_emb(t)) + self.ptr_doc_prev(self.tok_emb(prev))
            if self.config.has_objects:  # a document is about what the question asks: it holds a class name
                # the question holds
                class_q = (question_ids[:, :, None] == self.class_words[None, None, :]).to(torch.float32)
                asked = question_mask.to(torch.float32) * class_q.amax(-1)
                named = mentioned(t, question_ids, asked).view(b, k, -1).amax(-1, keepdim=True)  # [B,k,1]
                key = key + named.expand(-1, -1, t3.shape[2]).reshape(b, -1)[..., None] * self.doc_mention
            keys.append(key)
            tokens.append(t)
            usable.append(t > UNK_ID)
        tok = torch.cat(tokens, 1)
        vocab = (tok[..., None] == torch.arange(self.config.vocab_size, device=tok.device)).to(memory.dtype)
        out = {
            "ptr_keys": torch.cat(keys, 1),
            "ptr_bias": (~torch.cat(usable, 1)).to(memory.dtype) * phone_ops.NEG,
            "ptr_vocab": vocab,
        }
        if docs is not None and hasattr(self, "ptr_cont"):
            # ptr_next[b, v, j] = 1 when slot j is a document token whose previous slot, in the same document,
            # holds token v: reading v, the copy may go on at j (a table the decoder looks the read token up in)
            width = t3.shape[2]
            follows = (torch.arange(k * width, device=memory.device) % width != 0).to(
                memory.dtype
            )  # not a first
            n_obj = tok.shape[1] - k * width
            nxt = F.pad(vocab[:, n_obj:-1], (0, 0, 1, 0)) * follows[None, :, None]  # [B,k*L,V]
            out["ptr_next"] = F.pad(nxt, (0, 0, n_obj, 0)).transpose(1, 2).contiguous()  # [B,V,K]
        return out

    def object_keys(self, memory: Tensor) -> Tensor:
        """The copy path's keys of the object slots [B,K,D], from the memory's object tokens."""
        return self.ptr_k(memory[:, self.n_ctx - self.n_obj :])  # type: ignore[no-any-return]

    def embeddings(self, memory: Tensor) -> dict[str, Tensor]:
        """``embedding:<name>`` [B,d] for each embedding head, from the registers' summary."""
        if not self.embedding_heads:
            return {}
        summary = phone_ops.mean_tokens(memory[:, : self.config.num_registers])
        return {f"embedding:{name}": head(summary) for name, head in self.embedding_heads.items()}

    def copy_mix(
        self,
        h: Tensor,
        ptr: dict[str, Tensor] | None,
        tokens: Tensor | None = None,
        prev_tokens: Tensor | None = None,
    ) -> Tensor:
        """Final hidden states ``h`` [B,T,D] (after ``dec_norm``) -> log-probabilities [B,T,V]: a mixture of
        the vocabulary distribution (tied embedding) and copies of the objects' class tokens and the retrieved
        documents' tokens, weighted by one softmax over ``[generate | slot 1 .. K]`` (a pointer-generator whose
        gate is the first slot). ``tokens`` [B,T]: the tokens the decoder read at each position, ``prev_tokens``
        [B,T] the ones read before them (<bos> before the first): a document slot that follows one holding the
        read token gets ``ptr_cont(h)[0]`` added to its score (``ptr_next``), and ``ptr_cont(h)[1]`` more when
        the slot before that holds the token read before, so a copy goes on where it left off even after a
        word the document holds several times ("along a fixed route" after "carries many passengers along a")."""
        logits = h @ self.tok_emb.weight.T
        if ptr is None or not hasattr(self, "ptr_q"):
            return logits.log_softmax(-1)
        scores = torch.matmul(self.ptr_q(h), ptr["ptr_keys"].transpose(1, 2)) * (1.0 / math.sqrt(h.shape[-1]))
        if tokens is not None and prev_tokens is not None and "ptr_next" in ptr:
            nxt = ptr["ptr_next"]  # [B,V,K]
            follows = torch.gather(nxt, 1, tokens[..., None].expand(-1, -1, nxt.shape[2]))  # [B,T,K]
            before = torch.gather(nxt, 1, prev_tokens[..., None].expand(-1, -1, nxt.shape[2]))
            both = follows * F.pad(before[..., :-1], (1, 0))  # slot j-1 followed the token before, j this one
            cont = self.ptr_cont(h)
            scores = scores + cont[..., :1] * follows + cont[..., 1:] * both
        weights = torch.cat([self.ptr_gate(h), scores + ptr["ptr_bias"][:, None, :]], -1).softmax(-1)
        probs = weights[..., :1] * logits.softmax(-1) + torch.matmul(weights[..., 1:], ptr["ptr_vocab"])
        return probs.clamp(min=1e-12).log()

    # ---- the whole query ---------------------------------------------------------------------------------------

    def encode(
        self,
        image: Tensor,
        question_ids: Tensor,
        question_mask: Tensor,
        objects: dict[str, Tensor] | None = None,
        features: list[Tensor] | None = None,
        depth: int = 1,
        keep_state: bool = False,
    ) -> dict[str, Tensor]:
        """image [B,3,S,S] normalised, question_ids [B,Lq] int64, question_mask [B,Lq] bool (True = token) ->
        ``memory`` [B,n_ctx,D], the selected objects (see :meth:`select`), the copy path's inputs (see
        :meth:`pointer`), ``source_logits`` [B,K], ``embedding:<name>`` [B,d], and in training mode the dense
        outputs (see :meth:`dense`) with ``det_anchors`` and ``det_strides``. ``objects`` (``obj_*`` tensors,
        the teacher's): the object tokens are built from them instead of from the student's own selection.
        ``features``: the trunk's [P3, P4, P5] for ``image``, computed earlier (training with a frozen trunk
        caches them: they never change), instead of running the trunk. ``depth``: iterations of the recurrent
        block (:meth:`context`); ``keep_state``: ``state`` too, the encoder's tokens :meth:`deepen` goes on from."""
        cfg = self.config
        feats = features if features is not None else self.trunk(image)
        out: dict[str, Tensor] = {}
        obj_tokens = None
        chosen: dict[str, Tensor] | None = None
        if cfg.has_objects:
            dense = self.dense(feats)
            if self.training:
                out.update(dense, det_anchors=self.det_anchors, det_strides=self.det_strides)
            if objects is None or not self.training:
                out.update(self.select(dense))
            if objects is not None:
                chosen = {k.removeprefix("obj_"): objects[k] for k in OBJECT_KEYS}
            else:
                chosen = {k: out[k] for k in ("classes", "boxes", "scores")} | {"valid": out["keep"]}
            obj_tokens = self.object_tokens(
                chosen, _text_view(feats[1], self.training), question_ids, question_mask
            )
        # without a detection head nothing else trains the trunk: the text and summary losses must reach it
        detach = self.training and cfg.has_objects
        memory, state = self.context(
            _text_view(feats[2], detach), obj_tokens, question_ids, question_mask, depth, keep_state
        )
        out["memory"] = memory
        if state is not None:
            out["state"] = state
        docs = None
        if cfg.has_sources:
            out["source_logits"] = self.rank_sources(question_ids, question_mask, chosen)
            # the documents the answer may copy from: the teacher's in training (``objects["sources"]``,
            # multi-hot), the student's best-ranked ones otherwise
            retrieved = objects.get("sources") if objects is not None and self.training else None
            ranked = retrieved.float() if retrieved is not None else out["source_logits"]
            docs = ranked.topk(self.copy_docs, dim=-1).indices
        if cfg.has_text and (chosen is not None or docs is not None):
            out.update(self.pointer(memory, chosen, docs, question_ids, question_mask))
        out.update(self.embeddings(memory))
        return out

    def _source_query(
        self, question_ids: Tensor, question_mask: Tensor, objects: dict[str, Tensor] | None
    ) -> tuple[Tensor, Tensor]:
        """The retriever's query as student tokens: the question, then the labels of ``objects`` (``classes``
        [B,K], ``valid`` [B,K]; None: the question alone), each class once, as the teacher's retriever asks
        (:func:`graphdistill.teachers.retriever.labelled_query`) -> (ids [B,J], mask [B,J])."""
        ids, mask = question_ids, question_mask
        if objects is not None:
            c = objects["classes"].clamp(0, self.config.num_classes - 1)
            ids = torch.cat([ids, self.class_words[c]], dim=1)
            mask = torch.cat([mask.to(torch.bool), first_of_class(c, objects["valid"])], dim=1)
        return ids, mask

    def rank_sources(
        self, question_ids: Tensor, question_mask: Tensor, objects: dict[str, Tensor] | None
    ) -> Tensor:
        """``source_logits`` [B,N] for the retriever's query (:meth:`_source_query`). Training's retrieval
        distillation calls it on queries no trace asked (:mod:`graphdistill.student.retrieval_kd`)."""
        ids, mask = self._source_query(question_ids, question_mask, objects)
        return self.source_head(ids, mask, self.tok_emb)  # type: ignore[no-any-return]

    def source_vectors(
        self, question_ids: Tensor, question_mask: Tensor, objects: dict[str, Tensor] | None
    ) -> Tensor | None:
        """The query in the retriever's space [B, source_dims] (unit length), which retrieval distillation
        regresses onto the retriever's own; None for a head that ranks by words."""
        head = self.source_head
        if not isinstance(head, SpaceSourceHead):
            return None
        ids, mask = self._source_query(question_ids, question_mask, objects)
        return head.query(ids, mask, self.tok_emb)

    @staticmethod
    def pointer_of(encoded: dict[str, Tensor]) -> dict[str, Tensor] | None:
        return {k: encoded[k] for k in POINTER_KEYS if k in encoded} if "ptr_keys" in encoded else None

    def empty_cache(self, batch: int, device: torch.device | None = None) -> Tensor:
        self._need_text("empty_cache")
        cfg = self.config
        return torch.zeros(
            cfg.dec_layers, 2, batch, cfg.n_heads, cfg.max_answer_len, cfg.head_dim, device=device
        )

    def cross_kv(self, memory: Tensor) -> Tensor:
        """Every decoder layer's cross-attention keys/values, [L,2,B,H,n_ctx,hd]; compute once per query
        and pass to :meth:`decode_step` to skip re-projecting the memory at every token."""
        self._need_text("cross_kv")
        return torch.stack([layer.cross_kv(memory) for layer in self.dec if isinstance(layer, DecoderLayer)])

    def decode_step(
        self,
        token: Tensor,
        position: Tensor,
        memory: Tensor | None,
        kv_cache: Tensor,
        cross_kv: Tensor | None = None,
        pointer: dict[str, Tensor] | None = None,
        prev_token: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """token [B,1] int64, position [B,1] or [1] int64 (0 = the <bos> slot), memory [B,M,D],
        kv_cache [L,2,B,H,T,hd] holding positions < ``position``, optional cross_kv from :meth:`cross_kv`
        (same result, faster), the copy path's inputs (:meth:`pointer`) -> (next-token log-probabilities
        [B,V], ``kv_new`` [L,2,B,H,1,hd]: this position's keys and values). The cache is only read: the caller
        stores ``kv_new`` at ``position`` (:meth:`write_kv`) before the next step. ``memory`` may be None when
        ``cross_kv`` is given. ``prev_token`` [B,1]: the token read at the step before (None: <bos>, right at
        position 0), which the copy path's continuation reads."""
        self._need_text("decode_step")
        if memory is None and cross_kv is None:
            raise ValueError("decode_step needs the memory or its cross_kv")
        t_max = self.config.max_answer_len
        pos = position.reshape(-1, 1)  # [b,1], b ∈ {1, B}
        x = self.tok_emb(token) + self.a_pos(pos)
        ar = torch.arange(t_max, device=token.device).view(1, t_max)
        write = (ar == pos).view(-1, 1, t_max, 1)
        valid = (ar <= pos).view(-1, 1, 1, t_max)
        new = []
        for i, layer in enumerate(self.dec):
            assert isinstance(layer, DecoderLayer)
            cross = None if cross_kv is None else cross_kv[i]
            x, k, v = layer.step(x, memory, kv_cache[i, 0], kv_cache[i, 1], write, valid, cross)
            new.append(torch.stack([k, v]))
        prev = torch.full_like(token, BOS_ID) if prev_token is None else prev_token
        logp = self.copy_mix(self.dec_norm(x), pointer, token.reshape(-1, 1), prev.reshape(-1, 1))[:, 0]
        return logp, torch.stack(new)

    @staticmethod
    def write_kv(kv_cache: Tensor, kv_new: Tensor, position: Tensor) -> Tensor:
        """``kv_cache`` [L,2,B,H,T,hd] with :meth:`decode_step`'s ``kv_new`` [L,2,B,H,1,hd] stored at
        ``position`` ([1] or [B,1]); a new tensor, the input is left as it was."""
        t_max = kv_cache.shape[4]
        at = torch.arange(t_max, device=kv_cache.device).view(1, t_max) == position.reshape(-1, 1)
        return torch.where(at.view(1, 1, -1, 1, t_max, 1), kv_new, kv_cache)

    def decode_full(
        self, answer_in: Tensor, memory: Tensor, pointer: dict[str, Tensor] | None = None
    ) -> Tensor:
        """Teacher forcing: answer_in [B,La] -> log-probabilities [B,La,V] (no cache)."""
        self._need_text("decode_full")
        la = answer_in.shape[1]
        x = self.tok_emb(answer_in) + self.a_pos.weight[:la]
        for layer in self.dec:
            x = layer(x, memory)
        prev = F.pad(answer_in[:, :-1], (1, 0), value=BOS_ID)
        return self.copy_mix(self.dec_norm(x), pointer, answer_in, prev)

    def forward(
        self,
        image: Tensor,
        question_ids: Tensor,
        question_mask: Tensor,
        answer_in: Tensor,
        objects: dict[str, Tensor] | None = None,
        features: list[Tensor] | None = None,
        depth: int = 1,
    ) -> dict[str, Tensor]:
        out = self.encode(image, question_ids, question_mask, objects, features, depth)
        if self.config.has_text:
            out["answer_logits"] = self.decode_full(answer_in, out["memory"], self.pointer_of(out))
        return out

    def train(self, mode: bool = True) -> Student:
        """Training mode everywhere but, for a trunk started from a detector, its batch norms: their statistics
        stay the detector's (a few hundred photos are too few to re-estimate them)."""
        super().train(mode)
        if self.config.trunk == "ultralytics":  # a trunk from scratch learns its statistics
            for m in self.trunk.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    @torch.no_grad()
    def generate(
        self,
        image: Tensor,
        question_ids: Tensor,
        question_mask: Tensor,
        max_len: int | None = None,
        *,
        encoded: dict[str, Tensor] | None = None,
        use_cache: bool = True,
        stop_at_eos: bool = True,
        depth: int = 1,
    ) -> Tensor:
        """Greedy answer ids [B, max_len] (without <bos>); after <eos> every position is <pad>.
        ``use_cache=False`` recomputes the whole prefix each step (the reference the cache must match);
        ``stop_at_eos=False`` always runs all ``max_len`` steps (benchmarks: a fixed answer length); ``depth``:
        the recurrent block's iterations when ``encoded`` is not given."""
        self._need_text("generate")
        cfg = self.config
        t_max = cfg.max_answer_len
        n = min(max_len or t_max - 1, t_max - 1)
        if encoded is None:
            encoded = self.encode(image, question_ids, question_mask, depth=depth)
        memory = encoded["memory"]
        ptr = self.pointer_of(encoded)
        b = memory.shape[0]
        dev = memory.device
        tok = torch.full((b, 1), BOS_ID, dtype=torch.long, device=dev)
        prev = tok  # the token read before ``tok`` (<bos> before the first)
        seq = tok
        cache = self.empty_cache(b, dev)
        cross = self.cross_kv(memory) if use_cache else None
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        out: list[Tensor] = []
        history: list[list[int]] = [[] for _ in range(b)]  # each row's answer so far, for the no-repeat rule
        for i in range(n):
            if use_cache:
                assert cross is not None
                x = self.tok_emb(tok) + self.a_pos.weight[i]
                for layer, kv, cr in zip(self.dec, cache, cross, strict=True):
                    assert isinstance(layer, DecoderLayer)
                    x = layer.step_eager(x, i, kv[0], kv[1], cr)
                logits = self.copy_mix(self.dec_norm(x), ptr, tok, prev)[:, 0]
            else:
                logits = self.decode_full(seq, memory, ptr)[:, -1]
            if cfg.no_repeat_ngram or cfg.max_token_run:
                picked = [
                    greedy_token(logits[r], history[r], cfg.no_repeat_ngram, cfg.max_token_run)
                    for r in range(b)
                ]
                for h, t in zip(history, picked, strict=True):
                    h.append(t)
                nxt = torch.tensor(picked, dtype=torch.long, device=dev)
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, PAD_ID), nxt)
            out.append(nxt)
            done = done | (nxt == EOS_ID)
            prev, tok = tok, nxt.view(b, 1)
            if not use_cache:
                seq = torch.cat([seq, tok], dim=1)
            if stop_at_eos and bool(done.all()):
                break
        ids = torch.stack(out, dim=1)
        if ids.shape[1] < n:
            ids = F.pad(ids, (0, n - ids.shape[1]), value=PAD_ID)
        return ids


def _text_view(feature: Tensor, training: bool) -> Tensor:
    """A trunk feature as the text and mask branches read it: detached in training (their losses never bend the
    detector, which only the detection losses train; the text side passes ``training`` False when the student has
    no detection head: then nothing else trains its trunk); as it is otherwise (an exported graph would keep
    ``detach`` as an alias op, which ExecuTorch refuses on a channels-last tensor)."""
    return feature.detach() if training else feature


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
