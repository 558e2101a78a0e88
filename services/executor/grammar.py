"""Structured output in the executor: a grammar matcher per constrained request, one bitmask per step.

The sampler sees only a `TokenMask`: a `[B, ceil(V / 32)]` int32 bitmask (bit `t % 32` of word
`t // 32` in row r set: token t may be sampled by row r) and the rows it constrains. It is filled
on the CPU from each constrained request's matcher, then applied to the logits, after penalties
and `min_tokens` and before temperature, top-k/top-p and the draw, as one batched call.

A matcher's state is the output so far. It changes only when a step commits (`commit`), so a
step that fails leaves every matcher as it was; a request the executor learns again (preemption,
executor restart, a scheduler taking over) gets a fresh matcher that replays its output tokens.
Once the output is complete the mask allows only EOS, so the scheduler's EOS check ends the
sequence. A request whose constraint cannot be compiled here, or whose output the matcher
refuses (which the mask should make impossible), is logged and may then sample EOS only: a bad
grammar ends its own request and never the executor. So does a step where the mask and the
request's allowed_token_ids or bad words leave no token at all (the sampler then picks EOS).

Compiling needs the tokenizer's vocabulary: it is loaded from the model's folder the first time a
constrained request arrives, and each distinct (kind, spec) is compiled once (an LRU of
`MAX_COMPILED` grammars).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pagedserve.common import structured
from pagedserve.common.errors import InvalidArgument
from pagedserve.common.params import SamplingParams

log = logging.getLogger(__name__)

MAX_COMPILED = 128


@dataclass(slots=True)
class TokenMask:
    """The step's bitmask for the sampling rows; `rows` are the constrained ones."""

    bitmask: torch.Tensor  # [B, ceil(V / 32)] int32 on the CPU
    rows: list[int]

    def apply(self, logits: torch.Tensor) -> None:
        """Disallowed tokens of the constrained rows of `logits` `[B, V]` (float32) get -inf, in place.

        On the CPU through xgrammar's kernel; on an accelerator by unpacking the bits with torch
        ops (`apply_unpacked`), which need no kernel built for the device."""
        if logits.device.type != "cpu":
            self.apply_unpacked(logits)
            return
        import xgrammar as xgr

        xgr.apply_token_bitmask_inplace(logits, self.bitmask, indices=self.rows)

    def apply_unpacked(self, logits: torch.Tensor) -> None:
        """`apply` in plain torch ops, on any device."""
        device = logits.device
        rows = torch.tensor(self.rows, device=device)  # [R]
        words = self.bitmask[self.rows].to(device, non_blocking=True)  # [R, W] int32
        shifts = torch.arange(32, dtype=torch.int32, device=device)  # [32]
        allowed = ((words.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, : logits.shape[1]]  # [R, V]
        logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))


@dataclass(slots=True)
class Matcher:
    """One request's matcher; `grammar` None means failed (EOS only from now on)."""

    request_id: str
    grammar: object | None  # xgrammar.GrammarMatcher


class StructuredOutputs:
    """Compiled grammars (cached per spec) and the matchers of the constrained requests held."""

    def __init__(self, tokenizer_source: str, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self.tokenizer_source = tokenizer_source
        self.vocab_size = vocab_size  # the logits' width, which may exceed the tokenizer's
        self.eos_token_ids = tuple(t for t in eos_token_ids if 0 <= t < vocab_size)
        self.matchers: dict[str, Matcher] = {}
        self._compiler = None
        self._compiler_lock = threading.Lock()
        self._compiled: OrderedDict[tuple[str, str], object] = OrderedDict()

    def warm_up_in_background(self) -> None:
        """Load the library and the vocabulary now, in a thread, rather than inside the first step
        that has a constrained request (which would hold up every request in that step)."""

        def load() -> None:
            try:
                self._get_compiler()
            except Exception as exc:  # tried again, and reported, on first use
                log.info("structured output is not ready: %s", exc)

        # Not a daemon: a process that stops while this thread is inside the library's native
        # start-up aborts at exit ("terminate called without an active exception"), so exit
        # waits for the load (a few seconds at most) instead.
        threading.Thread(target=load, name="grammar-warm-up").start()

    # -- compiling ------------------------------------------------------------------------

    def _get_compiler(self):
        with self._compiler_lock:
            if self._compiler is None:
                import xgrammar as xgr
                from transformers import AutoTokenizer

                hf = AutoTokenizer.from_pretrained(self.tokenizer_source)
                info = xgr.TokenizerInfo.from_huggingface(
                    hf, vocab_size=self.vocab_size, stop_token_ids=list(self.eos_token_ids)
                )
                # One thread: the executor's cores belong to the forward; the grammars are small.
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler

    def compile(self, kind: str, spec: str):
        """The compiled grammar for (kind, spec); raises `InvalidArgument` for a bad one."""
        key = (kind, spec)
        compiled = self._compiled.get(key)
        if compiled is None:
            grammar = structured.build_grammar(kind, spec)
            compiled = self._get_compiler().compile_grammar(grammar)
            self._compiled[key] = compiled
            if len(self._compiled) > MAX_COMPILED:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(key)
        return compiled

    # -- matchers -------------------------------------------------------------------------

    def start(self, request_id: str, sampling: SamplingParams, output_token_ids: Sequence[int]) -> Matcher:
        """A fresh matcher for a (re)started request, with its output so far replayed. Not kept
        until `commit`."""
        import xgrammar as xgr

        try:
            compiled = self.compile(sampling.structured_kind, sampling.structured_spec)
            grammar = xgr.GrammarMatcher(compiled)
        except (InvalidArgument, RuntimeError, OSError, ValueError) as exc:
            log.error(
                "request %s: its %s constraint cannot be compiled (%s); it may only end",
                request_id,
                sampling.structured_kind,
                getattr(exc, "message", exc),
            )
            return Matcher(request_id, None)
        matcher = Matcher(request_id, grammar)
        for position, token in enumerate(output_token_ids):
            if not grammar.accept_token(token):
                log.error(
                    "request %s: output token %d (%d) does not fit its constraint on replay; it may only end",
                    request_id,
                    position,
                    token,
                )
                matcher.grammar = None
                break
        return matcher

    def fill(self, rows: Sequence[Matcher | None]) -> TokenMask | None:
        """The bitmask for a step's sampling rows (None: unconstrained); None when no row is constrained."""
        constrained = [i for i, m in enumerate(rows) if m is not None]
        if not constrained:
            return None
        import xgrammar as xgr

        bitmask = xgr.allocate_token_bitmask(len(rows), self.vocab_size)  # [B, W] all allowed
        for i in constrained:
            grammar = rows[i].grammar
            if grammar is None or grammar.is_terminated():
                self._eos_only(bitmask[i])
            else:
                grammar.fill_next_token_bitmask(bitmask, i)
        return TokenMask(bitmask, constrained)

    def _eos_only(self, row: torch.Tensor) -> None:
        row.zero_()
        for t in self.eos_token_ids:
            row[t // 32] |= 1 << (t % 32) if t % 32 < 31 else -(1 << 31)

    def commit(self, forget: Sequence[str], started: Sequence[Matcher], sampled: dict[str, int]) -> None:
        """After a step: drop forgotten requests' matchers, keep the started ones, advance each
        constrained request by the token it sampled."""
        for request_id in forget:
            self.matchers.pop(request_id, None)
        for matcher in started:
            self.matchers[matcher.request_id] = matcher
        for request_id, token in sampled.items():
            matcher = self.matchers.get(request_id)
            if matcher is None or matcher.grammar is None:
                continue
            if matcher.grammar.is_terminated():
                # A step planned ahead ran the request once more after the token that ended it:
                # the scheduler drops what it sampled, and there is nothing left to match.
                continue
            if not matcher.grammar.accept_token(token):
                # EOS that the grammar did not allow: the sampler's answer to a row that the mask and
                # the request's allowed_token_ids or bad words left with nothing (a request's doing)
                level = logging.INFO if token in self.eos_token_ids else logging.ERROR
                log.log(
                    level,
                    "request %s: sampled token %d does not fit its constraint; it may only end",
                    request_id,
                    token,
                )
                matcher.grammar = None
