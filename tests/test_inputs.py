"""Many inputs from few photos: augmentations, copy-paste composites with the teacher's masks, questions
from the labels, held-out photos kept out of training, provenance of every photo used, determinism."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from graphdistill.images import load_image
from graphdistill.recording.inputs import (
    GENERIC_QUESTIONS,
    HELDOUT_GENERIC,
    HELDOUT_LABEL,
    LABEL_QUESTIONS,
    Cutout,
    InputsError,
    SourcePhoto,
    augment,
    composite,
    cutout_from_mask,
    folder_sources,
    make_heldout_questions,
    make_inputs,
    make_question,
)


def _photo(i: int, h: int = 48, w: int = 64) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)


def _sources(n: int) -> list[SourcePhoto]:
    return [SourcePhoto(f"test/p{i}", functools.partial(_photo, i)) for i in range(n)]


def _disc_cutout(photo: str, label: str, colour: tuple[int, int, int]) -> Cutout:
    img = np.zeros((40, 40, 3), dtype=np.uint8)
    img[:] = colour
    yy, xx = np.mgrid[0:40, 0:40]
    mask = (yy - 20) ** 2 + (xx - 20) ** 2 <= 15**2
    c = cutout_from_mask(photo, img, mask, label, 0.9)
    assert c is not None
    return c


def _cutouts() -> dict[str, list[Cutout]]:
    return {
        "test/p0": [_disc_cutout("test/p0", "cat", (255, 0, 0))],
        "test/p1": [_disc_cutout("test/p1", "dog", (0, 255, 0))],
        "test/p2": [_disc_cutout("test/p2", "cup", (0, 0, 255)), _disc_cutout("test/p2", "bus", (9, 9, 9))],
        "test/p3": [],
    }


def test_cutout_alpha_is_the_mask() -> None:
    c = _disc_cutout("p", "cat", (255, 0, 0))
    assert c.rgba.shape == (31, 31, 4)  # cropped to the mask's bounding box
    assert c.rgba[15, 15, 3] == 255 and c.rgba[0, 0, 3] == 0
    assert cutout_from_mask("p", np.zeros((8, 8, 3), np.uint8), np.eye(8, dtype=bool), "x", 1.0) is None


def test_augment_changes_the_photo_deterministically() -> None:
    img = _photo(0, 96, 128)
    a, ra = augment(img, np.random.default_rng(5))
    b, rb = augment(img, np.random.default_rng(5))
    assert np.array_equal(a, b) and ra == rb
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
    assert ra["kind"] == "augment" and {"crop", "scale", "jitter"} <= set(ra)
    assert a.shape != img.shape or not np.array_equal(a, img)


def test_composite_pastes_cutouts_where_the_recipe_says() -> None:
    bg = np.full((100, 200, 3), 200, dtype=np.uint8)
    red = _disc_cutout("test/p0", "cat", (255, 0, 0))
    out, recipe = composite(bg, [red], np.random.default_rng(1), size=200)
    assert out.shape == (100, 200, 3)
    (p,) = recipe["pasted"]
    assert p["photo"] == "test/p0" and p["label"] == "cat"
    x1, y1, x2, y2 = p["box"]
    centre = out[(y1 + y2) // 2, (x1 + x2) // 2]
    assert centre[0] > 200 and centre[1] < 60  # the red disc is there
    assert (out[y1, x1] == 200).all()  # its corner is transparent: the background shows


def test_questions_use_the_teacher_labels() -> None:
    rng = np.random.default_rng(0)
    qs = [make_question(["giraffe"], rng) for _ in range(40)]
    with_x = [(q, r) for q, r in qs if "x" in r]
    assert with_x and all("giraffe" in q and r["x"] == "giraffe" for q, r in with_x)
    assert any("x" not in r for _, r in qs)  # some generic questions too
    assert len({r["template"] for _, r in qs}) >= 5
    unknown = [make_question([], rng) for _ in range(20)]
    assert all("x" not in r for _, r in unknown)  # no labels: never name an object that may be absent


def test_heldout_questions_mix_the_templates_with_a_bank_no_training_input_is_asked() -> None:
    # the held-out bank is worded unlike the templates: no template, generic or with a label, is in it
    training = {*GENERIC_QUESTIONS, *LABEL_QUESTIONS}
    assert not training & {*HELDOUT_GENERIC, *HELDOUT_LABEL}
    qs = make_heldout_questions(["cup", "spoon"], 6, np.random.default_rng(3))
    assert len({q for q, _ in qs}) == 6
    assert [r["bank"] for _, r in qs] == ["template", "heldout"] * 3
    for q, r in qs:
        assert r["template"] in (training if r["bank"] == "template" else {*HELDOUT_GENERIC, *HELDOUT_LABEL})
        assert "x" not in r or (r["x"] in ("cup", "spoon") and r["x"] in q)
    assert qs == make_heldout_questions(["cup", "spoon"], 6, np.random.default_rng(3))
    # with no teacher labels only the generic questions of both banks: nothing names an absent object
    bare = make_heldout_questions([], 4, np.random.default_rng(0))
    assert len(bare) == 4 and all("x" not in r for _, r in bare)


def test_make_inputs_rows_provenance_heldout_and_determinism(tmp_path: Path) -> None:
    photos = _sources(5)
    bgs = [SourcePhoto("test/bg", lambda: np.full((50, 50, 3), 90, np.uint8))]
    kw = dict(
        n=30,
        seed=7,
        heldout=["test/p2", "test/p4"],
        heldout_questions=6,
        cutouts=_cutouts(),
        backgrounds=bgs,
        composite_share=0.5,
    )
    summary = make_inputs(photos, out=tmp_path / "a" / "inputs.jsonl", **kw)  # type: ignore[arg-type]
    rows = [json.loads(line) for line in (tmp_path / "a" / "inputs.jsonl").read_text().splitlines()]
    assert summary["rows"] == len(rows) == 42 and summary["composites"] > 0 and summary["augmented"] > 0
    held = [r for r in rows if r.get("heldout")]
    # each held-out photo, untouched, asked six different questions: three templates, three free-form
    for pid, i in (("test/p2", 2), ("test/p4", 4)):
        mine = [r for r in held if r["provenance"]["photos"] == [pid]]
        assert len(mine) == 6 and len({r["question"] for r in mine}) == 6
        banks = [r["provenance"]["recipe"]["question"]["bank"] for r in mine]
        assert banks.count("template") == banks.count("heldout") == 3
        assert all(np.array_equal(load_image(tmp_path / "a" / r["image"]), _photo(i)) for r in mine)
    # p2's teacher labels (cup, bus) name objects in its questions; p4 has none
    xs = {
        r["provenance"]["recipe"]["question"].get("x") for r in held if "test/p2" in r["provenance"]["photos"]
    }
    assert xs - {None} and xs - {None} <= {"cup", "bus"}
    assert len(held) == 12
    train = [r for r in rows if not r.get("heldout")]
    assert all({"test/p2", "test/p4"}.isdisjoint(r["provenance"]["photos"]) for r in train)
    # the held-out bank is never a training question; every training question is a template
    heldout_bank = {*HELDOUT_GENERIC, *HELDOUT_LABEL}
    assert all(r["provenance"]["recipe"]["question"]["template"] not in heldout_bank for r in train)
    assert all(
        r["provenance"]["recipe"]["question"]["template"] in {*GENERIC_QUESTIONS, *LABEL_QUESTIONS}
        for r in train
    )
    assert all("cup" not in r["question"] and "bus" not in r["question"] for r in train)  # p2's only
    labels = {"test/p0": "cat", "test/p1": "dog"}
    for r in train:
        recipe = r["provenance"]["recipe"]
        img = load_image(tmp_path / "a" / r["image"])
        assert img.ndim == 3 and r["question"]
        if recipe["kind"] == "composite":
            used = {p["photo"] for p in recipe["pasted"]}
            assert used <= set(r["provenance"]["photos"])  # every photo a cut-out came from
            if recipe["background"] != "test/bg":
                assert recipe["background"] in r["provenance"]["photos"]
            else:
                assert "test/bg" not in r["provenance"]["photos"]  # textures tie nothing together
            x = recipe["question"].get("x")
            assert x is None or x in {p["label"] for p in recipe["pasted"]}
        else:
            assert recipe["kind"] == "augment" and len(r["provenance"]["photos"]) == 1
            x = recipe["question"].get("x")
            photo = r["provenance"]["photos"][0]
            if x is not None and photo in labels:
                assert x in labels[photo].split()
    # same seed -> same rows and the same pixels
    make_inputs(photos, out=tmp_path / "b" / "inputs.jsonl", **kw)  # type: ignore[arg-type]
    rows_b = [json.loads(line) for line in (tmp_path / "b" / "inputs.jsonl").read_text().splitlines()]
    assert rows_b == rows
    for ra, rb in zip(rows, rows_b, strict=True):
        assert (tmp_path / "a" / ra["image"]).read_bytes() == (tmp_path / "b" / rb["image"]).read_bytes()
    # the held-out questions depend on the seed and the photo alone, not on how many inputs are made
    make_inputs(photos, out=tmp_path / "c" / "inputs.jsonl", **{**kw, "n": 3})  # type: ignore[arg-type]
    rows_c = [json.loads(line) for line in (tmp_path / "c" / "inputs.jsonl").read_text().splitlines()]
    assert [r["question"] for r in rows_c if r.get("heldout")] == [r["question"] for r in held]


def test_make_inputs_errors_name_the_input(tmp_path: Path) -> None:
    with pytest.raises(InputsError, match="test/nope"):
        make_inputs(
            _sources(2), n=2, seed=0, out=tmp_path / "x.jsonl", heldout=["test/nope"], composites=False
        )
    with pytest.raises(InputsError, match="every photo is held out"):
        make_inputs(_sources(1), n=2, seed=0, out=tmp_path / "x.jsonl", heldout=["test/p0"], composites=False)
    with pytest.raises(InputsError, match="no such folder"):
        folder_sources(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputsError, match="holds no images"):
        folder_sources(tmp_path / "empty")


def test_inputs_make_cli_from_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    from graphdistill.cli import main

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(_photo(i)).save(folder / f"img{i}.png")
    out = tmp_path / "in" / "inputs.jsonl"
    argv = ["inputs", "make", "--from", str(folder), "--n", "5", "--seed", "1", "--out", str(out)]
    assert main([*argv, "--holdout", "photos/img2.png", "--no-composites", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["rows"] == len(rows) == 8
    assert sum(bool(r.get("heldout")) for r in rows) == 3
    assert all((out.parent / r["image"]).exists() for r in rows)
    assert main([*argv[:-2], "--out", str(tmp_path / "y.jsonl"), "--holdout", "nope", "--no-composites"]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.slow
def test_the_teacher_finds_objects_on_every_default_heldout_photo() -> None:
    """The held-out photos are what fidelity is measured on: each must give the teacher something to find
    (YOLO11n at its default threshold: coffee cup 0.82, Grace Hopper's person 0.91, measured 2026-12-02)."""
    import _models
    from graphdistill.recording.photos import BUILTIN, DEFAULT_HELDOUT, photo

    assert len(set(DEFAULT_HELDOUT)) >= 4 and set(DEFAULT_HELDOUT) < {p.id for p in BUILTIN}
    found = {pid: set(_models.detector().detect(photo(pid).image()).names) for pid in DEFAULT_HELDOUT}
    assert all(found.values()), found
    assert "cup" in found["skimage/coffee"] and "person" in found["matplotlib/grace_hopper"]
    # the OpenCV photos (fetched from the package index like the weights): measured 2026-12-05
    assert {"person", "sports ball"} <= found["opencv/messi5"] and "orange" in found["opencv/fruits"]


@pytest.mark.slow
def test_real_teacher_cutouts_from_the_cat_photo(tmp_path: Path) -> None:
    import _models
    from graphdistill.recording.inputs import teacher_cutouts
    from graphdistill.recording.photos import photo

    chelsea = photo("skimage/chelsea")
    src = [SourcePhoto(chelsea.id, chelsea.loader)]
    cuts = teacher_cutouts(
        src, detector=_models.detector(), segmenter=_models.segmenter(), cache_dir=tmp_path
    )
    labels = [c.label for c in cuts["skimage/chelsea"]]
    assert "cat" in labels
    c = cuts["skimage/chelsea"][labels.index("cat")]
    alpha = c.rgba[..., 3] > 0
    assert 0.3 < alpha.mean() < 0.98  # the teacher's mask, not its box
    assert len(list(tmp_path.glob("*.npz"))) == 1

    class NoModel:  # a second call must come from the cache, never the models
        weights_sha256 = _models.detector().weights_sha256

        def detect(self, image: np.ndarray) -> None:
            raise AssertionError("the cache was not used")

    class NoSeg(NoModel):
        weights_sha256 = _models.segmenter().weights_sha256

    again = teacher_cutouts(src, detector=NoModel(), segmenter=NoSeg(), cache_dir=tmp_path)
    assert [x.label for x in again["skimage/chelsea"]] == labels
    assert np.array_equal(again["skimage/chelsea"][0].rgba, cuts["skimage/chelsea"][0].rgba)
