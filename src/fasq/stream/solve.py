"""The target-size solver on a plan (a streamed model, or a built one through
`memory.ModuleReader`): sizes from the tensor shapes (a budget outside the achievable range
is refused before any weight is read), the input-channel importance estimate (for the
output-error proxies: `pipeline.set_importance`, the same estimate the quantization then
uses; random token ids, no text), then one pass over the weights to measure the
candidates' proxy errors, then the knapsack (`fasq.quant.solver.solve_table`)."""

from __future__ import annotations

import math
import sys
import time

from torch import nn

from ..core.config import DEFAULT_SKIP, QuantConfig
from ..quant.solver import (DEFAULT_CANDIDATES, DEFAULT_PROXY, IMPORTANCE, OUTPUT_PROXIES, ProxyTable, check_budget,
                            layer_sizes, measure_layer, solve_table)
from .memory import ModuleReader
from .pipeline import Plan, make_plan, set_importance


def _log(msg: str) -> None:
    print(f"fasq solver: {msg}", file=sys.stderr)


def _no_whole_model():
    raise ValueError("no loader for the whole model was given")


def _check_proxy(importance: str) -> None:
    if importance not in IMPORTANCE:
        raise ValueError(f"importance (the solver's proxy) must be one of {IMPORTANCE}, got {importance!r}")


def candidate_table(plan: Plan, candidates=None) -> ProxyTable:
    """Sizes of every candidate on every layer of the plan, and the bytes outside them."""
    cands = list(DEFAULT_CANDIDATES if candidates is None else candidates)
    if not cands:
        raise ValueError("the candidate set is empty")
    shapes = plan.shapes()
    tables = [layer_sizes(m, *shapes[m], plan.has_bias(m), cands) for m in plan.modules]
    reader, modules = plan.reader, set(plan.modules)
    other = 0  # unquantized float elements, stored at 2 bytes (as format.size_summary counts)
    for _, names in reader.groups:
        for n in names:
            module, _, leaf = n.rpartition(".")
            info = reader.info(n)
            if n in plan.dropped or module in modules and leaf in ("weight", "bias"):
                continue
            if info.dtype.is_floating_point:
                other += math.prod(info.shape)
    qweights = sum(t.weights for t in tables)
    return ProxyTable(candidates=cands, layers=tables, fixed_bytes=2 * other + sum(t.bias_bytes for t in tables),
                      fp16_bytes=2 * (qweights + other), skip=plan.qcfg.skip)


def measure(plan: Plan, table: ProxyTable, progress: bool = True, device=None,
            weighted: bool = DEFAULT_PROXY in OUTPUT_PROXIES,
            load_whole=None, **proxy) -> ProxyTable:
    """Fill the proxy errors reading each weight once, shard by shard.

    `weighted`: first fill `plan.importance` (`set_importance`, the plan config's estimate,
    "random-tokens" by default: a forward pass of random token ids, no text) and measure each
    candidate with the importance-weighted quantization and its column-weighted (output)
    error, as the "output" proxies need; False: plain k-means and weight error only (the
    "rel"/"sq" proxies, as before the output error). `load_whole()` gives the whole model
    if the block-by-block estimate cannot run (else the estimate falls back to "norm")."""
    from tqdm.auto import tqdm

    imp = {}
    if weighted:
        set_importance(plan, load_whole or _no_whole_model, _log)
        imp = plan.importance
    table.importance = plan.qcfg.importance if imp else "none"
    by_name = {t.name: t for t in table.layers}
    t0 = time.perf_counter()
    with tqdm(total=len(by_name), desc="solver proxy", unit="layer", disable=not progress) as bar:
        for _, names in plan.reader.groups:
            for n in names:
                t = by_name.get(n[: -len(".weight")]) if n.endswith(".weight") else None
                if t is not None:
                    W = plan.reader.read(n)
                    measure_layer(t, W if plan.dtype is None else W.to(plan.dtype), table.candidates,
                                  device=device, importance=imp.get(t.name), **proxy)
                    bar.update(1)
            plan.reader.close()
    table.seconds = time.perf_counter() - t0
    return table


def solve_streaming(plan: Plan, target_bits: float | None = None, target_size: float | None = None,
                    candidates=None, progress: bool = True, device=None, sample_rows: int | None = 256,
                    proxy_iters: int | None = 4, importance: str = DEFAULT_PROXY, load_whole=None):
    """(QuantConfig with per-layer overrides, SolveReport) for the plan's model; the
    config keeps the plan's other settings (importance estimate, transform).

    `importance`: the proxy (`fasq.quant.solver.IMPORTANCE`). The output proxies fill
    `plan.importance` first, which the quantization of the same plan then reuses."""
    _check_proxy(importance)
    table = candidate_table(plan, candidates)
    check_budget(table, target_bits, target_size)  # at once, before reading any weight
    measure(plan, table, progress=progress, device=device, weighted=importance in OUTPUT_PROXIES,
            load_whole=load_whole, sample_rows=sample_rows, proxy_iters=proxy_iters)
    return solve_table(table, target_bits=target_bits, target_size=target_size, importance=importance,
                       base=plan.qcfg)


def model_plan(model: nn.Module, skip=DEFAULT_SKIP, base: QuantConfig | None = None) -> Plan:
    """A plan over a built model's layers (those `skip` leaves), for the solver."""
    import dataclasses

    qcfg = dataclasses.replace(base, skip=tuple(skip)) if base is not None else QuantConfig(skip=tuple(skip))
    return make_plan(None, qcfg, reader=ModuleReader(model), dtype=None)


def measure_model(model: nn.Module, candidates=None, skip=DEFAULT_SKIP, progress: bool = True, device=None,
                  weighted: bool = DEFAULT_PROXY in OUTPUT_PROXIES, base: QuantConfig | None = None,
                  **proxy) -> ProxyTable:
    """Sizes and proxy errors of every candidate on every layer of a built model; `weighted`
    as in `measure` (with `base`'s importance estimate, "random-tokens" by default; the
    default suits the default proxy: True for "output"/"output-sq", False for "rel"/"sq")."""
    plan = model_plan(model, skip, base)
    return measure(plan, candidate_table(plan, candidates), progress=progress, device=device, weighted=weighted,
                   **proxy)


def solve(model: nn.Module | None, target_bits: float | None = None, target_size: float | None = None,
          candidates=None, skip=DEFAULT_SKIP, progress: bool = True, importance: str = DEFAULT_PROXY,
          sample_rows: int | None = 256, proxy_iters: int | None = 4, table: ProxyTable | None = None,
          device=None, base: QuantConfig | None = None):
    """`solve_streaming` for a model in memory; `table` reuses a `measure_model(...)` result
    (same model, candidates and skip) so several budgets cost one proxy measurement (measured
    with `weighted=True` for the output proxies; on a table measured without the importance
    they equal "rel"/"sq", and the report says "no input-channel importance")."""
    _check_proxy(importance)
    if table is not None:
        if candidates is not None and list(candidates) != table.candidates:
            raise ValueError("`table` was measured with other candidates")
        return solve_table(table, target_bits, target_size, importance, base)
    return solve_streaming(model_plan(model, skip, base), target_bits, target_size, candidates, progress, device,
                           sample_rows, proxy_iters, importance=importance)
