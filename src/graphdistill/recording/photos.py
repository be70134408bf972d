"""The built-in real photos: the ones that ship inside scikit-image, ultralytics and matplotlib, and a few of
OpenCV's sample images (fetched once from the opencv-python sdist on the package index and verified, as the
weights are: ``graphdistill weights fetch opencv-samples``; ``make setup`` does it).

Each photo has a stable id (used as provenance, so every input made from it lands in one split). Photos of
one scene (the stereo pair) share an id for the same reason.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from importlib import util as import_util
from pathlib import Path

import numpy as np

from graphdistill.images import load_image, to_rgb_uint8


@dataclass(frozen=True)
class Photo:
    id: str  # provenance id: "skimage/chelsea", "ultralytics/bus"
    source: str  # where it comes from, for the report
    licence: str
    loader: Callable[[], np.ndarray]
    objects: str  # what a person sees in it (not a label the pipeline uses)

    def image(self) -> np.ndarray:
        return self.loader()


def _skimage(name: str, index: int | None = None) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data

        arr = getattr(data, name)()
        if index is not None:
            arr = arr[index]
        return to_rgb_uint8(arr, f"skimage.data.{name}")

    return load


def _ultralytics_asset(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        spec = import_util.find_spec("ultralytics")
        if spec is None or not spec.submodule_search_locations:
            from graphdistill._lazy import MissingDependencyError

            raise MissingDependencyError(
                f"the built-in photo {name} ships with ultralytics: pip install 'graphdistill[detect]'"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / "assets" / name
        return load_image(path)

    return load


def _matplotlib_sample(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        # the file itself, not cbook.get_sample_data: that returns an open handle the caller must close
        import matplotlib

        return load_image(Path(matplotlib.get_data_path()) / "sample_data" / name)

    return load


@functools.cache
def _opencv_dir() -> Path:
    """The fetched, verified OpenCV sample folder: verified once per process (its digest reads all 22 MB)."""
    from graphdistill import weights

    return weights.path("opencv-samples")


def _opencv_sample(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        return load_image(_opencv_dir() / name)

    return load


def _opencv(name: str, objects: str) -> Photo:
    stem = name.rsplit(".", 1)[0]
    return Photo(
        f"opencv/{stem}",
        f"opencv-python 4.10.0.84 sdist: opencv/samples/data/{name}",
        _OCV,
        _opencv_sample(name),
        objects,
    )


_PD = "public domain / CC0 (scikit-image data)"
_OCV = "OpenCV sample data (OpenCV is Apache-2.0; the images' own terms are not stated)"
BUILTIN: list[Photo] = [
    Photo("skimage/chelsea", "skimage.data.chelsea", _PD, _skimage("chelsea"), "a cat"),
    Photo(
        "skimage/astronaut",
        "skimage.data.astronaut",
        _PD,
        _skimage("astronaut"),
        "a person (astronaut), a flag",
    ),
    Photo("skimage/coffee", "skimage.data.coffee", _PD, _skimage("coffee"), "a cup of coffee on a saucer"),
    Photo("skimage/rocket", "skimage.data.rocket", _PD, _skimage("rocket"), "a rocket on a launch pad"),
    Photo(
        "skimage/camera", "skimage.data.camera", _PD, _skimage("camera"), "a person with a camera (grayscale)"
    ),
    Photo(
        "skimage/stereo_motorcycle",
        "skimage.data.stereo_motorcycle[0]",
        _PD,
        _skimage("stereo_motorcycle", 0),
        "a motorcycle",
    ),
    Photo("skimage/clock", "skimage.data.clock", _PD, _skimage("clock"), "a wall clock"),
    Photo(
        "ultralytics/bus",
        "ultralytics/assets/bus.jpg",
        "AGPL-3.0 (ultralytics assets)",
        _ultralytics_asset("bus.jpg"),
        "a bus and people",
    ),
    Photo(
        "ultralytics/zidane",
        "ultralytics/assets/zidane.jpg",
        "AGPL-3.0 (ultralytics assets)",
        _ultralytics_asset("zidane.jpg"),
        "two people, a tie",
    ),
    Photo(
        "matplotlib/grace_hopper",
        "matplotlib mpl-data/sample_data/grace_hopper.jpg",
        # a U.S. Navy portrait; matplotlib added it as a public-domain image (matplotlib pull request #1599)
        "public domain (U.S. Navy photograph, shipped in matplotlib's sample data)",
        _matplotlib_sample("grace_hopper.jpg"),
        "a person in uniform, a tie",
    ),
    # OpenCV's sample photos in which the default detector (YOLO11n, conf 0.25) finds objects, all held out
    # by default; one of each series (the calibration photos left01..14 / right01..14 are one office: left13
    # alone stands for it)
    _opencv("basketball1.png", "two basketball players"),
    _opencv("messi5.jpg", "football players and a ball"),
    _opencv("fruits.jpg", "oranges, apples and other fruit"),
    _opencv("building.jpg", "a building and a parked car"),
    _opencv("licenseplate_motion.jpg", "a car, motion-blurred"),
    _opencv("leuvenB.jpg", "a street with bicycles (Leuven)"),
    _opencv("left13.jpg", "a person with a tie holding a chessboard, a laptop, a keyboard"),
    _opencv("squirrel_cls.jpg", "a squirrel"),
]

# Textures with no objects: backgrounds for copy-paste composites.
BACKGROUNDS: list[Photo] = [
    Photo("skimage/brick", "skimage.data.brick", _PD, _skimage("brick"), "brick wall"),
    Photo("skimage/grass", "skimage.data.grass", _PD, _skimage("grass"), "grass"),
    Photo("skimage/gravel", "skimage.data.gravel", _PD, _skimage("gravel"), "gravel"),
]

# Held out by default: nothing in training is made from these (evaluation on real, unseen photos). Twelve
# distinct photos in which the default teacher (YOLO11n, conf 0.25) finds objects: coffee (cup, dining table,
# spoon), zidane (two people, a tie), grace_hopper (a person, a tie), camera (a person, a bicycle; grayscale),
# and the eight OpenCV photos (people and a sports ball, oranges, cars, bicycles, a laptop, a keyboard, a tie,
# and what the detector takes for a bird). Training inputs come from the other six (chelsea, astronaut,
# rocket, motorcycle, clock, bus). The OpenCV photos were tried as training photos first (14 instead of 6 at
# the same teacher budget): held-out fidelity did not rise (README, Measuring fidelity), so they measure.
DEFAULT_HELDOUT = (
    "skimage/coffee",
    "ultralytics/zidane",
    "matplotlib/grace_hopper",
    "skimage/camera",
    "opencv/basketball1",
    "opencv/messi5",
    "opencv/fruits",
    "opencv/building",
    "opencv/licenseplate_motion",
    "opencv/leuvenB",
    "opencv/left13",
    "opencv/squirrel_cls",
)


def builtin_photos() -> list[Photo]:
    return list(BUILTIN)


def photo(photo_id: str) -> Photo:
    for p in [*BUILTIN, *BACKGROUNDS]:
        if p.id == photo_id:
            return p
    raise KeyError(f"no built-in photo {photo_id!r}; known: {', '.join(p.id for p in BUILTIN)}")
