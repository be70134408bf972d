"""Cross-node consistency checks on a voted group: does what one node wrote agree with what another did?

Each check is a named rule; it returns a reason string when the group should be dropped, else None:

- ``failed_trace``: fewer than a quorum of the K samples finished;
- ``failed_node``: fewer than a quorum finished without a node error;
- ``empty_answer`` / ``truncated_answer``: no answer, or one cut off (finish_reason "length" where
  recorded, else no sentence end);
- ``answer_class_not_detected``: the answer names a COCO class the detector did not find;
- ``answer_denies_detected``: the answer denies a class the detector found ("no cat" beside a cat);
- ``mask_box_coverage``: a mask covers < 5 % or > 95 % of its box;
- ``source_distance``: a kept source was retrieved only past a distance threshold.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from graphdistill.filter.vote import Consensus, trace_documents, trace_failed, trace_objects, written
from graphdistill.teachers.coco import mentioned_classes
from graphdistill.trace import RECORD_KEY, Detections, Trace, decode_value

_SENTENCE_END = re.compile(r"[.!?…][\"')\]]*\s*$")


@dataclass
class CheckConfig:
    mask_min_cover: float = 0.05
    mask_max_cover: float = 0.95
    max_source_distance: float = 1.5  # squared-L2 on unit vectors (2 - 2 cos): cosine similarity 0.25
    quorum: int | None = None  # default ceil(K/2)
    class_names: Sequence[str] | None = None  # default teachers.coco.COCO_CLASSES, else labels seen
    disabled: set[str] = field(default_factory=set)


CheckFn = Callable[[Consensus, Sequence[Trace], CheckConfig], "str | None"]


@dataclass(frozen=True)
class Check:
    name: str
    fn: CheckFn
    description: str


def coco_classes() -> list[str]:
    try:
        from graphdistill.teachers.coco import COCO_CLASSES
    except ImportError:
        return []
    return list(COCO_CLASSES)


def _quorum(c: Consensus, cfg: CheckConfig) -> int:
    return cfg.quorum if cfg.quorum is not None else math.ceil(c.k / 2)


def _chosen(c: Consensus, traces: Sequence[Trace]) -> Trace | None:
    return next((t for t in traces if t.id == c.chosen_trace), None)


def _detected(c: Consensus, traces: Sequence[Trace]) -> set[str]:
    """Labels of the consensus objects and of everything the chosen sample detected."""
    labels = {o.label for o in c.objects}
    t = _chosen(c, traces)
    if t is not None:
        labels.update(trace_labels(t, c.outputs.objects))
    return labels


def trace_labels(t: Trace, objects: str | None = "objects") -> set[str]:
    """The labels of every Detections a node of ``t`` wrote (whatever the state key: user graphs name it
    as they like) and of its objects output (``objects``: its name)."""
    labels: set[str] = set()
    for span in t.spans:
        for value in span.writes.values():
            if isinstance(value, dict) and value.get(RECORD_KEY) == "detections":
                dets = decode_value(value)
                if isinstance(dets, Detections):
                    labels.update(dets.names)
    labels.update(o.label for o in trace_objects(t, objects))
    return labels


def undetected_classes(answer: str, detected: set[str], class_names: Sequence[str]) -> list[str]:
    """The classes ``answer`` names (denials aside) that are not among ``detected``, sorted."""
    mentioned, _ = mentioned_classes(answer, class_names)
    return sorted(mentioned - detected)


def check_failed_trace(c: Consensus, traces: Sequence[Trace], cfg: CheckConfig) -> str | None:
    finished = [t for t in traces if t.status == "ok"]
    q = _quorum(c, cfg)
    if len(finished) < q:
        errs = sorted({str(t.error)[:80] for t in traces if t.status != "ok"})
        return f"{len(finished)}/{c.k} samples finished (quorum {q}): {'; '.join(errs)}"
    return None


def check_failed_node(c: Consensus, traces: Sequence[Trace], cfg: CheckConfig) -> str | None:
    q = _quorum(c, cfg)
    if c.n_ok < q:
        whys = sorted({why[:80] for why in c.failures.values()})
        return f"{c.n_ok}/{c.k} samples ran every node cleanly (quorum {q}): {'; '.join(whys)}"
    return None


def check_empty_answer(c: Consensus, traces: Sequence[Trace], cfg: CheckConfig) -> str | None:
    if c.outputs.answer is None:
        return None  # the graph declares no TEXT output
    if c.answer is None or not c.answer.strip():
        return "the consensus answer is empty"
    return None


def _finish_reason(t: Trace) -> str | None:
    for value in (
        written(t, "finish_reason"),
        t.output.get("finish_reason"),
        t.metadata.get("finish_reason"),
    ):
        if isinstance(value, str):
            return value
    llm = written(t, "llm")
    if isinstance(llm, dict) and isinstance(llm.get("finish_reason"), str):
        return str(llm["finish_reason"])
    return None


def check_truncated_answer(c: Consensus, traces: Sequence[Trace], cfg: CheckConfig) -> str | None:
    if not c.answer or not c.answer.strip():
        return None  # empty_answer's business
    t = _chosen(c, traces)
    reason = _finish_reason(t) if t is not None else None
    if reason == "length":
        return "the answer hit the token limit (finish_reason 'length')"
    if reason is None and not _SENTENCE_END.search(c.answer):
        return f"the answer does not end a sentence: …{c.answer[-40:]!r}"
    return None


def _classes(cfg: CheckConfig, traces: Sequence[Trace], c: Consensus) -> list[str]:
    if cfg.class_names is not None:
        return list(cfg.class_names)
    coco = coco_classes()
    if coco:
        return coco
    return sorted(_detected(c, traces))  # fallback: the labels seen in the traces


def check_answer_class_not_detected(c: Consensus, traces: Sequence[Trace], cfg: CheckConfig) -> str | None:
    if not c.answer:
        return None
    missing = undetected_classes(c.answer, _detected(c, traces), _classes(cfg, traces, c))
    if missing:
        return f"the answer names {', '.join(missing)} but the detector found none"
    return None


def check_answer_denies_detected(c: Consensus, traces: Sequence[Trace], cfg: CheckConfig) -> str | None:
    if not c.answer:
        return None
    _, denied = mentioned_classes(c.answer, _classes(cfg, traces, c))
    found = sorted(denied & {o.label for o in c.objects})
    if found:
        return f"the answer denies {', '.join(found)} but the detector found it"
    return None


def check_mask_box_coverage(c: Consensus, traces: Sequence[Trace], cfg: CheckConfig) -> str | None:
    for o in c.objects:
        if o.mask is None:
            continue
        x1, y1, x2, y2 = o.box
        box_area = max((x2 - x1) * (y2 - y1), 1e-6)
        m = o.mask.decode()
        h, w = m.shape
        inside = m[max(int(y1), 0) : min(math.ceil(y2), h), max(int(x1), 0) : min(math.ceil(x2), w)]
        cover = float(inside.sum()) / box_area
        if cover < cfg.mask_min_cover or cover > cfg.mask_max_cover:
            return (
                f"the {o.label} mask covers {cover:.0%} of its box "
                f"(allowed {cfg.mask_min_cover:.0%}-{cfg.mask_max_cover:.0%})"
            )
    return None


def check_source_distance(c: Consensus, traces: Sequence[Trace], cfg: CheckConfig) -> str | None:
    best: dict[str, float] = {}
    for t in traces:
        for d in trace_documents(t):
            if d.distance is not None:
                best[d.id] = min(best.get(d.id, math.inf), d.distance)
    far = [(s, best[s]) for s in c.sources if s in best and best[s] > cfg.max_source_distance]
    if far:
        s, dist = far[0]
        return f"source {s!r} was retrieved at distance {dist:.3f} > {cfg.max_source_distance}"
    return None


# --------------------------------------------------------------------------------------------------------
# The greedy sample (sample 0): what the teacher answers without sampling, measured per group
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GreedyAnswer:
    """Sample 0's answer of a group: does it name only classes its own detector run found, and was it cut
    by the token limit."""

    grounded: bool
    cut_by_length: bool
    words: int


def greedy_answer(
    c: Consensus, traces: Sequence[Trace], cfg: CheckConfig | None = None
) -> GreedyAnswer | None:
    """Sample 0's answer measured (None when sample 0 failed or wrote no answer)."""
    cfg = cfg or CheckConfig()
    t = next((t for t in traces if t.sample_index == 0), None)
    name = c.outputs.answer
    if t is None or name is None or trace_failed(t) is not None:
        return None
    answer = t.output.get(name)
    if not isinstance(answer, str):
        return None
    return GreedyAnswer(
        grounded=not undetected_classes(answer, trace_labels(t, c.outputs.objects), _classes(cfg, traces, c)),
        cut_by_length=_finish_reason(t) == "length",
        words=len(answer.split()),
    )


CHECKS: list[Check] = [
    Check("failed_trace", check_failed_trace, "fewer than a quorum of samples finished"),
    Check("failed_node", check_failed_node, "fewer than a quorum of samples ran every node cleanly"),
    Check("empty_answer", check_empty_answer, "no answer"),
    Check("truncated_answer", check_truncated_answer, "the answer was cut off"),
    Check(
        "answer_class_not_detected",
        check_answer_class_not_detected,
        "the answer names a class the detector did not find",
    ),
    Check("answer_denies_detected", check_answer_denies_detected, "the answer denies a detected class"),
    Check("mask_box_coverage", check_mask_box_coverage, "a mask covers too little or too much of its box"),
    Check("source_distance", check_source_distance, "a source was retrieved from too far away"),
]


def run_checks(
    c: Consensus, traces: Sequence[Trace], cfg: CheckConfig | None = None
) -> list[tuple[str, str]]:
    """Every check the group fails, in order, as (rule name, reason); the failure checks run first."""
    cfg = cfg or CheckConfig()
    out: list[tuple[str, str]] = []
    for check in CHECKS:
        if check.name in cfg.disabled:
            continue
        reason = check.fn(c, traces, cfg)
        if reason:
            out.append((check.name, reason))
    return out


__all__ = [
    "CHECKS",
    "Check",
    "CheckConfig",
    "GreedyAnswer",
    "greedy_answer",
    "mentioned_classes",
    "run_checks",
    "trace_failed",
    "trace_labels",
    "undetected_classes",
]
