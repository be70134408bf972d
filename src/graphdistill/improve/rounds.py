"""Rounds: grow the training data where the student is unsure, retrain, and measure every round.

One round of an arm (:func:`improve`):

1. the previous round's student answers every unlabelled pool input several ways (the photo, its test-time
   views, the question reworded) and each input gets a disagreement score
   (:mod:`graphdistill.improve.uncertainty`);
2. the arm picks ``budget`` inputs — ``active``: the most unsure; ``random``: a seeded draw (the baseline with
   the same teacher budget); ``self-filtered`` / ``self-unfiltered``: the *least* unsure (pseudo-labelling
   takes what the model is surest of) — and writes them to ``round-NN/selected.jsonl``;
3. a labeller labels them into the arm's trace store (:mod:`graphdistill.improve.labels`): the teacher graph
   (K samples each, the normal recorder) for ``active`` and ``random``, the student itself for the
   self-training arms (with its views as samples, or only the photo's answer unfiltered);
4. the whole store is filtered into ``round-NN/dataset`` (:func:`filter_config`: the teacher arms as the demo
   filters, the vote and the consistency checks; ``self-filtered`` also drops a student-labelled input unless
   ``min_agreement`` of the student's predictions of it agree on the answer; ``self-unfiltered``: nothing
   dropped, no dedup);
5. the student retrains from the previous round's weights (warm start, ``TrainConfig.init_from``) into
   ``round-NN/run`` — a loadable run;
6. it is evaluated on the dataset's test split: the held-out rows of the base run's store, the same rows in
   every round and every arm (the filter puts every held-out input in test whatever its settings), with the
   collapse measures (:func:`graphdistill.eval.metrics.answer_diversity` of the student's held-out answers
   and of the round's training labels, :func:`~graphdistill.eval.metrics.class_coverage` of the labels).

Round 0 is the base run, evaluated the same way (into ``OUT/round-00/eval.json``: the run's own is left alone). ``OUT/rounds.json`` holds every finished round and is
rewritten after each one; a rerun with the same arguments skips finished rounds and, inside a round, the
steps whose outputs exist (the recorder resumes a half-recorded selection, training resumes from its
checkpoint). Each arm has its own ``OUT``: run arms side by side in sibling folders.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from graphdistill.errors import GraphdistillError
from graphdistill.improve.labels import GraphLabeller, Labeller, StudentLabeller

log = logging.getLogger(__name__)

ARMS = ("active", "random", "self-filtered", "self-unfiltered")
TEACHER_ARMS = ("active", "random")
ROUNDS_FILE = "rounds.json"
FORMAT = "graphdistill-rounds/1"

Progress = Callable[[str, int, int], None]


class ImproveError(GraphdistillError, ValueError):
    """Bad arguments to :func:`improve`, or an ``OUT`` folder made with other ones; the message says which.
    ``field``, ``value``, ``reason``: the :class:`ImproveConfig` field at fault, when one is (:meth:`bad`; a
    command names its flag from it)."""

    field: str | None = None
    value: Any = None
    reason: str = ""

    @classmethod
    def bad(cls, field: str, value: Any, reason: str) -> ImproveError:
        err = cls(f"{field} {value!r}: {reason}")
        err.field, err.value, err.reason = field, value, reason
        return err


@dataclass(frozen=True)
class ImproveConfig:
    arm: str = "active"
    rounds: int = 3
    budget: int = 8  # pool inputs labelled per round
    samples: int = 3  # teacher samples per input (the graph labeller's K)
    teacher_tta: tuple[str, ...] = ()  # what the teacher's samples > 0 see (the demo records flip, scale)
    augmentations: tuple[str, ...] = ("flip", "scale")  # the views the student answers to score an input
    reword: bool = True  # ... and the question reworded from the template bank
    epochs: int = 10  # warm-start training epochs per round
    max_minutes: float | None = None  # per round's training, a cap
    min_agreement: float = 0.5  # self-filtered: the answer vote's share (across the views) an input needs
    seed: int = 0
    retrieval_queries: int | None = None  # None: training's default
    batch_size: int = 16

    def check(self) -> None:
        if self.arm not in ARMS:
            raise ImproveError.bad("arm", self.arm, f"choose one of {', '.join(ARMS)}")
        for name in ("rounds", "budget", "samples", "epochs"):
            if int(getattr(self, name)) < 1:
                raise ImproveError.bad(name, getattr(self, name), "must be at least 1")
        if not 0 <= self.min_agreement <= 1:
            raise ImproveError.bad("min_agreement", self.min_agreement, "must be between 0 and 1")

    def key(self) -> dict[str, Any]:
        """What must match for a rerun to go on in the same ``OUT`` (``rounds`` may grow)."""
        d = asdict(self)
        d.pop("rounds")
        d["augmentations"] = list(self.augmentations)
        d["teacher_tta"] = list(self.teacher_tta)
        return d


def filter_config(arm: str, min_agreement: float) -> Any:
    """The filter an arm's rounds use. The teacher arms: the demo's (the vote over the K samples and every
    consistency check). ``self-filtered``: that, and a rule that keeps a student-labelled input only when at
    least ``min_agreement`` of the student's predictions of it agreed on the answer (the majority vote that
    keeps a model's unstable outputs out of its own labels; the teacher's inputs pass it). ``self-unfiltered``:
    nothing dropped (:meth:`FilterConfig.unfiltered`)."""
    from graphdistill.filter.filtering import FilterConfig
    from graphdistill.filter.rules import Rule
    from graphdistill.improve.labels import VIEW_AGREEMENT, view_agreement

    if arm == "self-unfiltered":
        return FilterConfig.unfiltered()
    if arm == "self-filtered":
        return FilterConfig(rules=[Rule(VIEW_AGREEMENT, view_agreement, min_agreement)])
    return FilterConfig()


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def _write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w") as fh:
        for r in rows:
            fh.write(json.dumps(dict(r)) + "\n")
    tmp.replace(path)


def copy_store(src: Path, dst: Path, progress: Progress | None = None) -> int:
    """Every trace of the store at ``src`` (with its blobs) into a new store at ``dst``; how many."""
    from graphdistill.store.trace_store import TraceStore

    n = 0
    with TraceStore(src, readonly=True, check=False) as s, TraceStore(dst) as d:
        groups = s.groups()
        total = sum(len(v) for v in groups.values())
        for ids in groups.values():
            for tid in ids:
                t = s.get(tid)
                d.copy_from(s, t)
                n += 1
                if progress:
                    progress("copying the base store", n, total)
    return n


@dataclass
class PoolScores:
    """The disagreement of every unlabelled pool input under one round's student."""

    index: list[int]  # pool row indices
    scores: list[dict[str, Any]]  # Disagreement.to_dict() per input


def score_pool(
    run: Path,
    pool: Sequence[Mapping[str, Any]],
    candidates: Sequence[int],
    cfg: ImproveConfig,
    progress: Progress | None = None,
    embedder: Any | None = None,
) -> PoolScores:
    """The student of ``run`` answers each candidate pool row several ways and each gets its disagreement."""
    from graphdistill.images import load_image
    from graphdistill.improve.uncertainty import augmented_predictions, disagreement
    from graphdistill.student.loader import PAD_VALUE
    from graphdistill.student.predict import load_student

    student = load_student(run)
    out = PoolScores([], [])
    for n, i in enumerate(candidates):
        row = pool[i]
        image = load_image(row["image"])
        preds = augmented_predictions(
            image,
            row["question"],
            lambda img, q: student.predict(img, q),
            student.config.outputs,
            augmentations=cfg.augmentations,
            reword=cfg.reword,
            pad_value=PAD_VALUE,
            size=student.config.image_size,
        )
        d = disagreement([p.result for p in preds], student.config.outputs, embedder)
        out.index.append(i)
        out.scores.append(d.to_dict())
        if progress:
            progress("student scores the pool", n + 1, len(candidates))
    return out


def choose(arm: str, scores: PoolScores, budget: int, seed: int, round_no: int) -> list[int]:
    """The pool rows an arm labels this round (module docstring); ties broken by pool order."""
    idx = list(scores.index)
    if arm == "random":
        rng = random.Random(f"{seed}:{round_no}")
        return sorted(rng.sample(idx, min(budget, len(idx))))
    by = {i: s["score"] for i, s in zip(scores.index, scores.scores, strict=True)}
    if arm == "active":
        order = sorted(idx, key=lambda i: (-by[i], i))
    else:  # self-training: the surest first
        order = sorted(idx, key=lambda i: (by[i], i))
    return order[:budget]


def round_measures(
    run: Path, dataset: Path, embedder: Any | None = None, eval_dir: Path | None = None
) -> dict[str, Any]:
    """One round's figures: fidelity on the test split (the held-out rows), the diversity of the student's
    answers there and of the training labels, and the labels' class coverage. The evaluation is written to
    ``eval_dir/eval.json`` (default: the run's own)."""
    from graphdistill.dataset import open_dataset
    from graphdistill.eval.evaluate import evaluate_run
    from graphdistill.eval.metrics import answer_diversity, class_coverage
    from graphdistill.eval.result import write_eval

    result = evaluate_run(
        run,
        dataset,
        split="test",
        teacher_timing=False,
        student_repeats=1,
        embedder=embedder,
        ci_resamples=200,
    )
    write_eval(eval_dir or run, result)
    ds = open_dataset(dataset)
    train = ds.rows("train")
    return {
        "fidelity": dict(result["fidelity"]),
        "fidelity_ci": dict(result.get("fidelity_ci") or {}),
        "test_rows": result["n"],
        "train_rows": len(train),
        "diversity": answer_diversity([str(r.get("student_answer") or "") for r in result["rows"]]),
        "label_diversity": answer_diversity([r.answer for r in train]),
        "coverage": class_coverage([[o.label for o in r.objects] for r in train], ds.class_names),
    }


def _read_state(out: Path) -> dict[str, Any] | None:
    path = out / ROUNDS_FILE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except ValueError as exc:
        raise ImproveError(f"{path}: not readable JSON ({exc}); move it away to start over") from exc
    if state.get("format") != FORMAT:
        raise ImproveError(f"{path}: not a rounds file of this graphdistill ({state.get('format')!r})")
    return dict(state)


def _pool_rows(pool: Path) -> list[dict[str, Any]]:
    from graphdistill.recording.batch import read_inputs

    rows, bad = read_inputs(pool)
    if bad:
        log.warning("pool %s: %d unusable rows skipped", pool, bad)
    return rows


def _store_groups(store: Path) -> dict[str, list[str]]:
    from graphdistill.store.trace_store import TraceStore

    with TraceStore(store, readonly=True, check=False) as s:
        return s.groups()


def _pool_groups(pool: Sequence[Mapping[str, Any]]) -> list[str]:
    from graphdistill.images import load_image
    from graphdistill.improve.labels import input_group

    return [input_group(load_image(r["image"]), r["question"]) for r in pool]


def improve(
    run: str | os.PathLike[str],
    pool: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: ImproveConfig | None = None,
    *,
    labeller: Labeller | None = None,
    graph: str | None = None,
    embedder: Any | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run ``config.rounds`` rounds of ``config.arm`` from the trained ``run`` on the inputs of ``pool``
    (a JSONL/Parquet inputs file or a folder of images, as ``record`` reads) into ``out`` (module docstring).
    ``labeller``: who labels the teacher arms' picks (default: the graph ``graph`` names, ``config.samples``
    samples each, recorded; the self-training arms always label with the student). Returns the rounds file's
    content; ``on_round`` gets each round's record as it finishes."""
    cfg = config or ImproveConfig()
    cfg.check()
    base, out_dir, pool_path = Path(run), Path(out), Path(pool)
    for f in ("model.safetensors", "config.json", "tokenizer.json", "meta.json"):
        if not (base / f).is_file():
            raise ImproveError(f"run {base}: not a trained run folder (no {f})")
    meta = json.loads((base / "meta.json").read_text())
    base_dataset = Path(str(meta.get("dataset") or ""))
    manifest_path = base_dataset / "manifest.json"
    if not manifest_path.is_file():
        raise ImproveError(f"run {base}: its dataset {base_dataset} is not there (no manifest.json)")
    source_store = json.loads(manifest_path.read_text()).get("source_store")
    if not source_store or not (Path(source_store) / "traces.sqlite").exists():
        raise ImproveError(
            f"run {base}: its dataset {base_dataset} names no readable trace store ({source_store!r}); the rounds "
            "grow that store"
        )
    pool_rows = _pool_rows(pool_path)
    if not pool_rows:
        raise ImproveError(f"pool {pool_path}: no inputs")
    out_dir.mkdir(parents=True, exist_ok=True)
    tick = progress or (lambda stage, done, total: None)

    state = _read_state(out_dir)
    key: dict[str, Any] = {"run": str(base.resolve()), "pool": str(pool_path.resolve()), "config": cfg.key()}
    if state is None:
        state = {"format": FORMAT, **key, "rounds": []}
    elif {k: state.get(k) for k in key} != key:
        diff = [k for k in ("run", "pool") if state.get(k) != key[k]]
        before = state.get("config") or {}
        diff += [
            f"{k} ({before.get(k)!r}, now {v!r})" for k, v in key["config"].items() if before.get(k) != v
        ]
        raise ImproveError(
            f"{out_dir}: made by rounds with other {', '.join(diff)}; give another --out or the same arguments"
        )
    store = out_dir / "store"
    if not (out_dir / "store.ready").exists():  # the arm's own store: the base store, then its labels
        shutil.rmtree(store, ignore_errors=True)
        copy_store(Path(source_store), store, tick)
        (out_dir / "store.ready").write_text(str(source_store))

    def record(entry: dict[str, Any]) -> None:
        assert state is not None
        state["rounds"] = [r for r in state["rounds"] if r["round"] != entry["round"]] + [entry]
        state["rounds"].sort(key=lambda r: r["round"])
        _atomic_json(out_dir / ROUNDS_FILE, state)
        if on_round:
            on_round(entry)

    done = {int(r["round"]) for r in state["rounds"]}
    if 0 not in done:
        t0 = time.perf_counter()
        tick("round 0: evaluating the base run", 0, 1)
        zero = out_dir / "round-00"  # the base run's own eval.json stays as it is
        zero.mkdir(exist_ok=True)
        measures = round_measures(base, base_dataset, embedder, eval_dir=zero)
        record(
            {
                "round": 0,
                "arm": cfg.arm,
                "run": str(base),
                "dataset": str(base_dataset),
                "selected": [],
                "labelled": 0,
                "teacher_calls": 0,
                "labelled_inputs": 0,
                "seconds": time.perf_counter() - t0,
                **measures,
            }
        )

    groups = _pool_groups(pool_rows)
    prev_run = base
    for r in range(1, cfg.rounds + 1):
        rdir = out_dir / f"round-{r:02d}"
        if r in done:
            prev_run = rdir / "run"
            continue
        t0 = time.perf_counter()
        rdir.mkdir(exist_ok=True)
        selected_path = rdir / "selected.jsonl"
        if not selected_path.exists():
            labelled = _store_groups(store)
            candidates = [i for i, g in enumerate(groups) if g not in labelled]
            if not candidates:
                log.info("round %d: the pool is all labelled; stopping", r)
                break
            scores = score_pool(prev_run, pool_rows, candidates, cfg, tick, embedder)
            picked = choose(cfg.arm, scores, cfg.budget, cfg.seed, r)
            _atomic_json(
                rdir / "scores.json", {"index": scores.index, "scores": scores.scores, "picked": picked}
            )
            _write_jsonl(selected_path, [pool_rows[i] for i in picked])
        picked = json.loads((rdir / "scores.json").read_text())["picked"]
        who: Labeller
        if cfg.arm in TEACHER_ARMS:
            who = labeller or GraphLabeller(graph=graph, samples=cfg.samples, tta=cfg.teacher_tta)
        else:
            who = StudentLabeller(
                prev_run, views=cfg.arm == "self-filtered", augmentations=cfg.augmentations, embedder=embedder
            )
        labels_path = rdir / "labelled.json"
        if not labels_path.exists():
            who.label(selected_path, store, tick)
            # every trace of the picked inputs, those a killed earlier attempt recorded included: what it cost
            stored = _store_groups(store)
            n_traces = sum(len(stored.get(groups[i], ())) for i in picked)
            _atomic_json(labels_path, {"traces": n_traces, "teacher": bool(who.teacher)})
        labels = json.loads(labels_path.read_text())
        dataset = rdir / "dataset"
        if not (rdir / "filtered.json").exists():
            from graphdistill.filter.filtering import filter_store
            from graphdistill.store.trace_store import TraceStore

            shutil.rmtree(dataset, ignore_errors=True)
            with TraceStore(store, readonly=True, check=False) as traces:
                result = filter_store(
                    traces,
                    dataset,
                    filter_config(cfg.arm, cfg.min_agreement),
                    embedder=embedder,
                    progress=tick,
                    source_store=str(store.resolve()),
                )
            _atomic_json(rdir / "filtered.json", result.summary())
        run_dir = rdir / "run"
        if not (rdir / "trained.json").exists():
            from graphdistill.student.train import CHECKPOINT, TrainConfig, train

            tcfg = TrainConfig(
                dataset=str(dataset),
                out=str(run_dir),
                epochs=cfg.epochs,
                max_minutes=cfg.max_minutes,
                device=device,
                resume=(run_dir / CHECKPOINT).exists(),  # a round killed while training goes on
                seed=cfg.seed,
                batch_size=cfg.batch_size,
                init_from=str(prev_run),
            )
            if cfg.retrieval_queries is not None:
                tcfg.retrieval_queries = cfg.retrieval_queries
            stage = f"round {r}: training"

            def on_epoch(rec: dict[str, Any], stage: str = stage) -> None:
                tick(stage, int(rec["epoch"]), cfg.epochs)

            metrics = train(tcfg, on_epoch=on_epoch)
            _atomic_json(rdir / "trained.json", {"epochs": metrics.get("epochs")})
        tick(f"round {r}: evaluating", 0, 1)
        measures = round_measures(run_dir, dataset, embedder)
        earlier = [x for x in state["rounds"] if 0 < int(x["round"]) < r]
        teacher_calls = sum(int(x["labelled"]) for x in earlier if x.get("teacher")) + (
            int(labels["traces"]) if labels["teacher"] else 0
        )
        record(
            {
                "round": r,
                "arm": cfg.arm,
                "run": str(run_dir),
                "dataset": str(dataset),
                "selected": picked,
                "labelled": int(labels["traces"]),
                "teacher": bool(labels["teacher"]),
                "teacher_calls": teacher_calls,
                "labelled_inputs": sum(len(x["selected"]) for x in earlier) + len(picked),
                "seconds": time.perf_counter() - t0,
                **measures,
            }
        )
        prev_run = run_dir
    return dict(state)
