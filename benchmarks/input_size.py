"""Which input size the student should run at: fidelity to the teacher detector against the exported trunk's cost.

The student's trunk and detection head start from the teacher's own YOLO detector (which runs at 640). For each
candidate size this builds that student *before any training* (its in-graph selection is the detector's own
post-processing), and measures:

- box mAP@0.5 / mAP@0.5:0.95 and object F1 (class + IoU >= 0.5) of its objects against the teacher graph's
  detector at 640, on *training* images only (never the held-out photos: they exist to tell the truth about
  the chosen size, not to choose it): with ``--dataset``, every distinct recorded image of that dataset's train
  split against the teacher objects recorded with it (the demo's on 2026-12-03: 38 images, 85 objects:
  augmentations and copy-paste composites of its six training photos, so small objects too); without, the
  built-in training photos themselves (the six of then held 11 objects: too few to tell 320 from 384);
- the ExecuTorch XNNPACK int8 ``encode`` program of a student of that size (trunk, dense head, selection, masks,
  the text encoder), median ms over repeated calls at 1 and 2 threads, and its file size.

    python benchmarks/input_size.py --out benchmarks/results/input_size.json [--sizes 256,320,384]
        [--dataset demo-out/dataset]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def student_at(size: int, start: Any) -> Any:
    from graphdistill.student.config import StudentConfig
    from graphdistill.student.model import Student

    cfg = StudentConfig(
        image_size=size,
        trunk="ultralytics",
        trunk_spec=start.spec,
        num_classes=len(start.class_names),
        score_threshold=start.score_threshold,
        nms_iou=start.nms_iou,
        outputs={"objects": "objects", "sources": "sources"},
    )
    model = Student(cfg)
    model.start_from(start)
    return model.eval()


def fidelity(model: Any, images: list[Any], teacher: list[Any], names: list[str]) -> dict[str, float]:
    import numpy as np

    from graphdistill.eval.metrics import as_object, box_map, objects_f1
    from graphdistill.student.loader import spec_of
    from graphdistill.student.predict import StudentPredictor
    from graphdistill.student.tokenizer import StudentTokenizer

    tok = StudentTokenizer.train(["what is in the picture"] * 4, vocab_size=300)
    meta = {"class_names": names, "documents": [], "preprocessing": spec_of(model.config)}
    predictor = StudentPredictor(model, tok, meta)
    student = [predictor.predict(image, "What is in the picture?")["objects"] for image in images]
    res = box_map(teacher, student)
    f1 = [
        objects_f1([as_object(o) for o in t], [as_object(o) for o in s])
        for t, s in zip(teacher, student, strict=True)
    ]
    return {"box_map50": res["box_map50"], "box_map": res["box_map"], "objects_f1": float(np.mean(f1))}


def dataset_images(path: str) -> tuple[list[Any], list[Any], str]:
    """Every distinct image of a dataset's train split (recorded inputs, not replays) and the teacher objects
    recorded with it."""
    from graphdistill.dataset import open_dataset
    from graphdistill.eval.evaluate import output_kinds_of, output_of_row

    ds = open_dataset(path)
    kinds = output_kinds_of(ds)
    images, teacher, seen = [], [], set()
    for row in ds.rows("train"):
        if row.is_replay or row.image in seen:
            continue
        seen.add(row.image)
        images.append(ds.image(row))
        teacher.append(output_of_row(row, kinds)["objects"])
    return images, teacher, f"{len(images)} distinct recorded training images of {path}"


def encode_cost(model: Any, photos: list[Any], repeats: int) -> dict[str, Any]:
    import numpy as np
    import torch

    from graphdistill.export.executorch import export_executorch
    from graphdistill.export.quantize import QUANTIZED_WITH_CONVS
    from graphdistill.runner.preprocess import preprocess
    from graphdistill.student.loader import spec_of

    cfg = model.config
    lq = cfg.max_question_len

    class Encode(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.student = model

        def forward(self, image: Any, ids: Any, mask: Any) -> tuple[Any, ...]:
            out = self.student.encode(image, ids, mask != 0)
            return tuple(
                out[k] for k in ("boxes", "scores", "classes", "keep", "mask_logits", "source_logits")
            )

    spec = spec_of(cfg)
    images = [torch.from_numpy(preprocess(p.image(), spec)[0]) for p in photos]
    ids = torch.ones(1, lq, dtype=torch.long)
    example = (torch.zeros(1, 3, cfg.image_size, cfg.image_size), ids, ids)
    calibration = [(x, ids, ids) for x in images]
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        export_executorch(
            {"encode": (Encode().eval(), example)},
            Path(tmp),
            quantize="int8",
            calibration={"encode": calibration},
            int8_patterns=QUANTIZED_WITH_CONVS,
        )
        pte = Path(tmp) / "model.pte"
        out["pte_bytes"] = pte.stat().st_size
        import executorch.kernels.quantized  # noqa: F401  (the int8 program's out-of-delegate kernels)
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime

        for threads in (1, 2):
            portable_lib._unsafe_reset_threadpool(threads)
            method = Runtime.get().load_program(str(pte)).load_method("encode")
            inputs = [np.ascontiguousarray(images[0].numpy()), ids.numpy(), ids.numpy()]
            tensors = [torch.from_numpy(a) for a in inputs]
            for _ in range(3):
                method.execute(tensors)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                method.execute(tensors)
                times.append((time.perf_counter() - t0) * 1000)
            out[f"encode_ms_{threads}t"] = round(statistics.median(times), 2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(HERE / "results" / "input_size.json"))
    ap.add_argument("--sizes", default="256,320,384,448")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--dataset", default=None, help="measure on this dataset's training images (see above)")
    args = ap.parse_args()
    from graphdistill.recording.photos import DEFAULT_HELDOUT, builtin_photos
    from graphdistill.teachers.base import load_offer
    from graphdistill.teachers.detector import YoloDetector
    from run_all import machine, write_result  # benchmarks/ is this script's folder

    detector = YoloDetector()
    start = load_offer(detector.student_offer(), node="detect")
    photos = [p for p in builtin_photos() if p.id not in DEFAULT_HELDOUT]
    if args.dataset:
        images, teacher, measured_on = dataset_images(args.dataset)
    else:
        images = [p.image() for p in photos]
        teacher = [detector.detect(image).as_objects() for image in images]
        measured_on = "the built-in training photos"
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        model = student_at(size, start)
        row: dict[str, Any] = {"size": size, **fidelity(model, images, teacher, start.class_names)}
        row.update(encode_cost(model, photos, args.repeats))
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {
        "what": "student started from the teacher's YOLO detector, before training: box fidelity to the "
        "teacher detector (at 640) on the built-in training photos, and the int8 ExecuTorch encode program",
        "measured_on": measured_on,
        "photos": [p.id for p in photos],
        "teacher_objects": sum(len(t) for t in teacher),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "sizes": rows,
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
