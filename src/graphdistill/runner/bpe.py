"""Byte-level BPE in pure Python: the question -> token ids, and answer ids -> text.

It reads the Hugging Face ``tokenizer.json`` the student was trained with and reproduces what the
``tokenizers`` library does for the configuration the student uses (no normaliser, a ``ByteLevel``
pre-tokeniser with the GPT-2 split rule, a ``BPE`` model, a ``ByteLevel`` decoder). A phone app ports
these ~150 lines; nothing here needs the ``tokenizers`` package.

The steps, in order:
1. split out the added (special) tokens, which are matched literally and never merged;
2. split the rest into "words" with the GPT-2 rule (contractions, letters, numbers, other symbols,
   whitespace), optionally putting a space in front of the text first (``add_prefix_space``);
3. map each word's UTF-8 bytes to printable characters (the GPT-2 byte<->unicode table);
4. merge adjacent symbols, always the pair whose merge rule comes first in ``merges``, until none applies;
5. look every final symbol up in ``vocab``.
"""

from __future__ import annotations

import itertools
import json
import re
import unicodedata
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

from graphdistill.errors import GraphdistillError


class TokenizerError(GraphdistillError, ValueError):
    """tokenizer.json uses a feature this runner does not implement, or is malformed."""


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: every byte 0..255 -> one printable character (printable bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table: dict[int, str] = {}
    shift = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


# Unicode White_Space (what the regex engine behind `tokenizers` means by \s)
_WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | frozenset(
    chr(c) for c in range(0x2000, 0x200B)
)
_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")


def _is_letter(ch: str) -> bool:
    return unicodedata.category(ch).startswith("L")


def _is_number(ch: str) -> bool:
    return unicodedata.category(ch).startswith("N")


def _is_other(ch: str) -> bool:
    return not (ch in _WHITESPACE or _is_letter(ch) or _is_number(ch))


def split_words(text: str) -> list[str]:
    """The GPT-2 split rule, ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``,
    written out by hand (Python's ``re`` has no \\p{L}). At each position the first rule that matches wins."""
    words: list[str] = []
    i, n = 0, len(text)

    def run(j: int, pred: Any) -> int:  # end of the run of characters satisfying pred, starting at j
        while j < n and pred(text[j]):
            j += 1
        return j

    while i < n:
        ch = text[i]
        end = 0
        if ch == "'":  # 's 't 're 've 'm 'll 'd
            for c in _CONTRACTIONS:
                if text.startswith(c, i + 1):
                    end = i + 1 + len(c)
                    break
        if not end:
            start = i + 1 if ch == " " and i + 1 < n else i  # the optional leading space
            for pred in (_is_letter, _is_number, _is_other):
                if pred(text[start]) and (start == i + 1 or pred(ch)):
                    end = run(start, pred)
                    break
        if not end:  # whitespace: keep the last space for the next word unless the text ends here
            stop = run(i, lambda c: c in _WHITESPACE)
            end = stop if stop == n or stop - i == 1 else stop - 1
        words.append(text[i:end])
        i = end
    return words


class ByteLevelBPE:
    """Encode/decode exactly like ``tokenizers.Tokenizer.from_file(path)`` for a byte-level BPE."""

    def __init__(self, config: dict[str, Any]) -> None:
        model = config.get("model") or {}
        if model.get("type") != "BPE":
            raise TokenizerError(f"tokenizer model must be BPE, got {model.get('type')!r}")
        if config.get("normalizer") is not None:
            raise TokenizerError(f"tokenizer normalizer {config['normalizer'].get('type')!r} not supported")
        pre = config.get("pre_tokenizer") or {}
        if pre.get("type") != "ByteLevel":
            raise TokenizerError(f"pre_tokenizer must be ByteLevel, got {pre.get('type')!r}")
        for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
            if model.get(key):
                raise TokenizerError(f"BPE option {key}={model[key]!r} not supported")
        self.add_prefix_space = bool(pre.get("add_prefix_space", False))
        self.use_regex = bool(pre.get("use_regex", True))
        self.ignore_merges = bool(model.get("ignore_merges", False))
        self.vocab: dict[str, int] = dict(model["vocab"])
        self.unk_token: str | None = model.get("unk_token")
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        self.ranks: dict[tuple[str, str], int] = {(a, b): r for r, (a, b) in enumerate(merges)}
        self.added: dict[str, int] = {t["content"]: int(t["id"]) for t in config.get("added_tokens", [])}
        self.special_ids = {int(t["id"]) for t in config.get("added_tokens", []) if t.get("special")}
        self.id_to_token: dict[int, str] = {i: t for t, i in self.vocab.items()}
        self.id_to_token.update({i: t for t, i in self.added.items()})
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self._cache: dict[str, list[int]] = {}
        # alternatives longest first: at a position where several added tokens start, the longest wins
        by_length = sorted((t for t in self.added if t), key=len, reverse=True)
        self._added_re = re.compile("|".join(map(re.escape, by_length))) if by_length else None

    @classmethod
    def from_file(cls, path: str | Path) -> ByteLevelBPE:
        try:
            return cls(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise TokenizerError(f"cannot read tokenizer {path}: {exc}") from exc

    def token_id(self, token: str) -> int:
        if token in self.added:
            return self.added[token]
        return self.vocab[token]

    # -- encoding ----------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece, is_added in self._split_added(text):
            if is_added:
                ids.append(self.added[piece])
                continue
            if self.add_prefix_space and not piece.startswith(" "):
                piece = " " + piece
            for word in split_words(piece) if self.use_regex else [piece]:
                ids.extend(self._encode_word(word))
        return ids

    def _split_added(self, text: str) -> Iterable[tuple[str, bool]]:
        """Cut the text around literal occurrences of added tokens (at each position the longest one)."""
        start = 0
        if self._added_re is not None:
            for hit in self._added_re.finditer(text):
                if hit.start() > start:
                    yield text[start : hit.start()], False
                yield hit.group(), True
                start = hit.end()
        if start < len(text):
            yield text[start:], False

    def _encode_word(self, word: str) -> list[int]:
        if word in self._cache:
            return self._cache[word]
        symbols = [self.byte_encoder[b] for b in word.encode("utf-8")]
        joined = "".join(symbols)
        symbols = [joined] if self.ignore_merges and joined in self.vocab else self._merge(symbols)
        ids = []
        for s in symbols:
            if s in self.vocab:
                ids.append(self.vocab[s])
            elif self.unk_token is not None and self.unk_token in self.vocab:
                ids.append(self.vocab[self.unk_token])
            # else: the tokenizers library silently drops symbols it cannot map; so do we
        self._cache[word] = ids
        return ids

    def _merge(self, symbols: list[str]) -> list[str]:
        while len(symbols) > 1:
            ranked = [(self.ranks[p], p) for p in itertools.pairwise(symbols) if p in self.ranks]
            if not ranked:
                break
            _, (first, second) = min(ranked)  # the merge rule that comes first in `merges`
            merged: list[str] = []
            k = 0
            while k < len(symbols):  # merge every occurrence of the best pair, left to right
                if k + 1 < len(symbols) and symbols[k] == first and symbols[k + 1] == second:
                    merged.append(first + second)
                    k += 2
                else:
                    merged.append(symbols[k])
                    k += 1
            symbols = merged
        return symbols

    # -- decoding ----------------------------------------------------------------------------------------
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text: tokens' characters back to bytes, bytes to UTF-8 (bad sequences become U+FFFD)."""
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if skip_special_tokens and i in self.special_ids:
                continue
            token = self.id_to_token.get(i)
            if token is None:
                continue
            if token in self.added:  # added tokens are literal text, not byte-mapped
                out.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
                out.append(token)
                continue
            buf.extend(self.byte_decoder[c] for c in token if c in self.byte_decoder)
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)
