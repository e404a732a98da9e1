"""The CPU kernel (fasq.kernels.cpu.library) against the float64 oracle, on every path.

Every instruction-set path (the portable C loops, AVX2 and AVX-512 where the CPU has
them, each forced with `cpu.limit_isa`) and both kernels (decode GEMV, dequantize + matmul) run on shapes
with 1 and odd sizes, every codebook scope and scale layout, RTN (d=1), tokens 1, 3, 17
and 53, fp32 / bf16 / fp16 activations and fp32 / fp16 / bf16 codebooks. Outputs are
poisoned with NaN before each call.
"""

import subprocess
import sys
import textwrap

import pytest
import torch

from fasq.core import ops
from fasq.core.config import PQConfig, QuantConfig, RTNConfig
from fasq.kernels.cpu import library as cpu, linear as cpu_linear
from fasq.kernels import dispatch

from test_ops import CASES, _dense_ref, _layer

# relative error (max |y - ref| / max |ref|) allowed per activation dtype
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# (out, in, d, K, C, S, offsets) beyond test_ops.CASES: the kernel's loop tails (runs not
# a multiple of the SIMD step), d=3 (portable loop only), K=65536 (int32 codes), many
# column tiles (subspace scope, large K), d=1 with K > 16 (gathers)
MORE_CASES = [
    (3, 30, 2, 256, 3, 5, True),
    (7, 36, 3, 8, 2, 4, False),
    (5, 64, 1, 65536, 1, 2, True),
    (9, 128, 4, 4096, 32, 4, True),
    (11, 40, 1, 64, 2, 5, False),
    (1, 16, 8, 16, 2, 1, True),
    (13, 200, 2, 64, 4, 4, True),   # AVX-512 register lookups: K <= 32, 64, 96, 128
    (6, 130, 2, 32, 1, 1, False),
    (4, 512, 2, 128, 2, 2, False),
    (3, 96, 2, 16, 3, 3, True),
]
ALL_CASES = CASES + MORE_CASES


@pytest.fixture(scope="module", autouse=True)
def library():
    lib = cpu.load_library()
    assert lib is not None, f"the CPU kernel did not build: {cpu._lib_error}"
    return lib


@pytest.fixture(params=cpu.ISAS)
def isa(request):
    """Each instruction-set path: portable C, AVX2, AVX-512 (capped by the CPU: where it
    lacks one, that parameter runs the widest path it has)."""
    with cpu.limit_isa(request.param):
        if request.param == "portable":
            assert cpu.isa() == "portable"
        yield cpu.isa()


def _rel_err(y, ref, x, codes, cb, scales=None, offsets=None, bias=None):
    """max |y - ref| over the largest sum of |x| * |W| (+ |bias|): the scale a float dot
    product's rounding error follows (relative to y itself, cancellation in a short row
    could make a correct result look wrong)."""
    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    W = ops.dequantize(codes, cb.double(), d64(scales), d64(offsets), dtype=torch.float64).abs()
    mag = x.double().reshape(-1, W.shape[1]).abs() @ W.T
    if bias is not None:
        mag = mag + bias.double().abs()
    return float((y.double().reshape(ref.shape) - ref).abs().max() / mag.max().clamp_min(1e-30))


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("tokens", [1, 3, 17, 53])
def test_gemv_matches_oracle(case, tokens, isa):
    codes, cb, scales, offsets = _layer(*case)
    x, bias = _randn(tokens, case[1]), _randn(case[0], seed=1)
    ref = _dense_ref(x, codes, cb, scales, offsets, bias)
    out = torch.full((tokens, case[0]), float("nan"))
    y = cpu.gemv(x, codes, cb, scales, offsets, bias, out=out)
    assert y.data_ptr() == out.data_ptr() and not y.isnan().any()
    assert _rel_err(y, ref, x, codes, cb, scales, offsets, bias) < TOL[torch.float32]


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel", ["cpu_gemv", "cpu_dequant"])
def test_every_path_and_dtype(case, dtype, kernel, isa):
    codes, cb, scales, offsets = _layer(*case)
    cast = (lambda t: t if t is None else t.to(dtype)) if dtype != torch.float16 else (lambda t: t)
    cb, scales, offsets = cast(cb), cast(scales), cast(offsets)  # codebooks in the model's dtype
    x, bias = _randn(3, case[1]).to(dtype), _randn(case[0], seed=1).to(dtype)
    y = cpu_linear.pq_linear_cpu(x, codes, cb, scales, offsets, bias, kernel=kernel)
    assert y.dtype == dtype and y.shape == (3, case[0])
    ref = _dense_ref(x, codes, cb, scales, offsets, bias)
    assert _rel_err(y, ref, x, codes, cb, scales, offsets, bias) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_rebuild_overwrites_its_reused_buffer(dtype):
    """cpu_dequant rebuilds W into a buffer kept between calls: poisoned with NaN first, a
    rebuild that skipped any element would leak NaN into the output."""
    case = ALL_CASES[-1]
    codes, cb, scales, offsets = _layer(*case)
    n = case[0] * case[1]
    buf = cpu._weight_buffer(n, dtype).fill_(float("nan"))  # the buffer the next call reuses
    x = _randn(9, case[1]).to(dtype)
    y = cpu_linear.pq_linear_cpu(x, codes, cb, scales, offsets, None, kernel="cpu_dequant")
    assert cpu._weight_buffer(n, dtype).data_ptr() == buf.data_ptr()  # it was reused, not reallocated
    assert not buf.isnan().any() and not y.isnan().any()
    ref = _dense_ref(x, codes, cb, scales, offsets, None)
    assert _rel_err(y, ref, x, codes, cb, scales, offsets, None) < TOL[dtype]


def test_fp32_codebooks_that_are_not_fp16_values_stay_exact():
    codes, cb, scales, _ = _layer(37, 48, 2, 16, 1, 1, False)
    cb = cb.float() + 1e-4  # no longer representable in fp16
    x = _randn(2, 48)
    ref = _dense_ref(x, codes, cb, scales, None, None)
    assert _rel_err(cpu.gemv(x, codes, cb, scales), ref, x, codes, cb, scales) < 2e-6


def test_in_place_codebook_change_is_seen():
    codes, cb, scales, _ = _layer(37, 48, 2, 16, 1, 1, False)
    cb = cb.float()
    x = _randn(1, 48)
    cpu.gemv(x, codes, cb, scales)  # caches the fp16 copy of these codebooks
    cb.mul_(2)
    ref = _dense_ref(x, codes, cb, scales, None, None)
    assert _rel_err(cpu.gemv(x, codes, cb, scales), ref, x, codes, cb, scales) < 2e-6


def test_identity_input_gives_the_weight():
    codes, cb, scales, offsets = _layer(*CASES[2])
    W = ops.dequantize(codes, cb, scales, offsets, dtype=torch.float32)
    torch.testing.assert_close(cpu.gemv(torch.eye(48), codes, cb.float(), scales.float(), offsets.float()), W.T,
                               rtol=1e-6, atol=1e-6)
    for dtype in (torch.float32, torch.bfloat16):
        Wk = cpu.dequantize(codes, cb.to(dtype), scales.to(dtype), offsets.to(dtype), dtype=dtype)
        Wr = ops.dequantize(codes, cb.to(dtype), scales.to(dtype), offsets.to(dtype), dtype=torch.float32)
        torch.testing.assert_close(Wk.float(), Wr, rtol=TOL[dtype], atol=TOL[dtype])


def test_leading_dims_and_op_dispatch():
    codes, cb, scales, offsets = _layer(*CASES[2])
    x = _randn(2, 3, 48)
    for tokens in (1, dispatch.CPU_GEMV_MAX_TOKENS, dispatch.CPU_GEMV_MAX_TOKENS + 1):
        xt = _randn(tokens, 48, seed=tokens)
        y = torch.ops.fasq.pq_linear(xt, codes, cb, scales, offsets, None)
        ref = _dense_ref(xt, codes, cb, scales, offsets, None)
        assert _rel_err(y, ref, xt, codes, cb, scales, offsets) < 2e-6
    y = torch.ops.fasq.pq_linear(x, codes, cb.float(), scales.float(), offsets.float(), None)
    assert y.shape == (2, 3, 37)
    ref = _dense_ref(x.reshape(6, 48), codes, cb, scales, offsets, None)
    assert _rel_err(y, ref, x, codes, cb, scales, offsets) < 2e-6


def test_use_kernel_forces_a_path(monkeypatch):
    monkeypatch.setenv("FASQ_CPU_INT8", "0")  # auto selection on the exact kernels (test_cpu_int8.py: the int8 one)
    codes, cb, scales, offsets = _layer(*CASES[1])
    calls = []
    monkeypatch.setattr(cpu, "gemv", lambda *a, **k: calls.append("gemv") or ops.pq_linear_dequant(*a))
    monkeypatch.setattr(ops, "pq_linear_dequant", lambda *a: calls.append("ref") or torch.zeros(1, 37))
    x = torch.randn(1, 48)
    torch.ops.fasq.pq_linear(x, codes, cb, scales, offsets, None)
    with cpu.use_kernel("reference"):
        torch.ops.fasq.pq_linear(x, codes, cb, scales, offsets, None)
    assert calls == ["gemv", "ref", "ref"]
    with pytest.raises(ValueError, match="unknown CPU kernel"):
        with cpu.use_kernel("fast"):
            pass


def test_select_cpu_kernel():
    assert dispatch.select_cpu_kernel(1, 2, 256) == "cpu_gemv"
    assert dispatch.select_cpu_kernel(dispatch.CPU_GEMV_MAX_TOKENS, 4, 4096) == "cpu_gemv"
    assert dispatch.select_cpu_kernel(dispatch.CPU_GEMV_MAX_TOKENS + 1, 2, 256) == "cpu_dequant"
    assert dispatch.select_cpu_kernel(2048, 1, 16) == "cpu_dequant"
    assert dispatch.select_cpu_kernel(1, 2, 256, has_library=False) == "reference"
    assert dispatch.select_cpu_kernel(0, 2, 256) == "reference"


def test_bad_arguments_are_refused():
    codes, cb, scales, _ = _layer(*CASES[1])
    with pytest.raises(ValueError, match="x has 40 features"):
        cpu.gemv(torch.randn(1, 40), codes, cb, scales)
    with pytest.raises(ValueError, match="codes must be"):
        cpu.gemv(torch.randn(1, 48), codes.long(), cb, scales)
    with pytest.raises(ValueError, match="out must be"):
        cpu.gemv(torch.randn(1, 48), codes, cb, scales, out=torch.empty(2, 37))
    with pytest.raises(ValueError, match="offsets without scales"):
        cpu.gemv(torch.randn(1, 48), codes, cb, None, scales)


def test_prefill_reuses_its_weight_buffer():
    codes, cb, scales, offsets = _layer(*CASES[2])
    x = torch.randn(20, 48)
    a = cpu.dequant_matmul(x, codes, cb, scales, offsets)
    buf = cpu._weight_buffer(1, torch.float32)
    b = cpu.dequant_matmul(x, codes, cb, scales, offsets)
    assert cpu._weight_buffer(1, torch.float32).data_ptr() == buf.data_ptr()
    assert torch.equal(a, b)


@pytest.mark.parametrize("layer", [PQConfig(d=2, K=16, codebook_group=4, scale_group=16),
                                   PQConfig(d=4, K=256, scale="minmax"), RTNConfig(bits=4, group_size=16)],
                         ids=["pq-d2", "pq-d4-minmax", "rtn"])
def test_model_generates_the_same_tokens_as_the_reference_path(tiny_llama, layer, monkeypatch):
    from fasq import quantize_model

    monkeypatch.setenv("FASQ_CPU_INT8", "0")  # the exact kernels; the int8 one: test below
    quantize_model(tiny_llama, QuantConfig(layer=layer), progress=False)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
    fast = tiny_llama.generate(ids, **kw)
    with cpu.use_kernel("reference"):
        ref = tiny_llama.generate(ids, **kw)
        ref_logits = tiny_llama(ids).logits
    assert torch.equal(fast, ref)
    torch.testing.assert_close(tiny_llama(ids).logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_model_through_the_int8_kernel_stays_near_the_reference(tiny_llama):
    """The default selection (the int8 kernel for decode where the CPU has it): logits within
    a few percent of the exact ones (int8 rounding of codebooks and activations per layer)."""
    from fasq import quantize_model
    from fasq.kernels.cpu import int8 as cpu_int8

    if not cpu_int8.available(2, 64):
        pytest.skip("no AVX-512 VBMI/VNNI here")
    quantize_model(tiny_llama, QuantConfig(layer=PQConfig(d=2, K=64, codebook_group=4, scale_group=16)),
                   progress=False)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    taken = []
    real_run = cpu_int8.run
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_int8, "run", lambda *a, **k: taken.append(1) or real_run(*a, **k))
        fast = tiny_llama(ids[:, :6]).logits  # 6 tokens: the int8 kernel
    assert taken
    with cpu.use_kernel("reference"):
        ref = tiny_llama(ids[:, :6]).logits
    err = float((fast - ref).detach().abs().max() / ref.detach().abs().max())
    assert 0 < err < 0.03, err


def test_without_a_compiler_the_reference_path_runs_with_one_warning(tmp_path):
    code = textwrap.dedent("""
        import warnings, torch
        from fasq.kernels import cpu
        from fasq import ops
        codes = torch.randint(0, 16, (5, 4)).to(torch.uint8)
        cb = torch.randn(1, 16, 2)
        x = torch.randn(1, 8)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            y1 = torch.ops.fasq.pq_linear(x, codes, cb, None, None, None)
            y2 = torch.ops.fasq.pq_linear(x, codes, cb, None, None, None)
        msgs = [str(m.message) for m in w if "CPU kernel" in str(m.message)]
        assert len(msgs) == 1, msgs
        assert "reference path" in msgs[0]
        assert torch.equal(y1, ops.pq_linear_dequant(x, codes, cb)) and torch.equal(y1, y2)
        print("ok")
    """)
    env = {"PATH": "/nonexistent", "CXX": "/nonexistent/c++", "FASQ_CACHE_DIR": str(tmp_path), "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_an_unwritable_cache_folder_falls_back_to_the_temp_folder(tmp_path, monkeypatch):
    import tempfile

    real_build, built = cpu._build, []

    def build(dest):
        if str(dest).startswith(str(tmp_path / "cache")):
            raise PermissionError(13, "Permission denied", str(dest))
        built.append(dest)
        real_build(dest)

    monkeypatch.setenv("FASQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setattr(cpu, "_build", build)
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_lib_error", None)
    assert cpu.load_library() is not None, cpu._lib_error
    assert len(built) == 1 and str(built[0]).startswith(str(tmp_path / "tmp")) and built[0].is_file()


def test_prepared_arguments_follow_changed_tensors():
    codes, cb, scales, offsets = _layer(*CASES[2])
    x = _randn(1, 48)
    cpu.gemv(x, codes, cb, scales, offsets)  # prepares this layer's arguments
    for change in (lambda: scales.mul_(2), lambda: setattr(offsets, "data", offsets * 3),
                   lambda: codes.copy_(codes.flip(0))):
        change()
        ref = _dense_ref(x, codes, cb, scales, offsets, None)
        assert _rel_err(cpu.gemv(x, codes, cb, scales, offsets), ref, x, codes, cb, scales, offsets) < 2e-3
    other = (scales + 1).contiguous()  # another tensor object in the same call slot
    ref = _dense_ref(x, codes, cb, other, offsets, None)
    assert _rel_err(cpu.gemv(x, codes, cb, other, offsets), ref, x, codes, cb, other, offsets) < 2e-3


def test_a_layers_prepared_state_is_freed_with_it():
    """The prepared arguments (and the int8 copies) live as long as the layer's codes tensor,
    no longer: a plan that held the layer's tensors would keep every layer ever called (every
    model loaded in a process) in memory. Non-contiguous inputs are copied and kept by the
    plan while it lives; a new layer with a recycled id is prepared afresh."""
    import gc
    import weakref

    from fasq.kernels.cpu import int8 as cpu_int8

    x = torch.randn(2, 256)
    for contiguous in (True, False):
        codes, cb, scales, _ = _layer(64, 256, 2, 256, 1, 4, False, 0)
        if not contiguous:
            codes = codes.t().contiguous().t()
        y = cpu.gemv(x, codes, cb, scales)
        cpu_int8.gemv(x, codes, cb, scales)
        # memory freed since the plan was made gets reused: a plan that pointed into a copy it
        # did not keep would now read this junk
        junk = [torch.full((64, 128), 7, dtype=torch.uint8) for _ in range(64)]
        assert torch.equal(cpu.gemv(x, codes, cb, scales), y) and junk
        plan = cpu._plans.get(codes)
        assert plan is not None and plan.int8 is not None
        refs = [weakref.ref(t) for t in (codes, cb, scales, plan.int8.codes, plan.int8.tabs)]
        key, n = id(codes), len(cpu._plans)
        gc.disable()  # freed as the layer goes, not at a later cycle collection
        try:
            del codes, cb, scales, plan
            assert all(r() is None for r in refs)
        finally:
            gc.enable()
        assert key not in cpu._plans._d and len(cpu._plans) == n - 1
    for seed in range(3):  # fresh layers, ids possibly recycled: each its own result
        codes, cb, scales, _ = _layer(64, 256, 2, 256, 1, 4, False, seed)
        ref = _dense_ref(x, codes, cb, scales, None, None)
        assert _rel_err(cpu.gemv(x, codes, cb, scales), ref, x, codes, cb, scales, None) < 2e-3
        del codes, cb, scales
    assert y.shape == (2, 64)


@pytest.mark.parametrize("value, off", [(None, False), ("", False), ("1", False), ("all", False), ("0", True),
                                        (" Off ", True), ("FALSE", True), ("no", True)])
def test_an_environment_switch_is_off_only_for_the_off_values(monkeypatch, value, off):
    # one reading for FASQ_CPU_INT8 / _DENSE / _OPS / _HUGEPAGES (library.switched_off)
    if value is None:
        monkeypatch.delenv("FASQ_TEST_SWITCH", raising=False)
    else:
        monkeypatch.setenv("FASQ_TEST_SWITCH", value)
    assert cpu.switched_off("FASQ_TEST_SWITCH") is off
