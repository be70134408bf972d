"""Training the student for real on a synthetic dataset: it overfits, reloads identically, resumes exactly,
trains a user-supplied module, and the train/predict commands work end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("tokenizers")

from torch import nn  # noqa: E402

from _fixtures import TINY_STUDENT_96  # noqa: E402
from graphdistill.student.model import StudentConfig  # noqa: E402
from graphdistill.student.train import TrainConfig, TrainRecipe, train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from graphdistill.dataset import make_synthetic_dataset

    root = tmp_path_factory.mktemp("student") / "ds"
    make_synthetic_dataset(root, n=4, seed=3, fractions=(1, 0, 0))
    return root


def _cfg(dataset: Path, out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        dataset=str(dataset),
        out=str(out),
        epochs=2,
        batch_size=4,
        lr=5e-3,
        warmup_steps=5,
        device="cpu",
        seed=0,
        vocab_size=400,
        overrides=dict(TINY_STUDENT_96),  # a small, fast student (the presets are for real data)
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def overfit_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    run = tmp_path_factory.mktemp("student") / "run"
    torch.manual_seed(0)
    metrics = train(_cfg(dataset, run, epochs=120, val_every=120))
    return run, metrics


@pytest.mark.slow
def test_tiny_student_overfits_a_handful_of_examples(
    overfit_run: tuple[Path, dict[str, Any]], dataset: Path
) -> None:
    from graphdistill.dataset import open_dataset
    from graphdistill.eval.metrics import box_iou
    from graphdistill.student.predict import load_student
    from graphdistill.trace import ObjectOut

    run, metrics = overfit_run
    hist = metrics["history"]
    # the split the per-epoch fidelity was measured on is named (train when there are no val rows)
    assert hist[-1]["val_split"] == ("val" if open_dataset(dataset).splits.get("val") else "train")
    first, last = hist[0]["train_loss"], hist[-1]["train_loss"]
    for name, value in last.items():
        assert np.isfinite(value), name
    for name in ("answer_ce", "det_cls", "det_box", "det_dfl", "mask_bce", "sources", "total"):
        assert last[name] < 0.5 * first[name], (name, first[name], last[name])
    assert "kd_cls" not in last  # a trunk from scratch: no detector to take per-cell targets from
    val = metrics["val"]  # the evaluation's own metrics, on what predict returns
    assert val["answer_exact"] == 1.0
    assert val["box_map50"] > 0.9 and val["mask_miou"] > 0.6 and val["sources_recall"] == 1.0

    pred = load_student(run)
    ds = open_dataset(dataset)
    for row in ds.rows("train"):
        out = pred.predict(ds.image(row), row.question)
        assert set(out) == {"answer", "objects", "sources"}
        assert out["answer"] == row.answer  # token for token
        assert sorted(out["sources"]) == sorted(row.sources)
        objs = [ObjectOut.model_validate(o) for o in out["objects"]]
        assert sorted(o.label for o in objs) == sorted(o.label for o in row.objects)
        for teacher in row.objects:
            best = max(
                (o for o in objs if o.label == teacher.label), key=lambda o: box_iou([o.box], [teacher.box])
            )
            iou = float(box_iou([best.box], [teacher.box])[0, 0])
            assert iou > 0.6, (teacher.label, iou)
            assert best.mask is not None and best.mask.size == [row.image_height, row.image_width]
            pm, tm = best.mask.decode(), teacher.mask.decode()  # type: ignore[union-attr]
            assert (pm & tm).sum() / max((pm | tm).sum(), 1) > 0.5


@pytest.mark.slow
def test_run_folder_is_complete_and_reloads_to_identical_outputs(
    overfit_run: tuple[Path, dict[str, Any]],
) -> None:
    from safetensors.torch import load_model

    from graphdistill.student.model import Student

    run, _ = overfit_run
    for name in ("model.safetensors", "config.json", "tokenizer.json", "meta.json", "metrics.json"):
        assert (run / name).is_file(), name
    from graphdistill.student.loader import MEAN
    from graphdistill.student.predict import STUDENT_FORMAT

    meta = json.loads((run / "meta.json").read_text())
    assert meta["format"] == STUDENT_FORMAT
    assert meta["class_names"] == ["circle", "square", "triangle"]
    assert meta["graph_id"]["name"] == "synthetic_shapes"
    side = TINY_STUDENT_96["image_size"]
    assert meta["preprocessing"]["size"] == [side, side] and meta["preprocessing"]["mean"] == list(MEAN)
    assert meta["started_from"] is None  # the synthetic graph's nodes offer nothing: a trunk from scratch
    cfg = StudentConfig.from_dict(json.loads((run / "config.json").read_text()))
    assert cfg.trunk == "timm" and cfg.class_token_ids and len(cfg.class_token_ids) == 3
    a, b = Student(cfg).eval(), Student(cfg).eval()
    load_model(a, str(run / "model.safetensors"))
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    b.load_state_dict(ck["model"])
    assert ck["epoch"] == 120
    img = torch.randn(1, 3, side, side)
    q = torch.randint(4, 50, (1, cfg.max_question_len))
    qm = torch.ones_like(q, dtype=torch.bool)
    ans = torch.randint(4, 50, (1, 5))
    with torch.no_grad():
        oa, ob = a(img, q, qm, ans), b(img, q, qm, ans)
    for k in oa:
        assert torch.equal(oa[k], ob[k]), k


@pytest.mark.slow
def test_resume_after_an_interrupted_run_matches_a_straight_run(dataset: Path, tmp_path: Path) -> None:
    straight = train(_cfg(dataset, tmp_path / "straight", epochs=2))

    def kill_after_first_epoch(record: dict[str, Any]) -> None:
        raise KeyboardInterrupt  # as if the process were killed once epoch 1's checkpoint is on disk

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(dataset, tmp_path / "resumed", epochs=2), on_epoch=kill_after_first_epoch)
    # the killed run is already usable: predict (and eval) load its epoch-1 model
    from graphdistill.student.predict import load_student

    killed = load_student(tmp_path / "resumed")
    ck1 = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=False)
    assert ck1["epoch"] == 1 and json.loads((tmp_path / "resumed" / "meta.json").read_text())["epochs"] == 1
    for k, v in killed.model.state_dict().items():
        assert torch.equal(v, ck1["model"][k]), k
    out = killed.predict(*_photo(dataset))
    assert set(out) == {"answer", "objects", "sources"} and isinstance(out["answer"], str)
    assert not list((tmp_path / "resumed").rglob("*.tmp-*")), "no temp file is left behind"
    recipe = TrainRecipe(_cfg(dataset, tmp_path / "resumed", epochs=2, resume=True))
    recipe.setup()
    assert recipe.epoch == 1 and recipe.step == 1
    assert recipe.optimizer.state_dict()["state"], "optimizer state must come back"
    recipe.train()
    resumed = recipe.save()
    assert resumed["epochs"] == 2
    sa = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=False)["model"]
    sb = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=False)["model"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k)
    assert resumed["final_train_loss"]["total"] == pytest.approx(
        straight["final_train_loss"]["total"], rel=1e-5
    )


class UserStudent(nn.Module):
    """A user-supplied student: a conv + GRU, no detection heads; trains through the same recipe."""

    def __init__(self, config: StudentConfig) -> None:
        super().__init__()
        self.config = config
        d = 32
        self.conv = nn.Sequential(nn.Conv2d(3, d, 8, stride=8), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.emb = nn.Embedding(config.vocab_size, d)
        self.gru = nn.GRU(d, d, batch_first=True)
        self.out = nn.Linear(d, config.vocab_size)
        self.sources = nn.Linear(2 * d, config.num_sources)

    def forward(
        self,
        image: torch.Tensor,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
        answer_in: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        v = self.conv(image).flatten(1)
        qv = (self.emb(question_ids) * question_mask[..., None]).sum(1) / question_mask.sum(1, keepdim=True)
        h, _ = self.gru(self.emb(answer_in), (v + qv)[None])
        return {"answer_logits": self.out(h), "source_logits": self.sources(torch.cat([v, qv], -1))}


@pytest.mark.slow
def test_a_user_supplied_module_trains(dataset: Path, tmp_path: Path) -> None:
    from graphdistill.dataset import open_dataset
    from graphdistill.student.model import StudentProtocol
    from graphdistill.student.predict import has_fast_path, load_student

    metrics = train(_cfg(dataset, tmp_path / "user", epochs=40, lr=1e-2), model_factory=UserStudent)
    hist = metrics["history"]
    assert set(hist[-1]["train_loss"]) >= {"answer_ce", "sources", "total"}
    assert "det_cls" not in hist[-1]["train_loss"]  # no detection outputs -> no detection losses
    assert hist[-1]["train_loss"]["answer_ce"] < 0.7 * hist[0]["train_loss"]["answer_ce"]
    assert isinstance(UserStudent(StudentConfig(vocab_size=10)), StudentProtocol)
    meta = json.loads((tmp_path / "user" / "meta.json").read_text())
    assert meta["model_class"].endswith("UserStudent")

    # it predicts too, through forward() alone (no encode/heads/generate), in the graph's output shape
    pred = load_student(tmp_path / "user")
    assert isinstance(pred.model, UserStudent) and not has_fast_path(pred.model)
    ds = open_dataset(dataset)
    assert metrics["val"]["answer_exact"] == 1.0  # train fit, decoded as predict decodes
    for row in ds.rows("train"):
        out = pred.predict(ds.image(row), row.question)
        assert list(out) == ["answer", "objects", "sources"]
        assert out["answer"] == row.answer  # token for token, decoded greedily through forward()
        assert sorted(out["sources"]) == sorted(row.sources)
        assert out["objects"] == []  # the module has no detection head


@pytest.mark.slow
def test_a_module_without_the_protocol_fails_clearly_at_train_and_at_load(
    dataset: Path, tmp_path: Path
) -> None:
    from graphdistill.student.predict import RunError, load_student

    class NoConfig(nn.Module):
        def __init__(self, config: StudentConfig) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

    with pytest.raises(TypeError, match="NoConfig: needs a `config` attribute"):
        train(_cfg(dataset, tmp_path / "bad", epochs=1), model_factory=NoConfig)

    run = tmp_path / "run"
    train(_cfg(dataset, run, epochs=1))
    meta = json.loads((run / "meta.json").read_text())
    (run / "meta.json").write_text(json.dumps({**meta, "model_class": "nowhere_pkg.mod.Mine"}))
    with pytest.raises(RunError, match=r"model class nowhere_pkg\.mod\.Mine cannot be imported"):
        load_student(run)
    (run / "meta.json").write_text(json.dumps({**meta, "model_class": f"{__name__}.NotAStudent"}))
    with pytest.raises(RunError, match="NotAStudent: needs a `config` attribute"):
        load_student(run)


class NotAStudent(nn.Module):
    def __init__(self, config: StudentConfig) -> None:
        super().__init__()


@pytest.mark.slow
def test_train_and_predict_commands_end_to_end(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from graphdistill.cli import main
    from graphdistill.dataset import open_dataset

    run = tmp_path / "cli-run"
    rc = main(
        [
            "train",
            str(dataset),
            "--out",
            str(run),
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--image-size",
            "96",
            "--json",
        ]
    )
    assert rc == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["epochs"] == 1 and np.isfinite(metrics["final_train_loss"]["total"])
    ds = open_dataset(dataset)
    row = ds.rows("train")[0]
    from PIL import Image

    img_path = tmp_path / "photo.png"
    Image.fromarray(ds.image(row)).save(img_path)
    rc = main(["predict", str(run), "--image", str(img_path), "--question", row.question, "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"answer", "objects", "sources"} and isinstance(out["answer"], str)

    assert main(["predict", str(tmp_path / "nope"), "--image", str(img_path), "--question", "q"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing-ds"), "--out", str(run), "--epochs", "1"]) == 2
    assert "missing-ds" in capsys.readouterr().err


@pytest.mark.slow
def test_max_minutes_stops_training_and_still_saves(dataset: Path, tmp_path: Path) -> None:
    metrics = train(_cfg(dataset, tmp_path / "timed", epochs=None, max_minutes=1e-4))
    assert metrics["epochs"] == 1 and metrics["steps"] == 1
    assert (tmp_path / "timed" / "model.safetensors").is_file()
    assert (tmp_path / "timed" / "checkpoints" / "last.pt").is_file()


# ---- heads follow the dataset's graph schema -------------------------------------------------------------


def _with_outputs(dataset: Path, dest: Path, outputs: list[tuple[str, str]]) -> Path:
    """A copy of ``dataset`` whose manifest declares a graph with these outputs (field name, kind)."""
    import shutil

    shutil.copytree(dataset, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["graph"]["outputs"] = [{"name": n, "kind": k} for n, k in outputs]
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def _photo(dataset: Path) -> tuple[np.ndarray, str]:
    from graphdistill.dataset import open_dataset

    ds = open_dataset(dataset)
    row = ds.rows("train")[0]
    return ds.image(row), row.question


@pytest.mark.slow
def test_a_text_only_graph_trains_a_student_without_object_or_source_heads(
    dataset: Path, tmp_path: Path
) -> None:
    from graphdistill.student.predict import load_student

    ds = _with_outputs(dataset, tmp_path / "ds", [("reply", "text")])
    metrics = train(_cfg(ds, tmp_path / "run", epochs=3))
    losses = metrics["history"][-1]["train_loss"]
    assert set(losses) - {"answer_kl"} == {"answer_ce", "total"} and np.isfinite(losses["total"])
    cfg = StudentConfig.from_dict(json.loads((tmp_path / "run" / "config.json").read_text()))
    assert cfg.outputs == {"reply": "text"}
    pred = load_student(tmp_path / "run")
    names = list(pred.model.state_dict())
    assert not [k for k in names if k.startswith(("proto.", "coef.", "source_head", "cls_emb", "ptr_"))]
    out = pred.predict(*_photo(ds))
    assert set(out) == {"reply"} and isinstance(out["reply"], str)


@pytest.mark.slow
def test_a_text_and_sources_graph_trains_and_predicts_only_those_fields(
    dataset: Path, tmp_path: Path
) -> None:
    from graphdistill.student.predict import load_student

    ds = _with_outputs(dataset, tmp_path / "ds", [("answer", "text"), ("sources", "sources")])
    metrics = train(_cfg(ds, tmp_path / "run", epochs=3))
    losses = metrics["history"][-1]["train_loss"]
    assert set(losses) - {"answer_kl"} == {"answer_ce", "sources", "total"}
    assert "sources_recall" in metrics["val"] and "box_map50" not in metrics["val"]
    student = load_student(tmp_path / "run")
    out = student.predict(*_photo(ds))
    assert set(out) == {"answer", "sources"}
    k = student.config.sources_k  # the retriever's k, read from the training rows
    assert len(out["sources"]) == k and set(out["sources"]) <= {"doc-circle", "doc-square", "doc-triangle"}
    every = student.predict(*_photo(ds), sources_k=3)["sources"]  # asked for all three: every KB doc, ranked
    assert sorted(every) == ["doc-circle", "doc-square", "doc-triangle"] and every[:k] == out["sources"]


@pytest.mark.slow
def test_an_embedding_output_is_distilled_with_a_falling_cosine_loss(dataset: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from graphdistill.student.predict import load_student

    ds = _with_outputs(dataset, tmp_path / "ds", [("answer", "text"), ("image_embedding", "embedding")])
    table = pq.read_table(ds / "train.parquet")
    rng = np.random.default_rng(0)
    targets = [rng.normal(size=8).tolist() for _ in range(table.num_rows)]
    column = [json.dumps({"image_embedding": t}) for t in targets]
    if "embeddings" in table.column_names:  # newer writers always write the column (empty per row)
        table = table.drop_columns(["embeddings"])
    pq.write_table(table.append_column("embeddings", pa.array(column, pa.string())), ds / "train.parquet")

    torch.manual_seed(0)
    metrics = train(_cfg(ds, tmp_path / "run", epochs=40, val_every=40))
    hist = metrics["history"]
    first, last = hist[0]["train_loss"], hist[-1]["train_loss"]
    assert set(last) - {"answer_kl"} == {"answer_ce", "embedding:image_embedding", "total"}
    assert last["embedding:image_embedding"] < 0.5 * first["embedding:image_embedding"], (first, last)
    assert metrics["val"]["embedding:image_embedding_cosine"] > 0.5
    cfg = StudentConfig.from_dict(json.loads((tmp_path / "run" / "config.json").read_text()))
    assert cfg.embedding_dims == {"image_embedding": 8}
    out = load_student(tmp_path / "run").predict(*_photo(ds))
    assert set(out) == {"answer", "image_embedding"} and len(out["image_embedding"]) == 8


# ---- loss weights ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_loss_weights_by_name_change_the_total_and_a_misspelt_name_errors(
    dataset: Path, tmp_path: Path
) -> None:
    from graphdistill.student.losses import LossWeights

    default = train(_cfg(dataset, tmp_path / "default", epochs=1))["final_train_loss"]
    no_box = train(_cfg(dataset, tmp_path / "nobox", epochs=1, loss_weights={"det_box": 0, "det_cls": 3}))
    losses = no_box["final_train_loss"]
    for name in default:  # one step from the same seeded model: each loss is the same, only the sum moves
        if name != "total":
            assert losses[name] == pytest.approx(default[name], rel=1e-5), name
    w = LossWeights()
    assert losses["det_box"] > 0.01
    assert default["total"] - losses["total"] == pytest.approx(
        w.det_box * default["det_box"] + (w.det_cls - 3) * default["det_cls"], rel=1e-4
    )
    assert json.loads((tmp_path / "nobox" / "meta.json").read_text())["train_config"]["loss_weights"] == {
        "det_box": 0,
        "det_cls": 3,
    }

    with pytest.raises(ValueError, match="unknown loss weight 'box_l1'; known: answer_ce, .*det_box"):
        train(_cfg(dataset, tmp_path / "typo", epochs=1, loss_weights={"box_l1": 0}))
    assert not (tmp_path / "typo").exists(), "a misspelt name fails before any work"
    with pytest.raises(ValueError, match="no embedding output 'clip'"):
        train(_cfg(dataset, tmp_path / "emb", epochs=1, loss_weights={"embedding:clip": 1}))


@pytest.mark.slow
def test_train_command_takes_loss_weights_and_names_bad_ones(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from graphdistill.cli import main

    base = ["train", str(dataset), "--out", str(tmp_path / "run"), "--epochs", "1", "--image-size", "96"]
    assert main([*base, "--loss-weight", "box_l1=0"]) == 2
    err = capsys.readouterr().err
    assert "box_l1" in err and "det_box" in err and "kd_cls" in err  # the known names are listed
    assert main([*base, "--loss-weight", "det_box"]) == 2
    assert "NAME=WEIGHT" in capsys.readouterr().err
    assert main([*base, "--loss-weight", "det_box=lots"]) == 2
    assert "det_box=lots" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

    assert (
        main([*base, "--batch-size", "4", "--loss-weight", "det_box=0", "--loss-weight", "mask_bce=4"]) == 0
    )
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["train_config"]["loss_weights"] == {"det_box": 0.0, "mask_bce": 4.0}


@pytest.mark.slow
def test_train_command_text_pixels_follows_the_graph_unless_told(dataset: Path, tmp_path: Path) -> None:
    """The synthetic dataset's schema declares no dataflow, so ``auto`` keeps pixels; ``off`` trains a text side
    that reads the objects and the question only, and the run loads back as trained."""
    from graphdistill.cli import main
    from graphdistill.student.predict import load_student

    def run(name: str, *flag: str) -> dict[str, Any]:
        out = tmp_path / name
        argv = ["train", str(dataset), "--out", str(out), "--epochs", "1", "--image-size", "96", *flag]
        assert main([*argv, "--batch-size", "4"]) == 0
        return dict(json.loads((out / "config.json").read_text()))

    assert run("auto")["text_pixels"] is True
    assert run("off", "--text-pixels", "off")["text_pixels"] is False
    model = load_student(tmp_path / "off").model
    assert model.n_ctx == model.config.num_registers + model.config.max_objects


def test_a_warm_start_takes_the_runs_tokenizer_config_and_weights(
    overfit_run: tuple[Path, dict[str, Any]], dataset: Path, tmp_path: Path
) -> None:
    """``init_from`` (improve's rounds): the new run starts as the old one ends, whatever the new dataset's
    words or this config's vocabulary size would have made."""
    from safetensors.torch import load_file

    run, _ = overfit_run
    recipe = TrainRecipe(_cfg(dataset, tmp_path / "warm", init_from=str(run), vocab_size=300))
    recipe.setup()
    assert (tmp_path / "warm" / "tokenizer.json").read_text() == (run / "tokenizer.json").read_text()
    assert json.loads((tmp_path / "warm" / "config.json").read_text()) == json.loads(
        (run / "config.json").read_text()
    )
    weights = load_file(str(run / "model.safetensors"))
    state = recipe.model.state_dict()
    assert weights and all(torch.equal(state[k], v) for k, v in weights.items())
    with pytest.raises(ValueError, match="not a trained run folder"):
        TrainRecipe(
            _cfg(dataset, tmp_path / "cold", init_from=str(tmp_path / "warm" / "checkpoints"))
        ).setup()
