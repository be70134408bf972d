"""The CLIP image/text embedder teacher (open_clip), with an honest answer to "there are no weights".

No real CLIP weights can be had offline (see MODELS.md), so this adapter never pretends: it loads a
checkpoint file the user supplies, or, only when asked with ``random_weights=True``, a seeded random
initialisation whose ``model_id`` says "RANDOM WEIGHTS" so every trace and report carrying it says so too.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graphdistill._env import apply_offline_env
from graphdistill._lazy import require
from graphdistill.errors import GraphdistillError
from graphdistill.images import to_rgb_uint8
from graphdistill.weights import resolve

log = logging.getLogger(__name__)

RANDOM_MARK = "RANDOM WEIGHTS"


class NoClipWeightsError(GraphdistillError, ValueError):
    """A CLIP embedder was asked for without weights (and without explicitly accepting random ones)."""


def _pick_device(device: str | None) -> str:
    if device:
        return device
    torch = require("torch", purpose="the CLIP embedder")
    return "cuda" if torch.cuda.is_available() else "cpu"


class ClipEmbedder:
    """open_clip as a teacher: ``embed_images(rgbs)`` and ``embed_texts(texts)`` -> float32 [n, dim], L2-normalised.

    ``checkpoint`` is a local state-dict file (``.pt``/``.bin``/``.safetensors``) for ``arch``. Without one the
    constructor refuses unless ``random_weights=True``; the random model is a seeded, deterministic
    initialisation, useful for plumbing and tests but semantically meaningless.
    """

    def __init__(
        self,
        arch: str = "ViT-B-32",
        checkpoint: str | os.PathLike[str] | None = None,
        random_weights: bool = False,
        device: str | None = None,
        seed: int = 0,
        batch_size: int = 32,
    ) -> None:
        if checkpoint is None and not random_weights:
            raise NoClipWeightsError(
                f"ClipEmbedder({arch!r}) needs weights: no pretrained CLIP weights are available offline. "
                "Pass checkpoint=<path to a local open_clip state dict for this arch>, or random_weights=True "
                "to run on a seeded random initialisation (its model_id will say RANDOM WEIGHTS)."
            )
        if checkpoint is not None and random_weights:
            raise ValueError("ClipEmbedder: pass either checkpoint=... or random_weights=True, not both")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        ckpt_path: Path | None = None
        ckpt_sha = ""
        if checkpoint is not None:
            ckpt_path, ckpt_sha = resolve(checkpoint)
            if not ckpt_path.is_file():
                raise ValueError(f"CLIP checkpoint {ckpt_path} is not a file (expected a state-dict file)")
        apply_offline_env()  # HF_HUB_OFFLINE: otherwise the tokenizer lookup retries the hub for ~47 s
        torch = require("torch", purpose="the CLIP embedder")
        open_clip = require("open_clip", purpose="the CLIP embedder")
        if arch not in open_clip.list_models():
            raise ValueError(
                f"unknown open_clip architecture {arch!r}; open_clip.list_models() lists the valid ones"
            )
        self.arch = arch
        self.device = _pick_device(device)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.random_weights = checkpoint is None
        self.checkpoint = ckpt_path
        # the random init draws from torch's global RNG: seed a private fork so callers' RNG state is untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(
                    arch, pretrained=str(ckpt_path) if ckpt_path else None, device=self.device
                )
            # open_clip reports a checkpoint of another shape by RuntimeError (load_state_dict) or by a bare
            # assert in its resize helpers
            except (RuntimeError, AssertionError, KeyError, ValueError) as exc:
                if ckpt_path is None:
                    raise
                detail = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
                raise ValueError(
                    f"CLIP checkpoint {ckpt_path} does not fit architecture {arch!r}: {detail}"
                ) from exc
        model.eval()
        self._model = model
        self._weights_sha256: str | None = None
        self._preprocess = preprocess
        self._tokenizer = open_clip.get_tokenizer(arch)
        self.dim: int = int(open_clip.get_model_config(arch)["embed_dim"])
        if self.random_weights:
            self.model_id = f"open_clip/{arch} ({RANDOM_MARK}, seed={self.seed})"
        else:
            assert ckpt_path is not None
            self.model_id = f"open_clip/{arch} ({ckpt_path.name})"
            self._weights_sha256 = ckpt_sha
        log.info("built %s on %s", self.model_id, self.device)

    @property
    def weights_sha256(self) -> str:
        """sha256 of the checkpoint file; for random weights, of the initialised tensors (computed on first use)."""
        if self._weights_sha256 is None:
            h = hashlib.sha256()
            for name, tensor in sorted(self._model.state_dict().items()):
                h.update(name.encode())
                h.update(np.ascontiguousarray(tensor.detach().float().cpu().numpy()).data)
            self._weights_sha256 = h.hexdigest()
        return self._weights_sha256

    @weights_sha256.setter
    def weights_sha256(self, value: str) -> None:
        self._weights_sha256 = value

    def _encode(self, fn: Any, batch: Any) -> np.ndarray:
        torch = require("torch")
        with torch.inference_mode():
            out = fn(batch.to(self.device), normalize=True)
        return np.asarray(out.float().cpu().numpy(), dtype=np.float32)

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """RGB uint8 HxWx3 images -> float32 [n, dim], each row of unit length."""
        if len(images) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        from PIL import Image

        torch = require("torch")
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            pixels = torch.stack(
                [
                    self._preprocess(Image.fromarray(to_rgb_uint8(img, f"CLIP image #{start + i}")))
                    for i, img in enumerate(chunk)
                ]
            )
            out.append(self._encode(self._model.encode_image, pixels))
        return np.concatenate(out)

    def embed_image(self, image: np.ndarray) -> np.ndarray:
        """One image -> float32 [dim]."""
        vec: np.ndarray = self.embed_images([image])[0]
        return vec

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> float32 [n, dim], each row of unit length (same space as the images)."""
        if isinstance(texts, str):
            raise TypeError("embed_texts takes a list of strings; use embed_text for one string")
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self._tokenizer(list(texts[start : start + self.batch_size]))
            out.append(self._encode(self._model.encode_text, tokens))
        return np.concatenate(out)

    def embed_text(self, text: str) -> np.ndarray:
        """One text -> float32 [dim]."""
        vec: np.ndarray = self.embed_texts([text])[0]
        return vec

    def __repr__(self) -> str:
        return f"ClipEmbedder({self.model_id!r}, device={self.device!r})"
