"""The trace's own encodings, round-tripped directly: RLE masks, and every kind of value `encode_value` stores
(what a recorded trace is made of)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from graphdistill.trace import (
    RLE,
    BlobRef,
    Detections,
    Document,
    Masks,
    ObjectOut,
    TokenLogprobs,
    decode_array,
    decode_value,
    encode_value,
)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (9, 1), (16, 24), (37, 53)])
def test_rle_round_trips_every_mask(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    masks = [
        np.zeros(shape, dtype=bool),
        np.ones(shape, dtype=bool),
        rng.random(shape) > 0.5,  # noise: the most runs
        rng.random(shape) > 0.95,  # sparse
    ]
    blob = np.zeros(shape, dtype=bool)
    blob[shape[0] // 3 : shape[0] // 3 + max(1, shape[0] // 2), : max(1, shape[1] // 2)] = True
    masks.append(blob)
    for m in masks:
        rle = RLE.encode(m)
        assert rle.size == list(shape) and sum(rle.counts) == m.size
        back = rle.decode()
        assert back.dtype == np.bool_ and back.shape == shape
        np.testing.assert_array_equal(back, m)
        assert RLE.model_validate(rle.model_dump()) == rle  # and through JSON
    assert RLE.encode(np.ones(shape, dtype=bool)).counts[0] == 0  # the first run counts zeros


def test_rle_of_one_pixel_anywhere_counts_it_in_cocos_column_major_order() -> None:
    """A lone pixel at every place of a 4 x 5 mask (the first and last runs included): it comes back where it
    was, and the runs count it column by column, as COCO's uncompressed RLE does (a transposed encoder and
    decoder would still round-trip, these counts would not)."""
    h, w = 4, 5
    for y in range(h):
        for x in range(w):
            m = np.zeros((h, w), dtype=bool)
            m[y, x] = True
            rle = RLE.encode(m)
            at = x * h + y  # column-major index
            assert rle.counts == [at, 1, h * w - at - 1][: 3 if at < h * w - 1 else 2], (y, x)
            assert rle.area() == 1
            np.testing.assert_array_equal(rle.decode(), m)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)])
def test_rle_of_an_empty_mask_round_trips(shape: tuple[int, int]) -> None:
    rle = RLE.encode(np.zeros(shape, dtype=bool))
    assert rle.size == list(shape) and rle.area() == 0
    back = rle.decode()
    assert back.shape == shape and back.dtype == np.bool_


def test_rle_refuses_counts_that_do_not_fill_its_size() -> None:
    with pytest.raises(ValueError, match="sum to 5"):
        RLE(size=[2, 3], counts=[2, 3])
    with pytest.raises(ValueError, match="non-negative"):
        RLE(size=[1, 2], counts=[3, -1])


def _round_trip(value: Any) -> tuple[Any, dict[str, bytes]]:
    blobs: dict[str, bytes] = {}
    encoded = encode_value(value, blobs)
    return decode_value(encoded, load_blob=blobs.__getitem__), blobs


@pytest.mark.parametrize(
    "array",
    [
        np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3),  # an image: a PNG blob
        np.arange(6, dtype=np.uint8).reshape(2, 3),  # grayscale
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),  # RGBA: a PNG blob too
        np.arange(2 * 3 * 2, dtype=np.uint8).reshape(2, 3, 2),  # two uint8 channels are no PNG: .npy
        np.linspace(-1, 1, 7, dtype=np.float32),  # an embedding: .npy
        np.eye(3, dtype=np.float64),
        np.array([[True, False], [False, True]]),  # a mask
        np.arange(5, dtype=np.int64),
    ],
    ids=["rgb-png", "gray-png", "rgba-png", "uint8-2ch-npy", "float32", "float64", "bool", "int64"],
)
def test_arrays_come_back_exact_in_dtype_shape_and_values(array: np.ndarray) -> None:
    back, blobs = _round_trip(array)
    assert len(blobs) == 1
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    ref = decode_value(encode_value(array, {}))  # without the blobs: a typed reference
    assert isinstance(ref, BlobRef) and ref.shape == list(array.shape)


def test_plain_values_records_and_containers_round_trip() -> None:
    det = Detections(
        xyxy=[[1.0, 2.0, 3.0, 4.0]], class_ids=[15], names=["cat"], scores=[0.9], image_size=[8, 8]
    )
    obj = ObjectOut(label="cat", class_id=15, score=0.9, box=[1.0, 2.0, 3.0, 4.0])
    value = {
        "text": "a cät ✓",
        "n": 3,
        "ok": True,
        "none": None,
        "x": 0.25,
        "np_scalar": np.float32(0.5),
        "tuple": (1, "two", [3.0]),
        "detections": det,
        "document": Document(id="d1", text="A cat."),
        "objects": [obj],
        7: "a non-string key",
    }
    back, _ = _round_trip(value)
    assert back["text"] == "a cät ✓" and back["n"] == 3 and back["ok"] is True and back["none"] is None
    assert back["x"] == 0.25 and back["np_scalar"] == 0.5 and back["tuple"] == [1, "two", [3.0]]
    assert back["detections"] == det  # typed records come back typed
    assert back["document"] == {"id": "d1", "text": "A cat.", "distance": None, "metadata": {}}
    assert back["objects"][0]["label"] == "cat" and back["7"] == "a non-string key"


def test_every_typed_record_comes_back_typed_with_its_masks_and_log_probs() -> None:
    """The records a node writes (detections, masks, the LLM's top-k log-probs) come back as themselves, not
    as dicts, inside containers too; a blob reference passes through as a reference."""
    rng = np.random.default_rng(0)
    masks = Masks(
        rles=[RLE.encode(rng.random((6, 9)) > 0.5), RLE.encode(np.zeros((6, 9), bool))], scores=[0.9, 0.4]
    )
    logprobs = TokenLogprobs(
        tokenizer="t/tok",
        token_ids=[5, 2],
        topk_ids=[[5, 7], [2, 9]],
        topk_logprobs=[[-0.1, -2.5], [-0.05, -3.0]],
        token_texts=["A", " cat"],
        topk_texts=[["A", "The"], [" cat", " dog"]],
        eos_ids=[2],
    )
    det = Detections(
        xyxy=[[0.0, 1.0, 5.0, 6.0]], class_ids=[15], names=["cat"], scores=[0.8], image_size=[6, 9]
    )
    for record in (masks, logprobs, det):
        back, blobs = _round_trip(record)
        assert type(back) is type(record) and back == record and not blobs
    back, _ = _round_trip({"segment": {"masks": [masks]}, "llm": logprobs})
    assert back["segment"]["masks"][0] == masks and back["llm"] == logprobs
    np.testing.assert_array_equal(back["segment"]["masks"][0].rles[0].decode(), masks.rles[0].decode())

    blobs: dict[str, bytes] = {}
    ref = decode_value(encode_value(np.arange(3.0), blobs))
    assert isinstance(ref, BlobRef)
    again: dict[str, bytes] = {}
    assert decode_value(encode_value(ref, again)) == ref and not again  # a reference stores nothing new
    np.testing.assert_array_equal(
        decode_value(encode_value(ref, {}), load_blob=blobs.__getitem__), np.arange(3.0)
    )


def test_what_json_cannot_hold_is_stored_safely() -> None:
    back, blobs = _round_trip({"nan": math.nan, "inf": -math.inf, "raw": b"\x00\x01\xff"})
    assert back["nan"] is None and back["inf"] is None  # not valid JSON: stored as null
    assert back["raw"].tobytes() == b"\x00\x01\xff" and len(blobs) == 1

    class Opaque:
        def __repr__(self) -> str:
            return "Opaque()"

    assert encode_value(Opaque(), {}) == {"__repr__": "Opaque()"}


def test_torch_tensors_and_pil_images_are_stored_as_arrays() -> None:
    import torch
    from PIL import Image

    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    back, _ = _round_trip(t)
    np.testing.assert_array_equal(back, t.numpy())
    img = Image.new("RGB", (5, 4), (10, 20, 30))
    back, _ = _round_trip(img)
    assert back.shape == (4, 5, 3) and tuple(back[0, 0]) == (10, 20, 30)


def test_a_blob_whose_bytes_changed_is_refused() -> None:
    blobs: dict[str, bytes] = {}
    encoded = encode_value(np.arange(4, dtype=np.float32), blobs)
    ref = decode_value(encoded)
    assert isinstance(ref, BlobRef)
    (sha,) = blobs
    with pytest.raises(ValueError, match="corrupt"):
        decode_array(ref, blobs[sha][:-1] + b"\x00")
