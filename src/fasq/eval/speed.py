"""Prefill and decode speed of a causal LM: one harness for every model and device.

Greedy decoding with a static KV cache (transformers' `StaticCache`), batch `batch`, a
prompt of `prompt_len` tokens, then `new_tokens` single-token steps; the decode step can
run under `torch.compile` (on a GPU with mode "reduce-overhead", i.e. CUDA graphs). The
same function times a fasq checkpoint and its uncompressed source, so their ratio is fair;
on the CPU both run the same attention ("fasq_sdpa", integrations/attention.py).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import asdict, dataclass

import torch

from ..integrations.attention import use_decode_attention


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


class DecodeRunner:
    """A model set up for timing: `run()` times one prefill and `new_tokens` greedy decode
    steps (a fresh static KV cache each time) and returns (prefill seconds, decode
    seconds). The first run of a compiled runner includes compilation: `warm_up()` first.

    prompt_ids: [L] token ids repeated over the batch (cut or tiled to prompt_len); random
    ids when None.
    """

    def __init__(self, model, prompt_ids: torch.Tensor | None = None, *, batch: int = 1, prompt_len: int = 128,
                 new_tokens: int = 64, compile: bool = False, seed: int = 0):
        if batch < 1 or prompt_len < 1 or new_tokens < 1:
            raise ValueError(f"batch, prompt_len and new_tokens must be >= 1 (got {batch}, {prompt_len}, "
                             f"{new_tokens})")
        self.model, self.batch, self.prompt_len, self.new_tokens, self.compiled = (
            model, batch, prompt_len, new_tokens, compile)
        self.device = next(model.parameters()).device
        if self.device.type == "cpu":
            # every model timed here (fasq's and the dense ones it is compared with) runs the same
            # attention: "fasq_sdpa" where the model ran transformers' "sdpa" (the same results;
            # loading a fasq checkpoint on the CPU switches it already)
            use_decode_attention(model)
        if prompt_ids is None:
            g = torch.Generator().manual_seed(seed)
            prompt_ids = torch.randint(0, model.config.vocab_size, (prompt_len,), generator=g)
        ids = prompt_ids.reshape(-1).repeat((prompt_len + prompt_ids.numel() - 1) // prompt_ids.numel())
        self.ids = ids[:prompt_len][None].expand(batch, prompt_len).to(self.device)
        self.dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        # newer transformers name the cache argument `cache` (and deprecate `past_key_values`)
        self.cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.decode = torch.compile(self.step, mode="reduce-overhead" if self.device.type == "cuda" else None,
                                    dynamic=False) if compile else self.step

    def step(self, tok, cache, pos):
        out = self.model(tok, **{self.cache_kw: cache}, cache_position=pos, use_cache=True)
        return out.logits[:, -1].argmax(-1)

    @torch.no_grad()
    def run(self, steps: int | None = None) -> tuple[float, float]:
        from transformers import StaticCache

        steps = self.new_tokens if steps is None else steps
        cache = StaticCache(config=self.model.config, max_cache_len=self.prompt_len + max(steps, self.new_tokens),
                            max_batch_size=self.batch, device=self.device, dtype=self.dtype)
        _sync(self.device)
        t0 = time.perf_counter()
        tok = self.step(self.ids, cache, torch.arange(self.prompt_len, device=self.device))[:, None]
        _sync(self.device)
        t1 = time.perf_counter()
        for i in range(steps):
            tok = self.decode(tok, cache, torch.tensor([self.prompt_len + i], device=self.device))[:, None]
        _sync(self.device)
        return t1 - t0, time.perf_counter() - t1

    def warm_up(self, steps: int = 3) -> None:
        """Compile (when compiled) and warm the allocator: a run of `steps` decode steps."""
        self.run(steps)

    def speed(self, runs: list[tuple[float, float]]) -> Speed:
        """The fastest prefill and the fastest decode of timed `runs` (a shared machine's
        slow spells only ever add time)."""
        prefill_s, decode_s = min(r[0] for r in runs), min(r[1] for r in runs)
        return Speed(prefill_tok_s=self.batch * self.prompt_len / prefill_s,
                     decode_tok_s=self.batch * self.new_tokens / decode_s, prefill_s=prefill_s, decode_s=decode_s,
                     batch=self.batch, prompt_len=self.prompt_len, new_tokens=self.new_tokens,
                     compiled=self.compiled)


def measure(model, prompt_ids: torch.Tensor | None = None, *, batch: int = 1, prompt_len: int = 128,
            new_tokens: int = 64, compile: bool = False, warmup_steps: int = 3, seed: int = 0,
            repeats: int = 1) -> Speed:
    """Time one prefill and `new_tokens` greedy decode steps (best of `repeats` runs, after
    a warm-up run of `warmup_steps` steps that also compiles)."""
    r = DecodeRunner(model, prompt_ids, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
                     compile=compile, seed=seed)
    r.warm_up(warmup_steps)
    return r.speed([r.run() for _ in range(max(1, repeats))])


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
