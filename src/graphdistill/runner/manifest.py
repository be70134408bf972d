"""The bundle's manifest: the one contract between ``graphdistill export`` and every runner of a bundle.

``export.bundle.export_run`` writes a :class:`Manifest` to ``BUNDLE/manifest.json``;
``runner.bundle.read_manifest`` reads it back, checks it and hands out the same type, so a field that one
side writes and the other reads is spelled, and typed, once. A phone app reads the same JSON: the
docstring of :mod:`graphdistill.runner.bundle` says what to do with each field.

Typed dictionaries rather than a model class: the manifest is plain JSON on disk, its checksum is taken over
that JSON, and the reference runner imports nothing but the standard library, numpy, Pillow and the runtime.
Deep, descriptive parts (``output_decoding``'s rules in words, the student's config, the export gate) keep
their open shape.
"""

# no ``from __future__ import annotations``: TypedDict reads ``NotRequired`` from evaluated annotations (with
# string annotations Python 3.11 counts every key as required, and read_manifest checks them)
from collections.abc import Mapping
from typing import Any, NotRequired, TypedDict


class TensorSpec(TypedDict):
    """One input or output of a program (also one of a program's own ``arrays``)."""

    name: str
    shape: list[int]
    dtype: str  # numpy's name: "float32", "int64", "bool"
    meaning: NotRequired[str]
    dim_order: NotRequired[list[int]]  # the memory order when it is not the shape's (ExecuTorch NHWC images)
    view_of: NotRequired[list[Any]]  # [array name, i, j]: this input is arrays[name][i, j], handed in place
    per_query: NotRequired[str]  # this input is encode's output of that name, copied in once per query


class ArraySpec(TypedDict):
    """An array the runner owns for a program (``decode_step``'s ``cross_kv`` and ``kv_cache``)."""

    shape: list[int]
    dtype: str
    meaning: str


class ProgramSpec(TypedDict):
    """One exported program: its file, the method to call in it, and its inputs and outputs in order."""

    file: str
    method: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    arrays: NotRequired[dict[str, ArraySpec]]
    inputs_note: NotRequired[str]


class KVCacheSpec(TypedDict):
    """The answer decoder's fixed-size key/value cache, which the runner owns and updates."""

    fixed_size: bool
    shape: list[int]
    layout: str
    initial: str
    max_answer_len: int
    update: str


class Preprocessing(TypedDict):
    """Image in, model input out, as data: what ``student.loader.preprocess_spec`` writes to a run's
    ``meta.json`` and the manifest carries (:mod:`graphdistill.runner.preprocess` implements it)."""

    resize: str  # "letterbox"
    size: list[int]  # [S, S]: the square canvas in pixels
    interpolation: str  # a key of runner.preprocess.RESAMPLE
    pad_value: list[int]
    channel_order: str  # "RGB"
    layout: str  # "NCHW" or "NHWC"
    dtype: str  # "float32"
    scale: float  # pixel values are multiplied by it before mean/std
    mean: list[float]
    std: list[float]
    boxes: str  # the box convention in words
    scale_factor: str  # how the letterbox scale is computed, in words
    align: NotRequired[str]  # "top-left" (the student's rule) or "center"; runs before it: top-left
    reducing_gap: NotRequired[float | None]  # Pillow's reducing_gap; runs before it: none
    rule: NotRequired[str]  # the whole rule in words (in a manifest)


class TokenizerSpec(TypedDict):
    file: str
    type: str
    pad_id: int
    bos_id: int
    eos_id: int
    unk_id: int
    max_question_len: int
    question: str


class Document(TypedDict):
    """One knowledge-base document the sources head ranks, in the order of its ``source_logits``."""

    id: str
    text: str


class ExportGate(TypedDict):
    """What the export gate measured when the bundle was written (``export.bundle``): parity with PyTorch and,
    for int8, fidelity to the teacher before and after quantisation."""

    inputs: dict[str, int]  # {"calibration": n, "heldout": n}: the rows it ran on
    vs_pytorch: dict[str, Any]  # answer_tokens_equal, box_max_abs_diff, mask_iou_min, ..., failures
    tolerances: dict[str, Any]
    fidelity_vs_teacher: NotRequired[dict[str, Any]]  # int8 only: float, int8, drop, max_drop
    by_depth: NotRequired[dict[str, Any]]  # depth r > 1 -> the same checks at that depth
    failures: list[str]
    passed: bool


class TTASpec(TypedDict):
    """``manifest["tta"]``: the test-time augmentation the runner applies (``runner.tta``)."""

    augmentations: list[str]  # views after the photo itself: "flip", "scale"
    scale: float  # the "scale" view shrinks the photo to this fraction of its size
    box_iou: float  # objects of two views are one when their boxes overlap by at least this
    quorum: str  # how many views must find an object (or retrieve a document)
    rule: str  # the fusion in words
    below: NotRequired[float]  # adaptive: views only when the photo's answer has an object under this score


class DepthSpec(TypedDict):
    """``manifest["depth"]``: the recurrent depth the bundle takes (a student trained with ``max_depth`` > 1)."""

    max: int  # the most iterations of the recurrent block (the student's max_depth)
    default: int  # the iterations the runner runs when the app asks for none
    rule: str  # the loop in words


class Manifest(TypedDict):
    """``manifest.json`` of a bundle of format ``runner.bundle.BUNDLE_FORMAT``."""

    format: str
    runtime: str  # "executorch" or "onnx"
    quantize: str  # "none" or "int8"
    quantization_method: dict[str, str]  # program -> how it was quantised
    backend: str
    programs: dict[str, ProgramSpec]  # "encode", and "decode_step" when the graph has a text output
    outputs: dict[str, str]  # the teacher graph's output fields -> kind, in the schema's order
    kv_cache: KVCacheSpec | None  # None without a text output
    preprocessing: Preprocessing
    output_decoding: dict[str, Any]  # thresholds and each decoding rule in words
    tokenizer: TokenizerSpec
    class_names: list[str]
    documents: list[Document]
    teacher_graph: str | None
    started_from: dict[str, Any] | None  # the teacher weights the student started from (their licence binds)
    licence: str
    student_config: dict[str, Any]  # the run's StudentConfig, without the documents' token ids
    source_run: str
    fidelity: dict[str, Any] | None  # the run's eval.json figures (export.bundle.fidelity_summary)
    files: dict[str, str]  # file -> sha256
    file_bytes: dict[str, int]
    parity: ExportGate | None  # the export gate's result (None only while the bundle is being written)
    export_seconds: NotRequired[float]
    tta: NotRequired[TTASpec]  # test-time augmentation; absent: none
    depth: NotRequired[DepthSpec]  # recurrent depth (the deepen program); absent: depth 1 only
    manifest_sha256: NotRequired[str]  # sha256 of the canonical JSON without this field


def missing_fields(manifest: Mapping[str, Any]) -> list[str]:
    """The fields a :class:`Manifest` must have that ``manifest`` lacks (sorted; empty when it has them all)."""
    return sorted(k for k in Manifest.__required_keys__ if k not in manifest)
