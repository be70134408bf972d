"""The runtime-only runner's pieces against the reference implementations they must equal: BPE vs the
``tokenizers`` library, preprocessing vs the student's loader, RLE vs ``trace.RLE``, decoding vs predict."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from graphdistill.runner.bpe import ByteLevelBPE, split_words
from graphdistill.runner.preprocess import (
    boxes_to_image,
    letterbox_geometry,
    paste_mask,
    preprocess,
    rle_encode,
)

QUESTIONS = [
    "What is the cat doing on the mat?",
    "How many people are near the bus?",
    "Is there a red circle?",
    "it's 42 o'clock, isn't it!!",
    "They'll've DONE it; we'd say 'no'.",
    "héllo wörld 日本語 🙂 emoji",
    "tabs\tand\n\nnewlines   spaces  ",
]
EDGE_CASES = [
    "",
    " ",
    "   ",
    "  lead",
    "trail  ",
    "a   b",
    "x\t\ty",
    "'s",
    "don't'll'VE",
    "12.5kg!?",
    "naïve café",
    "\u3000全角",
    "a\u00a0b",
    "<bos>hi<eos>",
    "The <pad> tok<unk>",
    "Ⅻ ½ ٣ digits",
]


@pytest.fixture(scope="module")
def student_tokenizer():  # the student's own tokenizer class, trained the way training does
    from graphdistill.student.tokenizer import StudentTokenizer

    return StudentTokenizer.train(
        QUESTIONS * 5 + ["Yes, there is a red circle.", "There are 3 squares."], 320, 2
    )


def _random_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcXYZ '’!?.,0123\t\n\u00a0é日🙂<>-_s"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def test_bpe_matches_tokenizers_on_many_strings(student_tokenizer) -> None:
    bpe = ByteLevelBPE(json.loads(student_tokenizer.tok.to_str()))
    strings = QUESTIONS + EDGE_CASES + _random_strings(600)
    mismatches = [s for s in strings if bpe.encode(s) != student_tokenizer.encode(s)]
    assert not mismatches, mismatches[:5]
    # decoding: same text as the student's decode (which stops at <eos> and drops <pad>/<bos>)
    for s in strings:
        ids = student_tokenizer.encode(s)
        assert bpe.decode(ids) == student_tokenizer.tok.decode(ids)


def test_bpe_with_prefix_space_and_saved_file(tmp_path) -> None:
    tk = pytest.importorskip("tokenizers")
    tok = tk.Tokenizer(tk.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<unk>"],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(QUESTIONS * 3, trainer=trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    bpe = ByteLevelBPE.from_file(path)
    for s in QUESTIONS + EDGE_CASES + _random_strings(200, seed=1):
        assert bpe.encode(s) == tok.encode(s).ids, repr(s)


def test_split_words_follows_the_gpt2_rule() -> None:
    assert split_words("Hello  world's 42!!") == ["Hello", " ", " world", "'s", " 42", "!!"]
    assert split_words("a\t\tb") == ["a", "\t", "\t", "b"]
    assert split_words("end   ") == ["end", "   "]


def test_unsupported_tokenizer_is_refused() -> None:
    from graphdistill.runner.bpe import TokenizerError

    with pytest.raises(TokenizerError, match="WordPiece"):
        ByteLevelBPE({"model": {"type": "WordPiece"}, "pre_tokenizer": {"type": "ByteLevel"}})


@pytest.mark.parametrize("hw", [(96, 96), (60, 130), (131, 47), (1, 5)])
def test_preprocess_equals_the_students_loader(hw) -> None:
    from graphdistill.student.loader import preprocess_image, preprocess_spec

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    ref, scale = preprocess_image(img, 64)
    got, box = preprocess(img, preprocess_spec(64))
    assert got.shape == (1, 3, 64, 64) and got.dtype == np.float32
    np.testing.assert_array_equal(got[0], ref.numpy())
    assert box.scale == pytest.approx(scale)


def test_rle_equals_trace_rle() -> None:
    from graphdistill.trace import RLE

    rng = np.random.default_rng(1)
    for shape in [(5, 7), (1, 1), (0, 3), (16, 9)]:
        for fill in (0.0, 0.5, 1.0):
            m = rng.random(shape) < fill
            ref = RLE.encode(m)
            assert rle_encode(m) == {"size": ref.size, "counts": ref.counts}


def test_boxes_and_masks_paste_back_like_predict() -> None:
    """A canvas-normalised box of the letterboxed image maps back to the image's own pixels, and a mask
    that is on over the box's cells comes back on over (about) that box."""
    h, w, size = 60, 120, 64
    box = letterbox_geometry(h, w, size)
    assert (box.pad_left, box.pad_top) == (0, 0)
    target = np.array([30.0, 10.0, 90.0, 40.0])  # x1 y1 x2 y2 in image pixels
    c = target * box.scale / size
    cxcywh = np.array([[(c[0] + c[2]) / 2, (c[1] + c[3]) / 2, c[2] - c[0], c[3] - c[1]]])
    np.testing.assert_allclose(boxes_to_image(cxcywh, box, size)[0], target, atol=1e-6)
    ms = 32
    logits = np.full((ms, ms), -8.0, dtype=np.float32)
    cells = (target * ms / max(h, w)).round().astype(int)
    logits[cells[1] : cells[3], cells[0] : cells[2]] = 8.0
    mask = paste_mask(logits, box)
    assert mask.shape == (h, w)
    inside = mask[12:38, 32:88].mean()
    outside = np.concatenate([mask[:, :25].ravel(), mask[:, 95:].ravel(), mask[45:].ravel()]).mean()
    assert inside > 0.99 and outside == 0.0


def test_box_f1_scores_dataset_records_against_runner_dicts() -> None:
    """The int8 fidelity gate compares the runner's dict objects with the dataset's ObjectOut records."""
    from graphdistill.student.export_parity import box_f1, plain_objects
    from graphdistill.trace import ObjectOut

    target = [ObjectOut(label="cat", class_id=15, score=0.9, box=[0, 0, 10, 10])]
    pred = [{"label": "cat", "class_id": 15, "score": 0.8, "box": [0.0, 0.0, 10.0, 9.0]}]
    assert box_f1(pred, plain_objects(target)) == 1.0
    assert box_f1([{**pred[0], "class_id": 16, "label": "dog"}], plain_objects(target)) == 0.0


def test_mask_pasted_in_its_box_matches_the_whole_image_paste() -> None:
    """Pasting only inside the object's box samples the same bilinear map at the same pixel centres as
    the whole-image paste (Pillow's box resize: at most a few threshold pixels differ by rounding), and
    everything outside the box is off."""
    from graphdistill.runner.preprocess import mask_region, object_mask_rle, paste_mask_in_box
    from graphdistill.trace import RLE

    rng = np.random.default_rng(3)
    for h, w in [(720, 1280), (300, 451), (1000, 667), (17, 5)]:
        box = letterbox_geometry(h, w, 256)
        for _ in range(10):
            logits = rng.normal(0, 3, (32, 32)).astype(np.float32)
            x1, x2 = sorted(rng.uniform(-0.1 * w, 1.1 * w, 2))
            y1, y2 = sorted(rng.uniform(-0.1 * h, 1.1 * h, 2))
            xyxy = [max(0.0, x1), max(0.0, y1), min(w, x2), min(h, y2)]
            x0, y0, xe, ye = mask_region(xyxy, h, w)
            crop = paste_mask_in_box(logits, box, xyxy)
            whole = paste_mask(logits, box)[y0:ye, x0:xe]
            assert crop.shape == whole.shape
            assert (crop != whole).sum() <= max(2, crop.size // 1000)
            expected = np.zeros((h, w), dtype=bool)
            expected[y0:ye, x0:xe] = crop
            got = RLE(**object_mask_rle(logits, box, xyxy)).decode()
            np.testing.assert_array_equal(got, expected)


def test_rle_of_a_region_equals_the_rle_of_the_whole_mask() -> None:
    """Runs that cross column boundaries (crop as tall as the image) and that end at the last pixel are
    merged exactly like the whole-mask encoder does."""
    from graphdistill.runner.preprocess import rle_of_region

    rng = np.random.default_rng(4)
    for _ in range(3000):
        h, w = (int(v) for v in rng.integers(1, 7, 2))
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        cw, ch = int(rng.integers(0, w - x0 + 1)), int(rng.integers(0, h - y0 + 1))
        crop = rng.random((ch, cw)) < rng.random()
        whole = np.zeros((h, w), dtype=bool)
        whole[y0 : y0 + ch, x0 : x0 + cw] = crop
        assert rle_of_region(crop, x0, y0, h, w) == rle_encode(whole)
