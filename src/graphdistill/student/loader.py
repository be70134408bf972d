"""A torch ``Dataset`` over a filtered dataset's rows: image tensor, question tokens and a target per output.

Image preprocessing is defined once, in :func:`preprocess_image`, and described by :func:`preprocess_spec`
(a JSON dict the run's meta.json and the export manifest carry so a phone app can reproduce it exactly):
letterbox = scale the longer side to ``image_size`` keeping the aspect ratio (bilinear), paste at the
TOP-LEFT corner of an ``image_size``² canvas filled with ``pad_value``, then ``(x/255 − mean)/std`` per
RGB channel, NCHW float32. Top-left placement makes mapping back trivial: pixel = normalised × S / scale.

Every item is a dict of fixed-shape tensors, so ``torch.utils.data.default_collate`` (see :func:`collate`)
batches it with a plain ``DataLoader``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from graphdistill.dataset import DatasetRow
from graphdistill.runner.manifest import Preprocessing
from graphdistill.student.model import EOS_ID, StudentConfig
from graphdistill.student.tokenizer import StudentTokenizer
from graphdistill.student.trunks import PROTO_STRIDE
from graphdistill.trace import TokenLogprobs

log = logging.getLogger(__name__)

MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics: the conventional input scale for timm backbones
STD = (0.229, 0.224, 0.225)
UNIT = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # plain x/255: what Ultralytics detectors were trained on
PAD_VALUE = (114, 114, 114)  # YOLO's letterbox grey
# Pillow's resize(reducing_gap=1.0): box-average by the largest integer factor that keeps the image at
# least the target size (Image.reduce), then bilinear: several times faster than a plain bilinear resize of a
# large photo, which matters in a phone query's budget; runs whose spec has no reducing_gap keep the plain
# bilinear.
REDUCING_GAP = 1.0


def normalisation(config: StudentConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the student's input: a trunk started from an Ultralytics detector reads x/255, as the
    detector does; a timm trunk ImageNet-normalised input."""
    return UNIT if config.trunk == "ultralytics" else (MEAN, STD)


def preprocess_spec(
    image_size: int, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD
) -> Preprocessing:
    """The exact preprocessing of :func:`preprocess_image`, as data (for meta.json / export manifests)."""
    return {
        "resize": "letterbox",
        "size": [image_size, image_size],
        "align": "top-left",
        "interpolation": "bilinear",
        "reducing_gap": REDUCING_GAP,
        "pad_value": list(PAD_VALUE),
        "channel_order": "RGB",
        "layout": "NCHW",
        "dtype": "float32",
        "scale": 1 / 255,
        "mean": list(mean),
        "std": list(std),
        "boxes": "cx,cy,w,h in 0..1 of the letterboxed square; pixels = value * size / scale_factor",
        "scale_factor": "size / max(height, width)",
    }


def spec_of(config: StudentConfig) -> Preprocessing:
    """:func:`preprocess_spec` for a student config."""
    return preprocess_spec(config.image_size, *normalisation(config))


def row_embeddings(row: DatasetRow) -> dict[str, list[float]]:
    """A row's teacher EMBEDDING outputs for feature distillation: {output name: vector}, {} for none."""
    return {name: list(vec) for name, vec in (row.embeddings or {}).items()}


def embedding_dims_of(rows: Iterable[DatasetRow]) -> dict[str, int]:
    """The size of each embedding the rows carry (first row that has it); clear error on a mismatch."""
    dims: dict[str, int] = {}
    for row in rows:
        for name, vec in row_embeddings(row).items():
            if dims.setdefault(name, len(vec)) != len(vec):
                raise ValueError(
                    f"row {row.id!r}: embedding {name!r} has {len(vec)} values, other rows {dims[name]}"
                )
    return dims


def letterbox_scale(height: int, width: int, size: int) -> float:
    return size / max(height, width)


def preprocess_image(
    image: np.ndarray,
    size: int,
    reducing_gap: float | None = REDUCING_GAP,
    mean: tuple[float, ...] | list[float] = MEAN,
    std: tuple[float, ...] | list[float] = STD,
) -> tuple[Tensor, float]:
    """HxWx3 uint8 RGB -> (float tensor [3,size,size] normalised, scale factor). ``reducing_gap``: see
    :data:`REDUCING_GAP` (``None``: the plain bilinear resize of runs trained before it existed)."""
    from PIL import Image

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be HxWx3 uint8 RGB, got shape {image.shape} dtype {image.dtype}")
    h, w = image.shape[:2]
    s = letterbox_scale(h, w, size)
    nw, nh = max(1, min(size, round(w * s))), max(1, min(size, round(h * s)))
    canvas = np.empty((size, size, 3), dtype=np.uint8)
    canvas[:] = PAD_VALUE
    small = Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=reducing_gap)
    canvas[:nh, :nw] = np.asarray(small)
    x = torch.from_numpy(canvas).permute(2, 0, 1).float().div_(255)
    x = (x - torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)) / torch.tensor(
        std, dtype=torch.float32
    ).view(3, 1, 1)
    return x, s


def letterbox_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """HxW bool mask -> size² float32 in [0,1], letterboxed exactly like the image (soft edges)."""
    from PIL import Image

    h, w = mask.shape
    s = letterbox_scale(h, w, size)
    nw, nh = max(1, min(size, round(w * s))), max(1, min(size, round(h * s)))
    out = np.zeros((size, size), dtype=np.float32)
    small = Image.fromarray(mask.astype(np.float32)).resize((nw, nh), Image.Resampling.BILINEAR)
    out[:nh, :nw] = np.asarray(small)
    return out


class RowEncoder:
    """One :class:`~graphdistill.dataset.DatasetRow` -> the student's item (a dict of fixed-shape tensors): the
    one row-to-tensor path, which the in-memory :class:`StudentDataset` (caching what it can) and the streamed
    batches of :mod:`graphdistill.student.stream` (caching nothing) both take.

    Keys: image [3,S,S]; question_ids [Lq] int64; question_mask [Lq] bool; answer_in [La]; answer_target
    [La] (−100 = ignore); the row's objects (K = ``max_objects`` slots, the teacher's order): ``obj_classes``
    [K] (−1 = empty), ``obj_boxes`` [K,4] cx,cy,w,h in 0..1 of the canvas, ``obj_boxes_px`` [K,4] xyxy canvas
    pixels, ``obj_scores`` [K], ``obj_valid`` [K] bool, with a mask head ``obj_masks`` [K,S/4,S/4] (the
    teacher's mask letterboxed onto the prototype grid) and ``obj_has_mask`` [K], and ``vision_ok`` [] (False for
    a counterfactual replay, whose objects were edited and do not describe the image); sources [K] multi-hot;
    ``embedding:<name>`` [d] and ``embedding:<name>:valid`` [] bool per embedding output; topk_ids [La,k],
    topk_logprobs [La,k], topk_valid [La] (soft targets from the teacher LLM's recorded top-k, mapped onto
    the student's tokens by :func:`align_soft_targets`, or step for step when ``soft_targets_tokenizer`` names
    the teacher's tokenizer); scale [] (letterbox factor); image_hw [2]; and whatever ``extra`` gives for the
    row (the trainer's detector targets ``kd_cls``, ``kd_dist``, ``kd_valid``, :mod:`graphdistill.student.kd`;
    a frozen trunk's cached features). Object targets exist only when the config has a detection head (masks
    only with a mask head), sources only with a sources head.

    ``class_names``: the student's classes (the detector's label set when it started from one), by which the
    rows' object labels are numbered; ``documents``: the dataset's knowledge base (``{"id", ...}``).
    """

    def __init__(
        self,
        tokenizer: StudentTokenizer,
        config: StudentConfig,
        class_names: list[str],
        documents: list[dict[str, Any]],
        *,
        topk: int = 5,
        soft_targets_tokenizer: str | None = None,
    ) -> None:
        self.tok = tokenizer
        self.cfg = config
        self.topk = topk
        self.class_names = list(class_names)
        self.class_index = {n: i for i, n in enumerate(self.class_names)}
        self.doc_ids = [d["id"] for d in documents]
        self.doc_index = {d: i for i, d in enumerate(self.doc_ids)}
        self.mean, self.std = normalisation(config)
        self.soft_targets_tokenizer = soft_targets_tokenizer
        if config.has_objects and len(self.class_names) > config.num_classes:
            raise ValueError(
                f"dataset has {len(self.class_names)} classes but the student has num_classes={config.num_classes}"
            )
        if config.has_sources and len(self.doc_ids) > config.num_sources:
            raise ValueError(
                f"dataset has {len(self.doc_ids)} documents but the student has num_sources={config.num_sources}"
            )

    def image(self, image: np.ndarray) -> tuple[Tensor, float]:
        """The row's decoded image -> (the student's input [3,S,S], the letterbox scale)."""
        return preprocess_image(image, self.cfg.image_size, mean=self.mean, std=self.std)

    def encode(
        self, row: DatasetRow, image: np.ndarray, *, extra: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """The row's item from its decoded image (HxWx3 uint8), nothing cached: what streaming takes."""
        return self.item(row, self.image(image), self.soft_targets(row), extra=extra)

    def item(
        self,
        row: DatasetRow,
        image: tuple[Tensor, float],
        soft: SoftTargets | None,
        *,
        objects: dict[str, Tensor] | None = None,
        extra: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """The row's item from its preprocessed ``image`` (:meth:`image`) and soft targets ``soft``
        (:meth:`soft_targets`; None: none); ``objects``: its :meth:`objects` when already made; ``extra``: more
        keys (see the class)."""
        cfg = self.cfg
        img, scale = image
        h, w = row.image_height, row.image_width
        q_ids, q_mask = self.tok.encode_question(row.question, cfg.max_question_len)
        a_in, a_tgt = self.tok.encode_answer(row.answer, cfg.max_answer_len)

        item: dict[str, Tensor] = {
            "image": img,
            "question_ids": torch.tensor(q_ids, dtype=torch.long),
            "question_mask": torch.tensor(q_mask, dtype=torch.bool),
            "answer_in": torch.tensor(a_in, dtype=torch.long),
            "answer_target": torch.tensor(a_tgt, dtype=torch.long),
        }
        if cfg.has_objects:
            objs = objects if objects is not None else self.objects(row, scale)
            item.update({k: (v.float() if k == "obj_masks" else v) for k, v in objs.items()})
        if extra:
            item.update(extra)
        if cfg.has_sources:
            sources = torch.zeros(cfg.num_sources)
            for s in row.sources:
                if s in self.doc_index:
                    sources[self.doc_index[s]] = 1.0
            item["sources"] = sources
        if cfg.embedding_dims:
            embs = row_embeddings(row)
            for name, dim in cfg.embedding_dims.items():
                vec = embs.get(name)
                if vec is not None and len(vec) != dim:
                    raise ValueError(
                        f"row {row.id}: embedding {name!r} has {len(vec)} values, the student expects {dim}"
                    )
                item[f"embedding:{name}"] = torch.tensor(vec) if vec is not None else torch.zeros(dim)
                item[f"embedding:{name}:valid"] = torch.tensor(vec is not None)
        if soft is None:
            soft = _no_soft_targets(cfg.max_answer_len, self.topk)
        item.update(zip(("topk_ids", "topk_logprobs", "topk_valid"), soft, strict=True))
        item["scale"] = torch.tensor(scale, dtype=torch.float32)
        item["image_hw"] = torch.tensor([h, w], dtype=torch.long)
        return item

    def objects(self, row: DatasetRow, scale: float) -> dict[str, Tensor]:
        """The row's object targets (masks in float16: a dataset in memory keeps them for the whole run)."""
        cfg = self.cfg
        k = cfg.max_objects
        size = cfg.image_size
        boxes = torch.zeros(k, 4)
        boxes_px = torch.zeros(k, 4)
        classes = torch.full((k,), -1, dtype=torch.long)
        scores = torch.zeros(k)
        grid = size // PROTO_STRIDE
        masks = torch.zeros(k, grid, grid) if cfg.has_masks else None
        has_mask = torch.zeros(k, dtype=torch.bool)
        objects = list(row.objects)
        if len(objects) > k:
            log.warning("row %s has %d objects > max_objects=%d; keeping the first", row.id, len(objects), k)
            objects = objects[:k]
        for j, o in enumerate(objects):
            x1, y1, x2, y2 = (float(v) * scale for v in o.box)  # canvas pixels
            boxes_px[j] = torch.tensor([x1, y1, x2, y2])
            boxes[j] = torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]) / size
            cid = self.class_index.get(o.label, o.class_id)
            if cid is None or not 0 <= cid < cfg.num_classes:
                raise ValueError(
                    f"row {row.id}: object label {o.label!r} is not one of the student's classes"
                )
            classes[j] = int(cid)
            scores[j] = float(o.score if o.score is not None else 1.0)
            if masks is not None and o.mask is not None:
                masks[j] = torch.from_numpy(letterbox_mask(o.mask.decode(), grid))
                has_mask[j] = True
        out = {
            "obj_classes": classes,
            "obj_boxes": boxes,
            "obj_boxes_px": boxes_px,
            "obj_scores": scores,
            "obj_valid": classes >= 0,
            "vision_ok": torch.tensor(not row.is_replay),
        }
        if masks is not None:
            out["obj_masks"] = masks.half()
            out["obj_has_mask"] = has_mask
        return out

    def soft_targets(self, row: DatasetRow) -> SoftTargets | None:
        """The row's (topk_ids, topk_logprobs, topk_valid), or None when no answer position has any."""
        cfg = self.cfg
        lt = row.llm_topk
        if lt is None:
            return None
        if self.soft_targets_tokenizer is not None and lt.tokenizer == self.soft_targets_tokenizer:
            # The student shares the teacher's tokenizer: step t of the teacher predicts target position t.
            topk_ids, topk_lp, topk_valid = _no_soft_targets(cfg.max_answer_len, self.topk)
            n = min(len(lt.topk_ids), cfg.max_answer_len)
            for t in range(n):
                k = min(self.topk, len(lt.topk_ids[t]))
                topk_ids[t, :k] = torch.tensor(lt.topk_ids[t][:k])
                topk_lp[t, :k] = torch.tensor(lt.topk_logprobs[t][:k])
                topk_lp[t, k:] = -float("inf")
                topk_valid[t] = True
            return (topk_ids, topk_lp, topk_valid) if n else None
        return align_soft_targets(lt, row.answer, self.tok, cfg.max_answer_len, self.topk)


class StudentDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Items for the student (:class:`RowEncoder`'s) from ``open_dataset(path).rows(split)``, held in memory:
    each row's decoded image, object targets and soft targets are made once and kept, the sets being small and
    the epochs many. ``kd``: row index -> the trainer's detector targets; ``features``: row index -> a frozen
    trunk's cached features; ``class_names``: the student's classes, the dataset's own by default."""

    def __init__(
        self,
        dataset: Any,
        split: str,
        tokenizer: StudentTokenizer,
        config: StudentConfig,
        *,
        topk: int = 5,
        soft_targets_tokenizer: str | None = None,
        class_names: list[str] | None = None,
        kd: Any = None,
        features: Any = None,
    ) -> None:
        self.ds = dataset
        self.rows: list[DatasetRow] = dataset.rows(split)
        self.split = split
        self.tok = tokenizer
        self.cfg = config
        self.encoder = RowEncoder(
            tokenizer,
            config,
            list(class_names if class_names is not None else dataset.class_names),
            dataset.documents,
            topk=topk,
            soft_targets_tokenizer=soft_targets_tokenizer,
        )
        self.kd = kd  # row index -> {kd_cls, kd_dist, kd_valid}, or None
        self.features = features  # row index -> a frozen trunk's cached features {trunk_p3, ...}, or None
        # soft targets are built once (tokenising every answer) and logged, so a run shows its KL coverage
        self._soft = [self.encoder.soft_targets(row) for row in self.rows]
        self._log_soft_coverage()
        self._cache: dict[int, tuple[Tensor, float]] = {}
        self._objects_cache: dict[int, dict[str, Tensor]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def _image(self, i: int) -> tuple[Tensor, float]:
        if i not in self._cache:  # decoded + letterboxed once: the sets are small and epochs many
            self._cache[i] = self.encoder.image(self.ds.image(self.rows[i]))
        return self._cache[i]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        row = self.rows[i]
        image = self._image(i)
        objects = None
        if self.cfg.has_objects:
            if (
                i not in self._objects_cache
            ):  # decoding and letterboxing every mask each epoch cost more than a step
                self._objects_cache[i] = self.encoder.objects(row, image[1])
            objects = self._objects_cache[i]
        extra: dict[str, Tensor] = {}
        if self.cfg.has_objects and self.kd is not None:
            extra.update(self.kd(i))
        if self.features is not None:
            extra.update(self.features(i))
        return self.encoder.item(row, image, self._soft[i], objects=objects, extra=extra)

    def _log_soft_coverage(self) -> None:
        with_topk = [r.llm_topk for r in self.rows if r.llm_topk is not None]
        if not with_topk:
            return
        positions = sum(min(len(self.tok.encode(r.answer)) + 1, self.cfg.max_answer_len) for r in self.rows)
        covered = sum(int(s[2].sum()) for s in self._soft if s is not None)
        no_texts = sum(not lt.token_texts for lt in with_topk)
        log.info(
            "%s: soft targets (the teacher LLM's top-k) on %d of %d answer positions (%.0f%%), in %d of %d rows "
            "(%d carry top-k log-probs; %d of those were recorded without token texts, so their ids cannot be "
            "mapped onto the student's tokenizer)",
            self.split,
            covered,
            positions,
            100 * covered / max(positions, 1),
            sum(s is not None for s in self._soft),
            len(self.rows),
            len(with_topk),
            no_texts,
        )


SoftTargets = tuple[Tensor, Tensor, Tensor]  # topk_ids [La,k] int64, topk_logprobs [La,k], topk_valid [La]


def _no_soft_targets(max_len: int, k: int) -> SoftTargets:
    return (
        torch.zeros(max_len, k, dtype=torch.long),
        torch.zeros(max_len, k),
        torch.zeros(max_len, dtype=torch.bool),
    )


def align_soft_targets(
    lt: TokenLogprobs, answer: str, tok: StudentTokenizer, max_len: int, k: int
) -> SoftTargets | None:
    """The teacher's top-k at the student's answer positions, aligned by characters (the teacher's
    tokenizer is not the student's). None when ``lt`` carries no piece texts, ``answer`` is not in the text
    they decode to (the log-probs came from another text), or no position aligns.

    The teacher's text may also be the end of the answer only (the graph wrote the answer's opening and the
    LLM continued it): the positions of the opening then get none.

    A student target position gets soft targets when a teacher piece starts at the same character of the
    answer with exactly the student token's text: both models then predict the same next characters from
    the same text. Each of the teacher's alternatives there maps to the student token with exactly its text
    (:attr:`StudentTokenizer.piece_ids`), or to ``<eos>`` when it is one of the teacher's EOS ids; an
    alternative with no student token is dropped (log-prob −inf, which :func:`losses.answer_kl` skips). The
    ``<eos>`` target after the answer aligns with the teacher's EOS step when the answer ends the teacher's
    text. The alternatives are the teacher's first ``k`` at that step, in its order (slots kept).
    """
    if not lt.token_texts or not lt.topk_texts or not answer:
        return None
    teacher_text = "".join(lt.token_texts)
    base = teacher_text.find(answer)  # the answer is the teacher's text stripped (or a part of it)
    if base < 0:
        # or the teacher's text ends the answer: the LLM continued an opening the graph wrote (visual_rag's
        # scene sentence); the opening's positions get no soft targets
        said = teacher_text.strip()
        inner = answer.rfind(said) if said else -1
        if inner < 0 or inner + len(said) != len(answer):
            return None
        lead = len(teacher_text) - len(teacher_text.lstrip())
        base = lead - inner  # the answer's character s is the teacher's base + s
    starts: dict[int, int] = {}  # char offset -> the teacher step whose (non-empty) piece starts there
    pos = 0
    for j, piece in enumerate(lt.token_texts):
        if piece:
            starts.setdefault(pos, j)
        pos += len(piece)
    eos = set(lt.eos_ids)
    pieces = tok.piece_ids

    def student_id(teacher_id: int, text: str) -> int | None:
        return EOS_ID if teacher_id in eos else pieces.get(text)

    topk_ids, topk_lp, topk_valid = _no_soft_targets(max_len, k)

    def fill(p: int, j: int) -> None:
        row = [-float("inf")] * k
        seen: dict[int, int] = {}  # student id -> slot (two teacher pieces can map to one student token)
        for slot, (tid, text, lp) in enumerate(
            zip(lt.topk_ids[j][:k], lt.topk_texts[j][:k], lt.topk_logprobs[j][:k], strict=True)
        ):
            sid = student_id(tid, text)
            if sid is None:
                continue
            if sid in seen:  # its mass joins the first slot's
                row[seen[sid]] = float(np.logaddexp(row[seen[sid]], lp))
                continue
            seen[sid] = slot
            topk_ids[p, slot] = sid
            row[slot] = float(lp)
        topk_lp[p] = torch.tensor(row)
        topk_valid[p] = bool(seen)

    ids, offsets = tok.encode_offsets(answer)
    n = min(len(ids), max_len - 1)  # as StudentTokenizer.encode_answer truncates
    for p in range(n):
        s, e = offsets[p]
        step = starts.get(base + s)
        text = answer[s:e]
        if step is None or lt.token_texts[step] != text or pieces.get(text) != ids[p]:
            continue
        if student_id(lt.token_ids[step], text) == ids[p]:  # the teacher's choice is the student's target
            fill(p, step)
    last = len(lt.token_ids) - 1
    if (
        len(ids) < max_len  # the target ends with <eos> (not truncated)
        and last >= 0
        and lt.token_ids[last] in eos
        and base + len(answer) == len(teacher_text)  # the teacher ended its text right where the answer ends
    ):
        fill(len(ids), last)
    return (topk_ids, topk_lp, topk_valid) if bool(topk_valid.any()) else None


def collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack a list of items (all fixed-shape) into a batch."""
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}
