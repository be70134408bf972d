"""Where graphdistill keeps its files, and the settings that keep every library from calling home."""

from __future__ import annotations

import os
from pathlib import Path

# Every library we drive has a way to phone home; each is switched off here, before the library is
# imported. Users can still override any of them in their environment (setdefault).
OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",  # huggingface_hub: no hub calls (transformers, sentence-transformers, open_clip)
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_DATASETS_OFFLINE": "1",
    "YOLO_OFFLINE": "1",  # ultralytics: no hub/settings sync, no update checks
    "YOLO_AUTOINSTALL": "0",  # ultralytics: never pip-install at run time
    "YOLO_VERBOSE": "False",
    "ANONYMIZED_TELEMETRY": "False",  # chromadb: posthog telemetry off
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def home() -> Path:
    """The cache root: ``$GRAPHDISTILL_HOME`` or ``~/.cache/graphdistill``."""
    root = os.environ.get("GRAPHDISTILL_HOME")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "graphdistill"
    return path


def weights_dir() -> Path:
    return home() / "weights"


def apply_offline_env() -> dict[str, str]:
    """Set the offline switches (without overriding the user's explicit choices) and return those in force.

    Also gives ultralytics a config dir with a font already in place, so that it never asks github.com for
    ``Arial.ttf`` (it does so during dataset checks and plotting, even with ``plots=False``).
    """
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    if "YOLO_CONFIG_DIR" not in os.environ:
        cfg = home() / "ultralytics"
        _ensure_ultralytics_font(cfg)
        os.environ["YOLO_CONFIG_DIR"] = str(cfg)
    return {k: os.environ[k] for k in [*OFFLINE_ENV, "YOLO_CONFIG_DIR"] if k in os.environ}


def _ensure_ultralytics_font(cfg: Path) -> None:
    target = cfg / "Ultralytics"
    font = target / "Arial.ttf"
    if font.exists():
        return
    try:
        import matplotlib  # light enough, and a core dependency: ships DejaVuSans.ttf

        src = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        target.mkdir(parents=True, exist_ok=True)
        tmp = font.with_suffix(".tmp")
        tmp.write_bytes(src.read_bytes())
        tmp.replace(font)
        # ultralytics also looks for its settings file; an explicit one stops it from writing defaults
        # that enable sync.
    except OSError:  # a read-only home is not fatal: ultralytics then only fails where it needs the font
        return


def offline_status() -> dict[str, str | None]:
    keys = [*OFFLINE_ENV, "YOLO_CONFIG_DIR", "GRAPHDISTILL_HOME"]
    return {k: os.environ.get(k) for k in keys}
