"""fasq's decode attention for transformers models ("fasq_sdpa", fasq.integrations.attention):
the same results as transformers' "sdpa" wherever it packs query heads (one token, grouped
heads), transformers' own function everywhere else; loaded fasq checkpoints and the speed
harness switch CPU models to it; FASQ_ATTENTION=sdpa keeps transformers'."""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from fasq.integrations import attention


class _Attn(torch.nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


def _inputs(B, H, Hkv, T, L, D, dtype, mask, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g).to(dtype)
    k, v = (torch.randn(B, Hkv, L, D, generator=g).to(dtype) for _ in range(2))
    keep = torch.rand(B, 1, T, L, generator=g) > 0.3
    keep[..., 0] = True  # every row attends somewhere
    m = {"none": None, "bool": keep,
         "additive": torch.zeros(B, 1, T, L, dtype=dtype).masked_fill(~keep, float("-inf"))}[mask]
    return q, k, v, m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", ["none", "bool", "additive"])
@pytest.mark.parametrize("B,H,Hkv,T,L", [(1, 32, 8, 1, 160), (2, 9, 3, 1, 37), (1, 4, 4, 1, 5), (1, 4, 2, 3, 11),
                                         (2, 8, 2, 17, 17)])
def test_same_results_as_transformers_sdpa(B, H, Hkv, T, L, mask, dtype):
    """One token with grouped heads (32/8 as Llama-3.2-1B, 9/3 as the default model): the
    heads packed as rows, within the dtype's rounding of transformers' result (its eager path
    packs them too, so fp32 agrees to float error); more tokens or no groups: transformers'
    function itself, bit for bit."""
    module = _Attn(H // Hkv)
    q, k, v, m = _inputs(B, H, Hkv, T, L, 64, dtype, mask)
    ref, _ = sdpa_attention_forward(module, q, k, v, m, scaling=0.125)
    out, weights = attention.sdpa_packed(module, q, k, v, m, scaling=0.125)
    assert weights is None and out.shape == (B, T, H, 64) == ref.shape and out.is_contiguous()
    if T > 1 or H == Hkv:
        assert torch.equal(out, ref)
    else:
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert float((out.float() - ref.float()).abs().max()) < tol
        # and the unpacked problem (every query head alone over its key/value head)
        rep = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float().repeat_interleave(H // Hkv, 1), v.float().repeat_interleave(H // Hkv, 1),
            attn_mask=m if m is None or m.dtype == torch.bool else m.float(), scale=0.125).transpose(1, 2)
        assert float((out.float() - rep).abs().max()) < tol


def test_compiles_without_graph_breaks():
    module = _Attn(4)
    q, k, v, m = _inputs(1, 8, 2, 1, 24, 16, torch.float32, "bool")
    fn = torch.compile(lambda q, k, v, m: attention.sdpa_packed(module, q, k, v, m, scaling=0.25)[0], fullgraph=True)
    assert torch.allclose(fn(q, k, v, m), attention.sdpa_packed(module, q, k, v, m, scaling=0.25)[0], atol=1e-6)


def test_models_switch_and_generate_the_same_tokens(tiny_llama, monkeypatch):
    """Greedy tokens equal transformers' sdpa's; the switch is idempotent, FASQ_ATTENTION=sdpa
    and other implementations are left as they are."""
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(0))
    tiny_llama.set_attn_implementation("sdpa")
    ref = tiny_llama.generate(ids, max_new_tokens=12, do_sample=False)
    monkeypatch.setenv("FASQ_ATTENTION", "sdpa")  # kept as transformers has it
    assert not attention.use_decode_attention(tiny_llama)
    assert tiny_llama.config._attn_implementation == "sdpa"
    monkeypatch.delenv("FASQ_ATTENTION")
    assert attention.use_decode_attention(tiny_llama) and attention.use_decode_attention(tiny_llama)
    assert tiny_llama.config._attn_implementation == attention.NAME
    from transformers import AttentionInterface

    calls = []
    counting = lambda *a, **k: calls.append(a[1].shape[2]) or attention.sdpa_packed(*a, **k)  # noqa: E731
    AttentionInterface.register(attention.NAME, counting)
    try:
        assert torch.equal(tiny_llama.generate(ids, max_new_tokens=12, do_sample=False), ref)
    finally:
        AttentionInterface.register(attention.NAME, attention.sdpa_packed)
    assert calls and set(calls) == {7, 1}  # the prompt, then single tokens, through it
    tiny_llama.set_attn_implementation("eager")  # other implementations are left alone
    assert not attention.use_decode_attention(tiny_llama)
    assert tiny_llama.config._attn_implementation == "eager"


def test_loaded_checkpoints_and_the_speed_harness_use_it(tiny_llama, tmp_path, monkeypatch):
    """A fasq checkpoint loaded on the CPU runs "fasq_sdpa" (FASQ_ATTENTION=sdpa: transformers'
    own), and so does every model the speed harness times, fasq's or dense."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from fasq.core.config import PQConfig, QuantConfig
    from fasq.eval import speed
    from fasq.io.checkpoint import save_quantized
    from fasq.stream.memory import quantize_model

    quantize_model(tiny_llama, QuantConfig(layer=PQConfig(d=2, K=16)), progress=False)
    save_quantized(tiny_llama, tmp_path / "ck")
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32)
    assert m.config._attn_implementation == attention.NAME
    monkeypatch.setenv("FASQ_ATTENTION", "sdpa")
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32)
    assert m.config._attn_implementation == "sdpa"
    monkeypatch.delenv("FASQ_ATTENTION")
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    dense.set_attn_implementation("sdpa")
    speed.DecodeRunner(dense, prompt_len=4, new_tokens=2)
    assert dense.config._attn_implementation == attention.NAME
