"""fasq::dense_linear and the CPU's bf16 decode kernel for the layers a fasq model keeps
dense (fasq.kernels.cpu.dense, csrc/dense_cpu_bf16.cpp), against the float64 result.

The kernel sums exact bf16 products in fp32 and rounds once to bf16, so it must lie within
half a bf16 ulp of the exact result plus fp32 summation error: |y - ref| <= 2^-8 |ref| +
in * 2^-23 * sum_j |x_j w_j| (derived, not tuned). Shapes cross the 4-row blocks (with a
partial last one), the 32-column steps (masked tails) and the threading size; token counts
1, 2, 3, 6, 16, 17 (passes of 4 and a partial one); 2 threads; outputs poisoned with NaN.
Every instruction-set cap is forced: below "avx512" the kernel is absent and the op must be
torch's F.linear.
"""

import pytest
import torch
from torch import nn

from fasq.core import ops
from fasq.core.module import DenseLinear, use_dense_op
from fasq.kernels import dispatch
from fasq.kernels.cpu import dense, library as cpu

# (out, in): a single row; partial 4-row blocks and 32-column tails; threaded (>= 65536 weights)
SHAPES = [(1, 1), (1, 64), (5, 31), (7, 33), (64, 96), (300, 577), (4099, 64), (258, 2048)]
TOKENS = [1, 2, 3, 6, 16, 17]


pytestmark = pytest.mark.usefixtures("two_threads")  # conftest.py: kernels run with 2 threads


def _kernel_or_skip():
    assert cpu.load_library() is not None, cpu._lib_error
    if not dense.available():
        pytest.skip("this CPU lacks AVX-512 BF16: the kernel is absent (the fallback is tested below)")


def _data(out, inn, T, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g).bfloat16()
    x = torch.randn(T, inn, generator=g).bfloat16()
    b = torch.randn(out, generator=g).bfloat16() if bias else None
    return x, w, b


def _excess(y, x, w, b):
    """How far y lies beyond the bound (<= 0: within it)."""
    ref = x.double() @ w.double().T + (0 if b is None else b.double())
    mag = x.double().abs() @ w.double().abs().T
    bound = 2.0 ** -8 * ref.abs() + x.shape[-1] * 2.0 ** -23 * mag + 1e-30
    return ((y.double() - ref).abs() - bound).max().item()


def _within_bound(y, x, w, b):
    assert torch.isfinite(y).all()
    assert _excess(y, x, w, b) <= 0, f"max excess {_excess(y, x, w, b):.3g}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_kernel_matches_the_exact_result(shape, T, bias):
    _kernel_or_skip()
    x, w, b = _data(*shape, T, bias)
    out = torch.full((T, shape[0]), float("nan"), dtype=torch.bfloat16)
    y = dense.linear(x, w, b, out=out)
    assert y.data_ptr() == out.data_ptr()
    _within_bound(y, x, w, b)


def test_the_bound_catches_a_dropped_column():
    """The threshold is tight enough to fail a kernel that skipped the last (masked) column."""
    _kernel_or_skip()
    x, w, _ = _data(64, 33, 3, False)
    w0 = w.clone()
    w0[:, -1] = 0
    assert _excess(dense.linear(x, w0), x, w, None) > 0


def test_leading_dims_and_noncontiguous_input():
    _kernel_or_skip()
    x, w, b = _data(100, 96, 6, True)
    xs = x.reshape(2, 3, 96)
    y = dense.linear(xs, w, b)
    assert y.shape == (2, 3, 100)
    _within_bound(y.reshape(6, 100), x, w, b)
    xt = torch.randn(96, 3).bfloat16().T  # [3, 96], not contiguous
    torch.testing.assert_close(dense.linear(xt, w, b), dense.linear(xt.contiguous(), w, b), rtol=0, atol=0)


def test_bad_calls_are_clear_errors():
    _kernel_or_skip()
    x, w, _ = _data(8, 32, 1, False)
    with pytest.raises(ValueError, match="features"):
        dense.linear(x[:, :16], w)
    with pytest.raises(ValueError, match="bf16"):
        dense.linear(x.float(), w)
    with pytest.raises(ValueError, match="out must be"):
        dense.linear(x, w, out=torch.empty(1, 7, dtype=torch.bfloat16))


def _op(x, w, b):
    return ops.dense_linear(x, w, b)


def test_op_takes_the_kernel_for_decode_and_torch_otherwise(monkeypatch):
    _kernel_or_skip()
    calls = []
    real = dense.linear
    monkeypatch.setattr(dense, "linear", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    for T in range(1, dispatch.CPU_DENSE_MAX_TOKENS + 1):  # decode: the kernel
        x, w, b = _data(40, 64, T, True)
        torch.testing.assert_close(_op(x, w, b), real(x, w, b), rtol=0, atol=0)
    assert len(calls) == dispatch.CPU_DENSE_MAX_TOKENS
    calls.clear()
    x, w, b = _data(40, 64, dispatch.CPU_DENSE_MAX_TOKENS + 1, True)  # prefill: torch
    torch.testing.assert_close(_op(x, w, b), nn.functional.linear(x, w, b), rtol=0, atol=0)
    x, w, b = _data(40, 64, 1, True)
    torch.testing.assert_close(_op(x.float(), w.float(), b.float()),  # fp32: torch
                               nn.functional.linear(x.float(), w.float(), b.float()), rtol=0, atol=0)
    wt = torch.randn(64, 40).bfloat16().T  # [40, 64], not contiguous: torch (no copy of W per call)
    torch.testing.assert_close(_op(x, wt, b), nn.functional.linear(x, wt, b), rtol=0, atol=0)
    with dense.use_torch():
        torch.testing.assert_close(_op(x, w, b), nn.functional.linear(x, w, b), rtol=0, atol=0)
    monkeypatch.setenv("FASQ_CPU_DENSE", "0")
    torch.testing.assert_close(_op(x, w, b), nn.functional.linear(x, w, b), rtol=0, atol=0)
    assert calls == []


@pytest.mark.parametrize("isa", cpu.ISAS)
def test_every_instruction_set_cap(isa):
    assert cpu.load_library() is not None, cpu._lib_error
    x, w, b = _data(300, 577, 3, True)
    with cpu.limit_isa(isa):
        y = _op(x, w, b)
        if isa != "avx512" or not dense.available():
            assert not dense.available()
            torch.testing.assert_close(y, nn.functional.linear(x, w, b), rtol=0, atol=0)
            if cpu.load_library().fasq_cpu_bf16_available() == 0:
                with pytest.raises(RuntimeError, match="unavailable"):
                    dense.linear(x, w, b)
        else:
            _within_bound(y, x, w, b)


def test_torch_compile_traces_the_op():
    x, w, b = _data(40, 64, 1, True)
    torch.library.opcheck(ops.dense_linear, (x, w, b), test_utils=("test_schema", "test_faketensor"))
    f = torch.compile(lambda x: ops.dense_linear(x, w, b), backend="eager", fullgraph=True)
    torch.testing.assert_close(f(x), _op(x, w, b), rtol=0, atol=0)


def test_dense_linear_module_keeps_ties_state_and_training(tiny_llama):
    model = tiny_llama.to(torch.bfloat16)
    keys = list(model.state_dict())
    head, emb = model.lm_head, model.model.embed_tokens
    assert use_dense_op(model) == 15  # 7 projections a layer x 2, and the head
    assert type(model.lm_head) is DenseLinear and model.lm_head is head
    assert model.lm_head.weight is emb.weight  # the tie holds
    assert list(model.state_dict()) == keys
    assert use_dense_op(model) == 0  # already done
    x = torch.randn(2, 64).bfloat16()
    with torch.no_grad():
        torch.testing.assert_close(head(x), _op(x, head.weight, None), rtol=0, atol=0)
    # with gradients wanted it is nn.Linear's own forward (the op has no autograd formula)
    y = head(x.float().requires_grad_().bfloat16())
    y.float().sum().backward()
    assert head.weight.grad is not None


def test_loaded_checkpoint_routes_its_head_through_the_op(tiny_llama, tmp_path, monkeypatch):
    from fasq.core.config import PQConfig, QuantConfig
    from fasq.core.module import PQLinear
    from fasq.io.checkpoint import load_quantized, save_quantized
    from fasq.stream.memory import quantize_model

    quantize_model(tiny_llama, QuantConfig(layer=PQConfig(d=2, K=16)), progress=False)
    save_quantized(tiny_llama, tmp_path / "ck")
    m = load_quantized(tmp_path / "ck", dtype=torch.bfloat16)
    assert type(m.lm_head) is DenseLinear and m.lm_head.weight is m.model.embed_tokens.weight
    assert isinstance(m.model.layers[0].mlp.up_proj, PQLinear)
    seen = []
    real = ops.dense_linear_reference
    monkeypatch.setattr(dense.ops, "dense_linear_reference", lambda *a: seen.append(a[0].shape) or real(*a))
    ids = torch.randint(0, 256, (1, 1), generator=torch.Generator().manual_seed(0))  # one decode token
    with torch.no_grad():
        with dense.use_torch():
            ref = m(ids).logits
        assert seen == [(1, 1, 64)]  # the head went through the op (here to torch's matmul)
        y = m(ids).logits
    if dense.available():
        assert len(seen) == 1  # the kernel, not torch
        torch.testing.assert_close(y, ref, rtol=2 ** -7, atol=1e-2)
    else:
        assert len(seen) == 2 and torch.equal(y, ref)
