"""Memory for the CPU kernels' load-time copies (fasq.kernels.cpu.memory): aligned, disjoint,
advised for huge pages on Linux, unmapped with the last tensor carved from it; the int8
path's copies come from it and compute the same results."""

import gc
import sys

import pytest
import torch

from fasq.kernels.cpu import int8 as cpu_int8, memory

from test_cpu_int8 import CASES, _make

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge pages by madvise are Linux's")


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def _regions(tensors):
    return sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors)


@pytest.fixture
def on(monkeypatch):
    monkeypatch.delenv("FASQ_CPU_HUGEPAGES", raising=False)
    if not memory.enabled():
        pytest.skip("no madvise(MADV_HUGEPAGE) here: memory.empty is torch.empty")


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.bfloat16])
def test_small_copies_are_aligned_disjoint_and_writable(on, dtype):
    sizes = [1, 63, 64, 1000, 4097, 300_000]
    ts = [memory.empty(n, dtype) for n in sizes]
    for t, n in zip(ts, sizes):
        assert t.shape == (n,) and t.dtype == dtype and t.data_ptr() % 64 == 0  # a cache line
    regions = _regions(ts)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(regions, regions[1:]))
    for i, t in enumerate(ts):  # each keeps what was written to it
        t.fill_(i + 1)
    for i, t in enumerate(ts):
        assert bool((t == i + 1).all())


def test_a_large_copy_gets_its_own_mapping_on_a_huge_page_boundary(on):
    n = memory.CHUNK // 2 + 4096
    t = memory.empty(n, torch.uint8)
    assert t.numel() == n and t.data_ptr() % memory.HUGE == 0
    t[-1] = 7
    assert int(t[-1]) == 7


@linux
def test_copies_lie_in_mappings_advised_for_huge_pages(on):
    for t in (memory.empty(5000, torch.float32), memory.empty(memory.CHUNK, torch.uint8)):
        assert "hg" in _vm_flags(t.data_ptr())
        assert "hg" in _vm_flags(t.data_ptr() + t.numel() * t.element_size() - 1)


def test_a_chunk_is_unmapped_with_the_last_tensor_carved_from_it(on, monkeypatch):
    monkeypatch.setattr(memory, "_chunk", None)  # a chunk of this test's own (others' tensors may hold the current one)
    a, b = memory.empty(1000, torch.uint8), memory.empty(1000, torch.float32)
    chunk = memory._chunk
    assert chunk is not None and chunk() is not None
    del a
    gc.collect()
    assert chunk() is not None  # b still holds it
    b_view = b.view(torch.uint8)
    del b
    gc.collect()
    assert chunk() is not None  # a view of b does too
    del b_view
    gc.collect()
    assert chunk() is None
    c = memory.empty(10, torch.uint8)  # and the next request maps a new one
    assert memory._chunk() is not None and c.numel() == 10


def test_switched_off_it_is_torch_empty(monkeypatch):
    monkeypatch.setenv("FASQ_CPU_HUGEPAGES", "0")
    assert not memory.enabled()
    monkeypatch.setattr(memory, "_carve", lambda *a: pytest.fail("carved with FASQ_CPU_HUGEPAGES=0"))
    before = memory._chunk
    t = memory.empty(1000, torch.float32)
    assert t.shape == (1000,) and memory._chunk is before
    assert memory.empty(0, torch.uint8).numel() == 0


@linux
def test_the_int8_path_copies_come_from_it_and_agree_with_ordinary_pages(monkeypatch):
    if cpu_int8.isa() == "unavailable":
        pytest.skip("no int8 kernels on this CPU")
    case = next(c for c in CASES if len(c) == 7 and c[2] == 2 and c[3] == 256)
    monkeypatch.delenv("FASQ_CPU_HUGEPAGES", raising=False)
    layer = _make(case, seed=3)
    x = torch.randn(3, layer[0].shape[1] * 2, generator=torch.Generator().manual_seed(1))
    prep = cpu_int8.prepared(*layer, None)
    assert prep is not None
    y = cpu_int8.run(prep, x)
    if memory.enabled():
        assert "hg" in _vm_flags(prep.codes.data_ptr()) and "hg" in _vm_flags(prep.scales.data_ptr())
    monkeypatch.setenv("FASQ_CPU_HUGEPAGES", "0")
    # switched off, nothing is carved (the memory is torch.empty's; not "no hg flag": other
    # code in the process, numpy's large arrays for one, may advise heap memory torch reuses)
    monkeypatch.setattr(memory, "_carve", lambda *a: pytest.fail("carved with FASQ_CPU_HUGEPAGES=0"))
    other = _make(case, seed=3)  # the same values, prepared again into ordinary pages
    prep4k = cpu_int8.prepared(*other, None)
    assert torch.equal(cpu_int8.run(prep4k, x), y)
    assert torch.equal(prep4k.codes, prep.codes) and torch.equal(prep4k.scales, prep.scales)
