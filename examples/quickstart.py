from graphdistill.filter.filtering import FilterConfig, filter_store
from graphdistill.recording.photos import DEFAULT_HELDOUT, builtin_photos
from graphdistill.recording.recorder import record
from graphdistill.store.trace_store import TraceStore
from graphdistill.graphs import GraphBuilder
from graphdistill.export.bundle import export_run
from graphdistill.student.train import TrainConfig, train
from graphdistill.teachers.detector import YoloDetector
from graphdistill.teachers.segmenter import SamSegmenter

det, sam = YoloDetector(), SamSegmenter()  # registry defaults; pass a path to use your own weights


def look(s):  # a plain Python node: reads state fields, returns the fields it writes
    d = det.detect(s["image"])
    m = sam.segment(s["image"], d.xyxy)
    objects = [{"label": n, "class_id": c, "score": p, "box": b, "mask": r.model_dump()}
               for n, c, p, b, r in zip(d.names, d.class_ids, d.scores, d.xyxy, m.rles)]
    return {"objects": objects, "answer": "I see " + (", ".join(sorted(set(d.names))) or "nothing") + "."}


teacher = (GraphBuilder("my_teacher").input("image", "image").input("question", "text")
           .output("answer", "text").output("objects", "objects")
           .node("look", look, reads=["image"], writes=["answer", "objects"], model=det).compile())
store = TraceStore("my-traces")
live = record(teacher, store)  # the same graph; every call is now a durable, typed trace
for photo in builtin_photos():
    live.invoke({"image": photo.image(), "question": "What is in this picture?"},
                config={"metadata": {"graphdistill_provenance": {"photos": [photo.id]}}})
# vote, checks, dedup, splits by source photo; the twelve held-out built-in photos are the test split
filter_store(store, "my-dataset", FilterConfig(heldout_photos=DEFAULT_HELDOUT))
train(TrainConfig(dataset="my-dataset", out="my-run", max_minutes=1))
export_run("my-run", "onnx", "my-bundle", quantize="int8")  # fails loudly if parity fails
