"""The GPU kernels of `fasq::pq_linear` by name.

Each kernel family declares its launchers in its package's `__init__` (`triton/`, `cuda/`):
a name, the module and function (imported on the first call, so nothing here needs
triton or a GPU) and what the launcher takes. Adding a kernel is one file and one
`register` call; `dispatch.select_kernel` picks among the names.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Kernel:
    name: str
    module: str             # where the launcher lives
    function: str
    needs_triton: bool = True
    tunable: bool = True    # takes config= (a pinned kernel config) and out= (a buffer to fill)


_KERNELS: dict[str, Kernel] = {}


def register(name: str, module: str, function: str, *, needs_triton: bool = True, tunable: bool = True) -> None:
    if name in _KERNELS and _KERNELS[name] != Kernel(name, module, function, needs_triton, tunable):
        raise ValueError(f"a kernel named {name!r} is already registered ({_KERNELS[name].module})")
    _KERNELS[name] = Kernel(name, module, function, needs_triton, tunable)


def names() -> tuple[str, ...]:
    return tuple(_KERNELS)


def get(name: str) -> Kernel:
    if name not in _KERNELS:
        raise ValueError(f"unknown kernel {name!r}; choose 'auto' or one of {names()}")
    return _KERNELS[name]


def launcher(name: str, has_triton: bool) -> Callable:
    k = get(name)
    if k.needs_triton and not has_triton:
        raise RuntimeError(f"fasq kernel {name!r} needs triton: pip install 'fasq[triton]' (or triton>=3.0)")
    return getattr(importlib.import_module(k.module), k.function)
