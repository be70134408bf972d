"""The reference teacher's answers, old prompt against new: grounding, agreement across samples, keep rate.

Records the demo's inputs (``graphdistill inputs make --builtin --n 48 --seed 0 --heldout-questions 6``: 48
training inputs + 12 held-out rows) with K=3 samples and flip/scale TTA, as ``make demo`` does, once with
``VisualRagConfig(prompt_style="plain", max_new_tokens=48, stop=(), max_sentences=None)`` (the reference
graph until 2026-12-03), once with the few-shot prompt and the LLM writing the whole answer
(``scene_opening=False``, the default until 2026-12-06), once with the answer's first sentence written by the
graph and continued by the LLM (stop at a newline or after two sentences, 96 new tokens at most; the default
until ``e90f5d0``) and once with the default config (the same, and the LLM never repeats 3 tokens of its own,
``no_repeat_ngram=3``); filters each store as ``graphdistill filter`` does and reports, per prompt:
the share of greedy answers naming only detected classes, the mean answer agreement across the K samples,
the filter's keep rate and why it dropped what it dropped (all three from the filter summary's ``teacher``
measures), the share of answers cut by the token limit, the mean answer length in words and the LLM's
seconds per answer (its ``generate_batch`` time over the answers it wrote; the other nodes are not counted).

The detector and segmenter are deterministic, so the second recording reuses the first one's detections and
masks of the same image (kept in memory); retrieval and the LLM run again.

    python benchmarks/teacher_answers.py --out benchmarks/results/teacher_answers.json       # ~15-30 min
    python benchmarks/teacher_answers.py --n 8 --heldout-questions 1 --out /tmp/ta.json     # a subset
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
STYLES: dict[str, dict[str, Any]] = {
    # the reference graph's reason node until 2026-12-03
    "plain": {
        "prompt_style": "plain",
        "max_new_tokens": 48,
        "stop": (),
        "max_sentences": None,
        "no_repeat_ngram": None,
    },
    # the few-shot prompt with the LLM writing the whole answer (2026-12-03 to 2026-12-06)
    "fewshot": {"scene_opening": False, "no_repeat_ngram": None},
    # the graph writes the first sentence (scene_sentence), the LLM the rest (2026-12-06, until e90f5d0)
    "opening": {"no_repeat_ngram": None},
    "norepeat": {},  # today's defaults: the same, and the LLM never repeats 3 tokens of its own
}
_SHARED: dict[str, Any] = {}


class _Memo:
    """A deterministic adapter whose answers are kept per input (image bytes, and boxes for a segmenter)."""

    def __init__(self, inner: Any, method: str) -> None:
        self._inner = inner
        self._method = method
        self._cache: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.hits = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _call(self, image: Any, *args: Any) -> Any:
        arr = np.ascontiguousarray(image)
        h = hashlib.sha256(arr.tobytes())
        h.update(repr((arr.shape, [np.asarray(a).tolist() for a in args])).encode())
        key = h.hexdigest()
        with self._lock:
            if key in self._cache:
                self.hits += 1
                return self._cache[key]
        out = getattr(self._inner, self._method)(image, *args)
        with self._lock:
            self._cache[key] = out
        return out

    def detect(self, image: Any) -> Any:
        return self._call(image)

    def segment(self, image: Any, boxes: Any) -> Any:
        return self._call(image, boxes)


class _TimedLLM:
    """The LLM adapter, timing every model call and counting the answers it wrote."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.seconds = 0.0
        self.answers = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def generate_batch(self, prompts: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        out = self._inner.generate_batch(prompts, **kw)
        self.seconds += time.perf_counter() - t0
        self.answers += len(out)
        return out

    def generate(self, prompt: Any, **kw: Any) -> Any:
        return self.generate_batch([prompt], **kw)[0]


def _graph(style: str) -> Any:
    from graphdistill.graphs.visual_rag import VisualRagConfig, load_teachers, visual_rag

    config = VisualRagConfig(device="cpu", **STYLES[style])
    if "teachers" not in _SHARED:
        t = load_teachers(config)
        t.detector = _Memo(t.detector, "detect")
        t.segmenter = _Memo(t.segmenter, "segment")
        _SHARED["teachers"] = t
    t = _SHARED["teachers"]
    inner = getattr(t.llm, "_inner", t.llm)
    inner.no_repeat_ngram = config.no_repeat_ngram  # one LLM loaded for every style: each style's repeat rule
    t.llm = _SHARED["llm"] = _TimedLLM(inner)  # a fresh clock per style
    return visual_rag(config, teachers=t)


def plain_graph() -> Any:
    return _graph("plain")


def fewshot_graph() -> Any:
    return _graph("fewshot")


def opening_graph() -> Any:
    return _graph("opening")


def norepeat_graph() -> Any:
    return _graph("norepeat")


def _cli(*argv: str) -> None:
    from graphdistill.cli import main as cli_main

    rc = cli_main(list(argv))
    if rc != 0:
        raise SystemExit(f"`graphdistill {' '.join(argv)}` failed with exit code {rc}")


def measure(store_dir: Path, dataset_dir: Path) -> dict[str, Any]:
    """Filter the store as `graphdistill filter` does; the filter summary plus what only the store tells."""
    from graphdistill.filter.filtering import FilterConfig, filter_store
    from graphdistill.filter.vote import default_embedder, written
    from graphdistill.store.trace_store import TraceStore

    store = TraceStore(store_dir)
    try:
        result = filter_store(store, dataset_dir, FilterConfig(), embedder=default_embedder(), report=False)
        traces = [store.get(tid) for ids in store.groups().values() for tid in ids]
    finally:
        store.close()
    ok = [t for t in traces if t.status == "ok" and isinstance(t.output.get("answer"), str)]
    finish = Counter(str(written(t, "finish_reason")) for t in ok)
    summary = result.summary()
    greedy = []
    for d in sorted(result.decisions, key=lambda d: d.group_id):
        t0 = next((t for t in ok if t.group_id == d.group_id and t.sample_index == 0), None)
        recipe = d.consensus.provenance.recipe or {}
        greedy.append(
            {
                "group": d.group_id[:12],
                "heldout": bool(recipe.get("heldout")),
                "photos": d.consensus.provenance.photos,
                "question": d.consensus.question,
                "detected": sorted({o.label for o in d.consensus.objects}),
                "greedy_answer": t0.output["answer"] if t0 is not None else None,
                "greedy_grounded": d.greedy.grounded if d.greedy else None,
                "kept": d.kept,
                "dropped_by": d.rule,
            }
        )

    def share(rows: list[dict[str, Any]]) -> float | None:
        vals = [r["greedy_grounded"] for r in rows if r["greedy_grounded"] is not None]
        return round(sum(vals) / len(vals), 4) if vals else None

    return {
        "teacher": summary["teacher"],
        "greedy_grounded_training_inputs": share([g for g in greedy if not g["heldout"]]),
        "greedy_grounded_heldout_inputs": share([g for g in greedy if g["heldout"]]),
        "kept": summary["kept"],
        "groups": summary["groups"],
        "dropped_by_first_rule": summary["by_rule"],
        "flagged_by_rule": summary["flagged_by_rule"],
        "answers": len(ok),
        "all_samples_cut_by_length": round(finish.get("length", 0) / max(len(ok), 1), 4),
        "all_samples_words": round(float(np.mean([len(t.output["answer"].split()) for t in ok])), 2),
        "finish_reasons": dict(finish),
        "greedy_answers": greedy,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "results" / "teacher_answers.json"))
    ap.add_argument("--inputs", help="an inputs JSONL to use instead of making the demo's")
    ap.add_argument("--n", type=int, default=48, help="training inputs (the demo's: 48)")
    ap.add_argument("--heldout-questions", type=int, default=6, help="questions per held-out photo (demo: 6)")
    ap.add_argument("--samples", type=int, default=3, help="samples per input (demo: 3)")
    args = ap.parse_args()

    from graphdistill._env import apply_offline_env

    apply_offline_env()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gd-teacher-answers-") as tmp:
        work = Path(tmp)
        inputs = Path(args.inputs) if args.inputs else work / "inputs.jsonl"
        if not args.inputs:
            _cli("inputs", "make", "--builtin", "--n", str(args.n), "--seed", "0",
                 "--heldout-questions", str(args.heldout_questions), "--out", str(inputs))  # fmt: skip
        for style in STYLES:
            t0 = time.perf_counter()
            _cli("record", "--graph", f"__main__:{style}_graph", "--inputs", str(inputs),
                 "--store", str(work / f"store-{style}"), "--samples", str(args.samples),
                 "--tta", "flip,scale", "--batch-size", "6", "--json")  # fmt: skip
            record_s = time.perf_counter() - t0
            llm = _SHARED["llm"]
            m = measure(work / f"store-{style}", work / f"ds-{style}")
            m["config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in STYLES[style].items()}
            m["record_seconds"] = round(record_s, 1)
            m["llm_seconds_per_answer"] = round(llm.seconds / max(llm.answers, 1), 3)
            m["llm_answers_timed"] = llm.answers
            results[style] = m
            t = m["teacher"]
            print(
                f"{style:8s} greedy grounded {t['greedy_grounded']:.2f}  agreement {t['answer_agreement']:.2f}  "
                f"keep {t['keep_rate']:.2f}  cut {m['all_samples_cut_by_length']:.2f}  "
                f"words {m['all_samples_words']:.1f}  {m['llm_seconds_per_answer']:.2f} s/answer",
                flush=True,
            )
    out = {
        "benchmark": "teacher_answers",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}",
        "inputs": args.inputs
        or f"inputs make --builtin --n {args.n} --seed 0 --heldout-questions {args.heldout_questions}",
        "samples": args.samples,
        "note": "other jobs shared the CPU: seconds are approximate; the shares are what matter",
        "styles": results,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
