"""The reasoning LLM teacher: a transformers causal LM (default SmolLM2-135M-Instruct from a GGUF file).

Loading a GGUF file dequantises every tensor (~16-30 s on a laptop CPU). The first load therefore converts
the model once into a plain safetensors folder under ``$GRAPHDISTILL_HOME/converted/``; later loads read that
folder in a fraction of a second. The folder is written atomically (temp dir + rename) next to a checksum
manifest that is verified on every load: a folder that fails the check is rebuilt, never used.

Generation returns the text, the teacher's top-k log-probabilities at every generated step (the signal a
student distils from; with the text of each token and alternative, so a student with its own tokenizer can
align them by characters) and why it stopped: "stop" at an EOS token, a stop string (``stop``, e.g. a
newline) or the sentence limit (``max_sentences``), "length" at ``max_new_tokens``. Greedy decoding is deterministic; sampling is reproducible for a
given ``seed``, row by row: each row of a batch draws from its own generator (``seeds``), so a sampled answer
does not depend on its batch-mates and a batch of sampled prompts gives what each would alone (what lets the
:class:`~graphdistill.teachers.batching.LLMBatcher` batch sampled calls too). The global torch RNG is untouched.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graphdistill import weights as weights_mod
from graphdistill._env import home
from graphdistill._lazy import require
from graphdistill.errors import GraphdistillError
from graphdistill.teachers.base import LLMOutput, Messages, Prompt, pick_device
from graphdistill.trace import TokenLogprobs

log = logging.getLogger(__name__)

MANIFEST = "graphdistill-converted.json"
MANIFEST_FORMAT = "graphdistill-converted/1"
PIECE_CONTEXT = 8  # tokens of context each piece is decoded in (see HFCausalLM.piece_texts)
MIN_PREFIX = 16  # a shared chat prefix shorter than this is not worth a cached KV (HFCausalLM._encode)


class ConversionError(GraphdistillError, RuntimeError):
    """A GGUF file could not be converted into a fast-loading folder."""


# --------------------------------------------------------------------------------------------------------
# The converted-model cache
# --------------------------------------------------------------------------------------------------------


def converted_dir(source_sha256: str, name: str) -> Path:
    """Where the safetensors conversion of a GGUF with this sha256 lives."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return home() / "converted" / f"{safe}-{source_sha256[:16]}"


def _folder_files(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): weights_mod.sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def verify_converted(folder: Path, source_sha256: str) -> bool:
    """True when ``folder`` holds a complete conversion of ``source_sha256`` whose files match its manifest."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        meta = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    if meta.get("format") != MANIFEST_FORMAT or meta.get("source_sha256") != source_sha256:
        return False
    expected = meta.get("files")
    if not isinstance(expected, dict) or not expected:
        return False
    try:
        return _folder_files(folder) == expected
    except OSError:
        return False


def convert_gguf(gguf_file: Path, source_sha256: str, target: Path) -> Path:
    """Dequantise ``gguf_file`` once and save it as a safetensors folder at ``target`` (atomically)."""
    transformers: Any = require("transformers", purpose="loading the LLM teacher")
    require("gguf", purpose="reading GGUF weights")
    t0 = time.perf_counter()
    log.info("converting %s to safetensors (one time; dequantising takes a while)", gguf_file.name)
    kwargs = {"gguf_file": gguf_file.name}
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf_file.parent), **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), **kwargs)
    # transformers refuses save_pretrained on a GGUF-loaded model while it still looks quantised; the
    # weights are already plain dequantised tensors at this point.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        manifest = {
            "format": MANIFEST_FORMAT,
            "source": gguf_file.name,
            "source_sha256": source_sha256,
            "files": _folder_files(tmp),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if target.exists():  # a stale or corrupt conversion: move it aside, then swap in the new one
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
            target.rename(trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, target)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConversionError(f"could not convert {gguf_file} to {target}: {exc}") from exc
    log.info("converted %s in %.1f s -> %s", gguf_file.name, time.perf_counter() - t0, target)
    return target


def fast_model_dir(gguf_file: Path, source_sha256: str, name: str) -> Path:
    """The verified converted folder for ``gguf_file``, building (or rebuilding) it when needed."""
    target = converted_dir(source_sha256, name)
    if verify_converted(target, source_sha256):
        return target
    if target.exists():
        log.warning("converted model at %s fails its checksum manifest; rebuilding it", target)
    return convert_gguf(gguf_file, source_sha256, target)


# --------------------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------------------


class HFCausalLM:
    """A transformers causal LM teacher: chat-templated generation with per-token top-k log-probabilities.

    ``weights`` is a registry name (default: the SmolLM2-135M-Instruct GGUF), a local ``.gguf`` file or a
    local Hugging Face model folder. ``prefix_cache``: keep the KV cache of the chat prefix that consecutive
    prompts share (the system prompt and the few-shot turns) instead of recomputing it for every prompt; the
    answers are the same (see :meth:`_encode`). ``no_repeat_ngram`` (default 3): no row repeats that many
    tokens in a row of what it has generated (the prompt does not count; :class:`_NoRepeatNGram`), so a greedy
    loop ends instead of filling ``max_new_tokens``; None lets the model repeat itself. The recorded
    log-probabilities stay the model's own: a step whose top token was banned records it all the same.
    """

    def __init__(
        self,
        weights: str | os.PathLike[str] = "smollm2-135m-instruct",
        device: str | None = "cpu",
        seed: int = 0,
        max_new_tokens: int = 48,
        temperature: float = 0.0,
        top_p: float = 1.0,
        topk_logprobs: int = 5,
        system_prompt: str | None = None,
        stop: Sequence[str] = (),
        max_sentences: int | None = None,
        prefix_cache: bool = True,
        no_repeat_ngram: int | None = 3,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if topk_logprobs < 1:
            raise ValueError(f"topk_logprobs must be >= 1, got {topk_logprobs}")
        self._check_sampling(temperature, top_p)
        self.stop = self._check_stop(stop)
        self.max_sentences = self._check_sentences(max_sentences)
        if no_repeat_ngram is not None and no_repeat_ngram < 2:
            raise ValueError(f"no_repeat_ngram must be >= 2 or None, got {no_repeat_ngram}")
        self.no_repeat_ngram = no_repeat_ngram
        transformers: Any = require("transformers", purpose="the LLM teacher")
        self._transformers: Any = transformers
        self._torch: Any = require("torch", purpose="the LLM teacher")
        self.device = pick_device(device)
        self.seed = seed
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.topk_logprobs = topk_logprobs
        self.system_prompt = system_prompt

        name = os.fspath(weights)
        source, self.weights_sha256 = weights_mod.resolve(name)
        if source.is_file():
            if source.suffix.lower() != ".gguf":
                raise ValueError(f"LLM weights {name!r}: a file must be a .gguf; or pass a model folder")
            folder = fast_model_dir(source, self.weights_sha256, source.stem)
        else:
            folder = source
        # a local copy of a registry file keeps the registry's model id (matched by checksum)
        reg = weights_mod.REGISTRY.get(name) or next(
            (s for s in weights_mod.REGISTRY.values() if s.sha256 == self.weights_sha256), None
        )
        self.model_id = reg.model_id if reg else source.name
        t0 = time.perf_counter()
        self.tokenizer: Any = transformers.AutoTokenizer.from_pretrained(str(folder))
        self.model: Any = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
        self.model.to(self.device).eval()
        self.load_seconds = time.perf_counter() - t0
        log.info("loaded %s from %s in %.2f s", self.model_id, folder, self.load_seconds)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"  # generation continues at the right edge of every row
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self._eos: set[int] = set(eos) if isinstance(eos, list) else {int(eos)}
        self.prefix_cache = prefix_cache
        self._prefix: tuple[tuple[int, ...], Any] | None = None  # the last shared prefix's ids and KV cache
        self.prefix_hits = 0  # prompts whose shared prefix came from the cache

    # ----------------------------------------------------------------------------------------------------

    @staticmethod
    def _check_sampling(temperature: float, top_p: float) -> None:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")

    @staticmethod
    def _check_stop(stop: Sequence[str]) -> tuple[str, ...]:
        if isinstance(stop, str):
            raise ValueError(f"stop must be a sequence of strings, got the string {stop!r}; use [{stop!r}]")
        out = tuple(stop)
        for s in out:
            if not isinstance(s, str) or not s:
                raise ValueError(f"every stop string must be a non-empty string, got {s!r}")
        return out

    @staticmethod
    def _check_sentences(n: int | None) -> int | None:
        if n is not None and n < 1:
            raise ValueError(f"max_sentences must be >= 1 or None, got {n}")
        return n

    def _messages(self, prompt: Prompt) -> Messages:
        if isinstance(prompt, str):
            msgs: Messages = [{"role": "user", "content": prompt}]
        else:
            msgs = [dict(m) for m in prompt]
            for i, m in enumerate(msgs):
                if "role" not in m or "content" not in m:
                    raise ValueError(f"chat message {i} needs 'role' and 'content', got keys {sorted(m)}")
        if self.system_prompt and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": self.system_prompt}, *msgs]
        return msgs

    def render(self, prompt: Prompt) -> str:
        """The exact text the model sees for ``prompt`` (chat template applied, assistant turn opened). A chat
        that ends with an assistant message is continued: that message is the opening of the answer (the
        model writes what follows it; the returned text is only what the model wrote)."""
        msgs = self._messages(prompt)
        if msgs[-1]["role"] == "assistant":
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, continue_final_message=True)
        else:
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return str(text)

    def piece_texts(self, ids: list[int], topk: list[list[int]]) -> tuple[list[str], list[list[str]]]:
        """The text each generated token adds to the answer, and the text each top-k alternative would have
        added at that step: what a student with another tokenizer aligns the log-probs by.

        Decoded in context (the text of context + token minus the text of the context, the context being
        the previous :data:`PIECE_CONTEXT` tokens), not one id alone: only in context does a tokenizer
        whose pieces carry a leading-space marker (SentencePiece) give the space, and a character split over
        several byte tokens come out whole. A token that ends inside a character adds "" and the token that
        completes it adds the whole character, so the pieces always join to the decoded answer. Special
        tokens (EOS) add "". No clean-up of spaces: pieces must join exactly.
        """

        def dec(x: list[int]) -> str:
            return str(self.tokenizer.decode(x, skip_special_tokens=True, clean_up_tokenization_spaces=False))

        texts: list[str] = []
        alts: list[list[str]] = []
        whole = 0  # ids[:whole] decode to whole characters (the pieces so far cover exactly them)
        for s in range(len(ids)):
            c0 = max(0, whole - PIECE_CONTEXT)
            base = dec(ids[c0:whole])
            ctx = ids[c0:s]
            alts.append([dec([*ctx, a])[len(base) :] for a in topk[s]])
            text = dec(ids[c0 : s + 1])
            if text.endswith("\ufffd") and s < len(ids) - 1:  # inside a character: the next token ends it
                texts.append("")
                continue
            texts.append(text[len(base) :])
            whole = s + 1
        return texts, alts

    def generate(
        self,
        prompt: Prompt,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        max_new_tokens: int | None = None,
        stop: Sequence[str] | None = None,
        max_sentences: int | None = None,
    ) -> LLMOutput:
        """One answer to a user message or a chat."""
        return self.generate_batch(
            [prompt],
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            max_new_tokens=max_new_tokens,
            stop=stop,
            max_sentences=max_sentences,
        )[0]

    def generate_batch(
        self,
        prompts: Sequence[Prompt],
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        max_new_tokens: int | None = None,
        stop: Sequence[str] | None = None,
        max_sentences: int | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[LLMOutput]:
        """Answers to several prompts in one left-padded batch (same settings for the batch).

        ``None`` arguments fall back to the adapter's settings. Sampling: row ``i`` draws from its own
        generator seeded with ``seeds[i]``, or with ``seed + i`` when ``seeds`` is not given (``seed=None``
        means the adapter's seed), so two identical calls give identical answers, a row's answer does not
        depend on the other rows, and ``generate(p, seed=s)`` is the row of any batch that gives ``p`` the
        seed ``s`` (up to the float noise of padding, as for greedy rows).

        ``stop``: strings that end an answer (finish_reason "stop"), as EOS does; ``max_sentences``: the
        answer ends after that many sentences (a sentence ends at ``.``, ``!`` or ``?`` followed by white
        space, so the stop is seen one token after the full stop). A row stops generating once its answer
        is complete (the others go on). The text ends before the stop string (after the last sentence's
        full stop); the recorded tokens and their top-k end with the token that completed the stop (so the
        pieces join to the text, then the stop string or white space, and whatever else that last token
        held). A stop only counts after the first non-space character: an answer that opens with a newline
        is not cut to nothing.
        """
        if not prompts:
            return []
        torch = self._torch
        temp = self.temperature if temperature is None else temperature
        tp = self.top_p if top_p is None else top_p
        self._check_sampling(temp, tp)
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"seeds: {len(seeds)} seeds for {len(prompts)} prompts (one per prompt)")
        stops = self.stop if stop is None else self._check_stop(stop)
        sentences = self.max_sentences if max_sentences is None else self._check_sentences(max_sentences)
        rule = StopRule(stops, sentences)
        texts = [self.render(p) for p in prompts]
        enc = self._encode(texts, prompts)
        gen_kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens if max_new_tokens is None else max_new_tokens,
            "return_dict_in_generate": True,
            "output_logits": True,  # raw logits: log-probs of the model itself, not of the sampler
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": sorted(self._eos),
        }
        # greedy decoding picks each step's best token; when sampling, _RowSampler has already made the token
        # it drew each row's only finite score, so the same greedy pick takes it
        gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        prompt_len = enc["input_ids"].shape[1]
        processors: list[Any] = []
        if self.no_repeat_ngram:  # before the sampler: a banned token is never drawn either
            processors.append(_NoRepeatNGram(self.no_repeat_ngram, prompt_len))
        if temp > 0:
            base = self.seed if seed is None else seed
            row_seeds = (
                [int(x) for x in seeds] if seeds is not None else [base + i for i in range(len(texts))]
            )
            processors.append(_RowSampler(torch, row_seeds, temp, tp, self.device))
        if processors:
            gen_kwargs["logits_processor"] = self._transformers.LogitsProcessorList(processors)
        if rule:
            gen_kwargs["stopping_criteria"] = self._transformers.StoppingCriteriaList(
                [_StopCriterion(self, prompt_len, rule)]
            )
        with torch.inference_mode():
            out = self.model.generate(**enc, **gen_kwargs)
        new_tokens = out.sequences[:, prompt_len:].tolist()
        # [steps, batch, vocab] -> top-k per step and row
        logprobs = torch.log_softmax(torch.stack(out.logits, dim=0).float(), dim=-1)
        top_vals, top_ids = logprobs.topk(self.topk_logprobs, dim=-1)
        top_vals, top_ids = top_vals.cpu().tolist(), top_ids.cpu().tolist()
        results = []
        for row, tokens in enumerate(new_tokens):
            n, cut = self._kept(tokens, rule)
            finish = "stop" if cut is not None or tokens[n - 1] in self._eos else "length"
            ids = tokens[:n]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            text = (text if cut is None else text[:cut]).strip()
            topk = [top_ids[s][row] for s in range(n)]
            token_texts, topk_texts = self.piece_texts(ids, topk)
            lp = TokenLogprobs(
                tokenizer=self.model_id,
                token_ids=ids,
                topk_ids=topk,
                topk_logprobs=[top_vals[s][row] for s in range(n)],
                token_texts=token_texts,
                topk_texts=topk_texts,
                eos_ids=sorted(self._eos),
            )
            results.append(LLMOutput(text=text, logprobs=lp, finish_reason=finish))  # type: ignore[arg-type]
        return results

    def _encode(self, texts: list[str], prompts: Sequence[Prompt]) -> dict[str, Any]:
        """The batch's ``input_ids`` and ``attention_mask``, and (with ``prefix_cache``) the KV ``cache`` of the
        prefix every row shares: the chat before its last user message (the system prompt and the few-shot
        turns, ~90 % of visual_rag's prompt), computed once and kept while the next calls share it. Such a batch is
        padded after the prefix, not before it (``[prefix][pad][rest]``, the mask 0 on the pad): transformers
        numbers positions by the mask, so every row sees what it would alone. Prefill then costs the rest of
        each prompt instead of all of it (0.87 s -> ~0.1 s a prompt for visual_rag on 2 CPU cores)."""
        torch = self._torch
        rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        n = self._shared_prefix(rows, prompts) if self.prefix_cache else 0
        width = max(len(r) for r in rows) - n
        pad = self.tokenizer.pad_token_id
        ids = [r[:n] + [pad] * (width - len(r) + n) + r[n:] for r in rows]
        mask = [[1] * n + [0] * (width - len(r) + n) + [1] * (len(r) - n) for r in rows]
        enc: dict[str, Any] = {
            "input_ids": torch.tensor(ids, dtype=torch.long, device=self.device),
            "attention_mask": torch.tensor(mask, dtype=torch.long, device=self.device),
        }
        if n:
            assert self._prefix is not None
            cache = copy.deepcopy(self._prefix[1])  # generate extends the cache it is given
            cache.batch_repeat_interleave(len(rows))
            enc["cache"] = cache
            self.prefix_hits += len(rows)
        return enc

    def _shared_prefix(self, rows: list[list[int]], prompts: Sequence[Prompt]) -> int:
        """How many leading tokens of every row the prefix cache holds (0: none), computing the cache when the
        rows share a chat prefix it does not hold yet. At least one token of each row is left to run."""
        torch = self._torch
        heads = {self._chat_head(p) for p in prompts}
        if len(heads) != 1 or not (head := heads.pop()):
            return 0
        ids = self.tokenizer(head, add_special_tokens=False)["input_ids"]
        n = min(len(ids), *(len(r) - 1 for r in rows))
        for r in rows:  # the head's own tokens may end differently from the same text inside a row
            n = next((i for i in range(n) if r[i] != ids[i]), n)
        if n < MIN_PREFIX:
            return 0
        key = tuple(ids[:n])
        if self._prefix is None or self._prefix[0] != key:
            with torch.inference_mode():
                out = self.model(input_ids=torch.tensor([key], device=self.device), use_cache=True)
            cache = getattr(out, "cache", None) or out.past_key_values
            if not hasattr(cache, "batch_repeat_interleave"):
                self.prefix_cache = False  # a model whose cache cannot be shared by rows: run prompts whole
                return 0
            self._prefix = (key, cache)
        return n

    def _chat_head(self, prompt: Prompt) -> str | None:
        """The rendered chat before the prompt's last user message (None: nothing before it). An opening of
        the answer (a last assistant message, see :meth:`render`) belongs to its row, as its question does."""
        msgs = self._messages(prompt)
        end = len(msgs) - 1
        if msgs[end]["role"] == "assistant":
            end -= 1
        if end < 1:
            return None
        text = self.tokenizer.apply_chat_template(msgs[:end], tokenize=False, add_generation_prompt=False)
        return str(text)

    def _kept(self, tokens: list[int], rule: StopRule) -> tuple[int, int | None]:
        """How many of a row's generated tokens its answer keeps, and where the stop rule cuts the text
        they decode to (None: not cut). The answer ends at the first EOS (kept) or at the first token that
        completes a stop (kept); the rest is what the batch generated after this row stopped (padding)."""
        for i, tok in enumerate(tokens):
            if tok in self._eos:
                return i + 1, None
            if rule:
                cut = rule.cut(self.tokenizer.decode(tokens[: i + 1], skip_special_tokens=True))
                if cut is not None:
                    return i + 1, cut
        return len(tokens), None


_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s)")


@dataclass(frozen=True)
class StopRule:
    """Where an answer ends besides EOS: at any of ``stops`` (strings), or after ``max_sentences``."""

    stops: tuple[str, ...] = ()
    max_sentences: int | None = None

    def __bool__(self) -> bool:
        return bool(self.stops) or self.max_sentences is not None

    def cut(self, text: str) -> int | None:
        """Where ``text`` ends, if the rule ends it: the start of the first stop string, or the end of the
        ``max_sentences``-th sentence (its full stop seen with white space after it), whichever comes first;
        only past the first non-space character. None when the text is not complete yet."""
        body = len(text) - len(text.lstrip())  # leading white space never ends an answer
        found = [i for s in self.stops if (i := text.find(s, body)) >= 0 and text[:i].strip()]
        if self.max_sentences is not None:
            ends = [m.end() for m in _SENTENCE_END.finditer(text, body)]
            if len(ends) >= self.max_sentences:
                found.append(ends[self.max_sentences - 1])
        return min(found) if found else None


class _RowSampler:
    """A transformers logits processor that samples each row's next token from its own seeded generator:
    temperature, then nucleus (``top_p``, the smallest set of tokens whose probability reaches it, as
    transformers' ``TopPLogitsWarper`` keeps), then one draw. It returns scores where the drawn token is the
    only finite one, so greedy selection takes it; the recorded log-probs are the model's raw logits."""

    def __init__(
        self, torch: Any, seeds: Sequence[int], temperature: float, top_p: float, device: str
    ) -> None:
        self.torch = torch
        self.temperature = temperature
        self.top_p = top_p
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        torch = self.torch
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            ascending, order = logits.sort(dim=-1)
            drop = ascending.softmax(-1).cumsum(-1) <= 1 - self.top_p
            drop[..., -1] = False  # the most likely token always stays
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        probs = logits.softmax(-1)
        picked = torch.cat(
            [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.generators)]
        )
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, picked[:, None], 0.0)


class _NoRepeatNGram:
    """A transformers logits processor that keeps a row from repeating any ``n`` tokens in a row of what it has
    generated: the token that would complete an n-gram the row already wrote gets no score. Only the generated
    part counts (positions from ``prompt_len``): the prompt's words (the few-shot answers, the facts, an
    opening being continued) stay free to use. transformers' own ``no_repeat_ngram_size`` counts the prompt
    too, which would forbid the facts' phrases. Greedy decoding of a small model otherwise falls into a loop
    ("a lightweight, lightweight, lightweight, ...") that only the token limit ends."""

    def __init__(self, n: int, prompt_len: int) -> None:
        self.n = n
        self.prompt_len = prompt_len

    def banned(self, generated: Sequence[int]) -> list[int]:
        """The tokens that would repeat an n-gram of ``generated``."""
        n = self.n
        if len(generated) < n:
            return []
        head = tuple(generated[len(generated) - n + 1 :])  # the n - 1 tokens a next token would extend
        return [
            int(generated[i + n - 1])
            for i in range(len(generated) - n + 1)
            if tuple(generated[i : i + n - 1]) == head
        ]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        out = scores  # a copy before the first ban: transformers records `scores` itself as the raw logits
        for row, ids in enumerate(input_ids[:, self.prompt_len :].tolist()):
            ban = self.banned(ids)
            if ban:
                if out is scores:
                    out = scores.clone()
                out[row, ban] = float("-inf")
        return out


class _StopCriterion:
    """A transformers stopping criterion: a row is done once the stop rule cuts its generated text.
    Rows are decoded whole at every step: answers are short."""

    def __init__(self, llm: HFCausalLM, prompt_len: int, rule: StopRule) -> None:
        self.llm = llm
        self.prompt_len = prompt_len
        self.rule = rule

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        tok = self.llm.tokenizer
        done = [
            self.rule.cut(tok.decode(row[self.prompt_len :], skip_special_tokens=True)) is not None
            for row in input_ids.tolist()
        ]
        return self.llm._torch.tensor(done, dtype=self.llm._torch.bool, device=input_ids.device)
