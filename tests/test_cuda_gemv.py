"""The CUDA C++ decode GEMV (fasq.kernels.cuda.gemv).

Without a GPU (CI): every kernel variant compiles with NVRTC for sm_80 and sm_90, and the
launch geometry is checked. On a GPU (`pytest -m gpu`): results against the float64
oracle on odd shapes, every scope and scale layout, tokens 1, 3, 8, fp16 and bf16, and
CUDA-graph capture and replay.
"""

import concurrent.futures
import platform

import pytest
import torch

from fasq.kernels.cuda import gemv as cuda_gemv

from test_ops import CASES, _dense_ref, _layer

HAS_CUDA = torch.cuda.is_available()


def test_every_variant_compiles_for_sm80_and_sm90():
    if platform.system() != "Linux":
        pytest.skip("NVRTC wheels are Linux-only")
    names = cuda_gemv.variant_names()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # NVRTC releases the GIL: one arch per core
        results = list(pool.map(cuda_gemv.compile_cubin, ["sm_80", "sm_90"]))
    for cubin, lowered in results:
        assert cubin[:4] == b"\x7fELF" and len(cubin) > 100_000
        assert set(lowered) == set(names) and all(v.startswith("_Z") for v in lowered.values())


def test_a_compile_error_is_reported_with_the_log(monkeypatch, tmp_path):
    bad = tmp_path / "bad.cu"
    bad.write_text("namespace fasq { template <int D, int NT, typename C, typename I, int W> __global__ void "
                   "pq_gemv() { undefined_symbol(); } }")
    monkeypatch.setattr(cuda_gemv, "SOURCE", bad)
    with pytest.raises(cuda_gemv.CudaKernelError, match="undefined_symbol"):
        cuda_gemv.compile_cubin("sm_80", [cuda_gemv.kernel_name(2, 1, "int", "float")])


def test_plan():
    # Llama-3-8B q_proj, d=2 K=256 in the default scope: 16 codebooks of 1 KB, 4 copies
    p = cuda_gemv.plan(4096, 2048, 16, 256, 2)
    assert p["repl"] == 4 and p["cbs"] == 16 and p["grid"] == (1024, 1) and p["smem"] == 16 * 1024 * 4
    # d=4 K=4096: 32 KB codebooks, two copies, one per block: 8 codebooks -> 8 splits
    p = cuda_gemv.plan(4096, 1024, 8, 4096, 4)
    assert p["repl"] == 2 and p["cbs"] == 1 and p["grid"] == (1024, 8)
    assert p["smem"] <= cuda_gemv.SMEM_BUDGET
    assert cuda_gemv.plan(4096, 1024, 1, 32768, 4) is None  # 256 KB codebook: another path


def test_supports_only_gpu_half_precision_calls():
    codes, cb, scales, offsets = _layer(*CASES[2])
    assert not cuda_gemv.supports(torch.randn(1, 48).half(), codes, cb)  # CPU tensor
    with pytest.raises(ValueError, match="cuda_gemv handles"):
        cuda_gemv.pq_linear_cuda_gemv(torch.randn(1, 48).half(), codes, cb, scales, offsets)


gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", [c for c in CASES if c[2] in cuda_gemv.DS], ids=str)
@pytest.mark.parametrize("tokens", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_matches_oracle(case, tokens, dtype):
    codes, cb, scales, offsets = (t if t is None else t.cuda() for t in _layer(*case))
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    cb, scales, offsets = cast(cb), cast(scales), cast(offsets)
    x, bias = torch.randn(tokens, case[1], device="cuda").to(dtype), torch.randn(case[0], device="cuda").to(dtype)
    poisoned = torch.full((tokens, case[0]), float("nan"), dtype=dtype, device="cuda")
    y = cuda_gemv.pq_linear_cuda_gemv(x, codes, cb, scales, offsets, bias, out=poisoned)
    assert y.data_ptr() == poisoned.data_ptr() and not torch.isnan(y).any(), "unwritten outputs"
    ref = _dense_ref(x.cpu(), codes.cpu(), cb.cpu(), None if scales is None else scales.cpu(),
                     None if offsets is None else offsets.cpu(), bias.cpu())
    err = float((y.double().cpu() - ref).abs().max() / ref.abs().max())
    assert y.dtype == dtype and err < {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


@pytest.mark.gpu
@gpu
def test_gpu_cuda_graph_capture_and_replay():
    codes, cb, scales, offsets = (t.cuda() for t in _layer(33, 96, 2, 256, 3, 4, True))
    cb, scales, offsets = cb.half(), scales.half(), offsets.half()
    x = torch.randn(1, 96, device="cuda").half()
    cuda_gemv.pq_linear_cuda_gemv(x, codes, cb, scales, offsets)  # compile, load, warm up
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = cuda_gemv.pq_linear_cuda_gemv(x, codes, cb, scales, offsets)
    x.copy_(torch.randn(1, 96, device="cuda").half())
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, cuda_gemv.pq_linear_cuda_gemv(x, codes, cb, scales, offsets))
