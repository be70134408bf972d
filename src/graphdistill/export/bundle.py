"""A trained student RUN -> a phone bundle (ExecuTorch or ONNX, float or int8), gated on parity.

``export_run(run, fmt, quantize, out)``:
1. load the student from RUN (config.json + model.safetensors) and its tokenizer/meta;
2. pick inputs from the run's dataset (never its test split): calibration = train rows spread over the
   split's distinct images; held-out = val rows, then train rows of images calibration did not see;
3. compute the PyTorch reference (the same ``encode`` + ``decode_step`` loop the runner uses) for the held-out
   inputs and the first :data:`GATE_CALIBRATION` calibration ones;
4. export the programs (``encode``: image + question -> memory + each head the student has, named in the
   manifest; ``decode_step``, only when the student has a text head: one answer token with a fixed-size KV
   cache), int8 calibrated on the calibration inputs;
5. write the bundle into a temporary folder, load it with :class:`graphdistill.runner.BundleRunner` (the
   runtime-only runner a phone app mirrors) and run every input through it;
6. the gate — float: answer tokens identical to PyTorch's, boxes within :data:`BOX_TOL`, mask IoU >=
   :data:`MASK_IOU_MIN`, source logits and embeddings within :data:`LOGIT_TOL` (each only where the student
   has that head); int8: fidelity to the teacher's targets (answer token F1, box F1, for the heads there)
   no more than :data:`INT8_MAX_DROP` below the float student's. Only a bundle that passes is moved to ``out``;
   otherwise :class:`ExportError` is raised and nothing is left behind. A student with recurrent depth
   (``max_depth`` R > 1) also ships ``deepen`` (one more iteration of its recurrent block); the gate runs every
   depth 1..R, each against PyTorch at that depth.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from graphdistill.eval.result import EvalResult, read_eval
from graphdistill.export.parity import fidelity, parity_float
from graphdistill.export.programs import (
    DECODE_OUTPUTS,
    ENCODE_INPUTS,
    ExportError,
    LoadedRun,
    Sample,
    collect_samples,
    cross_kv_shape,
    deepen_names,
    load_run,
    make_sample,
    pointer_shapes,
    programs_for,
    state_shape,
    torch_reference,
)
from graphdistill.runner.bundle import (
    BUNDLE_FORMAT,
    MANIFEST,
    BundleRunner,
    Raw,
    manifest_checksum,
    sha256_file,
)
from graphdistill.runner.manifest import (
    DepthSpec,
    ExportGate,
    KVCacheSpec,
    Manifest,
    ProgramSpec,
    TensorSpec,
    TTASpec,
)
from graphdistill.runner.preprocess import canvas_size
from graphdistill.runner.tta import (
    FUSE_IOU,
    TTA_SCALE,
    TTAError,
    near_floor,
    parse_policy,
    view_images,
    views,
)

log = logging.getLogger(__name__)

FORMATS = ("executorch", "onnx")
QUANTIZE = ("none", "int8")
BOX_TOL = (
    1e-3  # float parity: |box_exported - box_pytorch| in units of the canvas side (0.1 %, < 0.3 px at 256)
)
MASK_IOU_MIN = 0.99  # float parity: IoU of (mask_logits > 0) per query, exported vs PyTorch
LOGIT_TOL = 1e-3  # float parity: |source logit / embedding value, exported - PyTorch|
# int8 ExecuTorch calibrates encode on this many train inputs spread over distinct images (see
# programs.collect_samples; README "int8 export" has the measurement behind the number); the gate checks the
# first GATE_CALIBRATION of them against PyTorch, with the held-out ones
N_CALIBRATION = 32
GATE_CALIBRATION = 8
INT8_MAX_DROP = 0.05  # int8 gate: answer token F1 and box F1 vs the teacher may drop at most this much


def export_run(
    run: str | Path,
    fmt: str,
    out: str | Path,
    *,
    quantize: str = "none",
    dataset: str | Path | None = None,
    n_calibration: int = N_CALIBRATION,
    n_heldout: int = 8,
    tta: str | Sequence[str] | None = None,
    tta_below: float | None = None,
    depth: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> Manifest:
    """Export, gate and write the bundle; returns the manifest. Raises :class:`ExportError` on failure.

    ``tta`` (``"flip,scale"``): the bundle's runner answers those views of each photo too and fuses them
    (manifest ``tta``; :mod:`graphdistill.runner.tta`); the gate then checks every view of its held-out inputs
    against PyTorch, and int8 fidelity on the fused answers and objects. ``tta_below`` (adaptive, manifest
    ``tta.below``): the views only when the photo's own answer has no object or one scoring under it.

    A student trained with recurrent depth (``max_depth`` R > 1) ships a ``deepen`` program too (manifest
    ``depth``; the runner runs it r - 1 times for depth r); ``depth`` is the runner's default (1 when None)."""
    try:
        augmentations, tta_below = parse_policy(tta, tta_below)
    except TTAError as exc:
        raise ExportError(str(exc)) from exc
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {list(FORMATS)}")
    if quantize not in QUANTIZE:
        raise ExportError(f"unknown quantization {quantize!r}; choose one of {list(QUANTIZE)}")
    say = progress or (lambda msg: log.info("%s", msg))
    run = Path(run)
    out = Path(out)
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise ExportError(f"output {out} exists and is not a bundle; refusing to overwrite it")
    t0 = time.perf_counter()
    say(f"loading the student from {run}")
    loaded = load_run(run, dataset)
    max_depth = int(loaded.config.max_depth)
    if not 1 <= (depth or 1) <= max_depth:
        raise ExportError(
            f"depth {depth}: the student in {run} takes depths 1..{max_depth} (trained with max_depth "
            f"{max_depth})"
        )
    say("preparing calibration and held-out inputs")
    calib = collect_samples(loaded, "calibration", n_calibration, leave=n_heldout)
    heldout = collect_samples(loaded, "heldout", n_heldout, exclude=calib)
    if not calib or not heldout:
        raise ExportError(
            f"the dataset {loaded.dataset_path} has too few rows for calibration ({len(calib)}) "
            f"and held-out ({len(heldout)}) inputs"
        )
    n_views = len(views(augmentations))
    if n_views > 1:  # each held-out input followed by its views, in the runner's order
        pad = loaded.preprocessing.get("pad_value", [0, 0, 0])
        size = canvas_size(loaded.preprocessing)
        heldout = [
            s if view.identity else replace(make_sample(loaded, img, s.question, s.row), view=view)
            for s in heldout
            for img, view in view_images(_photo(s), augmentations, pad, size)
        ]
    programs, kv_shape = programs_for(loaded, fused_norms=fmt == "onnx", channels_last=fmt == "executorch")
    say("running the PyTorch reference")
    dec_calls: list[tuple[Any, ...]] = []
    deepen_calls: list[tuple[Any, ...]] = []
    # the gate checks a few calibration inputs and the held-out ones, at every depth; int8 calibrates encode
    # (and deepen, on the states of every depth) on all of them
    checked = calib[:GATE_CALIBRATION]
    depths = range(1, max_depth + 1)
    refs = {
        r: [
            torch_reference(programs, s, loaded, record=dec_calls if r == 1 else None, depth=r)
            for s in checked
        ]
        + [torch_reference(programs, s, loaded, depth=r) for s in heldout]
        for r in depths
    }
    if max_depth > 1:
        for s in calib:
            torch_reference(programs, s, loaded, depth=max_depth, deepen_calls=deepen_calls)
    samples = checked + heldout

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        say(f"exporting to {fmt} ({quantize})")
        calibration = {
            "encode": [s.torch_inputs() for s in calib],
            "decode_step": dec_calls[:64],
            "deepen": deepen_calls,
        }
        # int8 ExecuTorch: the word table is looked up, never multiplied, so XNNPACK leaves it; store it int8
        from graphdistill.export.quantize import int8_embedding

        table = int8_embedding(loaded.model) if fmt == "executorch" and quantize == "int8" else nullcontext()
        with table:
            files, qmethods = _export(fmt, programs, tmp, quantize, calibration, loaded)
        # the run's tokenizer.json is indented for reading; the bundle's is the same JSON without whitespace
        # (77 KB -> 35 KB on the demo: the bundle counts every byte a phone downloads)
        tokenizer_json = json.loads(Path(loaded.tokenizer_path).read_text(encoding="utf-8"))
        (tmp / "tokenizer.json").write_text(
            json.dumps(tokenizer_json, ensure_ascii=False, separators=(",", ":")), encoding="utf-8"
        )
        manifest = _manifest(loaded, fmt, quantize, files, qmethods, kv_shape, tmp)
        if augmentations:
            manifest["tta"] = tta_spec(augmentations, tta_below)
        if max_depth > 1:
            manifest["depth"] = depth_spec(max_depth, depth or 1)
        _write_manifest(tmp, manifest)
        say(
            "checking the exported bundle against PyTorch"
            + (f" at depths 1..{max_depth}" if max_depth > 1 else "")
        )
        runner = BundleRunner(tmp)
        nhwc = runner.spec["layout"] == "NHWC"  # the same values, in the bundle's layout
        gates = {}
        for r in depths:
            got = [
                runner.run_models(
                    s.image_input.transpose(0, 2, 3, 1) if nhwc else s.image_input, s.question, depth=r
                )
                for s in samples
            ]
            gates[r] = _gate(
                loaded,
                samples,
                refs[r],
                got,
                quantize,
                n_calib=len(checked),
                n_views=n_views,
                below=tta_below,
            )
        gate = gates[1]
        if max_depth > 1:
            gate["by_depth"] = {str(r): _depth_summary(g) for r, g in gates.items() if r > 1}
            gate["failures"] += [f"depth {r}: {f}" for r, g in gates.items() if r > 1 for f in g["failures"]]
            gate["passed"] = not gate["failures"]
        if fmt == "executorch" and quantize == "int8":
            gate["inputs"]["int8_calibration"] = len(calib)
        manifest["parity"] = gate
        manifest["export_seconds"] = round(time.perf_counter() - t0, 1)
        _write_manifest(tmp, manifest)
        if not gate["passed"]:
            raise ExportError(f"the exported {fmt}/{quantize} model failed the gate: {gate['failures']}")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"bundle written to {out}")
    return manifest


def _export(
    fmt: str,
    programs: dict[str, tuple[Any, tuple[Any, ...]]],
    tmp: Path,
    quantize: str,
    calibration: Any,
    loaded: Any,
) -> tuple[dict[str, str], dict[str, str]]:
    encode_outputs = loaded.encode_outputs
    if fmt == "executorch":
        from graphdistill.export.executorch import export_executorch
        from graphdistill.export.quantize import QUANTIZED, QUANTIZED_WITH_CONVS

        patterns = QUANTIZED_WITH_CONVS if loaded.config.trunk == "ultralytics" else QUANTIZED
        files = export_executorch(
            programs, tmp, quantize=quantize, calibration=calibration, int8_patterns=patterns
        )
        method = "pt2e-xnnpack-static-" + "-".join(patterns)
        return files, ({k: method for k in files} if quantize == "int8" else {})
    from graphdistill.export.onnx import export_onnx
    from graphdistill.export.phone_decode import input_names

    step = programs["decode_step"][0] if "decode_step" in programs else None
    n_layers = step.n_layers if step is not None else 0
    deep_in, deep_out = deepen_names(loaded) if "deepen" in programs else ([], [])
    names = {
        "encode": (ENCODE_INPUTS, encode_outputs),
        # an ONNX graph's output may not share an input's name: deepen's are its inputs' next values, in order
        "deepen": (deep_in, [f"{n}.next" for n in deep_out]),
        "decode_step": (
            input_names(
                n_layers, copy=bool(step is not None and step.copy), cont=bool(step is not None and step.cont)
            ),
            DECODE_OUTPUTS,
        ),
    }
    res = export_onnx(programs, names, tmp, quantize=quantize)
    return res["files"], res["quantization"]


def _photo(sample: Sample) -> np.ndarray:
    if sample.rgb is None:
        raise ExportError(f"input {sample.question!r} was prepared without its photo: no test-time views")
    return sample.rgb


def _depth_summary(gate: ExportGate) -> dict[str, Any]:
    """What the gate keeps of a depth above 1 (``ExportGate.by_depth``): its checks, not its inputs again."""
    out: dict[str, Any] = {
        "vs_pytorch": gate["vs_pytorch"],
        "failures": gate["failures"],
        "passed": gate["passed"],
    }
    if "fidelity_vs_teacher" in gate:
        out["fidelity_vs_teacher"] = gate["fidelity_vs_teacher"]
    return out


def depth_spec(max_depth: int, default: int) -> DepthSpec:
    """The manifest's ``depth``: the recurrent depth the runner takes (:meth:`BundleRunner.run_models`)."""
    return {
        "max": max_depth,
        "default": default,
        "rule": "depth r (1..max; default unless the app asks for another): run encode, then deepen r - 1 times; "
        "each input of deepen is the latest output of that name (encode's, then the previous deepen's; "
        "question_mask: the query's own), each output of deepen replaces the one of that name; the rest "
        "(objects, sources, the copy path's other inputs) stand as encode made them",
    }


def tta_spec(augmentations: Sequence[str], below: float | None = None) -> TTASpec:
    """The manifest's ``tta``: what the runner does with test-time augmentation (:mod:`graphdistill.runner.tta`)."""
    spec: TTASpec = {
        "augmentations": list(augmentations),
        "scale": TTA_SCALE,
        "box_iou": FUSE_IOU,
        "quorum": "ceil(views / 2), the photo itself counted as a view",
        "rule": "answer the photo and each view (flip: mirrored left to right; scale: shrunk to `scale` at the "
        "top-left of a canvas of the photo's size filled with pad_value); map each view's boxes and masks "
        "back onto the photo; objects: same class and box IoU >= box_iou with a cluster's score-weighted box "
        "join it (one per view), a cluster a quorum of views found is kept with the mean score, the "
        "score-weighted box and the pixel-majority mask; answer: the largest group of identical normalised "
        "answers (SQuAD normalisation; a mirrored view's left and right swapped first), ties to the photo's "
        "own; sources: documents a quorum of views retrieved, by count, then mean rank, cut to the photo's "
        "own count; with below (adaptive): the views only when the photo's own answer has no object, one "
        "scoring under below, or an unkept slot scoring at least output_decoding.near_miss",
    }
    if below is not None:
        spec["below"] = below
    return spec


def _gate(
    loaded: LoadedRun,
    samples: list[Sample],
    refs: list[Raw],
    got: list[Raw],
    quantize: str,
    n_calib: int,
    n_views: int = 1,
    below: float | None = None,
) -> ExportGate:
    float_parity = parity_float(
        refs, got, box_tol=BOX_TOL, mask_iou_min=MASK_IOU_MIN, logit_tol=LOGIT_TOL, has_text=loaded.has_text
    )
    gate: ExportGate = {
        "inputs": {"calibration": n_calib, "heldout": (len(samples) - n_calib) // n_views},
        "vs_pytorch": float_parity,
        "tolerances": {
            "box_abs": BOX_TOL,
            "box_units": "fraction of the canvas side",
            "mask_iou_min": MASK_IOU_MIN,
            "logit_abs": LOGIT_TOL,
        },
        "failures": [],
        "passed": False,
    }
    failures: list[str] = []
    if quantize == "none":
        failures = list(float_parity["failures"])
    else:
        heldout = slice(n_calib, None)
        f_float = fidelity(loaded, samples[heldout], refs[heldout], n_views, below)
        f_int8 = fidelity(loaded, samples[heldout], got[heldout], n_views, below)
        keys = [k for k in ("answer_token_f1", "box_f1") if k in f_float]
        drops = {k: round(f_float[k] - f_int8[k], 4) for k in keys}
        gate["fidelity_vs_teacher"] = {
            "float": f_float,
            "int8": f_int8,
            "drop": drops,
            "max_drop": INT8_MAX_DROP,
        }
        failures = [f"{k} drops by {d:.3f} > {INT8_MAX_DROP}" for k, d in drops.items() if d > INT8_MAX_DROP]
    gate["failures"] = failures
    gate["passed"] = not failures
    return gate


# what a bundle's manifest keeps of the run's eval.json: the figures, not its rows or other bundles' timings
# (the demo's eval.json is ~22 KB and grows with the held-out rows; the bundle counts every byte)
FIDELITY_SUMMARY_KEYS = ("n", "photos", "split", "dataset", "fidelity", "fidelity_ci", "ci")


def fidelity_summary(evaluation: EvalResult) -> dict[str, Any]:
    """The fidelity figures of a run's ``eval.json`` (``eval.evaluate.evaluate_run``) that a bundle carries: the
    PyTorch student's against the teacher, with their intervals and the rows they were measured on."""
    plain: Mapping[str, Any] = evaluation  # read as JSON: the keys above, whichever of them it has
    return {k: plain[k] for k in FIDELITY_SUMMARY_KEYS if k in plain}


def _manifest(
    loaded: LoadedRun,
    fmt: str,
    quantize: str,
    files: dict[str, str],
    qmethods: dict[str, str],
    kv_shape: list[int],
    root: Path,
) -> Manifest:
    cfg = loaded.config
    lq, s = cfg.max_question_len, cfg.image_size
    cross_shape = cross_kv_shape(loaded)
    new_shape = [*kv_shape[:4], 1, *kv_shape[5:]]
    from graphdistill.student.trunks import PROTO_STRIDE

    k, grid = cfg.max_objects, cfg.image_size // PROTO_STRIDE
    pointer = pointer_shapes(loaded) if loaded.has_copy else {}
    shapes = {
        "memory": [1, loaded.memory_len, cfg.d_model],
        "cross_kv": cross_shape,
        **pointer,
        "boxes": [1, k, 4],
        "scores": [1, k],
        "classes": [1, k],
        "keep": [1, k],
        "mask_logits": [1, k, grid, grid],
        "source_logits": [1, cfg.num_sources],
        **{f"embedding:{n}": [1, d] for n, d in cfg.embedding_dims.items()},
        "state": state_shape(loaded),
    }
    dtypes = {"classes": "int64", "keep": "bool"}
    meanings = {
        "cross_kv": "[decoder layers, 2 (key, value), batch, heads, context tokens, head_dim]: the answer "
        "decoder's cross-attention keys/values, computed once per query; pass to every decode_step",
        "ptr_keys": "the copy path: the keys of its slots (each object, then each token of the best-ranked "
        "documents) [1, d_model, slots]; decode_step's input of the same name, filled once per query",
        "ptr_bias": "the copy path: 0 for a slot the answer may copy, -1e9 for an empty slot or padding; "
        "decode_step's input of the same name",
        "ptr_vocab": "the copy path: one row per slot, one-hot at its token (an object's class name, a "
        "document's word); decode_step's input of the same name",
        "ptr_next": "the copy path: [1, vocabulary, slots], 1 where a document slot follows a slot of the same "
        "document holding that token (the step looks up the token it reads, so a copy goes on where it left "
        "off); decode_step's input of the same name",
        "boxes": "the selected objects: cx, cy, w, h in 0..1 of the canvas",
        "scores": "each object's class score (sigmoid)",
        "classes": "each object's class id (index into class_names)",
        "keep": "true for an object the student reports (score >= score_threshold, not suppressed by NMS)",
        "mask_logits": "each object's mask logits over the whole canvas (coefficients x prototypes)",
        "state": "the joint encoder's tokens after the recurrent block [1, context + question tokens, d_model]: "
        "deepen's input of the same name (depth > 1 only)",
    }
    encode_outputs: list[TensorSpec] = []
    for n in loaded.encode_outputs:
        out: TensorSpec = {"name": n, "shape": shapes[n], "dtype": dtypes.get(n, "float32")}
        if n in meanings:
            out["meaning"] = meanings[n]
        encode_outputs.append(out)
    # ExecuTorch: the image in NHWC memory (dim order 0, 2, 3, 1), as the XNNPACK convolutions read it
    nhwc = fmt == "executorch"
    image: TensorSpec = {"name": "image", "shape": [1, 3, s, s], "dtype": "float32"}
    if nhwc:
        image["dim_order"] = [0, 2, 3, 1]
        image["meaning"] = "stored NHWC: memory is [1, S, S, 3] (preprocessing.layout)"
    programs: dict[str, ProgramSpec] = {
        "encode": {
            "file": files["encode"],
            "method": "encode",
            "inputs": [
                image,
                {"name": "question_ids", "shape": [1, lq], "dtype": "int64"},
                {
                    "name": "question_mask",
                    "shape": [1, lq],
                    "dtype": "int64",
                    "meaning": "1 = token, 0 = pad",
                },
            ],
            "outputs": encode_outputs,
        },
    }
    if "deepen" in files:
        deep_in, deep_out = deepen_names(loaded)
        mask_spec: TensorSpec = {
            "name": "question_mask",
            "shape": [1, lq],
            "dtype": "int64",
            "meaning": "the query's",
        }
        programs["deepen"] = {
            "file": files["deepen"],
            "method": "deepen",
            "inputs": [
                mask_spec if n == "question_mask" else {"name": n, "shape": shapes[n], "dtype": "float32"}
                for n in deep_in
            ],
            "outputs": [{"name": n, "shape": shapes[n], "dtype": "float32"} for n in deep_out],
        }
    if "decode_step" in files:
        from graphdistill.export.phone_decode import input_names

        view_shape = {"cross_kv": cross_shape[2:], "kv_cache": kv_shape[2:]}
        kv_inputs: list[TensorSpec] = []
        for name in input_names(cfg.dec_layers)[2:]:
            array, layer, kind = name.split(".")
            kv_inputs.append(
                {
                    "name": name,
                    "shape": view_shape[array],
                    "dtype": "float32",
                    "view_of": [array, int(layer), 0 if kind == "key" else 1],
                }
            )
        pointer_inputs: list[TensorSpec] = [
            {"name": n, "shape": pointer[n], "dtype": "float32", "per_query": n} for n in pointer
        ]
        if "ptr_next" in pointer:  # the copy path also reads the token fed at the step before
            pointer_inputs.append(
                {
                    "name": "prev_token",
                    "shape": [1, 1],
                    "dtype": "int64",
                    "meaning": "the token fed at the step before (<bos> at position 0): the copy path goes on "
                    "where the last two tokens left a document",
                }
            )
        programs["decode_step"] = {
            "file": files["decode_step"],
            "method": "decode_step",
            "arrays": {
                "cross_kv": {
                    "shape": cross_shape,
                    "dtype": "float32",
                    "meaning": "encode's cross_kv output, copied in once per answer",
                },
                "kv_cache": {"shape": kv_shape, "dtype": "float32", "meaning": "see kv_cache"},
            },
            "inputs": [
                {"name": "token", "shape": [1, 1], "dtype": "int64"},
                {"name": "position", "shape": [1], "dtype": "int64", "meaning": "0 = the <bos> slot"},
                *kv_inputs,
                *pointer_inputs,
            ],
            "inputs_note": "an input with view_of [array, i, j] is array[i, j] of the runner's own arrays "
            "(contiguous): hand it over in place, the step reads it and never writes it; an input with "
            "per_query NAME is encode's output NAME, copied in once per query",
            "outputs": [
                {
                    "name": "scores",
                    "shape": [1, cfg.vocab_size],
                    "dtype": "float32",
                    "meaning": "the next token's probabilities (with the copy path) or logits: take the argmax",
                },
                {
                    "name": "kv_new",
                    "shape": new_shape,
                    "dtype": "float32",
                    "meaning": "this position's keys/values: store them at kv_cache[:, :, :, :, position]",
                },
            ],
        }
    kv_cache: KVCacheSpec = {
        "fixed_size": True,
        "shape": kv_shape,
        "layout": "[decoder layers, 2 (key, value), batch, heads, max_answer_len, head_dim]",
        "initial": "zeros",
        "max_answer_len": cfg.max_answer_len,
        "update": "the caller owns the cache: after each decode_step, kv_cache[:, :, :, :, position] = "
        "kv_new[:, :, :, :, 0]; decode_step only reads it (positions >= position are masked: this "
        "position's own key and value come from the step itself)",
    }
    meta = loaded.meta
    eval_path = loaded.run / "eval.json"
    bundle_files = sorted({*files.values(), "tokenizer.json"})
    return {
        "format": BUNDLE_FORMAT,
        "runtime": fmt,
        "quantize": quantize,
        "quantization_method": qmethods,
        "backend": "XNNPACK" if fmt == "executorch" else "onnxruntime CPUExecutionProvider",
        "programs": programs,
        "outputs": dict(cfg.outputs),  # the teacher graph's output fields -> kind, in the schema's order
        "kv_cache": kv_cache if "decode_step" in programs else None,
        "preprocessing": {
            "rule": "RGB uint8 HxWx3; scale s = size / max(H, W); resize to round(W*s) x round(H*s) (each "
            "clamped to 1..size) with the interpolation filter and reducing_gap when given (Pillow's "
            "Image.resize); paste at the top-left of a size x size "
            "canvas filled with pad_value; x = (pixel / 255 - mean) / std per channel, each step in float32; "
            "N = 1, laid out as layout says",
            **loaded.preprocessing,
            "layout": "NHWC" if nhwc else loaded.preprocessing.get("layout", "NCHW"),
        },
        "output_decoding": {
            "objects": "the objects are selected inside encode (the best `candidates` cells, same-class Fast "
            "NMS at nms_iou, score >= score_threshold): report each slot whose keep is true, by descending score",
            "boxes": "cx, cy, w, h in 0..1 of the letterboxed canvas; pixels = value * size / scale, "
            "then x1 = clip(cx - w/2, 0, W), x2 = clip(cx + w/2, x1, W) (same for y)",
            "score_threshold": cfg.score_threshold,
            "nms_iou": cfg.nms_iou,
            "unkept": "the slots after the kept objects hold the best candidates NMS did not suppress but the "
            "threshold dropped, by score: near misses",
            "near_miss": round(near_floor(cfg.score_threshold), 4),
            "mask_size": grid,
            "mask_paste": "p = sigmoid(mask_logits); keep the top-left mh x mw = round(H*m) x round(W*m) cells, "
            "m = mask_size / max(H, W) (each clamped to 1..mask_size); pixel (y, x) reads p bilinearly at "
            "cell coordinates ((y + 0.5) * mh / H - 0.5, (x + 0.5) * mw / W - 0.5), cell centres at integers, "
            "clamped at the edges; on where that is > 0.5 and floor(x1) <= x < ceil(x2), floor(y1) <= y < "
            "ceil(y2) (the object's box); off elsewhere",
            "mask_encoding": "COCO uncompressed RLE, column-major, first run counts zeros",
            "sources_k": cfg.sources_k,
            "sources": "the sources_k documents of highest source_logits, highest first (stable: ties keep "
            "document order)",
            "no_repeat_ngram": cfg.no_repeat_ngram,
            "max_token_run": cfg.max_token_run,
            "answer": "greedy: each step the argmax of scores over the tokens that would not repeat a "
            "no_repeat_ngram-gram already in the answer nor make one token follow itself more than "
            "max_token_run times in a row (0: no such rule); stop at eos_id or max_answer_len - 1 tokens",
        },
        "tokenizer": {
            "file": "tokenizer.json",
            "type": "byte-level BPE (Hugging Face tokenizers JSON: model.vocab + model.merges)",
            "pad_id": loaded.special_ids["pad"],
            "bos_id": loaded.special_ids["bos"],
            "eos_id": loaded.special_ids["eos"],
            "unk_id": loaded.special_ids["unk"],
            "max_question_len": lq,
            "question": "ids truncated to max_question_len, padded with pad_id; mask 1 where a token is",
        },
        "class_names": loaded.class_names,
        "documents": loaded.documents,
        "teacher_graph": meta.get("graph_id") or meta.get("graph"),
        # the teacher weights the student started from bind the bundle: their licence travels with it
        "started_from": meta.get("started_from"),
        "licence": _licence(meta.get("started_from")),
        # the run's config but the documents' token ids: the program holds them, and the manifest already
        # lists the documents' texts (one knowledge base's token ids would be tens of KB of the bundle)
        "student_config": {k: v for k, v in cfg.to_dict().items() if k != "source_token_ids"},
        "source_run": str(loaded.run),
        "fidelity": fidelity_summary(read_eval(eval_path)) if eval_path.is_file() else None,
        "files": {f: sha256_file(root / f) for f in bundle_files},
        "file_bytes": {f: (root / f).stat().st_size for f in bundle_files},
        "parity": None,
    }


def _licence(started_from: dict[str, Any] | None) -> str:
    """The terms a bundle carries: graphdistill's own, or those of the teacher weights its student started from."""
    if not started_from:
        return "the student's weights were trained from scratch by graphdistill (Apache-2.0 code)"
    return (
        f"{started_from.get('licence')}: this student's trunk and detection head started from "
        f"{started_from.get('model_id')} (sha256 {str(started_from.get('weights_sha256'))[:12]}…); a bundle "
        "built from them carries those terms (see THIRD_PARTY_NOTICES.md)"
    )


def _write_manifest(root: Path, manifest: Manifest) -> None:
    """Write plain JSON with its own checksum (so a reader can tell an edited manifest)."""
    plain = json.loads(json.dumps(manifest, default=_json_default))
    plain["manifest_sha256"] = manifest_checksum(plain)
    manifest["manifest_sha256"] = plain["manifest_sha256"]
    # compact: indented, the student's config (its detector's layer spec, each document's tokens) took ~60 KB
    # of a bundle that must fit in 5 MB
    (root / MANIFEST).write_text(json.dumps(plain, separators=(",", ":")) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__}")
