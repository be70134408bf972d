"""The flat training recipe (torchtune-KD style): setup → train → save → cleanup.

Teacher targets are read from the filtered dataset (never from live teachers). One run is one folder::

    RUN/config.json        StudentConfig (written at setup, so --resume rebuilds the same model)
    RUN/tokenizer.json     the BPE trained on this dataset's questions + answers (written at setup)
    RUN/checkpoints/last.pt  model + optimizer + scheduler + epoch + step + RNG state (for --resume)
    RUN/model.safetensors  RUN/meta.json   the loadable model (rewritten at every checkpoint, so a killed run
                           can still be predicted with and evaluated: it holds the last finished epoch)
    RUN/metrics.json       (written by save())

Every file is written atomically (a temp file in the same folder, then ``os.replace``): a kill mid-write
leaves the previous version, never a torn one.

The rows: held in memory (:class:`graphdistill.student.loader.StudentDataset`, images, object targets and a
frozen trunk's features cached), or, with ``TrainConfig.stream``, streamed from the dataset's Parquet row groups
through a shuffle buffer (:mod:`graphdistill.student.stream`; nothing cached, a frozen trunk run per batch): one
:class:`graphdistill.student.loader.RowEncoder` makes a row's tensors either way.

Determinism: every epoch shuffles with its own generator seeded by (seed, epoch), so a run resumed from
epoch k's checkpoint sees exactly the batches an uninterrupted run would; dropout is 0 by default.
The library logs; the CLI (``graphdistill train``) shows progress through the ``on_step``/``on_epoch`` hooks.

Several processes (:mod:`graphdistill.student.distributed`: ``--nproc N`` or torchrun): with a process group
initialised, the recipe wraps the model in DistributedDataParallel, gives each rank its share of every global
batch (:class:`graphdistill.student.ranks.ShardedBatches`, or the streamed batches' slices) and of the retrieval
queries, and computes losses and batch norms over the global batch (:mod:`graphdistill.student.ranks`), so a step
is the one-process step. Rank 0 alone writes the run (tokenizer, config, checkpoints, model files, metrics) and
validates; the others wait.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from graphdistill._fs import ref
from graphdistill.dataset import SPLITS, DatasetRow, iter_rows
from graphdistill.student.config import RETRIEVAL_QUERIES, SOURCE_DIMS, SOURCE_TOKENS
from graphdistill.student.loader import RowEncoder, StudentDataset, collate, embedding_dims_of, spec_of
from graphdistill.student.losses import LossWeights, compute_losses
from graphdistill.student.model import (
    PAD_ID,
    SpaceSourceHead,
    Student,
    StudentConfig,
    config_from_schema,
    count_parameters,
    preset,
)
from graphdistill.student.predict import STUDENT_FORMAT, StudentPredictor, check_student
from graphdistill.student.ranks import ShardedBatches, across_ranks, global_batch_norms, reduce_mean, world
from graphdistill.student.retrieval_kd import RetrievalQueries, make_retrieval_queries, ranking_recall
from graphdistill.student.stream import BatchExtra, StreamedBatches
from graphdistill.student.tokenizer import StudentTokenizer

log = logging.getLogger(__name__)

CHECKPOINT = Path("checkpoints") / "last.pt"
WARM_START_FILES = ("config.json", "tokenizer.json", "model.safetensors")  # what init_from reads
RETRIEVAL_BATCH = 256  # synthetic retrieval queries per training step
RETRIEVAL_VAL = 256  # more of them, never trained on: validation's ``retrieval_recall``
FEATURE_KEYS = ("trunk_p3", "trunk_p4", "trunk_p5")  # a frozen trunk's cached features in a batch


def longest_repeat(ids: list[int]) -> int:
    """The length of the longest n-gram that occurs at least twice in ``ids`` (0 when none does)."""
    best = 0
    for n in range(1, len(ids)):
        grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
        if len(set(grams)) == len(grams):
            break
        best = n
    return best


def longest_run(ids: list[int]) -> int:
    """The most times one token follows itself in a row in ``ids`` (1 when none does, 0 for no tokens)."""
    best = run = 0
    for i, t in enumerate(ids):
        run = run + 1 if i and t == ids[i - 1] else 1
        best = max(best, run)
    return best


# the share of training answers greedy decoding's no-repeat rule leaves writable (see decoding_rules)
WRITABLE_SHARE = 0.9


def decoding_rules(answers: list[list[int]]) -> dict[str, int]:
    """The student's greedy decoding rules (``runner.bundle.banned_tokens``), from the training answers in
    student tokens: ``no_repeat_ngram``, the shortest n-gram length that at least :data:`WRITABLE_SHARE` of the
    answers never repeat (one more than that quantile of :func:`longest_repeat`), and ``max_token_run``, the
    longest run of one token in any answer. Not the longest repeat of all: SmolLM2 now and then repeats a
    whole sentence (a 15-gram in the demo's answers), and a rule that allowed that let the student loop ("A
    person. A person. A person. ..."); on a val split of the demo's training photos answer token F1 was 0.20
    with the longest (n = 16) and 0.27 with this rule (n = 5)."""
    return _rules([longest_repeat(a) for a in answers], max((longest_run(a) for a in answers), default=0))


def _rules(repeats: list[int], max_run: int) -> dict[str, int]:
    """:func:`decoding_rules` from each answer's :func:`longest_repeat` and the longest :func:`longest_run`."""
    if not repeats:
        return {"no_repeat_ngram": 0, "max_token_run": 0}
    ordered = sorted(repeats)
    quantile = ordered[max(math.ceil(WRITABLE_SHARE * len(ordered)) - 1, 0)]
    return {"no_repeat_ngram": 1 + quantile, "max_token_run": max_run}


class AnswerShapes:
    """What the training rows size in the student, gathered one row at a time (:meth:`add`), so one streamed
    pass sizes it without holding the rows: the longest question and answer in student tokens, each answer's
    longest repeat and run (:meth:`decoding_rules`), how many documents each row's teacher retrieved
    (:meth:`retrieved_k`). Holds two small integers a row."""

    def __init__(self, tokenizer: StudentTokenizer) -> None:
        self.tok = tokenizer
        self.rows = 0
        self.question_len = 0  # the longest question, in student tokens
        self.answer_len = 0  # the longest answer, in student tokens (no <eos>)
        self.repeats: list[int] = []  # each answer's longest_repeat
        self.max_run = 0  # the longest longest_run of any answer
        self.sources = Counter[int]()  # documents retrieved -> rows

    def add(self, row: DatasetRow) -> None:
        answer = self.tok.encode(row.answer)
        self.rows += 1
        self.question_len = max(self.question_len, len(self.tok.encode(row.question)))
        self.answer_len = max(self.answer_len, len(answer))
        self.repeats.append(longest_repeat(answer))
        self.max_run = max(self.max_run, longest_run(answer))
        self.sources[len(row.sources)] += 1

    def decoding_rules(self) -> dict[str, int]:
        """:func:`decoding_rules` of the answers added."""
        return _rules(self.repeats, self.max_run)

    def retrieved_k(self) -> int:
        """:func:`retrieved_k` of the rows added."""
        return _retrieved_k(self.sources)


@dataclass
class TrainConfig:
    dataset: str
    out: str
    preset: str = "tiny"
    epochs: int | None = None  # None with max_minutes: train until the time is up
    max_minutes: float | None = None
    device: str = "auto"  # "auto" → cuda when available, else cpu
    resume: bool = False
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    grad_clip: float = 1.0
    seed: int = 0
    val_every: int = 10  # validate every N epochs (and always after the last): an epoch is a few steps here
    # "auto": start from what the graph's teachers offer (a YOLO detector: its trunk and head); "none": scratch
    start: str = "auto"
    trunk_lr: float = 1e-4  # learning rate of a trunk started from a detector (the rest uses `lr`)
    # a trunk started from a detector: "trunk" trains none of it (the detector stays the teacher's at the
    # student's input size: the default, measured best on unseen photos, see README), "backbone" its neck and
    # head (densely: task-aligned assignment, DFL, the detector's own per-cell outputs), "none" all of it
    freeze: str = "trunk"
    vocab_size: int | None = None  # None: the preset's
    overrides: dict[str, Any] = field(default_factory=dict)  # extra StudentConfig fields
    loss_weights: dict[str, float] = field(default_factory=dict)
    # synthetic queries the graph's retriever ranks for the sources head (student.retrieval_kd); 0: none
    retrieval_queries: int = RETRIEVAL_QUERIES
    # stream the training and validation rows from the dataset's Parquet row groups instead of holding them in
    # memory (student.stream): for a dataset larger than memory; the frozen trunk's features are not cached
    stream: bool = False
    shuffle_buffer: int = 4096  # with stream: rows the shuffle buffer holds (more: closer to a full shuffle)
    # warm start: a run folder whose tokenizer, config and weights this run starts from (improve's rounds retrain
    # on a grown dataset); the new answers' words the tokenizer never saw are spelt in its byte-level pieces
    init_from: str | None = None


def _atomic_write_bytes(path: Path, write: Callable[[Path], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def retrieved_k(rows: Sequence[DatasetRow]) -> int:
    """How many documents the teacher's retriever returns: the most common count over rows that retrieved
    any (a retriever's top-k), 3 when none did."""
    return _retrieved_k(Counter(len(r.sources) for r in rows))


def _retrieved_k(counts: Counter[int]) -> int:
    """:func:`retrieved_k` from {documents retrieved: rows}."""
    counts = Counter({n: c for n, c in counts.items() if n})
    return counts.most_common(1)[0][0] if counts else 3


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, lambda p: p.write_text(json.dumps(obj, indent=2, default=str)))


def _barrier() -> None:
    torch.distributed.barrier()


def _broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (``device``: the rank's, as NCCL wants)."""
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.broadcast(t, 0)
    return bool(t.item())


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class TrainRecipe:
    """``setup()``, ``train()``, ``save()``, ``cleanup()``; or :func:`train` for all four."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        model_factory: Callable[[StudentConfig], nn.Module] | None = None,
        on_step: Callable[[dict[str, Any]], None] | None = None,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        on_progress: Callable[[str, int, int], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.run = Path(cfg.out)
        self.model_factory = model_factory
        self.on_step = on_step or (lambda info: None)
        self.on_epoch = on_epoch or (lambda info: None)
        self.on_progress = on_progress  # (stage, done, total) for setup work a person waits on
        self.rank, self.world_size = world()  # (0, 1) without a torch.distributed process group
        self.epoch = 0  # epochs completed
        self.step = 0
        self.val_split = "val"  # "train" when the dataset has no val rows (set in setup)
        self.history: list[dict[str, Any]] = []
        self.train_seconds: list[float] = []
        self.start: Any = None  # teachers.base.StudentStart the student started from, if any
        self.class_names: list[str] = []
        self.retrieval: RetrievalQueries | None = None  # synthetic queries ranked by the graph's retriever
        self.retrieval_val: RetrievalQueries | None = None
        self.retrieval_teacher: dict[str, Any] | None = None  # the retriever that ranked them (run meta)

    # ---- setup --------------------------------------------------------------------------------------------

    def setup(self) -> None:
        from graphdistill.dataset import open_dataset

        cfg = self.cfg
        if cfg.epochs is None and cfg.max_minutes is None:
            raise ValueError("give epochs or max_minutes")
        if cfg.start not in ("auto", "none"):
            raise ValueError(f"start must be 'auto' or 'none', got {cfg.start!r}")
        if cfg.freeze not in ("backbone", "trunk", "none"):
            raise ValueError(f"freeze must be 'backbone', 'trunk' or 'none', got {cfg.freeze!r}")
        if cfg.shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be at least 1 row, got {cfg.shuffle_buffer}")
        LossWeights.from_names(cfg.loss_weights)  # a misspelt name fails here, before any work
        dev = cfg.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {dev!r} asked for but CUDA is not available")
        if self.world_size > 1:
            if cfg.batch_size % self.world_size:
                raise ValueError(
                    f"batch size {cfg.batch_size} does not split over {self.world_size} processes: "
                    f"give a multiple of {self.world_size}"
                )
            if dev.startswith("cuda"):  # one GPU per process
                dev = f"cuda:{int(os.environ.get('LOCAL_RANK', self.rank)) % torch.cuda.device_count()}"
        self.device = torch.device(dev)
        self.ds = open_dataset(cfg.dataset)
        ckpt_path = self.run / CHECKPOINT
        resuming = cfg.resume and ckpt_path.exists()
        if cfg.resume and not resuming and self.rank == 0:
            log.warning("--resume: no checkpoint at %s; starting fresh", ckpt_path)
        stale = (self.run / "config.json").exists() and (self.run / CHECKPOINT).exists()
        if not resuming and stale and self.rank == 0:
            log.warning("run %s already holds a checkpoint; starting over (use resume to continue)", self.run)
        self.run.mkdir(parents=True, exist_ok=True)
        _seed_all(cfg.seed)

        self.start = self._offered_start()
        self.class_names = list(self.start.class_names if self.start else self.ds.class_names)
        if not resuming and self.rank > 0:  # rank 0 trains the tokenizer and derives the config
            _barrier()
        init = None if resuming or cfg.init_from is None else Path(cfg.init_from)
        if init is not None:
            missing = [f for f in WARM_START_FILES if not (init / f).is_file()]
            if missing:
                raise ValueError(f"init_from {init}: not a trained run folder (no {', '.join(missing)})")
        if resuming or self.rank > 0:
            self.tokenizer = StudentTokenizer.load(self.run / "tokenizer.json")
            self.model_config = StudentConfig.from_dict(json.loads((self.run / "config.json").read_text()))
        elif init is not None:  # the previous run's vocabulary and shapes: its weights fit them
            self.tokenizer = StudentTokenizer.load(init / "tokenizer.json")
            self.model_config = StudentConfig.from_dict(json.loads((init / "config.json").read_text()))
            n_docs = max(len(self.ds.documents), 1)
            if self.model_config.num_sources != n_docs:
                raise ValueError(
                    f"init_from {init}: its sources head ranks {self.model_config.num_sources} documents, the "
                    f"dataset {cfg.dataset} holds {n_docs}; a warm start needs the same knowledge base"
                )
            self.tokenizer.save(self.run / "tokenizer.json")
            _atomic_write_json(self.run / "config.json", self.model_config.to_dict())
            if self.world_size > 1:
                _barrier()
        else:
            docs = self.ds.documents
            # the questions and answers only: the documents' own words would grow the vocabulary (and the
            # bundle: every piece is a row of the embedding) by ~80 % for words no answer uses; the byte-level
            # BPE still spells every document, in more pieces
            # one streamed pass over every split (a row group at a time): the held-out splits are read for
            # their words and object counts, not kept; the training rows stay unless training streams them
            texts: list[str] = []
            max_objects = 1
            for r in iter_rows(self.ds):
                texts += (r.question, r.answer)
                max_objects = max(max_objects, len(r.objects))
            vocab = cfg.vocab_size or int(preset(cfg.preset).vocab_size)
            self.tokenizer = StudentTokenizer.train(texts, vocab_size=vocab, class_names=self.class_names)
            shapes = AnswerShapes(self.tokenizer)
            for r in self._train_rows():
                shapes.add(r)
            q_len, a_len = shapes.question_len, shapes.answer_len + 1
            base = preset(cfg.preset)
            derived: dict[str, Any] = dict(
                vocab_size=self.tokenizer.vocab_size,
                num_classes=max(len(self.class_names), 1),
                class_token_ids=self.tokenizer.class_token_ids(self.class_names) if self.class_names else [],
                num_sources=max(len(docs), 1),
                source_token_ids=[
                    self.tokenizer.encode(str(d.get("text") or ""))[:SOURCE_TOKENS] for d in docs
                ],
                sources_k=shapes.retrieved_k(),
                **shapes.decoding_rules(),
                max_objects=max(base.max_objects, max_objects),
                max_question_len=min(max(base.max_question_len, q_len), 64),
                max_answer_len=min(max(base.max_answer_len, a_len), 96),
            )
            if self._retriever_offer() is not None and cfg.retrieval_queries > 0:
                # the sources head ranks in the retriever's own space (student.retrieval_kd)
                derived["source_dims"] = min(SOURCE_DIMS, max(len(docs), 1))
            if self.start is not None:  # the trunk is the detector's: its architecture and its thresholds
                derived.update(
                    trunk="ultralytics",
                    trunk_spec=self.start.spec,
                    score_threshold=self.start.score_threshold,
                    nms_iou=self.start.nms_iou,
                )
            self.model_config = self._derive_config(derived)
            self.tokenizer.save(self.run / "tokenizer.json")
            _atomic_write_json(self.run / "config.json", self.model_config.to_dict())
            if self.world_size > 1:
                _barrier()

        model = (self.model_factory or Student)(self.model_config)
        check_student(model)
        start_from = getattr(model, "start_from", None)
        if init is not None:  # every weight from the previous run (a resumed run reads its own checkpoint)
            from safetensors.torch import load_model

            load_model(model, str(init / "model.safetensors"), strict=True)
            log.info("student starts from the weights of %s", init)
        elif self.start is not None and not resuming and callable(start_from):
            start_from(self.start)
            log.info(
                "student trunk and detection head start from %s (%s)", self.start.model_id, self.start.licence
            )
        trunk = getattr(model, "trunk", None)
        if self.start is not None and hasattr(trunk, "freeze"):
            trunk.freeze(cfg.freeze)  # type: ignore[union-attr]
        self.model = model.to(self.device)
        self.retrieval, self.retrieval_val = self._retrieval_queries()
        space = isinstance(getattr(model, "source_head", None), SpaceSourceHead)
        if space and self.retrieval is None and not resuming:  # a resumed run's checkpoint holds the vectors
            raise ValueError(
                f"source_dims={self.model_config.source_dims}: a sources head in the retriever's space needs "
                "the retriever's document vectors, and no node of the graph offers its retriever (or "
                "retrieval_queries is 0); leave source_dims at 0"
            )
        self.retrieval_gen = torch.Generator().manual_seed(cfg.seed)
        # the recurrent block's iterations of each training batch (StudentConfig.max_depth): the same draw on
        # every rank, so their batches run the same graph
        self.depth_gen = torch.Generator().manual_seed(cfg.seed + 1)
        # how a row becomes tensors (StudentDataset builds the same): streamed batches and validation encode their
        # rows with it, the frozen-feature cache preprocesses its images with it
        self.encoder = RowEncoder(self.tokenizer, self.model_config, self.class_names, self.ds.documents)
        self.train_set: StudentDataset | None = None
        self.val_set: StudentDataset | None = None
        # with no val rows (few source photos: splits never share a photo) training fit is all there is to show
        val_split = self.val_split = "val" if self.ds.splits.get("val", 0) else "train"
        if cfg.stream:
            self.n_train = sum(self.ds.row_group_sizes("train"))
            self.n_val = sum(self.ds.row_group_sizes(val_split))
            self.batch_extra = self._detector_targets_per_batch()
        else:
            self.train_set = StudentDataset(
                self.ds,
                "train",
                self.tokenizer,
                self.model_config,
                class_names=self.class_names,
                kd=self._detector_targets("train"),
                features=self._frozen_features("train"),
            )
            self.val_set = StudentDataset(
                self.ds, val_split, self.tokenizer, self.model_config, class_names=self.class_names
            )
            self.n_train, self.n_val = len(self.train_set), len(self.val_set)
        if self.n_train == 0:
            raise ValueError(f"dataset {cfg.dataset}: the train split is empty")
        # a frozen trunk whose features are not cached (streaming) runs per batch, in eval mode, without gradients
        self.trunk_per_batch = cfg.stream and self._trunk_frozen()
        self.weights = LossWeights.from_names(cfg.loss_weights, embeddings=self.model_config.embedding_dims)
        trunk_ids = (
            {id(p) for p in trunk.parameters()} if self.start is not None and trunk is not None else set()
        )
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in trainable if id(p) not in trunk_ids], "lr": cfg.lr},
            {"params": [p for p in trainable if id(p) in trunk_ids], "lr": cfg.trunk_lr},
        ]
        self.optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        steps_per_epoch = math.ceil(self.n_train / cfg.batch_size)
        total = steps_per_epoch * cfg.epochs if cfg.epochs else None
        warm = min(cfg.warmup_steps, max(1, (total or 10**9) // 10))

        def lr_lambda(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            if total is None:
                return 1.0
            return 0.05 + 0.95 * 0.5 * (
                1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm)))
            )

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        if resuming:  # every rank loads it
            self._load_checkpoint(ckpt_path)
        # what a training step runs: the student, or DistributedDataParallel around it across ranks
        self.trained: nn.Module = self.model
        if self.world_size > 1:
            global_batch_norms(self.model)
            self.trained = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        log.info(
            "student %s: %d parameters, %d train / %d %s rows (%s), device %s",
            type(self.model).__name__,
            count_parameters(self.model),
            self.n_train,
            self.n_val,
            val_split,
            f"streamed, shuffle buffer {cfg.shuffle_buffer}" if cfg.stream else "in memory",
            self.device,
        )

    def _train_rows(self) -> Iterable[DatasetRow]:
        """The training rows (every split's when the train split is empty), for a pass that sizes the student:
        the dataset's rows in memory, or, when training streams, read a row group at a time and not kept."""
        if not self.cfg.stream:
            return self.ds.rows("train") or self.ds.all_rows()
        return iter_rows(self.ds, ("train",) if sum(self.ds.row_group_sizes("train")) else SPLITS)

    def _offered_start(self) -> Any:
        """The modules the graph's teachers offer the student (``GraphSchema.offers``, recorded with the
        traces), loaded; None with ``start="none"``, a custom model factory, or when no node offers any."""
        graph = self.ds.graph
        if self.cfg.start == "none" or self.model_factory is not None or graph is None:
            return None
        from graphdistill.teachers.base import load_offer, pick_offer

        found = pick_offer(graph.offers, "ultralytics-detect")
        if found is None:
            log.info(
                "graph %s: no node offers modules to start from; the trunk starts from scratch", graph.name
            )
            return None
        return load_offer(found[1], node=found[0])

    def _retrieval_queries(self) -> tuple[RetrievalQueries | None, RetrievalQueries | None]:
        """Synthetic queries ranked by the graph's retriever (:mod:`graphdistill.student.retrieval_kd`), for
        training and for validation; (None, None) when ``retrieval_queries`` is 0, the student has no sources
        head, or no node of the graph offers its retriever (``"text-retriever"``)."""
        from graphdistill.teachers.base import RetrievalTeacher, load_offer

        model = self.model
        n = self.cfg.retrieval_queries
        if n <= 0 or not isinstance(model, Student) or not model.config.has_sources:
            return None, None
        found = self._retriever_offer()
        if found is None:
            log.info("the graph has no node offering its retriever; the sources head learns from the traces")
            return None, None
        teacher = load_offer(found[1], node=found[0])
        if not isinstance(teacher, RetrievalTeacher):
            raise TypeError(f"node {found[0]}: a text-retriever offer loaded as {type(teacher).__name__}")
        queries = make_retrieval_queries(
            teacher.embed,
            teacher.k,
            questions=[r.question for r in self._train_rows()],
            documents=[str(d.get("text") or "") for d in self.ds.documents],
            class_names=self.class_names,
            tokenizer=self.tokenizer,
            max_question_len=self.model_config.max_question_len,
            n=n + RETRIEVAL_VAL,
            seed=self.cfg.seed,
            dims=model.config.source_dims,
            progress=self.on_progress,
        )
        head = model.source_head
        if queries.doc_keys is not None and isinstance(head, SpaceSourceHead):
            # the documents as the retriever sees them (the head's constants), and the words training's
            # queries hold: the synthetic ones, the recorded questions, the class names
            known = torch.zeros(model.config.vocab_size, dtype=torch.bool)
            known[queries.question_ids[:n][queries.question_mask[:n]]] = True
            for r in self._train_rows():
                known[torch.tensor(self.tokenizer.encode(r.question), dtype=torch.long)] = True
            known[model.class_words] = True
            known[PAD_ID] = False
            head.set_space(queries.doc_keys, known)
        self.retrieval_teacher = teacher.describe() | {"queries": n}
        log.info("%d synthetic queries ranked by %s (node %s)", n, teacher.model_id, found[0])
        return queries.subset(slice(0, n)), queries.subset(slice(n, None))

    def _retriever_offer(self) -> tuple[str, dict[str, Any]] | None:
        """(node, offer) of the graph's node that offers its retriever (``"text-retriever"``), or None."""
        from graphdistill.teachers.base import pick_offer

        graph = self.ds.graph
        return None if graph is None else pick_offer(graph.offers, "text-retriever")

    def _retrieval_logits(self, queries: RetrievalQueries, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The sources head's ranking of synthetic queries ``idx`` and the teacher's (``retrieval_logits``,
        ``retrieval_targets``); for a head in the retriever's space also its query vectors and the retriever's
        (``retrieval_query``, ``retrieval_vectors``)."""
        b = queries.batch(idx, self.device)
        model = self.model
        assert isinstance(model, Student)
        objects = {"classes": b["classes"], "valid": b["valid"]}
        query = model.source_vectors(b["question_ids"], b["question_mask"], objects)
        if query is None:  # a head that ranks by words
            logits = model.rank_sources(b["question_ids"], b["question_mask"], objects)
            return {"retrieval_logits": logits, "retrieval_targets": b["retrieval_targets"]}
        head = model.source_head
        assert isinstance(head, SpaceSourceHead)
        got = {"retrieval_logits": head.rank(query), "retrieval_targets": b["retrieval_targets"]}
        if "retrieval_vectors" in b:  # the query computed once serves the ranking and the regression
            got.update(retrieval_query=query, retrieval_vectors=b["retrieval_vectors"])
        return got

    def _detector_targets(self, split: str) -> Any:
        """Row index -> the detector's per-cell outputs (:mod:`graphdistill.student.kd`), for a student started
        from a YOLO detector; None otherwise."""
        if self.start is None or not self.model_config.has_objects or self.cfg.freeze == "trunk":
            return None  # nothing of the detector trains: its per-cell outputs would teach nothing
        from graphdistill.student.kd import DetectorTargets, cached_targets

        rows = self.ds.rows(split)
        detector = DetectorTargets(self.start, self.model_config.image_size, self.device)
        get = cached_targets(
            detector,
            [r.image for r in rows],
            lambda i: self.ds.image(rows[i]),
            progress=self.on_progress,
        )
        del detector
        return get

    def _detector_targets_per_batch(self) -> BatchExtra | None:
        """Streaming's :meth:`_detector_targets`: the detector runs on each batch's images (nothing is cached);
        None when they are not needed."""
        if self.start is None or not self.model_config.has_objects or self.cfg.freeze == "trunk":
            return None
        from graphdistill.student.kd import DetectorTargets

        detector = DetectorTargets(self.start, self.model_config.image_size, self.device)

        def targets(images: Sequence[np.ndarray]) -> list[dict[str, torch.Tensor]]:
            return [
                {"kd_cls": c, "kd_dist": d, "kd_valid": torch.tensor(True)}
                for c, d in detector.targets(images)
            ]

        return targets

    def _derive_config(self, derived: dict[str, Any]) -> StudentConfig:
        """The student's heads follow the dataset's graph schema (manifest.json ``graph``): TEXT, OBJECTS /
        DETECTIONS, SOURCES and EMBEDDING outputs (the latter sized from the rows' ``embeddings``)."""
        cfg = self.cfg
        graph = self.ds.graph
        if graph is None:
            log.warning(
                "dataset %s declares no graph schema; the student gets the default heads %s",
                cfg.dataset,
                StudentConfig().outputs,
            )
            return preset(cfg.preset, **{**derived, **cfg.overrides})
        dims = embedding_dims_of(iter_rows(self.ds))
        config = config_from_schema(graph, cfg.preset, embedding_dims=dims, **{**derived, **cfg.overrides})
        log.info("graph %s: student heads for outputs %s", graph.name, config.outputs)
        return config

    def _load_checkpoint(self, path: Path) -> None:
        ck = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.epoch, self.step = int(ck["epoch"]), int(ck["step"])
        self.history = list(ck.get("history", []))
        self.train_seconds = list(ck.get("train_seconds", []))
        random.setstate(ck["rng"]["python"])
        np.random.set_state(ck["rng"]["numpy"])
        torch.set_rng_state(ck["rng"]["torch"])
        if torch.cuda.is_available() and ck["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
        log.info("resumed %s at epoch %d (step %d)", path, self.epoch, self.step)

    def save_checkpoint(self) -> Path:
        """RUN/checkpoints/last.pt and the model files, written by rank 0; the other ranks wait for it."""
        path = self.run / CHECKPOINT
        if self.rank == 0:
            self._write_checkpoint(path)
        if self.world_size > 1:
            _barrier()
        return path

    def _write_checkpoint(self, path: Path) -> None:
        ck = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "history": self.history,
            "train_seconds": self.train_seconds,
            "train_config": asdict(self.cfg),
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }
        _atomic_write_bytes(path, lambda p: torch.save(ck, p))
        self.save_model_files()

    def save_model_files(self) -> dict[str, Any]:
        """model.safetensors + config.json + tokenizer.json + meta.json: everything ``load_student`` reads.
        Returns the meta."""
        from safetensors.torch import save_model

        _atomic_write_bytes(self.run / "model.safetensors", lambda p: save_model(self.model, str(p)))
        _atomic_write_json(self.run / "config.json", self.model_config.to_dict())
        _atomic_write_bytes(self.run / "tokenizer.json", self.tokenizer.save)
        meta = self.meta()
        _atomic_write_json(self.run / "meta.json", meta)
        return meta

    def meta(self) -> dict[str, Any]:
        """RUN/meta.json: what a run needs besides its weights (classes, documents, preprocessing) and where it
        came from — including the teacher weights it started from and their licence, which bind the run."""
        graph = self.ds.graph
        return {
            "format": STUDENT_FORMAT,
            "model_class": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
            "class_names": self.class_names,
            "documents": self.ds.documents,
            "graph": graph.model_dump(mode="json") if graph else None,
            "graph_id": {"name": graph.name, "hash": graph.definition_hash} if graph else None,
            "dataset": ref(self.cfg.dataset),  # a local folder made absolute, a URL as given
            "preprocessing": spec_of(self.model_config),
            "started_from": self.start.describe() if self.start is not None else None,
            "retrieval_teacher": self.retrieval_teacher,
            "preset": self.cfg.preset,
            "parameters": count_parameters(self.model),
            "epochs": self.epoch,
            "train_config": asdict(self.cfg),
        }

    # ---- train --------------------------------------------------------------------------------------------

    def _batches(self, epoch: int) -> torch.utils.data.DataLoader | StreamedBatches:  # type: ignore[type-arg]
        seed = self.cfg.seed * 100_003 + epoch
        if self.train_set is None:  # streaming (every rank its share of the same global batches)
            return StreamedBatches(
                self.ds,
                "train",
                self.encoder,
                self.cfg.batch_size,
                shuffle_buffer=self.cfg.shuffle_buffer,
                seed=seed,
                rank=self.rank,
                world_size=self.world_size,
                extra=self.batch_extra,
            )
        g = torch.Generator().manual_seed(seed)
        if self.world_size > 1:  # this rank's share of the batches one process would draw
            shards = ShardedBatches(len(self.train_set), self.cfg.batch_size, g, self.rank, self.world_size)
            return torch.utils.data.DataLoader(
                self.train_set, batch_sampler=shards, generator=g, collate_fn=collate
            )
        return torch.utils.data.DataLoader(
            self.train_set, batch_size=self.cfg.batch_size, shuffle=True, generator=g, collate_fn=collate
        )

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in batch.items()}

    def train(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        start = time.monotonic()
        deadline = start + cfg.max_minutes * 60 if cfg.max_minutes else None
        max_epochs = cfg.epochs if cfg.epochs is not None else 10**9
        out_of_time = False
        while self.epoch < max_epochs and not out_of_time:
            self.model.train()
            t0 = time.monotonic()
            sums: dict[str, float] = {}
            n = 0
            loader = self._batches(self.epoch)
            for i, batch in enumerate(loader):
                batch = self._to_device(batch)
                with across_ranks():  # one process: a no-op
                    losses = self._losses(batch)
                    shown = reduce_mean(losses)
                bad = [k for k, v in shown.items() if not math.isfinite(v)]
                if bad:
                    raise FloatingPointError(
                        f"epoch {self.epoch + 1} step {self.step}: non-finite losses {bad}"
                    )
                self.optimizer.zero_grad(set_to_none=True)
                losses["total"].backward()
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                n += 1
                for k, v in shown.items():
                    sums[k] = sums.get(k, 0.0) + v
                self.on_step(
                    {
                        "epoch": self.epoch + 1,
                        "batch": i + 1,
                        "batches": len(loader),
                        "step": self.step,
                        "losses": shown,
                        "lr": self.scheduler.get_last_lr()[0],
                    }
                )
                if deadline is not None and self._past(deadline):
                    out_of_time = True
                    log.info("max time reached during epoch %d", self.epoch + 1)
                    break
            self.train_seconds.append(time.monotonic() - t0)
            self.epoch += 1
            means = {k: v / max(n, 1) for k, v in sums.items()}
            last = out_of_time or self.epoch >= max_epochs
            validating = last or self.epoch % max(cfg.val_every, 1) == 0
            metrics = self.validate() if validating and self.rank == 0 else {}
            record = {
                "epoch": self.epoch,
                "step": self.step,
                "train_loss": means,
                "val": metrics,
                "val_split": self.val_split,
            }
            self.history.append(record)
            log.info("epoch %d: loss %.4f %s", self.epoch, means.get("total", float("nan")), metrics)
            self.save_checkpoint()
            self.on_epoch(record)
        return self.history

    def _past(self, deadline: float) -> bool:
        """Whether the time is up; across ranks rank 0's clock decides, so every rank stops at the same step."""
        over = time.monotonic() > deadline
        return _broadcast_flag(over, self.device) if self.world_size > 1 else over

    def _losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One training step's losses by name (the graph to backpropagate). Across ranks each rank ranks its
        share of the same retrieval-query draw."""
        out = self._forward(batch, self.trained)
        if self.retrieval is not None:
            idx = torch.randint(len(self.retrieval), (RETRIEVAL_BATCH,), generator=self.retrieval_gen)
            if self.world_size > 1:
                idx = idx.tensor_split(self.world_size)[self.rank]
            got = self._retrieval_logits(self.retrieval, idx)
            for key in ("retrieval_logits", "retrieval_query"):
                if key in got:
                    out[key] = got[key]
            for key in ("retrieval_targets", "retrieval_vectors"):
                if key in got:
                    batch[key] = got[key]
        return compute_losses(out, batch, self.weights)

    def _forward(
        self, batch: dict[str, torch.Tensor], model: nn.Module | None = None
    ) -> dict[str, torch.Tensor]:
        """``model`` (default: the student itself) on a batch; ``self.trained`` in a training step."""
        model = model or self.model
        args = (batch["image"], batch["question_ids"], batch["question_mask"], batch["answer_in"])
        if not isinstance(self.model, Student):
            return model(*args)  # type: ignore[no-any-return]
        # the text reads the teacher's objects, and copies from the documents the teacher retrieved
        objects = {
            k: batch[k]
            for k in ("obj_classes", "obj_boxes", "obj_scores", "obj_valid", "sources")
            if k in batch
        }
        features = [batch[k].float() for k in FEATURE_KEYS] if FEATURE_KEYS[0] in batch else None
        if features is None and self.trunk_per_batch and self.model.training:
            features = self._trunk_features(batch["image"])
        depth = 1
        if self.model.training and self.model.config.max_depth > 1:
            # r drawn per batch, uniformly over 1..R: every depth the app may ask for is trained
            depth = int(torch.randint(1, self.model.config.max_depth + 1, (1,), generator=self.depth_gen))
        return model(  # type: ignore[no-any-return]
            *args, objects=objects or None, features=features, depth=depth
        )

    def _trunk_frozen(self) -> bool:
        """Whether the student has a trunk and nothing of it trains (``freeze="trunk"``)."""
        trunk = getattr(self.model, "trunk", None)
        return trunk is not None and not any(p.requires_grad for p in trunk.parameters())

    @torch.no_grad()
    def _trunk_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen trunk's [P3, P4, P5] for a batch of input images: the trunk in eval mode (as the teacher
        detector runs), without gradients; every module of it back in the mode it was in after."""
        trunk = self.model.get_submodule("trunk")
        modes = [(m, m.training) for m in trunk.modules()]
        trunk.eval()
        try:
            return list(trunk(images))
        finally:
            for m, mode in modes:
                m.training = mode

    def _frozen_features(self, split: str) -> Any:
        """Row index -> the trunk's features of its image, computed once per distinct image, when nothing of the
        trunk trains (``freeze="trunk"``): most of a training step is the trunk, and its output never changes.
        None otherwise."""
        if not self._trunk_frozen():
            return None
        rows = self.ds.rows(split)
        cache: dict[str, list[torch.Tensor]] = {}
        first: dict[str, int] = {}
        for i, r in enumerate(rows):
            first.setdefault(r.image, i)
        todo = list(first)
        for j in range(0, len(todo), 8):
            keys = todo[j : j + 8]
            images = torch.stack([self.encoder.image(self.ds.image(rows[first[k]]))[0] for k in keys])
            for k, *maps in zip(keys, *self._trunk_features(images.to(self.device)), strict=True):
                cache[k] = [m.half().cpu() for m in maps]
            if self.on_progress:
                self.on_progress("trunk features", min(j + 8, len(todo)), len(todo))
        log.info("trunk frozen: its features cached for %d distinct images (%d rows)", len(cache), len(rows))

        def get(i: int) -> dict[str, torch.Tensor]:
            return dict(zip(FEATURE_KEYS, cache[rows[i].image], strict=True))

        return get

    @torch.no_grad()
    def validate(self, max_rows: int = 24) -> dict[str, float]:
        """Fidelity on the val split's recorded (not replayed) rows with the evaluation's own metrics
        (:mod:`graphdistill.eval.metrics`): the student predicts each row as ``predict`` does and is scored
        against the teacher's recorded output;
        plus the teacher-forced loss and answer token accuracy of one batch."""
        from graphdistill.eval import metrics
        from graphdistill.eval.evaluate import jsonable_output, output_kinds_of, output_of_row

        self.model.eval()
        try:
            if self.val_set is not None:
                n = min(len(self.val_set), max_rows)
                head = [self.val_set[i] for i in range(n)]
                recorded = [r for r in self.val_set.rows if not r.is_replay][:max_rows]
            else:
                first, recorded = self._streamed_val_rows(max_rows)
                head = [self.encoder.encode(r, self.ds.image(r)) for r in first]
            batch = self._to_device(collate(head))
            out = self._forward(batch)
            res: dict[str, float] = {"loss": float(compute_losses(out, batch, self.weights)["total"])}
            if "answer_logits" in out:
                tgt = batch["answer_target"]
                keep = tgt != -100
                acc = (out["answer_logits"].argmax(-1)[keep] == tgt[keep]).float().mean()
                res["answer_token_acc"] = float(acc)
            if self.retrieval_val is not None:  # how well the head ranks as the retriever on unseen queries
                with torch.no_grad():
                    got = self._retrieval_logits(self.retrieval_val, torch.arange(len(self.retrieval_val)))
                recall = ranking_recall(got["retrieval_logits"].cpu(), got["retrieval_targets"].cpu())
                if recall is not None:
                    res["retrieval_recall"] = recall
            for key, value in out.items():  # EMBEDDING outputs (the evaluation's metrics have none for them)
                valid = batch.get(f"{key}:valid")
                if key.startswith("embedding:") and key in batch and valid is not None and bool(valid.any()):
                    cos = nn.functional.cosine_similarity(value, batch[key], dim=-1)[valid]
                    res[f"{key}_cosine"] = float(cos.mean())
            # fidelity on recorded rows only: a replay's objects and answer describe an edited state, not its
            # photo, which is all the student sees at inference
            if not recorded:
                return res
            kinds = output_kinds_of(self.ds)
            predictor = StudentPredictor(self.model, self.tokenizer, self.meta(), str(self.device))
            student = [
                jsonable_output(predictor.predict(self.ds.image(r), r.question), kinds) for r in recorded
            ]
            teacher = [output_of_row(r, kinds) for r in recorded]
            scores = metrics.compare_outputs(teacher, student, semantic=False, class_names=self.class_names)
            res.update({k: float(v) for k, v in scores.items() if isinstance(v, int | float) and k != "n"})
            return res
        finally:
            self.model.train()

    def _streamed_val_rows(self, max_rows: int) -> tuple[list[DatasetRow], list[DatasetRow]]:
        """The validation split's first ``max_rows`` rows and its first ``max_rows`` recorded (not replayed)
        rows, as validation in memory takes them, read a row group at a time until both are found."""
        head: list[DatasetRow] = []
        recorded: list[DatasetRow] = []
        for row in self.ds.iter_rows(self.val_split):
            if len(head) < max_rows:
                head.append(row)
            if not row.is_replay and len(recorded) < max_rows:
                recorded.append(row)
            if len(head) == len(recorded) == max_rows:
                break
        return head, recorded

    # ---- save / cleanup -----------------------------------------------------------------------------------

    def save(self) -> dict[str, Any]:
        """The model files and RUN/metrics.json (rank 0 writes them; every rank returns the metrics)."""
        meta = self.save_model_files() if self.rank == 0 else self.meta()
        last = self.history[-1] if self.history else {}
        metrics = {
            "epochs": self.epoch,
            "steps": self.step,
            "parameters": meta["parameters"],
            "seconds_per_epoch": (sum(self.train_seconds) / len(self.train_seconds))
            if self.train_seconds
            else None,
            "final_train_loss": last.get("train_loss"),
            "val": last.get("val"),
            "history": self.history,
        }
        if self.rank == 0:
            _atomic_write_json(self.run / "metrics.json", metrics)
        if self.world_size > 1:
            _barrier()
        return metrics

    def cleanup(self) -> None:
        for data in (self.train_set, self.val_set):
            if data is not None:
                data._cache.clear()
                data._objects_cache.clear()


def train(
    cfg: TrainConfig,
    *,
    model_factory: Callable[[StudentConfig], nn.Module] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """setup → train → save → cleanup. Returns the final metrics (also in RUN/metrics.json)."""
    recipe = TrainRecipe(
        cfg, model_factory=model_factory, on_step=on_step, on_epoch=on_epoch, on_progress=on_progress
    )
    recipe.setup()
    try:
        recipe.train()
        return recipe.save()
    finally:
        recipe.cleanup()
