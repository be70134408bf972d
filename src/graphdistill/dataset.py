"""The filtered dataset: a self-contained folder the student trains on (see docs/design.md).

```
DATASET/manifest.json                 format, graph schema, class_names, documents, split sizes, provenance
DATASET/{train,val,test}.parquet      one row per input: the consensus of its K teacher samples
DATASET/blobs/<sha[:2]>/<sha>         the input images (PNG) the rows reference
DATASET/report/                       the filter report (written by the filter, not here)
```

DATASET is a local path or an fsspec URL (``file://``, ``memory://``, ``s3://...`` with the user's own
credentials; see :mod:`graphdistill._fs`): every file below is read and written through one resolved
filesystem. The manifest is written last, so a reader never opens a half-written dataset, on a disk or on an
object store alike.

One row is one :class:`DatasetRow`, the typed record both sides speak: :class:`DatasetWriter` writes rows,
:func:`open_dataset` reads them back (image blobs verified against their hash), and
:func:`make_synthetic_dataset` draws a small dataset of shapes with known answers so the student can be
trained and tested before any real trace exists. Pure numpy + Pillow + pyarrow.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from graphdistill._fs import Location, is_url, resolve
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
COMPACT = (",", ":")  # separators of the JSON text columns


class DatasetError(GraphdistillError, ValueError):
    """A dataset folder is missing, incomplete or corrupt; the message names the file at fault."""


# --------------------------------------------------------------------------------------------------------
# The row: one typed record, the contract between the filter that writes a dataset and what reads it
# --------------------------------------------------------------------------------------------------------


def _text(value: Any) -> str | None:
    return value if value is None else str(value)


def _texts(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value or ())


def _objects(value: Any) -> tuple[ObjectOut, ...]:
    """ObjectOut records, their dicts, or their JSON list (the Parquet column)."""
    if isinstance(value, str):
        value = json.loads(value or "[]")
    return tuple(o if isinstance(o, ObjectOut) else ObjectOut.model_validate(o) for o in value or ())


def _topk(value: Any) -> TokenLogprobs | None:
    """A TokenLogprobs record, its dict, its JSON (the Parquet column), or None ("" too)."""
    if value is None or value == "":
        return None
    if isinstance(value, TokenLogprobs):
        return value
    if isinstance(value, str):
        return TokenLogprobs.model_validate_json(value)
    return TokenLogprobs.model_validate(value)


def _json_object(value: Any, what: str) -> dict[str, Any] | None:
    """A mapping, its JSON text (the Parquet column) or None/"" -> a dict or None."""
    if isinstance(value, str):
        value = json.loads(value) if value else None
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a JSON object, got {type(value).__name__}")
    return dict(value)


def _embeddings(value: Any) -> dict[str, tuple[float, ...]] | None:
    vecs = _json_object(value, "embeddings {name: [floats]}") or {}
    out = {str(name): tuple(float(x) for x in vec) for name, vec in vecs.items() if vec is not None}
    return out or None


def _ground_truth(value: Any) -> dict[str, Any] | None:
    """Human labels as the evaluation scores them: answer and sources as text, objects as ObjectOut JSON
    (score 1 unless given); no label at all is None."""
    gt = _json_object(value or None, "ground_truth {answer, objects, sources}")
    if not gt:
        return None
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
    return out or None


def _replay(value: Any) -> dict[str, Any] | None:
    return _json_object(value, "replay {parent_trace, from_node, edit}")


def _column(arrow: str, convert: Callable[[Any], Any], *, added_later: bool = False) -> dict[str, Any]:
    """A field's Parquet column: its pyarrow type, how :meth:`DatasetRow.of` converts a loose value to the
    field's type, and whether datasets written before the column lack it (they read as None)."""
    return {"arrow": arrow, "convert": convert, "added_later": added_later}


_TEXT = _column("string", _text)
_TEXTS = _column("list<string>", _texts)
_FRACTION = _column("float32", float)
_PIXELS = _column("int32", int)

# what each field's type admits, keyed by the annotation's text (this module postpones annotations)
_HOLDS: dict[str, Callable[[Any], bool]] = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "tuple[str, ...]": lambda v: isinstance(v, tuple) and all(isinstance(x, str) for x in v),
    "tuple[ObjectOut, ...]": lambda v: isinstance(v, tuple) and all(isinstance(x, ObjectOut) for x in v),
    "TokenLogprobs | None": lambda v: v is None or isinstance(v, TokenLogprobs),
    "Mapping[str, tuple[float, ...]] | None": lambda v: (
        v is None
        or (isinstance(v, Mapping) and all(isinstance(k, str) and isinstance(x, tuple) for k, x in v.items()))
    ),
    "Mapping[str, Any] | None": lambda v: v is None or isinstance(v, Mapping),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetRow:
    """One input of a filtered dataset: the consensus of its K teacher samples, as one Parquet row holds it.

    The one contract between the filter, which writes rows (:meth:`DatasetWriter.add` builds one), and the
    student, the evaluation and the export, which read them (:meth:`Dataset.rows`). Validated on
    construction: every field holds what its type says and ``split`` is one of :data:`SPLITS`, else
    ``ValueError`` (a row read from a file raises :class:`DatasetError` naming the file and the row). Vary a
    row with ``dataclasses.replace``, which validates again. :meth:`of` builds one from loose values (records
    or their dicts, lists, JSON text) and :meth:`to_parquet` gives its columns; the fields are the columns,
    listed once, here.

    A frozen stdlib dataclass rather than a frozen pydantic model: construction checks and never coerces (the
    loose values writers and Parquet hand in are converted once, by :meth:`of`), ``dataclasses.replace``
    re-runs that check where pydantic's ``model_copy(update=...)`` skips validation, and slots keep the rows
    a :class:`Dataset` caches small. The records it holds (ObjectOut, TokenLogprobs) are trace.py's.
    """

    id: str = field(default="", metadata=_TEXT)  # the input's id (its trace group), unique in the dataset
    image: str = field(default="", metadata=_TEXT)  # sha256 of the input image's PNG blob (blobs/<sha[:2]>/)
    image_height: int = field(default=0, metadata=_PIXELS)  # the image's height in pixels
    image_width: int = field(default=0, metadata=_PIXELS)  # the image's width in pixels
    question: str = field(default="", metadata=_TEXT)  # the question asked about the image
    answer: str = field(default="", metadata=_TEXT)  # the teacher's voted answer ("" for none)
    # the voted objects, boxes in pixels of the image (a JSON list of ObjectOut on disk)
    objects: tuple[ObjectOut, ...] = field(default=(), metadata=_column("string", _objects))
    sources: tuple[str, ...] = field(default=(), metadata=_TEXTS)  # ids of the documents voted as sources
    # the share of the K samples that agree with the voted output (vote.Consensus.agreement), per output
    agreement_answer: float = field(default=1.0, metadata=_FRACTION)  # on the answer
    agreement_objects: float = field(default=1.0, metadata=_FRACTION)  # on the objects
    agreement_sources: float = field(default=1.0, metadata=_FRACTION)  # on the sources
    provenance_photos: tuple[str, ...] = field(default=(), metadata=_TEXTS)  # the photos it was made from
    # the teacher LLM's top-k log-probabilities per answer token (JSON on disk), or None
    llm_topk: TokenLogprobs | None = field(default=None, metadata=_column("string", _topk))
    trace_ids: tuple[str, ...] = field(default=(), metadata=_TEXTS)  # the stored traces voted into this row
    split: str = field(default="train", metadata=_TEXT)  # which of SPLITS holds the row
    # the columns below came later: written by every writer, read as None from datasets written before them
    # {EMBEDDING output name: the samples' mean vector} (JSON on disk; student.loader.row_embeddings), or None
    embeddings: Mapping[str, tuple[float, ...]] | None = field(
        default=None, metadata=_column("string", _embeddings, added_later=True)
    )
    # human labels {"answer", "objects" (ObjectOut JSON), "sources"} the input carried (JSON on disk), or None
    ground_truth: Mapping[str, Any] | None = field(
        default=None, metadata=_column("string", _ground_truth, added_later=True)
    )
    # {"parent_trace", "from_node", "edit"} of a counterfactual replay (recording.replay; JSON on disk): its
    # objects were edited and do NOT describe its image. None for a recorded input
    replay: Mapping[str, Any] | None = field(
        default=None, metadata=_column("string", _replay, added_later=True)
    )

    def __post_init__(self) -> None:
        wrong = [
            f"{f.name} must be {f.type}, got {type(getattr(self, f.name)).__name__}"
            for f in fields(self)
            if not _HOLDS[str(f.type)](getattr(self, f.name))
        ]
        if self.split not in SPLITS:
            wrong.append(f"split must be one of {SPLITS}, got {self.split!r}")
        if wrong:
            raise ValueError(f"dataset row {self.id!r}: " + "; ".join(wrong))

    @property
    def is_replay(self) -> bool:
        """A counterfactual replay's row: its objects were edited, so they do not describe its image (the
        detector is not supervised on them and the evaluation leaves the row out; the text still reads them)."""
        return self.replay is not None

    @classmethod
    def of(cls, **columns: Any) -> DatasetRow:
        """A row from loose values, as a writer or a Parquet file holds them: ObjectOut / TokenLogprobs or
        their dicts or JSON, any sequences, mappings or their JSON; numbers and text converted. A column left
        out takes its default (empty text and lists, agreement 1, split train, None). ``ground_truth`` is
        normalised as the evaluation scores it (see :func:`_ground_truth`). Unknown columns are an error."""
        by_name = {f.name: f for f in fields(cls)}
        unknown = sorted(set(columns) - set(by_name))
        if unknown:
            raise ValueError(f"dataset row {columns.get('id')!r}: unknown columns {unknown}")
        return cls(**{k: by_name[k].metadata["convert"](v) for k, v in columns.items()})

    @classmethod
    def from_parquet(cls, raw: Mapping[str, Any], path: str | os.PathLike[str]) -> DatasetRow:
        """A row as pyarrow read it from ``path``: a column the row's fields do not name is ignored, one added
        later and absent reads as None. A corrupt row raises :class:`DatasetError` naming the file and row."""
        try:
            return cls.of(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})
        except (ValueError, TypeError) as exc:
            raise DatasetError(f"dataset file {path}: row {raw.get('id')!r} is corrupt ({exc})") from exc

    def to_parquet(self) -> dict[str, Any]:
        """The row's Parquet columns (what :meth:`from_parquet` reads back): records and mappings as compact
        JSON text, tuples as lists."""
        cols = {f.name: getattr(self, f.name) for f in fields(self)}
        cols.update(
            objects=json.dumps([o.model_dump(mode="json") for o in self.objects], separators=COMPACT),
            llm_topk=self.llm_topk.model_dump_json() if self.llm_topk is not None else None,
            embeddings=json.dumps(self.embeddings, separators=COMPACT) if self.embeddings else None,
            ground_truth=json.dumps(self.ground_truth, separators=COMPACT) if self.ground_truth else None,
            replay=json.dumps(self.replay, sort_keys=True, separators=COMPACT)
            if self.replay is not None
            else None,
        )
        return {k: list(v) if isinstance(v, tuple) else v for k, v in cols.items()}


COLUMNS = tuple(f.name for f in fields(DatasetRow) if not f.metadata["added_later"])
# columns added later: written by every writer, read as None from datasets written before them
OPTIONAL_COLUMNS = tuple(f.name for f in fields(DatasetRow) if f.metadata["added_later"])


def _schema() -> Any:
    """The Parquet schema: one column per :class:`DatasetRow` field, in its order."""
    import pyarrow as pa

    types = {
        "string": pa.string(),
        "int32": pa.int32(),
        "float32": pa.float32(),
        "list<string>": pa.list_(pa.string()),
    }
    return pa.schema([(f.name, types[f.metadata["arrow"]]) for f in fields(DatasetRow)])


def blob_parts(sha: str) -> tuple[str, str, str]:
    """Where the image blob ``sha`` lies below a dataset's root."""
    return ("blobs", sha[:2], sha)


def _root_of(loc: Location) -> Path | str:
    """A dataset's ``root``: the folder as a Path when given as a local path, else the URL as given."""
    return loc.url if is_url(loc.url) else Path(loc.url)


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------


class DatasetWriter:
    """Write a dataset folder: ``add(row, image, split)`` per input, then ``close()``.

    ``row`` is a :class:`DatasetRow`, or its columns as loose values (a mapping :meth:`DatasetRow.of` reads:
    ``question``, ``answer``, ``objects`` (ObjectOut or dicts), ``sources``, the ``agreement_*`` values,
    ``provenance_photos``, ``llm_topk`` (TokenLogprobs, dict or None), ``trace_ids``, optional ``id``,
    ``embeddings`` ({EMBEDDING output name: vector}), ``ground_truth`` ({answer, objects, sources} human
    labels) and ``replay`` ({parent_trace, from_node, edit} of a counterfactual replay, or its JSON)); the
    writer sets ``image``, ``image_height``, ``image_width`` and ``split`` from the image it stores (and
    ``id`` when the row has none), and writes the row's :meth:`DatasetRow.to_parquet` columns. ``manifest`` is
    merged into manifest.json (``graph``, ``class_names``, ``documents``, ``source_store``, ``filter``);
    ``format`` and ``splits`` are set here.

    Rows stream: each split's Parquet file is written a row group of ``ROW_GROUP`` rows at a time, so the
    writer holds at most that many rows per split, whatever the dataset's size. The manifest is written last,
    by ``close``: a folder without it is an unfinished dataset and no reader opens it.

    ``out_dir`` is a local path or an fsspec URL (``memory://``, ``s3://bucket/ds``, ...). Locally each blob
    and the manifest are written to a temp file and renamed; on an object store, which has no atomic rename,
    each file is one whole put, and the manifest last is what keeps a reader from a half-written dataset.
    """

    def __init__(self, out_dir: str | os.PathLike[str], manifest: dict[str, Any] | None = None) -> None:
        self.loc = resolve(out_dir, "dataset", DatasetError)
        self.root = _root_of(self.loc)
        if self.loc.exists() and not self.loc.isdir():
            raise DatasetError(f"dataset {self.loc.url}: exists and is not a folder")
        if self.loc.exists(MANIFEST):
            raise DatasetError(
                f"dataset {self.loc.url}: already holds a dataset ({MANIFEST}); choose a new folder"
            )
        if self.loc.local:  # an object store has no folders: its keys imply them
            self.loc.makedirs()
        self.manifest: dict[str, Any] = dict(manifest or {})
        self._pending: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        self._counts: dict[str, int] = {s: 0 for s in SPLITS}
        self._writers: dict[str, Any] = {}  # split -> its open pyarrow.parquet.ParquetWriter
        self._ids: set[str] = set()
        # blobs written (or found) by this writer: one look each, not one per row
        self._blobs: set[str] = set()
        self._closed = False

    def add_blob(self, image: np.ndarray) -> BlobRef:
        """Store one HxWx3 uint8 image as a PNG blob (once, however often it is added)."""
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise DatasetError(f"dataset images must be HxWx3 uint8 RGB, got {arr.dtype} {arr.shape}")
        ref, data = encode_array(arr)
        if ref.blob not in self._blobs:
            if not self.loc.exists(*blob_parts(ref.blob)):
                self.loc.write_bytes(*blob_parts(ref.blob), data=data)
            self._blobs.add(ref.blob)
        return ref

    def add(self, row: DatasetRow | Mapping[str, Any], image_array: np.ndarray, split: str) -> DatasetRow:
        """Add one input's row (and its image) to ``split``; returns the row as stored."""
        if self._closed:
            raise DatasetError(f"dataset {self.loc.url}: writer is closed")
        if split not in SPLITS:
            raise DatasetError(f"split must be one of {SPLITS}, got {split!r}")
        ref = self.add_blob(image_array)
        columns = {f.name: getattr(row, f.name) for f in fields(row)} if isinstance(row, DatasetRow) else row
        rid = str(columns.get("id") or f"{len(self._ids):08d}-{ref.blob[:12]}")
        if rid in self._ids:
            raise DatasetError(f"dataset {self.loc.url}: row id {rid!r} added twice")
        try:
            stored = DatasetRow.of(
                **{
                    **columns,
                    "id": rid,
                    "image": ref.blob,
                    "image_height": int(ref.shape[0]),
                    "image_width": int(ref.shape[1]),
                    "split": split,
                }
            )
        except (ValueError, TypeError) as exc:
            raise DatasetError(f"dataset {self.loc.url}: row {rid!r} is malformed ({exc})") from exc
        self._ids.add(rid)
        self._pending[split].append(stored.to_parquet())
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
            writer = self._writers[split] = pq.ParquetWriter(
                self.loc.path(f"{split}.parquet"), _schema(), filesystem=self._arrow_fs()
            )
        rows, self._pending[split] = self._pending[split], []
        if rows:
            writer.write_table(pa.Table.from_pylist(rows, schema=_schema()))

    def _arrow_fs(self) -> Any:
        """What pyarrow writes through: None (its own local files) locally, else the fsspec filesystem."""
        return None if self.loc.local else self.loc.fs

    def close(self) -> Path | str:
        """Write the Parquet files and manifest.json (last); returns the dataset folder (its URL if given one)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._closed:
            return self.root
        for split in SPLITS:
            if self._pending[split] or split in self._writers:
                self._flush(split)
                self._writers.pop(split).close()
            else:  # an empty split is an empty table with the schema
                pq.write_table(
                    pa.Table.from_pylist([], schema=_schema()),
                    self.loc.path(f"{split}.parquet"),
                    filesystem=self._arrow_fs(),
                )
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
        # the manifest last: its presence means the dataset is complete (renamed into place locally, one whole
        # put on an object store, after every Parquet file and blob is closed)
        self.loc.write_bytes(MANIFEST, data=json.dumps(manifest, indent=2, default=str).encode())
        self._closed = True
        log.info("wrote dataset %s: %s", self.loc.url, manifest["splits"])
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
    """A dataset folder opened for reading (see :func:`open_dataset`): ``root`` is the folder as given (a
    Path, or the URL), ``loc`` where its files are read from."""

    def __init__(self, loc: Location, manifest: dict[str, Any]) -> None:
        self.loc = loc
        self.root = _root_of(loc)
        self.manifest = manifest
        self._cache: dict[str, list[DatasetRow]] = {}

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

    def rows(self, split: str) -> list[DatasetRow]:
        """Every row of ``split``, read once through :meth:`iter_rows` and kept (rows are frozen: every call
        shares them). A consumer that walks the rows once should stream them with :meth:`iter_rows`."""
        if split not in self._cache:
            self._cache[split] = list(self.iter_rows(split))
        return list(self._cache[split])

    def iter_rows(self, split: str) -> Iterator[DatasetRow]:
        """The rows of ``split`` in file order, read one Parquet row group (``ROW_GROUP`` rows, as the writer
        wrote them) at a time: memory holds one row group, whatever the split's size. Rows :meth:`rows`
        already read are not read again."""
        if split in self._cache:
            yield from self._cache[split]
            return
        for group in self.iter_row_groups(split):
            yield from group

    def iter_row_groups(self, split: str, order: Iterable[int] | None = None) -> Iterator[list[DatasetRow]]:
        """The rows of ``split``, one Parquet row group's rows at a time, in file order or in ``order`` (row
        group indices, as :meth:`row_group_sizes` counts them; a shuffled order is how training streams a
        split, :mod:`graphdistill.student.stream`). Each group is read from the file when its turn comes,
        through the dataset's filesystem: memory holds one row group, whatever the split's size (:meth:`rows`'
        cache is neither read nor filled)."""
        name = self.loc.name(f"{split}.parquet")
        for group in self._row_groups(split, order):
            yield [DatasetRow.from_parquet(raw, name) for raw in group]

    def row_group_sizes(self, split: str) -> list[int]:
        """The rows in each of ``split``'s Parquet row groups, read from the file's footer (no row is read)."""
        with self._parquet(split) as pf:
            return [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]

    def all_rows(self) -> list[DatasetRow]:
        return [r for s in SPLITS for r in self.rows(s)]

    def __len__(self) -> int:
        return sum(self.splits.values())

    @contextmanager
    def _parquet(self, split: str) -> Iterator[Any]:
        """``split``'s Parquet file opened (a local file by pyarrow itself, a remote one through the fsspec
        file), its columns checked; closed on leaving."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if split not in SPLITS:
            raise DatasetError(f"split must be one of {SPLITS}, got {split!r}")
        file = f"{split}.parquet"
        name = self.loc.name(file)
        with ExitStack() as stack:
            try:
                source: Any = (
                    self.loc.path(file) if self.loc.local else stack.enter_context(self.loc.open(file))
                )
                pf = pq.ParquetFile(source)
                stack.callback(pf.close)
            except FileNotFoundError as exc:
                raise DatasetError(f"dataset {self.loc.url}: {file} is missing") from exc
            except (OSError, pa.ArrowInvalid) as exc:
                raise DatasetError(f"dataset file {name}: not a readable Parquet file ({exc})") from exc
            missing = [c for c in COLUMNS if c not in pf.schema_arrow.names]
            if missing:
                raise DatasetError(f"dataset file {name}: missing columns {missing}")
            yield pf

    def _row_groups(self, split: str, order: Iterable[int] | None = None) -> Iterator[list[dict[str, Any]]]:
        """``split``'s Parquet file, one row group's raw rows at a time (in file order, or in ``order``)."""
        import pyarrow as pa

        name = self.loc.name(f"{split}.parquet")
        with self._parquet(split) as pf:
            groups = range(pf.num_row_groups) if order is None else order
            for i in groups:
                if not 0 <= i < pf.num_row_groups:
                    raise DatasetError(f"dataset file {name}: no row group {i} (it has {pf.num_row_groups})")
                try:
                    group = pf.read_row_group(i)
                except (OSError, pa.ArrowInvalid) as exc:
                    raise DatasetError(f"dataset file {name}: row group {i} is unreadable ({exc})") from exc
                rows: list[dict[str, Any]] = group.to_pylist()
                yield rows

    def image_bytes(self, row: DatasetRow | str) -> bytes:
        sha = row if isinstance(row, str) else row.image
        try:
            return self.loc.read_bytes(*blob_parts(sha))
        except FileNotFoundError as exc:
            raise DatasetError(
                f"dataset {self.loc.url}: image blob {self.loc.name(*blob_parts(sha))} is missing"
            ) from exc

    def image(self, row: DatasetRow | str) -> np.ndarray:
        """The row's input image (HxWx3 uint8), its bytes checked against the blob's sha256."""
        sha = row if isinstance(row, str) else row.image
        data = self.image_bytes(sha)
        path = self.loc.name(*blob_parts(sha))
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


def open_dataset(path: str | os.PathLike[str]) -> Dataset:
    """Open a dataset folder written by :class:`DatasetWriter`, at a local path or an fsspec URL (see
    :mod:`graphdistill._fs`); clear errors name the path or URL and the file at fault."""
    loc = resolve(path, "dataset", DatasetError)
    root, mpath = loc.url, loc.name(MANIFEST)
    if not loc.exists():
        raise DatasetError(f"dataset {root}: no such folder")
    if not loc.isdir():
        raise DatasetError(f"dataset {root}: is a file, expected a dataset folder")
    try:
        text = loc.read_bytes(MANIFEST)
    except FileNotFoundError:
        raise DatasetError(
            f"dataset {root}: {MANIFEST} is missing (not a graphdistill dataset, or writing did not finish)"
        ) from None
    try:
        manifest = json.loads(text)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"dataset file {mpath}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DatasetError(f"dataset file {mpath}: format is {got!r}, expected {FORMAT!r}")
    for split in SPLITS:
        if not loc.exists(f"{split}.parquet"):
            raise DatasetError(f"dataset {root}: {split}.parquet is missing")
    return Dataset(loc, manifest)


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
        row = DatasetRow(  # every sample agrees; the writer fills in the image, its size and the split
            id=f"synthetic-{seed}-{i:05d}",
            question=question,
            answer=answer,
            objects=tuple(objects),
            sources=tuple(sources),
            provenance_photos=(f"synthetic/{seed}/{i}",),
        )
        writer.add(row, img, split)
    return open_dataset(writer.close())


def iter_rows(dataset: Dataset, splits: Iterable[str] = SPLITS) -> Iterator[DatasetRow]:
    """Every row of ``splits``, streamed a row group at a time (:meth:`Dataset.iter_rows`)."""
    for s in splits:
        yield from dataset.iter_rows(s)
