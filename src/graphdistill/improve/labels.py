"""Who labels the inputs a round picked: the teacher graph (through the normal recorder and store), a store
that already holds the teacher's recordings of them (an oracle that costs nothing to ask, for studies), or the
student itself (the self-training arms).

Every labeller appends traces to the round's trace store, so the filter, the dataset and training treat the
labels as any recording. A student's labels are traces of a one-node graph named ``student`` whose spans name
the run that made them; their ``metadata`` says which view of the input each sample answered.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from graphdistill.errors import GraphdistillError
from graphdistill.improve.uncertainty import Prediction
from graphdistill.trace import GraphId, NodeSpan, Provenance, Trace, content_hash, encode_value

Progress = Callable[[str, int, int], None]


class LabelError(GraphdistillError, ValueError):
    """A labeller could not label an input; the message names the input and why."""


def input_group(image: np.ndarray, question: str) -> str:
    """The group id (``input_hash``) the recorder gives a run on this image and question, sample 0."""
    return content_hash(encode_value({"image": image, "question": question}, {}))


class Labeller(Protocol):
    """Labels the inputs of a JSONL file into a trace store; returns how many traces it appended."""

    teacher: bool  # whether a label costs a teacher call (what the rounds' budget counts)

    def label(self, inputs: Path, store: Path, progress: Progress | None = None) -> int: ...


@dataclass
class GraphLabeller:
    """The teacher graph records each input ``samples`` times (:func:`graphdistill.recording.batch.record_inputs`,
    resumable: inputs already in the store are skipped, so a round killed mid-recording goes on)."""

    graph: str | None = None  # a graph spec (None: visual_rag)
    samples: int = 3
    tta: tuple[str, ...] = ()  # what samples > 0 see (record's --tta: "flip", "scale"), as the demo records
    graph_options: Mapping[str, Any] | None = None
    batch_size: int = 6
    teacher: bool = True

    def label(self, inputs: Path, store: Path, progress: Progress | None = None) -> int:
        from graphdistill.recording.batch import record_inputs

        total = {"n": 0, "done": 0}

        def start(n: int) -> None:
            total["n"] = n
            if progress:
                progress("teacher", 0, n)

        def advance(n: int, counts: dict[str, int]) -> None:
            total["done"] += n
            if progress:
                progress("teacher", total["done"], total["n"])

        summary = record_inputs(
            inputs,
            store,
            graph=self.graph,
            graph_options=self.graph_options,
            samples=self.samples,
            tta=self.tta,
            resume=True,
            batch_size=self.batch_size,
            on_start=start,
            progress=advance,
        )
        return int(summary["recorded"]) + int(summary["failed"])


@dataclass
class StoreLabeller:
    """The teacher's answers read from a store that already recorded these inputs (the same graph run earlier:
    a study re-using one recording, or a team's shared store): each input's first ``samples`` traces are
    copied into the round's store. An input the source never recorded is an error naming it."""

    source: Path
    samples: int = 3
    teacher: bool = True

    def label(self, inputs: Path, store: Path, progress: Progress | None = None) -> int:
        from graphdistill.images import load_image
        from graphdistill.recording.batch import read_inputs
        from graphdistill.store.trace_store import TraceStore

        rows, _ = read_inputs(inputs)
        copied = 0
        with TraceStore(self.source, readonly=True, check=False) as src, TraceStore(store) as dst:
            have, groups = dst.groups(), src.groups()
            for n, row in enumerate(rows):
                gid = input_group(load_image(row["image"]), row["question"])
                if gid not in groups:
                    raise LabelError(
                        f"input {row['image']} ({row['question']!r}): the store {self.source} never recorded it"
                    )
                if gid not in have:
                    traces = sorted((src.get(t) for t in groups[gid]), key=lambda t: t.sample_index)
                    for t in traces[: self.samples]:
                        dst.copy_from(src, t)
                        copied += 1
                if progress:
                    progress("teacher (recorded)", n + 1, len(rows))
        return copied


VIEW_AGREEMENT = (
    "view_agreement"  # a student label's metadata: the answer vote's share across its predictions
)


def view_agreement(trace: Trace) -> float:
    """A rule's value (:class:`graphdistill.filter.rules.Rule`): how many of the student's predictions of this
    input agreed on the answer (the vote's winning share); 1 for a trace the student did not label, so a
    teacher's inputs are never judged by it."""
    return float(trace.metadata.get(VIEW_AGREEMENT, 1.0))


def student_traces(
    image: np.ndarray,
    question: str,
    predictions: Sequence[Prediction],
    *,
    run: Path,
    weights: str,
    provenance: Mapping[str, Any],
    blobs: dict[str, bytes],
    agreement: float | None = None,
) -> list[Trace]:
    """The student's ``predictions`` of one input as the samples of one trace group (the input's own group id,
    as the recorder would give it): the labels of a self-training round. ``agreement``: the answer vote's share
    across them, kept in each trace's metadata (:func:`view_agreement`)."""
    inputs = {"image": encode_value(image, blobs), "question": question}
    gid = content_hash(inputs)
    now = time.time()
    out = []
    for i, p in enumerate(predictions):
        result = encode_value(dict(p.result), blobs)
        out.append(
            Trace(
                graph=GraphId(name="student", hash=weights[:16]),
                inputs=inputs,
                spans=[
                    NodeSpan(
                        node="student",
                        start=now,
                        end=now,
                        reads={"question": p.question},
                        writes=result,
                        model_id=str(run),
                        weights_sha256=weights,
                    )
                ],
                output=result,
                group_id=gid,
                sample_index=i,
                input_hash=gid,
                provenance=Provenance.model_validate(dict(provenance)),
                metadata={
                    "labeller": "student",
                    "view": p.view,
                    "question_asked": p.question,
                    **({VIEW_AGREEMENT: agreement} if agreement is not None else {}),
                },
            )
        )
    return out


@dataclass
class StudentLabeller:
    """The student labels the inputs itself (self-training): its predictions of each input (the photo, its
    test-time views mapped back and the question reworded: :func:`~graphdistill.improve.uncertainty.augmented_predictions`)
    become the samples of the input's trace group, so the filter votes across them and runs its checks; with
    ``views=False`` only the photo's own answer, one sample (the unfiltered arm)."""

    run: Path
    views: bool = True
    augmentations: tuple[str, ...] = ("flip", "scale")
    embedder: Any | None = None  # the answer vote's (None: identical normalised texts only)
    teacher: bool = False

    def label(self, inputs: Path, store: Path, progress: Progress | None = None) -> int:
        from graphdistill.images import load_image
        from graphdistill.improve.uncertainty import augmented_predictions
        from graphdistill.recording.batch import read_inputs
        from graphdistill.runner.vote import vote_answers
        from graphdistill.store.trace_store import TraceStore
        from graphdistill.student.loader import PAD_VALUE
        from graphdistill.student.predict import load_student
        from graphdistill.weights import sha256_file

        student = load_student(self.run)
        outputs = student.config.outputs
        weights = sha256_file(self.run / "model.safetensors")
        rows, _ = read_inputs(inputs)
        added = 0
        with TraceStore(store) as dst:
            have = dst.groups()
            for n, row in enumerate(rows):
                image = load_image(row["image"])
                if input_group(image, row["question"]) not in have:
                    preds = augmented_predictions(
                        image,
                        row["question"],
                        lambda img, q: student.predict(img, q),
                        outputs,
                        augmentations=self.augmentations if self.views else (),
                        reword=self.views,
                        pad_value=PAD_VALUE,
                        size=student.config.image_size,
                    )
                    answers = [
                        str(p.result.get(f) or "") for p in preds for f, k in outputs.items() if k == "text"
                    ]
                    share = vote_answers(answers, len(answers), self.embedder)[1] if answers else 1.0
                    blobs: dict[str, bytes] = {}
                    for t in student_traces(
                        image,
                        row["question"],
                        preds,
                        run=self.run,
                        weights=weights,
                        provenance=row["provenance"],
                        blobs=blobs,
                        agreement=share,
                    ):
                        dst.append(t, blobs)
                        added += 1
                if progress:
                    progress("student labels", n + 1, len(rows))
        return added
