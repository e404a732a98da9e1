"""The CPU kernels of `fasq::pq_linear`: a small C++ library (csrc/pq_cpu*.cpp) called
through ctypes, with the same signatures as the reference ops in `fasq.core.ops`; the path is
picked and the op registered in `linear.py` (`pq_linear_cpu`).

Paths (see `dispatch.select_cpu_kernel`):
    cpu_int8     decode, 1-16 tokens, d=2 K<=256 and d=1 K<=16 (RTN 4-bit included) on
                 AVX-512 VBMI+VNNI, K<=16 and RTN 8-bit on AVX2 (int8.py): int8 copies of
                 the codebooks looked up 64 (AVX2: 32) codes at a time, integer dot products
                 with int8 activations; within int8 rounding of the exact result.
                 Automatic for d=2 and RTN's integer grid; d=1 float codebooks only
                 with FASQ_CPU_INT8=all. FASQ_CPU_INT8=0 turns it off; elsewhere
                 cpu_gemv runs
    cpu_gemv     decode: codes index the codebooks, centroids go straight into SIMD
                 registers and FMAs; W is never built (a few tokens)
    cpu_dequant  prefill: the library rebuilds W once per call into a reused buffer, then
                 torch's matmul
    reference    torch dequantize-then-matmul (`ops.pq_linear_dequant`)

Why ctypes and a plain C ABI: the library depends on neither Python's nor torch's ABI, so
one build serves every torch version and could ship prebuilt in a wheel; it builds in
about 10 s with the system C++ compiler. Only the thin C++ op of `torch_ops.py`, which runs
decode calls from the dispatcher without Python, is built against torch (about 5 s). The
instruction set is chosen inside the library at run time: AVX-512 (small codebooks) and
AVX2+FMA+F16C where the CPU has them, else portable C that the compiler vectorises (SSE2,
NEON). Threads: OpenMP, sharing torch's libgomp, with torch's thread count.

Where the library is looked for: next to this file (a prebuilt `_fasq_cpu*.so`), else it is
compiled once into a cache folder ($FASQ_CACHE_DIR, else $XDG_CACHE_HOME/fasq or
~/.cache/fasq) keyed by the source's hash. If neither works, the reference path runs and
one warning says why. Nothing is compiled at import time.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
import weakref
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ..dispatch import CPU_KERNELS

# One library: the pq_linear kernels and the k-means helpers (kmeans.py)
# pq_cpu.cpp: the exact kernels' C ABI, portable path and choice of instruction set;
# pq_cpu_avx2.cpp / pq_cpu_avx512.cpp: one instruction set each;
# pq_cpu_int8.cpp: the int8 path's preparation and C ABI, its kernels in pq_cpu_int8_avx512.cpp
# and pq_cpu_int8_avx2.cpp; dense_cpu_bf16.cpp: decode of the layers kept dense in bf16 (dense.py)
SOURCES = tuple(Path(__file__).with_name("csrc") / f for f in ("pq_cpu.cpp", "pq_cpu_avx2.cpp", "pq_cpu_avx512.cpp",
                                                                 "pq_cpu_int8.cpp", "pq_cpu_int8_avx512.cpp",
                                                                 "pq_cpu_int8_avx2.cpp", "dense_cpu_bf16.cpp",
                                                                 "kmeans_cpu.cpp"))
HEADERS = tuple(Path(__file__).with_name("csrc") / f  # included by the sources: part of the cache key
                for f in ("pq_cpu.h", "pq_cpu_kernels.h", "pq_cpu_int8.h"))
_ERRORS = {1: "non-positive size", 2: "in_features not divisible by d", 3: "codebooks do not divide the subspaces",
           4: "scale groups do not divide the subspaces", 5: "offsets without scales", 6: "unsupported code dtype",
           7: "unsupported codebook or scale dtype"}

_lib = None
_lib_error: str | None = None
_lock = threading.Lock()


def cache_dir() -> Path:
    if os.environ.get("FASQ_CACHE_DIR"):
        return Path(os.environ["FASQ_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fasq"


def compile_shared(dest: Path, sources: list[Path], variants: list[list[str]], link: list[str] = ()) -> None:
    """Compile `sources` into the shared library `dest` (written to a temporary name, then
    renamed) with the first of the flag lists `variants` the compiler accepts; `link`: linker
    arguments, placed after the sources (libraries before them are dropped as unneeded)."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++ / clang++)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=dest.parent)
    os.close(fd)
    try:
        for flags in variants:
            r = subprocess.run([cxx, *flags, "-fPIC", "-shared", *map(str, sources), *link, "-o", tmp],
                               capture_output=True, text=True)
            if r.returncode == 0:
                os.replace(tmp, dest)
                return
        raise RuntimeError(f"{cxx} failed to build {', '.join(f.name for f in sources)}:\n{r.stderr[-2000:]}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build(dest: Path) -> None:
    # OpenMP where the compiler has it (Apple clang does not): then single-threaded.
    compile_shared(dest, list(SOURCES), [["-O3", "-std=c++17", "-fopenmp"], ["-O3", "-std=c++17"]])


def library_path() -> Path:
    """Where the compiled library is (prebuilt beside this file) or will be cached."""
    prebuilt = sorted(Path(__file__).parent.glob("_fasq_cpu*.so"))
    if prebuilt:
        return prebuilt[0]
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in SOURCES + HEADERS)).hexdigest()[:16]
    return cache_dir() / f"cpu-{sys.platform}-{platform.machine()}-{digest}" / "libfasq_cpu.so"


def _declare(lib) -> None:
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.fasq_cpu_pq_linear_args.argtypes = [ptr, ptr, i32, i64, ptr, i32]
    lib.fasq_cpu_pq_linear_args.restype = i32
    lib.fasq_cpu_dequantize_args.argtypes = [ptr, ptr, i32, i32]
    lib.fasq_cpu_dequantize_args.restype = i32
    lib.fasq_cpu_isa.restype = ctypes.c_char_p
    lib.fasq_cpu_set_isa.argtypes = [i32]
    lib.fasq_cpu_set_isa.restype = i32
    lib.fasq_cpu_int8_available.restype = i32
    lib.fasq_cpu_int8_takes.argtypes = [i64, i64]
    lib.fasq_cpu_int8_takes.restype = i32
    lib.fasq_cpu_int8_lookup.restype = i32
    lib.fasq_cpu_int8_set_lookup.argtypes = [i32]
    lib.fasq_cpu_int8_set_lookup.restype = i32
    lib.fasq_cpu_int8_sizes.argtypes = [ptr, ptr]
    lib.fasq_cpu_int8_sizes.restype = i32
    lib.fasq_cpu_int8_prepare.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr]
    lib.fasq_cpu_int8_prepare.restype = i32
    lib.fasq_cpu_int8_linear.argtypes = [ptr, ptr, i32, i64, ptr, i32]
    lib.fasq_cpu_int8_linear.restype = i32
    lib.fasq_cpu_int8_linear_parts.argtypes = [ptr, i32, ptr, i32, i64, ptr, i32]
    lib.fasq_cpu_int8_linear_parts.restype = i32
    lib.fasq_cpu_bf16_available.restype = i32
    lib.fasq_cpu_bf16_linear.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, i32]
    lib.fasq_cpu_bf16_linear.restype = i32
    lib.fasq_cpu_kmeans_assign.argtypes = [ptr, ptr, i64, i64, i64, i64, ptr, ptr, i32]
    lib.fasq_cpu_kmeans_assign.restype = i32
    lib.fasq_cpu_kmeanspp.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, i32]
    lib.fasq_cpu_kmeanspp.restype = i32


# the values of an on/off environment switch (FASQ_CPU_INT8, FASQ_CPU_DENSE, FASQ_CPU_OPS,
# FASQ_CPU_HUGEPAGES) that turn it off, stripped and lower-cased (torch_ops.cpp reads
# FASQ_CPU_INT8 the same way)
OFF = ("0", "false", "no", "off")


def switched_off(var: str) -> bool:
    """Whether the environment switch `var` is set to one of OFF (unset: on)."""
    return os.environ.get(var, "").strip().lower() in OFF


def built(path: Path, build, allowed: bool = True) -> Path | None:
    """`path` of a compiled library if it is there, else where `build(dest)` made it: `path`,
    or the same name in the temp folder where the cache folder cannot be written. None where
    it is missing and `allowed` is False."""
    if path.is_file():
        return path
    if not allowed:
        return None
    try:
        build(path)
    except PermissionError:  # an unwritable cache folder: build in the temp folder
        path = Path(tempfile.gettempdir()) / f"fasq-{os.getuid()}" / path.parent.name / path.name
        if not path.is_file():
            build(path)
    return path


def load_library(build: bool = True):
    """The ctypes library, building it on first use; None (with one warning) if impossible."""
    global _lib, _lib_error
    if _lib is not None or _lib_error is not None:
        return _lib
    with _lock:
        if _lib is not None or _lib_error is not None:
            return _lib
        try:
            path = built(library_path(), _build, build)
            if path is None:
                return None
            lib = ctypes.CDLL(str(path))
            _declare(lib)
            _lib = lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            _lib_error = str(e)
            warnings.warn(f"fasq: the CPU kernel could not be built or loaded ({e}); fasq layers on the CPU "
                          "use the slower reference path (dequantize, then matmul)", RuntimeWarning, stacklevel=3)
    return _lib


def available() -> bool:
    return load_library() is not None


def isa() -> str:
    """The widest instruction set the CPU kernel uses here (one of ISAS), or "unavailable"."""
    lib = load_library()
    return lib.fasq_cpu_isa().decode() if lib is not None else "unavailable"


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# Element-type codes of the C API for codebooks, scales and offsets.
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _native(t: Tensor | None) -> tuple[Tensor | None, int]:
    """(t as the library reads it, its dtype code): fp32/fp16/bf16 as they are."""
    if t is None:
        return None, 0
    if t.dtype not in _DTYPE_CODE:
        t = t.to(torch.float32)
    return t.contiguous(), _DTYPE_CODE[t.dtype]


# fp32 codebooks that hold fp16 values exactly (checkpoints store fp16 codebooks, a model
# loaded in fp32 upcasts them) are read as fp16: half the bytes per centroid, same result.
# The check runs once per codebook tensor (and again after an in-place change or `.data =`).
_fp16_copies = WeakIdKeyDictionary()


def _codebooks(codebooks: Tensor) -> tuple[Tensor, int]:
    if codebooks.dtype != torch.float32 or codebooks.requires_grad:
        return _native(codebooks)
    hit, now = _fp16_copies.get(codebooks), (version(codebooks), codebooks.data_ptr())  # `.data =` moves it
    if hit is None or hit[0] != now:
        half = codebooks.to(torch.float16)
        exact = bool(torch.equal(half.to(torch.float32), codebooks))
        hit = (now, half.contiguous() if exact else None)
        _fp16_copies[codebooks] = hit
    return (hit[1], 1) if hit[1] is not None else _native(codebooks)


def _check(err: int, what: str) -> None:
    if err:
        raise ValueError(f"fasq CPU kernel ({what}): {_ERRORS.get(err, f'error {err}')}")


def _check_features(x: Tensor, plan: "_Plan") -> None:
    if x.shape[-1] != plan.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, codes/codebooks describe in = {plan.in_features}")


ISAS = ("portable", "avx2", "avx512")  # widening instruction sets of the library


@contextlib.contextmanager
def limit_isa(name: str):
    """Inside this block the library uses at most the instruction set `name` (one of ISAS),
    e.g. "portable" to run the plain C loops where AVX2 is present (tests, comparisons).
    FASQ_CPU_ISA=portable|avx2 does the same for a whole process."""
    if name not in ISAS:
        raise ValueError(f"unknown instruction set {name!r}; choose one of {ISAS}")
    lib = load_library()
    if lib is None:
        raise RuntimeError(f"the fasq CPU kernel is unavailable: {_lib_error}")
    old = lib.fasq_cpu_set_isa(ISAS.index(name))
    try:
        yield
    finally:
        lib.fasq_cpu_set_isa(old)


_forced: str | None = None
# told whether a `use_kernel` block is open (True) as one opens or closes: torch_ops.py's
# compiled op, which must then pass every call to the Python path
_forced_listeners: list = []


@contextlib.contextmanager
def use_kernel(name: str):
    """Make every fasq::pq_linear call on the CPU inside this block take the path `name`
    (one of CPU_KERNELS), e.g. "reference" to time or check against the old path.
    FASQ_CPU_KERNEL=name does the same for a whole process (e.g. cpu_int8 to run prefill
    through the int8 kernel too, for a perplexity of the decode arithmetic)."""
    global _forced
    if name not in CPU_KERNELS:
        raise ValueError(f"unknown CPU kernel {name!r}; choose one of {CPU_KERNELS}")
    old, _forced = _forced, name
    for tell in _forced_listeners:
        tell(True)
    try:
        yield
    finally:
        _forced = old
        for tell in _forced_listeners:
            tell(old is not None)


class _LayerArgs(ctypes.Structure):
    """Mirror of FasqLayerArgs in csrc/pq_cpu.h (every field 8 bytes)."""

    _fields_ = [(n, ctypes.c_void_p if n in ("codes", "codebooks", "scales", "offsets", "bias") else ctypes.c_int64)
                for n in ("in_", "out", "codes", "code_bytes", "codebooks", "cb_dtype", "C", "K", "d", "scales",
                          "offsets", "scale_dtype", "S", "bias", "bias_dtype")]


class _Plan:
    """One layer's validated and prepared kernel arguments (for the decode kernel and the
    dequantize alike), reused while its tensors stay the same objects at the same versions
    (decode calls a layer thousands of times)."""

    def __init__(self, codes, codebooks, scales, offsets, bias):
        # weak references to the caller's tensors, strong ones only to copies made here: a plan
        # lives as long as its codes tensor (_plans), and a strong reference from it to that
        # tensor (or to the layer's others) would keep every layer ever called alive
        self.src = tuple(None if t is None else weakref.ref(t) for t in (codebooks, scales, offsets, bias))
        self.versions = _versions(codes, codebooks, scales, offsets, bias)
        self.codebooks = self.src[0]  # codebooks() while the layer lives
        out_f, M = codes.shape
        C, K, d = codebooks.shape
        if offsets is not None and scales is None:
            raise ValueError("fasq CPU kernel: offsets without scales (W = codebook * scale + offset needs both)")
        if codes.dtype not in (torch.uint8, torch.int16, torch.int32):
            raise ValueError(f"codes must be uint8, int16 or int32 (fasq.core.ops.code_dtype), got {codes.dtype}")
        given = (codes, codebooks, scales, offsets, bias)
        codes = codes.contiguous()
        (cb, cbt), (sc, st), (bi, bt) = _codebooks(codebooks), _native(scales), _native(bias)
        of = None if offsets is None else offsets.to(sc.dtype).contiguous()
        # what the pointers point into: the caller's tensors (alive at every call that uses
        # this plan, which passes them) or copies, kept here
        self.keep = tuple(t for t in (codes, cb, sc, of, bi) if t is not None and not any(t is g for g in given))
        self.in_features, self.out_features = M * d, out_f
        self.args = _LayerArgs(M * d, out_f, codes.data_ptr(), codes.element_size(), cb.data_ptr(), cbt, C, K, d,
                               _ptr(sc), _ptr(of), st, 0 if scales is None else scales.shape[1], _ptr(bi), bt)
        self.address = ctypes.addressof(self.args)

    def current(self, codes, codebooks, scales, offsets, bias) -> bool:
        src = self.src
        return (src[0]() is codebooks and _is(src[1], scales) and _is(src[2], offsets) and _is(src[3], bias)
                and self.versions == _versions(codes, codebooks, scales, offsets, bias))


def _is(ref, t) -> bool:
    """Whether weak reference `ref` (None for an absent tensor) points to `t`."""
    return t is None if ref is None else ref() is t


def version(t: Tensor) -> int:
    """t's version counter; -1 for an inference tensor (made under torch.inference_mode), which
    has none: writing into one in place goes unseen, so such layers are changed by replacing
    their tensors (new objects), as loading a model does."""
    return -1 if t.is_inference() else t._version


def _versions(codes, codebooks, scales, offsets, bias) -> tuple:
    """In-place changes bump a tensor's version; `.data = ...` does not, but moves its data.
    Spelled out (no loop): it runs on every decode call the C++ op (torch_ops.py) passes on."""
    return (version(codes), codes.data_ptr(), version(codebooks), codebooks.data_ptr(),
            None if scales is None else (version(scales), scales.data_ptr()),
            None if offsets is None else (version(offsets), offsets.data_ptr()),
            None if bias is None else (version(bias), bias.data_ptr()))


class _PlanCache:
    """codes tensor -> its _Plan, dropped when the tensor is freed; a plain dict by id with a
    weak reference to check (a decode call looks its layer up every time, and
    WeakIdKeyDictionary's lookup costs 0.8 us against 0.1 here)."""

    def __init__(self):
        self._d: dict[int, tuple[weakref.ref, _Plan]] = {}

    def get(self, codes) -> "_Plan | None":
        hit = self._d.get(id(codes))
        return hit[1] if hit is not None and hit[0]() is codes else None

    def put(self, codes, plan: "_Plan") -> None:
        key, d = id(codes), self._d

        def drop(ref, key=key):  # the tensor is gone: forget its plan (unless replaced since)
            if d.get(key, (None,))[0] is ref:
                del d[key]
        d[key] = (weakref.ref(codes, drop), plan)

    def __len__(self) -> int:
        return len(self._d)


_plans = _PlanCache()


def _plan(codes, codebooks, scales, offsets, bias) -> _Plan:
    plan = _plans.get(codes)
    if plan is None or not plan.current(codes, codebooks, scales, offsets, bias):
        plan = _Plan(codes, codebooks, scales, offsets, bias)
        _plans.put(codes, plan)
    return plan


def gemv(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor | None = None,
         offsets: Tensor | None = None, bias: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """Decode path: y[..., out] = x[..., in] @ W.T + bias without building W.

    x: [..., in] fp32, bf16 or fp16 (other dtypes go through fp32); y has x's dtype.
    out: optional contiguous [tokens, out] tensor of that dtype to write into.
    A layer's arguments are prepared once and reused (while its tensors are unchanged), so
    a call costs a few microseconds of Python besides the kernel.
    """
    plan = _plan(codes, codebooks, scales, offsets, bias)
    return run_linear(x, plan, out, load_library().fasq_cpu_pq_linear_args, (plan.address,), "gemv")


def run_linear(x: Tensor, plan: "_Plan", out: Tensor | None, entry, head: tuple, what: str,
               out_features: int | None = None) -> Tensor:
    """The decode paths' shared body (plan: a _Plan, or anything with its in_features and
    out_features, as int8's _Prepared): x [..., in] made contiguous in a dtype the library
    reads (read as [T, in]), the output [..., out] (or `out`, a [T, out], checked), then
    `entry(*head, x_ptr, x_dtype_code, T, y_ptr, threads)` (a library entry point, 0 on
    success); y comes back in x's dtype and leading shape. out_features: of several layers
    computed together (else the plan's). Lean on purpose: it runs once per layer and token,
    and at decode its Python time is a visible part of a token."""
    _check_features(x, plan)
    xk = x if x.dtype in _DTYPE_CODE else x.float()
    if not xk.is_contiguous():
        xk = xk.contiguous()
    out_f = plan.out_features if out_features is None else out_features
    T = xk.numel() // plan.in_features if plan.in_features else xk.shape[:-1].numel()
    if out is None:
        y = torch.empty(xk.shape[:-1] + (out_f,), dtype=xk.dtype)
    elif out.shape != (T, out_f) or out.dtype != xk.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {xk.dtype} tensor of shape {(T, out_f)}")
    else:
        y = out if x.dim() == 2 else out.view(*x.shape[:-1], out_f)
    if T:
        _check(entry(*head, xk.data_ptr(), _DTYPE_CODE[xk.dtype], T, y.data_ptr(), torch.get_num_threads()), what)
    return y if y.dtype == x.dtype else y.to(x.dtype)


# One reused weight buffer per thread and (numel, dtype): prefill rebuilds W every call,
# and a fresh 100+ MB allocation per call would cost page faults.
_buffers = threading.local()


def _weight_buffer(numel: int, dtype: torch.dtype) -> Tensor:
    cache = getattr(_buffers, "cache", None)
    if cache is None:
        cache = _buffers.cache = {}
    buf = cache.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = cache[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def _rebuild(plan: _Plan, dtype: torch.dtype, out: Tensor | None) -> Tensor:
    """W[out, in] of a prepared layer, written by the library as fp32 or bf16."""
    shape = (plan.out_features, plan.in_features)
    W = torch.empty(shape, dtype=dtype) if out is None else out.view(shape)
    _check(load_library().fasq_cpu_dequantize_args(plan.address, W.data_ptr(), _DTYPE_CODE[dtype],
                                                   torch.get_num_threads()), "dequantize")
    return W


def dequantize(codes: Tensor, codebooks: Tensor, scales: Tensor | None = None, offsets: Tensor | None = None,
               dtype: torch.dtype = torch.float32, out: Tensor | None = None) -> Tensor:
    """W[out, in] in fp32 or bf16, rebuilt by the library (into `out` when given)."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"the CPU dequantize writes float32 or bfloat16, not {dtype}")
    return _rebuild(_plan(codes, codebooks, scales, offsets, None), dtype, out)


def dequant_matmul(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor | None = None,
                   offsets: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """Prefill path: W rebuilt into a reused buffer (x's dtype if fp32/bf16), then matmul.
    Shares the layer's prepared arguments with the decode kernel (same plan, bias included)."""
    plan = _plan(codes, codebooks, scales, offsets, bias)
    _check_features(x, plan)
    wdtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
    W = _rebuild(plan, wdtype, _weight_buffer(plan.out_features * plan.in_features, wdtype))
    y = torch.nn.functional.linear(x.to(wdtype), W, None if bias is None else bias.to(wdtype))
    return y.to(x.dtype)
