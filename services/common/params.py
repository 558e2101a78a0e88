"""Sampling parameters: the one Python form of `pagedserve.v1.SamplingParams`.

Every service validates with `SamplingParams.validate`, so a bad value gets the same
message (naming the field and the limit) whether it came over gRPC or HTTP.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pagedserve.common import structured
from pagedserve.common.errors import InvalidArgument, show

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024  # tokens one request may bias
MAX_ALLOWED_TOKEN_IDS = 4096  # ids one request may restrict sampling to (each step builds its mask)
LOGIT_BIAS_RANGE = 100.0  # |bias| at most this, as OpenAI
MAX_BAD_WORDS = 64  # words one request may ban (bad_words)
# Below this temperature sampling is argmax (as vLLM's epsilon): logits / 1e-38 overflow to inf.
GREEDY_TEMPERATURE = 1e-5
MAX_LENGTH_PENALTY = 10.0  # beam search: len ** 10 stays finite for any length a model takes
MAX_BAD_WORD_CHARS = 256  # characters in one of them
MAX_BAD_WORD_SEQUENCES = 2 * MAX_BAD_WORDS  # token sequences (each word is tokenized two ways)
MAX_BAD_WORD_TOKENS = 64  # ids in one sequence (each step compares the output's tail with it)
# Beam search's `early_stopping`, as transformers takes it; the proto enum's values in order.
EARLY_STOPPING_VALUES: tuple[bool | str, ...] = (False, False, True, "never")


@dataclass(slots=True)
class SamplingParams:
    """How to pick each next token; defaults match what OpenAI-style clients expect."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # in (0, 1]
    # 0 or -1: disabled; at or above the vocabulary size it keeps every token (off), as in vLLM
    top_k: int = 0
    min_p: float = 0.0  # in [0, 1]
    repetition_penalty: float = 1.0  # > 0; 1 disables
    presence_penalty: float = 0.0  # in [-2, 2]
    frequency_penalty: float = 0.0  # in [-2, 2]
    seed: int | None = None
    n: int = 1
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k: sampled token + top k
    min_tokens: int = 0
    # None: none; k: every prompt token's logprob + top k (computes every prompt position)
    prompt_logprobs: int | None = None
    # Structured output (see `pagedserve.common.structured`): "" for free text, else a kind and
    # its spec. Two plain strings, so the constraint survives asdict / JSON records unchanged.
    structured_kind: str = ""
    structured_spec: str = ""
    use_beam_search: bool = False  # n is then the beam width (see scheduler/beam.py)
    length_penalty: float = 1.0  # beam search: score = sum(logprobs) / generated_len ** length_penalty
    early_stopping: bool | str = False  # beam search: True, False or "never", as transformers
    # token id -> added to its logit before sampling (OpenAI's logit_bias)
    logit_bias: dict[int, float] = field(default_factory=dict)
    allowed_token_ids: list[int] = field(default_factory=list)  # when not empty: only these may be sampled
    # Words the output must not contain (vLLM's bad_words): the gateway tokenizes them into
    # bad_words_token_ids, the only form the scheduler and executor act on. A sequence's last id
    # is never sampled while the output ends with the rest of it.
    bad_words: list[str] = field(default_factory=list)
    bad_words_token_ids: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.logit_bias:  # ids as ints again after a JSON round trip (stored request states)
            self.logit_bias = {int(t): float(b) for t, b in self.logit_bias.items()}

    @property
    def greedy(self) -> bool:
        """Argmax sampling: temperature 0 (or below GREEDY_TEMPERATURE, where dividing by it would
        overflow the logits), or top_k 1."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise `InvalidArgument` naming the first field that is out of range."""
        if self.max_tokens < 1:
            raise InvalidArgument(f"max_tokens must be >= 1, got {self.max_tokens}", field="max_tokens")
        if not 0.0 <= self.temperature < float("inf"):
            raise InvalidArgument(
                f"temperature must be a finite number >= 0, got {self.temperature}", field="temperature"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}", field="top_p")
        if self.top_k < -1:
            raise InvalidArgument(f"top_k must be -1, 0 (disabled) or >= 1, got {self.top_k}", field="top_k")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidArgument(f"min_p must be in [0, 1], got {self.min_p}", field="min_p")
        if not 0.0 < self.repetition_penalty < float("inf"):
            raise InvalidArgument(
                f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}",
                field="repetition_penalty",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise InvalidArgument(f"{name} must be in [-2, 2], got {value}", field=name)
        if self.n < 1:
            raise InvalidArgument(f"n must be >= 1, got {self.n}", field="n")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidArgument(
                f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", field="logprobs"
            )
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise InvalidArgument(
                f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}",
                field="prompt_logprobs",
            )
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise InvalidArgument(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}",
                field="min_tokens",
            )
        if self.structured_kind or self.structured_spec:
            structured.check_shape(self.structured_kind, self.structured_spec)
            # The constraint ends a sequence by allowing only EOS once the output is complete;
            # these two would forbid exactly that token.
            if self.ignore_eos:
                raise InvalidArgument(
                    "ignore_eos cannot be combined with structured output", field="ignore_eos"
                )
            if self.min_tokens:
                raise InvalidArgument(
                    "min_tokens cannot be combined with structured output", field="min_tokens"
                )
        if self.use_beam_search:
            self._validate_beam_search()
        elif self.length_penalty != 1.0 or self.early_stopping is not False:
            name = "length_penalty" if self.length_penalty != 1.0 else "early_stopping"
            raise InvalidArgument(
                f"{name} only applies to beam search: set use_beam_search, or leave {name} at its default",
                field=name,
            )
        self._validate_logit_bias(vocab_size)
        if len(self.allowed_token_ids) > MAX_ALLOWED_TOKEN_IDS:
            raise InvalidArgument(
                f"allowed_token_ids has {len(self.allowed_token_ids)} ids, more than the limit of "
                f"{MAX_ALLOWED_TOKEN_IDS}",
                field="allowed_token_ids",
            )
        self._validate_bad_words(vocab_size)
        if vocab_size is not None:
            _check_in_vocabulary("allowed_token_ids", self.allowed_token_ids, vocab_size)
            _check_in_vocabulary("stop_token_ids", self.stop_token_ids, vocab_size)

    def _validate_logit_bias(self, vocab_size: int | None) -> None:
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidArgument(
                f"logit_bias has {len(self.logit_bias)} tokens, more than the limit of {MAX_LOGIT_BIAS}",
                field="logit_bias",
            )
        for tid, bias in self.logit_bias.items():
            if not -LOGIT_BIAS_RANGE <= bias <= LOGIT_BIAS_RANGE:
                raise InvalidArgument(
                    f"logit_bias[{tid}] must be in [-100, 100], got {bias}", field="logit_bias"
                )
            if vocab_size is not None:  # each entry whole before the next, as given
                _check_in_vocabulary("logit_bias", (tid,), vocab_size, "token id ")

    def _validate_bad_words(self, vocab_size: int | None) -> None:
        if len(self.bad_words) > MAX_BAD_WORDS:
            raise InvalidArgument(
                f"bad_words has {len(self.bad_words)} words, more than the limit of {MAX_BAD_WORDS}",
                field="bad_words",
            )
        for i, word in enumerate(self.bad_words):
            if not 1 <= len(word) <= MAX_BAD_WORD_CHARS or not word.strip():
                raise InvalidArgument(
                    f"bad_words[{i}] must have 1 to {MAX_BAD_WORD_CHARS} characters, not only spaces "
                    f"(got {len(word)})",
                    field="bad_words",
                )
        sequences = self.bad_words_token_ids
        if len(sequences) > MAX_BAD_WORD_SEQUENCES:
            raise InvalidArgument(
                f"bad_words_token_ids has {len(sequences)} sequences, more than the limit of "
                f"{MAX_BAD_WORD_SEQUENCES}",
                field="bad_words_token_ids",
            )
        for i, ids in enumerate(sequences):
            if not 1 <= len(ids) <= MAX_BAD_WORD_TOKENS:
                raise InvalidArgument(
                    f"bad_words_token_ids[{i}] must have 1 to {MAX_BAD_WORD_TOKENS} ids, got {len(ids)}",
                    field="bad_words_token_ids",
                )
            if vocab_size is not None:
                _check_in_vocabulary("bad_words_token_ids", ids, vocab_size)

    def check_samplable(self, eos_token_ids: Iterable[int]) -> None:
        """Raise `InvalidArgument` when allowed_token_ids leaves nothing to sample: every id is
        a one-token bad word, or, while min_tokens holds, every id left ends the sequence (a
        stop_token_id, or EOS unless ignore_eos). Needs the bad words as ids (after the gateway
        tokenized them) and the model's EOS ids."""
        if not self.allowed_token_ids:
            return
        banned = {ids[0] for ids in self.bad_words_token_ids if len(ids) == 1}
        left = set(self.allowed_token_ids) - banned
        if not left:
            name = "bad_words" if self.bad_words else "bad_words_token_ids"
            raise InvalidArgument(
                f"{name} bans every id of allowed_token_ids, so no token could be sampled", field=name
            )
        ending = set(self.stop_token_ids) | (set() if self.ignore_eos else set(eos_token_ids))
        if self.min_tokens and left <= ending:
            raise InvalidArgument(
                f"min_tokens={self.min_tokens} needs a token that does not end the sequence, but "
                "every id of allowed_token_ids left after bad words is a stop_token_id or EOS",
                field="min_tokens",
            )

    @property
    def constrained(self) -> bool:
        return bool(self.structured_kind)

    def _validate_beam_search(self) -> None:
        """What beam search cannot be combined with: it ranks hypotheses by the model's own
        log-probabilities (greedy, no truncation or penalty) and returns whole beams at the end."""
        if self.early_stopping not in (True, False, "never"):
            raise InvalidArgument(
                f'early_stopping must be true, false or "never", got {self.early_stopping!r}',
                field="early_stopping",
            )
        if not abs(self.length_penalty) <= MAX_LENGTH_PENALTY:  # NaN too
            raise InvalidArgument(
                f"length_penalty must be in [-{MAX_LENGTH_PENALTY:g}, {MAX_LENGTH_PENALTY:g}], got "
                f"{self.length_penalty:g} (a score divides by the length to this power)",
                field="length_penalty",
            )
        if self.constrained:
            raise InvalidArgument(
                "use_beam_search cannot be combined with structured output (response_format, "
                "structured_outputs, guided_*, or a tool_choice that constrains)",
                field="use_beam_search",
            )
        unsupported = (
            ("temperature", self.temperature != 0.0, "must be 0"),
            ("top_p", self.top_p != 1.0, "must be 1"),
            ("top_k", self.top_k not in (0, -1), "must be 0 or -1"),
            ("min_p", self.min_p != 0.0, "must be 0"),
            ("repetition_penalty", self.repetition_penalty != 1.0, "must be 1"),
            ("presence_penalty", self.presence_penalty != 0.0, "must be 0"),
            ("frequency_penalty", self.frequency_penalty != 0.0, "must be 0"),
            ("logprobs", self.logprobs is not None, "is not supported"),
            ("min_tokens", self.min_tokens != 0, "must be 0"),
            ("stop_token_ids", bool(self.stop_token_ids), "are not supported"),
            ("logit_bias", bool(self.logit_bias), "is not supported"),
            ("allowed_token_ids", bool(self.allowed_token_ids), "are not supported"),
            ("bad_words", bool(self.bad_words), "are not supported"),
            ("bad_words_token_ids", bool(self.bad_words_token_ids), "are not supported"),
        )
        for name, bad, rule in unsupported:
            if bad:
                raise InvalidArgument(
                    f"{name} {rule} with use_beam_search (got {getattr(self, name)!r})", field=name
                )

    @classmethod
    def from_proto(cls, msg) -> SamplingParams:  # msg: pagedserve.v1.SamplingParams
        """Proto to dataclass; unset optional fields take their non-zero defaults."""
        kind, spec = structured.from_proto(msg.structured) if msg.HasField("structured") else ("", "")
        return cls(
            max_tokens=msg.max_tokens if msg.max_tokens else 16,
            temperature=msg.temperature if msg.HasField("temperature") else 1.0,
            top_p=msg.top_p if msg.HasField("top_p") else 1.0,
            top_k=msg.top_k,
            min_p=msg.min_p,
            repetition_penalty=msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0,
            presence_penalty=msg.presence_penalty,
            frequency_penalty=msg.frequency_penalty,
            seed=msg.seed if msg.HasField("seed") else None,
            n=msg.n if msg.n else 1,
            stop_token_ids=list(msg.stop_token_ids),
            ignore_eos=msg.ignore_eos,
            logprobs=msg.logprobs if msg.HasField("logprobs") else None,
            min_tokens=msg.min_tokens,
            prompt_logprobs=msg.prompt_logprobs if msg.HasField("prompt_logprobs") else None,
            structured_kind=kind,
            structured_spec=spec,
            use_beam_search=msg.use_beam_search,
            length_penalty=msg.length_penalty if msg.HasField("length_penalty") else 1.0,
            early_stopping=early_stopping_from_proto(msg.early_stopping),
            logit_bias=dict(msg.logit_bias),
            allowed_token_ids=list(msg.allowed_token_ids),
            bad_words=list(msg.bad_words),
            bad_words_token_ids=[list(t.ids) for t in msg.bad_words_token_ids],
        )

    def to_proto(self):
        """Dataclass to `pagedserve.v1.SamplingParams` (every field set explicitly)."""
        from pagedserve.v1 import common_pb2

        msg = common_pb2.SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            n=self.n,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            use_beam_search=self.use_beam_search,
            length_penalty=self.length_penalty,
            early_stopping=early_stopping_to_proto(self.early_stopping),
            allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words,
            bad_words_token_ids=[common_pb2.TokenIds(ids=ids) for ids in self.bad_words_token_ids],
        )
        if self.seed is not None:
            msg.seed = self.seed
        if self.logprobs is not None:
            msg.logprobs = self.logprobs
        if self.prompt_logprobs is not None:
            msg.prompt_logprobs = self.prompt_logprobs
        if self.structured_kind:
            msg.structured.CopyFrom(structured.to_proto(self.structured_kind, self.structured_spec))
        if self.logit_bias:
            msg.logit_bias.update(self.logit_bias)
        return msg


def _check_in_vocabulary(field: str, token_ids: Iterable[int], vocab_size: int, what: str = "") -> None:
    """InvalidArgument naming `field` for the first id outside [0, vocab_size)."""
    for tid in token_ids:
        if not 0 <= tid < vocab_size:
            raise InvalidArgument(
                f"{field}: {what}{show(tid)} is outside the vocabulary [0, {vocab_size})", field=field
            )


def early_stopping_from_proto(value: int) -> bool | str:
    """A `pagedserve.v1.EarlyStopping` value as False, True or "never"; an unknown number (a
    client's newer or garbled enum) is an `InvalidArgument`, not an index error."""
    if not 0 <= value < len(EARLY_STOPPING_VALUES):
        raise InvalidArgument(
            f"early_stopping must be an EarlyStopping value (0 to {len(EARLY_STOPPING_VALUES) - 1}), got {value}",
            field="early_stopping",
        )
    return EARLY_STOPPING_VALUES[value]


def early_stopping_to_proto(value: bool | str) -> int:
    """True, False or "never" as the `pagedserve.v1.EarlyStopping` value."""
    return {False: 1, True: 2, "never": 3}[value]
