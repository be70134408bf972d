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
def student_tokenizer():  # the student's own tokenizer class, trained the way training does: class names too
    from graphdistill.student.tokenizer import StudentTokenizer
    from graphdistill.teachers.coco import COCO_CLASSES

    return StudentTokenizer.train(
        QUESTIONS * 5 + ["Yes, there is a red circle.", "There are 3 squares."],
        320,
        2,
        class_names=COCO_CLASSES,
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


def test_bpe_encodes_every_class_name_as_the_one_token_the_decoder_copies(student_tokenizer) -> None:
    """The class names are added tokens with a leading space (" traffic light"): matched literally, never
    merged, wherever they occur, by the runner exactly as by ``tokenizers``."""
    from graphdistill.teachers.coco import COCO_CLASSES

    bpe = ByteLevelBPE(json.loads(student_tokenizer.tok.to_str()))
    ids = student_tokenizer.class_token_ids(COCO_CLASSES)
    assert min(ids) > 3 and len(set(ids)) == len(COCO_CLASSES)
    rng = random.Random(5)
    for name, i in zip(COCO_CLASSES, ids, strict=True):
        for text in (
            f"There is a {name}.",
            f"A {name} and a {rng.choice(COCO_CLASSES)} near the {name}s",
            f"{name} first, then  {name}",  # at the start (no leading space) and after two spaces
            f"the {name.upper()} and the{name}",  # other spellings are not the class token
        ):
            want = student_tokenizer.encode(text)
            assert bpe.encode(text) == want, text
            assert bpe.decode(want) == student_tokenizer.tok.decode(want) == text
        assert i in bpe.encode(f"There is a {name}.")
    assert len(bpe.encode("There is a traffic light.")) == len(bpe.encode("There is a cat.")), "one token"


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


def test_nhwc_layout_holds_the_same_values_as_nchw() -> None:
    """An ExecuTorch bundle takes its image NHWC: the same numbers as the student's NCHW planes, transposed,
    bit for bit; a buffer of the wrong layout is refused rather than filled wrongly."""
    from graphdistill.runner.preprocess import Preprocessor
    from graphdistill.student.loader import preprocess_spec

    rng = np.random.default_rng(2)
    spec = {**preprocess_spec(64), "pad_value": [114, 114, 114]}
    nhwc = Preprocessor({**spec, "layout": "NHWC"})
    for hw in [(64, 64), (130, 60), (20, 90)]:
        img = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
        want, want_box = preprocess(img, spec)
        got, box = nhwc(img)
        assert got.shape == (1, 64, 64, 3) and box == want_box
        np.testing.assert_array_equal(got, want.transpose(0, 2, 3, 1))
    with pytest.raises(ValueError, match="contiguous"):
        nhwc(img, np.empty((1, 3, 64, 64), dtype=np.float32))
    with pytest.raises(ValueError, match="unsupported preprocessing"):
        Preprocessor({**spec, "layout": "CHWN"})


def test_one_preprocessor_reused_on_images_of_every_shape_gives_fresh_results() -> None:
    """The runner keeps one Preprocessor and writes into the runtime's input buffer: nothing of one image
    may leak into the next (a smaller image after a larger one must show pad where the larger one was)."""
    from graphdistill.runner.preprocess import Preprocessor
    from graphdistill.student.loader import preprocess_spec

    rng = np.random.default_rng(1)
    spec = {**preprocess_spec(64), "pad_value": [114, 114, 114]}
    pre, buf = Preprocessor(spec), np.full((1, 3, 64, 64), np.nan, dtype=np.float32)
    for hw in [(64, 64), (130, 60), (20, 90), (64, 64), (7, 3)]:
        img = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
        want, want_box = preprocess(img, spec)  # a fresh one each time
        got, box = pre(img, buf)
        assert got is buf and box == want_box
        np.testing.assert_array_equal(got, want)


def test_split_added_cuts_at_the_longest_added_token() -> None:
    added = [
        {"id": 2, "content": "<eos>", "special": True},
        {"id": 5, "content": "<e"},
        {"id": 6, "content": "os>"},
    ]
    bpe = ByteLevelBPE({
        "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []},
        "pre_tokenizer": {"type": "ByteLevel"}, "added_tokens": added,
    })  # fmt: skip
    assert list(bpe._split_added("a<eos>b<e c os>")) == [
        ("a", False), ("<eos>", True), ("b", False), ("<e", True), (" c ", False), ("os>", True),
    ]  # fmt: skip
    assert list(bpe._split_added("")) == []
    assert bpe.encode("a<eos>b") == [0, 2, 1]


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


def test_objects_f1_scores_dataset_records_against_runner_dicts() -> None:
    """The int8 fidelity gate compares the runner's dict objects with the dataset's ObjectOut records."""
    from graphdistill.eval.metrics import objects_f1
    from graphdistill.trace import ObjectOut

    target = [ObjectOut(label="cat", class_id=15, score=0.9, box=[0, 0, 10, 10])]
    pred = [{"label": "cat", "class_id": 15, "score": 0.8, "box": [0.0, 0.0, 10.0, 9.0], "mask": None}]
    assert objects_f1(target, pred) == 1.0
    assert objects_f1(target, [{**pred[0], "class_id": 16, "label": "dog"}]) == 0.0


def _dense_mask(logits: np.ndarray, h: int, w: int, xyxy: list[float]) -> np.ndarray:
    """The mask rule of ``object_mask_rle`` evaluated at every pixel with ``np.interp`` (the reference)."""
    from graphdistill.runner.preprocess import mask_region

    ms = logits.shape[0]
    mh, mw = max(1, min(ms, round(h * ms / max(h, w)))), max(1, min(ms, round(w * ms / max(h, w))))
    grid = 1.0 / (1.0 + np.exp(-logits[:mh, :mw].astype(np.float64)))
    u = (np.arange(w) + 0.5) * mw / w - 0.5
    v = (np.arange(h) + 0.5) * mh / h - 0.5
    across = np.stack([np.interp(u, np.arange(mw), grid[k]) for k in range(mh)])
    full = np.stack([np.interp(v, np.arange(mh), across[:, x]) for x in range(w)], axis=1) > 0.5
    x0, y0, x1, y1 = mask_region(xyxy, h, w)
    out = np.zeros((h, w), dtype=bool)
    out[y0:y1, x0:x1] = full[y0:y1, x0:x1]
    return out


def test_object_mask_equals_the_rule_at_every_pixel_and_pillows_paste() -> None:
    """The per-column solver gives exactly the rule evaluated pixel by pixel (tiny images, where the grid
    is larger than the image, included), canonical RLE, and within a pixel of the whole-image Pillow paste
    inside the box on images at least as large as the mask grid."""
    from graphdistill.runner.preprocess import mask_region, object_mask_rle
    from graphdistill.trace import RLE

    rng = np.random.default_rng(3)
    for h, w in [(720, 1280), (300, 451), (1000, 667), (33, 40), (17, 5), (5, 300), (1, 1)]:
        box = letterbox_geometry(h, w, 256)
        for i in range(12):
            logits = rng.normal(0, 3, (32, 32)).astype(np.float32)
            x1, x2 = sorted(rng.uniform(-0.1 * w, 1.1 * w, 2))
            y1, y2 = sorted(rng.uniform(-0.1 * h, 1.1 * h, 2))
            xyxy = (
                [0.0, 0.0, float(w), float(h)] if i == 0 else [max(0, x1), max(0, y1), min(w, x2), min(h, y2)]
            )
            rle = object_mask_rle(logits, box, xyxy)
            got = RLE(**rle).decode()
            assert rle == rle_encode(got)
            np.testing.assert_array_equal(got, _dense_mask(logits, h, w, xyxy))
            if min(h, w) >= 32:
                x0, y0, xe, ye = mask_region(xyxy, h, w)
                pillow = np.zeros((h, w), dtype=bool)
                pillow[y0:ye, x0:xe] = paste_mask(logits, box)[y0:ye, x0:xe]
                assert (got != pillow).sum() <= 2
    empty = object_mask_rle(
        np.zeros((32, 32), np.float32), letterbox_geometry(10, 10, 64), [3.0, 3.0, 3.0, 8.0]
    )
    assert empty == {"size": [10, 10], "counts": [100]}


def test_sources_are_the_top_k_documents_highest_first_ties_in_document_order() -> None:
    from graphdistill.runner.bundle import top_sources

    docs = ["a", "b", "c", "d"]
    assert top_sources(np.array([0.1, 2.0, 0.1, 1.0], dtype=np.float32), 3, docs) == ["b", "d", "a"]
    assert top_sources(np.array([[0.5, 0.5, 0.5, 0.5]]), 2, docs) == ["a", "b"]
    assert top_sources(np.array([3.0, 2.0, 1.0, 0.0, 9.0]), 9, docs) == [
        "a",
        "b",
        "c",
        "d",
    ]  # logits past the docs


def test_greedy_decoding_never_repeats_an_n_gram_and_is_plain_argmax_otherwise() -> None:
    from graphdistill.runner.bundle import banned_tokens, greedy_token
    from graphdistill.student.train import longest_repeat

    # "set on set on" would repeat the trigram "set on set" if "set" came next
    assert banned_tokens([5, 6, 5, 6], 3) == [5]
    assert banned_tokens([1, 2, 3], 3) == [] and banned_tokens([7, 7], 3) == []
    assert banned_tokens([7, 7, 7], 2) == [7] and banned_tokens([7, 7, 7], 0) == []
    scores = np.array([0.0, 0.1, 0.2, 0.0, 0.0, 0.9, 0.5])
    assert greedy_token(scores, [5, 6, 5, 6], 3) == 6  # 5 is the best score but banned; 6 is next best
    assert greedy_token(scores, [1, 2, 3], 3) == 5
    assert greedy_token(scores, [5, 6, 5, 6], 0) == 5  # a bundle without the rule: plain argmax
    # an n one more than the longest n-gram an answer repeats leaves that answer writable
    answer = [1, 2, 3, 9, 1, 2, 3, 8]
    n = longest_repeat(answer) + 1
    assert longest_repeat(answer) == 3 and longest_repeat([1, 2, 3]) == 0 and longest_repeat([4, 4, 4]) == 2
    assert all(answer[i] not in banned_tokens(answer[:i], n) for i in range(len(answer)))
    assert answer[6] in banned_tokens(answer[:6], 3)  # a trigram rule could not write it


def test_greedy_decoding_cuts_a_run_of_one_token_at_the_longest_run_the_teacher_wrote() -> None:
    from graphdistill.runner.bundle import banned_tokens, greedy_token
    from graphdistill.student.train import longest_run

    # a 16-gram rule (what SmolLM2's own repeats allow) lets "set set set set" through; the run rule does not
    assert banned_tokens([4, 9, 9], 16, 2) == [9] and banned_tokens([4, 9, 9], 16) == []
    assert banned_tokens([9, 4, 9], 16, 2) == [] and banned_tokens([9, 9], 16, 0) == []
    assert banned_tokens([9], 0, 1) == [9]  # run 1: never the same token twice in a row
    assert banned_tokens([5, 6, 5, 6, 6], 3, 2) == [6]  # both rules at once, each token once
    assert banned_tokens([5, 6, 5, 6, 6, 6], 3, 3) == [6]
    scores = np.array([0.0, 0.1, 0.2, 0.0, 0.0, 0.9, 0.5])
    assert greedy_token(scores, [5, 5], 16, 2) == 6 and greedy_token(scores, [5, 5], 16, 3) == 5
    assert longest_run([]) == 0 and longest_run([1, 2, 3]) == 1 and longest_run([1, 2, 2, 2, 3, 3]) == 3

    # the student's rules from its training answers: the run is the longest in any answer; n leaves 90 % of
    # the answers writable, not the one that repeats a whole phrase
    from graphdistill.student.train import decoding_rules

    answers = [[1, 2, 2, 3], [4, 5, 6], *([[7, 8, 9, 7, 8, 10]] * 8), [1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]]
    rules = decoding_rules(answers)
    assert rules == {"no_repeat_ngram": 3, "max_token_run": 2}
    n, run = rules["no_repeat_ngram"], rules["max_token_run"]
    writable = [all(a[i] not in banned_tokens(a[:i], n, run) for i in range(len(a))) for a in answers]
    assert writable == [True] * 10 + [False]  # the phrase-repeating answer: 10 of 11 stay writable
    assert decoding_rules([]) == {"no_repeat_ngram": 0, "max_token_run": 0}
    assert decoding_rules([[1, 2, 3]]) == {"no_repeat_ngram": 1, "max_token_run": 1}
