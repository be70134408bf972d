"""The reference teacher graph: a visual RAG pipeline (YOLO + SAM + Chroma + a small chat LLM).

```
START -> detect -> retrieve -> reason  --+-> compose -> END
                            -> segment --/
```

* ``detect`` (YOLO) finds objects; ``retrieve`` (Chroma over the question plus the detected labels, plus the
  image through CLIP when a CLIP checkpoint is configured; fast) follows; then ``segment`` (SAM masks every
  box, the slow step) and ``reason`` run in parallel. ``reason`` reads no masks, so the LLM never waits for
  the segmenter. (LangGraph runs nodes in supersteps: a step ends when all its nodes end, so ``segment``
  hangs off ``retrieve`` rather than ``detect``: next to ``retrieve`` it would hold ``reason`` back.)
* ``reason`` asks the LLM for a one- or two-sentence answer from the question, the objects (label + rough
  position) and the retrieved facts; it writes ``answer``, the LLM's top-k log-probabilities (``llm``)
  for soft-label distillation and its ``finish_reason`` ("stop" / "length", so filtering knows a cut-off
  answer without guessing). The default prompt (``prompt_style="fewshot"``) is a chat with three short
  worked examples: each answer first says what the photo shows with the detected labels as the detector
  spells them, then copies one fact; the facts shown are the retrieved ones about detected labels that name
  no other class of the detector. That first sentence is written by the graph (``scene_opening``,
  :func:`scene_sentence`: the labels grouped with a count and their positions, in the detector's order),
  and the LLM continues it: a 135M model told to name only the listed objects still named others ("a
  mouse" for an apple) and said the same thing differently in every sample. The answer ends at a newline
  or after two sentences (``stop``, ``max_sentences``), so a list is never cut mid-item by the token limit.
  ``"plain"`` is the single-turn prompt used before (kept to measure against:
  ``benchmarks/teacher_answers.py``);
* ``compose`` (after both branches) joins detections with their masks into ``objects`` and lists the
  ``sources``.

Batching: ``graph.batch`` runs its inputs in threads; the reason node's LLM calls go through a
:class:`~graphdistill.teachers.batching.LLMBatcher`, so concurrent calls with the same settings are answered
by one ``generate_batch`` call (same tokens as one at a time; a sampled call keeps its own seed).

Sampling contract (for recording K samples of one input): nodes read ``config["configurable"]``:
``gd_sample_index`` (int, default 0), ``gd_sampling`` (bool) and ``gd_seed`` (int, default 0). With
``gd_sampling`` true, every sample but sample 0 is drawn at temperature 0.7, top-p 0.95, with a seed derived
from ``gd_seed`` and the sample index; sample 0 always stays greedy, so it equals a plain ``invoke``.

Replays (``graphdistill.recording.replay``) run ``retrieve -> reason -> compose`` again on a recorded state
whose detections (and their masks) were edited; ``detect`` and ``segment`` do not run. A replay sets
``config["configurable"]["gd_replay_from"]`` to its start node, and ``retrieve`` then announces the coming
LLM call to the batcher, as ``detect`` does in a full run, so a batch of replays shares LLM calls.

Heavy clients (models, the Chroma collection) live in the node closures, never in the graph state.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from graphdistill.graphs.builder import GraphBuilder
from graphdistill.graphs.replay import CONF_REPLAY_FROM
from graphdistill.teachers.retriever import labelled_query
from graphdistill.trace import Detections, Document, Kind, Masks, ObjectOut

log = logging.getLogger(__name__)

SAMPLE_TEMPERATURE = 0.7
SAMPLE_TOP_P = 0.95

PROMPT_STYLES = ("fewshot", "plain")

SYSTEM_PROMPT = (
    "You answer questions about a photo. A detector lists the objects in it, and a knowledge base gives "
    "facts about them. Answer in two short sentences: first say what the photo shows, naming only the "
    "listed objects, never an object that is not listed, then copy the fact that best answers the question."
)
# the single-turn prompt of prompt_style="plain" (the reference graph's earlier prompt, kept to compare:
# benchmarks/teacher_answers.py)
PLAIN_SYSTEM_PROMPT = (
    "You answer questions about a photo. You are told which objects a detector found in it and given facts "
    "from a knowledge base. Answer in one or two short sentences. Mention the objects you see."
)
MAX_FACTS = 2  # facts shown to the few-shot prompt: a 135M model copies from a short list more reliably


@dataclass(frozen=True)
class Example:
    """A worked example of the few-shot prompt: what the detector found (label, position words), the facts,
    the question and the answer it should give."""

    objects: tuple[tuple[str, str], ...]
    facts: tuple[str, ...]
    question: str
    answer: str


# Classes none of the built-in photos shows, so a copied example label is easy to spot. The three cover: no
# detections; a question about an object the detector did not find (the answer names only what it found);
# a question about a found object.
EXAMPLES: tuple[Example, ...] = (
    Example((), (), "What is in the picture?", "The photo shows no object that I can name."),
    Example(
        (("horse", "left, large"), ("horse", "right, medium"), ("bench", "bottom, small")),
        (
            "A horse is a large hoofed mammal ridden by people or used to pull carts and carriages.",
            "Never walk directly behind a horse, because a startled horse can kick hard.",
        ),
        "Tell me something about the kite in this photo.",
        "The photo shows 2 horses, on the left and on the right, and a bench at the bottom. Never walk "
        "directly behind a horse, because a startled horse can kick hard.",
    ),
    Example(
        (("umbrella", "top left, small"), ("laptop", "center, large")),
        (
            "A laptop is a portable computer with a built-in screen and a battery.",
            "An umbrella is a folding canopy on a stick that protects from rain or sun.",
        ),
        "What is in the picture?",
        "The photo shows an umbrella at the top left and a laptop in the center. A laptop is a portable "
        "computer with a built-in screen and a battery.",
    ),
)


@dataclass
class VisualRagConfig:
    """Which weights the reference graph loads (registry names or local paths) and how it runs."""

    detector: str = "yolo11n"
    segmenter: str = "mobile_sam"
    segmenter_type: str = "vit_t"  # MobileSAM's TinyViT encoder
    llm: str = "smollm2-135m-instruct"
    embedder: str = "all-minilm-l6-v2"
    kb_path: str | None = None  # a Chroma folder; None -> $GRAPHDISTILL_HOME/kb/chroma
    kb_url: str | None = None  # a Chroma server instead of a folder
    collection: str = "coco_facts"
    k: int = 3  # documents retrieved per query
    conf: float = 0.25  # detector confidence threshold
    prompt_style: str = "fewshot"  # or "plain": the single-turn prompt used before (see PROMPT_STYLES)
    # a cap that two short sentences never reach (the stop rule ends answers; "length" means a runaway)
    max_new_tokens: int = 96
    stop: tuple[str, ...] = ("\n",)  # an answer ends at a newline (a list keeps its first whole item)
    max_sentences: int | None = 2  # ...or after two sentences
    # the LLM never repeats 3 tokens in a row of what it wrote (HFCausalLM.no_repeat_ngram): SmolLM2's greedy
    # answers otherwise loop ("a lightweight, lightweight, ...") until max_new_tokens; None: no such rule
    no_repeat_ngram: int | None = 3
    # the few-shot answer opens with scene_sentence(detections), written by the graph: the LLM continues it
    # (the objects it names are the detected ones, in the detector's words, every sample alike)
    scene_opening: bool = True
    device: str | None = "cpu"  # None -> cuda when available
    seed: int = 0
    clip_checkpoint: str | None = None  # set to add CLIP image retrieval
    clip_arch: str = "ViT-B-32"

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not 0.0 <= self.conf <= 1.0:
            raise ValueError(f"conf must be in [0, 1], got {self.conf}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {self.prompt_style!r}")
        if self.max_sentences is not None and self.max_sentences < 1:
            raise ValueError(f"max_sentences must be >= 1 or None, got {self.max_sentences}")
        if self.no_repeat_ngram is not None and self.no_repeat_ngram < 2:
            raise ValueError(f"no_repeat_ngram must be >= 2 or None, got {self.no_repeat_ngram}")
        self.stop = tuple(self.stop)

    def opens_answers(self) -> bool:
        """Whether the graph writes the answer's first sentence (:func:`scene_sentence`) and the LLM the rest."""
        return self.scene_opening and self.prompt_style == "fewshot"

    def llm_sentences(self) -> int | None:
        """How many sentences the LLM writes: ``max_sentences``, one fewer when the graph writes the opening
        (0: the opening is the whole answer, and the LLM is not asked); None: no limit."""
        sentences = self.max_sentences
        if sentences is not None and self.opens_answers():
            sentences -= 1
        return sentences

    def llm_writes(self) -> bool:
        """Whether the reason node asks the LLM at all (not when ``max_sentences=1`` leaves it no sentence)."""
        return self.llm_sentences() != 0

    def llm_options(self) -> dict[str, Any]:
        """What the reason node asks of every LLM call besides the sampling settings (the call happens only
        when :meth:`llm_writes`)."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "stop": self.stop,
            "max_sentences": self.llm_sentences(),
        }


@dataclass
class VisualRagTeachers:
    """The loaded adapters; any left as None is loaded from the config on first build."""

    detector: Any = None
    segmenter: Any = None
    llm: Any = None
    retriever: Any = None
    clip: Any = None
    locks: dict[str, threading.Lock] = field(default_factory=dict, repr=False)

    def lock(self, role: str) -> threading.Lock:
        # graph.batch runs inputs in threads; a model is used by one thread at a time
        return self.locks.setdefault(role, threading.Lock())


def load_teachers(config: VisualRagConfig, teachers: Any = None) -> VisualRagTeachers:
    """Fill in every adapter the config needs that ``teachers`` (an object or dict) does not already hold."""
    given = _as_teachers(teachers)
    if given.detector is None:
        from graphdistill.teachers.detector import YoloDetector

        given.detector = YoloDetector(
            weights=config.detector, device=config.device, seed=config.seed, conf=config.conf
        )
    if given.segmenter is None:
        from graphdistill.teachers.segmenter import SamSegmenter

        given.segmenter = SamSegmenter(
            weights=config.segmenter, model_type=config.segmenter_type, device=config.device, seed=config.seed
        )
    if given.llm is None:
        from graphdistill.teachers.llm import HFCausalLM

        given.llm = HFCausalLM(
            weights=config.llm,
            device=config.device,
            seed=config.seed,
            max_new_tokens=config.max_new_tokens,
            no_repeat_ngram=config.no_repeat_ngram,
        )
    if given.clip is None and config.clip_checkpoint:
        from graphdistill.teachers.clip import ClipEmbedder

        given.clip = ClipEmbedder(
            arch=config.clip_arch, checkpoint=config.clip_checkpoint, device=config.device
        )
    if given.retriever is None:
        given.retriever = _default_retriever(config, given.clip)
    return given


def _default_retriever(config: VisualRagConfig, clip: Any) -> Any:
    from graphdistill.teachers.retriever import ChromaRetriever
    from graphdistill.teachers.text_embedder import SentenceEmbedder

    retriever = ChromaRetriever(
        path=config.kb_path,
        url=config.kb_url,
        collection=config.collection,
        text_embedder=SentenceEmbedder(weights=config.embedder, device=config.device),
        image_embedder=clip,
        k=config.k,
    )
    # The default KB is built on first use (and completed if a build was cut short); a user's own KB
    # (kb_path / kb_url) is left as it is unless it is empty.
    if (config.kb_path is None and config.kb_url is None) or not retriever.doc_ids():
        from graphdistill.teachers.knowledge import ensure_default_kb

        n = ensure_default_kb(retriever)
        if n:
            log.info("built the default knowledge base: %s documents", n)
    return retriever


def _as_teachers(teachers: Any) -> VisualRagTeachers:
    if teachers is None:
        return VisualRagTeachers()
    if isinstance(teachers, VisualRagTeachers):
        return teachers
    roles = [f.name for f in fields(VisualRagTeachers) if f.name != "locks"]
    if isinstance(teachers, Mapping):
        unknown = sorted(set(teachers) - set(roles))
        if unknown:
            raise ValueError(f"unknown teacher role(s) {unknown}; roles: {roles}")
        found: dict[str, Any] = {r: teachers.get(r) for r in roles}
    else:
        found = {r: getattr(teachers, r, None) for r in roles}
    return VisualRagTeachers(**found)


# ---------------------------------------------------------------------------------------------------- nodes
def sampling_settings(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The LLM settings for one call under the sampling contract (see the module docstring)."""
    conf = dict((config or {}).get("configurable") or {})
    index = int(conf.get("gd_sample_index", 0) or 0)
    if not conf.get("gd_sampling") or index == 0:
        return {"temperature": 0.0, "top_p": 1.0, "seed": None}
    seed = (int(conf.get("gd_seed", 0) or 0) * 1_000_003 + index) % (2**31 - 1)
    return {"temperature": SAMPLE_TEMPERATURE, "top_p": SAMPLE_TOP_P, "seed": seed}


def _replay_from(config: Mapping[str, Any] | None) -> str | None:
    value = dict((config or {}).get("configurable") or {}).get(CONF_REPLAY_FROM)
    return str(value) if value else None


def position_words(box: Sequence[float], image_size: Sequence[int]) -> str:
    """A rough position of a box in words ("top left", "center", ...) and its size."""
    h, w = image_size
    cx = (box[0] + box[2]) / 2 / max(w, 1)
    cy = (box[1] + box[3]) / 2 / max(h, 1)
    col = "left" if cx < 1 / 3 else ("right" if cx > 2 / 3 else "")
    row = "top" if cy < 1 / 3 else ("bottom" if cy > 2 / 3 else "")
    where = " ".join(p for p in (row, col) if p) or "center"
    frac = (box[2] - box[0]) * (box[3] - box[1]) / max(w * h, 1)
    size = "large" if frac > 0.25 else ("small" if frac < 0.02 else "medium")
    return f"{where}, {size}"


NO_OBJECT = "The photo shows no object that I can name."
_IRREGULAR_PLURALS = {"person": "people", "mouse": "mice", "knife": "knives", "sheep": "sheep"}


def _plural(label: str) -> str:
    head, _, last = label.rpartition(" ")
    if last in _IRREGULAR_PLURALS:
        word = _IRREGULAR_PLURALS[last]
    elif last.endswith(("s", "sh", "ch", "x")):
        word = last if last in ("skis", "scissors") else last + "es"
    else:
        word = last + "s"
    return f"{head} {word}" if head else word


def _where_phrase(where: str) -> str:
    """The position part of :func:`position_words` as a phrase: "center" -> "in the center", "left" -> "on
    the left", "top left" -> "at the top left"."""
    if where == "center":
        return "in the center"
    if where in ("left", "right"):
        return f"on the {where}"
    return f"at the {where}"


def _and(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def scene_sentence(objects: Sequence[tuple[str, str]]) -> str:
    """The first sentence of a few-shot answer, written by the graph from what the detector found:
    ``objects`` are (label, :func:`position_words`) in the detector's order, grouped by label as the prompt
    lists them: "The photo shows 2 horses, on the left and on the right, and a bench at the bottom." A label
    seen more than 3 times is counted without positions; none found: :data:`NO_OBJECT`."""
    groups = _by_label(objects)
    if not groups:
        return NO_OBJECT
    parts = []
    for label, positions in groups.items():
        places = [_where_phrase(pos.split(",")[0].strip()) for pos in positions]
        if len(places) == 1:
            article = "an" if label[:1].lower() in "aeiou" else "a"
            parts.append(f"{article} {label} {places[0]}")
        elif len(places) <= 3:
            parts.append(f"{len(places)} {_plural(label)}, {_and(places)},")
        else:
            parts.append(f"{len(places)} {_plural(label)}")
    text = ("The photo shows " + _and(parts)).replace(",,", ",")  # a counted label's positions end in ","
    return text.rstrip(",") + "."


def _placed(detections: Detections) -> tuple[tuple[str, str], ...]:
    """(label, :func:`position_words`) of every detection, in the detector's order."""
    return tuple(
        (n, position_words(b, detections.image_size))
        for n, b in zip(detections.names, detections.xyxy, strict=True)
    )


def build_prompt(
    question: str,
    detections: Detections,
    documents: Sequence[Document],
    style: str = "fewshot",
    class_names: Sequence[str] | None = None,
    opening: bool = False,
) -> list[dict[str, str]]:
    """The chat the LLM answers (see the module docstring).

    ``fewshot``: the system instructions, the worked :data:`EXAMPLES` as user/assistant turns, then the
    detected objects (grouped by label, with a count and their positions), the facts (:func:`prompt_facts`)
    and the question. ``plain``: the system instructions and one user turn with every detection, every
    retrieved fact and the question. ``class_names``: the detector's label set (facts naming another of its
    classes are left out of the few-shot prompt); None: every label the facts' metadata and the detections
    name. ``opening`` (few-shot only): the chat ends with the answer's first sentence as an assistant message
    (:func:`scene_sentence`), for the LLM to continue.
    """
    if style == "plain":
        return _plain_prompt(question, detections, documents)
    if style != "fewshot":
        raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")
    msgs = [{"role": "system", "content": SYSTEM_PROMPT}]
    for ex in EXAMPLES:
        msgs.append({"role": "user", "content": _fewshot_turn(ex.objects, ex.facts, ex.question)})
        msgs.append({"role": "assistant", "content": ex.answer})
    objects = _placed(detections)
    facts = prompt_facts(detections, documents, class_names)
    msgs.append({"role": "user", "content": _fewshot_turn(objects, facts, question.strip())})
    if opening:
        msgs.append({"role": "assistant", "content": scene_sentence(objects)})
    return msgs


def _by_label(objects: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    """(label, position words) pairs -> each label's positions, labels in their first detection's order: how
    the prompt lists the objects and how the answer's first sentence names them."""
    where: dict[str, list[str]] = {}
    for label, pos in objects:
        where.setdefault(label, []).append(pos)
    return where


def _fewshot_turn(objects: Sequence[tuple[str, str]], facts: Sequence[str], question: str) -> str:
    lines = [f"- {len(ps)} {label}: {'; '.join(ps)}" for label, ps in _by_label(objects).items()]
    text = "Objects:\n" + "\n".join(lines) if lines else "Objects: none"
    text += "\nFacts:\n" + "\n".join(f"- {f}" for f in facts) if facts else "\nFacts: none"
    return f"{text}\nQuestion: {question}"


def prompt_facts(
    detections: Detections, documents: Sequence[Document], class_names: Sequence[str] | None = None
) -> list[str]:
    """The retrieved facts the few-shot prompt shows, in retrieval order (at most :data:`MAX_FACTS`): those
    about a detected label (a document whose metadata names no label counts as about one) that name no other
    class (a 135M model copies a fact whole, and "a toilet is a bowl ..." would name a bowl it never saw)."""
    from graphdistill.teachers.coco import mentioned_classes

    found = set(detections.names)
    vocab = (
        set(class_names or ())
        | found
        | {str(d.metadata["label"]) for d in documents if "label" in d.metadata}
    )
    out = []
    for d in documents:
        label = d.metadata.get("label")
        if label is not None and label not in found:
            continue
        if mentioned_classes(d.text, sorted(vocab))[0] - found:
            continue
        out.append(d.text)
    return out[:MAX_FACTS]


def _plain_prompt(
    question: str, detections: Detections, documents: Sequence[Document]
) -> list[dict[str, str]]:
    if len(detections):
        objects = "\n".join(
            f"- {n} ({s:.2f}, {position_words(b, detections.image_size)})"
            for n, s, b in zip(detections.names, detections.scores, detections.xyxy, strict=True)
        )
    else:
        objects = "- (no objects detected)"
    context = "\n".join(f"- {d.text}" for d in documents) or "- (no facts found)"
    user = f"Objects in the photo:\n{objects}\n\nFacts:\n{context}\n\nQuestion: {question.strip()}"
    return [{"role": "system", "content": PLAIN_SYSTEM_PROMPT}, {"role": "user", "content": user}]


def retrieval_query(question: str, detections: Detections) -> str:
    """What ``retrieve`` embeds: the question and the detected labels, each once (:func:`labelled_query`)."""
    return labelled_query(question, detections.names)


def _nodes(t: VisualRagTeachers, cfg: VisualRagConfig) -> dict[str, Callable[..., dict[str, Any]]]:
    k = cfg.k
    names = getattr(t.detector, "names", None) or []  # the detector's label set, when it tells
    class_names = [str(n) for n in (names.values() if isinstance(names, Mapping) else names)]
    llm: Any = t.llm
    if hasattr(t.llm, "generate_batch") and cfg.llm_writes():  # concurrent executions share LLM calls
        from graphdistill.teachers.batching import LLMBatcher

        # no fixed window: a lone invoke is served at once; graph.batch executions announce themselves
        # in detect, and a batch waits (up to max_wait_s) for every announced one to reach reason
        llm = LLMBatcher(t.llm, window_s=0.0, max_wait_s=2.0, lock=t.lock("llm"))
    batcher = llm if llm is not t.llm else None

    def detect(r: dict[str, Any]) -> dict[str, Any]:
        if batcher is not None:  # announced before the detector lock: executions queue there
            batcher.expect()  # this execution will reach reason (withdrawn if a node before it fails)
        try:
            with t.lock("detector"):
                return {"detections": t.detector.detect(r["image"])}
        except BaseException:
            if batcher is not None:
                batcher.cancel()
            raise

    def segment(r: dict[str, Any]) -> dict[str, Any]:
        dets: Detections = r["detections"]
        if not len(dets):
            return {"masks": Masks()}
        with t.lock("segmenter"):
            return {"masks": t.segmenter.segment(r["image"], dets.xyxy)}

    def retrieve(r: dict[str, Any], config: Any = None) -> dict[str, Any]:
        if batcher is not None and _replay_from(config) == "retrieve":
            batcher.expect()  # a replay starts here: announce its reason call as detect does
        try:
            return _retrieve(r)
        except BaseException:
            if batcher is not None:
                batcher.cancel()
            raise

    def _retrieve(r: dict[str, Any]) -> dict[str, Any]:
        query = retrieval_query(r["question"], r["detections"])
        with t.lock("retriever"):
            docs: list[Document] = list(t.retriever.query(text=query, k=k))
            if t.clip is not None and getattr(t.retriever, "image_embedder", None) is not None:
                with t.lock("clip"):
                    emb = np.asarray(t.clip.embed_images([r["image"]]))[0]
                seen = {d.id for d in docs}
                extra = [d for d in t.retriever.query(image_embedding=emb, k=k) if d.id not in seen]
                docs = docs + extra  # text hits first, then what only the image found
        return {"documents": docs}

    def reason(r: dict[str, Any], config: Any) -> dict[str, Any]:
        if not cfg.llm_writes():  # max_sentences=1: the graph's opening is the whole answer
            return {"answer": scene_sentence(_placed(r["detections"])), "llm": None, "finish_reason": "stop"}
        try:
            opens = cfg.opens_answers()
            prompt = build_prompt(
                r["question"], r["detections"], r["documents"], cfg.prompt_style, class_names, opens
            )
            settings = {**sampling_settings(config), **cfg.llm_options()}
        except BaseException:
            if batcher is not None:
                batcher.cancel()
            raise
        if llm is t.llm:
            with t.lock("llm"):
                out = t.llm.generate(prompt, **settings)
        else:  # the batcher takes the lock itself, around each model call
            out = llm.generate(prompt, **settings)
        answer = out.text.strip()
        if opens:  # the graph's opening, then what the LLM wrote after it
            answer = " ".join(p for p in (prompt[-1]["content"], answer) if p)
        return {"answer": answer, "llm": out.logprobs, "finish_reason": out.finish_reason}

    def compose(r: dict[str, Any]) -> dict[str, Any]:
        dets: Detections = r["detections"]
        masks: Masks = r["masks"]
        objects = [
            ObjectOut(
                label=dets.names[i],
                class_id=dets.class_ids[i],
                score=float(dets.scores[i]),
                box=[float(v) for v in dets.xyxy[i]],
                mask=masks.rles[i] if i < len(masks) else None,
            ).model_dump(mode="json")
            for i in range(len(dets))
        ]
        return {"objects": objects, "sources": [d.id for d in r["documents"]]}

    return {"detect": detect, "segment": segment, "retrieve": retrieve, "reason": reason, "compose": compose}


def visual_rag_builder(config: VisualRagConfig | None = None, teachers: Any = None) -> GraphBuilder:
    """The reference graph's declaration, with its models loaded (or taken from ``teachers``)."""
    config = config or VisualRagConfig()
    t = load_teachers(config, teachers)
    fn = _nodes(t, config)
    name = "visual_rag_clip" if t.clip is not None else "visual_rag"
    b = (
        GraphBuilder(name)
        .input("image", Kind.IMAGE, "the photo, HxWx3 uint8 RGB")
        .input("question", Kind.TEXT, "a question about the photo")
        .output("answer", Kind.TEXT, "one or two sentences")
        .output("objects", Kind.OBJECTS, "detected objects with their masks")
        .output("sources", Kind.SOURCES, "ids of the knowledge-base documents the answer used")
        .node(
            "detect", fn["detect"], reads=["image"], writes={"detections": Kind.DETECTIONS}, model=t.detector
        )
        .node(
            "segment",
            fn["segment"],
            reads=["image", "detections"],
            writes={"masks": Kind.MASKS},
            model=t.segmenter,
        )
        .node(
            "retrieve",
            fn["retrieve"],
            # the image only with CLIP image retrieval: without it the documents, and so the answer, are made
            # from the question and the detected labels alone (GraphSchema.reads_pixels)
            reads=["question", "detections", *(["image"] if t.clip is not None else [])],
            writes={"documents": Kind.DOCUMENTS},
            model=t.retriever,
        )
        .node(
            "reason",
            fn["reason"],
            reads=["question", "detections", "documents"],
            writes={"answer": Kind.TEXT, "llm": Kind.TOKEN_LOGPROBS, "finish_reason": Kind.TEXT},
            model=t.llm,
        )
        .node(
            "compose",
            fn["compose"],
            reads=["detections", "masks", "documents"],
            writes={"objects": Kind.OBJECTS, "sources": Kind.SOURCES},
        )
        .edge("detect", "retrieve")
        .edge("retrieve", "segment")  # an ordering edge: segment reads only the image and detections
        .edge("retrieve", "reason")
        .edge(["segment", "reason"], "compose")
    )
    return b


def visual_rag(config: VisualRagConfig | None = None, teachers: Any = None, **compile_kwargs: Any) -> Any:
    """The compiled reference teacher graph (a LangGraph ``CompiledStateGraph``)."""
    return visual_rag_builder(config, teachers).compile(**compile_kwargs)
