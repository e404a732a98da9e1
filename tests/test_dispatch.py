"""select_kernel: the pure dispatch function (no triton, no GPU needed)."""

import subprocess
import sys

import pytest

from fasq.kernels import dispatch
from fasq.kernels import KERNELS
from fasq.kernels.dispatch import select_kernel


def test_decode_tokens_use_gemv():
    for tokens in range(1, dispatch.GEMV_MAX_TOKENS + 1):
        assert select_kernel("cuda", tokens, 2, 256) == "gemv"


def test_small_codebooks_rebuild_the_weight_from_two_tokens():
    t = dispatch.GEMV_MAX_TOKENS + 1
    for d, K in ((1, 16), (2, 256), (4, 256), (2, dispatch.REBUILD_MAX_CODEBOOK // 2)):
        assert select_kernel("cuda", t, d, K) == "dequant_cublas"


def test_large_codebooks_use_the_fused_tensor_core_gemm_until_many_tokens():
    t = dispatch.GEMV_MAX_TOKENS + 1
    assert select_kernel("cuda", t, 4, 4096) == "dequant_gemm"
    assert select_kernel("cuda", dispatch.CUBLAS_MIN_TOKENS - 1, 4, 4096) == "dequant_gemm"
    assert select_kernel("cuda", t, 2, dispatch.REBUILD_MAX_CODEBOOK) == "dequant_gemm"


def test_many_tokens_rebuild_the_weight_for_cublas():
    for tokens in (dispatch.CUBLAS_MIN_TOKENS, 2048, 100_000):
        for d, K in ((1, 16), (2, 256), (4, 4096)):
            assert select_kernel("cuda", tokens, d, K) == "dequant_cublas"


def test_lut_gemm_is_never_chosen_automatically():
    for tokens in (1, 2, 3, 8, 16, 32, 53, 127, 128, 2048):
        for d, K in ((1, 16), (2, 16), (2, 256), (4, 4096), (8, 65536)):
            assert select_kernel("cuda", tokens, d, K) != "lut_gemm"


def test_reference_without_gpu_or_triton():
    assert select_kernel("cpu", 1, 2, 256) == "reference"
    assert select_kernel("mps", 100, 2, 256) == "reference"
    assert select_kernel("cuda", 1, 2, 256, has_triton=False) == "reference"
    assert select_kernel("cuda", 0, 2, 256) == "reference"
    # The interpreter runs the kernels on CPU tensors (tests).
    assert select_kernel("cpu", 1, 2, 256, interpret=True) == "gemv"


def test_always_a_known_name():
    for dev in ("cuda", "cpu"):
        for tokens in (0, 1, 3, 8, 9, 17, 32, 33, 64, 2048):
            for d in (1, 2, 3, 4, 8, 16):
                for K in (2, 16, 256, 4096, 65536):
                    assert select_kernel(dev, tokens, d, K) in KERNELS


def test_thresholds_are_consistent():
    assert 1 <= dispatch.GEMV_MAX_TOKENS <= dispatch.GEMV_TOKEN_LIMIT
    assert dispatch.GEMV_MAX_TOKENS < dispatch.CUBLAS_MIN_TOKENS


def test_import_without_triton():
    """`import fasq` and `import fasq.kernels` work without triton; calling a kernel says why not."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import fasq, fasq.kernels as k, torch\n"
        "assert not k.HAS_TRITON\n"
        "x = torch.randn(1, 4, dtype=torch.float16); c = torch.zeros(3, 2, dtype=torch.uint8)\n"
        "cb = torch.randn(1, 4, 2, dtype=torch.float16)\n"
        "try:\n"
        "    k.pq_linear_triton(x, c, cb, kernel='gemv')\n"
        "except RuntimeError as e:\n"
        "    assert 'triton' in str(e); print('ok')\n"
        "y = k.pq_linear_triton(x, c, cb)  # auto -> reference on CPU\n"
        "assert y.shape == (1, 3)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


@pytest.mark.parametrize("bad", ["gemm", "", "LUT"])
def test_unknown_kernel_name(bad):
    import torch

    from fasq.kernels import pq_linear_triton
    x = torch.randn(1, 4)
    with pytest.raises(ValueError, match="unknown kernel"):
        pq_linear_triton(x, torch.zeros(3, 2, dtype=torch.uint8), torch.randn(1, 4, 2), kernel=bad)
