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
    ObjectOut,
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
        np.linspace(-1, 1, 7, dtype=np.float32),  # an embedding: .npy
        np.eye(3, dtype=np.float64),
        np.array([[True, False], [False, True]]),  # a mask
        np.arange(5, dtype=np.int64),
    ],
    ids=["rgb-png", "gray-png", "float32", "float64", "bool", "int64"],
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
