"""fasq::pq_linear and fasq::pq_linear_parts on the CPU in C++ (csrc/torch_ops.cpp): decode
calls of layers the int8 path has prepared run the kernel straight from the dispatcher, about
2 us a call instead of about 10 us through Python; every other call goes on to the Python
implementation (`linear.py`, as the ops fasq_cpu::pq_linear and fasq_cpu::pq_linear_parts),
unchanged. Same kernel, same results: only the Python around it is skipped.

Built against the installed torch (about 5 s, once per torch version, into the library's cache
folder) and loaded at the first CPU call of either op, which registers the C++ kernels on the
CPU dispatch key; until then, and wherever it cannot be built (no compiler, no torch headers;
one warning says why) or FASQ_CPU_OPS=0, the Python implementation serves every call.

The int8 path tells this module which layers it prepared (`track`): the C++ side keeps, per
codes tensor, the tensors' identities (weakly), versions and data pointers, and takes a call only
when all of them match, so a changed or replaced tensor sends the call back to Python, which
prepares the layer again. A prepared layer is forgotten as its int8 copies are freed.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import platform
import subprocess
import sys
import threading
import warnings
import weakref
from pathlib import Path

import torch

from ..dispatch import CPU_INT8_MAX_TOKENS
from . import library as cpu

SOURCE = Path(__file__).with_name("csrc") / "torch_ops.cpp"

_ops = None
_error: str | None = None
_lock = threading.Lock()


def _torch_dirs() -> tuple[Path, Path]:
    root = Path(torch.__file__).parent
    return root / "include", root / "lib"


def library_path() -> Path:
    """Where the compiled op library is cached: keyed by its source, torch's version and ABI."""
    key = SOURCE.read_bytes() + f"{torch.__version__}|{torch.compiled_with_cxx11_abi()}".encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    return cpu.cache_dir() / f"ops-{sys.platform}-{platform.machine()}-{digest}" / "libfasq_cpu_ops.so"


def _build(dest: Path) -> None:
    include, lib = _torch_dirs()
    if not (include / "torch" / "library.h").is_file():
        raise RuntimeError(f"torch's C++ headers are not installed ({include})")
    common = [f"-I{include}", f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}",
              f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}", "-w"]
    link = [f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]
    # torch's headers want C++20 in recent versions and accept C++17 with warnings
    cpu.compile_shared(dest, [SOURCE], [["-O2", "-std=c++20", *common], ["-O2", "-std=c++17", *common]], link)


def _declare(ops) -> None:
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    ops.fasq_ops_init.argtypes = [ptr, ptr, i64]
    ops.fasq_ops_init.restype = None
    ops.fasq_ops_track.argtypes = [ptr, ptr, ptr, ptr, i64, i64]
    ops.fasq_ops_track.restype = None
    ops.fasq_ops_untrack.argtypes = [i64, ptr]
    ops.fasq_ops_untrack.restype = i32
    ops.fasq_ops_set_forced.argtypes = [i32]
    ops.fasq_ops_set_forced.restype = i32
    ops.fasq_ops_set_paused.argtypes = [i32]
    ops.fasq_ops_set_paused.restype = i32
    ops.fasq_ops_counts.argtypes = [ptr, i32]
    ops.fasq_ops_counts.restype = None
    ops.fasq_ops_tracked.restype = i64


def enabled_by_env() -> bool:
    return not cpu.switched_off("FASQ_CPU_OPS")


def load():
    """The op library, built and loaded (its kernels registered) at the first call; None where
    it cannot be (then `error()` says why) or FASQ_CPU_OPS=0."""
    global _ops, _error
    if _ops is not None or _error is not None:
        return _ops
    with _lock:
        if _ops is not None or _error is not None:
            return _ops
        if not enabled_by_env():
            _error = "FASQ_CPU_OPS=0"
            return None
        lib = cpu.load_library()
        if lib is None:
            _error = f"the CPU kernel library is unavailable: {cpu._lib_error}"
            return None
        try:
            ops = ctypes.CDLL(str(cpu.built(library_path(), _build)))  # registers the C++ kernels of fasq::pq_linear(_parts) on CPU
            _declare(ops)
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            _error = str(e)
            warnings.warn(f"fasq: the CPU op library could not be built or loaded ({e}); fasq::pq_linear on the "
                          "CPU runs through Python (about 8 us more per call)", RuntimeWarning, stacklevel=3)
            return None
        addr = [ctypes.cast(f, ctypes.c_void_p).value for f in (lib.fasq_cpu_int8_linear, lib.fasq_cpu_int8_linear_parts)]
        ops.fasq_ops_init(*addr, CPU_INT8_MAX_TOKENS)
        cpu._forced_listeners.append(lambda forced: ops.fasq_ops_set_forced(int(forced)))
        ops.fasq_ops_set_forced(int(cpu._forced is not None))
        _ops = ops
    return _ops


def error() -> str | None:
    """Why the op library is not in use (None: it is, or it has not been asked for yet)."""
    return _error


def track(prep, codes, codebooks, scales, offsets, bias) -> None:
    """Let the C++ op take decode calls with these tensors (as they are now) through `prep`, a
    layer the int8 path prepared from them and takes by default; forgotten when `prep` goes."""
    ops = _ops
    if ops is None or prep.tracked:
        return
    ts = (codes, codebooks, scales, offsets, bias)
    cdata = (ctypes.c_int64 * 5)(*[0 if t is None else t._cdata for t in ts])
    versions = (ctypes.c_int64 * 5)(*[0 if t is None else cpu.version(t) for t in ts])
    data = (ctypes.c_int64 * 5)(*[0 if t is None else t.data_ptr() for t in ts])
    ops.fasq_ops_track(cdata, versions, data, prep.address, prep.in_features, prep.out_features)
    weakref.finalize(prep, ops.fasq_ops_untrack, cdata[0], prep.address)
    prep.tracked = True


@contextlib.contextmanager
def python_only():
    """Inside this block every CPU call of the ops goes through the Python implementation, as
    before the C++ op was loaded (comparisons, tests that watch the Python path)."""
    ops = load()
    old = ops.fasq_ops_set_paused(1) if ops is not None else None
    try:
        yield
    finally:
        if ops is not None:
            ops.fasq_ops_set_paused(old)


def counts(reset: bool = False) -> tuple[int, int]:
    """(calls the C++ op ran itself, calls it passed to Python) since the last reset; (0, 0)
    while it is not loaded."""
    if _ops is None:
        return 0, 0
    out = (ctypes.c_int64 * 2)()
    _ops.fasq_ops_counts(out, int(reset))
    return out[0], out[1]


def tracked() -> int:
    """How many layers the C++ op can take now."""
    return 0 if _ops is None else _ops.fasq_ops_tracked()
