"""Test helpers that more than one test module uses: one copy of each, imported as ``from _fixtures import …``.

Plain constants and functions (pytest fixtures live in conftest.py; real teacher models in _models.py). Heavy
libraries (torch, the trainer, the dataset) are imported inside the functions that need them, so that
importing this module costs what importing numpy, graphdistill.trace and graphdistill.eval.metrics costs (a
subprocess test_store starts imports it too).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from graphdistill.eval.metrics import normalize_text
from graphdistill.trace import (
    RLE,
    Detections,
    Document,
    GraphId,
    NodeSpan,
    ObjectOut,
    Provenance,
    TokenLogprobs,
    Trace,
    content_hash,
    encode_value,
)

if TYPE_CHECKING:
    import pytest

    from graphdistill.dataset import DatasetRow

# ---- student configurations ---------------------------------------------------------------------------------

# The smallest student, for every test that needs *a* student to train or build: 64 px, 32 wide, two heads, one
# layer each side, four object slots, a small mask head. The texts' lengths are left to the trainer (it derives
# them from the dataset's questions and answers); a test that builds a StudentConfig itself, or needs another
# value, overrides that field (``{**TINY_STUDENT, "dec_layers": 2}``).
TINY_STUDENT: dict[str, Any] = dict(
    image_size=64,
    d_model=32,
    n_heads=2,
    enc_layers=1,
    dec_layers=1,
    max_objects=4,
    candidates=20,
    num_masks=8,
    proto_channels=16,
)

# The tiny student at 96 px, for the tests that fit synthetic shapes exactly (test_student_train: at 64 px one
# answer of four is still wrong after its 120-epoch overfit) or whose expected numbers count the 3 x 3 grid of
# stride 32 (test_student_model).
TINY_STUDENT_96: dict[str, Any] = {**TINY_STUDENT, "image_size": 96}

# The tiny run that test_export, test_edge_inputs and test_report export and evaluate also fixes short texts:
# its decoder's cache (max_answer_len positions) and its bundles stay small.
TINY_RUN: dict[str, Any] = {**TINY_STUDENT, "max_question_len": 16, "max_answer_len": 12}


# warnings exporting a student raises, let through by the tests that export one (named, never blanket)
EXPORT_WARNINGS = (
    "ignore::torch.jit.TracerWarning",
    "ignore:.*Enum subclass.*:DeprecationWarning",
    "ignore:.*Enum subclass.*:FutureWarning",
    # executorch.exir reads its edge.yaml with the legacy importlib.resources API
    "ignore:open_text is deprecated:DeprecationWarning",
    "ignore:read_text is deprecated:DeprecationWarning",
)


def tiny_train_config(dataset: Path, out: Path, **kw: Any) -> Any:
    """A TrainConfig for the tiny student on ``dataset`` into the run folder ``out``: one short epoch on the
    CPU with a 300-piece vocabulary; ``kw`` sets any other TrainConfig field."""
    from graphdistill.student.train import TrainConfig

    base: dict[str, Any] = dict(
        dataset=str(dataset),
        out=str(out),
        epochs=1,
        batch_size=8,
        device="cpu",
        vocab_size=300,
        warmup_steps=1,
        overrides=dict(TINY_STUDENT),
    )
    return TrainConfig(**{**base, **kw})


def train_tiny(dataset: Path, out: Path) -> Path:
    """The tiny run (TINY_RUN) trained on ``dataset`` through train() for one short epoch: a real run folder at
    ``out``, which is returned."""
    from graphdistill.student.train import train

    train(tiny_train_config(dataset, out, overrides=dict(TINY_RUN)))
    return out


def train_tiny_run(root: Path) -> Path:
    """The synthetic dataset (12 rows, 64 px) at ``root/ds`` and the tiny run trained on it at ``root/run``,
    which is returned."""
    from graphdistill.dataset import make_synthetic_dataset

    make_synthetic_dataset(root / "ds", n=12, seed=0, size=64)
    return train_tiny(root / "ds", root / "run")


def dataset_offering(root: Path, offers: dict[str, Any]) -> Path:
    """The synthetic dataset (6 rows, 64 px) at ``root``, its graph's nodes offering ``offers`` (node -> offer)
    to the student, as a recorded graph's nodes do."""
    from graphdistill.dataset import make_synthetic_dataset

    make_synthetic_dataset(root, n=6, seed=0, size=64)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["graph"]["offers"] = offers
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def count_row_group_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The Parquet row groups pyarrow reads from now on (``monkeypatch``: the test's), by index, in order."""
    import pyarrow.parquet as pq

    read: list[int] = []
    real = pq.ParquetFile.read_row_group

    def counting(self: Any, i: int, *a: Any, **kw: Any) -> Any:
        read.append(i)
        return real(self, i, *a, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    return read


# ---- a toy text embedder ------------------------------------------------------------------------------------


def bag_embedder(texts: Sequence[str]) -> np.ndarray:
    """A deterministic stand-in text embedder: L2-normalised bags of hashed words, after the evaluation's own
    normalisation (case, punctuation and articles go), so texts of the same words have cosine 1 and texts
    sharing no word cosine 0 (up to hash collisions in 64 bins); an empty text is the zero vector."""
    vecs = np.zeros((len(texts), 64), dtype=np.float32)
    for i, t in enumerate(texts):
        for w in normalize_text(t).split():
            vecs[i, sum(map(ord, w)) % 64] += 1.0
    return vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)


# ---- a stand-in student and its run folder ------------------------------------------------------------------


def input_key(image: np.ndarray, question: str) -> str:
    """What identifies one input (a picture and a question): the key a lookup table of outputs is kept by."""
    return hashlib.sha256(np.ascontiguousarray(image).tobytes() + question.encode()).hexdigest()


def teacher_answer(i: int, row: DatasetRow) -> dict[str, Any]:
    """A dataset row's own outputs, as a perfect student of a visual_rag-shaped graph returns them."""
    return {"answer": row.answer, "objects": list(row.objects), "sources": list(row.sources)}


class LookupStudent:
    """A stand-in student that answers every input of a dataset from a table: ``output(i, row)`` is what it
    says for the dataset's ``i``-th row (by default the row's own outputs: a perfect student)."""

    def __init__(
        self, dataset: Path, output: Callable[[int, DatasetRow], dict[str, Any]] = teacher_answer
    ) -> None:
        from graphdistill.dataset import open_dataset

        ds = open_dataset(dataset)
        self.table = {
            input_key(ds.image(row), row.question): output(i, row) for i, row in enumerate(ds.all_rows())
        }

    def predict(self, image: np.ndarray, question: str) -> dict[str, Any]:
        return self.table[input_key(image, question)]


def run_folder(root: Path, dataset: Path, n_params: int = 1000) -> Path:
    """The least a run folder holds for evaluation: weights of ``n_params`` parameters and the dataset's name."""
    from safetensors.numpy import save_file

    root.mkdir(parents=True)
    save_file({"w": np.zeros(n_params, dtype=np.float32)}, str(root / "model.safetensors"))
    (root / "meta.json").write_text(json.dumps({"dataset": str(dataset)}))
    return root


# ---- visual_rag-shaped traces, built straight from the trace records ----------------------------------------

H, W = 40, 60  # the traces' picture


def noise(seed: int, h: int = H, w: int = W) -> np.ndarray:
    """A picture of random pixels, the same for the same seed: inputs that differ."""
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def rect_mask(box: Sequence[float], h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    x1, y1, x2, y2 = (round(v) for v in box)
    m[y1:y2, x1:x2] = True
    return m


def ellipse_mask(box: Sequence[float], h: int = H, w: int = W) -> np.ndarray:
    """The ellipse inscribed in ``box`` (pixel centres inside it): a mask that is not its box."""
    x1, y1, x2, y2 = box
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    return ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1


def obj(label: str, box: Sequence[float], score: float = 0.9, mask: np.ndarray | None = None) -> ObjectOut:
    """An object as the graph outputs it; its mask fills its box unless ``mask`` is given."""
    return ObjectOut(
        label=label,
        class_id={"person": 0, "cat": 15, "dog": 16, "cup": 41}.get(label),
        score=score,
        box=list(map(float, box)),
        mask=RLE.encode(mask if mask is not None else rect_mask(box)),
    )


def make_trace(
    group: str,
    index: int,
    answer: str,
    objects: Sequence[ObjectOut] = (),
    sources: Sequence[str] = (),
    *,
    blobs: dict[str, bytes] | None = None,
    image: np.ndarray | None = None,
    question: str = "What is in the picture?",
    photos: Sequence[str] = ("photo/a",),
    documents: Sequence[Document] | None = None,
    detections: Sequence[ObjectOut] | None = None,
    logprobs: TokenLogprobs | None = None,
    finish_reason: str | None = None,
    status: str = "ok",
    node_error: str | None = None,
    tta: dict[str, Any] | None = None,
    recipe: dict[str, Any] | None = None,
) -> Trace:
    """A visual_rag-shaped trace (detect -> retrieve -> answer) built straight from the trace records: sample
    ``index`` of the input group ``group``."""
    blobs = {} if blobs is None else blobs
    img = image if image is not None else np.full((H, W, 3), 128, dtype=np.uint8)
    inputs = {"image": encode_value(img, blobs), "question": question}
    dets = list(detections) if detections is not None else list(objects)
    det_rec = Detections(
        xyxy=[o.box for o in dets],
        class_ids=[o.class_id or 0 for o in dets],
        names=[o.label for o in dets],
        scores=[o.score for o in dets],
        image_size=[H, W],
    )
    docs = (
        list(documents)
        if documents is not None
        else [Document(id=s, text=f"about {s}", distance=0.3) for s in sources]
    )
    llm_writes: dict[str, Any] = {"llm": encode_value(logprobs, blobs)} if logprobs else {}
    if finish_reason:
        llm_writes["finish_reason"] = finish_reason
    spans = [
        NodeSpan(node="detect", start=0, end=1, writes={"detections": encode_value(det_rec, blobs)}),
        NodeSpan(
            node="retrieve",
            start=1,
            end=2,
            writes={"documents": encode_value(docs, blobs)},
            error=node_error,
        ),
        NodeSpan(node="answer", start=2, end=3, writes={"answer": answer, **llm_writes}),
    ]
    output = {
        "answer": answer,
        "objects": [o.model_dump(mode="json") for o in objects],
        "sources": list(sources),
    }
    return Trace(
        graph=GraphId(name="visual_rag", hash="h"),
        inputs=inputs,
        spans=spans,
        output=output if status == "ok" else {},
        status=status,  # type: ignore[arg-type]
        error="boom" if status == "error" else None,
        group_id=group,
        sample_index=index,
        input_hash=content_hash(inputs),
        provenance=Provenance(photos=list(photos), recipe=recipe or {}),
        metadata={"tta": tta} if tta else {},
    )


def undeclared_keys(data: Mapping[str, Any], contract: Any) -> set[str]:
    """The keys of ``data`` that its TypedDict ``contract`` does not declare (a stage wrote a field its
    readers are not typed for); a missing required key fails the calling test at once."""
    assert contract.__required_keys__ <= set(data), contract.__required_keys__ - set(data)
    return set(data) - contract.__required_keys__ - contract.__optional_keys__


# ---- a toy trace store, filtered (the UI's pages) -------------------------------------------------------------


def toy_store(root: Path, groups: int = 8, k: int = 3) -> tuple[Path, Path]:
    """A trace store of ``groups`` inputs with ``k`` samples each (visual_rag-shaped, made by
    :func:`make_trace`: a cat with its mask, one source document) at ``root/store``, filtered into a dataset at
    ``root/ds``. Every third input's answer names a dog nobody detected, so the filter drops it with a reason;
    the others are kept. Returns (store, dataset)."""
    from graphdistill.filter.filtering import FilterConfig, filter_store
    from graphdistill.store.trace_store import TraceStore

    blobs: dict[str, bytes] = {}
    docs = [Document(id="doc-cat", text="A cat is a small furry animal.", distance=0.2)]
    with TraceStore(root / "store") as store:
        for g in range(groups):
            answer = "There is a dog." if g % 3 == 2 else "There is a cat."
            box = (4 + g, 6, 30 + g, 34)
            for i in range(k):
                store.append(
                    make_trace(
                        f"group-{g:02d}",
                        i,
                        answer,
                        [obj("cat", box, 0.9 - 0.01 * i, ellipse_mask(box))],
                        ["doc-cat"],
                        image=noise(g),
                        question=f"What is in picture {g}?",
                        photos=[f"photo/{g}"],
                        documents=docs,
                        blobs=blobs,
                    ),
                    blobs,
                )
        filter_store(store, root / "ds", FilterConfig(fractions=(0.5, 0.0, 0.5)))
    return root / "store", root / "ds"


# ---- the real default graph, in a home of its own --------------------------------------------------------------


def isolated_weights_home(tmp_path: Path) -> Path:
    """A GRAPHDISTILL_HOME of its own: the shared weights (read-only use) linked in, and no knowledge base,
    so the default graph builds its own KB here instead of touching the shared one."""
    from graphdistill._env import home

    shared = home()
    mine = tmp_path / "gdhome"
    mine.mkdir()
    for name in ("weights", "converted"):
        if (shared / name).exists():
            (mine / name).symlink_to(shared / name, target_is_directory=True)
    return mine


def cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``graphdistill ARGS`` in a child process with ``env``; fails the test with its stderr unless it exits 0."""
    done = subprocess.run(
        [sys.executable, "-m", "graphdistill.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done
