"""Memory for the CPU kernels' load-time copies (the int8 path's repacked codes, tables and
scales): carved from 2 MiB-aligned anonymous mappings that Linux is asked to back with
transparent huge pages (madvise MADV_HUGEPAGE), where torch.empty gives 4 KiB pages.

Why: a decode call streams each layer's codes once, and with 4 KiB pages a pass over them
crosses a page every 64 cache lines, a TLB miss each time (a 1B model's codes span 120,000
pages, far beyond the TLB's reach).
Measured on the 2-core AMD EPYC (Zen 4), codes from memory, d=2 K=256 at one token, the same
layers in both kinds of pages in one run (`benchmarks/bench_decode.py --only kernels`, its
`fasq-d2k256-4k` row): a median 5 % less time a call at 4096 x 4096 (2-12 % over ten runs)
and 4 % at 14336 x 4096 (-2 to +8 %); whole models move within the machine's noise.

Small copies share a chunk (a layer's tables, a small layer's codes): a chunk is unmapped
when the last tensor carved from it is freed. Nothing is touched here, so untouched parts
of a chunk take no memory. Where the mapping or the advice is unavailable (not Linux, an
old Python, THP set to "never") the memory is still aligned and correct, in whatever pages
the kernel gives. FASQ_CPU_HUGEPAGES=0 turns it off for a process (torch.empty).

    empty(numel, dtype) -> Tensor   (1-D, 64-byte aligned, uninitialised)
"""

from __future__ import annotations

import mmap
import sys
import threading
import weakref

import torch
from torch import Tensor

from . import library

HUGE = 2 << 20     # the x86-64 / arm64 (4 KiB base pages) PMD size
CHUNK = 64 << 20   # a shared chunk; larger requests get a mapping of their own
ALIGN = 64         # every tensor starts on a cache line

_lock = threading.Lock()
# the mapping small requests are carved from, as a weak reference (every tensor carved from a
# mapping holds it: it is unmapped with the last of them), its next free byte and its end
_chunk: weakref.ref | None = None
_next = _end = 0


def enabled() -> bool:
    """Whether copies come from huge-page chunks: Linux with madvise(MADV_HUGEPAGE) in this
    Python, and FASQ_CPU_HUGEPAGES not 0."""
    on = not library.switched_off("FASQ_CPU_HUGEPAGES")
    return sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE") and on


def _map(nbytes: int) -> tuple[mmap.mmap, int]:
    """A fresh anonymous mapping of nbytes + HUGE advised for huge pages, and the offset of
    its first HUGE-aligned byte."""
    # private: a shared anonymous mapping is shmem, which follows shmem's THP setting instead
    mm = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mm.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without THP: ordinary pages
        pass
    address = torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr()
    return mm, -address % HUGE


def _carve(numel: int, dtype: torch.dtype) -> Tensor:
    global _chunk, _next, _end
    size = -(-numel * dtype.itemsize // ALIGN) * ALIGN
    if size > CHUNK // 2:  # a large copy: a mapping of its own, in whole huge pages
        mm, start = _map(-(-size // HUGE) * HUGE)
        return torch.frombuffer(mm, dtype=dtype, count=numel, offset=start)
    with _lock:
        mm = _chunk() if _chunk is not None else None
        if mm is None or _next + size > _end:
            mm, _next = _map(CHUNK)
            _chunk, _end = weakref.ref(mm), _next + CHUNK
        part = torch.frombuffer(mm, dtype=dtype, count=numel, offset=_next)
        _next += size
        return part


def empty(numel: int, dtype: torch.dtype) -> Tensor:
    """An uninitialised 1-D tensor of numel elements of dtype on the CPU, 64-byte aligned,
    from huge-page chunks where `enabled()` (else torch.empty)."""
    if numel <= 0 or not enabled():
        return torch.empty(max(numel, 0), dtype=dtype)
    return _carve(numel, dtype)
