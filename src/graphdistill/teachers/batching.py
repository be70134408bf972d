"""Micro-batching for the LLM teacher: concurrent ``generate`` calls served by one ``generate_batch`` call.

``graph.batch`` runs one graph execution per input in threads; each reaches the LLM node on its own. An
:class:`LLMBatcher` in front of the model collects the requests that arrive within a short window (or until
``max_batch`` are waiting) and answers them with one left-padded ``generate_batch`` call, which on CPU gives
several times the throughput of one prompt at a time. Every caller gets its own ``LLMOutput`` (or its own
exception); a request that arrives alone is served alone once the window has passed.

Grouping: only requests with the same ``(temperature, top_p, max_new_tokens, stop, max_sentences)`` share
a batch. Greedy requests (temperature 0) batch, and give the same tokens as single calls. Sampled requests
(temperature > 0) batch when the adapter's ``generate_batch`` takes ``seeds`` (one seed per row, each row
drawing from its own generator, as :class:`~graphdistill.teachers.llm.HFCausalLM` does): every request keeps
its own seed (``None``: the adapter's ``seed``), so it gets what its single call gives. An adapter without
``seeds`` draws one stream for a whole batch, where a row's sample would depend on its batch-mates: its
sampled requests are served alone.

Callers that know a request is on its way (a graph execution that has passed ``detect`` will reach
``reason``) announce it with :meth:`LLMBatcher.expect`; a batch then waits, up to ``max_wait_s``, until every
announced request has arrived, so inputs that reach the LLM a little apart still share a call, and a lone
``invoke`` (nothing else announced) is served at once. :meth:`LLMBatcher.cancel` withdraws an announcement
(the execution failed before its LLM call).

Batches are taken when the model is free: requests that arrive while a batch is running join the next one.
One model call runs at a time (``lock``, shareable with other users of the same model).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

Key = tuple[Any, ...]


@dataclass
class _Request:
    prompt: Any
    seed: int | None = None  # a sampled request's own seed
    wake: threading.Event = field(default_factory=threading.Event)  # answered, or promoted to leader
    done: bool = False
    lead: bool = False  # runs the next batch of its key
    result: Any = None
    error: BaseException | None = None


class LLMBatcher:
    """Thread-safe micro-batcher around an LLM adapter with ``generate`` and ``generate_batch``.

    ``window_s``: how long the first request of a batch always waits for company; ``max_wait_s``: how long
    it waits at most while announced requests (:meth:`expect`) have not arrived; ``max_batch``: the largest
    batch.
    ``calls`` counts the model calls made (batched or single), ``batch_sizes`` their sizes.
    """

    def __init__(
        self,
        llm: Any,
        window_s: float = 0.04,
        max_batch: int = 8,
        lock: threading.Lock | None = None,
        max_wait_s: float = 2.0,
    ) -> None:
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0, got {window_s}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.llm = llm
        self.window_s = window_s
        self.max_wait_s = max(max_wait_s, window_s)
        self._awaited = 0  # announced requests that have not arrived yet
        self.max_batch = max_batch
        self._model_lock = lock or threading.Lock()
        self._cond = threading.Condition()
        self._pending: dict[Key, list[_Request]] = {}
        self._leaders: set[Key] = set()
        self.batch_sizes: list[int] = []
        self.row_seeds = _takes_seeds(llm)  # sampled requests batch only when each row keeps its own seed

    @property
    def calls(self) -> int:
        return len(self.batch_sizes)

    def expect(self) -> None:
        """Announce that one more request is on its way (pair with ``generate`` or :meth:`cancel`)."""
        with self._cond:
            self._awaited += 1

    def cancel(self) -> None:
        """Withdraw one announcement (its request will never come)."""
        self._arrive()

    def _arrive(self) -> None:
        with self._cond:
            if self._awaited > 0:
                self._awaited -= 1
                self._cond.notify_all()

    def _sampled(self, temperature: float | None) -> bool:
        temp = getattr(self.llm, "temperature", 0.0) if temperature is None else temperature
        return float(temp or 0.0) > 0

    def generate(
        self,
        prompt: Any,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        max_new_tokens: int | None = None,
        stop: Sequence[str] | None = None,
        max_sentences: int | None = None,
    ) -> Any:
        """Like the adapter's ``generate``; greedy requests may be answered as part of a batch.

        ``stop`` / ``max_sentences`` reach the adapter only when given (an adapter without a stop rule
        need not take them)."""
        self._arrive()
        stops = None if stop is None else tuple(stop)
        sampled = self._sampled(temperature)
        if (sampled and not self.row_seeds) or self.max_batch == 1:
            kwargs = self._kwargs(top_p, max_new_tokens, stops, max_sentences)
            with self._model_lock:
                out = self.llm.generate(prompt, temperature=temperature, seed=seed, **kwargs)
            with self._cond:
                self.batch_sizes.append(1)
            return out
        key: Key = (temperature, top_p, max_new_tokens, stops, max_sentences)
        req = _Request(
            prompt, seed=(getattr(self.llm, "seed", 0) if seed is None else seed) if sampled else None
        )
        with self._cond:
            self._pending.setdefault(key, []).append(req)
            if key not in self._leaders:
                self._leaders.add(key)
                req.lead = True
            elif len(self._pending[key]) >= self.max_batch:
                self._cond.notify_all()
        if not req.lead:
            req.wake.wait()
        if req.lead and not req.done:
            self._lead(key)
        if req.error is not None:
            raise req.error
        return req.result

    def _lead(self, key: Key) -> None:
        """Wait for company, take the batch once the model is free, run it and hand out the results."""
        start = time.monotonic()
        with self._cond:
            while len(self._pending[key]) < self.max_batch:
                waited = time.monotonic() - start
                limit = self.max_wait_s if self._awaited > 0 else self.window_s
                if waited >= limit:
                    break
                self._cond.wait(limit - waited)
        with self._model_lock:
            with self._cond:
                queue = self._pending[key]
                batch, rest = queue[: self.max_batch], queue[self.max_batch :]
                self._pending[key] = rest
                if rest:  # the next batch gets its leader now: nobody waits without one
                    rest[0].lead = True
                    rest[0].wake.set()
                else:
                    self._leaders.discard(key)
                self.batch_sizes.append(len(batch))
            self._run(key, batch)

    @staticmethod
    def _kwargs(
        top_p: float | None,
        max_new_tokens: int | None,
        stop: tuple[str, ...] | None,
        max_sentences: int | None,
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"top_p": top_p, "max_new_tokens": max_new_tokens}
        if stop is not None:
            kwargs["stop"] = stop
        if max_sentences is not None:
            kwargs["max_sentences"] = max_sentences
        return kwargs

    def _run(self, key: Key, batch: Sequence[_Request]) -> None:
        temperature, top_p, max_new_tokens, stop, max_sentences = key
        kwargs = {"temperature": temperature, **self._kwargs(top_p, max_new_tokens, stop, max_sentences)}
        sampled = self._sampled(temperature)

        def seeds(rows: Sequence[_Request]) -> dict[str, Any]:
            return {"seeds": [r.seed for r in rows]} if sampled else {}

        try:
            try:
                outs = self.llm.generate_batch([r.prompt for r in batch], **kwargs, **seeds(batch))
                if len(outs) != len(batch):
                    raise RuntimeError(f"generate_batch gave {len(outs)} outputs for {len(batch)} prompts")
            except Exception as exc:
                if len(batch) == 1:
                    batch[0].error = exc
                    return
                # one bad prompt must not fail its batch-mates: retry each alone
                log.warning("a batch of %d LLM prompts failed (%s); retrying one by one", len(batch), exc)
                for r in batch:
                    try:
                        r.result = self.llm.generate_batch([r.prompt], **kwargs, **seeds([r]))[0]
                    except Exception as one:
                        r.error = one
            else:
                for r, out in zip(batch, outs, strict=True):
                    r.result = out
            log.debug("served %d LLM request(s) in one call", len(batch))
        finally:  # every caller is answered, even when the model call was interrupted
            for r in batch:
                if r.result is None and r.error is None:
                    r.error = RuntimeError("the batched LLM call was interrupted")
                r.done = True
                r.wake.set()


def _takes_seeds(llm: Any) -> bool:
    """Whether the adapter's ``generate_batch`` takes per-row ``seeds``."""
    import inspect

    try:
        params = inspect.signature(llm.generate_batch).parameters
    except (AttributeError, TypeError, ValueError):
        return False
    return "seeds" in params
