"""Run an exported bundle: the specification a phone app implements, readable top to bottom.

A bundle is a folder: the model file(s), ``tokenizer.json`` and ``manifest.json``. One query is:

1. check the bundle (format, manifest checksum, every file's sha256) — once, at load;
2. image -> letterboxed, normalised ``float32`` image, N = 1, in the manifest's ``preprocessing.layout``
   (:mod:`.preprocess`; an ExecuTorch bundle's ``encode`` takes it NHWC: its ``image`` input is ``[1, 3, S, S]``
   with ``dim_order [0, 2, 3, 1]``);
3. question -> BPE ids, truncated/padded to ``max_question_len`` with ``<pad>``, mask 1 for tokens (:mod:`.bpe`);
4. ``encode(image, question_ids, question_mask)`` -> ``cross_kv`` (the answer decoder's cross-attention
   keys/values; ``memory`` for a student without a text output) + the output of every head the student has
   (their names, in order, are ``programs.encode.outputs`` in the manifest), once;
5. the answer (only when the manifest has a ``decode_step`` program, i.e. a TEXT output): copy ``cross_kv``
   into the runner's ``cross_kv`` array and each ``per_query`` input of ``decode_step`` (the copy path's
   ``ptr_keys``, ``ptr_bias``, ``ptr_vocab`` and, in a bundle whose copies go on where they left off,
   ``ptr_next``) from encode's output of that name, ``kv_cache = zeros`` (the
   runner's other array), ``token = <bos>``; for ``position = 0, 1, ...``:
   ``scores, kv_new = decode_step(token, position, cross_kv[l, 0], cross_kv[l, 1] for each layer l,
   kv_cache[l, 0], kv_cache[l, 1] for each layer l, ptr_keys, ptr_bias, ptr_vocab[, ptr_next, prev_token])``
   (``prev_token``: the token fed at the step before, <bos> at position 0; views of the two arrays:
   the manifest's inputs with ``view_of``, handed over in place); ``kv_cache[:, :, :, :, position] =
   kv_new[:, :, :, :, 0]`` (the runner owns the cache; the step only reads it); ``token = argmax(scores)``
   over the tokens that would not repeat a ``no_repeat_ngram``-gram of the answer so far nor make one token
   follow itself more than ``max_token_run`` times in a row (0: no such rule; :func:`greedy_token`);
   stop at ``<eos>`` or when the fixed-size cache is full;
   With recurrent depth (the manifest has ``depth`` and a ``deepen`` program), for depth r (``depth.default``
   unless the app asks for another, 1..``depth.max``) step 4 is followed by r - 1 calls of ``deepen``: each of
   its inputs is the latest output of that name (encode's, then the previous deepen's; ``question_mask``: the
   query's own), each of its outputs replaces the one of that name (``state``, ``cross_kv``, the object slots'
   ``ptr_keys``, ``embedding:*``); the rest of encode's outputs stand;
6. objects: ``encode`` has already selected them (best cells, NMS, the score threshold): every slot whose
   ``keep`` is true, by descending ``scores``, labelled ``class_names[classes]``; box back to image pixels;
   mask (when there is a ``mask_logits`` output) pasted back inside that box, off outside it
   (:func:`.preprocess.object_mask_rle`), as COCO RLE;
7. sources: the ``sources_k`` documents of highest ``source_logits``, highest first (the teacher's retriever
   returns its top k; ties keep the manifest's document order);
8. the result has exactly the teacher graph's output fields (manifest ``outputs``: field -> kind, in the
   schema's order): text -> the answer, objects -> step 6, detections -> step 6 as parallel lists,
   sources -> step 7, embedding -> the ``embedding:<field>`` output as a list of floats;
9. test-time augmentation, only when the manifest has ``tta`` (``{"augmentations": ["flip", "scale"],
   ...}``): steps 2–8 also run on each augmentation's view of the photo (``flip``: mirrored left to right;
   ``scale``: shrunk to ``tta.scale`` on a canvas of the photo's size, top-left, filled with ``pad_value``),
   each view's objects are mapped back onto the photo, and the views vote: objects a quorum (half the views,
   rounded up) found, by class and box IoU >= ``tta.box_iou``, score-weighted boxes, mean scores, pixel-majority
   masks; the largest cluster of identical normalised answers (a mirrored view's left and right swapped
   first; ties: the photo's own); sources a quorum retrieved, by count then mean rank (:mod:`.tta`,
   :mod:`.vote`). With ``tta.below`` (adaptive) the views are answered only when the photo's own answer has
   no object or one scoring under it, or (a bundle whose ``output_decoding`` has ``near_miss``) one of encode's
   slots not kept scores at least ``near_miss`` (a candidate the detector dropped just under its threshold);
   otherwise that answer is the result.

Imports only numpy, Pillow, the stdlib and the model's runtime (``onnxruntime`` or ``executorch.runtime``).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from graphdistill.errors import GraphdistillError
from graphdistill.runner.bpe import ByteLevelBPE
from graphdistill.runner.manifest import Manifest, missing_fields
from graphdistill.runner.preprocess import (
    Letterbox,
    Preprocessor,
    boxes_to_image,
    canvas_size,
    load_rgb,
    object_mask_rle,
)
from graphdistill.runner.tta import detections_dict, has_near_miss, parse_tta, predict_views

# 2: decode_step returns this position's keys/values (kv_new), not the whole cache as in 1
# 3: decode_step reads each layer's keys and values as separate inputs (views of the runner's arrays)
# 4: encode selects the objects itself (boxes, scores, classes, keep); decode_step has the copy path's inputs
BUNDLE_FORMAT = "graphdistill-bundle/4"
MANIFEST = "manifest.json"
# XNNPACK may read up to 16 bytes past the end of an input it is handed in place: inputs the runner owns
# get this much slack, so such a read never reaches an unmapped page
INPUT_SLACK_BYTES = 64
# A bundle written before ``outputs`` was in the manifest is a visual_rag student: every head, these fields.
DEFAULT_OUTPUTS = {"answer": "text", "objects": "objects", "sources": "sources"}


class BundleError(GraphdistillError, ValueError):
    """The bundle is missing, corrupt, edited after export, or for a runtime that is not installed."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_checksum(manifest: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the manifest without its own ``manifest_sha256`` field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_manifest(bundle_dir: str | Path) -> Manifest:
    """Load and verify ``manifest.json`` and every file it lists; raise :class:`BundleError` naming the fault."""
    root = Path(bundle_dir)
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root} is not a bundle: no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        hint = (
            "; it was written by an older graphdistill: export the run again (graphdistill export RUN ...)"
            if isinstance(got, str) and got.startswith("graphdistill-bundle/")
            else ""
        )
        raise BundleError(f"{path}: format is {got!r}, expected {BUNDLE_FORMAT!r}{hint}")
    if manifest.get("manifest_sha256") != manifest_checksum(manifest):
        raise BundleError(f"{path} was edited after export: its checksum (manifest_sha256) does not match")
    missing = missing_fields(manifest)
    if missing:
        raise BundleError(f"{path}: the manifest lacks {', '.join(missing)}; export the run again")
    checked = cast(Manifest, manifest)  # every field of the contract is there (the values, the exporter's)
    for name, expected in checked["files"].items():
        f = root / name
        if not f.is_file():
            raise BundleError(f"bundle file {f} is missing")
        if sha256_file(f) != expected:
            raise BundleError(f"bundle file {f} is corrupt: its sha256 does not match the manifest")
    return checked


# ----------------------------------------------------------------------------------------------------------
# Runtimes: each loads the two programs and runs them on numpy arrays.
# ----------------------------------------------------------------------------------------------------------


def input_buffers(manifest: Manifest, program: str) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """One zeroed array per input of ``program``, shaped and typed as the manifest says, and the program's own
    ``arrays`` (e.g. decode_step's ``kv_cache``): an input with ``view_of: [array, i, j]`` is ``array[i, j]``, a
    view. Every array has :data:`INPUT_SLACK_BYTES` behind it. The runner writes a query's inputs into these
    and hands them to the runtime as they are (no copy per call)."""

    def zeros(shape: list[int], dtype: np.dtype[Any]) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64))
        flat = np.zeros(n + INPUT_SLACK_BYTES // dtype.itemsize, dtype=dtype)
        return flat[:n].reshape(shape)

    prog = manifest["programs"][program]
    arrays = {k: zeros(a["shape"], np.dtype(a["dtype"])) for k, a in prog.get("arrays", {}).items()}
    bufs = []
    for spec in prog["inputs"]:
        if "view_of" in spec:
            name, *index = spec["view_of"]
            view = arrays[name][tuple(index)]
            if list(view.shape) != list(spec["shape"]) or not view.flags.c_contiguous:
                raise ValueError(f"input {spec['name']}: {spec['view_of']} is not a {spec['shape']} block")
            bufs.append(view)
        else:  # laid out in memory as dim_order says (e.g. [0, 2, 3, 1]: a [1, 3, S, S] image stored NHWC)
            order = spec.get("dim_order", list(range(len(spec["shape"]))))
            bufs.append(zeros([spec["shape"][d] for d in order], np.dtype(spec["dtype"])))
    return bufs, arrays


class OnnxPrograms:
    """``encode.onnx`` and ``decode_step.onnx`` in onnxruntime's CPU provider."""

    def __init__(self, root: Path, manifest: Manifest, threads: int | None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BundleError("this bundle needs onnxruntime: pip install onnxruntime") from exc
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.sessions = {
            name: ort.InferenceSession(str(root / prog["file"]), opts, providers=["CPUExecutionProvider"])
            for name, prog in manifest["programs"].items()
        }
        self.input_names = {n: [i["name"] for i in p["inputs"]] for n, p in manifest["programs"].items()}
        made = {name: input_buffers(manifest, name) for name in manifest["programs"]}
        self.buffers = {name: bufs for name, (bufs, _) in made.items()}
        self.arrays = {name: arrays for name, (_, arrays) in made.items()}

    def run(self, program: str, *inputs: np.ndarray) -> list[np.ndarray]:
        feeds = dict(zip(self.input_names[program], inputs, strict=True))
        return [np.asarray(o) for o in self.sessions[program].run(None, feeds)]


class ExecuTorchPrograms:
    """``model.pte`` (methods ``encode`` and ``decode_step``, XNNPACK-delegated) in the ExecuTorch runtime.

    ExecuTorch's *Python* bindings are built on libtorch and take torch tensors, so this class wraps numpy
    arrays with ``torch.from_numpy`` from the module those bindings already loaded. A phone app calls the
    C++/Java/Swift runtime instead, which has no torch at all. A bundle's program reads its inputs where the
    caller keeps them (exported without planned input memory), so :attr:`buffers` are wrapped once and passed
    as they are; other arrays are copied into them first.
    """

    def __init__(self, root: Path, manifest: Manifest, threads: int | None) -> None:
        try:
            from executorch.runtime import Runtime
        except ImportError as exc:
            raise BundleError("this bundle needs the ExecuTorch runtime: pip install executorch") from exc
        from_numpy = sys.modules["torch"].from_numpy  # loaded by executorch's bindings, see above
        if threads:
            from executorch.extension.pybindings import portable_lib

            portable_lib._unsafe_reset_threadpool(int(threads))
        if manifest.get("quantize") == "int8":
            # Ops XNNPACK does not take (a per-channel dequantize of the tied embedding) run on ExecuTorch's
            # quantized kernels library; a phone build links it as `quantized_ops_lib`, here this import
            # registers the same kernels with the Python runtime.
            try:
                import executorch.kernels.quantized  # noqa: F401
            except ImportError as exc:
                raise BundleError("this int8 bundle needs ExecuTorch's quantized kernels library") from exc
        files = {p["file"] for p in manifest["programs"].values()}
        self.programs = {f: Runtime.get().load_program(str(root / f)) for f in files}
        self.methods = {
            name: self.programs[p["file"]].load_method(p.get("method", name))
            for name, p in manifest["programs"].items()
        }
        made = {name: input_buffers(manifest, name) for name in manifest["programs"]}
        self.buffers = {name: bufs for name, (bufs, _) in made.items()}
        self.arrays = {name: arrays for name, (_, arrays) in made.items()}
        # an input stored in another dim order (the NHWC image) is handed over as the program's logical
        # shape with that memory layout: the buffer viewed through the inverse permutation
        self.tensors = {
            name: [
                from_numpy(b).permute(*np.argsort(spec["dim_order"]).tolist())
                if "dim_order" in spec
                else from_numpy(b)
                for b, spec in zip(bufs, manifest["programs"][name]["inputs"], strict=True)
            ]
            for name, bufs in self.buffers.items()
        }

    def run(self, program: str, *inputs: np.ndarray) -> list[np.ndarray]:
        for buf, x in zip(self.buffers[program], inputs, strict=True):
            if x is not buf:
                np.copyto(buf, x)
        return [o.numpy() for o in self.methods[program].execute(self.tensors[program])]


RUNTIMES: dict[str, type[OnnxPrograms] | type[ExecuTorchPrograms]] = {
    "onnx": OnnxPrograms,
    "executorch": ExecuTorchPrograms,
}


# ----------------------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Raw:
    """Everything the models produced for one query, before decoding (parity checks compare these)."""

    answer_ids: list[int]
    outputs: dict[str, np.ndarray] = field(
        default_factory=dict
    )  # encode's outputs by name, batch dim removed


class BundleRunner:
    """``BundleRunner(bundle_dir, threads=None).predict(image, question)`` -> {output field: value} for the
    teacher graph's output fields (visual_rag: {answer, objects, sources})."""

    def __init__(self, bundle_dir: str | Path, threads: int | None = None) -> None:
        self.root = Path(bundle_dir)
        self.manifest = m = read_manifest(self.root)
        if m["runtime"] not in RUNTIMES:
            raise BundleError(f"{self.root / MANIFEST}: unknown runtime {m['runtime']!r}")
        try:
            tok = m["tokenizer"]
            self.tokenizer = ByteLevelBPE.from_file(self.root / tok["file"])
            self.pad_id, self.bos_id, self.eos_id = tok["pad_id"], tok["bos_id"], tok["eos_id"]
            self.max_question_len = int(tok["max_question_len"])
            self.outputs: dict[str, str] = dict(m.get("outputs") or DEFAULT_OUTPUTS)
            self.encode_outputs = [str(o["name"]) for o in m["programs"]["encode"]["outputs"]]
            self.has_text = "decode_step" in m["programs"]
            kv = m["kv_cache"] if self.has_text else None
            if self.has_text:
                step = m["programs"]["decode_step"]
                first = [i["name"] for i in step["inputs"][:2]]
                if first != ["token", "position"] or set(step["arrays"]) != {"cross_kv", "kv_cache"}:
                    raise ValueError(
                        f"decode_step must take token, position first (got {first}) and own the arrays "
                        f"cross_kv and kv_cache (got {sorted(step['arrays'])})"
                    )
            if kv is None:  # no text output: no cache, no steps
                self.kv_shape, self.max_steps = [], 0
            else:
                self.kv_shape, self.max_steps = [int(s) for s in kv["shape"]], int(kv["max_answer_len"]) - 1
            # decode_step inputs filled once per query from encode's output of the same name
            self.per_query = (
                [
                    (i, str(spec["per_query"]))
                    for i, spec in enumerate(m["programs"]["decode_step"]["inputs"])
                    if "per_query" in spec
                ]
                if self.has_text
                else []
            )
            # the token fed at the step before, when the bundle's copy path reads it (None: it does not)
            step_names = [i["name"] for i in m["programs"]["decode_step"]["inputs"]] if self.has_text else []
            self.prev_index = step_names.index("prev_token") if "prev_token" in step_names else None
            self.spec = m["preprocessing"]
            self.preprocess = Preprocessor(self.spec)
            self.decoding = m["output_decoding"]
            # a bundle whose encode ranks the best dropped candidates after the kept objects says from what score
            # one is a near miss (the adaptive policy's signal; absent: the bundle's unkept slots mean nothing)
            self.near_floor: float | None = self.decoding.get("near_miss")
            self.class_names: list[str] = m["class_names"]
            self.document_ids = [d["id"] for d in m["documents"]]
            # test-time augmentation the bundle was exported with (none when the manifest has no ``tta``)
            tta = m.get("tta")
            self.tta: tuple[str, ...] = parse_tta(tta["augmentations"] if tta else None)
            self.tta_below: float | None = tta.get("below") if tta else None
            # recurrent depth: the deepen program and the iterations the runner runs by default
            depth = m.get("depth")
            self.depth_max = int(depth["max"]) if depth else 1
            self.depth_default = int(depth["default"]) if depth else 1
            if self.depth_max > 1 and "deepen" not in m["programs"]:
                raise ValueError(f"depth.max {self.depth_max} but no deepen program")
            self.deepen_inputs = (
                [str(i["name"]) for i in m["programs"]["deepen"]["inputs"]] if self.depth_max > 1 else []
            )
            self.deepen_outputs = (
                [str(o["name"]) for o in m["programs"]["deepen"]["outputs"]] if self.depth_max > 1 else []
            )
        except (KeyError, TypeError, ValueError) as exc:  # TokenizerError is a ValueError
            raise BundleError(
                f"{self.root / MANIFEST} is incomplete or its tokenizer unusable: {exc!r}"
            ) from exc
        try:
            self.programs = RUNTIMES[m["runtime"]](self.root, m, threads)
        except BundleError:
            raise
        except Exception as exc:  # the runtime's own load errors, named with the bundle
            raise BundleError(f"cannot load the {m['runtime']} programs of {self.root}: {exc}") from exc

    def encode_question(self, question: str) -> tuple[np.ndarray, np.ndarray]:
        ids = self.tokenizer.encode(question)[: self.max_question_len]
        n = len(ids)
        padded = np.full((1, self.max_question_len), self.pad_id, dtype=np.int64)
        padded[0, :n] = ids
        mask = np.zeros((1, self.max_question_len), dtype=np.int64)
        mask[0, :n] = 1
        return padded, mask

    def check_depth(self, depth: int | None) -> int:
        """The depth to run: ``depth`` (None: the bundle's default), or a :class:`BundleError` naming the range."""
        r = self.depth_default if depth is None else int(depth)
        if not 1 <= r <= self.depth_max:
            raise BundleError(
                f"{self.root / MANIFEST}: depth {r}: this bundle takes depths 1..{self.depth_max} (manifest depth)"
            )
        return r

    def run_models(self, image_input: np.ndarray, question: str, depth: int | None = None) -> Raw:
        """Steps 3–5: the encoder once (and ``deepen`` depth - 1 times), then (with a text output) the answer
        decoder one token at a time."""
        r = self.check_depth(depth)
        ids, mask = self.encode_question(question)
        outs = self.programs.run("encode", image_input, ids, mask)
        by_name = dict(zip(self.encode_outputs, outs, strict=True))
        for _ in range(r - 1):
            args = [mask if n == "question_mask" else by_name[n] for n in self.deepen_inputs]
            by_name.update(zip(self.deepen_outputs, self.programs.run("deepen", *args), strict=True))
        named = {k: v[0] for k, v in by_name.items()}
        if not self.has_text:
            return Raw([], named)
        # decode_step's inputs live in the runtime's buffers for the whole answer: written in place, not copied
        inputs = self.programs.buffers["decode_step"]
        token, position = inputs[0], inputs[1]
        prev = inputs[self.prev_index] if self.prev_index is not None else None
        arrays = self.programs.arrays["decode_step"]
        np.copyto(arrays["cross_kv"], by_name["cross_kv"])  # the same for every step of this answer
        for i, name in self.per_query:
            np.copyto(inputs[i], by_name[name])
        kv = arrays["kv_cache"]
        kv.fill(0.0)
        token[0, 0] = self.bos_id
        if prev is not None:
            prev[0, 0] = self.bos_id
        answer: list[int] = []
        for pos in range(self.max_steps):
            position[0] = pos
            scores, kv_new = self.programs.run("decode_step", *inputs)
            kv[:, :, :, :, pos] = kv_new[:, :, :, :, 0]
            nxt = greedy_token(
                scores[0],
                answer,
                self.decoding.get("no_repeat_ngram", 0),
                self.decoding.get("max_token_run", 0),
            )
            if nxt == self.eos_id:
                break
            answer.append(nxt)
            if prev is not None:
                prev[0, 0] = token[0, 0]
            token[0, 0] = nxt
        return Raw(answer, named)

    def predict(
        self,
        image: np.ndarray | str | Path,
        question: str,
        tta: str | Sequence[str] | None = None,
        tta_below: float | None = None,
        depth: int | None = None,
    ) -> dict[str, Any]:
        """Steps 2–8 for one image (a path or an H×W×3 uint8 RGB array) and one question. With test-time
        augmentation (``tta``; None: the manifest's ``tta.augmentations``, if any; ``()``: none) step 9: each
        view of the photo is answered whole and the views vote (:mod:`.tta`); with ``tta_below`` (None: the
        manifest's ``tta.below``, if any) only when the photo's own answer has no object or one scoring under
        it. ``depth``: iterations of the recurrent block (None: the manifest's ``depth.default``, 1 without)."""
        r = self.check_depth(depth)
        rgb = load_rgb(image)
        augmentations = self.tta if tta is None else parse_tta(tta)
        if augmentations:
            pad = self.spec.get("pad_value", [0, 0, 0])
            size = canvas_size(self.spec)
            below = self.tta_below if tta_below is None else tta_below
            first, near = None, False
            if below is not None and self.near_floor is not None:  # the photo first, with its near misses
                first, near = self.first_answer(rgb, question, r)
            return predict_views(
                rgb,
                lambda v: self._predict(v, question, r),
                augmentations,
                self.outputs,
                pad,
                size,
                below=below,
                first=first,
                near=near,
            )
        return self._predict(rgb, question, r)

    def first_answer(
        self, image: np.ndarray | str | Path, question: str, depth: int | None = None
    ) -> tuple[dict[str, Any], bool]:
        """The photo's own answer (no views) and whether it holds a near miss: a slot encode did not keep scoring
        at least ``output_decoding.near_miss`` (False for a bundle that does not say). With
        :func:`.tta.unsure`, what the adaptive policy decides from."""
        answer, raw = self._predict_raw(load_rgb(image), question, self.check_depth(depth))
        return answer, has_near_miss(raw.outputs, self.near_floor)

    def _predict(self, rgb: np.ndarray, question: str, depth: int | None = None) -> dict[str, Any]:
        return self._predict_raw(rgb, question, depth)[0]

    def _predict_raw(
        self, rgb: np.ndarray, question: str, depth: int | None = None
    ) -> tuple[dict[str, Any], Raw]:
        x, box = self.preprocess(rgb, self.programs.buffers["encode"][0])  # straight into the runtime's input
        raw = self.run_models(x, question, depth)
        return self.decode(raw, box, rgb.shape[0], rgb.shape[1]), raw

    def decode(self, raw: Raw, box: Letterbox, height: int, width: int) -> dict[str, Any]:
        """Step 8: the models' outputs -> exactly the graph's output fields, in the schema's order."""
        out: dict[str, Any] = {}
        objects: list[dict[str, Any]] | None = None
        for name, kind in self.outputs.items():
            if kind == "text":
                out[name] = self.tokenizer.decode(raw.answer_ids)
            elif kind in ("objects", "detections"):
                if objects is None:
                    objects = self.decode_objects(raw.outputs, box) if "boxes" in raw.outputs else []
                out[name] = objects if kind == "objects" else detections_dict(objects, height, width)
            elif kind == "sources":
                out[name] = top_sources(
                    raw.outputs["source_logits"], self.decoding["sources_k"], self.document_ids
                )
            elif kind == "embedding":
                out[name] = [float(v) for v in raw.outputs[f"embedding:{name}"]]
            else:
                raise BundleError(f"{self.root / MANIFEST}: output {name!r} has unknown kind {kind!r}")
        return out

    def decode_objects(self, out: dict[str, np.ndarray], box: Letterbox) -> list[dict[str, Any]]:
        return decode_objects(out, box, self.decoding, self.class_names, canvas_size(self.spec))


def decode_objects(
    out: dict[str, np.ndarray], box: Letterbox, decoding: dict[str, Any], class_names: list[str], size: int
) -> list[dict[str, Any]]:
    """Step 6: heads' outputs for one image -> [{label, class_id, score, box, mask}], best first."""
    scores, classes = out["scores"].astype(np.float64), out["classes"]
    keep = [int(q) for q in np.argsort(-scores, kind="stable") if bool(out["keep"][q])]
    xyxy = boxes_to_image(out["boxes"][keep].astype(np.float64), box, size) if keep else np.zeros((0, 4))
    objects = []
    for q, b in zip(keep, xyxy, strict=True):
        cid = int(classes[q])
        objects.append(
            {
                "label": class_names[cid] if cid < len(class_names) else str(cid),
                "class_id": cid,
                "score": float(scores[q]),
                "box": [float(v) for v in b],
                "mask": object_mask_rle(out["mask_logits"][q], box, b) if "mask_logits" in out else None,
            }
        )
    return objects


def banned_tokens(history: list[int], n: int, run: int = 0) -> list[int]:
    """The tokens greedy decoding may not take next, given ``history`` (the answer so far): those that would
    complete an ``n``-gram it already holds (none for ``n`` < 1), and the token that would make its last
    ``run`` tokens one token ``run + 1`` times in a row (none for ``run`` < 1). A small decoder trained on a few
    hundred answers falls into loops ("set set set set set set"); fairseq's and Hugging Face's no-repeat rule
    cuts them. The student's ``n`` leaves 90 % of its training answers writable and its ``run`` is the
    longest run of one token in any of them (``student.train.decoding_rules``)."""
    banned: set[int] = set()
    if run >= 1 and len(history) >= run and len(set(history[len(history) - run :])) == 1:
        banned.add(history[-1])
    if n >= 1 and len(history) >= n:
        prefix = history[len(history) - n + 1 :] if n > 1 else []
        banned.update(
            history[i + n - 1] for i in range(len(history) - n + 1) if history[i : i + n - 1] == prefix
        )
    return sorted(banned)


def greedy_token(scores: Any, history: list[int], n: int, run: int = 0) -> int:
    """The answer's next token: argmax of one row of scores (numpy or torch) over the tokens
    :func:`banned_tokens` allows."""
    banned = banned_tokens(history, n, run)
    if not banned:
        return int(scores.argmax())
    if hasattr(scores, "detach"):  # a torch tensor (the student's own decoding)
        scores = scores.detach().float().cpu().numpy()
    row = np.array(scores, dtype=np.float64).reshape(-1)
    row[banned] = -np.inf
    return int(row.argmax())


def top_sources(source_logits: np.ndarray, k: int, document_ids: list[str]) -> list[str]:
    """Step 7: the ``k`` documents of highest score, highest first (a stable sort: ties keep document order)."""
    scores = np.asarray(source_logits, dtype=np.float64).reshape(-1)[: len(document_ids)]
    order = np.argsort(-scores, kind="stable")[: max(int(k), 0)]
    return [document_ids[int(i)] for i in order]
