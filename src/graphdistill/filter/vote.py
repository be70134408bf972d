"""Voting across the K teacher samples of one input (the traces that share a ``group_id``).

- answers are clustered by meaning (identical normalised text, or embedding cosine >= a threshold); the
  largest cluster wins and its most central answer is the target;
- objects are matched across samples by class and IoU, kept when a quorum of samples found them, boxes
  fused weighted by score and masks fused by pixel majority;
- sources (retrieved document ids) are kept when a quorum of samples retrieved them;
- outputs are found by their declared kind, not their name (:class:`OutputNames`): the first TEXT output
  is the answer, the first OBJECTS (else DETECTIONS) output the objects, the first SOURCES output the
  sources; EMBEDDING outputs are averaged over the samples;
- samples recorded with test-time augmentation (``trace.metadata["tta"] = {"flip", "scale",
  "orig_size"}``: the sample saw the original image resized by ``scale`` and, if ``flip``, mirrored left to
  right) are mapped back to the original frame first.

Each agreement is a fraction of the K samples. Pure numpy; the default embedder (MiniLM) loads lazily.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphdistill.errors import GraphdistillError
from graphdistill.recording.tta import tta_of, untta_object
from graphdistill.runner.vote import Embedder as Embedder  # re-exported: the filter's embedder type
from graphdistill.runner.vote import fuse_objects, vote_answers, vote_sources
from graphdistill.trace import (
    RLE,
    BlobRef,
    Detections,
    Document,
    GraphSchema,
    Kind,
    ObjectOut,
    Provenance,
    TokenLogprobs,
    Trace,
    canonical_names,
    decode_array,
    decode_value,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------
# Reading values out of traces
# --------------------------------------------------------------------------------------------------------


def written(trace: Trace, key: str) -> Any:
    """The decoded value the last span that wrote ``key`` wrote (blobs as BlobRef), or None."""
    for span in reversed(trace.spans):
        if key in span.writes:
            return decode_value(span.writes[key])
    return None


def trace_failed(trace: Trace) -> str | None:
    """Why a trace cannot vote (failed trace or failed node), or None."""
    if trace.status == "error":
        return f"trace failed: {trace.error}"
    for span in trace.spans:
        if span.error:
            return f"node {span.node!r} failed: {span.error}"
    return None


# --------------------------------------------------------------------------------------------------------
# Which output is which: by declared kind, not by name
# --------------------------------------------------------------------------------------------------------

# visual_rag's output names, for traces whose graph schema was not recorded
_KINDS_BY_NAME = {"answer": Kind.TEXT, "objects": Kind.OBJECTS, "sources": Kind.SOURCES}


@dataclass(frozen=True)
class OutputNames:
    """Which of a graph's outputs is the answer (TEXT), the objects (OBJECTS, else DETECTIONS), the sources
    (SOURCES) and its embeddings (EMBEDDING); None when the graph has no output of that kind."""

    answer: str | None = "answer"
    objects: str | None = "objects"
    sources: str | None = "sources"
    embeddings: tuple[str, ...] = ()

    @classmethod
    def from_kinds(cls, kinds: Mapping[str, Kind | str]) -> OutputNames:
        """From ``{output name: kind}`` in the schema's order (:func:`~graphdistill.trace.canonical_names`)."""
        names = canonical_names(kinds)
        return cls(
            answer=names["answer"],
            objects=names["objects"],
            sources=names["sources"],
            embeddings=tuple(n for n, k in kinds.items() if Kind(k) == Kind.EMBEDDING),
        )


def recorded_schema(traces: Sequence[Trace]) -> GraphSchema | None:
    """The GraphSchema a trace carries in its metadata ("graph_schema" or "schema"), if any."""
    for t in traces:
        for key in ("graph_schema", "schema"):
            raw = t.metadata.get(key)
            if isinstance(raw, dict):
                try:
                    return GraphSchema.model_validate(raw)
                except ValueError:
                    continue
    return None


def infer_kind(value: Any) -> Kind | None:
    """The kind a recorded (encoded) output value looks like; None when it cannot tell (empty, null)."""
    v = decode_value(value)
    if isinstance(v, str):
        return Kind.TEXT
    if isinstance(v, bool) or v is None:
        return None if v is None else Kind.JSON
    if isinstance(v, (int, float)):
        return Kind.NUMBER
    if isinstance(v, Detections):
        return Kind.DETECTIONS
    if isinstance(v, TokenLogprobs):
        return Kind.TOKEN_LOGPROBS
    if isinstance(v, BlobRef):
        if len(v.shape) == 1 and v.dtype.startswith("float"):
            return Kind.EMBEDDING
        return Kind.IMAGE if v.media_type == "image/png" else Kind.JSON
    if isinstance(v, list) and v:
        if all(isinstance(x, float) for x in v):
            return Kind.EMBEDDING
        if all(isinstance(x, str) for x in v):
            return Kind.SOURCES
        if all(isinstance(x, dict) and "box" in x and "label" in x for x in v):
            return Kind.OBJECTS
        if all(isinstance(x, dict) and "id" in x and "text" in x for x in v):
            return Kind.DOCUMENTS
        return Kind.JSON
    return None if isinstance(v, list) else Kind.JSON


def output_kinds(traces: Sequence[Trace]) -> dict[str, Kind]:
    """Each output's kind: as the recorded graph schema declares it, else inferred (visual_rag's names by
    name, any other output from the values the samples recorded for it)."""
    schema = recorded_schema(traces)
    if schema is not None:
        return schema.output_kinds()
    kinds: dict[str, Kind | None] = {}
    for t in traces:
        if t.status != "ok":
            continue
        for name, kind in output_kinds_of_trace(t).items():
            if kinds.get(name) is None:
                kinds[name] = kind
    return {n: k or Kind.JSON for n, k in kinds.items()}


def output_kinds_of_trace(t: Trace) -> dict[str, Kind | None]:
    """The kind each output of one trace looks like (visual_rag's names by name); None where it cannot
    tell (an empty value): another sample may."""
    return {name: _KINDS_BY_NAME.get(name) or infer_kind(value) for name, value in t.output.items()}


def output_names(traces: Sequence[Trace]) -> OutputNames:
    """Which output is the answer / objects / sources / embeddings (see :func:`output_kinds`)."""
    return OutputNames.from_kinds(output_kinds(traces))


def trace_objects(trace: Trace, name: str | None = "objects") -> list[ObjectOut]:
    """The objects output ``name`` (OBJECTS, or DETECTIONS turned into mask-less objects)."""
    raw = decode_value(trace.output.get(name)) if name else None
    if isinstance(raw, Detections):
        return raw.as_objects()
    return [o if isinstance(o, ObjectOut) else ObjectOut.model_validate(o) for o in raw or []]


def trace_sources(trace: Trace, name: str | None = "sources") -> list[str]:
    raw = (trace.output.get(name) if name else None) or []
    out: list[str] = []
    for s in raw:
        sid = s.get("id") if isinstance(s, dict) else s
        if sid is not None and str(sid) not in out:
            out.append(str(sid))
    return out


def trace_documents(trace: Trace) -> list[Document]:
    docs = written(trace, "documents") or []
    out = []
    for d in docs:
        try:
            out.append(d if isinstance(d, Document) else Document.model_validate(d))
        except ValueError:
            continue
    return out


def trace_logprobs(trace: Trace) -> TokenLogprobs | None:
    v = written(trace, "llm")
    if isinstance(v, TokenLogprobs):
        return v
    if isinstance(v, dict):  # an LLMOutput-like dict carrying its logprobs
        inner = v.get("logprobs")
        if isinstance(inner, TokenLogprobs):
            return inner
        try:
            return TokenLogprobs.model_validate(inner if isinstance(inner, dict) else v)
        except ValueError:
            return None
    return None


def trace_embedding(
    trace: Trace, name: str, load_blob: Callable[[str], bytes] | None = None
) -> np.ndarray | None:
    """The EMBEDDING output ``name`` as a 1-D float vector: recorded inline (list) or as a blob, which
    ``load_blob(sha) -> bytes`` reads; None when absent or unreadable."""
    raw = decode_value(trace.output.get(name))
    if isinstance(raw, BlobRef):
        if load_blob is None:
            return None
        raw = decode_array(raw, load_blob(raw.blob))
    if raw is None:
        return None
    vec = np.asarray(raw, dtype=np.float64)
    return vec.ravel() if vec.size and np.issubdtype(vec.dtype, np.number) else None


def image_ref(trace: Trace) -> BlobRef | str | None:
    """The input image of a trace: a BlobRef (recorded array) or a path string."""
    v = decode_value(trace.inputs.get("image"))
    if isinstance(v, (BlobRef, str)):
        return v
    return None


# --------------------------------------------------------------------------------------------------------
# The vote
# --------------------------------------------------------------------------------------------------------


@dataclass
class Consensus:
    """One consensus target per input (group)."""

    group_id: str
    trace_ids: list[str]
    k: int  # samples recorded
    n_ok: int  # samples that could vote
    question: str
    image: BlobRef | str | None
    answer: str | None
    objects: list[ObjectOut]
    sources: list[str]
    agreement: dict[str, float]  # answer, objects, sources
    provenance: Provenance
    llm_topk: TokenLogprobs | None
    chosen_trace: str | None  # the trace whose answer was chosen
    failures: dict[str, str] = field(default_factory=dict)  # trace id -> why it could not vote
    answer_clusters: list[list[str]] = field(default_factory=list)
    outputs: OutputNames = field(default_factory=OutputNames)  # which graph output each field came from
    embeddings: dict[str, list[float]] = field(default_factory=dict)  # output name -> mean over samples
    ground_truth: dict[str, Any] | None = None  # human labels the input carried, if any


class FilterError(GraphdistillError, ValueError):
    """The store cannot be filtered (empty, unreadable images, ...); the message names what."""


def load_image_of(c: Consensus, load_blob: Callable[[str], bytes]) -> np.ndarray:
    """The consensus's input image as HxWx3 uint8 (a blob of the store, read with ``load_blob``, or the
    recorded path)."""
    from graphdistill.images import load_image, to_rgb_uint8
    from graphdistill.trace import decode_array

    if isinstance(c.image, BlobRef):
        return to_rgb_uint8(decode_array(c.image, load_blob(c.image.blob)), f"blob {c.image.blob[:12]}")
    if isinstance(c.image, str):
        return load_image(c.image)
    raise FilterError(f"group {c.group_id}: its traces record no input image")


def vote_objects(
    per_sample: Sequence[Sequence[ObjectOut]], k: int, quorum: int, iou: float = 0.5
) -> tuple[list[ObjectOut], float]:
    """Match objects across samples by class and IoU; keep those a quorum found; fuse boxes and masks
    (:func:`graphdistill.runner.vote.fuse_objects`, which the student's test-time views are fused with too)."""
    as_dicts = [
        [
            {
                "label": o.label,
                "class_id": o.class_id,
                "score": o.score,
                "box": o.box,
                "mask": {"size": o.mask.size, "counts": o.mask.counts} if o.mask is not None else None,
            }
            for o in objs
        ]
        for objs in per_sample
    ]
    fused = fuse_objects(as_dicts, quorum, iou)
    kept = [ObjectOut(**{**o, "mask": RLE(**o["mask"]) if o["mask"] is not None else None}) for o, _ in fused]
    if not any(per_sample):
        agreement = 1.0
    elif fused:
        agreement = float(np.mean([n / max(k, 1) for _, n in fused]))
    else:  # objects were seen but no sample agreed with another: only the empty-handed samples agree
        agreement = sum(1 for objs in per_sample if not objs) / max(k, 1)
    return kept, agreement


def vote_group(
    traces: Sequence[Trace],
    *,
    embedder: Embedder | None = None,
    answer_threshold: float = 0.85,
    iou: float = 0.5,
    quorum: int | None = None,
    names: OutputNames | None = None,
    load_blob: Callable[[str], bytes] | None = None,
) -> Consensus:
    """The consensus of the K samples of one input. Failed traces count in K but do not vote.

    ``names``: which output is which (default: from these traces, see :func:`output_names`).
    ``load_blob``: reads embeddings recorded as blobs (without it only inline embeddings are averaged)."""
    if not traces:
        raise ValueError("vote_group needs at least one trace")
    names = names or output_names(traces)
    traces = sorted(traces, key=lambda t: (t.sample_index, t.id))
    k = len(traces)
    q = quorum if quorum is not None else math.ceil(k / 2)
    failures = {t.id: why for t in traces if (why := trace_failed(t))}
    ok = [t for t in traces if t.id not in failures]
    # The consensus refers to the un-augmented input: the first sample without TTA (sample 0's input).
    base = next((t for t in traces if tta_of(t) is None), traces[0])
    question = str(base.inputs.get("question", ""))

    answers: list[tuple[Trace, str]] = []
    if names.answer is not None:
        answers = [(t, a) for t in ok if isinstance(a := t.output.get(names.answer), str)]
    idx, ag_answer, clusters = vote_answers([a for _, a in answers], k, embedder, answer_threshold)
    if names.answer is None:  # nothing to disagree about
        ag_answer = 1.0
    chosen = answers[idx][0] if idx is not None else None

    per_sample_objects = []
    for t in ok:
        tta = tta_of(t)
        objs = trace_objects(t, names.objects)
        per_sample_objects.append([untta_object(o, tta) for o in objs] if tta else objs)
    objects, ag_objects = vote_objects(per_sample_objects, k, q, iou)
    sources, ag_sources = vote_sources([trace_sources(t, names.sources) for t in ok], k, q)
    return Consensus(
        group_id=base.group_id,
        trace_ids=[t.id for t in traces],
        k=k,
        n_ok=len(ok),
        question=question,
        image=image_ref(base),
        answer=answers[idx][1] if idx is not None else None,
        objects=objects,
        sources=sources,
        agreement={
            "answer": ag_answer,
            "objects": ag_objects if ok else 0.0,
            "sources": ag_sources if ok else 0.0,
        },
        provenance=base.provenance,
        llm_topk=trace_logprobs(chosen) if chosen is not None else None,
        chosen_trace=chosen.id if chosen is not None else None,
        failures=failures,
        answer_clusters=[[answers[i][0].id for i in c] for c in clusters],
        outputs=names,
        embeddings=mean_embeddings(ok, names.embeddings, load_blob),
        ground_truth=ground_truth_of(base),
    )


def mean_embeddings(
    traces: Sequence[Trace], names: Sequence[str], load_blob: Callable[[str], bytes] | None = None
) -> dict[str, list[float]]:
    """Each EMBEDDING output averaged over the samples that recorded it (un-augmented samples only when
    there are any: an augmented view's embedding describes another image)."""
    plain = [t for t in traces if tta_of(t) is None] or list(traces)
    out: dict[str, list[float]] = {}
    for name in names:
        vecs = [v for t in plain if (v := trace_embedding(t, name, load_blob)) is not None]
        same = [v for v in vecs if v.shape == vecs[0].shape] if vecs else []
        if same:
            out[name] = [float(x) for x in np.mean(same, axis=0)]
    return out


def ground_truth_of(trace: Trace) -> dict[str, Any] | None:
    """Human labels an input carries (``ground_truth`` in the trace's inputs or metadata), e.g.
    ``{"answer": str, "objects": [ObjectOut-like dicts], "sources": [doc ids]}``; None when absent."""
    for where in (trace.inputs, trace.metadata):
        gt = decode_value(where.get("ground_truth"))
        if isinstance(gt, dict) and gt:
            return gt
    return None


_DEFAULT_EMBEDDER: Any = None


def default_embedder() -> Embedder:
    """MiniLM (the teacher's own text embedder), loaded once."""
    global _DEFAULT_EMBEDDER
    if _DEFAULT_EMBEDDER is None:
        from graphdistill.teachers.text_embedder import SentenceEmbedder

        _DEFAULT_EMBEDDER = SentenceEmbedder()
    emb = _DEFAULT_EMBEDDER

    def embed(texts: Sequence[str]) -> np.ndarray:
        return np.asarray(emb.embed(list(texts)), dtype=np.float32)

    return embed
