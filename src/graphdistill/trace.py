"""The one typed contract every stage speaks: teacher outputs, node spans, whole-execution traces.

Everything downstream of the teacher graph (store, filtering, student, evaluation) reads these records and
nothing else. Records are validated on construction and carry ``schema_version`` from day one. Dense data
(images, masks as arrays, embeddings) never sits inline: it is a content-addressed :class:`BlobRef`
(sha256 + shape + dtype) whose bytes live once in a blob store, however many traces use them. Masks inside
records are COCO-style run-length encodings (:class:`RLE`).

Pure numpy + pydantic: importing this module pulls in no model library.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import uuid
from collections.abc import Mapping
from enum import Enum
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 1


class Kind(str, Enum):
    """Kinds of values a teacher graph reads and writes; the student's heads are derived from them."""

    IMAGE = "image"  # HxWx3 uint8 RGB
    TEXT = "text"
    DETECTIONS = "detections"  # Detections
    MASKS = "masks"  # Masks
    OBJECTS = "objects"  # list[ObjectOut]: detections joined with their masks (a final output kind)
    EMBEDDING = "embedding"  # 1-D float vector
    DOCUMENTS = "documents"  # list[Document]
    SOURCES = "sources"  # list[str] of knowledge-base document ids (a final output kind)
    TOKEN_LOGPROBS = "token_logprobs"  # TokenLogprobs
    NUMBER = "number"
    JSON = "json"  # anything JSON-serialisable


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, arbitrary_types_allowed=False)


# --------------------------------------------------------------------------------------------------------
# Blobs
# --------------------------------------------------------------------------------------------------------


class BlobRef(_Record):
    """A content-addressed reference to dense data stored once in a blob store."""

    blob: str = Field(description="sha256 hex of the stored bytes")
    shape: list[int]
    dtype: str
    media_type: Literal["image/png", "application/x-npy", "application/octet-stream"]

    @field_validator("blob")
    @classmethod
    def _hex(cls, v: str) -> str:
        if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
            raise ValueError(f"blob must be a 64-char lowercase sha256 hex digest, got {v!r}")
        return v


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_array(arr: np.ndarray) -> tuple[BlobRef, bytes]:
    """An array -> (ref, bytes). uint8 images (HxW, HxWx3, HxWx4) become PNG; anything else .npy."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype == np.uint8 and (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
        data = buf.getvalue()
        media: Literal["image/png", "application/x-npy"] = "image/png"
    else:
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        data = buf.getvalue()
        media = "application/x-npy"
    ref = BlobRef(blob=sha256_bytes(data), shape=list(arr.shape), dtype=str(arr.dtype), media_type=media)
    return ref, data


def decode_array(ref: BlobRef, data: bytes) -> np.ndarray:
    if sha256_bytes(data) != ref.blob:
        raise ValueError(f"blob {ref.blob[:12]}… is corrupt: its bytes do not hash to its name")
    if ref.media_type == "image/png":
        from PIL import Image

        arr = np.asarray(Image.open(io.BytesIO(data)))
    elif ref.media_type == "application/x-npy":
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    else:
        arr = np.frombuffer(data, dtype=np.uint8)
    if list(arr.shape) != ref.shape:
        raise ValueError(f"blob {ref.blob[:12]}… decodes to shape {list(arr.shape)}, expected {ref.shape}")
    return arr


# --------------------------------------------------------------------------------------------------------
# Masks: COCO-compatible uncompressed RLE (column-major runs, starting with a run of zeros)
# --------------------------------------------------------------------------------------------------------


class RLE(_Record):
    size: list[int] = Field(description="[height, width]")
    counts: list[int] = Field(description="alternating run lengths, column-major, first run is zeros")

    @model_validator(mode="after")
    def _check(self) -> RLE:
        if len(self.size) != 2 or min(self.size) < 0:
            raise ValueError(f"RLE size must be [height, width], got {self.size}")
        if any(c < 0 for c in self.counts):
            raise ValueError("RLE counts must be non-negative")
        if sum(self.counts) != self.size[0] * self.size[1]:
            raise ValueError(
                f"RLE counts sum to {sum(self.counts)} but size {self.size} has {self.size[0] * self.size[1]} pixels"
            )
        return self

    @classmethod
    def encode(cls, mask: np.ndarray) -> RLE:
        from graphdistill.runner.preprocess import rle_encode  # the one implementation (numpy only)

        if mask.ndim != 2:
            raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
        return cls(**rle_encode(mask))

    def decode(self) -> np.ndarray:
        from graphdistill.runner.preprocess import rle_decode

        return rle_decode(self.size, self.counts)

    def area(self) -> int:
        return int(sum(self.counts[1::2]))

    def to_coco(self) -> dict[str, Any]:
        return {"size": list(self.size), "counts": list(self.counts)}


# --------------------------------------------------------------------------------------------------------
# Teacher outputs
# --------------------------------------------------------------------------------------------------------


class Detections(_Record):
    """Boxes in pixels of the input image, xyxy; parallel lists (supervision-style)."""

    kind: Literal["detections"] = "detections"
    xyxy: list[list[float]] = Field(default_factory=list)
    class_ids: list[int] = Field(default_factory=list)
    names: list[str] = Field(default_factory=list)
    scores: list[float] = Field(default_factory=list)
    image_size: list[int] = Field(description="[height, width] of the image the boxes refer to")

    @model_validator(mode="after")
    def _check(self) -> Detections:
        n = len(self.xyxy)
        for field in ("class_ids", "names", "scores"):
            if len(getattr(self, field)) != n:
                raise ValueError(f"Detections.{field} has {len(getattr(self, field))} entries, xyxy has {n}")
        for b in self.xyxy:
            if len(b) != 4 or not all(np.isfinite(b)):
                raise ValueError(f"a box must be 4 finite numbers [x1, y1, x2, y2], got {b}")
            if b[2] < b[0] or b[3] < b[1]:
                raise ValueError(f"a box must have x2 >= x1 and y2 >= y1, got {b}")
        if len(self.image_size) != 2:
            raise ValueError(f"image_size must be [height, width], got {self.image_size}")
        return self

    def __len__(self) -> int:
        return len(self.xyxy)

    def as_objects(self) -> list[ObjectOut]:
        """The detections as mask-less :class:`ObjectOut` records, in order."""
        return [
            ObjectOut(label=label, class_id=cid, score=score, box=box)
            for box, cid, label, score in zip(self.xyxy, self.class_ids, self.names, self.scores, strict=True)
        ]


class Masks(_Record):
    """One mask per detection (same order), with the segmenter's score."""

    kind: Literal["masks"] = "masks"
    rles: list[RLE] = Field(default_factory=list)
    scores: list[float] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Masks:
        if len(self.rles) != len(self.scores):
            raise ValueError(f"Masks has {len(self.rles)} masks but {len(self.scores)} scores")
        return self

    def __len__(self) -> int:
        return len(self.rles)


class Document(_Record):
    id: str
    text: str
    distance: float | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class TokenLogprobs(_Record):
    """Per generated token: its id and the teacher's top-k (ids, log-probabilities) at that step.

    The optional ``token_texts`` / ``topk_texts`` / ``eos_ids`` let a student with a different tokenizer use
    the log-probs (it aligns pieces by characters); records written before them leave them empty.
    """

    kind: Literal["token_logprobs"] = "token_logprobs"
    tokenizer: str = Field(description="model id of the tokenizer the ids belong to")
    token_ids: list[int] = Field(default_factory=list)
    topk_ids: list[list[int]] = Field(default_factory=list)
    topk_logprobs: list[list[float]] = Field(default_factory=list)
    token_texts: list[str] = Field(
        default_factory=list,
        description="the text each generated token adds to the answer (joined: the decoded answer); [] = unknown",
    )
    topk_texts: list[list[str]] = Field(
        default_factory=list,
        description="the text each top-k alternative would have added at that step; [] = unknown",
    )
    eos_ids: list[int] = Field(default_factory=list, description="the teacher's end-of-answer token ids")

    @model_validator(mode="after")
    def _check(self) -> TokenLogprobs:
        if not (len(self.token_ids) == len(self.topk_ids) == len(self.topk_logprobs)):
            raise ValueError(
                "TokenLogprobs: token_ids, topk_ids and topk_logprobs must have one entry per token"
            )
        if self.token_texts and len(self.token_texts) != len(self.token_ids):
            raise ValueError("TokenLogprobs: token_texts must be empty or have one entry per token")
        if self.topk_texts and [len(t) for t in self.topk_texts] != [len(i) for i in self.topk_ids]:
            raise ValueError("TokenLogprobs: topk_texts must be empty or have one text per top-k id")
        return self


class ObjectOut(_Record):
    """One object of a graph's final output: a detection joined with its mask."""

    label: str
    class_id: int | None = None
    score: float
    box: list[float] = Field(description="[x1, y1, x2, y2] in pixels of the input image")
    mask: RLE | None = None

    @field_validator("box")
    @classmethod
    def _box(cls, b: list[float]) -> list[float]:
        if len(b) != 4 or b[2] < b[0] or b[3] < b[1]:
            raise ValueError(f"box must be [x1, y1, x2, y2] with x2 >= x1, y2 >= y1; got {b}")
        return b


# --------------------------------------------------------------------------------------------------------
# Graph schema and traces
# --------------------------------------------------------------------------------------------------------


class FieldSpec(_Record):
    name: str
    kind: Kind
    description: str = ""


class NodeFlow(_Record):
    """What one node of a declared graph reads and writes (``GraphBuilder.node(reads=, writes=)``)."""

    reads: list[str] = Field(default_factory=list)
    writes: dict[str, Kind] = Field(default_factory=dict)


# Kinds through which pixels reach a field only as the detector saw them: the student's own detections stand in
# for them (object tokens), so a field made from them and no other pixels needs no pixels in the student's text
OBJECT_KINDS = (Kind.DETECTIONS, Kind.OBJECTS)


class GraphSchema(_Record):
    """A teacher graph's declared inputs and outputs: machine-readable; the student's heads follow it."""

    name: str
    inputs: list[FieldSpec]
    outputs: list[FieldSpec]
    nodes: list[str] = Field(default_factory=list)
    definition_hash: str = Field(default="", description="sha256 of the graph's definition")
    offers: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="node -> what its model offers the student to start from (a JSON reference; see "
        "graphdistill.teachers.base.load_offer): e.g. a YOLO detector offers its trunk and head",
    )
    dataflow: dict[str, NodeFlow] = Field(
        default_factory=dict,
        description="node -> the fields it reads and writes, for a graph that declares them (GraphBuilder); "
        "empty when they are unknown (a LangGraph graph recorded as it is)",
    )

    def output_kinds(self) -> dict[str, Kind]:
        return {f.name: f.kind for f in self.outputs}

    def reads_pixels(self, field: str) -> bool | None:
        """Whether ``field`` is made from an IMAGE field by a chain of node reads that does not pass through a
        detections or objects field (:data:`OBJECT_KINDS`): True when the pixels reach it another way (a node
        that looks at the image, or at masks, on the way), False when they reach it only as detected objects or
        not at all, None when the graph declares no dataflow. visual_rag's answer: False (its LLM reads the
        detections, the question and documents retrieved by text), True with CLIP image retrieval."""
        if not self.dataflow:
            return None
        kinds = self.input_kinds()
        writers: dict[str, list[str]] = {}
        for node, flow in self.dataflow.items():
            kinds.update(flow.writes)
            for w in flow.writes:
                writers.setdefault(w, []).append(node)
        seen: set[str] = set()
        todo = [field]
        while todo:
            f = todo.pop()
            if f in seen:
                continue
            seen.add(f)
            kind = kinds.get(f)
            if kind == Kind.IMAGE:
                return True
            if kind in OBJECT_KINDS and f != field:
                continue
            for node in writers.get(f, []):
                todo.extend(self.dataflow[node].reads)
        return False

    def input_kinds(self) -> dict[str, Kind]:
        return {f.name: f.kind for f in self.inputs}


# The canonical fields of a teacher's final output and the output kinds that fill them, first kind preferred:
# the vote, the checks and the fidelity metrics find the answer, objects and sources by kind, not by name.
CANONICAL_KINDS: dict[str, tuple[Kind, ...]] = {
    "answer": (Kind.TEXT,),
    "objects": (Kind.OBJECTS, Kind.DETECTIONS),
    "sources": (Kind.SOURCES,),
}


def canonical_names(kinds: Mapping[str, Kind | str]) -> dict[str, str | None]:
    """``{"answer" | "objects" | "sources": the graph output that fills it}`` from ``{output name: kind}`` in
    the schema's order: the first output of the first kind in :data:`CANONICAL_KINDS`; None when none does."""
    kind_of = {name: str(getattr(k, "value", k)) for name, k in kinds.items()}
    return {
        field: next((n for want in wanted for n, k in kind_of.items() if k == want.value), None)
        for field, wanted in CANONICAL_KINDS.items()
    }


class GraphId(_Record):
    name: str
    hash: str


class NodeSpan(_Record):
    node: str
    start: float
    end: float
    reads: dict[str, Any] = Field(default_factory=dict)
    writes: dict[str, Any] = Field(default_factory=dict)
    model_id: str | None = None
    weights_sha256: str | None = None
    error: str | None = None

    @model_validator(mode="after")
    def _check(self) -> NodeSpan:
        if self.end < self.start:
            raise ValueError(f"span of node {self.node!r} ends ({self.end}) before it starts ({self.start})")
        return self

    @property
    def seconds(self) -> float:
        return self.end - self.start


class Provenance(_Record):
    """Which real photos an input was made from, and how (so splits never leak a photo)."""

    photos: list[str] = Field(default_factory=list, description="stable ids of the real source photos")
    recipe: dict[str, Any] = Field(default_factory=dict, description="the augmentation / composite recipe")


class Trace(_Record):
    """One execution of a teacher graph."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    schema_version: int = SCHEMA_VERSION
    graph: GraphId
    inputs: dict[str, Any]
    spans: list[NodeSpan] = Field(default_factory=list)
    output: dict[str, Any] = Field(default_factory=dict)
    status: Literal["ok", "error"] = "ok"
    error: str | None = None
    group_id: str = Field(description="shared by the K teacher samples of one input")
    sample_index: int = 0
    input_hash: str = Field(description="content hash of the inputs (resume, dedup)")
    provenance: Provenance = Field(default_factory=Provenance)
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: float = Field(default_factory=time.time)
    duration_s: float = 0.0

    @model_validator(mode="after")
    def _check(self) -> Trace:
        if self.schema_version > SCHEMA_VERSION:
            raise ValueError(
                f"trace schema_version {self.schema_version} is newer than this graphdistill ({SCHEMA_VERSION})"
            )
        if self.status == "error" and not self.error:
            raise ValueError("a trace with status 'error' must say what the error was")
        if self.sample_index < 0:
            raise ValueError("sample_index must be >= 0")
        if not self.id:
            raise ValueError("trace id must be non-empty")
        return self

    def blob_refs(self) -> list[BlobRef]:
        """Every blob this trace references, anywhere in inputs, spans or output."""
        refs: list[BlobRef] = []
        _collect_refs(self.inputs, refs)
        _collect_refs(self.output, refs)
        for s in self.spans:
            _collect_refs(s.reads, refs)
            _collect_refs(s.writes, refs)
        return refs

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | bytes) -> Trace:
        return cls.model_validate_json(text)


# --------------------------------------------------------------------------------------------------------
# Encoding live values (numpy, PIL, records) into JSON-safe trace values with blobs
# --------------------------------------------------------------------------------------------------------

BLOB_KEY = "__blob__"
RECORD_KEY = "__record__"

_RECORDS: dict[str, type[BaseModel]] = {
    "detections": Detections,
    "masks": Masks,
    "token_logprobs": TokenLogprobs,
}


def encode_value(value: Any, blobs: dict[str, bytes]) -> Any:
    """A live graph value -> a JSON-safe value; dense data goes into ``blobs`` (sha256 -> bytes)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, np.generic):
        return encode_value(value.item(), blobs)
    if isinstance(value, np.ndarray):
        ref, data = encode_array(value)
        blobs[ref.blob] = data
        return {BLOB_KEY: ref.model_dump()}
    if _is_pil(value):
        ref, data = encode_array(
            np.asarray(value.convert("RGB") if value.mode not in ("L", "RGB", "RGBA") else value)
        )
        blobs[ref.blob] = data
        return {BLOB_KEY: ref.model_dump()}
    if isinstance(value, BlobRef):
        return {BLOB_KEY: value.model_dump()}
    if isinstance(value, BaseModel):
        dumped = value.model_dump(mode="json")
        kind = dumped.get("kind") if isinstance(dumped, dict) else None
        if isinstance(kind, str) and kind in _RECORDS:
            return {RECORD_KEY: kind, **{k: v for k, v in dumped.items() if k != "kind"}}
        return dumped
    if isinstance(value, dict):
        return {str(k): encode_value(v, blobs) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_value(v, blobs) for v in value]
    if isinstance(value, bytes):
        h = sha256_bytes(value)
        blobs[h] = value
        return {
            BLOB_KEY: BlobRef(
                blob=h, shape=[len(value)], dtype="uint8", media_type="application/octet-stream"
            ).model_dump()
        }
    if hasattr(value, "tolist") and callable(value.tolist):  # torch tensors, without importing torch
        return encode_value(np.asarray(value.detach().cpu() if hasattr(value, "detach") else value), blobs)
    return {"__repr__": repr(value)[:2000]}


def decode_value(value: Any, load_blob: Any = None) -> Any:
    """The inverse of :func:`encode_value`. Blobs come back as arrays when ``load_blob(sha)->bytes`` is given,
    else as :class:`BlobRef`; records come back typed."""
    if isinstance(value, list):
        return [decode_value(v, load_blob) for v in value]
    if not isinstance(value, dict):
        return value
    if BLOB_KEY in value and len(value) == 1:
        ref = BlobRef.model_validate(value[BLOB_KEY])
        return decode_array(ref, load_blob(ref.blob)) if load_blob else ref
    if RECORD_KEY in value:
        kind = value[RECORD_KEY]
        data = {k: v for k, v in value.items() if k != RECORD_KEY}
        return _RECORDS[kind].model_validate(data)
    return {k: decode_value(v, load_blob) for k, v in value.items()}


def _is_pil(value: Any) -> bool:
    mod = type(value).__module__
    return mod.startswith("PIL.") and hasattr(value, "convert") and hasattr(value, "mode")


def _collect_refs(value: Any, out: list[BlobRef]) -> None:
    if isinstance(value, dict):
        if BLOB_KEY in value and len(value) == 1:
            out.append(BlobRef.model_validate(value[BLOB_KEY]))
            return
        for v in value.values():
            _collect_refs(v, out)
    elif isinstance(value, list):
        for v in value:
            _collect_refs(v, out)


def content_hash(encoded_inputs: dict[str, Any]) -> str:
    """A stable hash of encoded inputs (blob refs hash by content): the resume / dedup key."""
    return hashlib.sha256(
        json.dumps(encoded_inputs, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
