"""Edits of detections for replays, and a planner that covers every class of the detector's label set.

The edits work on any graph whose state holds a :class:`~graphdistill.trace.Detections` field (and
optionally a :class:`~graphdistill.trace.Masks` field, one mask per detection, edited with them); for
visual_rag those are ``detections`` and ``masks``, and a replay from ``retrieve`` runs retrieve, reason and
compose on the edited state:

* ``relabel``: every detection of a class becomes another class of the label set (``class_ids`` and
  ``names`` change together; boxes, scores and masks stay);
* ``drop``: one detection and its mask go;
* ``duplicate``: a copy of one detection is added, mirrored left to right in the frame (box and mask), so the
  state holds one more object of that class where none overlaps it exactly.

:func:`plan_replays` spreads relabels so each class of the label set is the target about equally often for a
budget of ``n`` replays, deterministically for a seed; :func:`replay_store` plans over a store's recorded
traces and runs the plan (:func:`~graphdistill.recording.replay.replay`).
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from graphdistill.recording.photos import DEFAULT_HELDOUT
from graphdistill.recording.replay import (
    DEFAULT_FROM_NODE,
    Edit,
    ReplayError,
    ReplayRequest,
    ReplayResult,
    replay,
    why_not_parent,
)
from graphdistill.store.trace_store import TraceStore
from graphdistill.trace import RLE, Detections, Kind, Masks, Trace, decode_value

log = logging.getLogger(__name__)

EDIT_KINDS = ("relabel", "drop", "duplicate")
# the share of a budget each edit kind gets when several are asked for: relabels are what cover the classes
EDIT_WEIGHTS = {"relabel": 0.8, "drop": 0.1, "duplicate": 0.1}
DETECTIONS = "detections"
MASKS = "masks"
QUESTION = "question"  # the input a relabel also rewrites (visual_rag's question)


# --------------------------------------------------------------------------------------------------------
# the label set
# --------------------------------------------------------------------------------------------------------


def detector_labels(graph: Any) -> list[str]:
    """The class names (``names``) of the model of the node that writes a DETECTIONS field, when the graph
    declares one (GraphBuilder nodes' ``model=``); else the 80 COCO classes."""
    from graphdistill.graphs.replay import field_kinds, node_models, state_graph_of

    try:
        sg = state_graph_of(graph)
    except ValueError:
        sg = None
    if sg is not None:
        det_fields = {f for f, k in field_kinds(graph).items() if k == Kind.DETECTIONS}
        for node, model in node_models(graph).items():
            writes = set((sg.nodes[node].metadata or {}).get("graphdistill_writes") or ())
            names = getattr(model, "names", None)
            if not writes & det_fields or names is None:
                continue
            labels = list(names.values()) if isinstance(names, Mapping) else list(names)
            if labels and all(isinstance(x, str) for x in labels):
                return labels
    from graphdistill.teachers.coco import COCO_CLASSES

    return list(COCO_CLASSES)


# --------------------------------------------------------------------------------------------------------
# the edits
# --------------------------------------------------------------------------------------------------------


def _dets(state: Mapping[str, Any], field: str) -> Detections:
    dets = state.get(field)
    if not isinstance(dets, Detections):
        raise ValueError(f"the state's {field!r} is {type(dets).__name__}, not Detections")
    return dets


def _masks(state: Mapping[str, Any], field: str, n: int) -> Masks | None:
    masks = state.get(field)
    return masks if isinstance(masks, Masks) and len(masks) == n else None


def _check_index(dets: Detections, index: int, label: str | None) -> None:
    if not 0 <= index < len(dets):
        raise IndexError(f"object {index} does not exist ({len(dets)} detections)")
    if label is not None and dets.names[index] != label:
        raise ValueError(f"object {index} is a {dets.names[index]!r}, not a {label!r}")


def relabel_text(text: str, mapping: Mapping[str, str]) -> str:
    """``text`` with every whole-word mention of an old label (or its plural in -s) turned into the new one,
    all at once (so ``{cat: dog, dog: cat}`` swaps them): "How many cats are there?" -> "How many dogs are
    there?"."""
    if not mapping:
        return text
    words = sorted(mapping, key=len, reverse=True)
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")(s?)\b", re.IGNORECASE)
    lower = {k.lower(): v for k, v in mapping.items()}
    return pattern.sub(lambda m: lower[m.group(1).lower()] + m.group(2), text)


def relabel(
    mapping: Mapping[str, str],
    labels: Sequence[str],
    *,
    detections: str = DETECTIONS,
    masks: str = MASKS,
    question: str | None = QUESTION,
) -> Edit:
    """Every detection named ``old`` becomes class ``mapping[old]`` (its id: the index in ``labels``), and so
    does every mention of it in the ``question`` state field (an input: the replay records the edited
    question), so a question about the cat asks about the dog the detector now reports: without it the LLM
    answers about the cat, an object no detection names any more."""
    labels = list(labels)
    unknown = sorted(v for v in mapping.values() if v not in labels)
    if unknown:
        raise ValueError(f"relabel: {unknown} not in the detector's label set")
    ids = {name: labels.index(name) for name in mapping.values()}
    mapping = dict(sorted(mapping.items()))

    def fn(state: dict[str, Any]) -> dict[str, Any]:
        dets = _dets(state, detections)
        if not set(mapping) & set(dets.names):
            raise ValueError(f"no detection is a {' or '.join(mapping)} (found {sorted(set(dets.names))})")
        state[detections] = Detections(
            xyxy=dets.xyxy,
            class_ids=[
                ids[mapping[n]] if n in mapping else c
                for n, c in zip(dets.names, dets.class_ids, strict=True)
            ],
            names=[mapping.get(n, n) for n in dets.names],
            scores=dets.scores,
            image_size=dets.image_size,
        )
        if question is not None and isinstance(state.get(question), str):
            state[question] = relabel_text(state[question], mapping)
        return state

    return Edit("relabel", {"map": mapping}, (detections, masks), fn)


def drop(index: int, label: str | None = None, *, detections: str = DETECTIONS, masks: str = MASKS) -> Edit:
    """Detection ``index`` (checked to be a ``label`` when given) and its mask go."""

    def fn(state: dict[str, Any]) -> dict[str, Any]:
        dets = _dets(state, detections)
        _check_index(dets, index, label)
        keep = [i for i in range(len(dets)) if i != index]
        m = _masks(state, masks, len(dets))
        state[detections] = Detections(
            xyxy=[dets.xyxy[i] for i in keep],
            class_ids=[dets.class_ids[i] for i in keep],
            names=[dets.names[i] for i in keep],
            scores=[dets.scores[i] for i in keep],
            image_size=dets.image_size,
        )
        if m is not None:
            state[masks] = Masks(rles=[m.rles[i] for i in keep], scores=[m.scores[i] for i in keep])
        return state

    return Edit("drop", {"index": index, "label": label}, (detections, masks), fn)


def duplicate(
    index: int, label: str | None = None, *, detections: str = DETECTIONS, masks: str = MASKS
) -> Edit:
    """A copy of detection ``index`` mirrored left to right in the frame (box and mask) is appended."""

    def fn(state: dict[str, Any]) -> dict[str, Any]:
        dets = _dets(state, detections)
        _check_index(dets, index, label)
        width = float(dets.image_size[1])
        x1, y1, x2, y2 = dets.xyxy[index]
        m = _masks(state, masks, len(dets))
        state[detections] = Detections(
            xyxy=[*dets.xyxy, [width - x2, y1, width - x1, y2]],
            class_ids=[*dets.class_ids, dets.class_ids[index]],
            names=[*dets.names, dets.names[index]],
            scores=[*dets.scores, dets.scores[index]],
            image_size=dets.image_size,
        )
        if m is not None:
            mirrored = RLE.encode(np.ascontiguousarray(m.rles[index].decode()[:, ::-1]))
            state[masks] = Masks(rles=[*m.rles, mirrored], scores=[*m.scores, m.scores[index]])
        return state

    return Edit("duplicate", {"index": index, "label": label}, (detections, masks), fn)


def edit_from_description(
    description: Mapping[str, Any], labels: Sequence[str], *, detections: str = DETECTIONS, masks: str = MASKS
) -> Edit:
    """The edit a recorded description (``Edit.describe()``) names: replays can be re-made from provenance."""
    kind = description.get("kind")
    if kind == "relabel":
        return relabel(dict(description["map"]), labels, detections=detections, masks=masks)
    if kind in ("drop", "duplicate"):
        make = drop if kind == "drop" else duplicate
        return make(int(description["index"]), description.get("label"), detections=detections, masks=masks)
    raise ValueError(f"unknown edit kind {kind!r} (known: {', '.join(EDIT_KINDS)})")


# --------------------------------------------------------------------------------------------------------
# the planner
# --------------------------------------------------------------------------------------------------------


def trace_labels(trace: Trace, detections: str = DETECTIONS) -> list[str]:
    """The class names of the detections a trace's node wrote ([] when none)."""
    for span in reversed(trace.spans):
        if detections in span.writes:
            dets = decode_value(span.writes[detections])
            return list(dets.names) if isinstance(dets, Detections) else []
    return []


def _quotas(n: int, kinds: Sequence[str]) -> dict[str, int]:
    """``n`` split over ``kinds`` by :data:`EDIT_WEIGHTS` (largest remainder; ties in ``kinds`` order)."""
    total = sum(EDIT_WEIGHTS[k] for k in kinds)
    exact = {k: n * EDIT_WEIGHTS[k] / total for k in kinds}
    out = {k: int(v) for k, v in exact.items()}
    for k in sorted(kinds, key=lambda k: (-(exact[k] - out[k]), kinds.index(k)))[: n - sum(out.values())]:
        out[k] += 1
    return out


def plan_replays(
    traces: Sequence[Trace],
    labels: Sequence[str],
    n: int,
    seed: int = 0,
    *,
    edits: Sequence[str] = EDIT_KINDS,
    from_node: str = DEFAULT_FROM_NODE,
    detections: str = DETECTIONS,
    masks: str = MASKS,
) -> list[ReplayRequest]:
    """Up to ``n`` replay requests over ``traces`` (parents with at least one detection), deterministic for
    ``seed``. Relabels take each distinct class of a parent to a class of ``labels`` absent from it, always
    the class used least so far (ties in a seeded order), so the targets cover ``labels`` evenly; drops need
    two objects or more; duplicates one. A kind without a usable parent gives its share to the others."""
    kinds = list(dict.fromkeys(edits))
    unknown = [k for k in kinds if k not in EDIT_KINDS]
    if unknown or not kinds:
        raise ReplayError(
            f"--edits {','.join(edits)}: unknown kind(s) {unknown} (known: {', '.join(EDIT_KINDS)})"
        )
    if n < 0:
        raise ReplayError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    found = [(t, trace_labels(t, detections)) for t in traces]
    parents = [(t, names) for t, names in found if names]
    rng.shuffle(parents)
    usable = {
        "relabel": [p for p in parents if len(labels) > len(set(p[1]))],
        "drop": [p for p in parents if len(p[1]) >= 2],
        "duplicate": list(parents),
    }
    kinds = [k for k in kinds if usable[k]]
    if not kinds or n == 0:
        return []
    quotas = _quotas(n, kinds)
    order = list(labels)
    rng.shuffle(order)
    rank = {c: i for i, c in enumerate(order)}
    used: Counter[str] = Counter()
    out: list[ReplayRequest] = []
    seen: set[str] = set()

    def add(req: ReplayRequest) -> bool:
        key = req.key()
        if key in seen:
            return False
        seen.add(key)
        out.append(req)
        return True

    pool = usable.get("relabel", [])
    tried: dict[tuple[str, str], set[str]] = {}  # (parent, class) -> targets it was given already
    made, j = 0, 0
    while made < quotas.get("relabel", 0) and j < 4 * n + len(pool) * len(labels):
        t, names = pool[j % len(pool)]
        j += 1
        present = list(dict.fromkeys(names))
        taken = set(present)
        mapping: dict[str, str] = {}
        for old in present:
            free = [c for c in labels if c not in taken]
            fresh = [c for c in free if c not in tried.get((t.id, old), set())] or free
            if not fresh:
                break
            mapping[old] = min(fresh, key=lambda c: (used[c], rank[c]))
            taken.add(mapping[old])
        if add(ReplayRequest(t.id, relabel(mapping, labels, detections=detections, masks=masks), from_node)):
            made += 1
            used.update(mapping.values())
            for old, new in mapping.items():
                tried.setdefault((t.id, old), set()).add(new)
    for kind, make in (("drop", drop), ("duplicate", duplicate)):
        pool = usable[kind]
        slots = []  # every parent's first object, then every parent's second, ...
        for i in range(max((len(names) for _, names in pool), default=0)):
            slots += [(t, i, names[i]) for t, names in pool if i < len(names)]
        for t, i, label in slots[: quotas.get(kind, 0)]:
            add(ReplayRequest(t.id, make(i, label, detections=detections, masks=masks), from_node))
    if len(out) < n:
        log.info("planned %d of %d replays: the parents allow no more distinct edits", len(out), n)
    return out


def replay_parents(
    store: TraceStore, graph_hash: str, heldout_photos: Iterable[str] = DEFAULT_HELDOUT
) -> tuple[list[Trace], list[tuple[str, str]]]:
    """One parent per recorded input of the graph (its lowest-numbered sample that can be replayed) and the
    traces left out with the reason (replays themselves are left out silently)."""
    held = tuple(heldout_photos)
    best: dict[str, Trace] = {}
    refused: dict[str, tuple[str, str]] = {}
    for t in store.iter(graph=graph_hash):
        why = why_not_parent(t, held)
        if why is not None:
            if "itself a replay" not in why:
                refused.setdefault(t.group_id, (t.id, why))
            continue
        if t.group_id not in best or t.sample_index < best[t.group_id].sample_index:
            best[t.group_id] = t
    left_out = [r for g, r in refused.items() if g not in best]
    for tid, why in left_out:
        log.info("not a replay parent: trace %s: %s", tid, why)
    return list(best.values()), left_out


def replay_store(
    graph: Any,
    store: TraceStore,
    *,
    n: int,
    samples: int = 1,
    seed: int = 0,
    from_node: str = DEFAULT_FROM_NODE,
    edits: Sequence[str] = EDIT_KINDS,
    labels: Sequence[str] | None = None,
    batch_size: int = 16,
    heldout_photos: Iterable[str] = DEFAULT_HELDOUT,
    progress: Callable[[int, int], None] | None = None,
) -> ReplayResult:
    """Plan ``n`` replays over the graph's traces in ``store`` (:func:`plan_replays`; the label set from the
    graph's detector unless ``labels`` is given) and run them, ``samples`` samples each. Raises
    :class:`ReplayError` when the store holds no trace of this graph or ``from_node`` is not one of its nodes."""
    from graphdistill.graphs.replay import ReplayGraphError, graph_node_names
    from graphdistill.recording.recorder import graph_identity

    try:
        names = graph_node_names(graph)
    except ReplayGraphError as exc:
        raise ReplayError(str(exc)) from exc
    if from_node not in names:
        raise ReplayError(f"--from-node {from_node!r}: not a node of the graph ({', '.join(names)})")
    _, gid = graph_identity(graph)
    if store.count(graph=gid.hash) == 0:
        recorded = sorted({g["name"] for g in store.stats()["graphs"]})
        raise ReplayError(
            f"trace store {store.root}: holds no trace of graph {gid.name} ({gid.hash[:12]}); "
            f"it holds traces of {', '.join(recorded) or 'no graph'}"
        )
    parents, left_out = replay_parents(store, gid.hash, heldout_photos)
    plan = plan_replays(
        parents, list(labels or detector_labels(graph)), n, seed, edits=edits, from_node=from_node
    )
    result = replay(
        graph,
        store,
        plan,
        samples=samples,
        batch_size=batch_size,
        heldout_photos=heldout_photos,
        progress=progress,
    )
    result.refused = left_out + result.refused
    return result
