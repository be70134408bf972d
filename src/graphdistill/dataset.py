"""The filtered dataset: a self-contained folder the student trains on (see docs/design.md).

```
DATASET/manifest.json                 format, graph schema, class_names, documents, split sizes, provenance
DATASET/{train,val,test}.parquet      one row per input: the consensus of its K teacher samples
DATASET/blobs/<sha[:2]>/<sha>         the input images (PNG) the rows reference
DATASET/report/                       the filter report (written by the filter, not here)
```

:class:`DatasetWriter` writes it, :func:`open_dataset` reads it back (objects typed as
:class:`~graphdistill.trace.ObjectOut`, image blobs verified against their hash), and
:func:`make_synthetic_dataset` draws a small dataset of shapes with known answers so the student can be
trained and tested before any real trace exists. Pure numpy + Pillow + pyarrow.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from graphdistill.errors import GraphdistillError
from graphdistill.trace import (
    RLE,
    BlobRef,
    FieldSpec,
    GraphSchema,
    Kind,
    ObjectOut,
    TokenLogprobs,
    decode_array,
    encode_array,
)

log = logging.getLogger(__name__)

FORMAT = "graphdistill-dataset/1"
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
ROW_GROUP = 256  # rows the writer holds per split before it writes them out as one Parquet row group

# column name -> pyarrow type name (built lazily so importing this module stays cheap)
COLUMNS = (
    "id",
    "image",
    "image_height",
    "image_width",
    "question",
    "answer",
    "objects",
    "sources",
    "agreement_answer",
    "agreement_objects",
    "agreement_sources",
    "provenance_photos",
    "llm_topk",
    "trace_ids",
    "split",
)
# columns added later: written by every writer, read as null from datasets written before them
OPTIONAL_COLUMNS = (
    "embeddings",  # JSON {EMBEDDING output name: [float, ...]} or null (student.loader.row_embeddings)
    "ground_truth",  # JSON {"answer", "objects", "sources"} of human labels, or null
    # JSON {"parent_trace", "from_node", "edit"} for a counterfactual replay (recording.replay), else null:
    # the row's objects were edited, they do NOT describe its image
    "replay",
)


class DatasetError(GraphdistillError, ValueError):
    """A dataset folder is missing, incomplete or corrupt; the message names the file at fault."""


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("image", pa.string()),
            ("image_height", pa.int32()),
            ("image_width", pa.int32()),
            ("question", pa.string()),
            ("answer", pa.string()),
            ("objects", pa.string()),  # JSON list of ObjectOut
            ("sources", pa.list_(pa.string())),
            ("agreement_answer", pa.float32()),
            ("agreement_objects", pa.float32()),
            ("agreement_sources", pa.float32()),
            ("provenance_photos", pa.list_(pa.string())),
            ("llm_topk", pa.string()),  # JSON TokenLogprobs or null
            ("trace_ids", pa.list_(pa.string())),
            ("split", pa.string()),
            ("embeddings", pa.string()),
            ("ground_truth", pa.string()),
            ("replay", pa.string()),
        ]
    )


def blob_path(root: Path, sha: str) -> Path:
    return root / "blobs" / sha[:2] / sha


def _objects_json(objects: Any) -> str:
    out = []
    for o in objects or []:
        obj = o if isinstance(o, ObjectOut) else ObjectOut.model_validate(o)
        out.append(obj.model_dump(mode="json"))
    return json.dumps(out, separators=(",", ":"))


def _embeddings_json(embeddings: Any) -> str | None:
    if not embeddings:
        return None
    vecs = {str(name): [float(x) for x in vec] for name, vec in dict(embeddings).items()}
    return json.dumps(vecs, separators=(",", ":"))


def _ground_truth_json(gt: Any) -> str | None:
    """Human labels -> JSON with the fields the evaluation scores; objects default to score 1."""
    if not gt:
        return None
    if not isinstance(gt, dict):
        raise ValueError(
            f"ground_truth must be an object {{answer, objects, sources}}, got {type(gt).__name__}"
        )
    out: dict[str, Any] = {}
    if gt.get("answer") is not None:
        out["answer"] = str(gt["answer"])
    if gt.get("objects") is not None:
        objs = [
            o if isinstance(o, ObjectOut) else ObjectOut.model_validate({"score": 1.0, **o})
            for o in gt["objects"]
        ]
        out["objects"] = [o.model_dump(mode="json") for o in objs]
    if gt.get("sources") is not None:
        out["sources"] = [str(s) for s in gt["sources"]]
    return json.dumps(out, separators=(",", ":")) if out else None


def _replay_json(replay: Any) -> str | None:
    if replay is None or isinstance(replay, str):
        return replay
    return json.dumps(dict(replay), sort_keys=True, separators=(",", ":"))


def _topk_json(topk: Any) -> str | None:
    if topk is None:
        return None
    rec = topk if isinstance(topk, TokenLogprobs) else TokenLogprobs.model_validate(topk)
    return rec.model_dump_json()


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------


class DatasetWriter:
    """Write a dataset folder: ``add(row, image, split)`` per input, then ``close()``.

    ``row`` holds the row columns (``question``, ``answer``, ``objects`` (ObjectOut or dicts), ``sources``,
    the ``agreement_*`` values, ``provenance_photos``, ``llm_topk`` (TokenLogprobs, dict or None),
    ``trace_ids``, optional ``id``, optional ``embeddings`` ({EMBEDDING output name: vector}),
    ``ground_truth`` ({answer, objects, sources} human labels) and ``replay`` (JSON string or dict
    ``{parent_trace, from_node, edit}`` of a counterfactual replay)); the writer fills ``image``, ``image_height``, ``image_width`` and
    ``split`` from the image it stores. ``manifest`` is merged into manifest.json (``graph``,
    ``class_names``, ``documents``, ``source_store``, ``filter``); ``format`` and ``splits`` are set here.

    Rows stream: each split's Parquet file is written a row group of ``ROW_GROUP`` rows at a time, so the
    writer holds at most that many rows per split, whatever the dataset's size. The manifest is written last,
    by ``close``: a folder without it is an unfinished dataset and no reader opens it.
    """

    def __init__(self, out_dir: str | os.PathLike[str], manifest: dict[str, Any] | None = None) -> None:
        self.root = Path(out_dir)
        if self.root.exists() and not self.root.is_dir():
            raise DatasetError(f"dataset {self.root}: exists and is not a folder")
        if (self.root / MANIFEST).exists():
            raise DatasetError(
                f"dataset {self.root}: already holds a dataset ({MANIFEST}); choose a new folder"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        self.manifest: dict[str, Any] = dict(manifest or {})
        self._pending: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        self._counts: dict[str, int] = {s: 0 for s in SPLITS}
        self._writers: dict[str, Any] = {}  # split -> its open pyarrow.parquet.ParquetWriter
        self._ids: set[str] = set()
        self._closed = False

    def add_blob(self, image: np.ndarray) -> BlobRef:
        """Store one HxWx3 uint8 image as a PNG blob (once, however often it is added)."""
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise DatasetError(f"dataset images must be HxWx3 uint8 RGB, got {arr.dtype} {arr.shape}")
        ref, data = encode_array(arr)
        path = blob_path(self.root, ref.blob)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return ref

    def add(self, row: dict[str, Any], image_array: np.ndarray, split: str) -> dict[str, Any]:
        """Add one input's row (and its image) to ``split``; returns the row as stored."""
        if self._closed:
            raise DatasetError(f"dataset {self.root}: writer is closed")
        if split not in SPLITS:
            raise DatasetError(f"split must be one of {SPLITS}, got {split!r}")
        ref = self.add_blob(image_array)
        rid = str(row.get("id") or f"{len(self._ids):08d}-{ref.blob[:12]}")
        if rid in self._ids:
            raise DatasetError(f"dataset {self.root}: row id {rid!r} added twice")
        try:
            ground_truth = _ground_truth_json(row.get("ground_truth"))
        except ValueError as exc:
            raise DatasetError(
                f"dataset {self.root}: row {rid!r} has malformed ground_truth ({exc})"
            ) from exc
        self._ids.add(rid)
        stored = {
            "id": rid,
            "image": ref.blob,
            "image_height": int(ref.shape[0]),
            "image_width": int(ref.shape[1]),
            "question": str(row.get("question", "")),
            "answer": str(row.get("answer", "")),
            "objects": _objects_json(row.get("objects")),
            "sources": [str(s) for s in row.get("sources") or []],
            "agreement_answer": float(row.get("agreement_answer", 1.0)),
            "agreement_objects": float(row.get("agreement_objects", 1.0)),
            "agreement_sources": float(row.get("agreement_sources", 1.0)),
            "provenance_photos": [str(p) for p in row.get("provenance_photos") or []],
            "llm_topk": _topk_json(row.get("llm_topk")),
            "trace_ids": [str(t) for t in row.get("trace_ids") or []],
            "split": split,
            "embeddings": _embeddings_json(row.get("embeddings")),
            "ground_truth": ground_truth,
            "replay": _replay_json(row.get("replay")),
        }
        self._pending[split].append(stored)
        self._counts[split] += 1
        if len(self._pending[split]) >= ROW_GROUP:
            self._flush(split)
        return stored

    def _flush(self, split: str) -> None:
        """Write ``split``'s pending rows as one row group of its Parquet file (opened on first use)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        writer = self._writers.get(split)
        if writer is None:
            writer = self._writers[split] = pq.ParquetWriter(self.root / f"{split}.parquet", _schema())
        rows, self._pending[split] = self._pending[split], []
        if rows:
            writer.write_table(pa.Table.from_pylist(rows, schema=_schema()))

    def close(self) -> Path:
        """Write the Parquet files and manifest.json; returns the dataset folder."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._closed:
            return self.root
        for split in SPLITS:
            if self._pending[split] or split in self._writers:
                self._flush(split)
                self._writers.pop(split).close()
            else:  # an empty split is an empty table with the schema
                pq.write_table(pa.Table.from_pylist([], schema=_schema()), self.root / f"{split}.parquet")
        manifest = {
            "format": FORMAT,
            "graph": None,
            "class_names": [],
            "documents": [],
            "source_store": None,
            "filter": {},
            **self.manifest,
        }
        graph = manifest.get("graph")
        if isinstance(graph, GraphSchema):
            manifest["graph"] = graph.model_dump(mode="json")
        manifest["format"] = FORMAT
        manifest["splits"] = dict(self._counts)
        tmp = self.root / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, default=str))
        tmp.replace(self.root / MANIFEST)  # the manifest last: its presence means the dataset is complete
        self._closed = True
        log.info("wrote dataset %s: %s", self.root, manifest["splits"])
        return self.root

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()


# --------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------


class Dataset:
    """A dataset folder opened for reading (see :func:`open_dataset`)."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest
        self._cache: dict[str, list[dict[str, Any]]] = {}

    @property
    def splits(self) -> dict[str, int]:
        return dict(self.manifest.get("splits", {}))

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest.get("class_names", []))

    @property
    def documents(self) -> list[dict[str, Any]]:
        return list(self.manifest.get("documents", []))

    @property
    def graph(self) -> GraphSchema | None:
        g = self.manifest.get("graph")
        return GraphSchema.model_validate(g) if g else None

    def rows(self, split: str) -> list[dict[str, Any]]:
        """Every row of ``split``: ``objects`` as list[ObjectOut], ``llm_topk`` as TokenLogprobs or None."""
        if split not in SPLITS:
            raise DatasetError(f"split must be one of {SPLITS}, got {split!r}")
        if split not in self._cache:
            self._cache[split] = [_parse_row(r, self.root / f"{split}.parquet") for r in self._read(split)]
        return [dict(r) for r in self._cache[split]]

    def all_rows(self) -> list[dict[str, Any]]:
        return [r for s in SPLITS for r in self.rows(s)]

    def __len__(self) -> int:
        return sum(self.splits.values())

    def _read(self, split: str) -> list[dict[str, Any]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self.root / f"{split}.parquet"
        if not path.exists():
            raise DatasetError(f"dataset {self.root}: {path.name} is missing")
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowInvalid) as exc:
            raise DatasetError(f"dataset file {path}: not a readable Parquet file ({exc})") from exc
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            raise DatasetError(f"dataset file {path}: missing columns {missing}")
        rows: list[dict[str, Any]] = table.to_pylist()
        return rows

    def image_bytes(self, row: dict[str, Any] | str) -> bytes:
        sha = row if isinstance(row, str) else str(row["image"])
        path = blob_path(self.root, sha)
        if not path.exists():
            raise DatasetError(f"dataset {self.root}: image blob {path} is missing")
        return path.read_bytes()

    def image(self, row: dict[str, Any] | str) -> np.ndarray:
        """The row's input image (HxWx3 uint8), its bytes checked against the blob's sha256."""
        sha = row if isinstance(row, str) else str(row["image"])
        data = self.image_bytes(sha)
        path = blob_path(self.root, sha)
        from PIL import Image

        try:
            import io

            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
            ref = BlobRef(blob=sha, shape=[h, w, 3], dtype="uint8", media_type="image/png")
            return decode_array(ref, data)
        except ValueError as exc:
            raise DatasetError(f"dataset image blob {path}: {exc}") from exc
        except OSError as exc:
            raise DatasetError(f"dataset image blob {path}: not a readable PNG ({exc})") from exc


def _parse_row(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    row = dict(raw)
    try:
        row["objects"] = [ObjectOut.model_validate(o) for o in json.loads(raw["objects"] or "[]")]
        topk = raw.get("llm_topk")
        row["llm_topk"] = TokenLogprobs.model_validate_json(topk) if topk else None
    except ValueError as exc:
        raise DatasetError(f"dataset file {path}: row {raw.get('id')!r} is corrupt ({exc})") from exc
    for key in ("sources", "provenance_photos", "trace_ids"):
        row[key] = list(row.get(key) or [])
    for key in OPTIONAL_COLUMNS:
        row.setdefault(key, None)
    return row


def open_dataset(path: str | os.PathLike[str]) -> Dataset:
    """Open a dataset folder written by :class:`DatasetWriter`; clear errors name the file at fault."""
    root = Path(path)
    if not root.exists():
        raise DatasetError(f"dataset {root}: no such folder")
    if not root.is_dir():
        raise DatasetError(f"dataset {root}: is a file, expected a dataset folder")
    mpath = root / MANIFEST
    if not mpath.exists():
        raise DatasetError(
            f"dataset {root}: {MANIFEST} is missing (not a graphdistill dataset, or writing did not finish)"
        )
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"dataset file {mpath}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DatasetError(f"dataset file {mpath}: format is {got!r}, expected {FORMAT!r}")
    for split in SPLITS:
        if not (root / f"{split}.parquet").exists():
            raise DatasetError(f"dataset {root}: {split}.parquet is missing")
    return Dataset(root, manifest)


# --------------------------------------------------------------------------------------------------------
# A synthetic dataset of shapes with known answers (for testing the student before real traces exist)
# --------------------------------------------------------------------------------------------------------

SYNTHETIC_CLASSES = ["circle", "square", "triangle"]
SYNTHETIC_DOCUMENTS = [
    {"id": "doc-circle", "text": "A circle is a round shape with no corners."},
    {"id": "doc-square", "text": "A square has four equal sides and four right angles."},
    {"id": "doc-triangle", "text": "A triangle has three sides and three corners."},
]
_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40)}


def synthetic_graph_schema() -> GraphSchema:
    """The visual_rag-shaped schema the synthetic dataset declares."""
    return GraphSchema(
        name="synthetic_shapes",
        inputs=[FieldSpec(name="image", kind=Kind.IMAGE), FieldSpec(name="question", kind=Kind.TEXT)],
        outputs=[
            FieldSpec(name="answer", kind=Kind.TEXT),
            FieldSpec(name="objects", kind=Kind.OBJECTS),
            FieldSpec(name="sources", kind=Kind.SOURCES),
        ],
        nodes=["detect", "segment", "retrieve", "answer"],
        definition_hash="synthetic",
    )


def _shape_mask(kind: str, h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    x1, y1, x2, y2 = box
    yy, xx = np.mgrid[0:h, 0:w]
    if kind == "square":
        square: np.ndarray = (xx >= x1) & (xx < x2) & (yy >= y1) & (yy < y2)
        return square
    if kind == "circle":
        cx, cy, r = (x1 + x2 - 1) / 2, (y1 + y2 - 1) / 2, (x2 - x1) / 2
        circle: np.ndarray = ((xx - cx) ** 2 + (yy - cy) ** 2) <= r * r
        return circle
    # triangle: apex at top centre, base at the bottom of the box
    cx = (x1 + x2 - 1) / 2
    t = (yy - y1) / max(y2 - 1 - y1, 1)
    half = t * (x2 - x1) / 2
    triangle: np.ndarray = (yy >= y1) & (yy < y2) & (np.abs(xx - cx) <= half)
    return triangle


def synthetic_example(
    rng: np.random.Generator, size: int = 96
) -> tuple[np.ndarray, list[ObjectOut], str, str, list[str]]:
    """One picture of 1-3 coloured shapes on a plain background: (image, objects, question, answer, sources)."""
    h = w = size
    bg = rng.integers(200, 256, size=3)
    img = np.broadcast_to(bg.astype(np.uint8), (h, w, 3)).copy()
    n = int(rng.integers(1, 4))
    objects: list[ObjectOut] = []
    colours: list[str] = []
    occupied = np.zeros((h, w), dtype=bool)
    for _ in range(n):
        for _attempt in range(20):
            kind = SYNTHETIC_CLASSES[int(rng.integers(len(SYNTHETIC_CLASSES)))]
            s = int(rng.integers(size // 5, size // 2))
            x1, y1 = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
            box = (x1, y1, x1 + s, y1 + s)
            mask = _shape_mask(kind, h, w, box)
            if not (mask & occupied).any():
                break
        else:
            continue
        occupied |= mask
        cname = list(_COLOURS)[int(rng.integers(len(_COLOURS)))]
        img[mask] = _COLOURS[cname]
        ys, xs = np.nonzero(mask)
        tight = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
        objects.append(
            ObjectOut(
                label=kind,
                class_id=SYNTHETIC_CLASSES.index(kind),
                score=1.0,
                box=tight,
                mask=RLE.encode(mask),
            )
        )
        colours.append(cname)
    labels = [o.label for o in objects]
    q = int(rng.integers(3))
    if q == 0:
        question = "What is in the picture?"
        parts = [f"a {c} {lab}" for c, lab in zip(colours, labels, strict=True)]
        answer = "There is " + (" and ".join(parts) if parts else "nothing") + "."
    elif q == 1:
        target = SYNTHETIC_CLASSES[int(rng.integers(len(SYNTHETIC_CLASSES)))]
        k = labels.count(target)
        question = f"How many {target}s are there?"
        answer = f"There {'is' if k == 1 else 'are'} {k} {target}{'' if k == 1 else 's'}."
    else:
        target = labels[0] if labels else "circle"
        question = f"Is there a {target}?"
        answer = f"Yes, there is a {target}." if target in labels else f"No, there is no {target}."
    sources = [f"doc-{lab}" for lab in dict.fromkeys(labels)]
    return img, objects, question, answer, sources


def make_synthetic_dataset(
    out_dir: str | os.PathLike[str],
    n: int = 32,
    seed: int = 0,
    *,
    size: int = 96,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
) -> Dataset:
    """Draw ``n`` pictures of coloured shapes with exact boxes, masks, answers and sources, write them as a
    dataset (each picture its own synthetic "photo" so splits cannot leak) and open it."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    manifest = {
        "graph": synthetic_graph_schema().model_dump(mode="json"),
        "class_names": list(SYNTHETIC_CLASSES),
        "documents": list(SYNTHETIC_DOCUMENTS),
        "source_store": None,
        "filter": {"synthetic": True, "seed": seed},
    }
    writer = DatasetWriter(out_dir, manifest)
    bounds = np.cumsum(fractions) / sum(fractions)
    for i in range(n):
        img, objects, question, answer, sources = synthetic_example(rng, size)
        u = (i + 0.5) / n
        split = SPLITS[int(np.searchsorted(bounds, u))] if n >= 3 else SPLITS[i % 3]
        writer.add(
            {
                "id": f"synthetic-{seed}-{i:05d}",
                "question": question,
                "answer": answer,
                "objects": objects,
                "sources": sources,
                "agreement_answer": 1.0,
                "agreement_objects": 1.0,
                "agreement_sources": 1.0,
                "provenance_photos": [f"synthetic/{seed}/{i}"],
                "llm_topk": None,
                "trace_ids": [],
            },
            img,
            split,
        )
    return open_dataset(writer.close())


def iter_rows(dataset: Dataset, splits: Iterable[str] = SPLITS) -> Iterable[dict[str, Any]]:
    for s in splits:
        yield from dataset.rows(s)
