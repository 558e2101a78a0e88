"""Incremental detokenization inside the gateway: no step's tokens go through another process.

The gateway loads the model's tokenizer itself (the same `ServedTokenizer` the tokenizer
service uses, so the text is the same byte for byte) and keeps one `IncrementalDetokenizer`
per choice, keyed "request_id/index" as on the Detokenize stream it replaces. The tokenizer
service keeps Encode, Decode and chat templates; a step costs no round trip to it, and a
tokenizer restart no longer breaks the streams in flight.

Work per step is the same as the tokenizer service's; it runs on the gateway's event loop,
in one pass over the step's items (one call per step for all requests, as before).
"""

from __future__ import annotations

from pagedserve.common.errors import InvalidArgument
from pagedserve.gateway.datatypes import DetokenizeItem
from pagedserve.tokenizer.core import ServedTokenizer
from pagedserve.tokenizer.detokenizer import IncrementalDetokenizer


class LocalDetokenizer:
    """`begin` / `detokenize` / `release`, as `DetokenizeStream`, without a stream."""

    remote = False  # needs no tokenizer service

    def __init__(self, tokenizer: ServedTokenizer) -> None:
        self.tokenizer = tokenizer
        self._sequences: dict[str, IncrementalDetokenizer] = {}
        # Totals for /metrics (no stream is ever opened).
        self.num_streams_opened = 0
        self.num_batches = 0
        self.num_items = 0

    @classmethod
    def load(cls, model: str) -> LocalDetokenizer:
        return cls(ServedTokenizer.load(model))

    def begin(self) -> int:
        return 0

    async def detokenize(self, items: list[DetokenizeItem], generation: int = 0) -> list[str]:
        """One text per item, in order: what its new ids add (all that is held, when it finishes)."""
        self.num_batches += 1
        self.num_items += len(items)
        return [self._one(item) for item in items]

    def _one(self, item: DetokenizeItem) -> str:
        sequences = self._sequences
        detok = sequences.get(item.key)
        if detok is None:
            if item.finish and not item.token_ids and not item.prompt_token_ids:
                return ""  # forgetting a sequence that never started
            detok = sequences[item.key] = self.tokenizer.detokenizer(
                item.prompt_token_ids, skip_special_tokens=item.skip_special_tokens
            )
        try:
            text = detok.add(item.token_ids)
            if item.finish:
                text += detok.finish()
                del sequences[item.key]
        except InvalidArgument:
            sequences.pop(item.key, None)
            raise
        return text

    def release(self, keys: list[str], generation: int = 0) -> None:
        for key in keys:
            self._sequences.pop(key, None)

    @property
    def num_sequences(self) -> int:
        return len(self._sequences)

    async def close(self) -> None:
        self._sequences.clear()
