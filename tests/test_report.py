"""Evaluation end to end (eval.json, cost, the HTML report, the markdown summary) on a synthetic dataset."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _fixtures import (
    LookupStudent,
    W,
    bag_embedder,
    make_trace,
    obj,
    run_folder,
    teacher_answer,
    train_tiny_run,
    undeclared_keys,
)
from graphdistill.dataset import DatasetRow, make_synthetic_dataset, open_dataset
from graphdistill.eval import cost
from graphdistill.eval.evaluate import COST_KEYS, FIDELITY_KEYS, evaluate_run
from graphdistill.eval.report import build_report
from graphdistill.eval.result import write_eval
from graphdistill.eval.summary import markdown_summary

pytestmark = [
    # tracing the student for the ONNX bundle (the export stage's own named exceptions)
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore:.*Enum subclass.*:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*Enum subclass.*:FutureWarning"),
]


def _degraded(i: int, row: DatasetRow) -> dict[str, Any]:
    """A student that blanks the answer and drops the last object on every other input, so the fidelity it
    earns is known."""
    out = teacher_answer(i, row)
    return {**out, "answer": "", "objects": out["objects"][:-1]} if i % 2 == 0 else out


GRAPH_FILE = """
import json, time
from pathlib import Path
from graphdistill.graphs.builder import GraphBuilder

TABLE = json.loads(Path(__file__).with_name("table.json").read_text())

def answer(state):
    import hashlib, numpy as np
    time.sleep(0.02)  # a teacher that is measurably slower than the lookup student
    key = hashlib.sha256(np.ascontiguousarray(state["image"]).tobytes() + state["question"].encode()).hexdigest()
    return TABLE[key]

graph = (
    GraphBuilder("lookup_teacher")
    .input("image", "image").input("question", "text")
    .output("answer", "text").output("objects", "objects").output("sources", "sources")
    .node("lookup", answer, reads=["image", "question"], writes=["answer", "objects", "sources"])
    .edge("__start__", "lookup").edge("lookup", "__end__")
)
"""


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("ds") / "shapes", n=24, seed=3).root


def _teacher_graph_file(tmp_path: Path, dataset: Path) -> str:
    student = LookupStudent(dataset)
    table = {
        k: {**v, "objects": [o.model_dump(mode="json") for o in v["objects"]]}
        for k, v in student.table.items()
    }
    (tmp_path / "table.json").write_text(json.dumps(table))
    (tmp_path / "lookup_graph.py").write_text(GRAPH_FILE)
    return f"{tmp_path / 'lookup_graph.py'}:graph"


@pytest.mark.slow
def test_perfect_student_scores_one_and_teacher_is_timed(tmp_path: Path, synthetic: Path) -> None:
    run = run_folder(tmp_path / "run", synthetic)
    res = evaluate_run(
        run,
        synthetic,
        predictor=LookupStudent(synthetic),
        embedder=bag_embedder,
        graph_spec=_teacher_graph_file(tmp_path, synthetic),
        teacher_n=2,
        student_repeats=2,
    )
    n_test = open_dataset(synthetic).splits["test"]
    assert res["n"] == n_test > 0
    assert res["photos"] == n_test  # each synthetic picture is its own photo
    for k in FIDELITY_KEYS:
        assert res["fidelity"][k] == pytest.approx(1.0), k
        assert res["fidelity_ci"][k] == [pytest.approx(1.0), pytest.approx(1.0)], k  # nothing to vary
    assert res["ci"]["resamples"] == 1000 and res["ci"]["level"] == 0.95
    for k in COST_KEYS:
        assert isinstance(res["cost"][k], (int, float)), k
    assert res["cost"]["student_bytes"] == (run / "model.safetensors").stat().st_size
    assert res["cost"]["student_params"] == 1000
    assert res["cost"]["teacher_ms"] >= 20.0  # the lookup teacher sleeps 20 ms per query
    assert res["cost"]["speedup"] == pytest.approx(res["cost"]["teacher_ms"] / res["cost"]["student_ms"])
    assert res["cost"]["teacher_rerun_agreement"]["answer_exact"] == 1.0
    assert all(r["disagreement"] == pytest.approx(0.0) for r in res["rows"])


@pytest.mark.slow
def test_degraded_student_and_the_report(tmp_path: Path, synthetic: Path) -> None:
    run = run_folder(tmp_path / "run_a", synthetic)
    res = evaluate_run(
        run,
        synthetic,
        predictor=LookupStudent(synthetic, _degraded),
        embedder=bag_embedder,
        teacher_timing=False,
        student_repeats=1,
        val=True,
    )
    f = res["fidelity"]
    for k in FIDELITY_KEYS:  # each figure inside its interval
        lo, hi = res["fidelity_ci"][k]
        assert lo <= f[k] <= hi, (k, f[k], lo, hi)
    assert res["fidelity_ci"]["answer_exact"][0] < res["fidelity_ci"]["answer_exact"][1]
    assert res["fidelity_val"]["n"] == open_dataset(synthetic).splits["val"]
    assert 0.0 < res["fidelity_val"]["answer_exact"] < 1.0
    assert 0.0 < f["answer_exact"] < 1.0
    assert 0.0 < f["mask_miou"] < 1.0
    assert f["sources_recall"] == pytest.approx(1.0)
    assert res["cost"]["teacher_ms"] is None and res["cost"]["speedup"] is None
    assert res["cost"]["teacher_sizes_assumed_defaults"] is True
    write_eval(run, res)

    # a second "run" evaluated with a perfect student, to exercise the multi-run plot
    run_b = run_folder(tmp_path / "run_b", synthetic, n_params=500)
    res_b = evaluate_run(
        run_b, synthetic, predictor=LookupStudent(synthetic), embedder=bag_embedder, teacher_timing=False
    )
    write_eval(run_b, res_b)
    meta_b = json.loads((run_b / "meta.json").read_text())
    (run_b / "meta.json").write_text(json.dumps({**meta_b, "train_size": 5}))

    scaling = {
        "points": [
            {"n_inputs": n, "filtered": flt, "answer_f1": 0.5, "box_map50": 0.6, "mask_miou": 0.4}
            for n in (10, 20)
            for flt in (True, False)
        ]
    }
    figures = {"answer_f1": 0.3, "box_map50": 0.5, "mask_miou": None, "sources_recall": 0.7}
    tta = {
        "settings": [
            {"tta": name, "pytorch_ms": ms * 3, "pytorch": figures, "bundle_ms": ms, "bundle": figures}
            for name, ms in (("none", 30.0), ("flip", 61.0), ("scale@0.5", 44.0))
        ]
    }
    depth = {  # benchmarks/depth.py's: each setting named by "setting", drawn with the first study's
        "settings": [
            {
                "setting": f"r={r}",
                "pytorch_ms": 90.0 + r,
                "pytorch": figures,
                "bundle_ms": 30.0 + r,
                "bundle": figures,
            }
            for r in (1, 2)
        ]
    }
    rounds = {  # benchmarks/rounds.py's: one line per arm over rounds
        "arms": {
            arm: {
                "rounds": [
                    {"round": r, "teacher_calls": 24 * r, "train_rows": 10 + 8 * r,
                     "fidelity": {**figures, "answer_f1": base + 0.1 * r},
                     "diversity": {"distinct_2": 0.6, "top_share": 0.1}, "coverage": {"classes": 5 + r}}
                    for r in range(3)
                ]
            }
            for arm, base in (("active", 0.2), ("random", 0.15))
        }
    }  # fmt: skip
    out = build_report(
        [run, run_b],
        tmp_path / "out" / "report.html",
        scaling=scaling,
        tta=[tta, depth],
        rounds=rounds,
        gallery_n=4,
        predictor=LookupStudent(synthetic, _degraded),
    )
    page = _parse(out.read_text())
    for section in ("headline", "fidelity", "cost", "plots", "scaling", "tta", "rounds", "gallery"):
        assert section in page.ids, section
    for fig in (
        "plot-per-class",
        "plot-latency",
        "plot-train-size",
        "plot-scaling",
        "plot-tta",
        "plot-rounds",
    ):
        assert fig in page.ids, fig
    assert page.gallery == 4
    assert all(src.startswith("data:image/") for src in page.srcs)
    assert len(page.srcs) == 6 + 4  # six plots, four gallery pictures
    assert not page.external, page.external
    text = out.read_text()
    assert "http://" not in text and "https://" not in text
    # worst disagreement first
    shown = [float(x) for x in page.disagreements]
    assert shown == sorted(shown, reverse=True) and shown[0] > 0

    assert "run_a (val split)" in text
    with pytest.raises(ValueError, match="n_inputs"):
        build_report([run], tmp_path / "bad.html", scaling={"points": [{"filtered": True}]}, gallery_n=0)
    assert "<td>scale@0.5</td><td>132.0</td><td>0.30</td>" in text  # the setting's row: PyTorch ms, figures
    assert "<td>r=2</td><td>92.0</td><td>0.30</td>" in text  # the second study's rows follow
    # each arm's rounds: teacher calls, train rows, then its figures (answer F1 first)
    assert "<td>random</td><td>2</td><td>48</td><td>26</td><td>0.35</td>" in text
    with pytest.raises(ValueError, match="rounds JSON arm 'active' round 0"):
        build_report([run], tmp_path / "bad.html", rounds={"arms": {"active": {"rounds": [{"round": 0}]}}})
    with pytest.raises(ValueError, match="bundle_ms"):
        build_report(
            [run], tmp_path / "bad.html", tta={"settings": [{"tta": "x", "pytorch_ms": 1, "pytorch": {}}]}
        )

    lo, hi = res["fidelity_ci"]["answer_exact"]
    assert f"{f['answer_exact']:.2f} [{lo:.2f}, {hi:.2f}]" in text  # the figure with its interval
    assert "95 % interval" in text
    md = markdown_summary(res)
    assert f"| Answer exact match | {f['answer_exact']:.2f} [{lo:.2f}, {hi:.2f}] |" in md
    assert "| Box mAP@0.5 |" in md and "percentile bootstrap" in md


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.srcs: list[str] = []
        self.external: list[str] = []
        self.gallery = 0
        self.disagreements: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(str(a["id"]))
        if tag in ("script", "link", "iframe"):
            self.external.append(tag)
        for attr in ("src", "href"):
            v = a.get(attr)
            if v is not None and not (v.startswith("data:") or v.startswith("#")):
                self.external.append(v)
        if tag == "img" and a.get("src"):
            self.srcs.append(str(a["src"]))
        if tag == "figure" and a.get("class") == "gallery-item":
            self.gallery += 1

    def handle_data(self, data: str) -> None:
        self.disagreements += re.findall(r"disagreement (\d+\.\d+)", data)


def _parse(text: str) -> _Page:
    p = _Page()
    p.feed(text)
    return p


def test_peak_rss_sees_an_allocation_and_latency_is_a_median() -> None:
    with cost.PeakRSS() as mem:
        block = np.ones(64 * 1024 * 1024, dtype=np.uint8)  # 64 MB, touched
        block[::4096] = 2
        import time

        time.sleep(0.05)
    assert mem.increase >= 32 * 1024 * 1024
    del block
    delays = iter([0.001, 0.03, 0.001, 0.001])  # warm-up, then three timed calls: 30, 1, 1 ms

    def predict(image: np.ndarray, question: str) -> str:
        import time

        time.sleep(next(delays))
        return question

    lat = cost.median_latency(predict, [(np.zeros((2, 2, 3), np.uint8), "q")], warmup=1, repeats=3)
    assert lat["n_timed"] == 3
    assert lat["median_ms"] < 15 < lat["max_ms"]
    assert lat["outputs"] == ["q"]


def test_teacher_footprint_counts_registry_files_and_converted_caches(isolated_home: Path) -> None:
    from graphdistill import weights

    spec = weights.REGISTRY["yolo11n"]
    f = weights.cached_path("yolo11n")
    f.parent.mkdir(parents=True)
    f.write_bytes(b"x" * 1234)
    conv = isolated_home / "converted" / f"thing-{spec.sha256[:16]}"
    conv.mkdir(parents=True)
    (conv / "model.safetensors").write_bytes(b"y" * 100)
    fp = cost.teacher_footprint(None)
    yolo = next(m for m in fp["models"] if m["weights_sha256"] == spec.sha256)
    assert yolo["bytes"] == 1234 + 100
    assert fp["assumed_defaults"] is True


def test_teacher_params_are_counted_from_the_graph_nodes_adapters() -> None:
    import torch

    from graphdistill.graphs.builder import GraphBuilder

    class Adapter:  # a teacher adapter keeps its model a couple of hops down, shared layers counted once
        model_id = "tiny"
        weights_sha256 = "0" * 64
        device = "cpu"

        def __init__(self) -> None:
            shared = torch.nn.Linear(3, 2)  # 8 parameters
            self._inner = {"heads": [shared, torch.nn.Sequential(shared, torch.nn.Linear(2, 1))]}  # + 3

    adapter = Adapter()
    graph = (
        GraphBuilder("tiny")
        .input("question", "text")
        .output("answer", "text")
        .node(
            "reason",
            lambda s: {"answer": s["question"]},
            reads=["question"],
            writes=["answer"],
            model=adapter,
        )
        .edge("__start__", "reason")
        .edge("reason", "__end__")
        .compile()
    )
    models = cost.graph_models(graph)
    assert [m["node"] for m in models] == ["reason"] and models[0]["adapter"] is adapter
    fp = cost.teacher_footprint(graph)
    assert fp["params"] == 8 + 3
    assert fp["bytes"] == 0  # no registry weight has this sha256
    assert fp["assumed_defaults"] is False


# ---------------------------------------------------------------------------------------------------------
# A real tiny run: the student stage's own training on a synthetic dataset, then the CLI commands
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    run = train_tiny_run(tmp_path_factory.mktemp("real"))
    return run, run.parent / "ds"


@pytest.mark.slow
def test_eval_and_report_commands_on_a_real_tiny_run(
    real_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from graphdistill.cli import main

    run, ds = real_run
    # no eval.json yet: the report evaluates the run first, on the dataset its meta.json names
    (run / "eval.json").unlink(missing_ok=True)
    out = tmp_path / "report.html"
    assert main(["report", str(run), "--out", str(out), "--gallery", "2", "--no-teacher-timing"]) == 0
    assert (run / "eval.json").exists()
    page = _parse(out.read_text())
    for ident in ("headline", "fidelity", "cost", "plots", "gallery", "plot-per-class", "plot-latency"):
        assert ident in page.ids, ident
    assert page.gallery == 2
    assert page.srcs and all(src.startswith("data:image/") for src in page.srcs)
    assert not page.external
    assert "http://" not in out.read_text() and "https://" not in out.read_text()

    capsys.readouterr()
    rc = main(
        ["eval", str(run), "--dataset", str(ds), "--json", "--no-teacher-timing", "--repeats", "2", "--val"]
    )
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((run / "eval.json").read_text())
    assert printed["n"] == saved["n"] == open_dataset(ds).splits["test"]
    assert printed["fidelity_val"]["n"] == open_dataset(ds).splits["val"] > 0
    for k in FIDELITY_KEYS:
        assert isinstance(printed["fidelity"][k], float) and 0.0 <= printed["fidelity"][k] <= 1.0, k
    for k in ("student_ms", "teacher_bytes", "student_bytes"):
        assert isinstance(printed["cost"][k], (int, float)) and printed["cost"][k] > 0, k
    assert printed["cost"]["student_bytes"] == (run / "model.safetensors").stat().st_size
    assert printed["cost"]["teacher_bytes"] > 100 * printed["cost"]["student_bytes"]
    assert len(saved["rows"]) == saved["n"]

    capsys.readouterr()
    assert main(["report", str(run), "--markdown"]) == 0
    md = capsys.readouterr().out
    assert (run / "summary.md").read_text() == md
    assert "| Answer token F1 |" in md and "ms per query" in md


@pytest.mark.slow
def test_eval_times_an_exported_bundle(
    real_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export = pytest.importorskip("graphdistill.export.bundle")
    from graphdistill.cli import main

    run, ds = real_run
    bundle = tmp_path / "bundle"
    export.export_run(run, "onnx", bundle, dataset=ds, n_calibration=2, n_heldout=2)
    rc = main(["eval", str(run), "--dataset", str(ds), "--json", "--no-teacher-timing", "--no-semantic",
               "--repeats", "2", "--bundle", str(bundle)])  # fmt: skip
    assert rc == 0
    exported = json.loads(capsys.readouterr().out)["exported"][str(bundle)]
    assert exported["ms"] > 0 and exported["bytes"] > 0
    # timed with 1 and 2 runtime threads (the default); the headline ms is the faster
    assert set(exported["ms_by_threads"]) == {"1", "2"}
    assert exported["ms"] == min(exported["ms_by_threads"].values())
    # the bundle passed export's parity gate, so its answers are the PyTorch student's
    assert exported["parity_vs_student"]["answer_exact"] == 1.0
    # and it is scored against the teacher on every test row, with intervals, like the PyTorch student
    saved = json.loads((run / "eval.json").read_text())
    assert exported["fidelity"]["n"] == saved["n"]
    assert exported["fidelity"]["answer_exact"] == saved["fidelity"]["answer_exact"]
    assert set(exported["fidelity_ci"]) == set(saved["fidelity_ci"]) and exported["fidelity_ci"]["answer_f1"]
    md = markdown_summary(saved)
    assert "| PyTorch student vs teacher | bundle vs teacher |" in md
    # what evaluation wrote is the typed contract its readers check (eval.result)
    from graphdistill.eval.result import EvalResult, ExportedEval, RowScores, read_eval

    assert read_eval(run) == saved and not undeclared_keys(saved, EvalResult)
    assert saved["rows"] and not any(undeclared_keys(r, RowScores) for r in saved["rows"])
    assert not undeclared_keys(saved["exported"][str(bundle)], ExportedEval)


def test_eval_command_names_a_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from graphdistill.cli import main

    assert main(["eval", str(tmp_path / "nope"), "--dataset", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err
    run = run_folder(tmp_path / "run", tmp_path / "missing_ds")
    assert main(["eval", str(run), "--dataset", str(tmp_path / "missing_ds")]) == 2
    assert "missing_ds" in capsys.readouterr().err
    (tmp_path / "ds").mkdir()
    assert main(["eval", str(run), "--dataset", str(tmp_path / "ds"), "--bundle-threads", "0,two"]) == 2
    assert "--bundle-threads '0,two'" in capsys.readouterr().err
    assert main(["eval", str(run), "--dataset", str(tmp_path / "ds"), "--ci-resamples", "-1"]) == 2
    assert "--ci-resamples -1" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "model.safetensors" in capsys.readouterr().err


def test_replay_rows_are_left_out_of_the_evaluation(tmp_path: Path, synthetic: Path) -> None:
    """A counterfactual replay's row shares its parent's image and question but not its targets: scoring the
    student on it would compare the photo's objects with edited ones. Evaluation leaves such rows out."""
    from dataclasses import replace

    from graphdistill.dataset import DatasetWriter

    src = open_dataset(synthetic)
    mixed = tmp_path / "mixed"
    writer = DatasetWriter(mixed, src.manifest)
    for split in ("train", "val", "test"):
        for row in src.rows(split):
            writer.add(row, src.image(row), split)
            replay = {"parent_trace": "t", "from_node": "retrieve", "edit": {"kind": "drop", "index": 0}}
            edited = replace(row, id=row.id + "-replay", answer="I see a cup.", objects=(), replay=replay)
            writer.add(edited, src.image(row), split)
    writer.close()
    assert sum(r.replay is not None for r in open_dataset(mixed).rows("test")) == src.splits["test"]
    run = run_folder(tmp_path / "run", mixed)
    res = evaluate_run(
        run,
        mixed,
        predictor=LookupStudent(synthetic),
        embedder=bag_embedder,
        teacher_timing=False,
        student_repeats=1,
        val=True,
    )
    assert res["n"] == src.splits["test"] and res["fidelity_val"]["n"] == src.splits["val"]
    assert res["fidelity"]["answer_exact"] == pytest.approx(1.0)
    assert res["fidelity_val"]["answer_exact"] == pytest.approx(1.0)


def test_the_teacher_against_itself_scores_its_other_samples_against_the_reference(tmp_path: Path) -> None:
    """The noise ceiling: each recorded sample other than the one the row's answer was voted from, scored
    against the row with the evaluation's metrics; a sample seen under a flip is mapped back first."""
    import shutil

    from graphdistill.eval import metrics
    from graphdistill.eval.evaluate import output_kinds_of, teacher_samples
    from graphdistill.filter.filtering import FilterConfig, filter_store
    from graphdistill.store.trace_store import TraceStore

    store = TraceStore(tmp_path / "store")
    blobs: dict[str, bytes] = {}
    box = [10.0, 10.0, 30.0, 30.0]
    mirrored = [W - 30.0, 10.0, W - 10.0, 30.0]  # the same cat on the flipped photo
    flip = {"flip": True, "scale": 1.0, "orig_size": [40, W]}
    held: dict[str, Any] = {"photos": ["skimage/coffee"], "recipe": {"kind": "heldout", "heldout": True}}
    for t in (
        make_trace("g", 0, "There is a cat.", [obj("cat", box)], ["doc-cat"], blobs=blobs, **held),
        make_trace("g", 1, "There is a cat.", [obj("cat", box)], ["doc-cat"], blobs=blobs, **held),
        make_trace(
            "g", 2, "A cat sits here.", [obj("cat", mirrored)], ["doc-dog"], blobs=blobs, tta=flip, **held
        ),
    ):
        store.append(t, blobs)
    filter_store(store, tmp_path / "ds", FilterConfig(fractions=(1, 0, 0)), source_store=str(store.root))
    ds = open_dataset(tmp_path / "ds")
    rows = ds.rows("test")  # a held-out photo: kept, as evaluation rows are
    assert [r.answer for r in rows] == ["There is a cat."]
    got = teacher_samples(ds, rows, output_kinds_of(ds))
    assert got is not None
    refs, others, photos = got
    assert len(others) == 2 and photos == ["skimage/coffee"] * 2  # sample 0 is the reference's own: left out
    assert [o["answer"] for o in others] == ["There is a cat.", "A cat sits here."]
    assert [o["objects"][0]["box"] for o in others] == [box, box]  # the flipped sample, mapped back
    scores = metrics.compare_outputs(refs, others, semantic=False, class_names=ds.class_names)
    assert scores["answer_f1"] == pytest.approx(
        (1.0 + metrics.token_f1("A cat sits here.", "There is a cat.")) / 2
    )
    assert scores["box_map50"] == pytest.approx(1.0) and scores["sources_recall"] == pytest.approx(0.5)
    # the summary and the report show it as its own column beside the student's
    ev = {
        "fidelity": {"answer_f1": 0.2},
        "teacher_self": {"samples": 2, "fidelity": scores, "fidelity_ci": {"answer_f1": [0.4, 0.9]}},
    }
    md = markdown_summary(ev)
    assert "| teacher (another sample) vs teacher |" in md.replace("PyTorch student vs teacher | ", "")
    assert f"| Answer token F1 | 0.200 | {scores['answer_f1']:.2f} [0.40, 0.90] |" in md
    assert "teacher (another sample)" not in markdown_summary({"fidelity": {"answer_f1": 0.2}})
    shutil.rmtree(tmp_path / "store")  # a dataset whose trace store is gone: nothing to compare, no error
    assert teacher_samples(ds, rows, output_kinds_of(ds)) is None


def test_eval_with_tta_asks_the_student_for_those_views_and_says_so(tmp_path: Path, synthetic: Path) -> None:
    """``evaluate_run(tta=...)`` hands the augmentations to the student's ``predict`` on every row it scores and
    times, and records them in the result; without it the student is asked plainly."""
    lookup = LookupStudent(synthetic)
    asked: list[Any] = []

    class Student:
        def predict(self, image: np.ndarray, question: str, **kw: Any) -> dict[str, Any]:
            asked.append(kw.get("tta"))
            return lookup.predict(image, question)

    run = run_folder(tmp_path / "run", synthetic)
    kw: dict[str, Any] = dict(predictor=Student(), teacher_timing=False, student_repeats=1, semantic=False)
    res = evaluate_run(run, synthetic, tta="scale,flip", ci_resamples=0, **kw)
    assert asked and all(a == ("scale", "flip") for a in asked)
    assert res["tta"] == ["scale", "flip"]
    asked.clear()
    res = evaluate_run(run, synthetic, ci_resamples=0, **kw)
    assert asked and all(a is None for a in asked) and "tta" not in res
    with pytest.raises(ValueError, match="'blur'"):
        evaluate_run(run, synthetic, tta="blur", ci_resamples=0, **kw)
