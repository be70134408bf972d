"""`graphdistill train DATASET --out RUN`: distil the filtered dataset into a student model."""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import Any

from graphdistill.commands._common import CommandError, console, print_json

SHOWN_LOSSES = ("answer_ce", "det_cls", "det_box", "kd_cls", "mask_bce", "sources")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("train", help="train the student on a filtered dataset")
    p.add_argument("dataset", help="the filtered dataset folder (from `graphdistill filter`)")
    p.add_argument("--out", required=True, help="the run folder to write (model, tokenizer, checkpoints)")
    p.add_argument("--preset", choices=["tiny", "small"], default="tiny", help="model size (default: tiny)")
    p.add_argument("--epochs", type=int, default=None, help="epochs to train (default: 30)")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="train until this much time has passed (with --epochs: whichever comes first)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoints/last.pt")
    p.add_argument(
        "--init-from",
        default=None,
        metavar="RUN",
        help="warm start: this run's tokenizer, config and weights (a run trained on a dataset of the same graph)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--image-size", type=int, default=None, help="override the preset's input size (multiple of 32)"
    )
    p.add_argument(
        "--max-depth",
        type=int,
        default=None,
        metavar="R",
        help="recurrent depth: the joint encoder's last layer becomes a weight-shared block trained at 1..R "
        "iterations (drawn per batch), so predict/eval/run-bundle --depth r may spend more compute on a "
        "query (default 1: no recurrence)",
    )
    p.add_argument(
        "--text-pixels",
        choices=["auto", "on", "off"],
        default="auto",
        help="whether the answer side reads the image itself (its P5 cells, the feature under each object) or "
        "only the detected objects and the question. auto (default): off when the graph's answer is made from "
        "its detections and no other pixels (visual_rag without CLIP: its LLM never sees the image), else on",
    )
    p.add_argument(
        "--loss-weight",
        action="append",
        default=[],
        metavar="NAME=W",
        help="weight of one loss, repeatable (e.g. --loss-weight kd_cls=0 --loss-weight mask_bce=4); "
        "names: answer_ce, answer_kl, det_cls, det_box, det_dfl, kd_cls, kd_box, mask_bce, sources, "
        "retrieval, embedding, embedding:<output>",
    )
    p.add_argument(
        "--start",
        choices=["auto", "none"],
        default="auto",
        help="auto (default): start from what the graph's teachers offer (a YOLO detector: its trunk and "
        "detection head, and its licence); none: a trunk from scratch",
    )
    p.add_argument(
        "--freeze",
        choices=["trunk", "backbone", "none"],
        default="trunk",
        help="a trunk started from a detector: train none of it (default: the detector stays the teacher's "
        "at the student's input size), its neck and head only (densely, with the detector's per-cell outputs "
        "as soft targets), or all of it",
    )
    p.add_argument(
        "--retrieval-queries",
        type=int,
        default=None,
        metavar="N",
        help="synthetic queries the graph's retriever ranks, to teach the sources head how it ranks (default "
        "12000; 0: learn from the traces alone). Used when the graph's retrieve node offers its embedder",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="train on N processes of this machine (DistributedDataParallel: gloo on CPU, NCCL with one GPU "
        "each); --batch-size is the global batch and must be a multiple of N. Several machines: "
        "torchrun --nproc-per-node N ... -m graphdistill.cli train ... (see the README)",
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="stream the training and validation rows from the dataset's Parquet row groups instead of holding "
        "them (and their images) in memory: for a dataset larger than memory (see the README)",
    )
    p.add_argument(
        "--shuffle-buffer",
        type=int,
        default=None,
        metavar="N",
        help="with --stream: rows the shuffle buffer holds (default 4096; more is closer to a full shuffle and "
        "holds more rows)",
    )
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    p.set_defaults(func=_train)


def parse_loss_weights(items: list[str]) -> dict[str, float]:
    """``["kd_cls=0", "det_cls=2"]`` -> ``{"kd_cls": 0.0, "det_cls": 2.0}``; names are checked by the recipe."""
    weights: dict[str, float] = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = None
        if weight is None or not name.strip():
            raise CommandError(f"--loss-weight {item!r}: give NAME=WEIGHT, e.g. det_box=5")
        weights[name.strip()] = weight
    return weights


def _train(args: argparse.Namespace) -> int:
    from graphdistill.dataset import open_dataset

    if args.epochs is not None and args.epochs < 1:
        raise CommandError(f"--epochs {args.epochs}: must be at least 1")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise CommandError(f"--max-minutes {args.max_minutes}: must be positive")
    if args.batch_size < 1:
        raise CommandError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.retrieval_queries is not None and args.retrieval_queries < 0:
        raise CommandError(f"--retrieval-queries {args.retrieval_queries}: must be 0 or more")
    if args.shuffle_buffer is not None and not args.stream:
        raise CommandError("--shuffle-buffer: applies with --stream only")
    if args.shuffle_buffer is not None and args.shuffle_buffer < 1:
        raise CommandError(f"--shuffle-buffer {args.shuffle_buffer}: must be at least 1 row")
    if args.image_size is not None and (args.image_size < 32 or args.image_size % 32):
        raise CommandError(f"--image-size {args.image_size}: must be a positive multiple of 32")
    from graphdistill.student.config import MAX_DEPTH

    if args.max_depth is not None and not 1 <= args.max_depth <= MAX_DEPTH:
        raise CommandError(f"--max-depth {args.max_depth}: must be between 1 and {MAX_DEPTH}")
    loss_weights = parse_loss_weights(args.loss_weight)
    open_dataset(args.dataset)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out}: is a file, expected a run folder")

    import torch

    from graphdistill.student.losses import LossWeights
    from graphdistill.student.train import TrainConfig

    try:
        LossWeights.from_names(loss_weights)
    except ValueError as exc:
        raise CommandError(f"--loss-weight: {exc}") from exc
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CommandError(f"--device {args.device}: CUDA is not available on this machine")
    cfg = TrainConfig(
        dataset=args.dataset,
        out=str(out),
        preset=args.preset,
        epochs=args.epochs if args.epochs is not None or args.max_minutes is not None else 30,
        max_minutes=args.max_minutes,
        device=args.device,
        resume=args.resume,
        init_from=args.init_from,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        overrides={
            **({"image_size": args.image_size} if args.image_size else {}),
            **({"max_depth": args.max_depth} if args.max_depth else {}),
            **({"text_pixels": args.text_pixels == "on"} if args.text_pixels != "auto" else {}),
        },
        loss_weights=loss_weights,
        start=args.start,
        freeze=args.freeze,
        **({"retrieval_queries": args.retrieval_queries} if args.retrieval_queries is not None else {}),
        stream=args.stream,
        **({"shuffle_buffer": args.shuffle_buffer} if args.shuffle_buffer is not None else {}),
    )
    if args.nproc < 1:
        raise CommandError(f"--nproc {args.nproc}: must be at least 1")
    if args.batch_size % args.nproc:
        raise CommandError(
            f"--batch-size {args.batch_size} does not split over --nproc {args.nproc}: "
            f"give a multiple of {args.nproc}"
        )
    from graphdistill.student.distributed import train_on

    try:
        metrics = train_on(cfg, args.nproc, partial(TrainDisplay, str(out), cfg.epochs))
    except (ValueError, FileNotFoundError) as exc:
        raise CommandError(str(exc)) from exc
    if metrics is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    con = console(stderr=True)
    con.print(f"student written to {out} ({metrics['parameters']:,} parameters, {metrics['epochs']} epochs)")
    if args.json:
        print_json(metrics)
    return 0


class TrainDisplay:
    """The progress a person watches while training: batches with their losses, epochs, setup stages; a line
    per epoch. Built in rank 0 of a training on several processes (so a module-level class)."""

    def __init__(self, out: str, epochs: int | None) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.out, self.epochs = out, epochs
        self.con = console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.con,
            transient=False,
        )
        self.tasks: dict[str, Any] = {}
        self.progress.start()

    def on_step(self, info: dict[str, Any]) -> None:
        progress, tasks = self.progress, self.tasks
        if "epochs" not in tasks and self.epochs:
            tasks["epochs"] = progress.add_task(
                "epochs", total=self.epochs, completed=info["epoch"] - 1, info=f"run {self.out}"
            )
        if "batches" not in tasks:
            tasks["batches"] = progress.add_task("batches", total=info["batches"], info="")
        task = tasks["batches"]
        if info["batch"] == 1:
            progress.reset(task, total=info["batches"])
        losses = info["losses"]
        shown = " ".join(f"{k}={losses[k]:.3f}" for k in SHOWN_LOSSES if k in losses)
        progress.update(
            task,
            completed=info["batch"],
            description=f"epoch {info['epoch']}",
            info=f"loss={losses['total']:.3f} {shown}",
        )

    def on_epoch(self, record: dict[str, Any]) -> None:
        if "epochs" in self.tasks:
            self.progress.update(self.tasks["epochs"], completed=record["epoch"])
        val = record["val"]
        keys = ("answer_exact", "answer_f1", "box_map50", "mask_miou", "sources_recall")
        # "val" is measured on the train split when the dataset has no val rows: say so, not "val"
        where = "val" if record.get("val_split", "val") == "val" else "train fit (no val rows)"
        self.con.print(
            f"epoch {record['epoch']}: train loss {record['train_loss'].get('total', float('nan')):.4f} | {where} "
            + " ".join(f"{k}={val[k]:.3f}" for k in keys if k in val)
        )

    def on_progress(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total, info="")
        self.progress.update(self.tasks[stage], completed=done, total=total)

    def close(self) -> None:
        self.progress.stop()
