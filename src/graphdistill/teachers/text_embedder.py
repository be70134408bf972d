"""The text embedder teacher: sentence-transformers (default all-MiniLM-L6-v2, 384-d) on a local folder."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from graphdistill import weights as weights_mod
from graphdistill._env import apply_offline_env
from graphdistill._lazy import require
from graphdistill.teachers.base import pick_device

log = logging.getLogger(__name__)


class SentenceEmbedder:
    """``embed(texts) -> float32 [n, dim]``, every row L2-normalised (cosine similarity = dot product)."""

    def __init__(
        self,
        weights: str | os.PathLike[str] = "all-minilm-l6-v2",
        device: str | None = "cpu",
        seed: int = 0,
        batch_size: int = 64,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        apply_offline_env()  # sentence-transformers must never try the hub
        st: Any = require("sentence_transformers", purpose="the text embedder")
        self.device = pick_device(device)
        self.seed = seed
        self.batch_size = batch_size
        name = os.fspath(weights)
        self.weights = name  # what was asked for: a registry name or a local folder
        folder, self.weights_sha256 = weights_mod.resolve(name)
        if not folder.is_dir():
            raise ValueError(f"text embedder weights {name!r} must be a sentence-transformers model folder")
        reg = weights_mod.REGISTRY.get(name)
        self.model_id = reg.model_id if reg else folder.name
        t0 = time.perf_counter()
        self.model: Any = st.SentenceTransformer(str(folder), device=self.device, local_files_only=True)
        log.info("loaded %s in %.2f s", self.model_id, time.perf_counter() - t0)
        getter = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )  # renamed in sentence-transformers 6
        dim = getter()
        if dim is None:  # some models only know it after a forward pass
            dim = int(self._encode(["probe"]).shape[1])
        self.dim = int(dim)

    def _encode(self, texts: list[str]) -> np.ndarray:
        out = self.model.encode(
            texts,
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(out, dtype=np.float32)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` (one string counts as one text)."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        if not batch:
            return np.zeros((0, self.dim), dtype=np.float32)
        for i, t in enumerate(batch):
            if not isinstance(t, str):
                raise TypeError(f"text {i} to embed is a {type(t).__name__}, not a str")
        return self._encode(batch)

    def embed_batch(self, batches: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Several lists of texts in one pass through the model."""
        flat = [t for b in batches for t in b]
        vecs = self.embed(flat)
        out, start = [], 0
        for b in batches:
            out.append(vecs[start : start + len(b)])
            start += len(b)
        return out


def load_retrieval_teacher(ref: dict[str, Any]) -> Any:
    """A retriever's offer (:meth:`ChromaRetriever.student_offer`) -> ``teachers.base.RetrievalTeacher``: the
    same text embedder, loaded again from its name or folder; its weights must still have the recorded sha256
    (rankings from other weights would teach the student another retriever)."""
    from graphdistill.teachers.base import OfferError, RetrievalTeacher

    name = str(ref.get("embedder") or "")
    try:
        embedder = SentenceEmbedder(name)  # resolves (and hashes) the weights once
    except (OSError, ValueError, weights_mod.WeightsError) as exc:
        raise OfferError(f"retriever offer {name!r}: cannot load its text embedder ({exc})") from exc
    sha = embedder.weights_sha256
    if ref.get("weights_sha256") and sha != ref["weights_sha256"]:
        raise OfferError(
            f"retriever offer {name!r}: the embedder's sha256 {sha[:12]}… is not the recorded "
            f"{str(ref['weights_sha256'])[:12]}… (the weights changed since the traces were recorded)"
        )
    return RetrievalTeacher(
        kind="text-retriever",
        embed=embedder.embed,
        k=int(ref.get("k") or 3),
        model_id=embedder.model_id,
        weights_sha256=sha,
    )
