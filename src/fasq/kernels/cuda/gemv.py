"""CUDA decode GEMV (csrc/pq_gemv.cu) compiled at run time with NVRTC: no CUDA toolkit
needed, only the NVRTC library that CUDA builds of torch already depend on (the PyPI wheel
`nvidia-cuda-nvrtc-cu12`, installed with `pip install 'fasq[cuda]'`).

    pq_linear_cuda_gemv(x, codes, codebooks, scales=None, offsets=None, bias=None)

Same signature and result as `fasq.core.ops.pq_linear_dequant`, for 1..8 tokens of fp16 / bf16
activations, d in {1, 2, 3, 4, 8}, uint8 / int16 codes (K <= 32768) and codebooks of up
to SMEM_BUDGET bytes each. Every kernel variant is compiled in one NVRTC program per GPU
architecture, cached on disk ($FASQ_CACHE_DIR, else ~/.cache/fasq) and launched through
the CUDA driver API on torch's current stream: no host synchronisation, and the only
allocations are torch's (caching allocator), so CUDA-graph capture works.

Status: compiled for sm_80 and sm_90 by the tests (CPU-only CI); not yet run on a GPU,
so `select_kernel` does not pick it: call it with kernel="cuda_gemv" (see issue notes).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import importlib.util
import json
import os
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

from ..cpu.library import cache_dir

SOURCE = Path(__file__).with_name("csrc") / "pq_gemv.cu"
DS = (1, 2, 3, 4, 8)
NTS = (1, 2, 4, 8)  # token counts compiled (a call uses the smallest >= its tokens)
MAX_TOKENS = NTS[-1]
WARPS = 4  # warps per block, one row each
SMEM_BUDGET = 96 << 10  # dynamic shared memory per block for the staged codebooks
CODE_TYPES = {torch.uint8: "fasq::u8", torch.int16: "fasq::u16"}
IN_TYPES = {torch.float16: "fasq::f16", torch.bfloat16: "fasq::bf16"}


class CudaKernelError(RuntimeError):
    """NVRTC or the CUDA driver is missing or failed; the message says what to install."""


def kernel_name(d: int, nt: int, code_t: str, in_t: str) -> str:
    return f"fasq::pq_gemv<{d}, {nt}, {code_t}, {in_t}, {WARPS}>"


def variant_names() -> list[str]:
    names = [kernel_name(d, nt, c, t) for d in DS for nt in NTS for c in CODE_TYPES.values()
             for t in IN_TYPES.values()]
    return names + [f"fasq::pq_epilogue<{t}>" for t in IN_TYPES.values()]


# --- NVRTC ---------------------------------------------------------------------------------

def _nvrtc_candidates() -> list[str]:
    found = []
    if os.environ.get("FASQ_NVRTC"):
        found.append(os.environ["FASQ_NVRTC"])
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations if spec else []):
        for sub in ("cuda_nvrtc/lib", "cu13/lib", "cu12/lib"):
            found += sorted(str(p) for p in Path(root, sub).glob("libnvrtc.so*") if "alt" not in p.name)
    found += sorted(str(p) for p in Path(torch.__file__).parent.joinpath("lib").glob("libnvrtc*.so*"))
    if ctypes.util.find_library("nvrtc"):
        found.append(ctypes.util.find_library("nvrtc"))
    found += sorted(str(p) for p in Path("/usr/local/cuda/lib64").glob("libnvrtc.so*"))
    return found


_nvrtc = None


def nvrtc():
    """The NVRTC library (ctypes), or CudaKernelError saying how to get it."""
    global _nvrtc
    if _nvrtc is None:
        errors = []
        for path in _nvrtc_candidates():
            try:
                _nvrtc = ctypes.CDLL(path)
                break
            except OSError as e:
                errors.append(str(e))
        else:
            raise CudaKernelError("NVRTC not found: pip install 'fasq[cuda]' (nvidia-cuda-nvrtc-cu12), or set "
                                  "FASQ_NVRTC to a libnvrtc.so" + (f" ({'; '.join(errors)})" if errors else ""))
        _nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
    return _nvrtc


def _check(lib, rc: int, what: str, log: str = "") -> None:
    if rc != 0:
        msg = lib.nvrtcGetErrorString(rc).decode()
        raise CudaKernelError(f"NVRTC {what} failed ({msg})" + (f":\n{log[-4000:]}" if log else ""))


def compile_cubin(arch: str, names: list[str] | None = None) -> tuple[bytes, dict[str, str]]:
    """Compile SOURCE for `arch` ("sm_90", ...): (cubin, {name expression: lowered name})."""
    lib = nvrtc()
    names = names or variant_names()
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), SOURCE.read_bytes(), b"pq_gemv.cu", 0, None, None),
           "create")
    try:
        for n in names:
            _check(lib, lib.nvrtcAddNameExpression(prog, n.encode()), "add name")
        opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17", b"-default-device"]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        _check(lib, rc, f"compile of {SOURCE.name} for {arch}", log.value.decode(errors="replace"))
        _check(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
        cubin = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetCUBIN(prog, cubin), "cubin")
        lowered = {}
        for n in names:
            p = ctypes.c_char_p()
            _check(lib, lib.nvrtcGetLoweredName(prog, n.encode(), ctypes.byref(p)), "lowered name")
            lowered[n] = p.value.decode()
        return cubin.raw, lowered
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def cached_cubin(arch: str) -> tuple[bytes, dict[str, str]]:
    """compile_cubin(arch), from the disk cache when this source was compiled before."""
    digest = hashlib.sha256(SOURCE.read_bytes() + json.dumps(variant_names()).encode()).hexdigest()[:16]
    folder = cache_dir() / f"cuda-{arch}-{digest}"
    cub, names = folder / "pq_gemv.cubin", folder / "names.json"
    if cub.is_file() and names.is_file():
        return cub.read_bytes(), json.loads(names.read_text())
    cubin, lowered = compile_cubin(arch)
    folder.mkdir(parents=True, exist_ok=True)
    for path, data in ((cub, cubin), (names, json.dumps(lowered).encode())):
        fd, tmp = tempfile.mkstemp(dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return cubin, lowered


# --- CUDA driver ---------------------------------------------------------------------------

_driver = None
_modules: dict[int, tuple[ctypes.c_void_p, dict[str, ctypes.c_void_p]]] = {}
_lock = threading.Lock()
_ATTR_MAX_DYNAMIC_SHARED = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES


def _cu(rc: int, what: str) -> None:
    if rc != 0:
        raise CudaKernelError(f"CUDA driver call {what} failed with error {rc}")


def driver():
    global _driver
    if _driver is None:
        try:
            _driver = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise CudaKernelError(f"the CUDA driver (libcuda.so.1) is not loadable: {e}") from e
    return _driver


def _functions(device: torch.device) -> dict[str, ctypes.c_void_p]:
    """This device's module (loaded once into torch's context) and its kernel handles."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    with _lock:
        if idx not in _modules:
            major, minor = torch.cuda.get_device_capability(idx)
            cubin, lowered = cached_cubin(f"sm_{major}{minor}")
            cu = driver()
            with torch.cuda.device(idx):
                torch.cuda.init()
                mod = ctypes.c_void_p()
                _cu(cu.cuModuleLoadData(ctypes.byref(mod), ctypes.c_char_p(cubin)), "cuModuleLoadData")
                fns = {}
                for name, low in lowered.items():
                    f = ctypes.c_void_p()
                    _cu(cu.cuModuleGetFunction(ctypes.byref(f), mod, low.encode()), f"cuModuleGetFunction({name})")
                    _cu(cu.cuFuncSetAttribute(f, _ATTR_MAX_DYNAMIC_SHARED, SMEM_BUDGET), "cuFuncSetAttribute")
                    fns[name] = f
            _modules[idx] = (mod, fns)
        return _modules[idx][1]


def _launch(fn, grid: tuple[int, int], block: int, smem: int, args: list) -> None:
    params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args])
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    _cu(driver().cuLaunchKernel(fn, grid[0], grid[1], 1, block, 1, 1, smem, stream, params, None), "cuLaunchKernel")


# --- launcher ------------------------------------------------------------------------------

def plan(out: int, M: int, C: int, K: int, d: int) -> dict | None:
    """Launch geometry for a layer, or None when a codebook exceeds SMEM_BUDGET. Codebooks
    are staged `cbs` at a time (`splits` blocks share a row) with `repl` copies (4 when
    small codebooks allow: fewer bank conflicts on random centroid reads)."""
    cb_bytes = K * d * 2
    if cb_bytes > SMEM_BUDGET:
        return None
    repl = next(r for r in (4, 2, 1) if cb_bytes * r <= SMEM_BUDGET)
    cbs = min(C, SMEM_BUDGET // (cb_bytes * repl))
    return {"grid": ((out + WARPS - 1) // WARPS, (C + cbs - 1) // cbs), "block": WARPS * 32, "cbs": cbs,
            "repl": repl, "smem": ((cbs * K * d + 1) // 2) * 4 * repl}


def supports(x: Tensor, codes: Tensor, codebooks: Tensor) -> bool:
    """Whether pq_linear_cuda_gemv handles this call (else another path must)."""
    T = x.numel() // max(1, x.shape[-1])
    C, K, d = codebooks.shape
    return (x.is_cuda and x.dtype in IN_TYPES and codes.dtype in CODE_TYPES and d in DS and 1 <= T <= MAX_TOKENS
            and plan(codes.shape[0], codes.shape[1], C, K, d) is not None)


def pq_linear_cuda_gemv(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor | None = None,
                        offsets: Tensor | None = None, bias: Tensor | None = None,
                        out: Tensor | None = None) -> Tensor:
    """y[..., out] = x[..., in] @ dequantize(codes, codebooks, scales, offsets).T + bias.

    x: [..., in] fp16/bf16; codes: [out, M]; codebooks: [C, K, d]; scales, offsets: [out, S];
    bias: [out]; out: optional contiguous [T, out] of x's dtype to write into (tests poison it)."""
    out_f, M = codes.shape
    C, K, d = codebooks.shape
    if not supports(x, codes, codebooks):
        raise ValueError(f"cuda_gemv handles 1..{MAX_TOKENS} tokens of fp16/bf16 on a GPU, d in {DS}, uint8/int16 "
                         f"codes and codebooks up to {SMEM_BUDGET} bytes; got x {tuple(x.shape)} {x.dtype} on "
                         f"{x.device}, codes {codes.dtype}, codebooks {tuple(codebooks.shape)}")
    if x.shape[-1] != M * d:
        raise ValueError(f"x has {x.shape[-1]} features, codes/codebooks describe in = {M}*{d}")
    if offsets is not None and scales is None:
        raise ValueError("offsets need scales")
    dt = x.dtype
    xk = x.reshape(-1, M * d).contiguous()  # [T, in]
    T = xk.shape[0]
    nt = next(n for n in NTS if n >= T)
    as_dt = lambda t: None if t is None else t.to(dt).contiguous()  # noqa: E731
    cb, sc, of, bi = as_dt(codebooks), as_dt(scales), as_dt(offsets), as_dt(bias)
    codes = codes.contiguous()
    S = scales.shape[1] if scales is not None else 1
    p = plan(out_f, M, C, K, d)
    fns = _functions(x.device)
    y32 = torch.zeros(T, out_f, dtype=torch.float32, device=x.device)
    y = torch.empty(T, out_f, dtype=dt, device=x.device) if out is None else out
    if y.shape != (T, out_f) or y.dtype != dt or not y.is_contiguous() or y.device != x.device:
        raise ValueError(f"out must be a contiguous [{T}, {out_f}] {dt} tensor on {x.device}")
    ptr = lambda t: ctypes.c_void_p(0 if t is None else t.data_ptr())  # noqa: E731
    i32 = ctypes.c_int
    fn = fns[kernel_name(d, nt, CODE_TYPES[codes.dtype], IN_TYPES[dt])]
    _launch(fn, p["grid"], p["block"], p["smem"],
            [ptr(xk), ptr(codes), ptr(cb), ptr(sc), ptr(of), ptr(y32), i32(T), i32(out_f), i32(M), i32(K),
             i32(M // C), i32(p["cbs"]), i32(S), i32(M // S), i32(p["repl"])])
    n = T * out_f
    _launch(fns[f"fasq::pq_epilogue<{IN_TYPES[dt]}>"], ((n + 255) // 256, 1), 256, 0,
            [ptr(y32), ptr(bi), ptr(y), i32(T), i32(out_f)])
    return y.reshape(*x.shape[:-1], out_f)
