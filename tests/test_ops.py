import pytest
import torch

from fasq.core import ops

# (out, in, d, K, C, S, offsets) covering every scope and scale layout, odd sizes included
CASES = [
    (1, 8, 2, 4, 1, 0, False),
    (37, 48, 2, 16, 1, 1, False),      # matrix scope, per-row scales
    (37, 48, 4, 16, 3, 4, True),       # group scope (4 subspaces each), grouped scales + offsets
    (5, 24, 8, 64, 3, 0, False),       # subspace scope, no scales
    (19, 72, 1, 16, 1, 9, True),       # RTN-like: d=1, groups of 8 with offsets
    (33, 96, 4, 4096, 1, 2, False),    # K larger than 256 (int16 codes)
]


def _layer(out, inn, d, K, C, S, off, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, K, (out, inn // d), generator=g).to(ops.code_dtype(K))
    cb = torch.randn(C, K, d, generator=g).half()
    scales = (torch.rand(out, S, generator=g) + 0.5).half() if S else None
    offsets = torch.randn(out, S, generator=g).half() if off else None
    return codes, cb, scales, offsets


def _dense_ref(x, codes, cb, scales, offsets, bias):
    """float64 oracle built independently of ops.dequantize: loop over subspaces."""
    out, M = codes.shape
    C, K, d = cb.shape
    W = torch.empty(out, M * d, dtype=torch.float64)
    for m in range(M):
        W[:, m * d:(m + 1) * d] = cb[m // (M // C)].double()[codes[:, m].long()]
    if scales is not None:
        G = M * d // scales.shape[1]
        W = W * scales.double().repeat_interleave(G, 1)
        if offsets is not None:
            W = W + offsets.double().repeat_interleave(G, 1)
    y = x.double() @ W.T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("tokens", [1, 3, 17])
@pytest.mark.parametrize("bias", [False, True])
def test_dequant_and_lut_agree_with_oracle(case, tokens, bias):
    codes, cb, scales, offsets = _layer(*case)
    out, inn = case[0], case[1]
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, inn, generator=g)
    b = torch.randn(out, generator=g) if bias else None
    ref = _dense_ref(x, codes, cb, scales, offsets, b)
    for fn in (ops.pq_linear_dequant, ops.pq_linear_lut):
        y = fn(x, codes, cb, scales, offsets, b)
        assert y.shape == (tokens, out) and y.dtype == torch.float32
        rel = ((y.double() - ref).norm() / ref.norm()).item()
        assert rel < 1e-6, (fn.__name__, rel)


def test_lut_chunking_and_leading_dims(monkeypatch):
    codes, cb, scales, offsets = _layer(*CASES[2])
    x = torch.randn(2, 5, 48)
    full = ops.pq_linear_lut(x, codes, cb, scales, offsets)
    monkeypatch.setattr(ops, "_LUT_CHUNK_ELEMS", 1)  # one token per chunk
    assert torch.equal(ops.pq_linear_lut(x, codes, cb, scales, offsets), full)
    assert full.shape == (2, 5, 37)
    torch.testing.assert_close(full, ops.pq_linear_dequant(x, codes, cb, scales, offsets), rtol=1e-5, atol=1e-5)


def test_identity_input_returns_the_dequantized_weight():
    codes, cb, scales, offsets = _layer(*CASES[1])
    W = ops.dequantize(codes, cb, scales, offsets, dtype=torch.float32)
    y = torch.ops.fasq.pq_linear(torch.eye(48), codes, cb, scales, offsets, None)
    assert torch.equal(y, W.T)


def test_custom_op_matches_reference_and_passes_opcheck():
    codes, cb, scales, offsets = _layer(*CASES[2])
    x, b = torch.randn(3, 48), torch.randn(37)
    y = torch.ops.fasq.pq_linear(x, codes, cb, scales, offsets, b)  # on the CPU: the CPU kernel
    torch.testing.assert_close(y, ops.pq_linear_dequant(x, codes, cb, scales, offsets, b), rtol=1e-5, atol=1e-5)
    torch.library.opcheck(ops.pq_linear, (x, codes, cb, scales, offsets, b),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    torch.library.opcheck(ops.pq_linear, (x, codes, cb, None, None, None),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_traces_the_op(monkeypatch):
    monkeypatch.setenv("FASQ_CPU_INT8", "0")  # the exact CPU kernel (the int8 one rounds; test_cpu_int8.py)
    codes, cb, scales, offsets = _layer(*CASES[1])
    x = torch.randn(4, 48)
    f = torch.compile(lambda x: torch.ops.fasq.pq_linear(x, codes, cb, scales, offsets, None), backend="eager",
                      fullgraph=True)
    torch.testing.assert_close(f(x), ops.pq_linear_dequant(x, codes, cb, scales, offsets))
