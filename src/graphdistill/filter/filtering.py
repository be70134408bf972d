"""From a trace store to a filtered dataset: vote per group, check, apply user rules and agreement
thresholds, drop near-duplicates, split by provenance, write the dataset and its report.

Every recorded group ends either kept (in exactly one split) or dropped by exactly one rule (the first it
failed; every failed rule is still listed in the report), so kept + dropped = groups.

Held-out groups (inputs made from a held-out photo) are the evaluation set, and it must not depend on the
filter's settings: runs filtered differently (the scaling study, filtering on and off, later changes to the
checks) are compared on the same held-out rows. So a held-out group is checked and voted like any other, its
failed checks are reported, and it is kept all the same, with its consensus as the reference ("held out:
kept for evaluation"); dedup never drops one. The student is scored against what the teacher said, even where
the teacher's samples disagreed or its answer named an object its detector missed: fidelity to the teacher
is the measure, and the checks only decide what the student learns from. Only a held-out group with no
finished teacher sample is dropped (there is nothing to score against), and that depends on the recording,
not on the filter's settings.
"""

from __future__ import annotations

import logging
import os
import pickle
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from graphdistill._fs import Location, is_url, resolve
from graphdistill.dataset import DatasetError, DatasetWriter
from graphdistill.filter.checks import (
    CHECKS,
    CheckConfig,
    GreedyAnswer,
    coco_classes,
    greedy_answer,
    run_checks,
)
from graphdistill.filter.dedup import dhash, near_duplicates
from graphdistill.filter.rules import Rule
from graphdistill.filter.splits import Item, assign_splits
from graphdistill.filter.vote import (
    Consensus,
    Embedder,
    FilterError,
    OutputNames,
    load_image_of,
    output_kinds_of_trace,
    recorded_schema,
    trace_documents,
    vote_group,
    written,
)
from graphdistill.recording.replay import is_heldout, replay_column, replay_of
from graphdistill.trace import Detections, FieldSpec, GraphSchema, Kind, Trace

log = logging.getLogger(__name__)


class StoreLike(Protocol):
    def groups(self) -> dict[str, list[str]]: ...
    def get(self, trace_id: str) -> Trace: ...
    def blob(self, sha: str) -> bytes: ...


@dataclass
class FilterConfig:
    min_agreement: dict[str, float] = field(default_factory=dict)  # output ("answer", ...) -> threshold
    rules: list[Rule] = field(default_factory=list)
    checks: CheckConfig = field(default_factory=CheckConfig)
    answer_threshold: float = 0.85  # embedding cosine at which two answers mean the same
    iou: float = 0.5
    quorum: int | None = None  # default ceil(K/2)
    dedup: bool = True
    dedup_distance: int = 4  # dHash bits
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    # photos whose inputs all go to test. None by default: a user's own store has its own photos; inputs
    # marked held-out by their recipe (``inputs make --heldout-questions``) go to test whatever this says
    heldout_photos: tuple[str, ...] = ()
    seed: int = 0

    @classmethod
    def unfiltered(cls, **kw: Any) -> FilterConfig:
        """A filter that drops nothing: every check off, no agreement threshold, no dedup (the samples are still
        voted into one row per input). What "filtering off" means in the scaling study and the rounds."""
        return cls(checks=CheckConfig(disabled={c.name for c in CHECKS}), dedup=False, **kw)

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["rules"] = [{"name": r.name, "threshold": r.threshold} for r in self.rules]
        d["checks"] = {**asdict(self.checks), "disabled": sorted(self.checks.disabled)}
        return d


@dataclass
class GroupDecision:
    group_id: str
    consensus: Consensus
    failed: list[tuple[str, str]]  # every rule it failed: (name, reason)
    split: str | None = None
    rule_scores: dict[str, float] = field(default_factory=dict)
    heldout: bool = False  # made from a held-out photo: evaluation, never training
    greedy: GreedyAnswer | None = None  # sample 0's answer, measured (see teacher_measures)

    @property
    def kept(self) -> bool:
        return not self.failed or self.kept_for_evaluation

    @property
    def kept_for_evaluation(self) -> bool:
        """A held-out group that failed a check, kept as it is (see the module docstring); one with no
        finished teacher sample has no reference to score against and is dropped."""
        return self.heldout and bool(self.failed) and self.consensus.n_ok > 0

    @property
    def rule(self) -> str | None:
        return self.failed[0][0] if self.failed else None

    @property
    def reason(self) -> str | None:
        return self.failed[0][1] if self.failed else None


@dataclass
class FilterResult:
    """What ``filter_store`` decided. Each decision holds its group's consensus *slim* (:func:`slim`: no
    masks, top-k log-probabilities, embeddings or answer clusters): the full consensus of every kept group
    is its dataset row, and holding every group's in memory would make the filter's memory grow with the
    store."""

    dataset: Path | str  # the dataset folder, or its URL (DatasetWriter.root)
    decisions: list[GroupDecision]
    manifest: dict[str, Any]

    def empty_splits(self) -> dict[str, str]:
        """split -> why it is empty, for each split the fractions give a share but no kept row reached
        (``test``: nothing to evaluate on)."""
        got = Counter(d.split for d in self.decisions if d.kept)
        shares = tuple((self.manifest.get("filter") or {}).get("fractions") or FilterConfig().fractions)
        fractions = dict(zip(("train", "val", "test"), shares, strict=True))
        photos = {p for d in self.decisions if d.kept for p in d.consensus.provenance.photos}
        why = (
            "no input was kept"
            if not got
            else f"{sum(got.values())} kept inputs about {len(photos)} source photos are too few to split "
            f"{'/'.join(f'{f:g}' for f in shares)} (inputs that share a photo share a split)"
        )
        out = {s: why for s, f in fractions.items() if f > 0 and not got.get(s)}
        if "test" in out:
            out["test"] += (
                "; nothing to evaluate on: hold photos out (filter --heldout PHOTO ...) or record held-out "
                "inputs (inputs make --heldout-questions N)"
            )
        return out

    def summary(self) -> dict[str, Any]:
        by_rule = Counter(d.rule for d in self.decisions if d.rule and not d.kept)
        splits = Counter(d.split for d in self.decisions if d.kept)
        replays = [d for d in self.decisions if replay_of(d.consensus.provenance) is not None]
        held = [d for d in self.decisions if d.heldout]
        return {
            "groups": len(self.decisions),
            "kept": sum(d.kept for d in self.decisions),
            "dropped": sum(not d.kept for d in self.decisions),
            "by_rule": dict(sorted(by_rule.items())),
            "flagged_by_rule": dict(
                sorted(Counter(name for d in self.decisions for name, _ in d.failed).items())
            ),
            "splits": {s: splits.get(s, 0) for s in ("train", "val", "test")},
            "empty_splits": self.empty_splits(),
            "replays": {
                "groups": len(replays),
                "kept": sum(d.kept for d in replays),
                "dropped": sum(not d.kept for d in replays),
            },
            "heldout": {
                "groups": len(held),
                "kept": sum(d.kept for d in held),
                # flagged by a check or rule, kept all the same: the evaluation set is fixed
                "kept_for_evaluation": sum(d.kept_for_evaluation for d in held),
                "no_teacher_output": sum(not d.kept for d in held),
            },
            "teacher": teacher_measures(self.decisions),
        }


def teacher_measures(decisions: Sequence[GroupDecision]) -> dict[str, float | int | None]:
    """How well the teacher answered the recorded inputs, before any filtering:

    - ``greedy_grounded``: the share of greedy answers (sample 0) that name only classes their own run
      detected (the ``answer_class_not_detected`` test on sample 0 alone);
    - ``greedy_cut_by_length``: the share of greedy answers that hit the token limit;
    - ``greedy_words``: their mean length in words;
    - ``answer_agreement``: the mean answer agreement (fraction of the K samples in the winning cluster) over
      the groups of two samples or more (``agreement_n`` of them; one sample agrees with itself: the demo's
      replays are recorded once each);
    - ``keep_rate``: the share of groups the filter kept.

    Shares over the groups with a greedy answer (``greedy_n`` of them); None when there is none."""
    greedy = [d.greedy for d in decisions if d.greedy is not None]
    n = len(decisions)
    voted = [d.consensus.agreement["answer"] for d in decisions if d.consensus.k > 1]

    def share(values: Sequence[bool]) -> float | None:
        return sum(values) / len(values) if values else None

    return {
        "groups": n,
        "greedy_n": len(greedy),
        "greedy_grounded": share([g.grounded for g in greedy]),
        "greedy_cut_by_length": share([g.cut_by_length for g in greedy]),
        "greedy_words": sum(g.words for g in greedy) / len(greedy) if greedy else None,
        "agreement_n": len(voted),
        "answer_agreement": sum(voted) / len(voted) if voted else None,
        "keep_rate": sum(d.kept for d in decisions) / n if n else None,
    }


def slim(c: Consensus) -> Consensus:
    """``c`` without what weighs per input and nothing after the vote needs: masks (objects keep label,
    class, score and box), the answer's top-k log-probabilities, embeddings, answer clusters, ground truth."""
    return replace(
        c,
        objects=[o.model_copy(update={"mask": None}) if o.mask is not None else o for o in c.objects],
        llm_topk=None,
        embeddings={},
        answer_clusters=[],
        ground_truth=None,
    )


class ConsensusSpool:
    """Each group's full consensus on disk (a temporary SQLite file) while the filter holds it slim in
    memory; read back one at a time to write the dataset rows and draw the report's examples. Removed by
    ``close``."""

    def __init__(self, near: Path | None) -> None:
        # beside a local dataset (the same disk); the system's temp folder for a dataset at a URL
        parent = near.parent if near is not None and near.parent.is_dir() else None
        self._dir = tempfile.TemporaryDirectory(prefix=".graphdistill-filter-", dir=parent)
        self._db = sqlite3.connect(Path(self._dir.name) / "spool.sqlite")
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE c (id TEXT PRIMARY KEY, data BLOB)")

    def put(self, c: Consensus) -> Consensus:
        """Store ``c``; returns it slim."""
        self._db.execute("INSERT OR REPLACE INTO c VALUES (?, ?)", (c.group_id, pickle.dumps(c)))
        return slim(c)

    def get(self, group_id: str) -> Consensus:
        row = self._db.execute("SELECT data FROM c WHERE id = ?", (group_id,)).fetchone()
        if row is None:
            raise KeyError(group_id)
        c: Consensus = pickle.loads(row[0])  # our own temporary file, written by this process
        return c

    def close(self) -> None:
        self._db.close()
        self._dir.cleanup()


def _split_item(group_id: str, c: Consensus, heldout: bool) -> Item:
    """The split unit of a group: its photos; a replay is tied to its parent's group as well."""
    parent = (replay_of(c.provenance) or {}).get("parent_group")
    return Item(group_id, tuple(c.provenance.photos), heldout, tied_to=(str(parent),) if parent else ())


def decide_group(
    traces: Sequence[Trace],
    config: FilterConfig,
    embedder: Embedder | None,
    *,
    names: OutputNames | None = None,
    load_blob: Callable[[str], bytes] | None = None,
) -> GroupDecision:
    """Vote, then every check, agreement threshold and user rule (dedup and splits come later)."""
    c = vote_group(
        traces,
        embedder=embedder,
        answer_threshold=config.answer_threshold,
        iou=config.iou,
        quorum=config.quorum,
        names=names,
        load_blob=load_blob,
    )
    failed = run_checks(c, traces, config.checks)
    for output, threshold in config.min_agreement.items():
        value = c.agreement.get(output)
        if value is None:
            raise FilterError(f"--min-agreement for {output!r}: outputs are {sorted(c.agreement)}")
        if value < threshold:
            failed.append((f"min_agreement_{output}", f"{output} agreement {value:.2f} < {threshold:.2f}"))
    scores: dict[str, float] = {}
    subject = next((t for t in traces if t.id == c.chosen_trace), None) or traces[0]
    for rule in config.rules:
        try:
            keep, score = rule.keeps(subject)
        except Exception as exc:  # a user rule that raises drops the group, with the error as reason
            failed.append((rule.name, f"rule raised {exc.__class__.__name__}: {exc}"))
            continue
        scores[rule.name] = score
        if not keep:
            failed.append((rule.name, f"rule {rule.name} scored {score:.3f} < {rule.threshold}"))
    return GroupDecision(
        c.group_id,
        c,
        failed,
        rule_scores=scores,
        heldout=is_heldout(c.provenance, config.heldout_photos),
        greedy=greedy_answer(c, traces, config.checks),
    )


def filter_store(
    store: StoreLike,
    out_dir: str | os.PathLike[str],
    config: FilterConfig | None = None,
    *,
    embedder: Embedder | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    report: bool = True,
    source_store: str | None = None,
) -> FilterResult:
    """Filter every group of ``store`` into a dataset folder at ``out_dir`` (and its report); ``out_dir`` is
    a local path or an fsspec URL (:class:`~graphdistill.dataset.DatasetWriter`)."""
    config = config or FilterConfig()
    # a bad URL or a missing filesystem package fails here, before the vote
    resolve(out_dir, "dataset", DatasetError)
    groups = store.groups()
    if not groups:
        raise FilterError(f"trace store {source_store or store}: holds no traces")
    tick = progress or (lambda stage, done, total: None)
    group_ids = sorted(groups)

    def read(gid: str) -> list[Trace]:
        return [store.get(tid) for tid in groups[gid]]

    # One group's traces in memory at a time, never the store's. What stays in memory per input is its
    # decision and its consensus slim (question, answer, agreement, provenance, boxes); the full consensus
    # waits in a spool on disk until the splits are known and its row is written, a Parquet row group at a
    # time (benchmarks/filter_memory.py). Which output is the answer / objects / sources is decided once for
    # the whole store: from the graph schema the traces recorded (one pass), else from every recorded value
    # (a first pass that only gathers; the second votes).
    facts = StoreFacts(config.heldout_photos)
    first: list[Trace] | None = read(group_ids[0])  # voted first in the one-pass case: read once
    gathered = recorded_schema(first or []) is None  # no schema: every value first, then vote
    if gathered:
        first = None  # one group at a time: the gathering pass reads it again
        for i, gid in enumerate(group_ids):
            for t in read(gid):
                facts.add(t)
            tick("read", i + 1, len(groups))
    spool = ConsensusSpool(None if is_url(out_dir) else Path(out_dir))
    try:
        names: OutputNames | None = None
        decisions: list[GroupDecision] = []
        for i, gid in enumerate(group_ids):
            traces = first if first is not None else read(gid)
            first = None
            if not gathered:  # one pass: each group's documents, labels (and kinds) as it is voted
                for t in traces:
                    facts.add(t)
            if names is None:
                names = OutputNames.from_kinds(facts.output_kinds())
            d = decide_group(traces, config, embedder, names=names, load_blob=store.blob)
            d.consensus = spool.put(d.consensus)  # the full consensus waits on disk; memory keeps it slim
            decisions.append(d)
            del traces
            tick("vote", i + 1, len(groups))

        # near-duplicates among the training survivors: the best-agreeing copy stays (held-out rows are the
        # fixed evaluation set; each is a different question about an untouched photo)
        survivors = [d for d in decisions if d.kept and not d.heldout]
        if config.dedup and survivors:
            order = sorted(survivors, key=lambda d: (-d.consensus.agreement["answer"], d.group_id))
            keys = []
            for j, d in enumerate(order):
                # a replay shares its parent's image and question but not its state: its edit is part of the key
                edit = replay_of(d.consensus.provenance)
                question = d.consensus.question + (f"\0replay {edit.get('edit')}" if edit else "")
                keys.append((d.group_id, dhash(load_image_of(d.consensus, store.blob)), question))
                tick("dedup", j + 1, len(order))
            dup = near_duplicates(keys, config.dedup_distance)
            for d in survivors:
                if d.group_id in dup:
                    d.failed.append(("near_duplicate", f"near-duplicate of group {dup[d.group_id]}"))

        kept = [d for d in decisions if d.kept]
        items = [_split_item(d.group_id, d.consensus, d.heldout) for d in kept]
        split_of = assign_splits(
            items, config.fractions, heldout_photos=config.heldout_photos, seed=config.seed
        )
        for d in kept:
            d.split = split_of[d.group_id]

        manifest = build_manifest(decisions, facts, config, source_store)
        writer = DatasetWriter(out_dir, manifest)
        for j, d in enumerate(kept):
            c = spool.get(d.group_id)
            writer.add(
                {
                    "id": c.group_id,
                    "question": c.question,
                    "answer": c.answer or "",
                    "objects": c.objects,
                    "sources": c.sources,
                    "agreement_answer": c.agreement["answer"],
                    "agreement_objects": c.agreement["objects"],
                    "agreement_sources": c.agreement["sources"],
                    "provenance_photos": c.provenance.photos,
                    "llm_topk": c.llm_topk,
                    "trace_ids": c.trace_ids,
                    "embeddings": c.embeddings or None,
                    "ground_truth": c.ground_truth,
                    "replay": replay_column(c.provenance),
                },
                load_image_of(c, store.blob),
                d.split or "train",
            )
            tick("write", j + 1, len(kept))
        result = FilterResult(writer.root, decisions, manifest)
        for split, why in result.empty_splits().items():
            log.warning("dataset %s: split %r is empty: %s", out_dir, split, why)
        writer.manifest["filter"] = {**writer.manifest.get("filter", {}), "summary": result.summary()}
        writer.close()
        if report:
            _report(result, store, writer.loc, consensus_of=lambda d: spool.get(d.group_id))
        log.info("filtered %d groups: %s", len(decisions), result.summary())
        return result
    finally:
        spool.close()


def _report(
    result: FilterResult, store: StoreLike, loc: Location, consensus_of: Callable[[GroupDecision], Consensus]
) -> None:
    """The filter report in DATASET/report/: drawn there on a local disk; at a URL drawn in a temp folder
    and copied up (after the manifest: the report is not part of what a reader needs)."""
    from graphdistill.filter.report import write_report

    if loc.local:
        write_report(result, store, Path(loc.path("report")), consensus_of=consensus_of)
        return
    with tempfile.TemporaryDirectory(prefix="graphdistill-report-") as tmp:
        write_report(result, store, Path(tmp), consensus_of=consensus_of)
        loc.upload(Path(tmp), "report")


# --------------------------------------------------------------------------------------------------------
# The manifest: graph schema, class names, documents
# --------------------------------------------------------------------------------------------------------


class StoreFacts:
    """What the manifest and the vote need from every trace of a store, gathered one trace at a time (so the
    filter never holds the store in memory): the recorded graph schema, else each output's kind inferred from
    its values (:func:`~graphdistill.filter.vote.output_kinds`, the same rules), the documents retrieved by
    inputs that are not held out (``heldout_photos``, or a held-out recipe: what the held-out photos
    retrieved must not shape what the student can rank), the detector's labels, and the first finished trace
    (an inferred schema's inputs and nodes)."""

    def __init__(self, heldout_photos: Sequence[str] = ()) -> None:
        self.heldout_photos = tuple(heldout_photos)
        self.schema: GraphSchema | None = None
        self.kinds: dict[str, Kind | None] = {}
        self.documents: dict[str, str] = {}
        self.labels: set[str] = set()
        self.first: Trace | None = None  # the first finished trace (else the first trace)

    def add(self, t: Trace) -> None:
        if self.schema is None:
            self.schema = recorded_schema([t])
        if self.first is None or (self.first.status != "ok" and t.status == "ok"):
            self.first = t
        if self.schema is None and t.status == "ok":  # a recorded schema declares the kinds: no inference
            for name, kind in output_kinds_of_trace(t).items():
                if self.kinds.get(name) is None:
                    self.kinds[name] = kind
        if not is_heldout(t.provenance, self.heldout_photos):
            for d in trace_documents(t):
                self.documents.setdefault(d.id, d.text)
        dets = written(t, "detections")
        if isinstance(dets, Detections):
            self.labels.update(dets.names)

    def output_kinds(self) -> dict[str, Kind]:
        if self.schema is not None:
            return self.schema.output_kinds()
        return {n: k or Kind.JSON for n, k in self.kinds.items()}

    def graph_schema(self) -> dict[str, Any] | None:
        """The recorded GraphSchema, else one inferred from the outputs' kinds and the first trace."""
        if self.schema is not None:
            return self.schema.model_dump(mode="json")
        t0 = self.first
        if t0 is None:
            return None
        inputs = [
            FieldSpec(
                name=k, kind=Kind.IMAGE if k == "image" else Kind.TEXT if k == "question" else Kind.JSON
            )
            for k in t0.inputs
        ]
        schema = GraphSchema(
            name=t0.graph.name,
            inputs=inputs,
            outputs=[FieldSpec(name=n, kind=k) for n, k in self.output_kinds().items()],
            nodes=list(dict.fromkeys(s.node for s in t0.spans)),
            definition_hash=t0.graph.hash,
        )
        return schema.model_dump(mode="json")


def class_names(decisions: Sequence[GroupDecision], labels: set[str]) -> list[str]:
    """COCO order when every label seen (kept objects, and ``labels``: every detector label of every
    trace) is a COCO class, else the sorted labels seen."""
    seen = set(labels)
    for d in decisions:
        seen.update(o.label for o in d.consensus.objects)
    coco = coco_classes()
    if coco and seen <= set(coco):
        return coco
    return sorted(seen)


def manifest_documents(graph: dict[str, Any] | None, retrieved: dict[str, str]) -> list[dict[str, str]]:
    """The documents the student ranks: the whole knowledge base when the graph's retriever offers it
    (:meth:`~graphdistill.teachers.retriever.ChromaRetriever.student_offer`), as the teacher ranks it; else
    (no offer, or the knowledge base cannot be read) ``retrieved``: the documents inputs that are not held out
    retrieved."""
    from graphdistill.teachers.base import pick_offer

    found = pick_offer(dict((graph or {}).get("offers") or {}), "text-retriever")
    if found is not None and found[1].get("knowledge_base"):
        from graphdistill.teachers.retriever import read_knowledge_base

        try:
            docs = read_knowledge_base(found[1])
        except Exception as exc:  # a knowledge base moved since recording: say so, keep what traces show
            log.warning(
                "node %s: its knowledge base cannot be read (%s); the dataset holds the %d documents the "
                "recorded inputs retrieved",
                found[0],
                exc,
                len(retrieved),
            )
        else:
            log.info(
                "node %s: the dataset holds its whole knowledge base (%d documents)", found[0], len(docs)
            )
            return [{"id": d.id, "text": d.text} for d in docs]
    return [{"id": i, "text": retrieved[i]} for i in sorted(retrieved)]


def build_manifest(
    decisions: Sequence[GroupDecision],
    facts: StoreFacts,
    config: FilterConfig,
    source_store: str | None,
) -> dict[str, Any]:
    graph = facts.graph_schema()
    return {
        "graph": graph,
        "class_names": class_names(decisions, facts.labels),
        "documents": manifest_documents(graph, facts.documents),
        "source_store": source_store,
        "filter": config.describe(),
    }
