"""Recurrent depth (issue 21, part 2): the joint encoder's last layer is one weight-shared block the student may
iterate r = 1..max_depth times. r = 1 is today's student exactly; training draws r per batch; the exported
``deepen`` program, run r - 1 times after ``encode`` by the runner, matches PyTorch at every r."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from _fixtures import EXPORT_WARNINGS, TINY_RUN, tiny_train_config  # noqa: E402
from graphdistill.student import phone_ops  # noqa: E402
from graphdistill.student.model import Student, StudentConfig  # noqa: E402
from test_phone_ops import CFG, _inputs  # noqa: E402

pytestmark = [pytest.mark.filterwarnings(w) for w in EXPORT_WARNINGS]

R = 3


def _pair() -> tuple[Student, Student]:
    """The same weights as a student without recurrence and as one trained for depths 1..R."""
    torch.manual_seed(0)
    plain = Student(StudentConfig(**CFG)).eval()
    deep = Student(StudentConfig(**{**CFG, "max_depth": R})).eval()
    deep.load_state_dict(plain.state_dict())
    with torch.no_grad():  # non-trivial norms and a block that moves the tokens: depth must show
        for mod in plain.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
        deep.load_state_dict(plain.state_dict())
    return plain, deep


def test_depth_one_is_todays_student_exactly_and_deepen_goes_on_from_its_state() -> None:
    plain, deep = _pair()
    img, ids, mask = _inputs()
    with torch.no_grad():
        today = plain.encode(img, ids, mask != 0)
        one = deep.encode(img, ids, mask != 0, depth=1)
        for k, v in today.items():
            assert torch.equal(v, one[k]), k  # bit for bit, every output
        kept = deep.encode(img, ids, mask != 0, keep_state=True)
        assert torch.equal(kept["memory"], today["memory"])
        assert kept["state"].shape == (2, deep.n_ctx + ids.shape[1], CFG["d_model"])
        state, memories = kept["state"], [kept["memory"]]
        for _ in range(R - 1):  # the runner's loop: deepen r - 1 times
            state, memory = deep.deepen(state, mask != 0)
            memories.append(memory)
        for r in range(2, R + 1):
            assert torch.equal(memories[r - 1], deep.encode(img, ids, mask != 0, depth=r)["memory"])
        with phone_ops.phone_friendly(decompose_norms=True):  # the formulation the bundle is traced in
            for r in range(1, R + 1):
                phone = deep.encode(img, ids, mask != 0, depth=r)["memory"]
                torch.testing.assert_close(phone, memories[r - 1], atol=1e-5, rtol=1e-5)


def test_outputs_change_with_depth_and_only_what_the_encoder_makes() -> None:
    _, deep = _pair()
    img, ids, mask = _inputs()
    with torch.no_grad():
        outs = [deep.encode(img, ids, mask != 0, depth=r) for r in range(1, R + 1)]
        answers = [deep.generate(img, ids, mask != 0, depth=r) for r in (1, R)]
    for a, b in itertools.pairwise(outs):
        assert (a["memory"] - b["memory"]).abs().max() > 1e-3  # each iteration moves the memory
        assert not torch.equal(a["ptr_keys"], b["ptr_keys"])  # the object slots' keys read it
        # the detector, the masks and the retrieval come before the encoder: depth does not touch them
        for k in ("boxes", "scores", "classes", "keep", "mask_logits", "source_logits"):
            assert torch.equal(a[k], b[k]), k
    logits = [deep.decode_full(answers[0], o["memory"], deep.pointer_of(o)) for o in (outs[0], outs[-1])]
    assert (logits[0] - logits[1]).abs().max() > 1e-3


def test_a_depth_outside_the_trained_range_is_refused_naming_it() -> None:
    plain, deep = _pair()
    img, ids, mask = _inputs()
    with pytest.raises(ValueError, match=rf"depth {R + 1}: .*depths 1..{R}"):
        deep.encode(img, ids, mask != 0, depth=R + 1)
    with pytest.raises(ValueError, match="depth 2: .*depths 1..1"):
        plain.encode(img, ids, mask != 0, depth=2)
    with pytest.raises(ValueError, match="depth 0"):
        deep.encode(img, ids, mask != 0, depth=0)
    with pytest.raises(ValueError, match="max_depth must be between 1 and"):
        StudentConfig(**{**CFG, "max_depth": 0})


def test_training_draws_the_depth_per_batch_over_every_trained_depth(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from graphdistill.dataset import make_synthetic_dataset
    from graphdistill.student.train import TrainRecipe

    make_synthetic_dataset(tmp_path / "ds", n=12, seed=0, size=64)
    seen: dict[int, list[int]] = {}
    for max_depth in (1, R):
        cfg = tiny_train_config(
            tmp_path / "ds",
            tmp_path / f"run{max_depth}",
            epochs=6,
            batch_size=4,
            overrides={**TINY_RUN, "max_depth": max_depth},
        )
        trainer = TrainRecipe(cfg)
        trainer.setup()
        forward = trainer.model.forward
        depths: list[int] = seen.setdefault(max_depth, [])

        def spy(
            *a: Any,
            _depths: list[int] = depths,
            _forward: Any = forward,
            _model: Any = trainer.model,
            **k: Any,
        ) -> Any:
            if _model.training:
                _depths.append(k["depth"])
            return _forward(*a, **k)

        monkeypatch.setattr(trainer.model, "forward", spy)
        trainer.train()
        trainer.cleanup()
    assert seen[1] and set(seen[1]) == {1}
    assert set(seen[R]) == set(range(1, R + 1))  # every depth the app may ask for is trained


@pytest.fixture(scope="module")
def deep_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run trained for depths 1..R (one short epoch on the synthetic dataset)."""
    from graphdistill.dataset import make_synthetic_dataset
    from graphdistill.student.train import train

    root = tmp_path_factory.mktemp("depth")
    make_synthetic_dataset(root / "ds", n=12, seed=0, size=64)
    train(tiny_train_config(root / "ds", root / "run", overrides={**TINY_RUN, "max_depth": R}))
    return root / "run"


def _check_bundle_at_every_depth(run: Path, bundle: Path, manifest: Any, tol: float) -> None:
    """The gate ran every depth and passed; the runner's cross-attention keys/values at depth r are the
    PyTorch student's at depth r (and differ between depths); its answers are PyTorch's at every r."""
    from graphdistill.dataset import open_dataset
    from graphdistill.export.programs import load_run, make_sample
    from graphdistill.runner import BundleRunner
    from graphdistill.student.predict import load_student

    gate = manifest["parity"]
    assert gate["passed"], gate["failures"]
    assert sorted(gate["by_depth"]) == [str(r) for r in range(2, R + 1)]
    assert all(g["passed"] for g in gate["by_depth"].values())
    assert manifest["depth"]["max"] == R and manifest["depth"]["default"] == 2
    assert json.loads((bundle / "manifest.json").read_text())["depth"] == manifest["depth"]
    assert [o["name"] for o in manifest["programs"]["deepen"]["outputs"]][:2] == ["state", "cross_kv"]

    loaded = load_run(run)
    ds = open_dataset(run.parent / "ds")
    runner = BundleRunner(bundle, threads=1)
    student = load_student(run)
    calls: list[str] = []
    run_program = runner.programs.run

    def spy(program: str, *inputs: np.ndarray) -> list[np.ndarray]:
        calls.append(program)
        return run_program(program, *inputs)

    runner.programs.run = spy  # type: ignore[method-assign]
    nhwc = runner.spec["layout"] == "NHWC"
    for row in ds.rows("test")[:2]:
        s = make_sample(loaded, ds.image(row), row.question)
        x = s.image_input.transpose(0, 2, 3, 1) if nhwc else s.image_input
        cross = []
        for r in range(1, R + 1):
            calls.clear()
            got = runner.run_models(np.ascontiguousarray(x), row.question, depth=r)
            assert calls.count("deepen") == r - 1 and calls[0] == "encode"
            with torch.no_grad():
                enc = loaded.model.encode(*s.torch_inputs()[:2], s.torch_inputs()[2] != 0, depth=r)
                want = loaded.model.cross_kv(enc["memory"])[0].numpy()  # Raw drops the first dim: layer 0
            np.testing.assert_allclose(got.outputs["cross_kv"], want, atol=tol, rtol=0)
            cross.append(got.outputs["cross_kv"])
            assert (
                runner.predict(ds.image(row), row.question, depth=r)["answer"]
                == student.predict(ds.image(row), row.question, depth=r)["answer"]
            )
        assert np.abs(cross[0] - cross[-1]).max() > 10 * tol
    calls.clear()
    runner.predict(ds.image(ds.rows("test")[0]), "what is it?")  # the manifest's default: depth 2
    assert calls.count("deepen") == 1


def test_an_onnx_bundle_takes_every_depth_and_matches_pytorch_at_each(deep_run: Path, tmp_path: Path) -> None:
    from graphdistill.export.bundle import ExportError, export_run
    from graphdistill.runner import BundleError, BundleRunner

    out = tmp_path / "onnx"
    m = export_run(deep_run, "onnx", out, n_calibration=3, n_heldout=3, depth=2)
    _check_bundle_at_every_depth(deep_run, out, m, tol=1e-4)
    runner = BundleRunner(out)
    with pytest.raises(BundleError, match=rf"depth {R + 1}: this bundle takes depths 1..{R}"):
        runner.predict(np.zeros((32, 32, 3), np.uint8), "what?", depth=R + 1)
    with pytest.raises(ExportError, match=rf"depth {R + 1}: .*depths 1..{R}"):
        export_run(deep_run, "onnx", tmp_path / "no", depth=R + 1)
    assert not (tmp_path / "no").exists()

    # eval at a depth: the student and the bundle both answer at it, and the result says which
    from graphdistill.eval.evaluate import EvalError, evaluate_run
    from graphdistill.student.predict import load_student

    student = load_student(deep_run)
    asked: list[int] = []
    predict = student.predict

    def spy(*a: Any, **k: Any) -> Any:
        asked.append(k.get("depth", 1))
        return predict(*a, **k)

    student.predict = spy  # type: ignore[method-assign]
    kw: dict[str, Any] = dict(
        split="test", teacher_timing=False, teacher_n=1, student_repeats=1, semantic=False, ci_resamples=0
    )
    res = evaluate_run(
        deep_run, deep_run.parent / "ds", bundles=[out], bundle_threads=(1,), depth=R, predictor=student, **kw
    )
    assert res["depth"] == R and asked and set(asked) == {R}
    parity = res["exported"][str(out)]["parity_vs_student"]
    assert parity["answer_exact"] == 1.0  # the bundle at depth R answers as the student at depth R
    with pytest.raises(EvalError, match=rf"depth {R + 1}: .*depths 1..{R}"):
        evaluate_run(deep_run, deep_run.parent / "ds", depth=R + 1, **kw)


@pytest.mark.slow
def test_an_executorch_bundle_takes_every_depth_and_matches_pytorch_at_each(
    deep_run: Path, tmp_path: Path
) -> None:
    from graphdistill.export.bundle import export_run

    out = tmp_path / "pte"
    m = export_run(deep_run, "executorch", out, n_calibration=3, n_heldout=3, depth=2)
    assert sorted(m["files"]) == ["model.pte", "tokenizer.json"]  # deepen is a third method of the program
    _check_bundle_at_every_depth(deep_run, out, m, tol=1e-3)


def test_a_student_without_recurrence_exports_no_deepen_and_no_depth(tmp_path: Path) -> None:
    from graphdistill.dataset import make_synthetic_dataset
    from graphdistill.export.bundle import export_run
    from graphdistill.runner import BundleError, BundleRunner
    from graphdistill.student.train import train

    make_synthetic_dataset(tmp_path / "ds", n=12, seed=0, size=64)
    train(tiny_train_config(tmp_path / "ds", tmp_path / "run", overrides=dict(TINY_RUN)))
    m = export_run(tmp_path / "run", "onnx", tmp_path / "b", n_calibration=3, n_heldout=3)
    assert "deepen" not in m["programs"] and "depth" not in m and "by_depth" not in m["parity"]
    assert "state" not in [o["name"] for o in m["programs"]["encode"]["outputs"]]
    runner = BundleRunner(tmp_path / "b")
    assert runner.predict(np.zeros((32, 32, 3), np.uint8), "what?", depth=1)
    with pytest.raises(BundleError, match="depth 2: this bundle takes depths 1..1"):
        runner.predict(np.zeros((32, 32, 3), np.uint8), "what?", depth=2)


def test_predict_and_run_bundle_take_depth_and_refuse_a_bad_one(
    deep_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    from graphdistill.cli import main

    photo = tmp_path / "p.png"
    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(photo)
    base = ["predict", str(deep_run), "--image", str(photo), "--question", "what is it?", "--json"]
    assert main([*base, "--depth", str(R)]) == 0
    assert "answer" in json.loads(capsys.readouterr().out)
    for bad, why in (("0", "must be at least 1"), (str(R + 1), f"depths 1..{R}")):
        assert main([*base, "--depth", bad]) == 2
        assert why in capsys.readouterr().err
