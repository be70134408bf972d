"""The retriever teacher: a Chroma vector store over the knowledge base, embedded with OUR embedders.

Embedded (``chromadb.PersistentClient``, default ``$GRAPHDISTILL_HOME/kb/chroma``) or remote
(``chromadb.HttpClient`` when ``url=`` is given). Telemetry is off. Every collection is created with an
embedding function that wraps one of our teacher embedders: chromadb's default embedding function (which
would try to download an ONNX model) is never used. Distances are cosine distances (``1 - cos``).

When an image embedder (a CLIP-style model with ``embed_images`` / ``embed_texts``) is configured, the same
documents are also indexed in a second collection through its text tower, so that an image embedding can
query the knowledge base directly; the retriever's ``model_id`` and ``weights_sha256`` then cover both
embedders.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from graphdistill._env import apply_offline_env, home
from graphdistill._lazy import require
from graphdistill.errors import GraphdistillError
from graphdistill.teachers.base import ImageEmbedder, TextEmbedder
from graphdistill.trace import Document

log = logging.getLogger(__name__)

EF_NAME = "graphdistill"
MIN_NAME, MAX_NAME = 3, 512  # chromadb's limits on collection names
_SCALAR = (str, int, float, bool)
# embedders already loaded in this process, by weights sha256: chromadb rebuilds a collection's embedding
# function from its stored config when the collection is reopened, and must not load a second copy
_LIVE: weakref.WeakValueDictionary[tuple[str, str], Any] = weakref.WeakValueDictionary()


def labelled_query(question: str, labels: Sequence[str]) -> str:
    """The text a visual RAG retriever embeds: the question, then each detected label once, in order
    ("What is it? cat dog"). One implementation: the reference graph queries with it, and the student's
    retrieval distillation (:mod:`graphdistill.student.retrieval_kd`) asks the teacher's embedder the same way."""
    names = list(dict.fromkeys(str(n) for n in labels))
    return question.strip() + (" " + " ".join(names) if names else "")


class RetrieverError(GraphdistillError, ValueError):
    """Bad input to the retriever (ids, metadata, collection names); the message names the culprit."""


def parse_server_url(url: str) -> tuple[str, int, bool]:
    """``http[s]://HOST[:PORT]`` (or ``HOST[:PORT]``) -> (host, port, ssl); the port defaults to chroma's
    8000 over http and 443 over https. Refuses another scheme, a path, a query and a bad port: the client
    would silently drop them and talk to another endpoint than the one named."""
    parsed = urlparse(url if "://" in url else f"http://{url}")
    if parsed.scheme not in ("http", "https"):
        raise RetrieverError(f"chroma url {url!r}: the scheme must be http or https, not {parsed.scheme!r}")
    if not parsed.hostname:
        raise RetrieverError(f"chroma url {url!r} has no host")
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment or parsed.username:
        raise RetrieverError(f"chroma url {url!r}: give only http[s]://HOST[:PORT], without a path or query")
    bad_port = RetrieverError(f"chroma url {url!r}: the port must be a number from 1 to 65535")
    try:
        port = parsed.port
    except ValueError:
        raise bad_port from None
    if port == 0:
        raise bad_port
    ssl = parsed.scheme == "https"
    return parsed.hostname, (443 if ssl else 8000) if port is None else port, ssl


def default_path() -> Path:
    return home() / "kb" / "chroma"


def _embed_fn(embedder: Any, purpose: str) -> Any:
    """Texts -> list of float32 vectors, through ``embed`` (text embedder) or ``embed_texts`` (CLIP)."""
    fn = getattr(embedder, "embed", None) if purpose == "text" else getattr(embedder, "embed_texts", None)
    if fn is None:
        raise RetrieverError(
            f"{type(embedder).__name__} has no {'embed' if purpose == 'text' else 'embed_texts'}"
        )
    return fn


@functools.cache
def embedding_function_class() -> type:
    """Our chromadb embedding-function class (built lazily: subclassing needs chromadb imported)."""
    apply_offline_env()
    require("chromadb", purpose="the retriever")
    from chromadb.api.types import EmbeddingFunction
    from chromadb.utils.embedding_functions import register_embedding_function

    class GraphdistillEmbeddingFunction(EmbeddingFunction):  # type: ignore[type-arg]
        """Wraps a graphdistill embedder; its config names the weights so chromadb can rebuild it."""

        def __init__(self, embedder: Any, purpose: str = "text") -> None:
            self.embedder = embedder
            self.purpose = purpose
            self._fn = _embed_fn(embedder, purpose)
            try:
                _LIVE[(purpose, str(getattr(embedder, "weights_sha256", "")))] = embedder
            except TypeError:  # an embedder that cannot be weakly referenced is simply not shared
                pass

        def __call__(self, input: Sequence[str]) -> list[np.ndarray]:
            vecs = np.asarray(self._fn(list(input)), dtype=np.float32)
            return list(vecs)

        @staticmethod
        def name() -> str:
            return EF_NAME

        def default_space(self) -> Any:
            return "cosine"

        def supported_spaces(self) -> Any:
            return ["cosine"]

        def get_config(self) -> dict[str, Any]:
            return {
                "purpose": self.purpose,
                "model_id": str(getattr(self.embedder, "model_id", "")),
                "weights_sha256": str(getattr(self.embedder, "weights_sha256", "")),
                "weights": str(getattr(self.embedder, "weights", "") or ""),
            }

        @staticmethod
        def build_from_config(config: dict[str, Any]) -> GraphdistillEmbeddingFunction:
            """Rebuild a text embedder from its config (a collection opened without an explicit one)."""
            if config.get("purpose") != "text":
                raise RetrieverError(
                    "this collection was built with an image embedder; open it through ChromaRetriever "
                    "with that image embedder"
                )
            live = _LIVE.get(("text", str(config.get("weights_sha256", ""))))
            if live is not None:
                return GraphdistillEmbeddingFunction(live)
            from graphdistill.teachers.text_embedder import SentenceEmbedder

            return GraphdistillEmbeddingFunction(
                SentenceEmbedder(config.get("weights") or "all-minilm-l6-v2")
            )

        def validate_config_update(self, old_config: dict[str, Any], new_config: dict[str, Any]) -> None:
            if old_config.get("weights_sha256") != new_config.get("weights_sha256"):
                raise RetrieverError("a collection's embedder cannot change; build a new collection")

    register_embedding_function(GraphdistillEmbeddingFunction)
    return GraphdistillEmbeddingFunction


def _check_collection_name(name: str) -> str:
    if not MIN_NAME <= len(name) <= MAX_NAME:
        raise RetrieverError(
            f"collection name {name!r} must be {MIN_NAME}-{MAX_NAME} characters (chromadb's limit)"
        )
    return name


def _metadata(doc: Document) -> dict[str, Any] | None:
    for key, value in doc.metadata.items():
        if not isinstance(value, _SCALAR):
            raise RetrieverError(
                f"document {doc.id!r}: metadata {key!r} is a {type(value).__name__}; "
                "chromadb stores only str, int, float and bool values"
            )
    return dict(doc.metadata) or None  # chromadb refuses empty metadata dicts


class ChromaRetriever:
    """Knowledge-base retrieval: ``ingest`` documents, ``query`` by text or by image embedding."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        url: str | None = None,
        collection: str = "coco_facts",
        text_embedder: TextEmbedder | None = None,
        image_embedder: ImageEmbedder | None = None,
        k: int = 3,
        batch_size: int = 128,
        seed: int = 0,
    ) -> None:
        if path is not None and url is not None:
            raise RetrieverError("give the retriever a local path or a server url, not both")
        if k < 1:
            raise RetrieverError(f"k must be >= 1, got {k}")
        server = parse_server_url(url) if url is not None else None  # a bad url fails before any load
        apply_offline_env()
        chromadb: Any = require("chromadb", purpose="the retriever")
        from chromadb.config import Settings

        if text_embedder is None:
            from graphdistill.teachers.text_embedder import SentenceEmbedder

            text_embedder = SentenceEmbedder()
        self.text_embedder = text_embedder
        self.image_embedder = image_embedder
        self.k = k
        self.seed = seed
        self.batch_size = batch_size
        self.collection_name = _check_collection_name(collection)
        settings = Settings(anonymized_telemetry=False)
        if url is not None and server is not None:
            host, port, ssl = server
            self.location = url
            self.url: str | None = url
            try:  # the client checks the server's heartbeat here
                self.client: Any = chromadb.HttpClient(host=host, port=port, ssl=ssl, settings=settings)
            except Exception as exc:  # a dead server: chromadb raises a bare ValueError (or httpx errors)
                raise RetrieverError(
                    f"cannot reach the Chroma server at {url}: {exc} "
                    "(start one with `chroma run --path DIR --port PORT`)"
                ) from exc
        else:
            root = Path(path).expanduser() if path is not None else default_path()
            root.mkdir(parents=True, exist_ok=True)
            self.location = str(root)
            self.url = None
            self.client = chromadb.PersistentClient(path=str(root), settings=settings)
        ef_cls = embedding_function_class()
        self.embedding_function: Any = ef_cls(text_embedder, "text")
        self.collection: Any = self._open(self.collection_name, self.embedding_function)
        self.image_collection: Any = None
        if image_embedder is not None:
            self.image_embedding_function: Any = ef_cls(image_embedder, "image")
            name = _check_collection_name(f"{self.collection_name}__image")
            self.image_collection = self._open(name, self.image_embedding_function)
        self.device = str(getattr(text_embedder, "device", "cpu"))
        self.model_id = f"{text_embedder.model_id} + chroma:{self.collection_name}"
        self.weights_sha256 = text_embedder.weights_sha256
        if image_embedder is not None:
            # the image query is part of this retriever's answer: traces must name (and pin) its model too,
            # so a CLIP on random weights shows up as "RANDOM WEIGHTS" wherever the retriever is reported
            self.model_id += f" + image: {image_embedder.model_id}"
            both = f"{text_embedder.weights_sha256}+{image_embedder.weights_sha256}"
            self.weights_sha256 = hashlib.sha256(both.encode()).hexdigest()

    def student_offer(self) -> dict[str, Any] | None:
        """The student may learn to rank the documents as this retriever does, on queries no recorded trace
        asked (:mod:`graphdistill.student.retrieval_kd`): a JSON reference to the text embedder's weights that
        the graph schema records for the retrieve node. None when the ranking is not the text embedder's alone
        (an image embedder also retrieves) or the embedder cannot be reloaded from a name or a folder.

        ``knowledge_base`` names the collection (its folder or server and its name): the filter reads every
        document of it into the dataset (:func:`read_knowledge_base`), so the student ranks the whole
        knowledge base, as this retriever does, not only the documents some recorded trace retrieved."""
        if self.image_embedder is not None:
            return None
        weights = getattr(self.text_embedder, "weights", None)
        if not isinstance(weights, str) or not weights:
            return None
        return {
            "kind": "text-retriever",
            "embedder": weights,
            "weights_sha256": self.text_embedder.weights_sha256,
            "model_id": self.text_embedder.model_id,
            "k": self.k,
            "knowledge_base": {
                ("url" if self.url else "path"): self.location,
                "collection": self.collection_name,
            },
        }

    def _open(self, name: str, ef: Any) -> Any:
        return self.client.get_or_create_collection(
            name=name,
            embedding_function=ef,
            configuration={"hnsw": {"space": "cosine"}},
        )

    # ----------------------------------------------------------------------------------------------------

    def ingest(self, docs: Sequence[Document]) -> int:
        """Upsert ``docs`` (by id, in batches; idempotent). Returns how many were written."""
        seen: set[str] = set()
        for d in docs:
            if not d.id:
                raise RetrieverError("a document has an empty id")
            if d.id in seen:
                raise RetrieverError(f"document id {d.id!r} appears twice in one ingest")
            seen.add(d.id)
        for start in range(0, len(docs), self.batch_size):
            batch = list(docs[start : start + self.batch_size])
            ids = [d.id for d in batch]
            texts = [d.text for d in batch]
            metas = [_metadata(d) for d in batch]
            kwargs: dict[str, Any] = {"ids": ids, "documents": texts}
            if any(m is not None for m in metas):
                kwargs["metadatas"] = [m or {"_": ""} for m in metas]
            self.collection.upsert(**kwargs)
            if self.image_collection is not None:
                self.image_collection.upsert(**kwargs)
            log.debug("upserted %d documents into %s", len(batch), self.collection_name)
        log.info("ingested %d documents into %s at %s", len(docs), self.collection_name, self.location)
        return len(docs)

    def count(self) -> int:
        return int(self.collection.count())

    def doc_ids(self) -> list[str]:
        return sorted(self.collection.get(include=[])["ids"])

    def get(self, ids: Sequence[str]) -> list[Document]:
        """The stored documents with these ids, in the order asked (missing ids are skipped)."""
        if not ids:
            return []
        got = self.collection.get(ids=list(ids), include=["documents", "metadatas"])
        by_id = {
            i: Document(id=i, text=t or "", metadata=_clean(m))
            for i, t, m in zip(got["ids"], got["documents"], got["metadatas"], strict=True)
        }
        return [by_id[i] for i in ids if i in by_id]

    def query(
        self,
        text: str | None = None,
        image_embedding: np.ndarray | None = None,
        k: int | None = None,
    ) -> list[Document]:
        """The ``k`` nearest documents to a text, or to an image embedding (needs an image embedder)."""
        if (text is None) == (image_embedding is None):
            raise RetrieverError("query needs exactly one of text= or image_embedding=")
        if text is not None:
            return self.query_batch([text], k=k)[0]
        if self.image_collection is None:
            raise RetrieverError("an image-embedding query needs ChromaRetriever(image_embedder=...)")
        vec = np.asarray(image_embedding, dtype=np.float32).reshape(1, -1)
        res = self.image_collection.query(
            query_embeddings=list(vec),
            n_results=self._k(k, self.image_collection),
            include=["documents", "metadatas", "distances"],
        )
        return _documents(res)[0]

    def query_batch(self, texts: Sequence[str], k: int | None = None) -> list[list[Document]]:
        """Nearest documents for several texts, embedded in one batch."""
        if not texts:
            return []
        vecs = np.asarray(self.text_embedder.embed(list(texts)), dtype=np.float32)
        res = self.collection.query(
            query_embeddings=list(vecs),
            n_results=self._k(k, self.collection),
            include=["documents", "metadatas", "distances"],
        )
        return _documents(res)

    def _k(self, k: int | None, collection: Any) -> int:
        k = self.k if k is None else k
        if k < 1:
            raise RetrieverError(f"k must be >= 1, got {k}")
        n = int(collection.count())
        if n == 0:
            raise RetrieverError(
                f"knowledge base {self.collection_name!r} at {self.location} is empty; "
                "run `graphdistill kb build` first"
            )
        return min(k, n)


def _clean(meta: Any) -> dict[str, Any]:
    return {k: v for k, v in (meta or {}).items() if k != "_"}


def _documents(res: dict[str, Any]) -> list[list[Document]]:
    out = []
    for ids, texts, metas, dists in zip(
        res["ids"], res["documents"], res["metadatas"], res["distances"], strict=True
    ):
        out.append(
            [
                Document(id=i, text=t or "", distance=float(d), metadata=_clean(m))
                for i, t, m, d in zip(ids, texts, metas, dists, strict=True)
            ]
        )
    return out


def read_knowledge_base(offer: dict[str, Any]) -> list[Document]:
    """Every document of the collection a retriever's offer (:meth:`ChromaRetriever.student_offer`) names,
    sorted by id. Refuses a folder that holds no Chroma database and an empty collection (never creates
    either)."""
    kb = offer.get("knowledge_base") or {}
    name = str(kb.get("collection") or "")
    path, url = kb.get("path"), kb.get("url")
    if not name or not (path or url):
        raise RetrieverError(f"the retriever's offer names no knowledge base ({kb!r})")
    if path and not (Path(path) / "chroma.sqlite3").is_file():
        raise RetrieverError(f"knowledge base {path}: no Chroma database there (moved or deleted?)")
    from graphdistill.teachers.text_embedder import SentenceEmbedder

    embedder = SentenceEmbedder(str(offer.get("embedder") or "all-minilm-l6-v2"))
    retriever = ChromaRetriever(path=path, url=url, collection=name, text_embedder=embedder)
    docs = retriever.get(retriever.doc_ids())
    if not docs:
        raise RetrieverError(f"knowledge base {path or url}: collection {name!r} holds no documents")
    return sorted(docs, key=lambda d: d.id)
