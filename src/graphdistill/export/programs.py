"""What gets exported: the student RUN loaded, its programs (``encode``, and ``decode_step`` when the student
has a text head), the inputs they are checked on, and the PyTorch reference each exported program must
reproduce."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graphdistill._lazy import require
from graphdistill.dataset import DatasetError, DatasetRow, open_dataset
from graphdistill.errors import GraphdistillError
from graphdistill.runner.bpe import ByteLevelBPE
from graphdistill.runner.bundle import Raw, greedy_token
from graphdistill.runner.manifest import Document, Preprocessing
from graphdistill.runner.preprocess import Letterbox, load_rgb, preprocess
from graphdistill.runner.tta import View
from graphdistill.student.config import POINTER_KEYS

log = logging.getLogger(__name__)

ENCODE_INPUTS = ["image", "question_ids", "question_mask"]
DECODE_OUTPUTS = ["scores", "kv_new"]
# encode's outputs besides the heads: the answer decoder's per-query inputs (with a text head) or the memory
TEXT_OUTPUTS = ("cross_kv", *POINTER_KEYS)


class ExportError(GraphdistillError, RuntimeError):
    """The run cannot be exported, or the exported model failed the parity/fidelity gate."""


@dataclass
class LoadedRun:
    run: Path
    model: Any  # the Student, eval mode
    config: Any  # StudentConfig
    meta: dict[str, Any]
    tokenizer_path: Path
    tokenizer: ByteLevelBPE
    dataset_path: str | None  # the dataset's folder or URL
    preprocessing: Preprocessing
    class_names: list[str]
    documents: list[Document]
    special_ids: dict[str, int]
    thresholds: dict[str, float]
    memory_len: int = 0
    # encode's outputs in order: "cross_kv" and the copy path's inputs (with a text head) or "memory" (without),
    # then the student's heads
    encode_outputs: list[str] = field(default_factory=list)

    @property
    def has_text(self) -> bool:
        return bool(self.config.has_text)

    @property
    def has_copy(self) -> bool:
        return "ptr_keys" in self.encode_outputs


@dataclass
class Sample:
    """One (image, question) the exported model is checked on, preprocessed exactly as the runner does."""

    image_input: np.ndarray  # [1, 3, S, S] float32
    question: str
    question_ids: np.ndarray  # [1, Lq] int64
    question_mask: np.ndarray  # [1, Lq] int64
    letterbox: Letterbox
    row: DatasetRow | None = None  # the dataset row: the teacher's targets
    rgb: np.ndarray | None = None  # the photo itself (H×W×3 uint8): test-time views are made from it
    view: View | None = None  # a test-time view of a photo: how to map its objects back (None: the photo)

    def torch_inputs(self) -> tuple[Any, ...]:
        torch = require("torch")
        return tuple(torch.from_numpy(a) for a in (self.image_input, self.question_ids, self.question_mask))


def load_run(run: Path, dataset: str | Path | None = None) -> LoadedRun:
    """RUN/{config.json, model.safetensors, tokenizer.json, meta.json} -> the eval-mode student + metadata."""
    from graphdistill.student.model import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Student, StudentConfig
    from graphdistill.student.predict import STUDENT_FORMAT

    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (run / name).is_file():
            raise ExportError(f"{run} is not a student run: {name} is missing")
    meta_path = run / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("format") not in (None, STUDENT_FORMAT):
        raise ExportError(
            f"{run}: student format {meta.get('format')!r} is not {STUDENT_FORMAT!r}: train it again"
        )
    st = require("safetensors.torch", purpose="loading the student")
    try:
        config = StudentConfig.from_dict(json.loads((run / "config.json").read_text()))
        model = Student(config)
        st.load_model(model, str(run / "model.safetensors"))
    except (ValueError, RuntimeError, OSError) as exc:
        raise ExportError(f"cannot load the student from {run}: {exc}") from exc
    model.eval()
    ds = dataset or meta.get("dataset")
    spec: Preprocessing
    if meta.get("preprocessing"):
        spec = meta[
            "preprocessing"
        ]  # as train wrote it (student.loader.preprocess_spec); Preprocessor checks it
    else:
        from graphdistill.student.loader import spec_of

        spec = spec_of(config)
    loaded = LoadedRun(
        run=run,
        model=model,
        config=config,
        meta=meta,
        tokenizer_path=run / "tokenizer.json",
        tokenizer=ByteLevelBPE.from_file(run / "tokenizer.json"),
        dataset_path=str(ds) if ds else None,
        preprocessing=spec,
        class_names=list(meta.get("class_names") or []),
        documents=[{"id": d["id"], "text": d.get("text", "")} for d in meta.get("documents") or []],
        special_ids={"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID, "unk": UNK_ID},
        thresholds={
            "score_threshold": float(config.score_threshold),  # applied in the graph (the `keep` output)
        },
    )
    loaded.memory_len = int(model.memory_len)
    loaded.encode_outputs = [*text_output_names(model), *head_names(model)]
    if config.max_depth > 1:  # the encoder's tokens, which the deepen program goes on from
        loaded.encode_outputs.append("state")
    return loaded


def text_output_names(model: Any) -> list[str]:
    """encode's first outputs: ``cross_kv`` and, with the copy path, ``ptr_keys``/``ptr_bias``/``ptr_vocab``
    (and ``ptr_next`` when its copies go on where they left off) (with a text head); ``memory`` (without)."""
    from graphdistill.export.phone_decode import pointer_inputs

    if not model.config.has_text:
        return ["memory"]
    return ["cross_kv", *pointer_inputs(hasattr(model, "ptr_q"), hasattr(model, "ptr_cont"))]


def head_names(model: Any) -> list[str]:
    """The keys of ``model.encode``'s output that are heads (objects, sources, embeddings), in its order."""
    torch = require("torch")
    cfg = model.config
    s = cfg.image_size
    with torch.no_grad():
        out = model.encode(
            torch.zeros(1, 3, s, s),
            torch.ones(1, cfg.max_question_len, dtype=torch.long),
            torch.ones(1, cfg.max_question_len, dtype=torch.bool),
        )
    return [k for k in out if k != "memory" and k not in TEXT_OUTPUTS]


def deepen_names(loaded: LoadedRun) -> tuple[list[str], list[str]]:
    """The ``deepen`` program's inputs and outputs (a student trained with ``max_depth`` > 1): ``state`` and
    ``question_mask`` in, then the copy path's ``ptr_keys`` when its object slots' keys come from the memory;
    out the next ``state`` and every output of encode that the memory makes (``cross_kv`` or ``memory``,
    ``ptr_keys``, ``embedding:*``), each replacing encode's output of that name."""
    copy = loaded.has_copy and loaded.config.has_objects
    first = text_output_names(loaded.model)[0]
    embeddings = [k for k in loaded.encode_outputs if k.startswith("embedding:")]
    inputs = ["state", "question_mask", *(["ptr_keys"] if copy else [])]
    return inputs, ["state", first, *(["ptr_keys"] if copy else []), *embeddings]


def make_sample(loaded: LoadedRun, image: np.ndarray, question: str, row: DatasetRow | None = None) -> Sample:
    rgb = load_rgb(image)
    x, box = preprocess(rgb, loaded.preprocessing)
    lq = loaded.config.max_question_len
    ids = loaded.tokenizer.encode(question)[:lq]
    q = np.full((1, lq), loaded.special_ids["pad"], dtype=np.int64)
    q[0, : len(ids)] = ids
    mask = np.zeros((1, lq), dtype=np.int64)
    mask[0, : len(ids)] = 1
    return Sample(x, question, q, mask, box, row, rgb)


def collect_samples(
    loaded: LoadedRun, kind: str, n: int, exclude: Sequence[Sample] = (), leave: int = 0
) -> list[Sample]:
    """``calibration``: ``n`` train rows spread over the split's distinct images (the first row of each image in
    order, then the second of each, ...): a recorded image is asked several questions and replayed with edited
    objects, so the first rows are few images, and int8 calibrated on few images moves boxes on others. When the
    val split has fewer than ``leave`` rows, calibration leaves train rows for the held-out inputs to make up
    the difference (at most half the split).
    ``heldout``: the first ``n`` val rows, topped up with train rows whose image is not one of ``exclude``'s
    (the calibration samples), then with any other train rows. Never the test split: the held-out photos are
    only for evaluation, and a gate that looked at them would be choosing what ships by them."""

    if loaded.dataset_path is None:
        raise ExportError(f"{loaded.run}/meta.json names no dataset; pass one (--dataset)")
    try:
        ds = open_dataset(loaded.dataset_path)
    except (DatasetError, OSError) as exc:
        raise ExportError(f"cannot open the run's dataset {loaded.dataset_path}: {exc}") from exc
    train = ds.rows("train")
    if kind == "calibration":
        short = min(max(0, leave - len(ds.rows("val"))), len(train) // 2)
        rows = spread_over_images(train)[: max(1, min(n, len(train) - short))]
    else:
        seen = {s.row.id for s in exclude if s.row is not None}
        used = {s.row.image for s in exclude if s.row is not None}
        rest = [r for r in train if r.id not in seen]
        rows = (
            ds.rows("val") + [r for r in rest if r.image not in used] + [r for r in rest if r.image in used]
        )[:n]
    return [make_sample(loaded, ds.image(r), r.question, r) for r in rows]


def spread_over_images(rows: Sequence[DatasetRow]) -> list[DatasetRow]:
    """``rows`` reordered round robin over their images: each image's first row (in order of first
    appearance), then each image's second row, and so on."""
    by_image: dict[str, list[DatasetRow]] = {}
    for r in rows:
        by_image.setdefault(r.image, []).append(r)
    out: list[DatasetRow] = []
    for depth in range(max((len(v) for v in by_image.values()), default=0)):
        out += [v[depth] for v in by_image.values() if depth < len(v)]
    return out


def programs_for(
    loaded: LoadedRun, fused_norms: bool = False, channels_last: bool = False, encode_depth: int | None = None
) -> tuple[dict[str, tuple[Any, tuple[Any, ...]]], list[int]]:
    """The programs as eval modules with example inputs, and the fixed KV-cache shape: ``encode`` always,
    ``decode_step`` (:class:`~graphdistill.export.phone_decode.PhoneDecodeStep`; ``fused_norms`` for ONNX)
    only for a student with a text head (no KV cache, ``[]``, without one). ``channels_last``: encode's image
    is traced in NHWC memory (ExecuTorch: its program then reads the image in that dim order, and XNNPACK's
    convolutions need no transpose of it). A student with recurrent depth also gets ``deepen`` and encode's
    ``state``; ``encode_depth`` r instead makes encode run its recurrent block r times itself, with neither (one
    program per depth: the shape ``benchmarks/depth.py`` measures against)."""
    from graphdistill.export.phone_decode import PhoneDecodeStep, step_inputs

    torch = require("torch")
    model, cfg = loaded.model, loaded.config
    head_keys = [k for k in loaded.encode_outputs if k not in ("memory", "state", *TEXT_OUTPUTS)]
    deep = cfg.max_depth > 1 and encode_depth is None
    depth = encode_depth or 1

    nn: Any = torch.nn

    text_keys = text_output_names(model)

    class Encode(nn.Module):  # type: ignore[misc]
        """image, question_ids, question_mask (int64, 1 = token) -> the answer decoder's per-query inputs (its
        cross-attention keys/values and the copy path's object keys, bias and class tokens, computed once per
        query, not once per token; the memory itself without a text head) + each of the student's heads."""

        def __init__(self) -> None:
            super().__init__()
            self.student = model

        def forward(self, image: Any, question_ids: Any, question_mask: Any) -> tuple[Any, ...]:
            enc = self.student.encode(image, question_ids, question_mask != 0, depth=depth, keep_state=deep)
            first = []
            for k in text_keys:
                if k == "cross_kv":
                    first.append(self.student.cross_kv(enc["memory"]))
                elif k == "ptr_keys":  # transposed once here, so each decode step reads it as it multiplies
                    first.append(enc[k].transpose(1, 2))
                else:
                    first.append(enc[k])
            return (*first, *(enc[k] for k in head_keys), *((enc["state"],) if deep else ()))

    deep_in, deep_out = deepen_names(loaded) if deep else ([], [])

    class Deepen(nn.Module):  # type: ignore[misc]
        """One more iteration of the recurrent block: state, question_mask (int64, 1 = token)[, ptr_keys] ->
        the next state and what the memory at that depth makes (see :func:`deepen_names`)."""

        def __init__(self) -> None:
            super().__init__()
            self.student = model

        def forward(self, state: Any, question_mask: Any, *ptr_keys: Any) -> tuple[Any, ...]:
            student = self.student
            state, memory = student.deepen(state, question_mask != 0)
            outs = [state, student.cross_kv(memory) if deep_out[1] == "cross_kv" else memory]
            if ptr_keys:  # the object slots' keys anew, the documents' as encode made them
                n_obj = student.n_obj
                keys = student.object_keys(memory).transpose(1, 2)
                outs.append(torch.cat([keys, ptr_keys[0][:, :, n_obj:]], 2))
            emb = student.embeddings(memory)
            return (*outs, *(emb[k] for k in deep_out if k.startswith("embedding:")))

    s, lq = cfg.image_size, cfg.max_question_len
    image = torch.zeros(1, 3, s, s)
    enc_example = (
        image.contiguous(memory_format=torch.channels_last) if channels_last else image,
        torch.ones(1, lq, dtype=torch.long),
        torch.ones(1, lq, dtype=torch.long),
    )
    programs: dict[str, tuple[Any, tuple[Any, ...]]] = {"encode": (Encode().eval(), enc_example)}
    if deep:
        deep_example = (
            torch.zeros(state_shape(loaded)),
            torch.ones(1, lq, dtype=torch.long),
            *((torch.zeros(pointer_shapes(loaded)["ptr_keys"]),) if "ptr_keys" in deep_in else ()),
        )
        programs["deepen"] = (Deepen().eval(), deep_example)
    if not loaded.has_text:
        return programs, []
    kv = model.empty_cache(1)
    cross = torch.zeros(cross_kv_shape(loaded))
    pointer = pointer_example(loaded) if loaded.has_copy else ()
    dec_example = step_inputs(
        torch.ones(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long), cross, kv, pointer
    )
    programs["decode_step"] = (PhoneDecodeStep(model, fused_norms=fused_norms).eval(), dec_example)
    return programs, list(kv.shape)


def state_shape(loaded: LoadedRun) -> list[int]:
    """The recurrent block's state: [batch 1, context tokens + question tokens, d_model]."""
    cfg = loaded.config
    return [1, int(loaded.model.n_ctx) + cfg.max_question_len, cfg.d_model]


def cross_kv_shape(loaded: LoadedRun) -> list[int]:
    """[decoder layers, 2 (key, value), batch 1, heads, context tokens, head_dim]."""
    cfg, model = loaded.config, loaded.model
    return [cfg.dec_layers, 2, 1, cfg.n_heads, int(model.n_ctx), cfg.head_dim]


def pointer_shapes(loaded: LoadedRun) -> dict[str, list[int]]:
    """The copy path's per-query inputs: ``ptr_keys`` [1, D, K] (the copy slots' keys, transposed),
    ``ptr_bias`` [1, K], ``ptr_vocab`` [1, K, V] and, when the copies go on where they left off, ``ptr_next``
    [1, V, K]."""
    cfg = loaded.config
    k = int(loaded.model.n_copy)
    out = {"ptr_keys": [1, cfg.d_model, k], "ptr_bias": [1, k], "ptr_vocab": [1, k, cfg.vocab_size]}
    if hasattr(loaded.model, "ptr_cont"):
        out["ptr_next"] = [1, cfg.vocab_size, k]
    return out


def pointer_example(loaded: LoadedRun) -> tuple[Any, ...]:
    torch = require("torch")
    return tuple(torch.zeros(shape) for shape in pointer_shapes(loaded).values())


def torch_reference(
    programs: dict[str, tuple[Any, tuple[Any, ...]]],
    sample: Sample,
    loaded: LoadedRun,
    record: list[tuple[Any, ...]] | None = None,
    depth: int = 1,
    deepen_calls: list[tuple[Any, ...]] | None = None,
) -> Raw:
    """The PyTorch eager run of exactly the loop :meth:`BundleRunner.run_models` performs, with the student's
    own :meth:`Student.decode_step` (the reference the exported step must reproduce). ``record`` collects
    every step's inputs in the exported step's form (calibration data for int8). ``depth`` r: ``deepen`` r - 1
    times after encode, as the runner does; ``deepen_calls`` collects its inputs (int8 calibration)."""
    torch = require("torch")
    from graphdistill.export.phone_decode import step_inputs

    enc, _ = programs["encode"]
    ids = loaded.special_ids
    with torch.no_grad():
        inputs = sample.torch_inputs()
        outs = enc(*inputs)
        by_name = dict(zip(loaded.encode_outputs, outs, strict=True))
        if depth > 1:
            deepen, _ = programs["deepen"]
            names_in, names_out = deepen_names(loaded)
            for _ in range(depth - 1):
                args = tuple(inputs[2] if n == "question_mask" else by_name[n] for n in names_in)
                if deepen_calls is not None:
                    deepen_calls.append(args)
                by_name.update(zip(names_out, deepen(*args), strict=True))
        named = {k: v[0].numpy() for k, v in by_name.items()}
        if "decode_step" not in programs:
            return Raw([], named)
        model = loaded.model
        cross = by_name["cross_kv"]
        names = [k for k in TEXT_OUTPUTS[1:] if k in by_name] if loaded.has_copy else []
        pointer = tuple(by_name[k] for k in names)
        ptr = {
            k: (v.transpose(1, 2) if k == "ptr_keys" else v) for k, v in zip(names, pointer, strict=True)
        } or None
        kv = loaded.model.empty_cache(1)
        token = torch.tensor([[ids["bos"]]], dtype=torch.long)
        prev = token  # the token read before ``token`` (<bos> before the first)
        answer: list[int] = []
        for pos in range(loaded.config.max_answer_len - 1):
            position = torch.tensor([pos], dtype=torch.long)
            if record is not None:
                record.append(step_inputs(token, position, cross, kv, pointer, prev))
            logits, kv_new = model.decode_step(token, position, None, kv, cross, ptr, prev)
            kv = model.write_kv(kv, kv_new, position)  # a new tensor: recorded inputs stay as they were
            nxt = greedy_token(logits[0], answer, loaded.config.no_repeat_ngram, loaded.config.max_token_run)
            if nxt == ids["eos"]:
                break
            answer.append(nxt)
            prev, token = token, torch.tensor([[nxt]], dtype=torch.long)
    return Raw(answer, named)
