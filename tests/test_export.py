"""Export a tiny trained student to ONNX and ExecuTorch bundles, check the parity gate, int8, the torch-free
runner (in a subprocess where torch and the student's code cannot be imported) and corrupted bundles."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _fixtures import EXPORT_WARNINGS, train_tiny, train_tiny_run, undeclared_keys
from _netguard import subprocess_env
from graphdistill.runner import BundleError, BundleRunner
from graphdistill.runner.bundle import MANIFEST, manifest_checksum

pytestmark = [pytest.mark.filterwarnings(w) for w in EXPORT_WARNINGS]

COPY_INPUTS = ["ptr_keys", "ptr_bias", "ptr_vocab", "ptr_next"]  # ptr_next: with a sources head
OBJECT_OUTPUTS = ["boxes", "scores", "classes", "keep", "mask_logits"]
N = {"n_calibration": 3, "n_heldout": 3}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A student trained for one short epoch on a synthetic dataset (a real run folder, via train())."""
    return train_tiny_run(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def onnx_float(run_dir: Path) -> Path:
    from graphdistill.export.bundle import export_run

    out = run_dir.parent / "bundle-onnx"
    export_run(run_dir, "onnx", out, **N)
    return out


@pytest.fixture(scope="module")
def onnx_int8(run_dir: Path) -> Path:
    from graphdistill.export.bundle import export_run

    out = run_dir.parent / "bundle-onnx-int8"
    export_run(run_dir, "onnx", out, quantize="int8", **N)
    return out


def _manifest(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / MANIFEST).read_text())


def _model_bytes(bundle: Path) -> int:
    return sum(p.stat().st_size for p in bundle.iterdir() if p.suffix in (".onnx", ".pte"))


def _image(run_dir: Path, split: str = "test", i: int = 0) -> tuple[np.ndarray, str]:
    from graphdistill.dataset import open_dataset

    ds = open_dataset(run_dir.parent / "ds")
    row = ds.rows(split)[i]
    return ds.image(row), row.question


def test_onnx_float_bundle_passes_parity(onnx_float: Path) -> None:
    m = _manifest(onnx_float)
    gate = m["parity"]
    assert gate["passed"] and not gate["failures"]
    assert gate["vs_pytorch"]["answer_tokens_equal"] == 1.0
    assert gate["vs_pytorch"]["objects_equal"] == 1.0  # the same slots kept, with the same classes
    assert gate["vs_pytorch"]["box_max_abs_diff"] <= gate["tolerances"]["box_abs"]
    assert gate["vs_pytorch"]["mask_iou_min"] >= 0.99
    assert set(m["programs"]) == {"encode", "decode_step"}
    cfg = m["student_config"]
    k, d, v = cfg["max_objects"], cfg["d_model"], cfg["vocab_size"]
    # encode selects the objects itself and hands the decoder its per-query inputs, the copy path's included
    outs = {o["name"]: o for o in m["programs"]["encode"]["outputs"]}
    assert list(outs) == ["cross_kv", *COPY_INPUTS, *OBJECT_OUTPUTS, "source_logits"]
    assert outs["classes"]["dtype"] == "int64" and outs["keep"]["dtype"] == "bool"
    assert outs["boxes"]["shape"] == [1, k, 4] and outs["mask_logits"]["shape"] == [1, k, 16, 16]
    decoding = m["output_decoding"]
    assert (decoding["score_threshold"], decoding["nms_iou"]) == (cfg["score_threshold"], cfg["nms_iou"])
    assert decoding["mask_size"] == 16 and "no_object_class" not in decoding
    step = m["programs"]["decode_step"]
    assert m["kv_cache"]["fixed_size"] and step["arrays"]["kv_cache"]["shape"] == m["kv_cache"]["shape"]
    # every layer's cached keys and values are their own input: views [1, H, T, hd] of the runner's cache
    layers = m["kv_cache"]["shape"][0]
    cache_inputs = [i for i in step["inputs"] if i.get("view_of", [""])[0] == "kv_cache"]
    assert [i["view_of"][1:] for i in cache_inputs] == [[n, j] for n in range(layers) for j in (0, 1)]
    assert all(i["shape"] == m["kv_cache"]["shape"][2:] for i in cache_inputs)
    assert [i["name"] for i in step["inputs"][:2]] == ["token", "position"]
    assert len(step["inputs"]) == 2 + 4 * layers + 5
    # the copy path's inputs: encode's outputs of the same names, copied in once per query, and the token fed
    # at the step before (the copy goes on where the last two tokens left a document)
    copy = step["inputs"][-5:-1]
    assert step["inputs"][-1] | {"meaning": ""} == {
        "name": "prev_token",
        "shape": [1, 1],
        "dtype": "int64",
        "meaning": "",
    }
    assert [i["name"] for i in copy] == [i["per_query"] for i in copy] == COPY_INPUTS
    # one slot per object, then one per token of the sources_k best-ranked documents
    assert "source_token_ids" not in cfg  # the program holds them; the manifest lists the documents
    run_cfg = json.loads((onnx_float.parent / "run" / "config.json").read_text())
    slots = k + min(cfg["sources_k"], cfg["num_sources"]) * max(len(t) for t in run_cfg["source_token_ids"])
    assert [i["shape"] for i in copy] == [[1, d, slots], [1, slots], [1, slots, v], [1, v, slots]]
    assert step["outputs"][0]["name"] == "scores" and step["outputs"][0]["shape"] == [1, v]
    # decode_step hands back this position's keys/values only: one cache slot, the runner stores it
    kv_new = m["programs"]["decode_step"]["outputs"][1]
    assert kv_new["name"] == "kv_new" and kv_new["shape"] == [
        *m["kv_cache"]["shape"][:4],
        1,
        m["kv_cache"]["shape"][5],
    ]
    assert m["preprocessing"]["layout"] == "NCHW" and m["preprocessing"]["mean"]
    assert set(m["files"]) == {"encode.onnx", "decode_step.onnx", "tokenizer.json"}
    assert m["class_names"] and m["documents"] and m["teacher_graph"]
    # the decoding rules the runner applies are the run's, derived from its own training answers
    from graphdistill.dataset import open_dataset
    from graphdistill.student.tokenizer import StudentTokenizer
    from graphdistill.student.train import decoding_rules

    tok = StudentTokenizer.load(Path(m["source_run"]) / "tokenizer.json")
    answers = [tok.encode(r.answer) for r in open_dataset(Path(m["source_run"]).parent / "ds").rows("train")]
    rules = decoding_rules(answers)
    assert rules["no_repeat_ngram"] >= 1 and rules["max_token_run"] >= 1
    assert {k: m["output_decoding"][k] for k in rules} == {k: cfg[k] for k in rules} == rules
    # the bundle's tokenizer is the run's, the same JSON without the indentation the run's file has
    bundled = (onnx_float / "tokenizer.json").read_text(encoding="utf-8")
    run_tok = Path(m["source_run"]) / "tokenizer.json"
    assert "\n" not in bundled and json.loads(bundled) == json.loads(run_tok.read_text(encoding="utf-8"))
    assert len(bundled) < 0.7 * run_tok.stat().st_size
    # a student trained from scratch: no teacher weights' terms bind the bundle
    assert m["started_from"] is None and "from scratch" in m["licence"]


def test_runner_gives_what_pytorch_predict_gives(run_dir: Path, onnx_float: Path) -> None:
    from graphdistill.eval.metrics import mask_iou
    from graphdistill.student.predict import load_student

    student = load_student(run_dir)
    runner = BundleRunner(onnx_float, threads=1)
    n_objects = 0
    for split, i in [("test", 0), ("val", 0), ("train", 1)]:
        image, question = _image(run_dir, split, i)
        want, got = student.predict(image, question), runner.predict(image, question)
        assert got["answer"] == want["answer"]
        assert got["sources"] == want["sources"]
        assert [o["class_id"] for o in got["objects"]] == [o["class_id"] for o in want["objects"]]
        for g, w in zip(got["objects"], want["objects"], strict=True):
            assert set(g) == set(w)
            np.testing.assert_allclose(g["box"], w["box"], atol=0.5)
            assert g["score"] == pytest.approx(w["score"], abs=1e-4)
            assert g["mask"]["size"] == w["mask"]["size"]
            assert mask_iou(g["mask"], w["mask"]) > 0.95
        n_objects += len(want["objects"])
    assert n_objects > 0  # objects were compared, not two empty lists


def test_the_runner_feeds_each_step_the_token_before_its_own(run_dir: Path, onnx_float: Path) -> None:
    """``prev_token`` is the token fed at the step before (<bos> at position 0): a runner that left it at <bos>,
    or fed the token itself, would copy from the wrong place in a document, where a tiny student may not show it."""
    runner = BundleRunner(onnx_float, threads=1)
    names = [i["name"] for i in runner.manifest["programs"]["decode_step"]["inputs"]]
    at_token, at_prev = names.index("token"), names.index("prev_token")
    fed: list[tuple[int, int]] = []
    run = runner.programs.run

    def spy(program: str, *inputs: np.ndarray) -> list[np.ndarray]:
        if program == "decode_step":
            fed.append((int(inputs[at_token][0, 0]), int(inputs[at_prev][0, 0])))
        return run(program, *inputs)

    runner.programs.run = spy  # type: ignore[method-assign]
    image, question = _image(run_dir)
    runner.predict(image, question)
    assert len(fed) > 2
    bos = runner.bos_id
    assert fed[0] == (bos, bos) and fed[1][1] == bos
    assert [p for _, p in fed[1:]] == [t for t, _ in fed[:-1]]


def test_int8_is_smaller_and_keeps_fidelity(onnx_float: Path, onnx_int8: Path) -> None:
    import onnx
    from onnx import numpy_helper

    # the test student is tiny, so its float convolutions (kept float: see quantize.DYNAMIC_OPS) weigh most of
    # it; what must hold is that every matrix product's weight became int8, and that this is what shrank
    matmul_bytes = 0
    for name in ("encode", "decode_step"):
        graph = onnx.load(str(onnx_float / f"{name}.onnx")).graph
        consts = {i.name: i for i in graph.initializer}
        weights = {n.input[1] for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in consts}
        matmul_bytes += sum(numpy_helper.to_array(consts[w]).nbytes for w in weights)
    saved = _model_bytes(onnx_float) - _model_bytes(onnx_int8)
    assert matmul_bytes > 0 and saved > 0.5 * matmul_bytes, (
        saved,
        matmul_bytes,
    )  # int8: a quarter of float32
    for name in ("encode", "decode_step"):
        graph = onnx.load(str(onnx_int8 / f"{name}.onnx")).graph
        consts = {i.name for i in graph.initializer}
        ops = [n.op_type for n in graph.node]
        assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops, name
        float_weights = [
            n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in consts
        ]
        assert not float_weights, (name, float_weights)
    m = _manifest(onnx_int8)
    fid = m["parity"]["fidelity_vs_teacher"]
    assert m["parity"]["passed"] and m["quantize"] == "int8"
    assert set(fid["drop"]) == {"answer_token_f1", "box_f1"}
    assert all(d <= fid["max_drop"] for d in fid["drop"].values())
    image, question = _image(Path(m["source_run"]))
    out = BundleRunner(onnx_int8).predict(image, question)
    assert set(out) == {"answer", "objects", "sources"}


BLOCKER = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError("blocked by the test: " + name)
        return None
sys.meta_path.insert(0, Blocker())
from graphdistill.cli import main
rc = main(sys.argv[1:])
leaked = [m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED)]
assert not leaked, leaked
sys.exit(rc)
"""


def _run_blocked(tmp_path: Path, blocked: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "blocked_cli.py"
    script.write_text(BLOCKER.format(blocked=blocked))
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=subprocess_env(),  # the test network guard holds in the runner's process too
    )


def test_run_bundle_cli_needs_no_torch(tmp_path: Path, run_dir: Path, onnx_float: Path) -> None:
    from PIL import Image

    from graphdistill.student.predict import load_student

    image, question = _image(run_dir)
    Image.fromarray(image).save(tmp_path / "img.png")
    args = ["run-bundle", str(onnx_float), "--image", str(tmp_path / "img.png"), "--question", question]
    res = _run_blocked(tmp_path, ["torch", "graphdistill.student"], *args, "--json", "--threads", "1")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    want = load_student(run_dir).predict(image, question)
    assert set(got) == set(want) == {"answer", "objects", "sources"}
    assert got["answer"] == want["answer"] and got["sources"] == want["sources"]
    assert [o["label"] for o in got["objects"]] == [o["label"] for o in want["objects"]]
    text = _run_blocked(tmp_path, ["torch", "graphdistill.student"], *args)
    assert text.returncode == 0 and "answer:" in text.stdout


def test_the_written_manifest_is_the_typed_contract_the_runner_reads(
    onnx_float: Path, onnx_int8: Path
) -> None:
    """Every field the exporter writes is declared in runner.manifest (so mypy checks the writer and every
    reader), and nothing declared as required is left out."""
    from graphdistill.runner import manifest as contract

    for bundle in (onnx_float, onnx_int8):
        m = _manifest(bundle)
        assert not undeclared_keys(m, contract.Manifest)
        assert not undeclared_keys(m["preprocessing"], contract.Preprocessing)
        assert not undeclared_keys(m["tokenizer"], contract.TokenizerSpec)
        assert not undeclared_keys(m["kv_cache"], contract.KVCacheSpec)
        assert not undeclared_keys(m["parity"], contract.ExportGate)
        for doc in m["documents"]:
            assert not undeclared_keys(doc, contract.Document)
        for prog in m["programs"].values():
            assert not undeclared_keys(prog, contract.ProgramSpec)
            for spec in (*prog["inputs"], *prog["outputs"]):
                assert not undeclared_keys(spec, contract.TensorSpec)
            for array in prog.get("arrays", {}).values():
                assert not undeclared_keys(array, contract.ArraySpec)
        assert BundleRunner(bundle).manifest == m


def _corrupt(bundle: Path, tmp_path: Path, how: str) -> Path:
    b = tmp_path / f"bundle-{how}"
    shutil.copytree(bundle, b)
    m = _manifest(b)
    if how == "truncated":
        data = (b / "encode.onnx").read_bytes()
        (b / "encode.onnx").write_bytes(data[: len(data) // 2])
    elif how == "edited":
        m["output_decoding"]["score_threshold"] = 0.0
        (b / MANIFEST).write_text(json.dumps(m))
    elif how == "wrong-sha":  # a consistent manifest that lists a wrong digest
        m["files"]["decode_step.onnx"] = "0" * 64
        m["manifest_sha256"] = manifest_checksum(m)
        (b / MANIFEST).write_text(json.dumps(m))
    elif how == "missing":
        (b / "tokenizer.json").unlink()
    elif how == "lacks-field":  # a consistent manifest without a field of the contract
        del m["tokenizer"]
        m["manifest_sha256"] = manifest_checksum(m)
        (b / MANIFEST).write_text(json.dumps(m))
    elif how == "old-format":  # a bundle of format 3 (its objects were decoded from set-prediction queries)
        m["format"] = "graphdistill-bundle/3"
        m["manifest_sha256"] = manifest_checksum(m)
        (b / MANIFEST).write_text(json.dumps(m))
    return b


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated", r"encode\.onnx is corrupt"),
        ("edited", "edited after export"),
        ("wrong-sha", r"decode_step\.onnx is corrupt"),
        ("missing", r"tokenizer\.json is missing"),
        ("lacks-field", r"manifest lacks tokenizer; export the run again"),
        ("old-format", r"graphdistill-bundle/3.*older graphdistill: export the run again"),
    ],
)
def test_corrupted_bundle_gives_a_clear_error(
    tmp_path: Path, onnx_float: Path, how: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from graphdistill.cli import main

    b = _corrupt(onnx_float, tmp_path, how)
    with pytest.raises(BundleError, match=message):
        BundleRunner(b)
    img = tmp_path / "img.png"
    from PIL import Image

    Image.new("RGB", (40, 30)).save(img)
    assert main(["run-bundle", str(b), "--image", str(img), "--question", "what?"]) == 2
    assert "error" in capsys.readouterr().err


def test_a_run_of_the_old_student_is_refused_with_a_clear_message(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run trained before the dense object head (config.json with num_queries, meta format /1): predict
    and export say what it is and what to do, never a stack trace or a silently wrong model."""
    from graphdistill.cli import main
    from graphdistill.student.predict import STUDENT_FORMAT, RunError, load_student

    old = tmp_path / "old-run"
    shutil.copytree(run_dir, old)
    new_cfg = json.loads((run_dir / "config.json").read_text())
    cfg = {k: v for k, v in new_cfg.items() if k not in ("trunk", "trunk_spec", "max_objects", "candidates")}
    (old / "config.json").write_text(json.dumps({**cfg, "num_queries": 6, "det_layers": 1, "mask_size": 16}))
    export_args = ["export", str(old), "--format", "onnx", "--out", str(tmp_path / "b"), "--calibration", "1"]
    with pytest.raises(RunError, match="set-prediction .*train the run again"):
        load_student(old)
    assert main(export_args) == 2
    assert "set-prediction" in capsys.readouterr().err and not (tmp_path / "b").exists()
    (old / "config.json").write_text(json.dumps(new_cfg))
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["format"] == STUDENT_FORMAT
    (old / "meta.json").write_text(json.dumps({**meta, "format": "graphdistill-student/1"}))
    with pytest.raises(RunError, match="graphdistill-student/1.*train it again"):
        load_student(old)
    assert main(export_args) == 2
    assert "graphdistill-student/1" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_a_run_from_before_the_question_mention_features_loads_as_the_model_it_was(
    run_dir: Path, tmp_path: Path
) -> None:
    """A run whose weights lack the zero-started question-mention parameters (trained before they existed)
    loads and predicts exactly what the same weights with those parameters at zero predict; weights missing
    anything else are refused with a message naming the run."""
    from safetensors.torch import load_file, save_file

    from graphdistill.student.predict import OPTIONAL_ZERO_PARAMS, RunError, load_student

    image = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    old = tmp_path / "old-run"
    shutil.copytree(run_dir, old)
    weights = load_file(str(run_dir / "model.safetensors"))
    assert set(OPTIONAL_ZERO_PARAMS) <= set(weights)
    zeroed = {k: (v.zero_() if k in OPTIONAL_ZERO_PARAMS else v) for k, v in weights.items()}
    save_file(
        {k: v for k, v in zeroed.items() if k not in OPTIONAL_ZERO_PARAMS}, str(old / "model.safetensors")
    )
    full = tmp_path / "zeroed-run"
    shutil.copytree(run_dir, full)
    save_file(zeroed, str(full / "model.safetensors"))
    assert load_student(old).predict(image, "what is this?") == load_student(full).predict(
        image, "what is this?"
    )
    save_file({k: v for k, v in weights.items() if k != "tok_emb.weight"}, str(old / "model.safetensors"))
    with pytest.raises(RunError, match=f"{old}.*tok_emb.weight.*train it again"):
        load_student(old)


def test_a_bundle_carries_the_runs_fidelity_figures_not_its_evaluation_rows(
    run_dir: Path, tmp_path: Path
) -> None:
    """An evaluated run's bundle states the fidelity it was exported with (figures, intervals, the rows they
    were measured on: how many, which photos) and none of eval.json's per-row answers or other bundles' timings,
    which grow with the evaluation and would count against the bundle's bytes."""
    from graphdistill.export.bundle import FIDELITY_SUMMARY_KEYS, export_run

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    figures = {"answer_f1": 0.5, "box_map50": 0.75}
    evaluation = {
        "n": 24,
        "photos": 4,
        "split": "test",
        "run": str(run),
        "dataset": "ds",
        "fidelity": figures,
        "fidelity_ci": {"answer_f1": [0.4, 0.6]},
        "ci": {"level": 0.95},
        "rows": [{"id": str(i), "teacher_answer": "x" * 500} for i in range(50)],
        "exported": {"other-bundle": {"ms": 5.0}},
        "cost": {"student_ms": 30.0},
    }
    (run / "eval.json").write_text(json.dumps(evaluation))
    export_run(run, "onnx", tmp_path / "bundle", dataset=run_dir.parent / "ds", n_calibration=2, n_heldout=2)
    carried = _manifest(tmp_path / "bundle")["fidelity"]
    assert carried == {k: evaluation[k] for k in FIDELITY_SUMMARY_KEYS}
    assert (tmp_path / "bundle" / MANIFEST).stat().st_size < len(json.dumps(evaluation["rows"]))


def test_failed_gate_fails_loudly_and_leaves_no_bundle(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from graphdistill.cli import main
    from graphdistill.export import bundle as export

    monkeypatch.setattr(export, "BOX_TOL", -1.0)  # no export can be this exact: the gate must reject it
    out = tmp_path / "bundle"
    rc = main(
        [
            "export",
            str(run_dir),
            "--format",
            "onnx",
            "--out",
            str(out),
            "--calibration",
            "1",
            "--heldout",
            "1",
        ]
    )
    assert rc == 2
    assert "failed the gate" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_export_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from graphdistill.cli import main

    assert main(["export", str(tmp_path / "nope"), "--format", "onnx", "--out", str(tmp_path / "b")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    assert main(["export", str(tmp_path / "run"), "--format", "onnx", "--out", str(tmp_path / "b")]) == 2
    assert "config.json is missing" in capsys.readouterr().err


@pytest.mark.slow
def test_executorch_bundle_float_and_int8(run_dir: Path, onnx_float: Path, tmp_path: Path) -> None:
    from PIL import Image

    from graphdistill.export.bundle import export_run
    from graphdistill.student.predict import load_student

    fl = export_run(run_dir, "executorch", tmp_path / "et", **N)
    assert fl["parity"]["passed"] and fl["parity"]["vs_pytorch"]["answer_tokens_equal"] == 1.0
    q8 = export_run(run_dir, "executorch", tmp_path / "et8", quantize="int8", **N)
    assert q8["parity"]["passed"] and _model_bytes(tmp_path / "et8") < _model_bytes(tmp_path / "et")
    # int8 calibrated encode on every calibration input; the float export calibrated nothing
    assert q8["parity"]["inputs"]["int8_calibration"] == N["n_calibration"]
    assert "int8_calibration" not in fl["parity"]["inputs"]
    # the image goes in NHWC, as XNNPACK's convolutions read it (no transpose inside the program)
    image_input = fl["programs"]["encode"]["inputs"][0]
    assert image_input["dim_order"] == [0, 2, 3, 1] and fl["preprocessing"]["layout"] == "NHWC"
    # every input is read where the runner keeps it: no planned copy of the cache, cross_kv or image per call
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(str(tmp_path / "et" / "model.pte"))
    n_step_inputs = len(fl["programs"]["decode_step"]["inputs"])
    for method, n_inputs in (("encode", 3), ("decode_step", n_step_inputs)):
        meta = program.metadata(method)
        assert [meta.input_tensor_meta(i).is_memory_planned() for i in range(n_inputs)] == [False] * n_inputs
    # the ExecuTorch runner in a process where the student's code cannot be imported (ExecuTorch's Python
    # bindings are linked against libtorch, so torch itself is loaded by the runtime here)
    image, question = _image(run_dir)
    Image.fromarray(image).save(tmp_path / "img.png")
    res = _run_blocked(
        tmp_path, ["graphdistill.student"], "run-bundle", str(tmp_path / "et"), "--image", str(tmp_path / "img.png"),
        "--question", question, "--json",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["answer"] == load_student(run_dir).predict(image, question)["answer"]


# ---- the bundle follows the student's heads (the teacher graph's declared outputs) ------------------------

SCHEMAS = {
    "no-sources": [("answer", "text"), ("objects", "objects")],
    "no-objects": [("answer", "text"), ("sources", "sources")],
    "no-text": [("objects", "objects"), ("sources", "sources")],
    # every head, and a dataflow in which the answer is made from the detections (visual_rag's): no pixels in
    # the text side (StudentConfig.text_pixels)
    "no-pixels": [("answer", "text"), ("objects", "objects"), ("sources", "sources")],
}
NO_PIXELS_FLOW = {
    "detect": {"reads": ["image"], "writes": {"dets": "detections"}},
    "reason": {"reads": ["question", "dets"], "writes": {"answer": "text"}},
    "compose": {"reads": ["image", "dets"], "writes": {"objects": "objects", "sources": "sources"}},
}


@pytest.fixture(scope="module", params=list(SCHEMAS))
def schema_run(request: pytest.FixtureRequest, run_dir: Path) -> tuple[Path, Path]:
    """(run, float ONNX bundle) of a student trained on the synthetic dataset re-declared with SCHEMAS[param]."""
    from graphdistill.export.bundle import export_run

    root = run_dir.parent / f"schema-{request.param}"
    shutil.copytree(run_dir.parent / "ds", root / "ds")
    manifest = json.loads((root / "ds" / "manifest.json").read_text())
    manifest["graph"]["outputs"] = [{"name": n, "kind": k} for n, k in SCHEMAS[request.param]]
    if request.param == "no-pixels":
        manifest["graph"]["dataflow"] = NO_PIXELS_FLOW
    (root / "ds" / "manifest.json").write_text(json.dumps(manifest))
    train_tiny(root / "ds", root / "run")
    export_run(root / "run", "onnx", root / "bundle", **N)
    return root / "run", root / "bundle"


def test_a_partial_schema_exports_only_its_heads_and_passes_parity(schema_run: tuple[Path, Path]) -> None:
    from graphdistill.student.model import StudentConfig
    from graphdistill.student.predict import load_student

    run, bundle = schema_run
    cfg = StudentConfig.from_dict(json.loads((run / "config.json").read_text()))
    assert cfg.text_pixels == (run.parent.name != "schema-no-pixels")
    m = _manifest(bundle)
    assert m["parity"]["passed"] and not m["parity"]["failures"]
    assert m["outputs"] == cfg.outputs and list(m["outputs"]) == list(cfg.outputs)
    heads = [o["name"] for o in m["programs"]["encode"]["outputs"]]
    # the copy path needs something to copy from: objects' class names or the retrieved documents' words
    copy = cfg.has_text and (cfg.has_objects or cfg.has_sources)
    copy_inputs = COPY_INPUTS if cfg.has_sources else COPY_INPUTS[:3]  # copies go on only in documents
    want = ["cross_kv", *(copy_inputs if copy else [])] if cfg.has_text else ["memory"]
    want += OBJECT_OUTPUTS if cfg.has_objects else []
    want += ["source_logits"] if cfg.has_sources else []
    assert heads == want
    vs = m["parity"]["vs_pytorch"]
    assert ("box_max_abs_diff" in vs) == cfg.has_objects and ("mask_iou_min" in vs) == cfg.has_masks
    assert ("source_logits_max_abs_diff" in vs) == cfg.has_sources
    assert ("answer_tokens_equal" in vs) == cfg.has_text
    if cfg.has_text:
        assert set(m["programs"]) == {"encode", "decode_step"} and vs["answer_tokens_equal"] == 1.0
        assert set(m["files"]) == {"encode.onnx", "decode_step.onnx", "tokenizer.json"}
    else:
        assert set(m["programs"]) == {"encode"} and m["kv_cache"] is None
        assert set(m["files"]) == {"encode.onnx", "tokenizer.json"}
    model = load_student(run).model
    first = m["programs"]["encode"]["outputs"][0]["shape"]
    if cfg.has_text:  # the decoder's cross-attention keys/values over the context tokens, fed to every step
        assert first == [cfg.dec_layers, 2, 1, cfg.n_heads, model.n_ctx, cfg.head_dim]
        step = m["programs"]["decode_step"]
        assert step["arrays"]["cross_kv"]["shape"] == first
        assert [i["name"] for i in step["inputs"] if "per_query" in i] == (copy_inputs if copy else [])
        assert ("prev_token" in [i["name"] for i in step["inputs"]]) == (copy and cfg.has_sources)
        assert [i["shape"] for i in step["inputs"] if i["name"].startswith("cross_kv.")] == [first[2:]] * (
            2 * cfg.dec_layers
        )
    else:
        assert first == [1, model.memory_len, cfg.d_model]


def test_a_partial_schema_bundle_returns_exactly_predicts_fields(
    schema_run: tuple[Path, Path], tmp_path: Path
) -> None:
    from PIL import Image

    from graphdistill.student.predict import load_student

    run, bundle = schema_run
    student = load_student(run)
    runner = BundleRunner(bundle, threads=1)
    image, question = _image(run)
    want, got = student.predict(image, question), runner.predict(image, question)
    assert list(got) == list(want) == list(student.config.outputs)
    assert got.get("answer") == want.get("answer") and got.get("sources") == want.get("sources")
    if "objects" in want:
        assert [o["class_id"] for o in got["objects"]] == [o["class_id"] for o in want["objects"]]
        assert all(set(g) == set(w) for g, w in zip(got["objects"], want["objects"], strict=True))
    # the torch-free CLI gives the same fields
    Image.fromarray(image).save(tmp_path / "img.png")
    args = ["run-bundle", str(bundle), "--image", str(tmp_path / "img.png"), "--question", question]
    res = _run_blocked(tmp_path, ["torch", "graphdistill.student"], *args, "--json", "--threads", "1")
    assert res.returncode == 0, res.stderr
    assert list(json.loads(res.stdout)) == list(want)


def test_a_partial_schema_int8_bundle_gates_on_its_own_heads(schema_run: tuple[Path, Path]) -> None:
    from graphdistill.export.bundle import export_run
    from graphdistill.student.predict import load_student

    run, _ = schema_run
    student = load_student(run)
    cfg = student.config
    m = export_run(run, "onnx", run.parent / "bundle-int8", quantize="int8", **N)
    fid = m["parity"]["fidelity_vs_teacher"]
    want = ({"answer_token_f1"} if cfg.has_text else set()) | ({"box_f1"} if cfg.has_objects else set())
    assert m["parity"]["passed"] and set(fid["drop"]) == want
    image, question = _image(run)
    assert list(BundleRunner(run.parent / "bundle-int8").predict(image, question)) == list(cfg.outputs)


def test_int8_for_executorch_quantizes_the_linear_layers_and_keeps_convolutions_float() -> None:
    """The ExecuTorch int8 scheme (see graphdistill.export.quantize): int8 weights and activations into every
    linear layer; convolutions stay float (slower in int8 on the CPUs measured, few bytes)."""
    import torch

    from graphdistill.export.quantize import quantize_pt2e

    class ConvThenLinear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x: Any) -> Any:
            return self.fc(self.conv(x).mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = ConvThenLinear().eval()
    example = (torch.randn(1, 3, 8, 8),)
    graph = quantize_pt2e(model, example, [(torch.randn(1, 3, 8, 8),) for _ in range(8)] + [example])

    def weight_is_dequantized(op: str) -> bool:
        node = next(n for n in graph.graph.nodes if n.op == "call_function" and op in str(n.target))
        return "dequantize" in str(node.args[1].target) if node.args[1].op == "call_function" else False

    assert weight_is_dequantized("linear") and not weight_is_dequantized("conv")
    with torch.no_grad():  # and the int8 graph still computes the float model's function, to int8 precision
        torch.testing.assert_close(graph(*example), model(*example), atol=0.02, rtol=0.05)


def test_int8_keeps_the_named_submodules_float_and_quantizes_the_rest() -> None:
    """Mixed precision by module: with convolutions quantized, ``float_modules`` keeps the named submodule (and
    what is under it) float while everything else is int8."""
    import torch

    from graphdistill.export.quantize import QUANTIZED_WITH_CONVS, quantize_pt2e

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x: Any) -> Any:
            return self.conv(x)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.block = Block()
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x: Any) -> Any:
            return self.fc(self.block(self.stem(x)).mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = Net().eval()
    example = (torch.randn(1, 3, 8, 8),)
    calibration = [(torch.randn(1, 3, 8, 8),) for _ in range(4)]

    def int8_weights(graph: Any) -> list[bool]:  # per conv/linear, in graph order: is its weight dequantized?
        return [
            n.args[1].op == "call_function" and "dequantize" in str(n.args[1].target)
            for n in graph.graph.nodes
            if n.op == "call_function" and ("conv" in str(n.target) or "linear" in str(n.target))
        ]

    every = quantize_pt2e(model, example, calibration, QUANTIZED_WITH_CONVS)
    assert int8_weights(every) == [True, True, True]
    mixed = quantize_pt2e(model, example, calibration, QUANTIZED_WITH_CONVS, float_modules=("block",))
    assert int8_weights(mixed) == [True, False, True]


def test_the_int8_executorch_export_looks_words_up_in_an_int8_table_and_puts_the_float_one_back() -> None:
    import torch

    from graphdistill.export.quantize import Int8Embedding, int8_embedding

    torch.manual_seed(0)
    model = torch.nn.Module()
    model.tok_emb = torch.nn.Embedding(50, 8)
    original = model.tok_emb
    ids = torch.tensor([[1, 7, 49]])
    with int8_embedding(model):
        assert isinstance(model.tok_emb, Int8Embedding) and model.tok_emb.table.dtype == torch.int8
        got = model.tok_emb(ids)
        assert got.dtype == torch.float32 and model.tok_emb.weight.dtype == torch.float32
        # per-row symmetric int8: every value within half a step of its row's scale
        step = original.weight.detach().abs().amax(1, keepdim=True) / 127
        assert bool(((model.tok_emb.weight - original.weight).abs() <= step / 2 + 1e-7).all())
        torch.testing.assert_close(got, model.tok_emb.weight[ids])
        assert not torch.equal(model.tok_emb.weight, original.weight)  # rounded: a real copy
    assert model.tok_emb is original


def test_calibration_rows_spread_over_images_round_robin() -> None:
    from graphdistill.dataset import DatasetRow
    from graphdistill.export.programs import spread_over_images

    rows = [DatasetRow(id=i, image=i[0].upper()) for i in ("a1", "a2", "a3", "b1", "c1", "c2")]
    assert [r.id for r in spread_over_images(rows)] == ["a1", "b1", "c1", "a2", "c2", "a3"]
    assert spread_over_images([]) == []


def test_calibration_and_gate_inputs_come_from_different_images(run_dir: Path) -> None:
    from graphdistill.export.programs import collect_samples, load_run

    loaded = load_run(run_dir)
    calib = collect_samples(loaded, "calibration", 3)
    held = collect_samples(loaded, "heldout", 6, exclude=calib)
    rows = [s.row for s in calib + held]
    assert all(r is not None for r in rows)
    seen = {s.row.image for s in calib if s.row is not None}
    assert len(seen) == 3  # three images, not one image's three questions
    held_rows = [s.row for s in held if s.row is not None]
    assert [r.split for r in held_rows] == ["val", "val", "train", "train", "train", "train"]
    # the synthetic train split has 8 images: the gate's train rows are 4 of the 5 calibration did not see
    assert not {r.image for r in held_rows} & seen


def test_calibration_leaves_train_rows_for_the_gate_when_val_is_short(run_dir: Path) -> None:
    from graphdistill.export.programs import collect_samples, load_run

    loaded = load_run(run_dir)  # the synthetic dataset: 8 train rows, 2 val rows
    calib = collect_samples(loaded, "calibration", 32, leave=6)
    held = collect_samples(loaded, "heldout", 6, exclude=calib)
    assert len(calib) == 4 and len(held) == 6  # 4 train rows left: with the 2 val rows, the 6 asked for
    assert not {s.row.id for s in calib if s.row} & {s.row.id for s in held if s.row}
    # never more than half the split: a dataset without val still calibrates on half its train rows
    assert len(collect_samples(loaded, "calibration", 32, leave=100)) == 4
    assert len(collect_samples(loaded, "calibration", 32)) == 8


def test_a_tta_bundle_fuses_its_views_as_pytorch_does_and_its_gate_checks_every_view(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``export --tta flip,scale``: the manifest says so, the gate runs each held-out input's three views through
    the bundle (against PyTorch's), and the runner answers with the views fused exactly as
    ``StudentPredictor.predict(..., tta=)`` fuses them."""
    from graphdistill.eval.metrics import mask_iou
    from graphdistill.export import bundle as export_bundle
    from graphdistill.student.predict import load_student

    checked: list[int] = []
    run_models = export_bundle.BundleRunner.run_models

    def counting(self: BundleRunner, *args: Any, **kwargs: Any) -> Any:
        checked.append(1)
        return run_models(self, *args, **kwargs)

    monkeypatch.setattr(export_bundle.BundleRunner, "run_models", counting)
    out = tmp_path / "bundle-tta"
    m = export_bundle.export_run(run_dir, "onnx", out, tta="flip,scale", **N)
    monkeypatch.undo()
    assert m["tta"]["augmentations"] == ["flip", "scale"] and _manifest(out)["tta"] == m["tta"]
    gate = m["parity"]
    assert gate is not None and gate["passed"], gate
    assert gate["inputs"]["heldout"] == N["n_heldout"]
    assert len(checked) == gate["inputs"]["calibration"] + 3 * N["n_heldout"]  # each held-out input: 3 views

    student = load_student(run_dir)
    student_encodes: list[int] = []
    model_encode = student.model.encode

    def counted_encode(*a: Any, **k: Any) -> Any:
        student_encodes.append(1)
        return model_encode(*a, **k)

    monkeypatch.setattr(student.model, "encode", counted_encode)
    runner = BundleRunner(out, threads=1)
    encodes: list[int] = []
    run = runner.programs.run

    def spy(program: str, *inputs: np.ndarray) -> list[np.ndarray]:
        encodes.append(program == "encode")
        return run(program, *inputs)

    runner.programs.run = spy  # type: ignore[method-assign]
    n_objects = 0
    for split, i in [("test", 0), ("train", 1)]:
        image, question = _image(run_dir, split, i)
        encodes.clear()
        got = runner.predict(image, question)  # the manifest's views
        assert sum(encodes) == 3
        before = len(student_encodes)
        want = student.predict(image, question, tta="flip,scale")
        assert len(student_encodes) - before == 3  # PyTorch answered the three views too
        assert got["answer"] == want["answer"] and got["sources"] == want["sources"]
        assert [o["class_id"] for o in got["objects"]] == [o["class_id"] for o in want["objects"]]
        for g, w in zip(got["objects"], want["objects"], strict=True):
            np.testing.assert_allclose(g["box"], w["box"], atol=0.5)
            assert g["score"] == pytest.approx(w["score"], abs=1e-4)
            assert mask_iou(g["mask"], w["mask"]) > 0.95
        n_objects += len(want["objects"])
        encodes.clear()
        plain = runner.predict(image, question, tta=())  # the caller may turn it off
        assert sum(encodes) == 1 and plain == BundleRunner(out, threads=1).predict(
            image, question, tta="none"
        )
    assert n_objects > 0


def test_an_adaptive_tta_bundle_answers_its_views_only_when_unsure(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from graphdistill.export.bundle import export_run
    from graphdistill.export.programs import ExportError
    from graphdistill.runner import tta as runner_tta
    from graphdistill.runner.tta import near_floor, near_miss

    with pytest.raises(ExportError, match="needs augmentations"):
        export_run(run_dir, "onnx", tmp_path / "no", tta_below=0.5, **N)
    m = export_run(run_dir, "onnx", tmp_path / "adaptive", tta="flip", tta_below=0.0, **N)
    assert m["tta"]["below"] == 0.0 and m["parity"] is not None and m["parity"]["passed"]
    runner = BundleRunner(tmp_path / "adaptive", threads=1)
    run = runner.programs.run
    encodes: list[bool] = []

    def spy(program: str, *inputs: np.ndarray) -> list[np.ndarray]:
        encodes.append(program == "encode")
        return run(program, *inputs)

    runner.programs.run = spy  # type: ignore[method-assign]
    # the bundle says from what score a dropped candidate is a near miss: the detector's threshold less
    # NEAR_LOGIT in logits (0.168 at 0.25)
    assert runner.near_floor == round(near_floor(0.25), 4) == 0.1682
    for split, i in [("test", 0), ("train", 1), ("val", 0)]:
        image, question = _image(run_dir, split, i)
        found, raw = runner._predict_raw(image, question)
        near = near_miss(raw.outputs["scores"], raw.outputs["keep"]) >= runner.near_floor
        encodes.clear()
        runner.predict(image, question)
        # no score is under 0: the views are answered only for a photo where the student found nothing, or
        # dropped a candidate just under its threshold
        assert sum(encodes) == (1 if found["objects"] and not near else 2)
        encodes.clear()
        runner.predict(image, question, tta_below=1.0)  # every score is under 1: always the views
        assert sum(encodes) == 2
        for best, views in ((0.0, not found["objects"]), (0.9, True)):  # the near miss alone decides
            monkeypatch.setattr(runner_tta, "near_miss", lambda scores, keep, _b=best: _b)
            encodes.clear()
            runner.predict(image, question)
            assert sum(encodes) == (2 if views else 1)
        monkeypatch.undo()

    # the PyTorch student reads its own near misses the same way
    from graphdistill.student import predict as student_predict

    student = student_predict.load_student(run_dir)
    encode = student.model.encode
    calls: list[int] = []

    def counted(*a: Any, **k: Any) -> Any:
        calls.append(1)
        return encode(*a, **k)

    monkeypatch.setattr(student.model, "encode", counted)
    image, question = _image(run_dir, "test", 0)
    found = student.predict(image, question)["objects"]
    for best, views in ((0.0, not found), (0.9, True)):
        monkeypatch.setattr(runner_tta, "near_miss", lambda scores, keep, _b=best: _b)
        calls.clear()
        student.predict(image, question, tta="flip", tta_below=0.0)
        assert len(calls) == (2 if views else 1)


def test_the_int8_gate_scores_each_input_on_its_views_fused_as_the_runner_fuses_them(run_dir: Path) -> None:
    """``parity.fidelity(..., n_views)``: samples come in groups of one input's views; identical views fuse to
    the input itself, other views' objects join it, and under the adaptive rule a sure answer is scored alone.
    The targets are the student's own answers, so the one-view figures are 1."""
    from dataclasses import replace

    from graphdistill.export.parity import fidelity
    from graphdistill.export.programs import collect_samples, load_run, programs_for, torch_reference
    from graphdistill.runner.bundle import decode_objects
    from graphdistill.runner.preprocess import canvas_size
    from graphdistill.runner.tta import View
    from graphdistill.trace import ObjectOut

    loaded = load_run(run_dir)
    programs, _ = programs_for(loaded)
    samples = []
    for s in collect_samples(loaded, "heldout", 3):
        raw = torch_reference(programs, s, loaded)
        objs = decode_objects(
            raw.outputs,
            s.letterbox,
            dict(loaded.thresholds),
            loaded.class_names,
            canvas_size(loaded.preprocessing),
        )
        assert s.row is not None
        row = replace(
            s.row,
            answer=loaded.tokenizer.decode(raw.answer_ids),
            objects=tuple(ObjectOut.model_validate(o) for o in objs),
        )
        samples.append((replace(s, row=row), raw))
    assert all(s.row is not None and s.row.objects for s, _ in samples)  # objects to fuse
    alone = [s for s, _ in samples]
    raws = [r for _, r in samples]
    plain = fidelity(loaded, alone, raws)
    assert plain == {"answer_token_f1": 1.0, "box_f1": 1.0, "n": 3}
    twice = [x for s in alone for x in (s, replace(s, view=View()))]
    assert fidelity(loaded, twice, [x for r in raws for x in (r, r)], n_views=2) == plain
    # each input's second view saw its objects small in a corner: they join the input's own as objects of
    # their own (two views: the union), which the teacher does not have
    corner = [
        replace(r, outputs={**r.outputs, "boxes": np.full_like(r.outputs["boxes"], 0.15)}) for r in raws
    ]
    shifted = [x for r, c in zip(raws, corner, strict=True) for x in (r, c)]
    mixed = fidelity(loaded, twice, shifted, n_views=2)
    assert mixed["n"] == 3 and mixed["answer_token_f1"] == 1.0 and mixed["box_f1"] < 1.0
    assert fidelity(loaded, twice, shifted, n_views=2, below=0.0) == plain  # every answer sure: no views
