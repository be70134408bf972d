"""The student's configuration: :class:`StudentConfig` (saved as RUN/config.json), the size presets, and
:func:`config_from_schema`, which derives the student's heads from the teacher graph's declared outputs.

Kept free of torch so it can be read (and a config checked) without the model's dependencies.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

log = logging.getLogger(__name__)

# Output kinds of a teacher graph the student has a head for (trace.Kind values):
#   text -> answer decoder; objects -> detection + mask heads; detections -> detection head only;
#   sources -> a ranking of the KB's documents by their words (top sources_k); embedding -> regression head (cosine loss).
HEAD_KINDS = ("text", "objects", "detections", "sources", "embedding")
SINGLE_KINDS = ("text", "objects", "detections", "sources")  # at most one output of each of these
# Today's visual_rag shape: what a config.json written before `outputs` existed describes.
DEFAULT_OUTPUTS = {"answer": "text", "objects": "objects", "sources": "sources"}
# a document's tokens the sources head reads and the answer may copy (the knowledge base's facts are a sentence)
SOURCE_TOKENS = 32
# the dimensions of the retriever's space a sources head ranks in (StudentConfig.source_dims), when a node offers
# its retriever: on the demo's 240 documents 64 of MiniLM's 384 kept as much of its ranking as the student's
# query could learn (0.765 recall of unseen queries, against 0.763 with 128 and 0.768 with all 384)
SOURCE_DIMS = 64
# synthetic queries the graph's retriever ranks for the sources head (student.retrieval_kd), by default: on the
# demo's knowledge base 4,000 / 10,000 / 20,000 of them taught the head alone (SpaceSourceHead, fitted by itself)
# to recall about 0.74 / 0.75 / 0.77 of its top 3 on unseen ones; embedding 12,000 takes ~35 s on the 2-core CPU
RETRIEVAL_QUERIES = 12000


# the most iterations of the recurrent block a student may be trained for (StudentConfig.max_depth)
MAX_DEPTH = 8


# the copy path's per-query inputs (``Student.pointer``; the exported step's inputs of the same names);
# ``ptr_next`` only for a student whose copies go on where they left off (``copy_continue``)
POINTER_KEYS = ("ptr_keys", "ptr_bias", "ptr_vocab", "ptr_next")


@dataclass
class StudentConfig:
    """Everything needed to rebuild a :class:`Student`; saved as RUN/config.json."""

    image_size: int = 448  # square input side in px (multiple of 32); chosen by measurement, see README
    # the vision trunk: "ultralytics" rebuilds the teacher detector's own backbone + neck + Detect head from
    # trunk_spec (its model YAML) and starts from its weights; "timm" is `backbone` from scratch + an FPN neck
    trunk: str = "timm"
    trunk_spec: dict[str, Any] = field(default_factory=dict)
    backbone: str = "mobilenetv3_small_050"  # timm model for trunk="timm" (random init, strides 8/16/32)
    reg_max: int = 16  # DFL bins per box side (Ultralytics' default; must match a detector started from)
    num_masks: int = 32  # prototype masks (YOLACT / YOLO-seg); an object's mask is coef · protos in its box
    proto_channels: int = 32  # width of the prototype branch (it runs at stride 4: keep it thin)
    max_objects: int = (
        20  # object slots: the most objects a query returns and the object tokens the text reads
    )
    candidates: int = (
        100  # best-scoring cells kept before the in-graph (Fast) NMS; ≥ the cells above threshold
    )
    score_threshold: float = 0.25  # an object is kept at this class score: the teacher detector's own `conf`
    nms_iou: float = 0.7  # same-class boxes overlapping more than this are one object (the detector's `iou`)
    vocab_size: int = 2048  # BPE vocabulary trained on the dataset's own questions + answers (small domain)
    d_model: int = 128  # width of every transformer; the decoder's per-token cost scales with d_model²
    n_heads: int = 4  # attention heads; head dim = d_model / n_heads (32 keeps SDPA kernels efficient)
    enc_layers: int = 2  # joint encoder over registers, image, object and question tokens
    dec_layers: int = 2  # answer decoder depth: answers are short sentences, 2 layers suffice
    ffn_mult: int = 2  # FFN width = ffn_mult * d_model; 2 instead of 4 halves params at little cost here
    max_question_len: int = 32  # question tokens (incl. nothing special); longer questions are truncated
    max_answer_len: int = 48  # answer positions incl. <bos>; sets the KV-cache length T
    num_classes: int = 80  # detector classes (COCO-80 for YOLO)
    # the student-vocabulary id of each class name (" cat", " traffic light" are single tokens): the answer
    # decoder copies a detected object's label through it; 0 (<pad>) for a class with no token (never copied)
    class_token_ids: list[int] = field(default_factory=list)
    num_sources: int = 16  # knowledge-base documents the sources head ranks
    # each document's text in student tokens (at most SOURCE_TOKENS; [] for none): a document's key is built
    # from its words, so a document whose class no training row retrieved still ranks by what it says
    source_token_ids: list[list[int]] = field(default_factory=list)
    sources_k: int = 3  # the sources output is the top k documents, as the teacher's retriever returns
    # 0: the sources head ranks documents by their words (a bag of tokens, SourceHead); > 0: in the graph
    # retriever's own embedding space, this many principal directions of it: each document is the retriever's
    # embedding of its text (a constant the trainer computes from the retriever's offer), the question and
    # labels are mapped there by the student (student.retrieval_kd; set by the trainer when a node offers its
    # retriever)
    source_dims: int = 0
    # greedy decoding never repeats an n-gram this long (0: no such rule), nor writes one token more than
    # max_token_run times in a row (0: no such rule); both derived from the training answers
    # (student.train.decoding_rules)
    no_repeat_ngram: int = 0
    max_token_run: int = 0
    num_registers: int = 4  # learned tokens that gather the question+image summary for sources/embeddings
    embedding_dims: dict[str, int] = field(default_factory=dict)  # EMBEDDING outputs: name -> dim
    # The teacher graph's outputs the student has heads for: field name -> kind (one of HEAD_KINDS). Built
    # by config_from_schema; the default is the visual_rag shape.
    outputs: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_OUTPUTS))
    dropout: float = 0.0  # tiny models on small distilled sets: regularise by data, not dropout
    # the copy path goes on copying a document where the last token left it (Student.ptr_cont); False for a
    # run trained before it existed (its config.json has no such key)
    copy_continue: bool = True
    # recurrent depth R (test-time compute): the joint encoder's last layer is one weight-shared block that may be
    # iterated r = 1..R times at inference (Student.encode(depth=r)); training draws r per batch, uniformly, so
    # every r works. 1: no recurrence (the block runs once, as in a student trained before this existed)
    max_depth: int = 1
    # whether the text side (joint encoder: answer, sources' registers, embeddings) reads pixels: the image tokens
    # (P5 cells) and each object token's P4 feature. False when the teacher's answer is made from what its
    # detector found and never from the pixels themselves (``trace.GraphSchema.reads_pixels``; visual_rag's
    # reason node reads the labels, their positions and the retrieved facts): then the text reads the object
    # tokens (class, box, score) and the question only, as the teacher's LLM does, and cannot learn to follow
    # the pixels of the few training photos. True for a run trained before it existed (no such key)
    text_pixels: bool = True

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def output_of(self, kind: str) -> str | None:
        """The field name of the (single) output of ``kind``, or None when the graph has none."""
        return next((name for name, k in self.outputs.items() if k == kind), None)

    @property
    def has_text(self) -> bool:
        return "text" in self.outputs.values()

    @property
    def has_objects(self) -> bool:
        """A detection head (boxes + classes): OBJECTS or DETECTIONS output."""
        return any(k in ("objects", "detections") for k in self.outputs.values())

    @property
    def has_masks(self) -> bool:
        return "objects" in self.outputs.values()

    @property
    def has_sources(self) -> bool:
        return "sources" in self.outputs.values()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudentConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown & {"num_queries", "det_layers", "mask_size"}:
            raise ValueError(
                "this config.json is from a student with a set-prediction (DETR-style) object head, which "
                "graphdistill no longer builds: train the run again"
            )
        if unknown:
            raise ValueError(f"unknown StudentConfig fields: {sorted(unknown)}")
        return cls(**{"copy_continue": False, **d})

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32, got {self.image_size}")
        if self.trunk not in ("timm", "ultralytics"):
            raise ValueError(f"trunk must be 'timm' or 'ultralytics', got {self.trunk!r}")
        if self.trunk == "ultralytics" and not self.trunk_spec:
            raise ValueError("trunk 'ultralytics' needs trunk_spec (the detector's model YAML as a dict)")
        if not 0 < self.max_objects <= self.candidates:
            raise ValueError(
                f"max_objects ({self.max_objects}) must be between 1 and candidates ({self.candidates})"
            )
        if self.class_token_ids and len(self.class_token_ids) != self.num_classes:
            raise ValueError(
                f"class_token_ids has {len(self.class_token_ids)} ids for num_classes={self.num_classes}"
            )
        if self.source_token_ids and len(self.source_token_ids) != self.num_sources:
            raise ValueError(
                f"source_token_ids has {len(self.source_token_ids)} documents for num_sources={self.num_sources}"
            )
        if self.sources_k < 1:
            raise ValueError(f"sources_k must be at least 1, got {self.sources_k}")
        if self.source_dims < 0:
            raise ValueError(f"source_dims must be 0 (rank by words) or more, got {self.source_dims}")
        if not 1 <= self.max_depth <= MAX_DEPTH:
            raise ValueError(f"max_depth must be between 1 and {MAX_DEPTH}, got {self.max_depth}")
        if not self.text_pixels and not self.has_objects:
            raise ValueError(
                "text_pixels=False needs an objects or detections output: without pixels the text reads the "
                "detected objects, and this student detects none"
            )
        if not self.text_pixels and self.embedding_dims:
            raise ValueError(
                f"text_pixels=False: embedding outputs {sorted(self.embedding_dims)} are read from the pixels"
            )
        if self.max_answer_len < 2:
            raise ValueError("max_answer_len must leave room for <bos> and at least one token")
        self.outputs = dict(self.outputs)
        for (
            name
        ) in self.embedding_dims:  # configs from before `outputs`: embedding heads were listed here only
            self.outputs.setdefault(name, "embedding")
        bad = {n: k for n, k in self.outputs.items() if k not in HEAD_KINDS}
        if bad:
            raise ValueError(f"outputs {bad}: the student has heads for kinds {list(HEAD_KINDS)} only")
        for kind in SINGLE_KINDS:
            names = [n for n, k in self.outputs.items() if k == kind]
            if len(names) > 1:
                raise ValueError(f"outputs {names} are all of kind {kind!r}; the student has one such head")
        if self.has_masks and "detections" in self.outputs.values():
            raise ValueError("outputs: give either an 'objects' or a 'detections' output, not both")
        no_dim = [n for n, k in self.outputs.items() if k == "embedding" and n not in self.embedding_dims]
        if no_dim:
            raise ValueError(f"embedding outputs {no_dim} have no dimension in embedding_dims")
        if not self.outputs:
            raise ValueError("outputs is empty: the student needs at least one head")


# Presets size the text side (and the backbone of a trunk built from scratch); the input size is the measured
# default for both (``image_size``), below the teacher detector's 640
PRESETS: dict[str, dict[str, Any]] = {
    # the phone default: the text side is ~1 M parameters on top of the trunk (YOLO11n's is 2.6 M)
    "tiny": dict(d_model=128, n_heads=4, enc_layers=2, dec_layers=2, vocab_size=2048),
    # more capacity for bigger knowledge bases / longer answers
    "small": dict(
        d_model=256,
        n_heads=8,
        enc_layers=3,
        dec_layers=3,
        vocab_size=4096,
        backbone="mobilenetv4_conv_small",
    ),
}


def preset(name: str, **overrides: Any) -> StudentConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return StudentConfig(**{**PRESETS[name], **overrides})


def outputs_from_schema(schema: Any, embedding_dims: dict[str, int] | None = None) -> dict[str, str]:
    """A teacher graph's declared outputs (``trace.GraphSchema`` or its JSON dict) -> ``StudentConfig.outputs``.

    TEXT -> answer decoder, OBJECTS -> detection + mask heads, DETECTIONS -> detection head, SOURCES ->
    sources head, EMBEDDING -> regression head (only when ``embedding_dims`` gives its size: an embedding
    without targets cannot be learnt, so it is left out with a warning). Other kinds have no student head
    and are skipped with a warning.
    """
    from graphdistill.trace import GraphSchema

    graph = schema if isinstance(schema, GraphSchema) else GraphSchema.model_validate(schema)
    dims = embedding_dims or {}
    out: dict[str, str] = {}
    for spec in graph.outputs:
        kind = spec.kind.value
        if kind == "embedding" and spec.name not in dims:
            log.warning(
                "graph %s: EMBEDDING output %r has no targets (no dimension known); the student gets no head "
                "for it",
                graph.name,
                spec.name,
            )
            continue
        if kind not in HEAD_KINDS:
            log.warning(
                "graph %s: output %r of kind %s has no student head; skipped", graph.name, spec.name, kind
            )
            continue
        out[spec.name] = kind
    if not out:
        raise ValueError(
            f"graph {graph.name}: none of its outputs {[f.name for f in graph.outputs]} has a student head "
            f"(kinds {list(HEAD_KINDS)})"
        )
    return out


def config_from_schema(
    schema: Any,
    preset_name: str = "tiny",
    *,
    vocab_size: int | None = None,
    num_classes: int | None = None,
    num_sources: int | None = None,
    embedding_dims: dict[str, int] | None = None,
    **overrides: Any,
) -> StudentConfig:
    """The :class:`StudentConfig` whose heads are exactly those the teacher graph's output schema declares
    (see :func:`outputs_from_schema`), sized from the dataset (vocabulary, classes, KB documents). Its text side
    reads no pixels (``text_pixels=False``) when the graph's text output is made from its detections and no
    other pixels (:meth:`~graphdistill.trace.GraphSchema.reads_pixels`) and the student has no embedding head;
    ``overrides`` may set it either way."""
    from graphdistill.trace import GraphSchema

    graph = schema if isinstance(schema, GraphSchema) else GraphSchema.model_validate(schema)
    outputs = outputs_from_schema(graph, embedding_dims)
    sized: dict[str, Any] = {"outputs": outputs}
    dims = {n: d for n, d in (embedding_dims or {}).items() if outputs.get(n) == "embedding"}
    sized["embedding_dims"] = dims
    for key, value in (
        ("vocab_size", vocab_size),
        ("num_classes", num_classes),
        ("num_sources", num_sources),
    ):
        if value is not None:
            sized[key] = value
    config = preset(preset_name, **{**sized, **overrides})
    text = config.output_of("text")
    if (
        "text_pixels" not in overrides
        and text is not None
        and config.has_objects
        and not config.embedding_dims
        and graph.reads_pixels(text) is False
    ):
        log.info(
            "graph %s: %r is made from the detected objects, not the pixels: the text reads none",
            graph.name,
            text,
        )
        config = replace(config, text_pixels=False)
    return config
