"""Run a trained student: ``load_student(RUN).predict(image, question)`` returns exactly the teacher graph's
final output shape — the output fields its schema declares, by their names (``StudentConfig.outputs``): for
visual_rag ``{"answer": str, "objects": [ObjectOut dicts], "sources": [doc ids]}``; a TEXT-only graph gets
just its text field; a DETECTIONS output comes back as a ``trace.Detections`` dict; an EMBEDDING output as
a list of floats.

Boxes come back in pixels of the input image (the letterbox of :mod:`graphdistill.student.loader` undone),
masks as COCO uncompressed RLE dicts at the input image's size.

Any module that follows :class:`~graphdistill.student.model.StudentProtocol` predicts. When it also has the
fast path (``encode`` + ``heads`` + ``generate``, as the built-in ``Student`` does) one encoder pass feeds
the heads and a KV-cached decoder; otherwise the answer is decoded greedily through ``forward`` itself (one
call per token, the whole prefix each time) and the heads are read from a last ``forward`` over the answer
as training fed it. An output whose head the module does not return comes back empty (``[]``, or ``None``
for text and embeddings).
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphdistill.errors import GraphdistillError
from graphdistill.runner.bundle import greedy_token, top_sources
from graphdistill.runner.preprocess import Letterbox, object_mask_rle
from graphdistill.runner.tta import has_near_miss, near_floor, parse_tta, predict_views
from graphdistill.student.loader import MEAN, PAD_VALUE, REDUCING_GAP, STD, preprocess_image
from graphdistill.student.model import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    ExportableStudent,
    Student,
    StudentConfig,
    StudentProtocol,
)
from graphdistill.student.tokenizer import StudentTokenizer
from graphdistill.trace import RLE, Detections, ObjectOut

log = logging.getLogger(__name__)

# parameters added after runs were trained with models that lacked them; each starts at zero, where the model
# computes exactly what it did without it (the question-mention features)
OPTIONAL_ZERO_PARAMS = ("obj_mention", "doc_mention")
RUN_FILES = ("model.safetensors", "config.json", "tokenizer.json", "meta.json")
# 2: dense YOLO-style object head selected in the graph, object tokens, copy path (1: DETR-style set prediction)
STUDENT_FORMAT = "graphdistill-student/2"


class RunError(GraphdistillError, ValueError):
    """A student run folder is missing or incomplete; the message names the path."""


def check_student(model: object) -> None:
    """Raise ``TypeError`` saying what is missing when ``model`` does not follow ``StudentProtocol``."""
    name = type(model).__qualname__
    if not isinstance(model, nn.Module):
        raise TypeError(f"student {name}: must be a torch.nn.Module following StudentProtocol")
    if not isinstance(model, StudentProtocol) or not isinstance(
        getattr(model, "config", None), StudentConfig
    ):
        raise TypeError(
            f"student {name}: needs a `config` attribute holding the StudentConfig it was built with "
            "(StudentProtocol: `config` + forward(image, question_ids, question_mask, answer_in) -> dict)"
        )


def has_fast_path(model: object) -> TypeGuard[ExportableStudent]:
    """``encode`` (+ ``generate`` when the config has a text output): see the module docstring."""
    config = getattr(model, "config", None)
    if not isinstance(config, StudentConfig):
        return False
    need = ("encode", "generate") if config.has_text else ("encode",)
    return all(callable(getattr(model, n, None)) for n in need)


def config_of(model: object) -> StudentConfig:
    """The StudentConfig a student was built with (``StudentProtocol.config``)."""
    config = getattr(model, "config", None)
    if not isinstance(config, StudentConfig):
        raise TypeError(f"student {type(model).__qualname__}: no `config` holding its StudentConfig")
    return config


@torch.no_grad()
def greedy_answer_ids(
    model: nn.Module, image: Tensor, question_ids: Tensor, question_mask: Tensor, max_len: int | None = None
) -> Tensor:
    """Greedy answer ids [B, n] (no <bos>; <pad> after <eos>): ``generate`` when the module has the fast
    path, else :func:`greedy_forward`."""
    if has_fast_path(model):
        return model.generate(image, question_ids, question_mask, max_len)
    return greedy_forward(model, image, question_ids, question_mask, max_len)[0]


@torch.no_grad()
def greedy_forward(
    model: nn.Module, image: Tensor, question_ids: Tensor, question_mask: Tensor, max_len: int | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Decode through ``forward`` alone -> (answer ids [B, n] as :func:`greedy_answer_ids`, the outputs of a
    last forward whose ``answer_in`` is ``<bos> answer <pad>…`` padded to ``max_answer_len``, the exact
    shape training fed, so heads that read the answer see what they were trained on)."""
    cfg = config_of(model)
    t_max = cfg.max_answer_len
    n = min(max_len or t_max - 1, t_max - 1)
    b = image.shape[0]
    seq = torch.full((b, 1), BOS_ID, dtype=torch.long, device=image.device)
    done = torch.zeros(b, dtype=torch.bool, device=image.device)
    out = model(image, question_ids, question_mask, seq)
    for _ in range(n if "answer_logits" in out else 0):
        logits = out["answer_logits"][:, -1]
        history = seq[:, 1:].tolist()
        nxt = torch.tensor(
            [greedy_token(logits[r], history[r], cfg.no_repeat_ngram, cfg.max_token_run) for r in range(b)],
            device=image.device,
        )
        nxt = torch.where(done, torch.full_like(nxt, PAD_ID), nxt)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        done = done | (nxt == EOS_ID)
        if bool(done.all()) or seq.shape[1] > n:
            break
        out = model(image, question_ids, question_mask, seq)
    ids = F.pad(seq[:, 1:], (0, n - (seq.shape[1] - 1)), value=PAD_ID)
    answer_in = torch.cat([seq[:, :1], torch.where(ids == EOS_ID, PAD_ID, ids)], dim=1)
    answer_in = F.pad(answer_in, (0, t_max - answer_in.shape[1]), value=PAD_ID)
    return ids, model(image, question_ids, question_mask, answer_in)


class StudentPredictor:
    def __init__(
        self, model: nn.Module, tokenizer: StudentTokenizer, meta: dict[str, Any], device: str = "cpu"
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.meta = meta
        self.config = config_of(model)
        self.class_names: list[str] = list(meta.get("class_names", []))
        self.doc_ids: list[str] = [d["id"] for d in meta.get("documents", [])]
        self.device = torch.device(device)
        spec = meta.get("preprocessing")  # the rule the run was trained with (older runs: no reducing_gap)
        self.reducing_gap: float | None = spec.get("reducing_gap") if spec else REDUCING_GAP
        self.mean: Any = spec["mean"] if spec else MEAN
        self.std: Any = spec["std"] if spec else STD

    @torch.no_grad()
    def predict(
        self,
        image: np.ndarray,
        question: str,
        *,
        score_threshold: float | None = None,
        sources_k: int | None = None,
        max_len: int | None = None,
        tta: str | Sequence[str] | None = None,
        tta_below: float | None = None,
        depth: int = 1,
    ) -> dict[str, Any]:
        """One photo (HxWx3 uint8 RGB) + question -> ``{output field: value}`` for the graph's outputs. The
        objects are those the student keeps (``keep``: its own score threshold and NMS, in the graph), and of
        those only the ones scoring at least ``score_threshold`` when it is given.

        ``tta`` (``"flip,scale"`` or a list of those names): the student also answers those views of the photo
        and the views vote (:mod:`graphdistill.runner.tta`, the bundle runner's rule); each view costs a
        whole query. ``tta_below``: only when the photo's own answer has no object, one scoring under it, or a
        near miss (:meth:`first_answer`; adaptive compute, :func:`graphdistill.runner.tta.unsure`). ``depth``: iterations of the recurrent
        block (1 .. the config's ``max_depth``; :meth:`Student.context`), each one more encoder layer."""
        augmentations = parse_tta(tta)
        self.check_depth(depth)
        if augmentations:
            first, near = None, False
            if tta_below is not None:  # the photo first, with its near misses (the student's own selection)
                first, near = self.first_answer(image, question, score_threshold, sources_k, max_len, depth)
            return predict_views(
                image,
                lambda view: self._answer(view, question, score_threshold, sources_k, max_len, depth)[0],
                augmentations,
                self.config.outputs,
                PAD_VALUE,
                self.config.image_size,
                below=tta_below,
                first=first,
                near=near,
            )
        return self._answer(image, question, score_threshold, sources_k, max_len, depth)[0]

    @torch.no_grad()
    def first_answer(
        self,
        image: np.ndarray,
        question: str,
        score_threshold: float | None = None,
        sources_k: int | None = None,
        max_len: int | None = None,
        depth: int = 1,
    ) -> tuple[dict[str, Any], bool]:
        """The photo's own answer (no views) and whether the student's selection holds a near miss: a slot it
        did not keep scoring at least :func:`graphdistill.runner.tta.near_floor` of its threshold (always False
        for a model other than the built-in student). With :func:`graphdistill.runner.tta.unsure`, what the
        adaptive policy decides from, as the bundle runner's ``first_answer``."""
        answer, heads = self._answer(image, question, score_threshold, sources_k, max_len, depth)
        if not isinstance(self.model, Student):  # another model's unkept slots say nothing
            return answer, False
        raw: dict[str, Any] = {k: heads[k][0].float().cpu().numpy() for k in ("scores", "keep") if k in heads}
        return answer, has_near_miss(raw, near_floor(self.config.score_threshold))

    def _answer(
        self,
        image: np.ndarray,
        question: str,
        score_threshold: float | None,
        sources_k: int | None,
        max_len: int | None,
        depth: int,
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """One query (no views) -> (the output fields, the model's raw heads)."""
        cfg = self.config
        h, w = image.shape[:2]
        x, scale = preprocess_image(image, cfg.image_size, self.reducing_gap, self.mean, self.std)
        q_ids, q_mask = self.tokenizer.encode_question(question, cfg.max_question_len)
        img = x[None].to(self.device)
        qi = torch.tensor([q_ids], dtype=torch.long, device=self.device)
        qm = torch.tensor([q_mask], dtype=torch.bool, device=self.device)
        t0 = time.perf_counter()
        answer = None
        model = self.model
        if has_fast_path(model):
            # depth only when asked for: a user's own exportable student may take no such keyword
            heads = model.encode(img, qi, qm, depth=depth) if depth != 1 else model.encode(img, qi, qm)
            if cfg.has_text:
                ids = model.generate(img, qi, qm, max_len, encoded=heads)
                answer = self.tokenizer.decode(ids[0].tolist())
        else:
            ids, heads = greedy_forward(self.model, img, qi, qm, max_len)
            if cfg.has_text and "answer_logits" in heads:
                answer = self.tokenizer.decode(ids[0].tolist())
        log.debug("student query: %.1f ms", (time.perf_counter() - t0) * 1000)
        result: dict[str, Any] = {}
        for name, kind in cfg.outputs.items():  # the schema's order and field names
            if kind == "text":
                result[name] = answer
            elif kind == "objects":
                result[name] = self._objects(heads, h, w, scale, score_threshold)
            elif kind == "detections":
                objs = self._objects(heads, h, w, scale, score_threshold)
                result[name] = Detections(
                    xyxy=[o["box"] for o in objs],
                    class_ids=[int(o["class_id"]) for o in objs],
                    names=[o["label"] for o in objs],
                    scores=[o["score"] for o in objs],
                    image_size=[h, w],
                ).model_dump(mode="json")
            elif kind == "sources" and "source_logits" not in heads:
                result[name] = []
            elif kind == "sources":
                result[name] = top_sources(
                    heads["source_logits"][0].float().cpu().numpy(), sources_k or cfg.sources_k, self.doc_ids
                )
            elif kind == "embedding":
                emb = heads.get(f"embedding:{name}")
                result[name] = None if emb is None else emb[0].float().cpu().tolist()
        return result, heads

    def check_depth(self, depth: int) -> None:
        """A :class:`ValueError` naming the depths this student takes, unless ``depth`` is one of them."""
        top = self.config.max_depth if has_fast_path(self.model) else 1
        if not 1 <= depth <= top:
            raise ValueError(
                f"depth {depth}: this student takes depths 1..{top} (its recurrent block was trained for "
                f"max_depth {self.config.max_depth}; train with --max-depth R for more)"
            )

    def _objects(
        self, heads: dict[str, torch.Tensor], h: int, w: int, scale: float, thr: float | None = None
    ) -> list[dict[str, Any]]:
        """The kept objects, best first: boxes back to image pixels, masks pasted inside their boxes (the bundle
        runner's rule, :func:`object_mask_rle`)."""
        if "boxes" not in heads:
            return []
        cfg = self.config
        scores = heads["scores"][0].float().cpu()
        keep = heads["keep"][0].cpu().bool() if "keep" in heads else scores >= cfg.score_threshold
        if thr is not None:
            keep = keep & (scores >= thr)
        classes = heads["classes"][0].cpu()
        side = cfg.image_size / scale
        boxes = heads["boxes"][0].float().cpu() * side
        out: list[dict[str, Any]] = []
        for q in torch.argsort(scores, descending=True).tolist():
            if not bool(keep[q]):
                continue
            cx, cy, bw, bh = boxes[q].tolist()
            x1, y1 = min(max(cx - bw / 2, 0.0), w), min(max(cy - bh / 2, 0.0), h)
            x2, y2 = min(max(cx + bw / 2, x1), w), min(max(cy + bh / 2, y1), h)
            mask = None
            if "mask_logits" in heads:
                logits = heads["mask_logits"][0, q].float().cpu().numpy()
                mask = RLE(**object_mask_rle(logits, Letterbox(scale, 0, 0, h, w), [x1, y1, x2, y2]))
            c = int(classes[q])
            label = self.class_names[c] if c < len(self.class_names) else str(c)
            out.append(
                ObjectOut(
                    label=label, class_id=c, score=float(scores[q]), box=[x1, y1, x2, y2], mask=mask
                ).model_dump(mode="json")
            )
        return out


def load_student(run: str | Path, device: str = "cpu") -> StudentPredictor:
    """Rebuild the model of a run folder (config.json + model.safetensors) with its tokenizer and meta."""
    from safetensors.torch import load_model

    root = Path(run)
    if not root.is_dir():
        raise RunError(f"student run {root}: no such folder")
    missing = [f for f in RUN_FILES if not (root / f).exists()]
    if missing:
        raise RunError(f"student run {root}: missing {', '.join(missing)} (did training finish?)")
    meta = json.loads((root / "meta.json").read_text())
    if meta.get("format") not in (None, STUDENT_FORMAT):
        raise RunError(
            f"student run {root}: format {meta.get('format')!r} is not {STUDENT_FORMAT!r} (an older student "
            "architecture): train it again"
        )
    try:
        config = StudentConfig.from_dict(json.loads((root / "config.json").read_text()))
    except ValueError as exc:
        raise RunError(f"student run {root}: {exc}") from exc
    cls: Callable[[StudentConfig], nn.Module] = Student  # a user's model class is built the same way
    name = meta.get("model_class")
    if name and name != f"{Student.__module__}.{Student.__qualname__}":
        mod, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as exc:
            raise RunError(
                f"student run {root}: its model class {name} cannot be imported ({exc}); "
                "make that module importable (installed or on PYTHONPATH)"
            ) from exc
    model = cls(config)
    try:
        check_student(model)
    except TypeError as exc:
        raise RunError(f"student run {root}: {exc}") from exc
    missing_keys, unexpected = load_model(model, str(root / "model.safetensors"), strict=False, device=device)
    # a run trained before a parameter that starts at zero existed is that model exactly: it loads as it was
    absent = [k for k in missing_keys if k not in OPTIONAL_ZERO_PARAMS]
    if absent or unexpected:
        raise RunError(
            f"student run {root}: model.safetensors does not fit its config.json (missing {absent[:5]}, "
            f"unexpected {list(unexpected)[:5]}): train it again"
        )
    model.to(device)
    return StudentPredictor(model, StudentTokenizer.load(root / "tokenizer.json"), meta, device)
