"""The answer every token-identity test compares against: transformers' own greedy `generate`.

Importable from any test package (the root conftest puts tests/ on sys.path).
"""

from __future__ import annotations

from pathlib import Path


def reference_greedy(
    model_path: str | Path, prompts: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """transformers' greedy `generate`, one unpadded prompt at a time, never stopping at EOS."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])  # [1, P]
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            outputs.append(out[0, len(prompt) :].tolist())
    return outputs


def reference_prompt_logprobs(model_path: str | Path, prompt: list[int]):
    """transformers' log_softmax of the logits at every prompt position: `[P - 1, V]` float32,
    row i is prompt token i + 1's distribution (the last position's, for sampling, is left out)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, :-1].float()  # [P - 1, V]
    return logits.log_softmax(dim=-1)


def reference_beams(
    model_path: str | Path,
    prompt: list[int],
    num_beams: int,
    max_new_tokens: int,
    *,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    eos_token_id: int | list[int] | None = None,
) -> list[tuple[list[int], float | None]]:
    """transformers' beam search (`num_return_sequences = num_beams`): (generated ids, the
    EOS included when one ended it, and sequences_scores) per returned beam, best first.
    `eos_token_id` None: no EOS at all (the search runs to max_new_tokens). With one beam
    transformers decodes greedily and has no score: it is given as None."""
    import torch
    from transformers import AutoModelForCausalLM

    eos_ids = (
        [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
    )
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])  # [1, P]
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            num_return_sequences=num_beams,
            do_sample=False,
            **({"length_penalty": length_penalty, "early_stopping": early_stopping} if num_beams > 1 else {}),
            eos_token_id=eos_token_id,
            pad_token_id=eos_ids[0] if eos_ids else 0,
            return_dict_in_generate=True,
            output_scores=True,
        )
    if num_beams == 1:
        tokens = out.sequences[0, len(prompt) :].tolist()
        ends = [i for i, t in enumerate(tokens) if t in eos_ids]
        if ends:
            tokens = tokens[: ends[0] + 1]
        return [(tokens, None)]
    beams = []
    for row, indices, score in zip(out.sequences, out.beam_indices, out.sequences_scores, strict=True):
        length = int((indices != -1).sum())  # the generated length of this hypothesis
        beams.append((row[len(prompt) : len(prompt) + length].tolist(), float(score)))
    return beams
