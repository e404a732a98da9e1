"""Decode attention for transformers models on the CPU: "fasq_sdpa", transformers' SDPA
attention with grouped-query heads packed as query rows for single-token steps, compiled or
not.

Why: at one query token, transformers' own "sdpa" packs the query heads of each key/value
head into rows ([B, H, 1, D] -> [B, H_kv, H / H_kv, D]) only when not compiling; under
torch.compile it repeats the keys and values per query head (`repeat_kv`) and runs 32
one-row problems. On the CPU that is the slow way: Llama-3.2-1B's shape, 2 threads, a cache
of 160, one layer's attention takes about 230 us repeated and 40 us packed, so compiled
decode of the 1B-shaped fasq model spent about 3.6 ms of a 19 ms token there (52.7 -> 62.2
tok/s with the heads packed; README, "Attention at decode"). Packing changes no result: the
same softmax over the same keys per query head, only laid out as rows.

Used by: loading a fasq checkpoint on the CPU (the HF quantizer's after-load step) and the
speed harness (`fasq.eval.speed`: `fasq bench` and the benchmarks), which gives the dense
models it times the same attention so comparisons stay like for like. FASQ_ATTENTION=sdpa
keeps transformers' own.

    use_decode_attention(model) -> bool     (whether the model now runs "fasq_sdpa")
    sdpa_packed(module, query, key, value, attention_mask, ...)   (the attention function)
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

NAME = "fasq_sdpa"


def sdpa_packed(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [B, H, T, D], key / value
    [B, H_kv, L, D], attention_mask [B, 1, T, L] (bool or additive) or None; returns
    ([B, T, H, D_v], None). One query token with grouped heads and a mask shared by the heads:
    the heads packed as rows of their key/value head; everything else: transformers' SDPA."""
    groups = getattr(module, "num_key_value_groups", 1)
    shared_mask = attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1)
    if (query.shape[2] != 1 or groups <= 1 or not shared_mask or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None or kwargs.get("output_attentions", False)):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    B, H, _, D = query.shape
    q = query.reshape(B, H // groups, groups, D)  # query head h = kv head h // groups, row h % groups
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.reshape(out.shape[0], H, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, sdpa_packed)  # idempotent: a dict entry


def enabled() -> bool:
    """Whether use_decode_attention switches models (FASQ_ATTENTION unset or not "sdpa")."""
    return os.environ.get("FASQ_ATTENTION", NAME).strip().lower() != "sdpa"


def use_decode_attention(model) -> bool:
    """Make a transformers model that runs transformers' "sdpa" attention run "fasq_sdpa" (the
    same results, faster single-token steps on the CPU); models on other attention
    implementations, or without the attention-function interface, keep theirs. Returns whether
    the model now runs "fasq_sdpa"."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == NAME:
        return True
    if current != "sdpa" or not enabled() or not hasattr(model, "set_attn_implementation"):
        return False
    _register()
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, NotImplementedError):  # a model class that takes no attention functions
        return False
    return model.config._attn_implementation == NAME
