"""The student's tokenizer: a byte-level BPE trained on the dataset's own questions and answers.

Why its own tokenizer rather than the teacher LLM's: the student's vocabulary sets the size of its (tied)
embedding and output layers, the largest tensors in a tiny model. The teacher's 49 k-token vocabulary would
cost ~6 M parameters at d=128; a BPE trained on the distilled domain (a few thousand templated questions
and answers) needs 1–4 k tokens and also makes answers shorter in tokens, so decoding is faster.
Byte-level: any text round-trips, nothing is ever out of vocabulary.

Special tokens have fixed ids (see :data:`graphdistill.student.model.SPECIAL_TOKENS`):
``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from graphdistill._lazy import require
from graphdistill.student.model import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS

log = logging.getLogger(__name__)


class StudentTokenizer:
    """Thin wrapper over a ``tokenizers.Tokenizer`` with the student's fixed special ids."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        for i, s in enumerate(SPECIAL_TOKENS):
            if tok.token_to_id(s) != i:
                raise ValueError(f"tokenizer must map {s!r} to id {i}, got {tok.token_to_id(s)}")

    @property
    def vocab_size(self) -> int:
        return int(self.tok.get_vocab_size())

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 2048,
        min_frequency: int = 2,
        class_names: Iterable[str] = (),
    ) -> StudentTokenizer:
        """A byte-level BPE of ``vocab_size`` trained on ``texts``, plus one token per class name: ``" " + name``
        (``" cat"``, ``" traffic light"``) is matched literally wherever it occurs, so every detector label is
        one token the answer decoder can copy (:meth:`class_token_ids`), even for a class no text names."""
        tk = require("tokenizers", purpose="the student's tokenizer")
        tok = tk.Tokenizer(tk.models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        texts = [t for t in texts if t]
        tok.train_from_iterator(texts, trainer=trainer)
        names = [n for n in dict.fromkeys(class_names) if n.strip()]
        if names:
            tok.add_tokens([tk.AddedToken(" " + n, normalized=False) for n in names])
        log.info(
            "trained a byte-level BPE on %d texts: %d tokens (%d class names among them)",
            len(texts),
            tok.get_vocab_size(),
            len(names),
        )
        return cls(tok)

    def class_token_ids(self, class_names: Iterable[str]) -> list[int]:
        """The token of each class name (``" " + name``, see :meth:`train`), or 0 (<pad>, never copied) for a
        name that has none."""
        out = []
        for name in class_names:
            i = self.tok.token_to_id(" " + name)
            out.append(int(i) if i is not None else PAD_ID)
        return out

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))

    @classmethod
    def load(cls, path: str | Path) -> StudentTokenizer:
        tk = require("tokenizers", purpose="the student's tokenizer")
        if not Path(path).is_file():
            raise FileNotFoundError(f"no tokenizer at {path}")
        return cls(tk.Tokenizer.from_file(str(path)))

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text).ids)

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and each token's (start, end) character offsets in ``text`` (a token inside a multi-byte
        character spans that whole character)."""
        enc = self.tok.encode(text)
        return list(enc.ids), [(int(s), int(e)) for s, e in enc.offsets]

    @functools.cached_property
    def piece_ids(self) -> dict[str, int]:
        """Decoded text -> id for every token that decodes on its own to whole characters (special tokens
        and byte pieces of a multi-byte character do not). Built once; cross-tokenizer soft targets map a
        teacher's piece to the student token with exactly its text through it."""
        out: dict[str, int] = {}
        for i in range(self.vocab_size):
            text = str(self.tok.decode([i]))
            if text and "\ufffd" not in text:
                out.setdefault(text, i)
        for i, added in self.tok.get_added_tokens_decoder().items():  # encode() emits these for their text
            if not added.special:
                out[added.content] = int(i)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text, stopping at the first <eos> and dropping <pad>/<bos>."""
        keep: list[int] = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i in (PAD_ID, BOS_ID):
                continue
            keep.append(i)
        return str(self.tok.decode(keep))

    def encode_question(self, text: str, max_len: int) -> tuple[list[int], list[bool]]:
        """Question -> (ids padded to max_len, mask True where a token is). Truncates long questions."""
        ids = self.encode(text)[:max_len]
        mask = [True] * len(ids) + [False] * (max_len - len(ids))
        return ids + [PAD_ID] * (max_len - len(ids)), mask

    def encode_answer(self, text: str, max_len: int) -> tuple[list[int], list[int]]:
        """Answer -> (decoder input ``<bos> t1..tn``, target ``t1..tn <eos>``), both padded to max_len
        (target padding is -100, ignored by the loss). Long answers are truncated (no <eos> then)."""
        ids = self.encode(text)[: max_len - 1]
        inp = [BOS_ID, *ids]
        tgt = [*ids, EOS_ID][:max_len]
        inp = inp + [PAD_ID] * (max_len - len(inp))
        tgt = tgt + [-100] * (max_len - len(tgt))
        return inp, tgt
