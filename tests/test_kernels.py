"""Triton kernels against the reference ops.

On CPU these run under the Triton interpreter (TRITON_INTERPRET=1, which `make test`
sets) at small, deliberately awkward shapes (out = 37, in = 48/72: no tile divides them);
on a CUDA GPU the same tests run compiled, and the `gpu`-marked ones add realistic shapes.
Every output buffer is filled with NaN before the call, so an output element the kernel
forgets to write (or a split-K workspace that was not zeroed) fails the test.
"""

import os

import pytest
import torch

from conftest import require, skip_or_fail  # noqa: E402

require("triton", reason="triton is not installed (pip install 'fasq[triton]')")

from fasq.core import ops  # noqa: E402
from fasq.kernels import pq_linear_triton  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
if not (INTERPRET or HAS_CUDA):
    skip_or_fail("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1 (make test sets it)", module_level=True)
DEV = "cuda" if HAS_CUDA and not INTERPRET else "cpu"
TOL = {torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float32: 1e-4}
KERNELS = ("gemv", "lut_gemm", "dequant_gemm", "dequant_cublas")


def make_layer(out, in_, d, K, scope="matrix", scales=None, offsets=False, bias=True, seed=0,
               cb_dtype=torch.float16, device=DEV):
    """Random layer in the storage format. scope: matrix | group | subspace;
    scales: None | "row" | number of scale groups S."""
    g = torch.Generator().manual_seed(seed)
    M = in_ // d
    C = {"matrix": 1, "group": 3 if M % 3 == 0 else 2, "subspace": M}[scope]
    codes = torch.randint(0, K, (out, M), generator=g, dtype=torch.int32).to(ops.code_dtype(K))
    cb = torch.randn(C, K, d, generator=g).to(cb_dtype)
    S = None if scales is None else (1 if scales == "row" else scales)
    sc = None if S is None else (torch.rand(out, S, generator=g) + 0.5).half()
    of = None if not offsets else (torch.randn(out, S, generator=g) * 0.3).half()
    b = torch.randn(out, generator=g).half() if bias else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(codes), to(cb), to(sc), to(of), to(b)


# max |y - ref| / (|x| @ |W|^T + |b|) per output element: the scale a dot product's rounding
# error follows, so one wrong row (or element) fails, however large the rest of the matrix.
# About 2 unit roundoffs of the activation dtype (weights rounded once, outputs once).
SCALED_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}


def scaled_err(y, x, codes, cb, sc, of, b):
    """Largest element error, each over its own |x| |W| (+ |bias|) (float64 reference)."""
    W = ops.dequantize(codes, cb, sc, of, dtype=torch.float64)
    x64 = x.double().reshape(-1, W.shape[1])
    ref, mag = x64 @ W.T, x64.abs() @ W.abs().T
    if b is not None:
        ref, mag = ref + b.double(), mag + b.double().abs()
    err = (y.double().reshape(ref.shape) - ref).abs() / mag.clamp_min(1e-30)
    return err.max().item()


def test_scaled_error_sees_one_wrong_element():
    layer = make_layer(64, 96, 2, 16, "matrix", "row")
    x = activations(3, 96, torch.float16)
    y = ops.pq_linear_dequant(x.float(), *[t if t is None else t.float() for t in layer]).half()
    assert scaled_err(y, x, *layer) < SCALED_TOL[torch.float16]
    W = ops.dequantize(*layer[:4], dtype=torch.float64)
    mag = (x.double().abs() @ W.abs().T)[1, 17] + layer[4][17].double().abs()
    y[1, 17] += float(4 * SCALED_TOL[torch.float16] * mag)  # one element of 192, off by 4x the tolerance
    assert scaled_err(y, x, *layer) > SCALED_TOL[torch.float16]


def run(kernel, x, layer, config=None):
    """Call a forced kernel into a NaN-poisoned output; check against float64."""
    codes = layer[0]
    out = torch.full((x.numel() // x.shape[-1], codes.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    y = pq_linear_triton(x, *layer, kernel=kernel, config=config, out=out)
    assert y.shape == (*x.shape[:-1], codes.shape[0]) and y.dtype == x.dtype
    assert not torch.isnan(y).any(), "unwritten outputs"
    err = scaled_err(y, x, *layer)
    assert err < SCALED_TOL[x.dtype], f"{kernel}: scaled error {err:.2e}"
    return y


def activations(tokens, in_, dtype, seed=1):
    return torch.randn(tokens, in_, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEV)


# (tokens, out, in, d, K, scope, scales, offsets, dtype): together every scope, scale kind,
# d in {1, 2, 4, 8} (and 3), K in {16, 256, 4096}, fp16 and bf16, 1/3/17/64 tokens.
# K = 4096 cases stay few and small: the LUT path loops over K / BLOCK_K table chunks.
CASES = [
    (1, 37, 48, 2, 16, "matrix", None, False, torch.float16),
    (1, 37, 72, 2, 256, "matrix", "row", False, torch.float16),
    (3, 37, 72, 2, 256, "group", "row", False, torch.bfloat16),
    (3, 37, 72, 4, 16, "subspace", 3, True, torch.float16),
    (1, 37, 48, 1, 16, "matrix", 6, True, torch.bfloat16),  # RTN-like, d=1
    (3, 37, 48, 8, 16, "group", 2, False, torch.float16),
    (1, 37, 48, 8, 4096, "matrix", "row", False, torch.float16),
    (17, 37, 72, 2, 256, "subspace", 4, True, torch.bfloat16),
    (17, 37, 72, 4, 16, "matrix", "row", True, torch.float16),
    (17, 37, 48, 1, 16, "matrix", 3, True, torch.float16),
    (64, 37, 48, 2, 16, "group", None, False, torch.bfloat16),
    (64, 37, 72, 3, 16, "matrix", 2, False, torch.float16),  # d=3: no packed words
    (5, 37, 48, 4, 4096, "group", 2, True, torch.bfloat16),
]


def _ids(c):
    return f"T{c[0]}-{c[1]}x{c[2]}-d{c[3]}-K{c[4]}-{c[5]}-s{c[6]}{'-off' if c[7] else ''}-{str(c[8])[6:]}"


# every kernel on every case it accepts (the GEMV takes at most 16 tokens; see below)
KERNEL_CASES = [(k, c) for c in CASES for k in KERNELS if not (k == "gemv" and c[0] > 16)]


@pytest.mark.parametrize("kernel,case", KERNEL_CASES, ids=[f"{k}-{_ids(c)}" for k, c in KERNEL_CASES])
def test_kernel_matches_reference(kernel, case):
    T, out, in_, d, K, scope, scales, offsets, dtype = case
    layer = make_layer(out, in_, d, K, scope, scales, offsets)
    run(kernel, activations(T, in_, dtype), layer)


@pytest.mark.parametrize("d,K,scope,scales,offsets", [(2, 16, "matrix", 3, True), (2, 256, "group", None, False),
                                                      (4, 16, "subspace", "row", False), (1, 16, "matrix", 6, True),
                                                      (3, 16, "group", 2, False), (8, 4096, "matrix", None, False)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_dequantize_matches_reference(d, K, scope, scales, offsets, dtype):
    """The weight rebuild of the dequant_cublas path (its d=2 interleaved store and the
    strided store of the other d) against ops.dequantize, element by element."""
    from fasq.kernels.triton.dequant_matmul import dequantize_triton
    codes, cb, sc, of, _ = make_layer(37, 24 * d, d, K, scope, scales, offsets)
    W = dequantize_triton(codes, cb, sc, of, dtype=dtype)
    ref = ops.dequantize(codes, cb, sc, of, dtype=torch.float32)
    assert not torch.isnan(W).any()
    torch.testing.assert_close(W.float(), ref, rtol=TOL[dtype] / 2, atol=TOL[dtype] / 2)


def test_gemv_refuses_more_than_16_tokens():
    layer = make_layer(37, 48, 2, 16, "matrix", "row", False)
    with pytest.raises(ValueError, match="at most 16 tokens"):
        pq_linear_triton(activations(17, 48, torch.float16), *layer, kernel="gemv")


@pytest.mark.parametrize("d", [1, 2, 4, 8])
@pytest.mark.parametrize("scope", ["matrix", "group", "subspace"])
def test_gemv_every_scope_and_d(scope, d):
    layer = make_layer(37, 48, d, 16, scope, scales="row")
    run("gemv", activations(1, 48, torch.float16), layer)


# Pinned configs: split-K on/off and uneven, the on-chip codebook (tl.gather) gather of
# the GEMV, tiles larger than the problem, grouped scales not aligned with blocks.
PINNED = [
    ("gemv", dict(BLOCK_N=16, BLOCK_M=16, SPLIT_K=1, CB_SMEM=0, ACC3=0)),
    ("gemv", dict(BLOCK_N=16, BLOCK_M=16, SPLIT_K=1, CB_SMEM=0, ACC3=1)),
    ("gemv", dict(BLOCK_N=32, BLOCK_M=8, SPLIT_K=3, CB_SMEM=1, ACC3=0)),
    ("gemv", dict(BLOCK_N=64, BLOCK_M=4, SPLIT_K=1, CB_SMEM=1, ACC3=1)),
    ("lut_gemm", dict(BLOCK_T=4, BLOCK_N=64, BLOCK_M=2, SPLIT_K=1)),
    ("lut_gemm", dict(BLOCK_T=16, BLOCK_N=16, BLOCK_M=2, SPLIT_K=4)),
    ("dequant_gemm", dict(BLOCK_T=32, BLOCK_N=64, BLOCK_M=16, SPLIT_K=1)),
    ("dequant_gemm", dict(BLOCK_T=16, BLOCK_N=16, BLOCK_M=16, SPLIT_K=3)),
]


@pytest.mark.parametrize("kernel,config", PINNED, ids=[f"{k}-{i}" for i, (k, _) in enumerate(PINNED)])
@pytest.mark.parametrize("scales,offsets", [("row", False), (6, True)], ids=["row", "group6-off"])
def test_pinned_configs(kernel, config, scales, offsets):
    T = 3 if kernel == "gemv" else 17
    layer = make_layer(37, 96, 2, 16, "matrix", scales, offsets)  # M = 48 subspaces, 8 per scale group
    run(kernel, activations(T, 96, torch.float16), layer, config)


@pytest.mark.parametrize("kernel", KERNELS)
def test_leading_dims_no_bias_fp32_codebooks(kernel):
    layer = make_layer(37, 48, 2, 16, "group", "row", bias=False, cb_dtype=torch.float32)
    x = activations(6, 48, torch.float16).reshape(2, 3, 48)
    run(kernel, x, layer)


def test_auto_dispatch_and_reference_path():
    layer = make_layer(37, 48, 2, 16, "matrix", "row")
    for T in (1, 17, 40):
        x = activations(T, 48, torch.float16)
        ref = ops.pq_linear_dequant(x, *layer)
        for kernel in ("auto", "reference"):
            y = pq_linear_triton(x, *layer, kernel=kernel)
            assert scaled_err(y, x, *layer) < SCALED_TOL[x.dtype]
            if kernel == "reference":
                assert torch.equal(y, ref)


def test_registered_cuda_impl_goes_through_dispatcher():
    """The function registered for fasq::pq_linear on CUDA (run here on the interpreter
    when there is no GPU)."""
    from fasq.kernels import _pq_linear_cuda
    layer = make_layer(37, 72, 4, 16, "subspace", 3, offsets=True)
    for T in (1, 9, 33):
        x = activations(T, 72, torch.bfloat16)
        y = _pq_linear_cuda(x, *layer)
        assert scaled_err(y, x, *layer) < SCALED_TOL[torch.bfloat16]


def test_gemv_rejects_many_tokens():
    layer = make_layer(37, 48, 2, 16)
    with pytest.raises(ValueError, match="at most"):
        pq_linear_triton(activations(17, 48, torch.float16), *layer, kernel="gemv")


def test_opcheck_fake_impl():
    """torch.library.opcheck on the op (CPU kernel + the fake impl used by torch.compile)."""
    layer = make_layer(37, 48, 2, 16, "matrix", 2, offsets=True, device="cpu")
    x = torch.randn(3, 48, dtype=torch.float16)
    torch.library.opcheck(torch.ops.fasq.pq_linear.default, (x, *layer),
                          test_utils=("test_schema", "test_faketensor"))


# --- real GPU ---------------------------------------------------------------------------

gpu = pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 4096), (4096, 14336)])
@pytest.mark.parametrize("dk", [(2, 256), (4, 4096), (1, 16)])
@pytest.mark.parametrize("T", [1, 4, 16, 128, 512])
def test_gpu_realistic_shapes(shape, dk, T):
    out, in_ = shape
    d, K = dk
    layer = make_layer(out, in_, d, K, "matrix", "row" if d > 1 else 32, offsets=d == 1)
    x = activations(T, in_, torch.float16)
    for kernel in KERNELS:
        if kernel == "gemv" and T > 16:
            continue
        if kernel == "lut_gemm" and K > 256 and T > 16:
            continue  # correct but slow (K / BLOCK_K LUT passes)
        run(kernel, x, layer)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("T", [1, 8, 64])
def test_gpu_custom_op(T):
    import fasq.kernels  # noqa: F401  (registers the CUDA implementation)
    layer = make_layer(4096, 4096, 2, 256, "matrix", "row")
    x = activations(T, 4096, torch.bfloat16)
    y = torch.ops.fasq.pq_linear(x, *layer)
    assert scaled_err(y, x, *layer) < SCALED_TOL[torch.bfloat16]
    torch.library.opcheck(torch.ops.fasq.pq_linear.default, (x, *layer),
                          test_utils=("test_schema", "test_faketensor"))
