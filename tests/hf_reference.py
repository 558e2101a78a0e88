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
