"""Text-side teachers: LLM, sentence embedder, Chroma retriever, the shipped knowledge base, `graphdistill kb`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import _models  # as every other test imports it: one module, one cache of loaded models
from _netguard import subprocess_env
from graphdistill.cli import main as cli_main
from graphdistill.teachers.coco import COCO_CLASSES
from graphdistill.teachers.knowledge import (
    KnowledgeBaseError,
    default_documents,
    load_jsonl,
    parse_jsonl,
)
from graphdistill.trace import Document

# --------------------------------------------------------------------------------------------------------
# Fast: the class list, the shipped knowledge base, JSONL validation, light imports
# --------------------------------------------------------------------------------------------------------


def test_coco_classes_are_the_80_in_yolo_order() -> None:
    assert len(COCO_CLASSES) == 80
    assert len(set(COCO_CLASSES)) == 80
    assert COCO_CLASSES[0] == "person"
    assert COCO_CLASSES[15] == "cat"
    assert COCO_CLASSES[16] == "dog"
    assert COCO_CLASSES[62] == "tv"
    assert COCO_CLASSES[79] == "toothbrush"


def test_default_kb_has_at_least_three_facts_per_coco_class_with_stable_unique_ids() -> None:
    docs = default_documents()
    ids = [d.id for d in docs]
    assert len(ids) == len(set(ids))
    per_label: dict[str, list[Document]] = {}
    for d in docs:
        label = d.metadata["label"]
        per_label.setdefault(label, []).append(d)
        slug = label.replace(" ", "_")
        assert re.fullmatch(rf"coco/{re.escape(slug)}/\d+", d.id), d.id
        assert d.text.strip() and d.text.endswith("."), d.id
        assert len(d.text) < 200, f"{d.id} is more than one short sentence"
    assert sorted(per_label) == sorted(COCO_CLASSES)
    assert all(len(v) >= 3 for v in per_label.values())
    assert "coco/cat/1" in ids and "coco/traffic_light/1" in ids
    cat_text = " ".join(d.text.lower() for d in per_label["cat"])
    assert "cat" in cat_text


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ('{"id": "a", "text": "ok"}\n{"id": "b", "text": "broken"', 2, "not valid JSON"),
        ('{"id": "a", "text": "ok"}\n\n["a", "list"]', 3, "expected a JSON object"),
        ('{"id": "a", "text": "ok"}\n{"id": "b"}', 2, "'text' must be a non-empty string"),
        ('{"id": "", "text": "x"}', 1, "'id' must be a non-empty string"),
        ('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}', 2, "duplicate id 'a' (first seen on line 1)"),
        ('{"id": "a", "text": "x", "label": 3}', 1, "'label' must be a string"),
        ('{"id": "a", "text": "x", "txt": "y"}', 1, "unknown field"),
    ],
)
def test_bad_kb_jsonl_row_names_the_file_and_line(text: str, line: int, message: str) -> None:
    with pytest.raises(KnowledgeBaseError) as info:
        parse_jsonl(text, "facts.jsonl")
    assert f"facts.jsonl:{line}:" in str(info.value)
    assert message in str(info.value)


def test_kb_jsonl_rows_become_documents_with_label_metadata(tmp_path: Path) -> None:
    path = tmp_path / "kb.jsonl"
    path.write_text(
        '{"id": "x/1", "text": " Lamps give light. ", "label": "lamp"}\n\n{"id": "x/2", "text": "B."}\n'
    )
    docs = load_jsonl(path)
    assert [d.id for d in docs] == ["x/1", "x/2"]
    assert docs[0].text == "Lamps give light."
    assert docs[0].metadata == {"label": "lamp"}
    assert docs[1].metadata == {}
    with pytest.raises(KnowledgeBaseError, match="no such knowledge-base file"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_kb_build_refuses_a_bad_jsonl_before_opening_any_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a/1", "text": "fine"}\n{"id": "a/2", "txt": "typo"}\n')
    store = tmp_path / "chroma"
    rc = cli_main(["kb", "build", "--path", str(store), "--jsonl", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{bad}:2:" in err and "txt" in err
    assert not store.exists()


def test_cli_parser_and_kb_command_stay_light() -> None:
    code = (
        "import sys; from graphdistill.cli import build_parser; build_parser();"
        "import graphdistill.commands.kb, graphdistill.teachers.knowledge, graphdistill.teachers.base;"
        "heavy = [m for m in ('torch', 'chromadb', 'transformers', 'sentence_transformers') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=subprocess_env()
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_verify_converted_rejects_missing_tampered_or_foreign_manifests(tmp_path: Path) -> None:
    from graphdistill.teachers import llm

    folder = tmp_path / "conv"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text("{}")
    assert not llm.verify_converted(folder, "a" * 64)  # no manifest
    manifest = {
        "format": llm.MANIFEST_FORMAT,
        "source_sha256": "a" * 64,
        "files": llm._folder_files(folder),
    }
    (folder / llm.MANIFEST).write_text(json.dumps(manifest))
    assert llm.verify_converted(folder, "a" * 64)
    assert not llm.verify_converted(folder, "b" * 64)  # converted from other weights
    (folder / "model.safetensors").write_bytes(b"weightz")
    assert not llm.verify_converted(folder, "a" * 64)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "extra.bin").write_bytes(b"")
    assert not llm.verify_converted(folder, "a" * 64)


class _TinyTextEmbedder:
    """Enough of a text embedder to open a retriever; no vectors are computed in the tests using it."""

    model_id = "tiny-embedder"
    weights_sha256 = "0" * 64
    device = "cpu"

    def embed(self, texts: list[str]) -> np.ndarray:
        return np.zeros((len(texts), 4), np.float32)


@pytest.mark.parametrize(
    ("url", "host", "port", "ssl"),
    [
        ("https://h:9000", "h", 9000, True),
        ("https://chroma.example", "chroma.example", 443, True),
        ("http://10.0.0.5", "10.0.0.5", 8000, False),
        ("kb-server:8123", "kb-server", 8123, False),  # no scheme: plain http
    ],
)
def test_retriever_url_opens_a_chroma_http_client(
    url: str, host: str, port: int, ssl: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``url=`` goes to chromadb.HttpClient (host, port, ssl; telemetry off); no connection is made here."""
    import chromadb

    from graphdistill.teachers.retriever import EF_NAME, ChromaRetriever

    calls: list[dict[str, Any]] = []
    opened: list[dict[str, Any]] = []

    class Client:
        def __init__(self, **kwargs: Any) -> None:
            calls.append(kwargs)

        def get_or_create_collection(self, **kwargs: Any) -> str:
            opened.append(kwargs)
            return f"collection:{kwargs['name']}"

    def no_local(**kwargs: Any) -> Any:
        raise AssertionError("a url must not open a local PersistentClient")

    monkeypatch.setattr(chromadb, "HttpClient", Client)
    monkeypatch.setattr(chromadb, "PersistentClient", no_local)
    r = ChromaRetriever(url=url, collection="kb_remote", text_embedder=_TinyTextEmbedder())
    (call,) = calls
    assert (call["host"], call["port"], call["ssl"]) == (host, port, ssl)
    assert call["settings"].anonymized_telemetry is False
    assert r.location == url and r.collection == "collection:kb_remote"
    (coll,) = opened
    assert coll["embedding_function"].name() == EF_NAME  # ours, never chromadb's default
    assert coll["configuration"] == {"hnsw": {"space": "cosine"}}


def test_retriever_url_without_host_or_with_a_path_is_refused(tmp_path: Path) -> None:
    from graphdistill.teachers.retriever import ChromaRetriever, RetrieverError

    with pytest.raises(RetrieverError, match="has no host"):
        ChromaRetriever(url="http://", text_embedder=_TinyTextEmbedder())
    with pytest.raises(RetrieverError, match="not both"):
        ChromaRetriever(path=tmp_path, url="http://h:1", text_embedder=_TinyTextEmbedder())
    # the client would drop these silently and talk to http://h:8000/api/v2 instead of what was named
    for url, why in [
        ("http://h:8000/chroma", "without a path or query"),
        ("http://h:8000/?tenant=x", "without a path or query"),
        ("ftp://h:8000", "scheme must be http or https"),
        ("h:port", "port must be a number"),
        ("http://h:0", "port must be a number"),
        ("http://h:70000", "port must be a number"),
    ]:
        with pytest.raises(RetrieverError, match=why):
            ChromaRetriever(url=url, text_embedder=_TinyTextEmbedder())


# --------------------------------------------------------------------------------------------------------
# Slow: the real LLM (SmolLM2-135M-Instruct)
# --------------------------------------------------------------------------------------------------------

QUESTION = "What is a cat? Answer in one short sentence."


@pytest.mark.slow
def test_llm_answer_is_grounded_in_the_prompt() -> None:
    lm = _models.llm()
    out = lm.generate(
        "The secret code word is 'pineapple'. What is the secret code word? Answer with the word only.",
        max_new_tokens=16,
    )
    assert out.text.strip()
    assert "pineapple" in out.text.lower()
    assert lm.model_id.startswith("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert re.fullmatch(r"[0-9a-f]{64}", lm.weights_sha256)


@pytest.mark.slow
def test_llm_greedy_is_deterministic_and_logprobs_are_the_models_topk() -> None:
    lm = _models.llm()
    a = lm.generate(QUESTION, max_new_tokens=12)
    b = lm.generate(QUESTION, max_new_tokens=12)
    assert a.text and a.text == b.text
    assert a.logprobs.token_ids == b.logprobs.token_ids
    lp = a.logprobs
    n = len(lp.token_ids)
    assert 0 < n <= 12
    assert a.finish_reason == ("stop" if n < 12 else "length")
    assert lp.tokenizer == lm.model_id
    assert len(lp.topk_ids) == len(lp.topk_logprobs) == n
    for tok, ids, vals in zip(lp.token_ids, lp.topk_ids, lp.topk_logprobs, strict=True):
        assert len(ids) == len(vals) == lm.topk_logprobs == 5
        assert all(v <= 0 for v in vals)
        assert vals == sorted(vals, reverse=True)
        # greedy picks the most likely token (nothing here repeats, so no_repeat_ngram bans none)
        assert ids[0] == tok
    assert float(np.exp(lp.topk_logprobs[0]).sum()) <= 1.0 + 1e-5
    # the answer ends at EOS when it stops, and EOS is the last recorded token
    if a.finish_reason == "stop":
        assert lp.token_ids[-1] in lm._eos


@pytest.mark.slow
def test_llm_seeded_sampling_is_reproducible_and_seeds_differ() -> None:
    lm = _models.llm()
    prompt = "Write a short poem about a dog in the park."
    first = lm.generate(prompt, temperature=1.0, seed=1, max_new_tokens=10)
    again = lm.generate(prompt, temperature=1.0, seed=1, max_new_tokens=10)
    assert first.logprobs.token_ids == again.logprobs.token_ids
    others = [lm.generate(prompt, temperature=1.0, seed=s, max_new_tokens=10) for s in (2, 3)]
    assert any(o.logprobs.token_ids != first.logprobs.token_ids for o in others)


@pytest.mark.slow
def test_llm_batch_matches_single_answers_and_stops_at_length() -> None:
    lm = _models.llm()
    prompts: list[Any] = [
        "What is a dog?",
        [{"role": "user", "content": "Name a fruit that is yellow."}],
    ]
    batch = lm.generate_batch(prompts, max_new_tokens=8)
    singles = [lm.generate(p, max_new_tokens=8) for p in prompts]
    assert len(batch) == 2
    for got, want in zip(batch, singles, strict=True):
        assert got.logprobs.token_ids == want.logprobs.token_ids
        assert got.text == want.text
    short = lm.generate(QUESTION, max_new_tokens=2)
    assert short.finish_reason == "length"
    assert len(short.logprobs.token_ids) == 2


def test_stop_rule_cuts_at_a_stop_string_or_after_n_sentences() -> None:
    from graphdistill.teachers.llm import HFCausalLM, StopRule

    rule = StopRule(("\n",), 2)
    assert not StopRule() and rule
    assert rule.cut("A cat.") is None  # a full stop needs the white space after it to end a sentence
    assert rule.cut("A cat. It") is None  # one sentence so far
    assert rule.cut("A 3.5 kg cat. It sleeps. More") == len("A 3.5 kg cat. It sleeps.")
    assert rule.cut('She said "hi." Then? x') == len('She said "hi." Then?')
    assert rule.cut("one\ntwo") == 3
    assert rule.cut("\n\nA cat.\n") == len("\n\nA cat.")  # leading white space never ends an answer
    assert StopRule(("END",)).cut("a END b END") == 2
    with pytest.raises(ValueError, match="sequence of strings"):
        HFCausalLM._check_stop("\n")
    with pytest.raises(ValueError, match="non-empty"):
        HFCausalLM._check_stop(["\n", ""])
    with pytest.raises(ValueError, match="max_sentences"):
        HFCausalLM._check_sentences(0)


def test_no_repeat_ngram_bans_only_what_would_repeat_the_rows_own_words() -> None:
    import torch

    from graphdistill.teachers.llm import HFCausalLM, _NoRepeatNGram

    rule = _NoRepeatNGram(3, prompt_len=4)
    assert rule.banned([7, 8, 9, 7, 8]) == [9]  # "7 8" was followed by 9: 9 would repeat "7 8 9"
    assert rule.banned([7, 8, 9, 7, 8, 5, 7, 8]) == [9, 5]  # every earlier continuation of "7 8"
    assert rule.banned([7, 8, 9, 8]) == [] and rule.banned([7, 8]) == []
    # rows of a batch: the prompt (first 4 positions) holds "1 2 3" but does not count; each row its own
    ids = torch.tensor([[1, 2, 3, 0, 1, 2], [1, 2, 3, 0, 4, 5]])
    scores = torch.zeros(2, 10)
    out = rule(ids, scores.clone())
    assert torch.isfinite(out).all()  # no row has written an n-gram it could repeat
    ids = torch.tensor([[1, 2, 3, 0, 4, 5, 6, 4, 5], [1, 2, 3, 0, 4, 5, 6, 4, 6]])
    scores = torch.zeros(2, 10)
    out = rule(ids, scores)
    assert torch.isinf(out[0, 6]) and torch.isfinite(out[0]).sum() == 9  # row 0 may not write "4 5 6" again
    assert torch.isfinite(out[1]).all()
    assert torch.isfinite(scores).all()  # the scores it was given are untouched: they are the recorded logits
    with pytest.raises(ValueError, match="no_repeat_ngram"):
        HFCausalLM(no_repeat_ngram=1)


@pytest.mark.slow
def test_llm_without_repeats_ends_a_greedy_loop_the_token_limit_would_cut() -> None:
    """A prompt the reference graph sent (recorded 2026-12-06): greedy SmolLM2 wrote "lightweight, " until the
    96-token limit. With the rule (the default) the answer ends by itself, and no three tokens repeat."""
    from graphdistill.graphs.visual_rag import VisualRagConfig, build_prompt
    from graphdistill.teachers.llm import HFCausalLM
    from graphdistill.trace import Detections

    det = Detections(
        xyxy=[[3.7, 0.0, 364.8, 512.4]],
        class_ids=[0],
        names=["person"],
        scores=[0.715],
        image_size=[523, 523],
    )
    docs = [
        Document(
            id="coco/sports_ball/3",
            text="Sports balls are seen on playing fields, courts, playgrounds and in parks.",
        ),
        Document(
            id="coco/sports_ball/1",
            text="A sports ball is a ball used in games such as football, basketball, tennis or baseball.",
        ),
        Document(
            id="coco/baseball_glove/1",
            text="A baseball glove is a large padded leather glove used to catch the ball in baseball.",
        ),
    ]
    question = "Tell me something about the sports ball in this photo."
    prompt = build_prompt(question, det, docs, "fewshot", COCO_CLASSES, opening=True)
    options = VisualRagConfig().llm_options()

    def trigrams(ids: list[int]) -> list[tuple[int, ...]]:
        return [tuple(ids[i : i + 3]) for i in range(len(ids) - 2)]

    lm = _models.llm()
    assert lm.no_repeat_ngram == 3
    ends = lm.generate(prompt, **options)
    loose = HFCausalLM(no_repeat_ngram=None)  # the same weights, the model left to repeat itself
    loops = loose.generate(prompt, **options)
    assert loops.finish_reason == "length" and len(loops.logprobs.token_ids) == options["max_new_tokens"]
    assert len(set(trigrams(loops.logprobs.token_ids))) < len(trigrams(loops.logprobs.token_ids))
    assert ends.finish_reason == "stop" and ends.text.endswith(".")
    ids = ends.logprobs.token_ids
    assert len(set(trigrams(ids))) == len(trigrams(ids))
    # the same answer up to the step the rule first changed, and the record is the model's own top-k
    same = next(i for i, (a, b) in enumerate(zip(ids, loops.logprobs.token_ids, strict=False)) if a != b)
    assert same > 0 and ids[:same] == loops.logprobs.token_ids[:same]
    np.testing.assert_allclose(
        ends.logprobs.topk_logprobs[:same], loops.logprobs.topk_logprobs[:same], atol=1e-4
    )
    assert ends.logprobs.topk_ids[same][0] == loops.logprobs.token_ids[same]  # its top token, banned


@pytest.mark.slow
def test_llm_stops_at_a_newline_or_a_sentence_limit_and_keeps_logprobs_of_the_kept_tokens() -> None:
    lm = _models.llm()
    lists = "List three fruits, one per line."
    full = lm.generate(lists, max_new_tokens=24)
    assert "\n" in full.text  # without a stop the list goes on past its first line
    cut = lm.generate(lists, max_new_tokens=24, stop=["\n"])
    assert cut.finish_reason == "stop" and cut.text and "\n" not in cut.text
    assert full.text.startswith(cut.text)
    lp, n = cut.logprobs, len(cut.logprobs.token_ids)
    # the kept tokens end with the one that completed the stop; every per-token array has one row each
    assert len(lp.topk_ids) == len(lp.topk_logprobs) == len(lp.token_texts) == len(lp.topk_texts) == n
    assert lp.token_ids == full.logprobs.token_ids[:n]  # greedy: the same steps as the uncut answer
    np.testing.assert_allclose(lp.topk_logprobs, full.logprobs.topk_logprobs[:n], atol=1e-5)
    joined = "".join(lp.token_texts)
    assert joined.startswith(cut.text) and "\n" in joined[len(cut.text) :]
    # a sentence limit: the answer is its first sentence, ended by its full stop
    dog = "What is a dog? Answer in three sentences."
    long = lm.generate(dog, max_new_tokens=40)
    one = lm.generate(dog, max_new_tokens=40, max_sentences=1)
    assert one.finish_reason == "stop" and one.text.endswith(".") and one.text.count(". ") == 0
    assert long.text.startswith(one.text) and len(long.text) > len(one.text)
    assert one.logprobs.token_ids == long.logprobs.token_ids[: len(one.logprobs.token_ids)]
    # a stop rule the answer never meets leaves it to the token limit
    assert lm.generate(dog, max_new_tokens=3, stop=["@@"]).finish_reason == "length"


@pytest.mark.slow
def test_llm_batch_with_a_stop_rule_matches_single_answers() -> None:
    lm = _models.llm()
    prompts: list[Any] = [
        "List three fruits, one per line.",
        "What is a dog?",
        [{"role": "user", "content": "Name two colours, one per line."}],
    ]
    rule = {"stop": ["\n"], "max_sentences": 1, "max_new_tokens": 32}
    batch = lm.generate_batch(prompts, **rule)
    singles = [lm.generate(p, **rule) for p in prompts]
    for got, want in zip(batch, singles, strict=True):
        assert got.text == want.text and got.finish_reason == want.finish_reason == "stop"
        assert got.logprobs.token_ids == want.logprobs.token_ids
        np.testing.assert_allclose(got.logprobs.topk_logprobs, want.logprobs.topk_logprobs, atol=1e-3)


@pytest.mark.slow
def test_llm_records_piece_texts_that_join_to_its_answer_and_align_with_a_student_bpe() -> None:
    from graphdistill.student.loader import align_soft_targets
    from graphdistill.student.tokenizer import StudentTokenizer

    lm = _models.llm()
    out = lm.generate(QUESTION, max_new_tokens=12)
    lp = out.logprobs
    assert len(lp.token_texts) == len(lp.token_ids) > 0
    joined = "".join(lp.token_texts)
    assert joined == lm.tokenizer.decode(lp.token_ids, skip_special_tokens=True)
    assert joined.strip() == out.text
    assert [len(t) for t in lp.topk_texts] == [len(i) for i in lp.topk_ids] == [5] * len(lp.token_ids)
    for tok, text, ids, alts in zip(lp.token_ids, lp.token_texts, lp.topk_ids, lp.topk_texts, strict=True):
        assert alts[0] == text and ids[0] == tok  # greedy: the chosen piece is the top-1's text
        alone = lm.tokenizer.decode([tok], skip_special_tokens=True)
        if "\ufffd" not in alone:  # byte-level BPE: a whole-character piece is the same on its own
            assert text == alone
    assert lp.eos_ids == sorted(lm._eos)
    # a student BPE trained on the answer maps the teacher's pieces onto its own tokens somewhere
    student = StudentTokenizer.train([out.text] * 3, vocab_size=300)
    soft = align_soft_targets(lp, out.text, student, 32, 5)
    assert soft is not None and int(soft[2].sum()) >= 2


@pytest.mark.slow
def test_llm_conversion_cache_is_reused_and_a_corrupt_one_is_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from graphdistill import weights
    from graphdistill.teachers import llm

    lm = _models.llm()  # ensures the shared conversion exists
    gguf, sha = weights.resolve("smollm2-135m-instruct")
    shared = llm.converted_dir(sha, gguf.stem)
    assert llm.verify_converted(shared, sha)

    # a private cache holding a copy of the conversion
    monkeypatch.setenv("GRAPHDISTILL_HOME", str(tmp_path / "home"))
    private = llm.converted_dir(sha, gguf.stem)
    assert private != shared
    shutil.copytree(shared, private)

    real_convert = llm.convert_gguf
    calls: list[Path] = []

    def counting_convert(*args: Any, **kwargs: Any) -> Path:
        calls.append(args[2])
        return real_convert(*args, **kwargs)

    monkeypatch.setattr(llm, "convert_gguf", counting_convert)
    assert llm.fast_model_dir(gguf, sha, gguf.stem) == private
    assert calls == []  # a verified cache is used as it is

    model_file = private / "model.safetensors"
    good = weights.sha256_file(model_file)
    with open(model_file, "r+b") as f:  # flip bytes in the middle of the weights
        f.seek(model_file.stat().st_size // 2)
        f.write(b"\x00\xff" * 8)
    assert not llm.verify_converted(private, sha)
    assert llm.fast_model_dir(gguf, sha, gguf.stem) == private
    assert calls == [private]  # rebuilt, not used
    assert llm.verify_converted(private, sha)
    assert weights.sha256_file(model_file) == good
    assert not [p for p in private.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left

    # the rebuilt folder loads and answers exactly like the shared one
    rebuilt = llm.HFCausalLM(weights=gguf, max_new_tokens=8)  # a local path: no fetch into the temp home
    assert rebuilt.model_id == lm.model_id and rebuilt.weights_sha256 == sha
    assert rebuilt.generate(QUESTION).text == lm.generate(QUESTION, max_new_tokens=8).text


# --------------------------------------------------------------------------------------------------------
# Slow: MiniLM and the retriever
# --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_embeddings_are_normalised_and_related_texts_score_higher() -> None:
    emb = _models.text_embedder()
    v = emb.embed(["a cat sleeping on a sofa", "a kitten napping on a couch", "the stock market fell today"])
    assert v.shape == (3, emb.dim) and emb.dim == 384
    assert v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    related, unrelated = float(v[0] @ v[1]), float(v[0] @ v[2])
    assert related > unrelated + 0.3
    assert emb.embed([]).shape == (0, 384)


@pytest.mark.slow
def test_text_embedder_loads_a_local_model_folder(tmp_path: Path) -> None:
    """A user's own sentence-transformers folder (a copy of the registry one, outside the cache) loads."""
    from graphdistill import weights
    from graphdistill.teachers.text_embedder import SentenceEmbedder

    local = tmp_path / "my-minilm"
    shutil.copytree(weights.cached_path("all-minilm-l6-v2"), local)
    emb = SentenceEmbedder(weights=str(local))
    assert emb.weights == str(local) and emb.model_id == "my-minilm"
    assert emb.weights_sha256 == weights.REGISTRY["all-minilm-l6-v2"].sha256  # digest of the folder
    texts = ["a cat on a sofa", "a red bus"]
    np.testing.assert_allclose(emb.embed(texts), _models.text_embedder().embed(texts), atol=1e-5)


@pytest.mark.slow
def test_retrieval_of_cat_returns_cat_documents() -> None:
    r = _models.retriever()
    docs = r.query("cat")
    assert len(docs) == 3
    assert all(d.id.startswith("coco/cat/") for d in docs)
    assert all(d.distance is not None and 0 <= d.distance < 1 for d in docs)
    assert [d.distance for d in docs] == sorted(d.distance for d in docs)  # type: ignore[type-var]
    question = r.query("Will this cat scratch me if I try to pet it?", k=1)[0]
    assert question.id.startswith("coco/cat/")
    assert question.metadata == {"label": "cat"}
    batch = r.query_batch(["cat", "a red octagonal sign at a crossing"], k=2)
    assert [d.id for d in batch[0]] == [d.id for d in docs[:2]]
    assert batch[1][0].id.startswith("coco/stop_sign/")
    got = r.get(["coco/dog/1", "missing/id", "coco/cat/1"])
    assert [d.id for d in got] == ["coco/dog/1", "coco/cat/1"]
    assert got[1].text == next(d.text for d in default_documents() if d.id == "coco/cat/1")


@pytest.mark.slow
def test_retriever_uses_our_embedding_function_never_chromas_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chromadb.api.types import DefaultEmbeddingFunction

    from graphdistill.teachers.knowledge import ensure_default_kb
    from graphdistill.teachers.retriever import EF_NAME, ChromaRetriever

    def refuse(self: Any, input: Any) -> Any:
        raise AssertionError("chromadb's default embedding function was called")

    monkeypatch.setattr(DefaultEmbeddingFunction, "__call__", refuse)
    emb = _models.text_embedder()
    r = ChromaRetriever(path=tmp_path / "chroma", collection="kb_test", text_embedder=emb)
    assert r.collection._embedding_function is r.embedding_function
    assert r.collection._embedding_function.embedder is emb
    assert r.collection.configuration["embedding_function"].name() == EF_NAME
    assert r.collection.configuration["hnsw"]["space"] == "cosine"
    assert r.model_id == f"{emb.model_id} + chroma:kb_test"
    assert r.weights_sha256 == emb.weights_sha256

    docs = [
        Document(id="t/1", text="Cats purr when they are content.", metadata={"label": "cat"}),
        Document(id="t/2", text="Trains run on steel rails between stations."),
    ]
    assert r.ingest(docs) == 2
    assert r.ingest(docs) == 2  # upsert: idempotent
    assert r.doc_ids() == ["t/1", "t/2"]
    assert r.query("a purring kitten", k=1)[0].id == "t/1"

    # reopened from the same folder, the collection keeps our embedding function (rebuilt from config)
    import chromadb
    from chromadb.config import Settings

    client = chromadb.PersistentClient(
        path=str(tmp_path / "chroma"), settings=Settings(anonymized_telemetry=False)
    )
    reopened = client.get_collection("kb_test")
    assert reopened.configuration["embedding_function"].name() == EF_NAME
    assert reopened.configuration["embedding_function"].embedder is emb  # the live one, not a second load
    assert reopened.query(query_texts=["railway"], n_results=1)["ids"] == [["t/2"]]

    # the default KB is built once, then skipped
    assert ensure_default_kb(r) == len(default_documents())
    assert ensure_default_kb(r) == 0
    assert len(r.doc_ids()) == len(default_documents()) + 2


@pytest.mark.slow
def test_retriever_image_embedding_query_uses_the_clip_collection(tmp_path: Path) -> None:
    from graphdistill.teachers.clip import ClipEmbedder
    from graphdistill.teachers.retriever import ChromaRetriever, RetrieverError

    clip = ClipEmbedder(random_weights=True, device="cpu")
    r = ChromaRetriever(
        path=tmp_path / "chroma", text_embedder=_models.text_embedder(), image_embedder=clip, k=2
    )
    docs = [d for d in default_documents() if d.metadata["label"] in ("cat", "bus", "pizza")]
    r.ingest(docs)
    assert r.image_collection.count() == len(docs)
    # an embedding equal to one document's CLIP text embedding finds that document first
    target = docs[4]
    vec = np.asarray(clip.embed_texts([target.text]))[0]
    found = r.query(image_embedding=vec)
    assert len(found) == 2
    assert found[0].id == target.id
    assert found[0].distance is not None and found[0].distance < 1e-3
    with pytest.raises(RetrieverError, match="exactly one"):
        r.query(text="cat", image_embedding=vec)
    plain = ChromaRetriever(path=tmp_path / "chroma", text_embedder=_models.text_embedder())
    with pytest.raises(RetrieverError, match="image_embedder"):
        plain.query(image_embedding=vec)


@pytest.mark.slow
def test_kb_cli_builds_a_user_jsonl_keeps_it_on_a_bad_file_and_queries_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from graphdistill.teachers import text_embedder

    # reuse the real embedder the other tests load instead of a second copy; loaded before the patch, whose
    # lambda would otherwise call itself (through _models) when this test runs first or alone
    embedder = _models.text_embedder()
    monkeypatch.setattr(text_embedder, "SentenceEmbedder", lambda *a, **k: embedder)
    store = tmp_path / "chroma"
    good = tmp_path / "good.jsonl"
    good.write_text(
        '{"id": "home/lamp", "text": "The desk lamp uses an LED bulb.", "label": "lamp"}\n'
        '{"id": "home/kettle", "text": "Descale the kettle every month.", "label": "kettle"}\n'
    )
    assert cli_main(["kb", "build", "--path", str(store), "--jsonl", str(good), "--json"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["ingested"] == 2 and built["total_documents"] == 2

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "home/new", "text": "New fact."}\nnot json\n')
    assert cli_main(["kb", "build", "--path", str(store), "--jsonl", str(bad)]) == 2
    assert f"{bad}:2:" in capsys.readouterr().err

    assert (
        cli_main(["kb", "query", "how do I clean my kettle", "-k", "1", "--path", str(store), "--json"]) == 0
    )
    hits = json.loads(capsys.readouterr().out)
    assert [h["id"] for h in hits] == ["home/kettle"]  # the earlier build is intact, the bad row absent
    assert hits[0]["metadata"] == {"label": "kettle"}


# --------------------------------------------------------------------------------------------------------
# LLM micro-batching (teachers/batching.py)
# --------------------------------------------------------------------------------------------------------


class _EchoLLM:
    """A deterministic stand-in: answers ``prompt|settings``; fails any prompt containing 'boom'."""

    temperature = 0.0

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.batches: list[list[Any]] = []

    def _one(self, prompt: Any, temperature: Any, max_new_tokens: Any) -> str:
        if "boom" in str(prompt):
            raise ValueError(f"bad prompt {prompt}")
        return f"{prompt}|{temperature}|{max_new_tokens}"

    def generate(
        self,
        prompt: Any,
        temperature: Any = None,
        top_p: Any = None,
        seed: Any = None,
        max_new_tokens: Any = None,
    ) -> str:
        return self.generate_batch([prompt], temperature=temperature, max_new_tokens=max_new_tokens)[0]

    def generate_batch(
        self,
        prompts: list[Any],
        temperature: Any = None,
        top_p: Any = None,
        seed: Any = None,
        max_new_tokens: Any = None,
    ) -> list[str]:
        import time

        self.batches.append(list(prompts))
        time.sleep(self.delay)
        return [self._one(p, temperature, max_new_tokens) for p in prompts]


def _concurrently(fn: Any, args: list[Any]) -> list[Any]:
    """Run ``fn(arg)`` for every arg in its own thread, all released together; results or exceptions."""
    import threading

    results: list[Any] = [None] * len(args)
    gate = threading.Barrier(len(args))

    def work(i: int) -> None:
        gate.wait()
        try:
            results[i] = fn(args[i])
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a caller never got its answer"
    return results


def test_batcher_serves_concurrent_greedy_requests_in_one_call_each_its_own_answer() -> None:
    from graphdistill.teachers.batching import LLMBatcher

    fake = _EchoLLM()
    b = LLMBatcher(fake, window_s=2.0, max_batch=5)  # 5 arrivals fill the batch long before the window ends
    prompts = [f"q{i}" for i in range(5)]
    got = _concurrently(lambda p: b.generate(p, temperature=0.0, max_new_tokens=8), prompts)
    assert got == [f"q{i}|0.0|8" for i in range(5)]
    assert len(fake.batches) == 1 and sorted(fake.batches[0]) == prompts
    assert b.batch_sizes == [5]


def test_batcher_groups_by_settings_and_batches_sampled_requests_only_when_each_row_keeps_its_seed() -> None:
    from graphdistill.teachers.batching import LLMBatcher

    calls = [("a", 0.0, 8), ("b", 0.0, 8), ("c", 0.0, 4), ("d", 0.7, 8), ("e", 0.7, 8)]
    fake = _EchoLLM()  # its generate_batch takes no per-row seeds: one stream would serve a whole batch
    b = LLMBatcher(fake, window_s=0.3, max_batch=8)
    assert not b.row_seeds
    got = _concurrently(lambda c: b.generate(c[0], temperature=c[1], max_new_tokens=c[2], seed=1), calls)
    assert got == [f"{p}|{t}|{n}" for p, t, n in calls]
    groups = sorted(sorted(batch) for batch in fake.batches)
    assert groups == [["a", "b"], ["c"], ["d"], ["e"]]  # same greedy settings batch; sampled ones alone

    class Seeded(_EchoLLM):
        seed = 7  # the adapter's own seed, for a request that names none

        def generate_batch(
            self, prompts: list[Any], temperature: Any = None, seeds: Any = None, **_: Any
        ) -> list[str]:
            self.batches.append(list(prompts))
            assert (seeds is None) == (not temperature)  # only sampled batches are handed seeds
            return [
                f"{p}|{temperature}|{s}" for p, s in zip(prompts, seeds or [None] * len(prompts), strict=True)
            ]

    seeded = Seeded()
    b = LLMBatcher(seeded, window_s=0.3, max_batch=8)
    assert b.row_seeds
    reqs = [("a", 0.0, None), ("d", 0.7, 3), ("e", 0.7, 4), ("f", 0.7, None), ("g", 0.9, 5)]
    got = _concurrently(lambda r: b.generate(r[0], temperature=r[1], seed=r[2]), reqs)
    assert got == ["a|0.0|None", "d|0.7|3", "e|0.7|4", "f|0.7|7", "g|0.9|5"]  # every row its own seed
    assert sorted(sorted(batch) for batch in seeded.batches) == [["a"], ["d", "e", "f"], ["g"]]


def test_batcher_serves_a_lone_request_after_the_window() -> None:
    import time

    from graphdistill.teachers.batching import LLMBatcher

    fake = _EchoLLM()
    b = LLMBatcher(fake, window_s=0.2, max_batch=8)
    t0 = time.perf_counter()
    assert b.generate("alone", temperature=0.0) == "alone|0.0|None"
    waited = time.perf_counter() - t0
    assert 0.2 <= waited < 5.0
    assert fake.batches == [["alone"]]


def test_batcher_overflow_forms_a_next_batch_and_errors_reach_the_right_caller() -> None:
    from graphdistill.teachers.batching import LLMBatcher

    fake = _EchoLLM(delay=0.05)
    b = LLMBatcher(fake, window_s=0.3, max_batch=3)
    prompts = ["p0", "p1", "boom2", "p3", "p4", "p5", "p6"]
    got = _concurrently(lambda p: b.generate(p, temperature=0.0), prompts)
    for p, g in zip(prompts, got, strict=True):
        if p == "boom2":
            assert isinstance(g, ValueError) and "boom2" in str(g)
        else:
            assert g == f"{p}|0.0|None"
    # every request served, no batch over max_batch; the failing batch was retried one by one
    assert max(len(x) for x in fake.batches) <= 3
    assert sum(b.batch_sizes) == len(prompts)
    with pytest.raises(ValueError, match="boom"):
        b.generate("boom alone", temperature=0.0)


def test_batcher_passes_a_stop_rule_through_and_batches_only_equal_rules() -> None:
    from graphdistill.teachers.batching import LLMBatcher

    calls: list[tuple[list[Any], dict[str, Any]]] = []

    class Recorder:
        temperature = 0.0

        def generate_batch(self, prompts: list[Any], **kw: Any) -> list[str]:
            calls.append((list(prompts), kw))
            return [f"{p}|{kw.get('stop')}|{kw.get('max_sentences')}" for p in prompts]

        def generate(self, prompt: Any, **kw: Any) -> str:
            return self.generate_batch([prompt], **kw)[0]

    b = LLMBatcher(Recorder(), window_s=0.3, max_batch=8)
    reqs = [("a", ["\n"], 2), ("b", ["\n"], 2), ("c", ["."], 2), ("d", None, None)]
    got = _concurrently(lambda r: b.generate(r[0], temperature=0.0, stop=r[1], max_sentences=r[2]), reqs)
    assert got == ["a|('\\n',)|2", "b|('\\n',)|2", "c|('.',)|2", "d|None|None"]
    assert sorted(sorted(p) for p, _ in calls) == [["a", "b"], ["c"], ["d"]]
    # an adapter without a stop rule is never handed one it was not asked for
    assert all(("stop" in kw) == (p != ["d"]) and ("max_sentences" in kw) == (p != ["d"]) for p, kw in calls)
    calls.clear()
    assert b.generate("s", temperature=0.7, seed=1, stop=["\n"]) == "s|('\\n',)|None"  # sampled: alone
    assert calls[0][1]["stop"] == ("\n",) and "max_sentences" not in calls[0][1]


def test_row_sampler_draws_from_the_tempered_nucleus_as_transformers_defines_it() -> None:
    import torch
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    from graphdistill.teachers.llm import _RowSampler

    scores = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0]] * 2)
    temperature, top_p = 0.7, 0.8
    # the distribution transformers' own warpers sample from: temperature, then the nucleus
    warped = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, scores[:1].clone()))
    expected = warped.softmax(-1)[0]
    assert int((expected == 0).sum()) >= 1  # the nucleus leaves some tokens out
    sampler = _RowSampler(torch, [3, 4], temperature, top_p, "cpu")
    draws = []
    for _ in range(3000):
        out = sampler(None, scores)
        assert bool((torch.isfinite(out).sum(-1) == 1).all())  # greedy selection can only take the draw
        draws.append(out.argmax(-1))
    picked = torch.stack(draws)  # [draws, rows]
    for row in range(2):
        freq = torch.bincount(picked[:, row], minlength=5).float() / len(draws)
        assert torch.allclose(freq, expected, atol=0.03), (row, freq, expected)
        assert bool((freq[expected == 0] == 0).all())  # never a token outside the nucleus
    assert not torch.equal(picked[:, 0], picked[:, 1])  # each row draws from its own generator
    again = _RowSampler(torch, [3], temperature, top_p, "cpu")
    assert [int(again(None, scores[:1]).argmax()) for _ in range(50)] == picked[:50, 0].tolist()


@pytest.mark.slow
def test_llm_sampled_rows_of_a_batch_are_their_single_calls_and_the_prefix_cache_changes_no_token() -> None:
    from graphdistill.teachers.llm import HFCausalLM

    lm = _models.llm()
    shared = [  # a system prompt and a worked turn every prompt shares: the part the prefix cache holds
        {"role": "system", "content": "You answer in one short sentence about the objects you are given."},
        {"role": "user", "content": "Objects: 1 dog, 1 ball. Question: What is in the photo?"},
        {"role": "assistant", "content": "A dog with a ball."},
    ]
    prompts: list[Any] = [
        [*shared, {"role": "user", "content": f"Objects: 1 {o}. Question: What is in the photo?"}]
        for o in ("cat", "bicycle", "pizza")
    ]
    kw: dict[str, Any] = {"temperature": 0.9, "top_p": 0.95, "max_new_tokens": 10}
    hits = lm.prefix_hits
    batch = lm.generate_batch(prompts, seeds=[11, 12, 13], **kw)
    assert lm.prefix_hits == hits + 3  # the rows shared the cached chat prefix
    singles = [lm.generate(p, seed=s, **kw) for p, s in zip(prompts, (11, 12, 13), strict=True)]
    for got, want in zip(batch, singles, strict=True):
        assert got.logprobs.token_ids == want.logprobs.token_ids and got.text == want.text
    # one prompt, three seeds in one batch: the rows draw apart (each from its own generator)
    same = lm.generate_batch([prompts[0]] * 3, seeds=[1, 2, 3], **kw)
    assert len({tuple(o.logprobs.token_ids) for o in same}) > 1
    assert same[0].logprobs.token_ids == lm.generate(prompts[0], seed=1, **kw).logprobs.token_ids
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        lm.generate_batch(prompts, seeds=[1, 2], **kw)
    # the same model without the prefix cache (greedy and sampled): the same tokens, log-probs within noise
    plain = HFCausalLM(prefix_cache=False)
    for settings in ({"max_new_tokens": 10}, {**kw, "seed": 5}):
        a, b = lm.generate_batch(prompts, **settings), plain.generate_batch(prompts, **settings)
        assert [o.logprobs.token_ids for o in a] == [o.logprobs.token_ids for o in b]
        for x, y in zip(a, b, strict=True):
            np.testing.assert_allclose(x.logprobs.topk_logprobs, y.logprobs.topk_logprobs, atol=1e-3)
    assert plain.prefix_hits == 0


@pytest.mark.slow
def test_llm_continues_an_opening_and_the_prefix_cache_still_holds_the_shared_chat() -> None:
    """A chat ending with an assistant message is continued: the model sees that message open (no end of
    turn after it), writes only what follows, and the rows still share the chat before their last question."""
    lm = _models.llm()
    shared = [
        {"role": "system", "content": "You answer in two short sentences about the objects you are given."},
        {"role": "user", "content": "Objects: 1 dog. Question: What is in the photo?"},
        {"role": "assistant", "content": "The photo shows a dog. A dog is a loyal pet."},
    ]
    opening = {"role": "assistant", "content": "The photo shows a cat."}
    prompts: list[Any] = [
        [*shared, {"role": "user", "content": f"Objects: 1 cat. Question: {q}"}, opening]
        for q in ("What is in the photo?", "Is it friendly?")
    ]
    text = lm.render(prompts[0])
    assert text.endswith("The photo shows a cat.")  # open: the model goes on from here
    assert text.startswith(lm.render(prompts[0][:-1]))  # ... inside the assistant turn the question opened
    hits = lm.prefix_hits
    outs = lm.generate_batch(prompts, max_new_tokens=16, max_sentences=1)
    assert lm.prefix_hits == hits + 2
    for out in outs:
        assert out.text and not out.text.startswith("The photo shows a cat")  # only what the model added
        assert "".join(out.logprobs.token_texts).strip().startswith(out.text)


@pytest.mark.slow
def test_batcher_on_the_real_llm_matches_single_calls() -> None:
    from graphdistill.teachers.batching import LLMBatcher

    lm = _models.llm()
    prompts = ["What is a dog?", "Name a fruit that is yellow.", "What colour is the sky?"]
    singles = [lm.generate(p, max_new_tokens=8) for p in prompts]

    class Spy:
        temperature = lm.temperature
        calls = 0

        def generate_batch(self, *a: Any, **kw: Any) -> Any:
            Spy.calls += 1
            return lm.generate_batch(*a, **kw)

    b = LLMBatcher(Spy(), window_s=5.0, max_batch=3)
    got = _concurrently(lambda p: b.generate(p, temperature=0.0, max_new_tokens=8), prompts)
    assert Spy.calls == 1
    for g, want in zip(got, singles, strict=True):
        assert g.logprobs.token_ids == want.logprobs.token_ids and g.text == want.text
        np.testing.assert_allclose(g.logprobs.topk_logprobs, want.logprobs.topk_logprobs, atol=1e-3)


def test_batcher_waits_for_announced_requests_and_serves_unannounced_at_once() -> None:
    import threading
    import time

    from graphdistill.teachers.batching import LLMBatcher

    fake = _EchoLLM()
    b = LLMBatcher(fake, window_s=0.0, max_wait_s=10.0, max_batch=8)
    t0 = time.perf_counter()
    assert b.generate("solo", temperature=0.0) == "solo|0.0|None"  # nothing announced: no wait
    assert time.perf_counter() - t0 < 1.0
    b.expect()
    b.expect()
    b.expect()
    b.cancel()  # one announced execution failed before its LLM call
    results: dict[str, Any] = {}
    first = threading.Thread(target=lambda: results.update(a=b.generate("a", temperature=0.0)))
    first.start()
    time.sleep(0.5)  # "a" waits for the announced "b" even though it came much later than any window
    assert "a" not in results
    results["b"] = b.generate("b", temperature=0.0)
    first.join(timeout=10)
    assert results == {"a": "a|0.0|None", "b": "b|0.0|None"}
    assert sorted(fake.batches[-1]) == ["a", "b"] and len(fake.batches) == 2
