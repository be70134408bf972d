"""Pictures of graph outputs: boxes, labels and scores, semi-transparent masks, the answer under the image.

Used by ``graphdistill run --out``, by the student's predictions and by the reports. Pillow + numpy only.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from graphdistill.trace import RLE

# tab10, as 0-255 RGB: distinct colours for up to ten objects, then they repeat
PALETTE: list[tuple[int, int, int]] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]
MASK_ALPHA = 0.45


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _mask_array(mask: Any, shape: tuple[int, int]) -> np.ndarray | None:
    if mask is None:
        return None
    rle = mask if isinstance(mask, RLE) else RLE.model_validate(mask)
    m = rle.decode()
    if m.shape != shape:  # a mask for another resolution: resize nearest
        from PIL import Image

        m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((shape[1], shape[0]), 0)) > 127
    return m


def _get(obj: Any, key: str, default: Any = None) -> Any:
    return obj.get(key, default) if isinstance(obj, Mapping) else getattr(obj, key, default)


def draw_output(image: np.ndarray, output: Mapping[str, Any], title: str | None = None) -> Any:
    """The image with the output's objects drawn on it and its answer (and sources) written underneath."""
    from PIL import Image, ImageDraw

    img = np.asarray(image)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    canvas = img[:, :, :3].astype(np.float32).copy()
    h, w = canvas.shape[:2]
    objects = list(output.get("objects") or [])
    for i, obj in enumerate(objects):
        m = _mask_array(_get(obj, "mask"), (h, w))
        if m is not None and m.any():
            tint = np.array(PALETTE[i % len(PALETTE)], dtype=np.float32)
            canvas[m] = canvas[m] * (1 - MASK_ALPHA) + tint * MASK_ALPHA
    pic = Image.fromarray(canvas.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pic)
    scale = max(h, w) / 640
    line = max(2, round(2 * scale))
    font = _font(max(12, round(14 * scale)))
    for i, obj in enumerate(objects):
        colour = PALETTE[i % len(PALETTE)]
        x1, y1, x2, y2 = (float(v) for v in _get(obj, "box"))
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=line)
        score = _get(obj, "score")
        label = (
            f"{_get(obj, 'label', '?')} {score:.2f}" if score is not None else str(_get(obj, "label", "?"))
        )
        tb = draw.textbbox((0, 0), label, font=font)
        tw, th = tb[2] - tb[0], tb[3] - tb[1]
        ty = y1 - th - 4 if y1 - th - 4 >= 0 else y1
        draw.rectangle([x1, ty, x1 + tw + 6, ty + th + 4], fill=colour)
        draw.text((x1 + 3, ty + 1 - tb[1]), label, fill=(255, 255, 255), font=font)
    return _with_caption(pic, output, title, font)


def _with_caption(pic: Any, output: Mapping[str, Any], title: str | None, font: Any) -> Any:
    from PIL import Image, ImageDraw

    w, h = pic.size
    probe = ImageDraw.Draw(pic)
    char_w = max(1, probe.textbbox((0, 0), "abcdefghij", font=font)[2] / 10)
    width_chars = max(20, int((w - 16) / char_w))
    lines: list[str] = []
    if title:
        lines.append(title)
    answer = output.get("answer")
    if answer is not None:
        lines += textwrap.wrap(f"answer: {answer}", width_chars) or ["answer: (empty)"]
    sources = output.get("sources")
    if sources:
        lines += textwrap.wrap("sources: " + ", ".join(str(s) for s in sources), width_chars)
    if not lines:
        return pic
    line_h = probe.textbbox((0, 0), "Ag", font=font)[3] + 6
    out = Image.new("RGB", (w, h + line_h * len(lines) + 12), (255, 255, 255))
    out.paste(pic, (0, 0))
    draw = ImageDraw.Draw(out)
    for j, text in enumerate(lines):
        draw.text((8, h + 6 + j * line_h), text, fill=(0, 0, 0), font=font)
    return out


def side_by_side(images: Sequence[Any], titles: Sequence[str] | None = None, gap: int = 8) -> Any:
    """Pictures (PIL images or arrays) in one row, bottom-padded to the tallest, each with its title above."""
    from PIL import Image, ImageDraw

    if not images:
        raise ValueError("side_by_side needs at least one image")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"side_by_side got {len(images)} images but {len(titles)} titles")
    pics = [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im)) for im in images]
    pics = [p.convert("RGB") for p in pics]
    font = _font(16)
    title_h = 26 if titles else 0
    width = sum(p.width for p in pics) + gap * (len(pics) - 1)
    height = max(p.height for p in pics) + title_h
    out = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    x = 0
    for i, p in enumerate(pics):
        if titles:
            draw.text((x + 4, 4), titles[i], fill=(0, 0, 0), font=font)
        out.paste(p, (x, title_h))
        x += p.width + gap
    return out
