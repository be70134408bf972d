"""Many inputs from a few real photos: augmentations and copy-paste composites, each with a question.

A few dozen photos are too few to train on; the teacher graph labels every new input, which is the point of
distillation. Two kinds of input are made from the training photos:

- an **augmentation** of one photo (flip, scale/crop, colour jitter, blur, small rotation);
- a **composite**: objects cut out of photos with the *teacher's own* masks (YOLO boxes -> SAM masks, run
  once per photo and cached) pasted onto a background texture or another photo.

Each input gets a question from a bank of templates whose object names are the labels the teacher found in
the photos used. Held-out photos are never used to make training inputs; each is written untouched, once
per question, marked ``heldout`` so evaluation sees real, unseen photos. A held-out photo is asked questions
from the templates *and* from a separate bank phrased unlike them (:data:`HELDOUT_GENERIC`,
:data:`HELDOUT_LABEL`), which no training input is ever asked: evaluation also measures whether the student
carries to wording it never saw. Every row's provenance lists every real photo that went into it (the
splitter keeps them in one split). Deterministic for a seed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graphdistill.errors import GraphdistillError
from graphdistill.images import IMAGE_SUFFIXES, load_image
from graphdistill.recording.photos import BACKGROUNDS, BUILTIN, DEFAULT_HELDOUT

log = logging.getLogger(__name__)


__all__ = [
    "DEFAULT_HELDOUT",
    "Cutout",
    "InputsError",
    "SourcePhoto",
    "augment",
    "builtin_sources",
    "composite",
    "folder_sources",
    "make_heldout_questions",
    "make_inputs",
    "make_question",
    "teacher_cutouts",
]


class InputsError(GraphdistillError, ValueError):
    """Bad input to input making (no photos, an unknown held-out id, ...); the message names it."""


@dataclass(frozen=True)
class SourcePhoto:
    id: str  # the provenance id
    loader: Callable[[], np.ndarray]

    def image(self) -> np.ndarray:
        return self.loader()


def builtin_sources() -> list[SourcePhoto]:
    return [SourcePhoto(p.id, p.loader) for p in BUILTIN]


def background_sources() -> list[SourcePhoto]:
    return [SourcePhoto(p.id, p.loader) for p in BACKGROUNDS]


def folder_sources(folder: str | os.PathLike[str] | None) -> list[SourcePhoto]:
    """Every image file under ``folder`` (sorted); its id is ``<folder name>/<relative path>``."""
    if folder is None:
        raise InputsError("no photo folder given")
    root = Path(folder)
    if not root.is_dir():
        raise InputsError(f"photo folder {root}: no such folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputsError(f"photo folder {root}: holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return [
        SourcePhoto(f"{root.name}/{p.relative_to(root).as_posix()}", functools.partial(load_image, p))
        for p in files
    ]


# --------------------------------------------------------------------------------------------------------
# Cut-outs with the teacher's own masks
# --------------------------------------------------------------------------------------------------------


@dataclass
class Cutout:
    """One object cut out of a photo: an RGBA crop (alpha = the teacher's mask) and its label."""

    photo: str
    label: str
    score: float
    rgba: np.ndarray  # h x w x 4 uint8


def cutout_from_mask(
    photo: str, image: np.ndarray, mask: np.ndarray, label: str, score: float
) -> Cutout | None:
    ys, xs = np.nonzero(mask)
    if ys.size < 64:
        return None
    y1, y2, x1, x2 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    rgba = np.dstack([image[y1:y2, x1:x2], (mask[y1:y2, x1:x2] * 255).astype(np.uint8)])
    return Cutout(photo, label, float(score), np.ascontiguousarray(rgba))


def _cache_key(image: np.ndarray, detector: Any, segmenter: Any) -> str:
    h = hashlib.sha256(np.ascontiguousarray(image).tobytes())
    h.update(f"{getattr(detector, 'weights_sha256', '')}|{getattr(segmenter, 'weights_sha256', '')}".encode())
    return h.hexdigest()


def teacher_cutouts(
    photos: Sequence[SourcePhoto],
    *,
    detector: Any = None,
    segmenter: Any = None,
    max_per_photo: int = 4,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, list[Cutout]]:
    """Run the real detector + segmenter once per photo and cut out its objects (cached on disk)."""
    if cache_dir is None:
        from graphdistill._env import home

        cache_dir = home() / "cache" / "cutouts"
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[Cutout]] = {}
    for i, ph in enumerate(photos):
        image = ph.image()
        if detector is None:
            from graphdistill.teachers.detector import YoloDetector

            detector = YoloDetector()
        if segmenter is None:
            from graphdistill.teachers.segmenter import SamSegmenter

            segmenter = SamSegmenter()
        path = cache / f"{_cache_key(image, detector, segmenter)}.npz"
        if path.exists():
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                out[ph.id] = [Cutout(ph.id, m["label"], m["score"], z[f"c{j}"]) for j, m in enumerate(meta)]
        else:
            dets = detector.detect(image)
            order = sorted(range(len(dets)), key=lambda j: -dets.scores[j])[:max_per_photo]
            cuts: list[Cutout] = []
            if order:
                masks = segmenter.segment(image, [dets.xyxy[j] for j in order])
                for j, rle in zip(order, masks.rles, strict=True):
                    c = cutout_from_mask(ph.id, image, rle.decode(), dets.names[j], dets.scores[j])
                    if c is not None:
                        cuts.append(c)
            meta_s = json.dumps([{"label": c.label, "score": c.score} for c in cuts])
            arrays: dict[str, Any] = {f"c{j}": c.rgba for j, c in enumerate(cuts)}
            arrays["meta"] = np.array(meta_s)
            np.savez_compressed(path, **arrays)
            out[ph.id] = cuts
        if progress:
            progress("teacher cut-outs", i + 1, len(photos))
    return out


# --------------------------------------------------------------------------------------------------------
# Augmentations and composites
# --------------------------------------------------------------------------------------------------------


def augment(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """A random flip, scale/crop, colour jitter, blur and small rotation; returns (image, recipe)."""
    from PIL import Image, ImageEnhance, ImageFilter

    pic = Image.fromarray(image)
    recipe: dict[str, Any] = {"kind": "augment"}
    if rng.random() < 0.5:
        pic = pic.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        recipe["flip"] = True
    w, h = pic.size
    crop = float(rng.uniform(0.7, 1.0))
    cw, ch = max(16, round(w * crop)), max(16, round(h * crop))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    scale = float(rng.uniform(0.6, 1.2))
    pic = pic.crop((x0, y0, x0 + cw, y0 + ch)).resize(
        (max(16, round(cw * scale)), max(16, round(ch * scale))), Image.Resampling.BILINEAR
    )
    recipe["crop"] = [x0, y0, x0 + cw, y0 + ch]
    recipe["scale"] = round(scale, 4)
    angle = float(rng.uniform(-10, 10)) if rng.random() < 0.5 else 0.0
    if angle:
        pic = pic.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=(127, 127, 127))
        recipe["rotate"] = round(angle, 3)
    jitter = {
        "brightness": float(rng.uniform(0.75, 1.25)),
        "contrast": float(rng.uniform(0.75, 1.25)),
        "saturation": float(rng.uniform(0.7, 1.3)),
    }
    pic = ImageEnhance.Brightness(pic).enhance(jitter["brightness"])
    pic = ImageEnhance.Contrast(pic).enhance(jitter["contrast"])
    pic = ImageEnhance.Color(pic).enhance(jitter["saturation"])
    recipe["jitter"] = {k: round(v, 4) for k, v in jitter.items()}
    if rng.random() < 0.3:
        radius = float(rng.uniform(0.5, 1.5))
        pic = pic.filter(ImageFilter.GaussianBlur(radius))
        recipe["blur"] = round(radius, 3)
    return np.asarray(pic.convert("RGB"), dtype=np.uint8).copy(), recipe


def composite(
    background: np.ndarray, cutouts: Sequence[Cutout], rng: np.random.Generator, size: int = 512
) -> tuple[np.ndarray, dict[str, Any]]:
    """Paste ``cutouts`` (alpha-blended, random scale and place) onto ``background`` resized to ~``size``."""
    from PIL import Image

    bg = Image.fromarray(background).convert("RGB")
    bw, bh = bg.size
    s = size / max(bw, bh)
    bg = bg.resize((max(32, round(bw * s)), max(32, round(bh * s))), Image.Resampling.BILINEAR)
    W, H = bg.size
    pasted = []
    for c in cutouts:
        ch, cw = c.rgba.shape[:2]
        target = float(rng.uniform(0.25, 0.55)) * min(W, H)
        k = target / max(ch, cw)
        nw, nh = max(8, round(cw * k)), max(8, round(ch * k))
        obj = Image.fromarray(c.rgba, "RGBA").resize((nw, nh), Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            obj = obj.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x, y = int(rng.integers(0, max(1, W - nw))), int(rng.integers(0, max(1, H - nh)))
        bg.paste(obj, (x, y), obj)
        pasted.append({"photo": c.photo, "label": c.label, "box": [x, y, x + nw, y + nh]})
    return np.asarray(bg, dtype=np.uint8).copy(), {"kind": "composite", "pasted": pasted}


# --------------------------------------------------------------------------------------------------------
# Questions
# --------------------------------------------------------------------------------------------------------

GENERIC_QUESTIONS = (
    "What is in the picture?",
    "Describe this image.",
    "What objects can you see?",
)
LABEL_QUESTIONS = (
    "Is there a {x} in the picture?",
    "How many {x}s are there?",
    "Where is the {x}?",
    "What is the {x} next to?",
    "What should I know about the {x}?",
    "What colour is the {x}?",
    "Tell me something about the {x} in this photo.",
)


def make_question(labels: Sequence[str], rng: np.random.Generator) -> tuple[str, dict[str, Any]]:
    """A question from the template bank; object names come from ``labels`` (the teacher's). With no labels
    (``--no-composites`` runs no teacher) only the generic questions: a question about an absent object
    invites the LLM to invent it, and the filter would drop the input."""
    names = list(dict.fromkeys(labels))
    if not names or rng.random() < 0.25:  # no labels known: never ask about an object that may be absent
        i = int(rng.integers(len(GENERIC_QUESTIONS)))
        return GENERIC_QUESTIONS[i], {"template": GENERIC_QUESTIONS[i]}
    t = LABEL_QUESTIONS[int(rng.integers(len(LABEL_QUESTIONS)))]
    x = names[int(rng.integers(len(names)))]
    return t.format(x=x), {"template": t, "x": x}


# Asked only about held-out photos, never in a training input: free-form wording unlike the templates above
# (no "Is there a ...", "How many ...s", "Where is the ...", "What colour ..."), so the evaluation tells
# whether the student answers the question or only recognises a template.
HELDOUT_GENERIC = (
    "Give me a quick rundown of this scene.",
    "Who or what is the main subject?",
    "Anything here I could drink from?",
    "What's going on in this shot?",
    "If you had to caption this photo in a few words, what would you write?",
    "Is anybody in this photo?",
    "Which things here could someone pick up and carry?",
)
HELDOUT_LABEL = (
    "I think I spot a {x}. Am I right?",
    "Could you count the {x}s for me?",
    "In which part of the frame does the {x} sit?",
    "What's around the {x}?",
    "Anything worth knowing about that {x}?",
    "Would you call that a {x}, or something else?",
)


def make_heldout_questions(
    labels: Sequence[str], n: int, rng: np.random.Generator
) -> list[tuple[str, dict[str, Any]]]:
    """``n`` different questions for one held-out photo, alternating banks: template questions
    (:func:`make_question`, as training inputs are asked) in the even slots, questions from the held-out
    bank (:data:`HELDOUT_GENERIC`, and :data:`HELDOUT_LABEL` with the teacher's ``labels``) in the odd ones;
    each recipe says which (``bank``: ``"template"`` or ``"heldout"``). Fewer than ``n`` only when the banks
    run out of different questions."""
    names = list(dict.fromkeys(labels))
    out: list[tuple[str, dict[str, Any]]] = []
    asked: set[str] = set()
    for _ in range(16 * max(1, n)):
        if len(out) >= n:
            break
        if len(out) % 2 == 0:
            q, recipe = make_question(names, rng)
            recipe = {"bank": "template", **recipe}
        elif names and rng.random() < 0.5:
            t = HELDOUT_LABEL[int(rng.integers(len(HELDOUT_LABEL)))]
            x = names[int(rng.integers(len(names)))]
            q, recipe = t.format(x=x), {"bank": "heldout", "template": t, "x": x}
        else:
            q = HELDOUT_GENERIC[int(rng.integers(len(HELDOUT_GENERIC)))]
            recipe = {"bank": "heldout", "template": q}
        if q not in asked:
            asked.add(q)
            out.append((q, recipe))
    return out


def _photo_rng(seed: int, photo_id: str) -> np.random.Generator:
    """A generator of its own for one photo's held-out questions: they depend on the seed and the photo
    only, never on how many training inputs are made or on which other photos are held out."""
    digest = hashlib.sha256(f"{seed}\0{photo_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


# --------------------------------------------------------------------------------------------------------
# Making the inputs file
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Writer:
    out: Path
    images: Path
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(
        self, image: np.ndarray, question: str, photos: list[str], recipe: dict[str, Any], **extra: Any
    ) -> None:
        from PIL import Image

        name = f"{len(self.rows):06d}.png"
        Image.fromarray(image).save(self.images / name, compress_level=3)
        rel = os.path.relpath(self.images / name, self.out.parent)
        self.rows.append(
            {"image": rel, "question": question, "provenance": {"photos": photos, "recipe": recipe}, **extra}
        )


def make_inputs(
    photos: Sequence[SourcePhoto],
    *,
    n: int,
    seed: int,
    out: str | os.PathLike[str],
    heldout: Iterable[str] = (),
    composites: bool = True,
    cutouts: dict[str, list[Cutout]] | None = None,
    backgrounds: Sequence[SourcePhoto] | None = None,
    composite_share: float = 0.4,
    families: int = 3,
    heldout_questions: int = 3,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Write ``out`` (JSONL) and ``<out stem>_images/*.png``: each held-out photo (untouched, with up to
    ``heldout_questions`` different questions from :func:`make_heldout_questions`, so evaluation has several
    rows per real unseen photo, some worded unlike any training question), then ``n`` inputs.

    ``cutouts`` (photo id -> cut-outs) skips the teacher (tests); otherwise, with ``composites``, the real
    detector + segmenter cut objects out of each training photo once. Image paths in the rows are relative
    to the JSONL's folder. Texture backgrounds (photos.BACKGROUNDS: no objects) are named in the recipe, not
    in ``provenance.photos``; source photos used as a background are in both."""
    if n < 0:
        raise InputsError(f"n must be >= 0, got {n}")
    held = set(heldout)
    known = {p.id for p in photos}
    missing = sorted(held - known)
    if missing:
        raise InputsError(
            f"held-out photo(s) {', '.join(missing)} are not among the photos ({', '.join(sorted(known))})"
        )
    train = [p for p in photos if p.id not in held]
    if n > 0 and not train:
        raise InputsError("every photo is held out: nothing left to make training inputs from")
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    images_dir = out_path.with_name(out_path.stem + "_images")
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tick = progress or (lambda stage, done, total: None)

    if composites and cutouts is None and n > 0:
        # held-out photos too, for their question labels only: their cut-outs are never pasted
        cutouts = teacher_cutouts(list(photos), progress=progress)
    cutouts = cutouts or {}
    labels = {pid: [c.label for c in cs] for pid, cs in cutouts.items()}
    pool = [c for p in train for c in cutouts.get(p.id, [])]
    use_composites = composites and bool(pool)
    bgs = list(backgrounds) if backgrounds is not None else background_sources()
    # Composites mix photos only within one family, so provenance does not tie every photo into one
    # component (which would leave the splitter nothing to put in val/test).
    by_hash = sorted(train, key=lambda p: hashlib.sha256(f"{seed}:{p.id}".encode()).hexdigest())
    family = {p.id: i % max(1, families) for i, p in enumerate(by_hash)}
    fams = sorted({family[c.photo] for c in pool})

    writer = _Writer(out_path, images_dir)
    for p in photos:  # each held-out photo untouched, asked up to `heldout_questions` different questions
        if p.id in held:
            image = p.image()
            for q, qr in make_heldout_questions(
                labels.get(p.id, []), heldout_questions, _photo_rng(seed, p.id)
            ):
                writer.add(
                    image, q, [p.id], {"kind": "heldout", "heldout": True, "question": qr}, heldout=True
                )

    cache: dict[str, np.ndarray] = {}

    def image_of(ph: SourcePhoto) -> np.ndarray:
        if ph.id not in cache:
            cache[ph.id] = ph.image()
        return cache[ph.id]

    n_comp = 0
    for i in range(n):
        if use_composites and rng.random() < composite_share:
            fam = fams[int(rng.integers(len(fams)))]
            sub = [c for c in pool if family[c.photo] == fam]
            k = int(rng.integers(1, min(3, len(sub)) + 1))
            picks = [sub[j] for j in rng.choice(len(sub), size=k, replace=False)]
            options = bgs + [p for p in train if family[p.id] == fam]
            bg = options[int(rng.integers(len(options)))]
            img, recipe = composite(image_of(bg), picks, rng)
            recipe["background"] = bg.id
            recipe["family"] = fam
            real = [bg.id] if bg in train else []
            used = list(dict.fromkeys(real + [c.photo for c in picks]))
            q, qr = make_question([c.label for c in picks], rng)
            n_comp += 1
        else:
            src = train[int(rng.integers(len(train)))]
            img, recipe = augment(image_of(src), rng)
            used = [src.id]
            q, qr = make_question(labels.get(src.id, []), rng)
        recipe["question"] = qr
        writer.add(img, q, used, recipe)
        tick("inputs", i + 1, n)

    tmp = out_path.with_suffix(".jsonl.tmp")
    with tmp.open("w") as f:
        for row in writer.rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(out_path)
    log.info("wrote %d inputs to %s", len(writer.rows), out_path)
    return {
        "out": str(out_path),
        "images": str(images_dir),
        "rows": len(writer.rows),
        "heldout": len(held),
        "composites": n_comp,
        "augmented": n - n_comp,
        "seed": seed,
    }
