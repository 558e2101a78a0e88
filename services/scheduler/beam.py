"""Beam search's selection rule, per request: which beams go on, which hypotheses are kept.

Pure policy (no blocks, no executor): `BeamSearch.advance` takes one step's candidates of
every running beam at once and answers with the next beams. It reproduces the beam search of
`transformers` 5.x (`GenerationMixin._beam_search` and its helpers) for one prompt, with
`num_beams = num_return_sequences = width` and `do_sample=False`:

- Each running beam offers its best `num_candidates` next tokens by log_softmax of the raw
  logits; `num_candidates = max(2, 1 + number of EOS ids) * width`, so the best of all beams'
  candidates can be found without every beam's whole vocabulary. Candidates are ranked by
  beam score + token log-probability, and the best `num_candidates` of them are kept.
- A kept candidate "finishes" when its token is an EOS id or it reaches max_new_tokens.
- The next running beams are the best `width` kept candidates that did not finish.
- A finished candidate becomes a hypothesis only when it ranks among the best `width` kept
  candidates. Its score is its cumulative log-probability / (generated tokens, the EOS
  included) ** length_penalty. The `width` best hypotheses so far are kept; with
  early_stopping=True none is added once `width` are kept.
- After each step the search stops when (a) `width` hypotheses are kept and the best
  running beam's cumulative log-probability / L ** length_penalty is not above the worst
  kept score, L being the generated length so far, or max_new_tokens with
  early_stopping="never" and length_penalty > 0 (once true, it stays true); (b) with
  early_stopping=True, `width` hypotheses are kept; (c) every kept candidate finished
  (max_new_tokens reached).
- The answer is the kept hypotheses, best score first.
- Width 1 is greedy decoding, as `generate(num_beams=1)` is: the best candidate goes on, and
  ends the search when it is an EOS or the last of max_new_tokens (its score is still
  reported, with the length penalty).

Deviations: ties between equal scores are broken by (beam, token id) order, which
`torch.topk` does not promise; scores are summed in float64 from the executor's float32
log-probabilities (transformers sums in float32), so they agree to about 1e-5, not bitwise.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple


class Hypothesis(NamedTuple):
    score: float  # cumulative_logprob / len(token_ids) ** length_penalty
    cumulative_logprob: float
    token_ids: list[int]  # generated tokens, the EOS included when one ended it


class NextBeam(NamedTuple):
    parent: int  # index of the running beam it continues
    token_id: int
    cumulative_logprob: float


def num_candidates(width: int, num_eos: int) -> int:
    """Candidates each beam offers per step: enough that `width` beams can go on even when
    the best `width` candidates all end with an EOS."""
    return max(2, 1 + num_eos) * width


@dataclass(slots=True)
class BeamSearch:
    """One request's search state between steps (its running beams live in the scheduler)."""

    width: int
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    finished: list[Hypothesis] = field(default_factory=list)  # best first, at most `width`
    improvable: bool = True  # transformers' is_early_stop_heuristic_unsatisfied
    done: bool = False

    def advance(
        self,
        scores: Sequence[float],
        outputs: Sequence[Sequence[int]],
        candidates: Sequence[Sequence[tuple[int, float]]],
        eos_token_ids: Collection[int],
        max_new_tokens: int,
    ) -> list[NextBeam]:
        """One step. `scores[b]`, `outputs[b]` and `candidates[b]` (token id, logprob; best
        first) of each running beam b; every beam has generated the same number of tokens.
        Returns the next running beams, best first (none once `done`)."""
        width = self.width
        num_generated = len(outputs[0])
        new_len = num_generated + 1
        if width == 1:
            return self._greedy(scores[0], outputs[0], candidates[0][0], eos_token_ids, max_new_tokens)
        ranked = sorted(
            (
                (score + logprob, b, token)
                for b, (score, beam) in enumerate(zip(scores, candidates, strict=True))
                for token, logprob in beam
            ),
            key=lambda c: (-c[0], c[1], c[2]),
        )[: num_candidates(width, len(eos_token_ids))]
        at_max_len = new_len >= max_new_tokens
        ends = [at_max_len or token in eos_token_ids for _, _, token in ranked]

        running = [
            NextBeam(b, token, total) for (total, b, token), end in zip(ranked, ends, strict=True) if not end
        ]
        running = running[:width]

        full = len(self.finished) >= width
        if not (full and self.early_stopping is True) and self.improvable:
            new = [
                Hypothesis(total / new_len**self.length_penalty, total, [*outputs[b], token])
                for (total, b, token), end in zip(ranked[:width], ends[:width], strict=True)
                if end
            ]
            if new:
                # A stable sort: a kept hypothesis stays ahead of a new one with an equal score.
                self.finished = sorted(self.finished + new, key=lambda h: -h.score)[:width]

        if len(self.finished) >= width and running:
            if self.early_stopping == "never" and self.length_penalty > 0.0:
                best_len = max_new_tokens
            else:
                best_len = new_len
            best_possible = running[0].cumulative_logprob / best_len**self.length_penalty
            self.improvable = self.improvable and best_possible > self.finished[-1].score
        self.done = (
            not self.improvable or (self.early_stopping is True and len(self.finished) >= width) or all(ends)
        )
        return [] if self.done else running

    def _greedy(
        self,
        score: float,
        output: Sequence[int],
        best: tuple[int, float],
        eos_token_ids: Collection[int],
        max_new_tokens: int,
    ) -> list[NextBeam]:
        token, logprob = best
        total, new_len = score + logprob, len(output) + 1
        if token in eos_token_ids or new_len >= max_new_tokens:
            self.finished = [Hypothesis(total / new_len**self.length_penalty, total, [*output, token])]
            self.done = True
            return []
        return [NextBeam(0, token, total)]
