"""CPU decode through int8 lookups and integer dot products (csrc/pq_cpu_int8.cpp): the
"cpu_int8" path of `fasq.kernels.cpu.library`.

At a layer's first call its codebooks are copied as int8 (one step per codebook: max |value|
/ 127, or 1 when every value is an integer in [-127, 127], as RTN's grid: then the copy is
exact), its codes repacked so that 16 rows share each 64-byte SIMD register (two codes a
byte at d=1 K<=16), and its scales
and offsets laid out 16 rows at a time; the checkpoint is unchanged, and the copies live
beside the layer's prepared arguments (rebuilt when a tensor changes), in huge pages where
Linux gives them (memory.py: each call streams the codes). Per call the
activations are quantized to int8 per 16 columns. The result differs from the exact float
path by the int8 rounding of codebooks and activations (bounded in tests/test_cpu_int8.py);
WikiText-2 perplexity of the default checkpoint moves by far less than the 0.5 % allowed
(README, "Speed on the CPU").

Taken: uint8 codes, codebook runs and scale groups of whole 8-column steps, and
  - on CPUs with AVX-512 VBMI and VNNI (and the instruction-set cap at "avx512"): d=2 K <= 256
    (lookups by vpermi2b; vpermb at K <= 64), d=1 K <= 16 (d=1 K=16, RTN at 1-4 bits: lookups
    by vpermb) and RTN at 8 bits (no lookup: a code is its value); products by vpdpbusd;
  - on CPUs with AVX2 (Intel before Ice Lake, AMD before Zen 4, or the cap at "avx2"): d=1 and
    d=2 with K <= 16 (lookups by vpshufb) and RTN at 8 bits; products by vpmaddubsw without
    saturation (csrc/pq_cpu_int8.h, SignMode). d=2 K=64 / 256 keep the exact kernel there: a
    64- or 256-entry table would take 4-16 vpshufb a lookup.
Anything else returns None from `prepared`, and the caller keeps the exact float kernel. A
layer is prepared once for either instruction set (the same layout).

Default: automatic selection takes this path for d=2 layers and for d=1 layers whose
codebooks are integers in [-127, 127] (RTN's grid: copied exactly, only the activations are
rounded, and with offsets the grid's midpoint is taken out of the dot products and added back
through the offsets; WikiText-2 of RTN 4-bit g64 on the default model 28.020 -> 28.067,
+0.17 %, AVX-512 and AVX2 alike). d=1 K=16 product quantization (float codebooks) moved WikiText-2 by +0.79 % through
it (24.331 -> 24.524 on the default model), over the 0.5 % the int8 path is allowed, so those
layers keep the exact kernel unless FASQ_CPU_INT8=all (or kernel="cpu_int8") asks for it.

Switches: FASQ_CPU_INT8=0 keeps automatic selection on the float kernel for a process,
FASQ_CPU_INT8=all also sends d=1 layers with float codebooks through the int8 path;
kernel="cpu_gemv" (or `cpu.use_kernel("cpu_gemv")`) keeps the float kernel for a call or a
block.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

import torch
from torch import Tensor

from . import library as cpu, memory, torch_ops

_SUPPORTED_CODE = torch.uint8


def _setting() -> str:
    return os.environ.get("FASQ_CPU_INT8", "1").strip().lower()


def enabled() -> bool:
    """Whether automatic selection may take the int8 path (FASQ_CPU_INT8 unset or not 0)."""
    return _setting() not in cpu.OFF


def chosen(prep: "_Prepared", setting: str | None = None) -> bool:
    """Whether automatic selection takes the int8 path for a prepared layer: by default where
    its accuracy was shown (d=2, or codebooks copied exactly); FASQ_CPU_INT8=all: always.
    `setting`: FASQ_CPU_INT8 as the caller already read it (read here when None)."""
    return prep.default or (_setting() if setting is None else setting) == "all"


ISAS = ("avx2", "avx512")  # the int8 kernels' instruction sets, narrower first


def isa() -> str:
    """Which int8 kernels this CPU runs now: "avx512" (AVX-512 VBMI + VNNI: every format),
    "avx2" (K <= 16 and RTN 8-bit) or "unavailable" (`cpu.limit_isa` / FASQ_CPU_ISA included)."""
    lib = cpu.load_library()
    level = lib.fasq_cpu_int8_available() if lib is not None else 0
    return ISAS[level - 1] if level else "unavailable"


def available(d: int | None = None, K: int | None = None) -> bool:
    """Whether this CPU runs the int8 path now: for some format (no arguments), or for layers
    of d and K (their codebooks and alignment are checked when they are prepared)."""
    lib = cpu.load_library()
    if lib is None:
        return False
    if d is None or K is None:
        return bool(lib.fasq_cpu_int8_available())
    return bool(lib.fasq_cpu_int8_takes(d, K))


LOOKUPS = ("vpermi2b", "vpermb")  # how d=2 layers with 64 < K <= 256 look their codes up


def lookup() -> str:
    """How d=2 layers with 64 < K <= 256 look their codes up on this CPU now: "vpermi2b"
    (128-entry halves; the default except on Intel) or "vpermb" (64-entry quarters; the
    default on Intel, where a vpermi2b costs three uops). The results are the same."""
    lib = cpu.load_library()
    if lib is None:
        raise RuntimeError(f"the fasq CPU kernel is unavailable: {cpu._lib_error}")
    return LOOKUPS[lib.fasq_cpu_int8_lookup() - 1]


@contextlib.contextmanager
def use_lookup(name: str):
    """Inside this block d=2 layers with 64 < K <= 256 look their codes up by `name` (one of
    LOOKUPS: tests, comparisons); FASQ_CPU_INT8_LOOKUP=vpermi2b|vpermb does the same for a
    whole process."""
    if name not in LOOKUPS:
        raise ValueError(f"unknown lookup {name!r}; choose one of {LOOKUPS}")
    lib = cpu.load_library()
    if lib is None:
        raise RuntimeError(f"the fasq CPU kernel is unavailable: {cpu._lib_error}")
    old = lib.fasq_cpu_int8_set_lookup(LOOKUPS.index(name) + 1)
    try:
        yield
    finally:
        lib.fasq_cpu_int8_set_lookup(old)


class _Int8Layer(ctypes.Structure):
    """Mirror of Int8Layer in csrc/pq_cpu_int8.cpp (every field 8 bytes)."""

    _fields_ = [(n, ctypes.c_void_p) for n in ("args", "codes", "tabs", "cbscale", "scales", "offsets")]


class _Prepared:
    """A layer's int8 copies (tensors kept here) and the struct the library reads."""

    def __init__(self, plan: "cpu._Plan", sizes):
        lib = cpu.load_library()
        # in huge pages where the OS gives them (memory.py: the codes are streamed every call)
        self.codes = memory.empty(sizes[0], torch.uint8)                          # [OB, M/4, 16, 4]
        self.tabs = memory.empty(sizes[1], torch.uint8)                           # [C, 2, 256], [C, 64] or []
        self.cbscale = memory.empty(sizes[2], torch.float32)                      # [3, C] step, shift, sign mode
        self.scales = memory.empty(sizes[3], torch.float32)                       # [OB, S, 16]
        self.offsets = memory.empty(sizes[4], torch.float32) if sizes[4] else None  # [OB, S, 16]
        ptrs = [t.data_ptr() for t in (self.codes, self.tabs, self.cbscale, self.scales)]
        cpu._check(lib.fasq_cpu_int8_prepare(plan.address, *ptrs, cpu._ptr(self.offsets)), "int8 prepare")
        self.args = _Int8Layer(plan.address, *ptrs, cpu._ptr(self.offsets))
        self.address = ctypes.addressof(self.args)
        # plan.args (self.args points to it) and the sizes run_linear checks; not the plan itself,
        # which holds this object (plan.int8): without a cycle the copies go as soon as the layer
        self.layer_args, self.in_features, self.out_features = plan.args, plan.in_features, plan.out_features
        # taken by default: d=2, or integer codebooks copied exactly (RTN: values in [-127, 127],
        # or the 8-bit grid 0..255 used as it is)
        cb = plan.codebooks()  # the layer's own (alive: its call is preparing it)
        integral = bool((cb == cb.round()).all())
        self.default = cb.shape[2] == 2 or (integral and (cb.shape[1] == 256 or bool((cb.abs() <= 127).all())))
        self.tracked = False  # whether torch_ops's C++ op takes its decode calls (torch_ops.track)


def prepared(codes: Tensor, codebooks: Tensor, scales: Tensor | None, offsets: Tensor | None,
             bias: Tensor | None) -> _Prepared | None:
    """The layer's int8 copies, made at its first call (None: the path does not take it)."""
    # the format rule (d, K) is the library's (fasq_cpu_int8_takes); codebooks and alignment are
    # checked when the layer is prepared
    if codes.dtype != _SUPPORTED_CODE or not available(codebooks.shape[2], codebooks.shape[1]):
        return None
    plan = cpu._plan(codes, codebooks, scales, offsets, bias)
    hit = getattr(plan, "int8", False)
    if hit is False:  # not tried yet for this plan (a changed tensor makes a new plan)
        sizes = (ctypes.c_int64 * 5)()
        ok = cpu.load_library().fasq_cpu_int8_sizes(plan.address, sizes) == 0
        hit = plan.int8 = _Prepared(plan, list(sizes)) if ok else None
    if hit is not None and hit.default and not hit.tracked:
        torch_ops.track(hit, codes, codebooks, scales, offsets, bias)  # the C++ op's decode calls
    return hit


def gemv(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor | None = None,
         offsets: Tensor | None = None, bias: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """y[..., out] = x[..., in] @ W.T + bias through int8 lookups; the exact float kernel
    (`cpu.gemv`) where this path does not take the layer or the CPU.

    x: [..., in] fp32, bf16 or fp16 (other dtypes go through fp32); y has x's dtype.
    out: optional contiguous [tokens, out] tensor of that dtype to write into.
    """
    prep = prepared(codes, codebooks, scales, offsets, bias)
    if prep is None:
        return cpu.gemv(x, codes, codebooks, scales, offsets, bias, out=out)
    return run(prep, x, out)


def run(prep: _Prepared, x: Tensor, out: Tensor | None = None) -> Tensor:
    """`gemv` for a layer already prepared (`prepared` returned `prep`)."""
    return cpu.run_linear(x, prep, out, cpu.load_library().fasq_cpu_int8_linear, (prep.address,), "int8 gemv")


def run_parts(preps: list[_Prepared], x: Tensor) -> Tensor:
    """[run(p, x) for p in preps] concatenated along the last dimension, in one library call:
    layers that share their input (a merged layer's sub-matrices, e.g. q, k and v) quantize
    it, fork the threads and write their outputs once instead of once each."""
    lib, n = cpu.load_library(), len(preps)
    head = ((ctypes.c_void_p * n)(*[p.address for p in preps]), n)
    out_f = sum(p.out_features for p in preps)
    return cpu.run_linear(x, preps[0], None, lib.fasq_cpu_int8_linear_parts, head, "int8 gemv (parts)", out_f)
