"""The solver's optimisation step: a multiple-choice knapsack (one option per layer,
minimise the summed proxy error, bytes within [lower, budget]); pure Python and numpy,
exact on small instances (tested against brute force). The method is described in
`solver.py`'s docstring, step 3.
"""

from __future__ import annotations

import math

import numpy as np


class BudgetError(ValueError):
    """The size budget cannot be met with the candidate set; the message gives the range."""


def _hull(costs: list[int], errs: list[float]) -> list[int]:
    """Indices on the lower convex hull of (cost, err), cheapest first, err strictly falling."""
    order = sorted(range(len(costs)), key=lambda j: (costs[j], errs[j], j))
    pts: list[int] = []
    for j in order:  # Pareto front: cheaper first, keep only strict error improvements
        if pts and (costs[j] == costs[pts[-1]] or errs[j] >= errs[pts[-1]]):
            continue
        pts.append(j)
    hull: list[int] = []
    for j in pts:  # monotone chain, lower hull
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above the segment a -> j
            if (errs[b] - errs[a]) * (costs[j] - costs[a]) >= (errs[j] - errs[a]) * (costs[b] - costs[a]):
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


def knapsack(costs: list[list[int]], errs: list[list[float]], budget: int, lower: int | None = None,
             max_rounds: int | None = None, node_limit: int = 20000) -> list[int]:
    """Choose one option per layer: minimise sum(err) subject to lower <= sum(cost) <= budget.

    Returns the chosen option index per layer. Raises BudgetError if no choice can fit.
    The Lagrangian + local-search solution seeds a depth-first branch and bound (LP bounds)
    that proves it optimal or improves it; past `node_limit` nodes the best found is kept.
    """
    L = len(costs)
    if L == 0:
        raise ValueError("no layers")
    lo = 0 if lower is None else lower
    cmin = sum(min(c) for c in costs)
    cmax = sum(max(c) for c in costs)
    if cmin > budget or cmax < lo:
        raise BudgetError(f"the candidates give {cmin:,} to {cmax:,} bytes; the target needs "
                          f"{lo:,} to {budget:,}")
    # Lagrangian relaxation over the per-layer hulls: start every layer at its cheapest
    # hull point, then take hull steps by falling error per byte (= decreasing lambda)
    # while they fit. The prefix taken is the Lagrangian solution at the first lambda whose
    # choice fits the budget.
    hulls = [_hull(c, e) for c, e in zip(costs, errs)]
    pos = [0] * L
    total = sum(costs[l][h[0]] for l, h in enumerate(hulls))
    steps = []
    for l, h in enumerate(hulls):
        for k in range(1, len(h)):
            a, b = h[k - 1], h[k]
            steps.append(((errs[l][a] - errs[l][b]) / (costs[l][b] - costs[l][a]), l, k))
    steps.sort(key=lambda s: (-s[0], s[1], s[2]))  # slopes fall along each hull: order kept
    for _, l, k in steps:
        a, b = hulls[l][k - 1], hulls[l][k]
        dc = costs[l][b] - costs[l][a]
        if total + dc > budget:
            break
        pos[l], total = k, total + dc
    choice = [hulls[l][pos[l]] for l in range(L)]
    choice = _local_search(costs, errs, choice, budget, max_rounds if max_rounds is not None else 4 * L + 50)
    total = sum(costs[l][choice[l]] for l in range(L))
    if total < lo:
        choice = _repair(costs, errs, choice, budget, lo)
    choice = _branch_and_bound(costs, errs, budget, lo, choice, node_limit)
    total = sum(costs[l][choice[l]] for l in range(L))
    if not lo <= total <= budget:
        raise BudgetError(f"could not land within {lo:,} to {budget:,} bytes with these candidates "
                          f"(closest found: {total:,}); the size steps between candidates are too "
                          "coarse for this budget: add candidates or change the target")
    return choice


def lp_bound(costs: list[list[int]], errs: list[list[float]], budget: int) -> float:
    """Lower bound on the optimum (the LP relaxation: fractional walk along the hulls)."""
    hulls = [_hull(c, e) for c, e in zip(costs, errs)]
    return _lp(costs, errs, hulls, _steps(costs, errs, hulls), range(len(costs)), budget)


def _steps(costs, errs, hulls):
    steps = []
    for l, h in enumerate(hulls):
        for k in range(1, len(h)):
            a, b = h[k - 1], h[k]
            dc = costs[l][b] - costs[l][a]
            steps.append(((errs[l][a] - errs[l][b]) / dc, l, dc, errs[l][a] - errs[l][b]))
    steps.sort(key=lambda s: (-s[0], s[1]))
    return steps


def _lp(costs, errs, hulls, steps, free, budget) -> float:
    free = set(free)
    cost = sum(costs[l][hulls[l][0]] for l in free)
    err = sum(errs[l][hulls[l][0]] for l in free)
    if cost > budget:
        return math.inf
    room = budget - cost
    for slope, l, dc, de in steps:
        if l not in free:
            continue
        if dc <= room:
            room, err = room - dc, err - de
        else:
            return err - slope * room
    return err


def _branch_and_bound(costs, errs, budget, lo, incumbent, node_limit):
    """Depth-first branch and bound from an incumbent; exact unless `node_limit` is hit."""
    L = len(costs)
    best = list(incumbent)
    best_err = sum(errs[l][best[l]] for l in range(L))
    eps = 1e-12 * max(1.0, abs(best_err))
    if not lo <= sum(costs[l][best[l]] for l in range(L)) <= budget:
        best_err = math.inf  # infeasible incumbent: any solution in the window is better
    order = sorted(range(L), key=lambda l: (-(max(errs[l]) - min(errs[l])), l))
    hulls = [_hull(c, e) for c, e in zip(costs, errs)]
    steps = _steps(costs, errs, hulls)
    suf_max = [0] * (L + 1)
    for i in range(L - 1, -1, -1):
        suf_max[i] = suf_max[i + 1] + max(costs[order[i]])
    cur = [0] * L
    nodes = 0

    def dfs(i, cost, err):
        nonlocal best, best_err, nodes
        nodes += 1
        if nodes > node_limit:
            return
        if i == L:
            if lo <= cost <= budget and err < best_err - eps:
                best, best_err = list(cur), err
            return
        if cost + suf_max[i] < lo:
            return
        if err + _lp(costs, errs, hulls, steps, order[i:], budget - cost) >= best_err - eps:
            return
        l = order[i]
        for j in sorted(range(len(costs[l])), key=lambda j: (errs[l][j], j)):
            if cost + costs[l][j] <= budget:
                cur[l] = j
                dfs(i + 1, cost + costs[l][j], err + errs[l][j])

    dfs(0, 0, 0.0)
    return best


def _moves(costs, errs, choice):
    """All single-layer changes: arrays layer, option, d_cost, d_err (deterministic order)."""
    ls, js, dc, de = [], [], [], []
    for l, (c, e) in enumerate(zip(costs, errs)):
        cur = choice[l]
        for j in range(len(c)):
            if j != cur:
                ls.append(l), js.append(j), dc.append(c[j] - c[cur]), de.append(e[j] - e[cur])
    return (np.array(ls, dtype=np.int64), np.array(js, dtype=np.int64),
            np.array(dc, dtype=np.int64), np.array(de, dtype=np.float64))


def _best_move(costs, errs, choice, dc_lo: int, dc_hi: int, need_gain: bool):
    """Best single change or pair of changes (different layers) with d_cost in [dc_lo, dc_hi].

    Returns [(layer, option), ...] or None. With need_gain, only moves that lower the error.
    """
    ls, js, dc, de = _moves(costs, errs, choice)
    if len(ls) == 0:
        return None
    scale = max(1.0, float(np.abs(de).max()))
    eps = 1e-12 * scale
    best, best_de = None, (-eps if need_gain else math.inf)
    ok = (dc >= dc_lo) & (dc <= dc_hi)
    if ok.any():
        i = int(np.flatnonzero(ok)[np.argmin(de[ok])])
        if de[i] < best_de:
            best, best_de = [(int(ls[i]), int(js[i]))], de[i]
    # pairs: one move that adds bytes with one that frees bytes
    up, down = np.flatnonzero(dc > 0), np.flatnonzero(dc <= 0)
    if len(up) and len(down):
        pdc = dc[up][:, None] + dc[down][None, :]
        pde = de[up][:, None] + de[down][None, :]
        valid = (pdc >= dc_lo) & (pdc <= dc_hi) & (ls[up][:, None] != ls[down][None, :])
        if valid.any():
            pde = np.where(valid, pde, np.inf)
            k = int(np.argmin(pde))  # first minimum in row-major order: deterministic
            a, b = divmod(k, pde.shape[1])
            if pde[a, b] < best_de - eps:
                best = [(int(ls[up[a]]), int(js[up[a]])), (int(ls[down[b]]), int(js[down[b]]))]
    return best


def _local_search(costs, errs, choice, budget, rounds):
    choice = list(choice)
    for _ in range(rounds):
        total = sum(costs[l][choice[l]] for l in range(len(costs)))
        mv = _best_move(costs, errs, choice, -(1 << 62), budget - total, need_gain=True)
        if mv is None:
            break
        for l, j in mv:
            choice[l] = j
    return choice


def _repair(costs, errs, choice, budget, lo):
    choice = list(choice)
    for _ in range(len(costs) + 10):
        total = sum(costs[l][choice[l]] for l in range(len(costs)))
        if lo <= total <= budget:
            return choice
        mv = _best_move(costs, errs, choice, lo - total, budget - total, need_gain=False)
        if mv is None:  # no move lands in the window: step towards it as cheaply as possible
            mv = _best_move(costs, errs, choice, 1, budget - total, need_gain=False)
        if mv is None:
            break
        for l, j in mv:
            choice[l] = j
    return choice  # possibly still outside the window: branch and bound searches on
