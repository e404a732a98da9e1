"""The transformers side of the vLLM comparisons: greedy tokens and logit margins."""

from __future__ import annotations

import torch

PROMPTS = ["The capital of France is", "Water boils at a temperature of", "def fibonacci(n):",
           "Once upon a time, in a small village,", "The three primary colors are"]


@torch.no_grad()
def greedy(model, tok, prompts: list[str], steps: int) -> tuple[list[list[int]], list[list[float]]]:
    """(tokens, margins) per prompt: `steps` greedy tokens (EOS ignored, as vLLM's ignore_eos)
    and at each step the logit gap between the best and second-best token."""
    tokens, margins = [], []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids  # [1, T]
        out = model(ids, use_cache=True)
        toks, gaps = [], []
        for _ in range(steps):
            logits = out.logits[0, -1].float()  # [vocab]
            top = torch.topk(logits, 2)
            toks.append(int(top.indices[0]))
            gaps.append(float(top.values[0] - top.values[1]))
            out = model(top.indices[:1][None], past_key_values=out.past_key_values, use_cache=True)
        tokens.append(toks)
        margins.append(gaps)
    return tokens, margins


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
