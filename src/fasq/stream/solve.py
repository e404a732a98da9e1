"""The target-size solver on a streamed model: sizes from the tensor shapes (a budget
outside the achievable range is refused before any weight is read), then one pass over
the weights to measure the candidates' proxy errors, then the knapsack (`fasq.quant.solver`)."""

from __future__ import annotations

import math
import time

from ..quant.solver import DEFAULT_CANDIDATES, ProxyTable, check_budget, layer_sizes, measure_layer, solve
from .pipeline import Plan


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


def measure(plan: Plan, table: ProxyTable, progress: bool = True, device=None, **proxy) -> ProxyTable:
    """Fill the proxy errors reading each weight once, shard by shard."""
    from tqdm.auto import tqdm

    by_name = {t.name: t for t in table.layers}
    t0 = time.perf_counter()
    with tqdm(total=len(by_name), desc="solver proxy", unit="layer", disable=not progress) as bar:
        for _, names in plan.reader.groups:
            for n in names:
                t = by_name.get(n[: -len(".weight")]) if n.endswith(".weight") else None
                if t is not None:
                    measure_layer(t, plan.reader.read(n).to(plan.dtype), table.candidates, device=device, **proxy)
                    bar.update(1)
            plan.reader.close()
    table.seconds = time.perf_counter() - t0
    return table


def solve_streaming(plan: Plan, target_bits: float | None = None, target_size: float | None = None,
                    candidates=None, progress: bool = True, device=None, **kw):
    """(QuantConfig with per-layer overrides, SolveReport) for the plan's model."""
    table = candidate_table(plan, candidates)
    check_budget(table, target_bits, target_size)  # at once, before reading any weight
    measure(plan, table, progress=progress, device=device)
    return solve(None, target_bits=target_bits, target_size=target_size, table=table, **kw)
