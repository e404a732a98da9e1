"""Perplexity over non-overlapping windows (the GPTQ / AWQ WikiText-2 protocol)."""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, seqlen: int = 2048, windows: int | None = None,
               progress: bool = True) -> dict:
    """exp(mean next-token NLL) over the first `windows` windows of `seqlen` tokens.

    input_ids: [N] the tokenized evaluation text. Every window is scored on its own
    (no context carried over); each predicts seqlen - 1 tokens.
    """
    if seqlen < 2:
        raise ValueError(f"window length must be >= 2 tokens, got {seqlen}")
    available = input_ids.numel() // seqlen
    if available == 0:
        raise ValueError(f"the text has {input_ids.numel()} tokens, fewer than one window of {seqlen}")
    n = available if windows is None else windows
    if not 1 <= n <= available:
        raise ValueError(f"asked for {windows} windows but the text holds {available} of {seqlen} tokens")
    device = next(model.parameters()).device
    nll, count, t0 = 0.0, 0, time.perf_counter()
    for i in tqdm(range(n), desc="perplexity", unit="window", disable=not progress):
        ids = input_ids[i * seqlen:(i + 1) * seqlen].to(device)[None]
        logits = model(ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        nll += loss.item()
        count += seqlen - 1
    return {"perplexity": math.exp(nll / count), "windows": n, "tokens": n * seqlen,
            "seqlen": seqlen, "seconds": time.perf_counter() - t0}


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids[0]
