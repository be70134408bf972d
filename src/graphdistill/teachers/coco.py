"""The 80 COCO class names in YOLO / ultralytics order (class id = index), and which of them a text names."""

from __future__ import annotations

import re
from collections.abc import Sequence

COCO_CLASSES: tuple[str, ...] = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)

assert len(COCO_CLASSES) == 80

# a few everyday words for COCO classes (the LLM rarely says "person")
SYNONYMS: dict[str, str] = {
    "people": "person",
    "man": "person",
    "men": "person",
    "woman": "person",
    "women": "person",
    "boy": "person",
    "girl": "person",
    "kitten": "cat",
    "puppy": "dog",
    "motorbike": "motorcycle",
    "bike": "bicycle",
    "plane": "airplane",
    "aeroplane": "airplane",
    "sofa": "couch",
    "cellphone": "cell phone",
    "phone": "cell phone",
    "mug": "cup",
}


def mentioned_classes(text: str, class_names: Sequence[str]) -> tuple[set[str], set[str]]:
    """(classes the text mentions, classes it denies), matching singular/plural and a few synonyms."""
    t = " " + re.sub(r"[^a-z0-9 ]+", " ", text.lower()) + " "
    t = " ".join(t.split())
    vocab = {n: n for n in class_names}
    vocab.update({w: n for w, n in SYNONYMS.items() if n in vocab})
    mentioned: set[str] = set()
    denied: set[str] = set()
    # "there is no cat", "without a dog", "there isn't a cup"; not "this is not a cat" (a naming, not absence)
    neg = (
        r"(?:no|not any|without(?: an?| any)?|nor an?|there (?:is|are) not (?:an?|any)|"
        r"there (?:isn t|aren t|wasn t|weren t) (?:an?|any))"
    )
    for word, cls in vocab.items():
        w = re.escape(word)
        pat = rf"\b{w}(?:s|es)?\b"
        if re.search(pat, t):
            mentioned.add(cls)
            if re.search(rf"\b{neg} (?:\w+ )?{pat}", t):
                denied.add(cls)
    return mentioned - denied, denied
