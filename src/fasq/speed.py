"""Prefill and decode speed of a causal LM: one harness for every model and device.

Greedy decoding with a static KV cache (transformers' `StaticCache`), batch `batch`, a
prompt of `prompt_len` tokens, then `new_tokens` single-token steps; the decode step can
run under `torch.compile` (on a GPU with mode "reduce-overhead", i.e. CUDA graphs). The
same function times a fasq checkpoint and its uncompressed source, so their ratio is fair.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class Speed:
    prefill_tok_s: float  # prompt tokens (all sequences) per second
    decode_tok_s: float  # generated tokens (all sequences) per second
    prefill_s: float
    decode_s: float
    batch: int
    prompt_len: int
    new_tokens: int
    compiled: bool

    def as_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(model, prompt_ids: torch.Tensor | None = None, *, batch: int = 1, prompt_len: int = 128,
            new_tokens: int = 64, compile: bool = False, warmup_steps: int = 3, seed: int = 0,
            repeats: int = 1) -> Speed:
    """Time one prefill and `new_tokens` greedy decode steps.

    prompt_ids: [L] token ids to repeat over the batch (cut or tiled to prompt_len); random
    ids when None. The first `warmup_steps` decode steps (compilation, allocator warm-up)
    and one prefill of the same length run before anything is timed. repeats: timed runs;
    the fastest prefill and the fastest decode are reported (a shared machine's slow
    spells only ever add time).
    """
    from transformers import StaticCache

    if batch < 1 or prompt_len < 1 or new_tokens < 1:
        raise ValueError(f"batch, prompt_len and new_tokens must be >= 1 (got {batch}, {prompt_len}, {new_tokens})")
    device = next(model.parameters()).device
    if prompt_ids is None:
        g = torch.Generator().manual_seed(seed)
        prompt_ids = torch.randint(0, model.config.vocab_size, (prompt_len,), generator=g)
    ids = prompt_ids.reshape(-1).repeat((prompt_len + prompt_ids.numel() - 1) // prompt_ids.numel())[:prompt_len]
    ids = ids[None].expand(batch, prompt_len).to(device)
    total = prompt_len + new_tokens + warmup_steps
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype

    # newer transformers name the cache argument `cache` (and deprecate `past_key_values`)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def step(tok, cache, pos):
        return model(tok, **{cache_kw: cache}, cache_position=pos, use_cache=True).logits[:, -1].argmax(-1)

    decode = torch.compile(step, mode="reduce-overhead" if device.type == "cuda" else None,
                           dynamic=False) if compile else step

    def run(steps: int) -> tuple[float, float]:
        cache = StaticCache(config=model.config, max_cache_len=total, max_batch_size=batch, device=device,
                            dtype=dtype)
        _sync(device)
        t0 = time.perf_counter()
        tok = step(ids, cache, torch.arange(prompt_len, device=device))[:, None]
        _sync(device)
        t1 = time.perf_counter()
        for i in range(steps):
            tok = decode(tok, cache, torch.tensor([prompt_len + i], device=device))[:, None]
        _sync(device)
        return t1 - t0, time.perf_counter() - t1

    run(warmup_steps)
    runs = [run(new_tokens) for _ in range(max(1, repeats))]
    prefill_s, decode_s = min(r[0] for r in runs), min(r[1] for r in runs)
    return Speed(prefill_tok_s=batch * prompt_len / prefill_s, decode_tok_s=batch * new_tokens / decode_s,
                 prefill_s=prefill_s, decode_s=decode_s, batch=batch, prompt_len=prompt_len,
                 new_tokens=new_tokens, compiled=compile)


def weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers as they sit in memory (fasq codes as
    unpacked in memory), tied tensors once."""
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        n += t.numel() * t.element_size()
    return n
