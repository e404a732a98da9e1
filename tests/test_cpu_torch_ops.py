"""The C++ op (fasq.kernels.cpu.torch_ops): decode calls of tracked int8 layers run from the
dispatcher, with the same results as the Python implementation (fasq_cpu::pq_linear, the same
kernel behind Python); everything else goes on to Python, which selects and checks as before."""

import gc

import pytest
import torch

from conftest import skip_or_fail
from fasq.core import ops
from fasq.kernels import dispatch
from fasq.kernels.cpu import int8 as cpu_int8, library as cpu, torch_ops

from test_cpu_int8 import CASES, RTN_CASES, _make

pytestmark = pytest.mark.usefixtures("two_threads")


@pytest.fixture(autouse=True)
def loaded():
    if cpu_int8.isa() == "unavailable":
        pytest.skip("no int8 kernels on this CPU")
    if torch_ops.load() is None:
        skip_or_fail(f"the C++ op is unavailable: {torch_ops.error()}")
    torch_ops.counts(reset=True)


def _python(x, codes, cb, scales, offsets, bias=None):
    return torch.ops.fasq_cpu.pq_linear(x, codes, cb, scales, offsets, bias)


def _op(x, codes, cb, scales, offsets, bias=None):
    return torch.ops.fasq.pq_linear(x, codes, cb, scales, offsets, bias)


def _poisoned(fn):
    """Run `fn` with freshly freed memory filled with NaN first: an output the kernel leaves
    unwritten shows."""
    torch.full((1 << 20,), float("nan"))
    return fn()


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[2], CASES[5], CASES[10], CASES[13], RTN_CASES[0],
                                  RTN_CASES[4]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_calls_run_in_cpp_with_pythons_results(case, dtype):
    codes, cb, scales, offsets = _make(case)
    if not cpu_int8.available(cb.shape[2], cb.shape[1]):
        pytest.skip("this CPU's int8 kernels do not take the format")
    cb, scales = cb.to(dtype), None if scales is None else scales.to(dtype)
    offsets = None if offsets is None else offsets.to(dtype)
    bias = torch.randn(codes.shape[0], generator=torch.Generator().manual_seed(3)).to(dtype)
    g = torch.Generator().manual_seed(1)
    for shape in [(1, codes.shape[1] * cb.shape[2]), (2, 3, codes.shape[1] * cb.shape[2]),
                  (dispatch.CPU_INT8_MAX_TOKENS, codes.shape[1] * cb.shape[2]), (6, codes.shape[1] * cb.shape[2])]:
        x = torch.randn(*shape, generator=g).to(dtype)
        want = _python(x, codes, cb, scales, offsets, bias)  # prepares (and tracks) the layer
        torch_ops.counts(reset=True)
        got = _poisoned(lambda: _op(x, codes, cb, scales, offsets, bias))
        assert torch_ops.counts() == (1, 0)
        assert got.shape == want.shape and got.dtype == dtype
        assert torch.equal(got, want)


def test_calls_it_does_not_take_go_to_python_unchanged(monkeypatch):
    codes, cb, scales, offsets = _make(CASES[1])
    n_in = codes.shape[1] * 2
    x = torch.randn(1, n_in)
    _op(x, codes, cb, scales, offsets)
    torch_ops.counts(reset=True)
    assert torch.equal(_op(x, codes, cb, scales, offsets), _python(x, codes, cb, scales, offsets))
    assert torch_ops.counts(reset=True) == (1, 0)
    big = torch.randn(dispatch.CPU_INT8_MAX_TOKENS + 1, n_in)  # prefill: rebuild + matmul, in Python
    wide = torch.randn(n_in, 3)[:, 0][None]  # not contiguous
    for xi in (big, wide, x.double()):
        assert torch.equal(_op(xi, codes, cb, scales, offsets), _python(xi, codes, cb, scales, offsets))
    assert torch_ops.counts(reset=True) == (0, 3)
    with pytest.raises(ValueError, match="features"):  # Python's checks and messages
        _op(torch.randn(1, n_in + 2), codes, cb, scales, offsets)
    ref = ops.pq_linear_dequant(x, codes, cb, scales, offsets)
    with cpu.use_kernel("reference"):  # a forced path: Python, whatever was tracked
        assert torch.equal(_op(x, codes, cb, scales, offsets), ref)
        with torch_ops.python_only():
            pass
        assert torch.equal(_op(x, codes, cb, scales, offsets), ref)  # still forced after the inner block
    monkeypatch.setenv("FASQ_CPU_KERNEL", "reference")
    assert torch.equal(_op(x, codes, cb, scales, offsets), ref)
    monkeypatch.setenv("FASQ_CPU_KERNEL", " Auto")  # not a kernel name: Python says so
    with pytest.raises(ValueError, match="unknown CPU kernel"):
        _op(x, codes, cb, scales, offsets)
    monkeypatch.setenv("FASQ_CPU_KERNEL", "auto")
    _op(x, codes, cb, scales, offsets)
    monkeypatch.delenv("FASQ_CPU_KERNEL")
    monkeypatch.setenv("FASQ_CPU_INT8", " Off ")
    assert torch.equal(_op(x, codes, cb, scales, offsets), cpu.gemv(x, codes, cb, scales, offsets))
    monkeypatch.delenv("FASQ_CPU_INT8")
    assert torch_ops.counts(reset=True) == (1, 6)
    _op(x, codes, cb, scales, offsets)
    assert torch_ops.counts() == (1, 0)  # the blocks and settings are gone


def _close(y, ref):  # within the int8 path's rounding (bounded exactly in test_cpu_int8)
    return float((y.double() - ref.double()).abs().max()) <= 0.02 * float(ref.abs().max())


def test_a_changed_tensor_is_prepared_again():
    codes, cb, scales, offsets = _make(CASES[1])
    x = torch.randn(2, codes.shape[1] * 2)
    _op(x, codes, cb, scales, offsets)
    for change in (lambda: cb.mul_(2), lambda: scales.add_(0.5), lambda: codes.copy_(codes.flip(0)),
                   lambda: offsets.neg_()):
        old = _op(x, codes, cb, scales, offsets)
        change()  # in place: a new version
        torch_ops.counts(reset=True)
        first, second = _op(x, codes, cb, scales, offsets), _op(x, codes, cb, scales, offsets)
        assert torch_ops.counts() == (1, 1)  # Python prepared the changed layer, then C++ took it
        assert torch.equal(first, second) and not torch.equal(second, old)
        assert _close(second, ops.pq_linear_dequant(x, codes, cb, scales, offsets))
    # another tensor object with the same values: Python first, then C++ with the new one
    cb2 = cb.clone()
    torch_ops.counts(reset=True)
    y = _op(x, codes, cb2, scales, offsets)
    assert torch.equal(_op(x, codes, cb2, scales, offsets), y) and torch_ops.counts() == (1, 1)
    cb2.data = cb2.data * 3  # .data moves the data: no new version, a new pointer
    torch_ops.counts(reset=True)
    y3 = _op(x, codes, cb2, scales, offsets)
    assert torch_ops.counts() == (0, 1) and _close(y3, ops.pq_linear_dequant(x, codes, cb2, scales, offsets))


def test_a_freed_layer_is_forgotten():
    codes, cb, scales, offsets = _make(CASES[1])
    x = torch.randn(1, codes.shape[1] * 2)
    before = torch_ops.tracked()
    gc.disable()
    try:
        _op(x, codes, cb, scales, offsets)
        assert torch_ops.tracked() == before + 1
        del codes
        assert torch_ops.tracked() == before
    finally:
        gc.enable()


def test_a_capped_instruction_set_falls_back_in_python():
    codes, cb, scales, offsets = _make(CASES[0])  # d=2 K=256: no AVX2 int8 kernel
    x = torch.randn(1, codes.shape[1] * 2)
    _op(x, codes, cb, scales, offsets)
    with cpu.limit_isa("avx2"):
        torch_ops.counts(reset=True)
        y = _op(x, codes, cb, scales, offsets)
        assert torch_ops.counts() == (0, 1)
        assert torch.equal(y, cpu.gemv(x, codes, cb, scales, offsets))


def test_parts_run_in_cpp_with_pythons_results():
    parts = [_make(CASES[0], seed=s) for s in range(3)]
    codes, cbs, scales, offsets = (list(t) for t in zip(*parts))
    x = torch.randn(3, codes[0].shape[1] * 2).bfloat16()
    want = torch.ops.fasq_cpu.pq_linear_parts(x, codes, cbs, scales, offsets)
    torch_ops.counts(reset=True)
    got = _poisoned(lambda: ops.pq_linear_parts(x, codes, cbs, scales, offsets))
    assert torch_ops.counts(reset=True) == (1, 0) and torch.equal(got, want)
    assert torch.equal(want, torch.cat([_python(x, *p) for p in parts], -1))
    other = _make(CASES[1])  # a part of another width: Python
    xo = torch.randn(3, other[0].shape[1] * 2).bfloat16()
    with pytest.raises(ValueError, match="features"):  # parts of different widths: Python says so
        ops.pq_linear_parts(xo, codes[:1] + [other[0]], cbs[:1] + [other[1]], scales[:1] + [other[2]],
                            offsets[:1] + [other[3]])
    assert torch_ops.counts(reset=True) == (0, 1)
    mixed = ops.pq_linear_parts(x, codes[:1] + [codes[1].clone()], cbs[:2], scales[:2], offsets[:2])
    assert torch_ops.counts() == (0, 1) and torch.equal(mixed, want[:, :2 * codes[0].shape[0]])


def test_compiled_and_inference_mode_calls_take_it():
    codes, cb, scales, offsets = _make(CASES[2])
    layer = torch.nn.Module()
    for name, t in zip(("codes", "cb", "scales"), (codes, cb, scales)):
        layer.register_buffer(name, t)
    fn = torch.compile(lambda x: _op(x, layer.codes, layer.cb, layer.scales, None) * 2, fullgraph=True)
    x = torch.randn(1, codes.shape[1] * 2)
    want = _python(x, codes, cb, scales, None) * 2
    fn(x)
    torch_ops.counts(reset=True)
    assert torch.equal(fn(x), want) and torch_ops.counts() == (1, 0)
    with torch.inference_mode():
        assert torch.equal(_op(x, codes, cb, scales, None), want / 2) and torch_ops.counts() == (2, 0)
        # a layer made under inference_mode (no version counters): taken too
        ci, cbi, si = codes.clone(), cb.clone(), scales.clone()
        yi = _op(x, ci, cbi, si, None)
        assert torch.equal(_op(x, ci, cbi, si, None), yi) and torch.equal(yi, want / 2)
        assert torch_ops.counts() == (3, 1)
