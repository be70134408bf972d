"""Near-duplicate removal: same perceptual hash of the input image (within a few bits) and the same
normalised question -> keep one. Pure numpy + Pillow."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from graphdistill.runner.vote import normalize_text


def dhash(image: np.ndarray, size: int = 8) -> int:
    """Difference hash: ``size * size`` bits of left-to-right brightness gradients on a small grey copy."""
    from PIL import Image

    grey = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("L")
    small = np.asarray(grey.resize((size + 1, size), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).ravel()
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count() if hasattr(int, "bit_count") else bin(a ^ b).count("1")


def near_duplicates(keys: Sequence[tuple[str, int, str]], max_distance: int = 4) -> dict[str, str]:
    """``keys``: (item id, image hash, question) in priority order (the first of a set is kept).

    Returns dropped id -> the id it duplicates."""
    kept_by_question: dict[str, list[tuple[str, int]]] = {}
    dropped: dict[str, str] = {}
    for item_id, h, question in keys:
        q = normalize_text(question)
        bucket = kept_by_question.setdefault(q, [])
        dup = next((kid for kid, kh in bucket if hamming(kh, h) <= max_distance), None)
        if dup is not None:
            dropped[item_id] = dup
        else:
            bucket.append((item_id, h))
    return dropped
