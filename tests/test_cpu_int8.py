"""The int8 CPU decode kernel (fasq.kernels.cpu.int8) against two oracles.

1. An emulation of its arithmetic in float64: codebooks rounded to int8 with one step per
   codebook (max |value| / 127), activations rounded to int8 per block of 16 columns inside
   each (codebook, scale group) run (its last block 8 when the run is an odd multiple of 8),
   products summed exactly. The kernel must match it to
   float32 accumulation error: a wrong lookup, lane, block or scale shows up at once.
2. The exact float64 result: the emulation must lie within the bound that int8 rounding
   allows, sum_j |scale| * (|x_j| * dc / 2 + (|v_j| + dc / 2) * dx_b / 2) (dc, dx_b: the
   codebook's and the activation block's steps), so the threshold is derived, not tuned.

Every instruction-set cap is forced: "avx512" runs the AVX-512 VBMI kernels on every format,
"avx2" the AVX2 kernels on K <= 16 and RTN 8-bit (vpshufb lookups, vpmaddubsw products; d=2
K=64 / 256 must then run the exact float kernel), "portable" the exact float kernel; token
counts 1, 2, 3, 6, 16 (and 17: two passes of 8, or four of 4 on AVX2, plus one),
shapes crossing several 16-row blocks (with padding) and large enough to start the
threads, run with 2 threads. Outputs are poisoned with NaN first.
"""

import pytest
import torch

from fasq.core import ops
from fasq.core.config import RTNConfig
from fasq.quant.quantize import quantize_rtn
from fasq.kernels.cpu import library as cpu, int8 as cpu_int8, linear as cpu_linear, torch_ops
from fasq.kernels import dispatch

from test_ops import _layer

BCOLS = 16  # columns per activation block inside a run (csrc/pq_cpu_int8.cpp; a run's last one may be 8)
# (out, in, d, K, C, S, offsets): several row blocks with a partial last one, K above and
# below 128 (two lookups and a blend, or one), scale groups, offsets, no scales; d=1 K<=16
# (two codes a byte, vpermb lookups)
CASES = [
    (200, 768, 2, 256, 4, 8, False),    # 153600 weights: threaded; runs of 48 subspaces
    (37, 2048, 2, 256, 8, 16, True),    # 3 row blocks, partial; runs of 64 with offsets
    (130, 576, 2, 64, 3, 6, False),     # the default model's width, K = 64
    (64, 1024, 2, 16, 2, 4, True),      # a 16-entry codebook
    (48, 520, 2, 256, 1, 1, False),     # one run of 260 subspaces
    (96, 1024, 2, 256, 4, 0, False),    # no scales
    (200, 768, 1, 16, 6, 8, False),     # d=1 K=16, threaded; runs cut at 96 and 128 columns
    (37, 2048, 1, 16, 16, 16, True),    # d=1, partial row block, offsets
    (130, 576, 1, 8, 3, 6, False),      # d=1 K=8 (codes 0..7 in the low halves' 3 bits)
    (48, 520, 1, 16, 1, 0, False),      # d=1, one run of 520 columns, no scales
    # runs of 24 / 120 columns: each ends in an 8-column activation block, then the next run
    (50, 120, 2, 256, 5, 5, True),
    (50, 120, 1, 16, 5, 5, False),
    (200, 1560, 2, 256, 13, 13, False),  # threaded
    (100, 1024, 2, 100, 4, 8, False),   # 64 < K <= 128: one table half (or two quarters), threaded
]
# (out, in, bits, group_size): RTN layers (a grid codebook 0..K-1, a scale and a minimum
# per group), quantized from random weights by fasq.quant.quantize
RTN_CASES = [(150, 1024, 4, 64), (37, 2048, 4, 128), (64, 576, 4, 0), (48, 512, 2, 32),
             (150, 1024, 8, 64), (37, 576, 8, 0)]  # 8 bits: the codes are the values (no lookup)


pytestmark = pytest.mark.usefixtures("two_threads")  # conftest.py: kernels run with 2 threads


@pytest.fixture(params=cpu.ISAS)
def isa(request):
    assert cpu.load_library() is not None, cpu._lib_error
    with cpu.limit_isa(request.param):
        yield request.param


def _make(case, seed=0):
    if len(case) == 4:  # RTN
        out, inn, bits, group = case
        W = torch.randn(out, inn, generator=torch.Generator().manual_seed(seed))
        q = quantize_rtn(W, RTNConfig(bits=bits, group_size=group))
        return q["codes"], q["codebooks"].float(), q["scales"].float(), q["offsets"].float()
    out, inn, d, K, C, S, with_offsets = case
    codes, cb, scales, offsets = _layer(out, inn, d, K, C, max(S, 1), with_offsets, seed)
    return codes, cb.float(), (scales.float() if S else None), (offsets.float() if with_offsets else None)


def _runs(M, C, S):
    span, gsub = M // C, (M // S if S else M)
    m, runs = 0, []
    while m < M:
        end = min((m // span + 1) * span, (m // gsub + 1) * gsub)
        runs.append((m, end, m // span, m // gsub))
        m = end
    return runs


def _int8_codebooks(cb):
    """(int8 values, step per codebook) as the kernel copies them: step = max |value| / 127
    (fp32), or 1 where every value is an integer in [-127, 127] (then the copy is exact);
    RTN's 8-bit grid 0..255 is used as it is (unsigned bytes, step 1)."""
    C, K, d = cb.shape
    if d == 1 and K == 256 and torch.equal(cb, torch.arange(256.0).view(1, 256, 1).expand(C, -1, -1)):
        return cb.clone(), torch.ones(C)
    amax = cb.abs().amax(dim=(1, 2))
    integral = ((cb == cb.round()).flatten(1).all(1)) & (amax <= 127)
    step = torch.where(integral, torch.ones(C), (amax / 127).where(amax > 0, torch.ones(C)))
    return (cb / step[:, None, None]).round().clamp(-127, 127), step


def _centre(cb, q_cb, step_c, offsets) -> float:
    """The centre the kernel takes out of the dot products (and adds back through the
    offsets): with offsets, codebooks copied exactly whose values are >= 0 with one common
    midpoint (RTN's grid 0..K-1: (K - 1) / 2); else 0."""
    exact = bool((step_c == 1).all()) and torch.equal(q_cb, cb)
    mids = (cb.amin(dim=(1, 2)) + cb.amax(dim=(1, 2))) / 2
    if offsets is None or not exact or bool((cb < 0).any()) or not bool((mids == mids[0]).all()):
        return 0.0
    return float(mids[0])


def _emulate(x, codes, cb, scales, offsets):
    """(the int8 arithmetic in float64, the int8 rounding bound) for x [T, in] fp32."""
    T, inn = x.shape
    out, M = codes.shape
    C, K, d = cb.shape
    S = scales.shape[1] if scales is not None else 0
    q_cb, step_c = _int8_codebooks(cb)
    z = _centre(cb, q_cb, step_c, offsets)
    y = torch.zeros(T, out, dtype=torch.float64)
    bound = torch.zeros(T, out, dtype=torch.float64)
    s64 = scales.double() if scales is not None else torch.ones(out, 1, dtype=torch.float64)
    for m0, m1, c, g in _runs(M, C, S):
        sub = codes[:, m0:m1].long()
        v_hat = (q_cb[c][sub].double() * float(step_c[c])).reshape(out, -1) - z  # [out, columns]
        v = cb[c][sub].double().reshape(out, -1) - z
        acc = torch.zeros(T, out, dtype=torch.float64)
        err = torch.zeros(T, out, dtype=torch.float64)
        for b0 in range(0, (m1 - m0) * d, BCOLS):
            b1 = min(b0 + BCOLS, (m1 - m0) * d)  # a run's last block may be 8 columns
            xb = x[:, m0 * d + b0:m0 * d + b1]
            amax = xb.abs().amax(dim=1, keepdim=True)
            inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))  # fp32, as C
            dx = (amax / 127).double()  # the block's step, fp32 as in C
            x_hat = (xb * inv).round().double() * dx
            vb, vhb = v[:, b0:b1], v_hat[:, b0:b1]
            acc += x_hat @ vhb.T
            # (v, v_hat centred by z) |v x - v_hat x_hat| <= |x| |v - v_hat| + (|v| + |v - v_hat|) dx / 2, over the
            # block, with |v - v_hat| <= dc / 2 (0 for an exact copy)
            dc = float(step_c[c]) if not bool((vhb == vb).all()) else 0.0
            err += xb.double().abs().sum(1, keepdim=True) * dc / 2 + dx / 2 * (vb.abs() + dc / 2).sum(1)[None, :]
        y += acc * s64[:, g][None, :]
        bound += err * s64[:, g].abs()[None, :]
        if offsets is not None:
            y += x[:, m0 * d:m1 * d].double().sum(1, keepdim=True) * (offsets[:, g].double() + z * s64[:, g])[None, :]
    return y, bound


def _exact(x, codes, cb, scales, offsets):
    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    return ops.pq_linear_dequant(x.double(), codes, cb.double(), d64(scales), d64(offsets))


def _scale(x, codes, cb, scales, offsets):
    """max over outputs of sum |x| |W|: the size a float32 sum's rounding error follows."""
    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    W = ops.dequantize(codes, cb.double(), d64(scales), d64(offsets), dtype=torch.float64).abs()
    return float((x.double().abs() @ W.T).max())


@pytest.mark.parametrize("case", CASES + RTN_CASES, ids=lambda c: ("rtn" if len(c) == 4 else "") + "x".join(map(str, c)))
@pytest.mark.parametrize("tokens", [1, 2, 3, 6, 16, 17])
def test_int8_kernel_matches_its_emulation_and_the_rounding_bound(case, tokens, isa):
    codes, cb, scales, offsets = _make(case)
    x = torch.randn(tokens, case[1], generator=torch.Generator().manual_seed(tokens))
    x[:, 5] *= 20  # an outlier column, as in LLM activations
    out = torch.full((tokens, case[0]), float("nan"))
    y = cpu_int8.gemv(x, codes, cb, scales, offsets, out=out)
    assert y.data_ptr() == out.data_ptr() and not y.isnan().any()
    exact, mag = _exact(x, codes, cb, scales, offsets), _scale(x, codes, cb, scales, offsets)
    if not cpu_int8.available(cb.shape[2], cb.shape[1]):
        assert isa == "portable" or cpu_int8.isa() != "avx512"  # AVX2 lacks only d=2 K > 16
        assert cpu_int8.prepared(codes, cb, scales, offsets, None) is None
        assert float((y.double() - exact).abs().max()) < 2e-6 * mag  # the exact float kernel ran
        return
    emu, bound = _emulate(x, codes, cb, scales, offsets)
    assert float((y.double() - emu).abs().max()) < 2e-6 * mag
    assert bool(((emu - exact).abs() <= bound + 1e-9 * mag).all())
    assert float((y.double() - exact).abs().max()) > 1e-7 * mag  # it is the int8 path, not the float one


@pytest.mark.parametrize("case", [c for c in CASES if c[2] == 2 and c[3] > 64], ids=lambda c: "x".join(map(str, c)))
def test_both_lookups_give_the_same_result(case):
    """d=2 layers with 64 < K <= 256 look their codes up by vpermi2b (128-entry halves) or by
    vpermb (64-entry quarters): the same bytes either way, so the same result, bit for bit,
    and both match the emulation."""
    if cpu_int8.isa() != "avx512":
        pytest.skip("no AVX-512 VBMI/VNNI here")
    codes, cb, scales, offsets = _make(case)
    for tokens in (1, 3, 16):
        x = torch.randn(tokens, case[1], generator=torch.Generator().manual_seed(tokens))
        ys = []
        for how in cpu_int8.LOOKUPS:
            with cpu_int8.use_lookup(how):
                assert cpu_int8.lookup() == how
                ys.append(cpu_int8.gemv(x, codes, cb, scales, offsets, out=torch.full((tokens, case[0]), float("nan"))))
        emu, _ = _emulate(x, codes, cb, scales, offsets)
        mag = _scale(x, codes, cb, scales, offsets)
        assert torch.equal(ys[0], ys[1])
        assert float((ys[0].double() - emu).abs().max()) < 2e-6 * mag


def test_lookup_switch():
    if cpu.load_library() is None:
        pytest.skip(cpu._lib_error)
    before = cpu_int8.lookup()
    assert before in cpu_int8.LOOKUPS
    with pytest.raises(ValueError, match="unknown lookup 'vpshufb'"):
        with cpu_int8.use_lookup("vpshufb"):
            pass
    with cpu_int8.use_lookup("vpermi2b" if before == "vpermb" else "vpermb"):
        assert cpu_int8.lookup() != before
    assert cpu_int8.lookup() == before


# sub-matrices sharing their input, as a merged layer holds them: different heights, formats
# (d=2 K=256 with offsets, threaded; d=2 K=64 cut differently; d=2 K=16 without scales; RTN
# 4-bit: d=1 nibbles), so no two share x's quantization
PARTS = [(200, 768, 2, 256, 4, 8, True), (37, 768, 2, 64, 3, 6, True), (48, 768, 2, 16, 2, 0, False), (64, 768, 4, 64)]
# parts that cut x into the same runs (as q, k and v usually do): x quantized once for all
SHARED = [(200, 768, 2, 256, 4, 8, True), (37, 768, 2, 64, 4, 8, True), (64, 768, 2, 256, 4, 8, True)]


def _parts_op(x, parts):
    return torch.ops.fasq.pq_linear_parts(x, *[list(t) for t in zip(*parts)])


@pytest.mark.parametrize("layers", [PARTS, SHARED], ids=["own-cuts", "shared-cut"])
@pytest.mark.parametrize("tokens", [1, 3, 16, 17])
def test_parts_in_one_call_equal_the_parts_one_by_one(tokens, layers, isa, monkeypatch):
    """fasq::pq_linear_parts: one int8 call for every part at decode (bit for bit the parts'
    own calls: the same arithmetic per row block), part by part elsewhere (17 tokens: the
    dequantize path; below "avx512": the exact kernel), always [..., sum of heights]."""
    parts = [_make(c, seed=i) for i, c in enumerate(layers)]
    x = torch.randn(tokens, 768, generator=torch.Generator().manual_seed(tokens))
    calls = []
    real = cpu_int8.run_parts
    monkeypatch.setattr(cpu_int8, "run_parts", lambda *a: calls.append(1) or real(*a))
    y = _parts_op(x.reshape(1, tokens, 768), parts)
    assert y.shape == (1, tokens, sum(c[0] for c in layers)) and not y.isnan().any()
    decode = tokens <= dispatch.CPU_INT8_MAX_TOKENS
    int8 = [decode and cpu_int8.available(p[1].shape[2], p[1].shape[1]) for p in parts]  # per part
    one_call = all(int8)
    assert calls == ([1] if one_call else [])
    alone = torch.cat([cpu_linear.pq_linear_cpu(x, *p, None) for p in parts], dim=-1)
    assert torch.equal(y[0], alone)
    exact = torch.cat([_exact(x, *p) for p in parts], dim=-1)
    mag = max(_scale(x, *p) for p in parts)
    assert float((y[0].double() - exact).abs().max()) < (2e-2 if any(int8) else 2e-6) * mag


def test_parts_fall_back_part_by_part(monkeypatch):
    """A part the int8 path does not take (d=4), a forced kernel, or FASQ_CPU_INT8=0: every
    part through fasq::pq_linear's own selection; the fake implementation gives the shape."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    c4, cb4, s4, _ = _layer(16, 768, 4, 16, 1, 2, False)
    parts = [_make(PARTS[0]), (c4, cb4.float(), s4.float(), None)]
    x = torch.randn(2, 768)
    exact = torch.cat([_exact(x, *p) for p in parts], dim=-1)
    alone = torch.cat([cpu_linear.pq_linear_cpu(x, *p, None) for p in parts], dim=-1)
    assert torch.equal(_parts_op(x, parts), alone)
    with cpu.use_kernel("cpu_gemv"):
        y = _parts_op(x, parts[:1])
        assert float((y.double() - exact[:, :200]).abs().max()) < 2e-6 * _scale(x, *parts[0])
    monkeypatch.setenv("FASQ_CPU_INT8", "0")
    y = _parts_op(x, parts[:1])
    assert float((y.double() - exact[:, :200]).abs().max()) < 2e-6 * _scale(x, *parts[0])
    monkeypatch.delenv("FASQ_CPU_INT8")
    with FakeTensorMode() as mode:
        fake = [tuple(None if t is None else mode.from_tensor(t) for t in p) for p in parts]
        assert _parts_op(mode.from_tensor(x), fake).shape == (2, 216)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_kernel_activation_dtypes_and_bias(dtype):
    if cpu_int8.isa() != "avx512":
        pytest.skip("no AVX-512 VBMI/VNNI here")
    codes, cb, scales, offsets = _make(CASES[1])
    x = torch.randn(3, CASES[1][1], generator=torch.Generator().manual_seed(1)).to(dtype)
    bias = torch.randn(CASES[1][0]).to(dtype)
    y = cpu_linear.pq_linear_cpu(x, codes, cb.to(dtype), scales.to(dtype), offsets.to(dtype), bias, kernel="cpu_int8")
    assert y.dtype == dtype
    cbr, scr, ofr = cb.to(dtype).float(), scales.to(dtype).float(), offsets.to(dtype).float()
    emu, _ = _emulate(x.float(), codes, cbr, scr, ofr)
    ref = emu + bias.double()
    tol = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10  # the output's rounding
    assert float(((y.double() - ref).abs() - tol * ref.abs()).max()) < 2e-6 * _scale(x.float(), codes, cbr, scr, ofr)


def test_two_threads_equal_one():
    if cpu_int8.isa() != "avx512":
        pytest.skip("no AVX-512 VBMI/VNNI here")
    codes, cb, scales, offsets = _make(CASES[0])
    x = torch.randn(6, CASES[0][1])
    y2 = cpu_int8.gemv(x, codes, cb, scales, offsets)
    torch.set_num_threads(1)
    assert torch.equal(y2, cpu_int8.gemv(x, codes, cb, scales, offsets))


def test_selection_switch_and_fallbacks(monkeypatch):
    with torch_ops.python_only():  # the Python selection, watched by patching it (the C++ op's: test_cpu_torch_ops)
        _selection_switch_and_fallbacks(monkeypatch)


def _selection_switch_and_fallbacks(monkeypatch):
    codes, cb, scales, offsets = _make(CASES[2])
    calls = []
    for name in ("gemv", "dequant_matmul"):
        monkeypatch.setattr(cpu, name, lambda *a, n=name, **k: calls.append(n) or torch.zeros(1))
    monkeypatch.setattr(cpu_int8, "run", lambda *a, **k: calls.append("int8") or torch.zeros(1))
    run = lambda T, *layer: torch.ops.fasq.pq_linear(torch.randn(T, CASES[2][1]), *layer, None)  # noqa: E731
    expect_int8 = "int8" if cpu_int8.available(2, 64) else "gemv"
    for T in (1, dispatch.CPU_INT8_MAX_TOKENS):
        run(T, codes, cb, scales, offsets)
    run(dispatch.CPU_INT8_MAX_TOKENS + 1, codes, cb, scales, offsets)
    assert calls == [expect_int8, expect_int8 if cpu_int8.available(2, 64) else "dequant_matmul", "dequant_matmul"]
    calls.clear()
    monkeypatch.setenv("FASQ_CPU_INT8", "0")
    run(1, codes, cb, scales, offsets)
    monkeypatch.delenv("FASQ_CPU_INT8")
    with cpu.use_kernel("cpu_gemv"):
        run(1, codes, cb, scales, offsets)
    with cpu.limit_isa("avx2"):
        run(1, codes, cb, scales, offsets)
    c4, cb4, s4, _ = _layer(16, 64, 4, 16, 1, 2, False)  # d=4: not taken
    torch.ops.fasq.pq_linear(torch.randn(1, 64), c4, cb4.float(), s4.float(), None, None)
    c6, cb6, s6, _ = _layer(16, 12, 2, 16, 1, 1, False)  # M = 6 subspaces: not whole 4-subspace steps
    torch.ops.fasq.pq_linear(torch.randn(1, 12), c6, cb6.float(), s6.float(), None, None)
    c1, cb1, s1, _ = _layer(16, 64, 1, 32, 1, 2, False)  # d=1 K=32: not taken
    torch.ops.fasq.pq_linear(torch.randn(1, 64), c1, cb1.float(), s1.float(), None, None)
    c1, cb1, s1, _ = _layer(16, 20, 1, 16, 1, 1, False)  # d=1, 20 columns: not whole 8-column steps
    torch.ops.fasq.pq_linear(torch.randn(1, 20), c1, cb1.float(), s1.float(), None, None)
    assert calls == ["gemv"] * 7
    assert dispatch.select_cpu_kernel(16, 2, 256, int8=True) == "cpu_int8"
    assert dispatch.select_cpu_kernel(17, 2, 256, int8=True) == "cpu_dequant"
    assert dispatch.select_cpu_kernel(1, 2, 256, int8=False) == "cpu_gemv"


def test_changed_tensors_are_prepared_again():
    if cpu_int8.isa() != "avx512":
        pytest.skip("no AVX-512 VBMI/VNNI here")
    codes, cb, scales, offsets = _make(CASES[1])
    x = torch.randn(2, CASES[1][1])
    cpu_int8.gemv(x, codes, cb, scales, offsets)
    for change in (lambda: cb.mul_(2), lambda: scales.mul_(3), lambda: codes.copy_(codes.flip(0))):
        change()
        emu, _ = _emulate(x, codes, cb, scales, offsets)
        y = cpu_int8.gemv(x, codes, cb, scales, offsets)
        assert float((y.double() - emu).abs().max()) < 2e-6 * _scale(x, codes, cb, scales, offsets)


def test_default_selection_of_d1_layers(monkeypatch):
    """d=1 layers take the int8 path automatically only where their codebooks are copied
    exactly (RTN's integer grid); float d=1 codebooks need FASQ_CPU_INT8=all or kernel=."""
    if cpu_int8.isa() != "avx512":
        pytest.skip("no AVX-512 VBMI/VNNI here")
    with torch_ops.python_only():  # the Python selection, watched by patching it
        _d1_selection(monkeypatch)


def _d1_selection(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu, "gemv", lambda *a, **k: calls.append("gemv") or torch.zeros(1))
    monkeypatch.setattr(cpu_int8, "run", lambda *a, **k: calls.append("int8") or torch.zeros(1))
    pq, rtn = _make(CASES[6]), _make(RTN_CASES[0])
    run = lambda layer: torch.ops.fasq.pq_linear(torch.randn(1, layer[0].shape[1]), *layer, None)  # noqa: E731
    run(pq), run(rtn), run(_make(CASES[1]))
    assert calls == ["gemv", "int8", "int8"]
    calls.clear()
    monkeypatch.setenv("FASQ_CPU_INT8", "all")
    run(pq), run(rtn)
    monkeypatch.delenv("FASQ_CPU_INT8")
    cpu_linear.pq_linear_cpu(torch.randn(1, CASES[6][1]), *pq, kernel="cpu_int8")  # forced
    assert calls == ["int8", "int8", "int8"]


def test_instruction_sets_and_formats_follow_the_cap():
    """AVX-512 VBMI + VNNI runs every format; AVX2 only K <= 16 and the 8-bit grid (16-entry
    vpshufb tables); the portable cap none. A layer prepared under one cap runs under the
    other, or falls back to the exact kernel where that one lacks its format."""
    assert cpu.load_library() is not None, cpu._lib_error
    full = cpu_int8.isa()
    formats = [(2, 256), (2, 64), (2, 16), (1, 16), (1, 8), (1, 256)]
    with cpu.limit_isa("portable"):
        assert cpu_int8.isa() == "unavailable" and not cpu_int8.available()
        assert not any(cpu_int8.available(d, K) for d, K in formats)
    if cpu.isa() == "portable":
        pytest.skip("no AVX2 here")
    with cpu.limit_isa("avx2"):
        assert cpu_int8.isa() == "avx2" and cpu_int8.available()
        assert [cpu_int8.available(d, K) for d, K in formats] == [False, False, True, True, True, True]
        assert not cpu_int8.available(1, 32) and not cpu_int8.available(4, 16)
    assert full in ("avx2", "avx512")
    if full == "avx512":
        assert all(cpu_int8.available(d, K) for d, K in formats)
    codes, cb, scales, offsets = _make(RTN_CASES[0])
    x = torch.randn(2, RTN_CASES[0][1])
    emu, _ = _emulate(x, codes, cb, scales, offsets)
    for cap in (["avx512", "avx2"] if full == "avx512" else ["avx2"]):
        with cpu.limit_isa(cap):
            y = cpu_int8.gemv(x, codes, cb, scales, offsets)
        assert float((y.double() - emu).abs().max()) < 2e-6 * _scale(x, codes, cb, scales, offsets)
    d2 = _make(CASES[0])
    with cpu.limit_isa("avx2"):
        assert cpu_int8.prepared(*d2, None) is None
        y = cpu_linear.pq_linear_cpu(x[:, :768], *d2)
    assert float((y.double() - _exact(x[:, :768], *d2)).abs().max()) < 2e-6 * _scale(x[:, :768], *d2)


def _extreme_layer(d, values, codes_of, out=48, inn=256):
    """A layer with one codebook (values [K, d]) whose codes are codes_of(out, M), no scales."""
    cb = torch.tensor(values, dtype=torch.float32).reshape(1, -1, d)
    return codes_of(out, inn // d).to(torch.uint8), cb, None, None


@pytest.mark.parametrize("layer", [
    # unsigned integer tables: largest byte 32 (summed in 16 bits per block), 33 and 127 (not)
    (1, [0.0] * 15 + [32.0], lambda o, m: torch.full((o, m), 15)),
    (1, [0.0] * 15 + [33.0], lambda o, m: torch.full((o, m), 15)),
    (1, [127.0, 0.0] + [5.0] * 14, lambda o, m: torch.zeros(o, m)),
    # signed float values at -127 / +127 steps; the 8-bit grid's codes 0 (-128 once flipped) and 255
    (1, [-3.0, 3.0] + [0.0] * 14, lambda o, m: (torch.arange(m) % 2).expand(o, m)),
    (2, [-3.0, 3.0, 3.0, -3.0] + [0.0] * 28, lambda o, m: (torch.arange(m) % 2).expand(o, m)),
    (1, [float(k) for k in range(256)], lambda o, m: torch.zeros(o, m)),
    (1, [float(k) for k in range(256)], lambda o, m: torch.full((o, m), 255)),
], ids=["small32", "small33", "int127", "d1signed", "d2signed", "grid0", "grid255"])
def test_extreme_products_do_not_saturate(layer, isa):
    """Tables and activations at the extremes of their bytes: every product the largest the
    path can make, all of one sign, so a 16-bit sum that saturated (AVX2's vpmaddubsw) or an
    accumulator that wrapped would show. Every |x| equal: x is quantized exactly, and the
    integer tables are copied exactly, so the result is the exact one up to fp32 sums."""
    codes, cb, scales, offsets = _extreme_layer(layer[0], layer[1], layer[2])
    for sign in (1.0, -1.0):
        x = torch.full((3, 256), 2.5 * sign)
        x[1] = x[1] * torch.where(torch.arange(256) % 3 == 0, -1.0, 1.0)  # mixed signs
        y = cpu_int8.gemv(x, codes, cb, scales, offsets, out=torch.full((3, 48), float("nan")))
        exact, emu = _exact(x, codes, cb, scales, offsets), _emulate(x, codes, cb, scales, offsets)[0]
        # fp32 sums of products of up to 128 (a byte as the kernel holds it) times |x|
        mag = max(_scale(x, codes, cb, scales, offsets), 128 * float(x.abs().sum(1).max()))
        assert float((y.double() - emu).abs().max()) < 2e-6 * mag
        if all(v == int(v) for v in layer[1]):
            assert float((y.double() - exact).abs().max()) < 2e-6 * mag


@pytest.mark.parametrize("case", [c for c in CASES if c[3] <= 16] + RTN_CASES,
                         ids=lambda c: ("rtn" if len(c) == 4 else "") + "x".join(map(str, c)))
def test_avx2_and_avx512_kernels_give_the_same_bits(case):
    """Where both instruction sets take a layer, the AVX2 kernels repeat the AVX-512 ones'
    arithmetic (the same int8 bytes, steps, integer dot products and float operations per row
    in the same order): the same output bits, fp32 and bf16, 1 / 3 / 17 tokens."""
    if cpu_int8.isa() != "avx512":
        pytest.skip("no AVX-512 VBMI/VNNI here to compare with")
    codes, cb, scales, offsets = _make(case)
    for dtype in (torch.float32, torch.bfloat16):
        for tokens in (1, 3, 17):
            x = torch.randn(tokens, codes.shape[1] * cb.shape[2], generator=torch.Generator().manual_seed(tokens))
            x = x.to(dtype)
            ys = []
            for cap in ("avx512", "avx2"):
                with cpu.limit_isa(cap):
                    assert cpu_int8.isa() == cap
                    ys.append(cpu_int8.gemv(x, codes, cb, scales, offsets, out=torch.full((tokens, case[0]), float("nan"), dtype=dtype)))
            assert torch.equal(ys[0], ys[1]) and not ys[0].isnan().any()
