"""Target-size solver: per-layer (d, K, scope, scale) under a byte budget, without data.

`fasq.stream.solve.solve(model, target_bits=B)` (or `target_size=F`, or `solve_streaming`
on a streamed model) measures a `ProxyTable` and `solve_table` here returns a `QuantConfig`
whose `overrides` give every quantized linear layer its own config, chosen from a
candidate set to minimise a calibration-free proxy of the loss while the checkpoint
lands within 1 % *below* the budget (the budget is never exceeded):

- `target_bits`: bits per quantized weight, all overhead counted (codes, codebooks,
  scales, offsets), as `module.size_table(...)["bits_per_weight"]`;
- `target_size`: fraction of the FP16 model for the whole checkpoint (quantized layers
  plus unquantized parameters at 2 bytes), as `size_table(...)["size_fraction_of_fp16"]`.

Steps
1. Sizes (from shapes alone: `candidate_table` in `fasq.stream.solve`, so `check_budget`
   refuses a budget out of range before any weight is read). A candidate's stored bytes
   on a layer are `format.stored_layer_size`; the bytes outside the quantized layers are
   every other floating tensor at 2 bytes, as the checkpoint stores them. The predicted
   size is the size of the tensors written (tested against the file).
2. Proxy. Per layer l and candidate j, with the "output" proxy the estimated relative output
   error err[l, j] = sum_ik (W_l - Q_j(W_l))_ik^2 imp_lk / sum_ik W_l,ik^2 imp_lk, where
   imp_lk is the layer's input-channel importance (E[x_k^2] over a forward pass of random
   token ids, `fasq.quant.importance`; no text or data): for independent inputs the
   numerator is the expected squared output error. The sampled rows are quantized with the
   importance-weighted k-means and scale fit, as the real quantization does. "output-sq"
   drops the denominator (each layer's importance has mean 1, so layers are weighed as in
   "sq"). The default "rel" and "sq" weigh the plain weight error: err[l, j] = importance_l *
   ||W_l - Q_j(W_l)||_F^2 with plain k-means ("rel": importance_l = 1/||W_l||_F^2; "sq": 1).
   Measured on SmolLM2-135M (WikiText-2 10 x 2048, seeds 0-2): "output" is worse than "rel"
   at 3.1 bits (mean 37.95 against 35.75) and at the default's size (4.226 bits: see
   `DEFAULT_PROXY` and the README), so "rel" stays the default.
   Every proxy is measured by really quantizing with candidate j (`quantize.quantize_weight`) a
   deterministic, evenly spaced sample of at most `sample_rows` (256) rows, with k-means
   cut to `proxy_iters` (4) iterations fitted on at most 32 * K sub-vectors, scaled to
   the full row count. On SmolLM2-135M (210 layers x 11 candidates) this took ~4 min on
   one CPU thread with the torch k-means, 21 s with the C library's (14 s on 2 threads,
   2.7x the quantization that follows); the estimated relative errors are within ~1-3 % of the full
   quantization's for K <= 512 and within ~5 % for d=4 K=1024 (3 layers checked).
   "rel": 1/||W_l||_F^2, every layer's relative error counts the same. Measured before the
   output proxy: with "sq" (importance 1, plain squared error - the expected output
   error for white inputs) the solver at 41.00 % of FP16 starved the small-norm layer-0
   v_proj/o_proj (d=4 K=64 / K=256) and reached WikiText-2 perplexity 44.50 against
   34.43 for uniform d=2 K=256 at the same 41.00 % (4 windows of 2048 tokens). "rel"
   keeps every layer at d=2 K>=128 at that budget; its perplexity was not measured yet.
   The measured relative error of a candidate is nearly the same on every layer (d=2
   K=256: 0.089-0.093 on k/gate/down/o projections), so "rel" mostly spends bits where
   the cost per relative-error gain is lowest (codebook overhead, layer shape).
3. Optimisation: multiple-choice knapsack (one candidate per layer, minimise the total
   proxy, bytes <= budget). Lagrangian relaxation: per layer, the lower convex hull of
   (bytes, err); for a multiplier lambda each layer takes argmin err + lambda * bytes,
   and the optimal lambda is found by scanning the hull slopes (the breakpoints of the
   piecewise-constant cost(lambda)) in decreasing order - an exact search, no
   tolerance. Then a deterministic local search (best single-layer change, or best pair
   of changes, one layer up and one down, that lowers the proxy and still fits) spends
   the remaining slack, a repair step moves the total into [0.99 * budget, budget], and
   a depth-first branch and bound with LP bounds (node limit 20000) proves the result
   optimal or improves it; exact on small instances (tested against brute force). The
   report carries the LP lower bound: on SmolLM2, at 30-50 % of FP16 and 2.5-4 bits,
   the result's proxy is within 0.07 % of it.
   Ties break on layer and candidate order, so results are deterministic.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass, field

import torch

from ..core.config import ConfigError, LayerConfig, PQConfig, QuantConfig
from ..core.format import stored_layer_size
from ..core.ops import dequantize
from .knapsack import BudgetError, knapsack, lp_bound
from .quantize import quantize_weight

TOLERANCE = 0.01  # land within 1 % below the budget


def _pq(d: int, K: int) -> PQConfig:
    return PQConfig(d=d, K=K, codebook_scope="matrix", scale="absmax")


# ~1.5 to 6 bits per weight (before codebook and scale overhead), matrix-scope codebooks,
# absmax per-row scales. Candidates that do not fit a layer's shape are skipped.
# d=4 K=4096 is left out: measured on SmolLM2-135M its 32 KB codebook puts it above the
# hull of d=2 K=64 / K=128 on every layer shape, and it is the slowest to fit (~20 s/layer
# on one CPU thread).
DEFAULT_CANDIDATES: tuple[LayerConfig, ...] = (
    _pq(4, 64), _pq(4, 256), _pq(4, 1024),
    _pq(2, 32), _pq(2, 64), _pq(2, 128), _pq(2, 256), _pq(2, 512),
    _pq(1, 16), _pq(1, 32), _pq(1, 64),
)

# The proxy's weighting of each layer's measured error (`ProxyTable.errors`):
# "output": relative output error, err_out / sum_ij W_ij^2 imp_j (imp: the layer's input-channel
#   importance, E[x_j^2] from random token ids, mean 1 per layer; see `fasq.quant.importance`);
# "output-sq": err_out itself; "rel": relative weight error (the proxy before the output
#   error); "sq": plain squared weight error. "output"/"output-sq" quantize the sampled rows
#   with the importance-weighted k-means (as the real quantization does); "rel"/"sq" with plain
#   k-means, as before.
IMPORTANCE = ("output", "output-sq", "rel", "sq")
OUTPUT_PROXIES = ("output", "output-sq")
# Measured on SmolLM2-135M (WikiText-2, 10 x 2048, benchmarks/results/seeds-study-solver-smollm2.json):
# "output" is worse than "rel" at 3.1 bits and at the default's size, at every seed 0-2; it
# gives d=4 K=64 (1.67 bits) to some down_proj layers (28 and 29 among them, whose input
# energy sits mostly in one massive-activation channel). So "rel" stays the default.
DEFAULT_PROXY = "rel"
_LABEL = re.compile(r"d(\d+)K(\d+)")


def parse_candidates(spec: str) -> list[LayerConfig]:
    """'d2K256,d3K512,...' -> matrix-scope PQ candidates (absmax scales, default scale group)."""
    out = []
    for item in (x.strip() for x in spec.split(",")):
        m = _LABEL.fullmatch(item)
        if not m:
            raise ConfigError(f"candidate {item!r} is not of the form d<D>K<K> (e.g. d2K256); "
                              "give a comma-separated list such as d2K256,d3K512,d4K1024")
        out.append(_pq(int(m[1]), int(m[2])))  # PQConfig validates d and K
    labels = [c.label() for c in out]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"candidate list {spec!r} repeats a candidate")
    return out


# --- 1. sizes ---------------------------------------------------------------------------

# Exact `format.LayerSize` of a layer stored with a candidate (ConfigError if it does not fit)
candidate_size = stored_layer_size


def _fits(out_features: int, in_features: int, cfg: LayerConfig) -> bool:
    try:
        cfg.check_shape(out_features, in_features)
        return True
    except ConfigError:
        return False


# --- 2. proxy ---------------------------------------------------------------------------

@dataclass
class LayerTable:
    """Candidates that fit one layer: bytes (excluding bias) and proxy error of each."""

    name: str
    out_features: int
    in_features: int
    bias_bytes: int
    options: list[int]  # indices into the candidate list
    bytes: list[int]
    sq_error: list[float]  # estimated ||W - Q(W)||_F^2 over the whole matrix
    weight_sq_norm: float
    # estimated sum_ij (W - Q(W))_ij^2 imp_j (imp: input-channel importance; = sq_error without)
    out_error: list[float] = field(default_factory=list)
    weight_out_norm: float = 0.0  # sum_ij W_ij^2 imp_j

    @property
    def weights(self) -> int:
        return self.out_features * self.in_features


@dataclass
class ProxyTable:
    """What `solve` needs from the model: per-layer candidate sizes and errors, fixed bytes."""

    candidates: list[LayerConfig]
    layers: list[LayerTable]
    fixed_bytes: int  # checkpoint bytes outside the quantized layers' codes/codebooks/scales
    fp16_bytes: int  # the FP16 model, as size_table counts it
    skip: tuple[str, ...]
    seconds: float = 0.0
    # the input-channel importance estimate the errors were measured with ("none": plain k-means
    # and out_error = sq_error); see `fasq.stream.solve.measure`
    importance: str = "none"

    @property
    def quantized_weights(self) -> int:
        return sum(t.weights for t in self.layers)

    def errors(self, importance: str = DEFAULT_PROXY) -> list[list[float]]:
        """Per layer, per option: the proxy error under the weighting `importance` (`IMPORTANCE`)."""
        if importance not in IMPORTANCE:
            raise ValueError(f"importance must be one of {IMPORTANCE}, got {importance!r}")
        if importance == "sq":
            return [list(t.sq_error) for t in self.layers]
        if importance == "rel":
            return [[e / max(t.weight_sq_norm, 1e-30) for e in t.sq_error] for t in self.layers]
        if any(len(t.out_error) != len(t.options) for t in self.layers):
            raise ValueError("this table has no output errors (measured by an older version); measure it again")
        if importance == "output-sq":
            return [list(t.out_error) for t in self.layers]
        return [[e / max(t.weight_out_norm, 1e-30) for e in t.out_error] for t in self.layers]


def _row_sample(out_features: int, rows: int | None) -> torch.Tensor | None:
    """Evenly spaced rows (deterministic), or None for all."""
    if not rows or rows >= out_features:
        return None
    return torch.linspace(0, out_features - 1, rows).round().long().unique()


def proxy_error(W: torch.Tensor, cfg: LayerConfig, sample_rows: int | None = 256,
                proxy_iters: int | None = 4, name: str = "weight",
                importance: torch.Tensor | None = None) -> float:
    """Estimated squared Frobenius error of quantizing the whole W with `cfg`; with
    `importance` [in] (column weights), the estimated output error
    sum_ij (W - Q(W))_ij^2 importance_j of the importance-weighted quantization.

    Quantizes a row sample (when the sample still has enough sub-vectors for K) with
    k-means cut to `proxy_iters` iterations and fitted on at most 32 * K sub-vectors, and
    scales the error to all rows. `proxy_iters=None` (with `sample_rows=None`) is the
    exact error of `quantize_weight` with `cfg` (and `importance`).
    """
    sq, out = _proxy_errors(W, cfg, sample_rows, proxy_iters, name, importance)
    return sq if importance is None else out


def _proxy_errors(W: torch.Tensor, cfg: LayerConfig, sample_rows: int | None, proxy_iters: int | None,
                  name: str, importance: torch.Tensor | None) -> tuple[float, float]:
    """(squared weight error, importance-weighted squared error) estimated for the whole W;
    the two are equal without `importance`."""
    out, n = W.shape
    idx = _row_sample(out, sample_rows)
    if idx is not None and not _fits(len(idx), n, cfg):
        idx = None  # too few sub-vectors for this K in the sample: use all rows
    Ws = W if idx is None else W[idx]
    if proxy_iters is not None and cfg.learns_codebooks:  # shortened k-means, fitted on <= 32 K points
        cap = 32 * cfg.K if not cfg.kmeans_sample else min(cfg.kmeans_sample, 32 * cfg.K)
        cfg = dataclasses.replace(cfg, kmeans_iters=min(cfg.kmeans_iters, proxy_iters), kmeans_sample=cap)
    t = quantize_weight(Ws, cfg, name=name, importance=importance)
    What = dequantize(t["codes"], t["codebooks"], t["scales"], t["offsets"], dtype=torch.float32)
    col = (Ws.float() - What).double().pow(2).sum(0)  # [in]: squared error per input column
    sq = col.sum().item()
    wo = sq if importance is None else (col * importance.to(col.device, torch.float64)).sum().item()
    return sq * out / Ws.shape[0], wo * out / Ws.shape[0]


def layer_sizes(name: str, out: int, n: int, bias: bool, cands: list[LayerConfig]) -> LayerTable:
    """A layer's fitting candidates and their bytes (errors are filled by `measure_layer`)."""
    opts = [j for j, c in enumerate(cands) if _fits(out, n, c)]
    if not opts:
        raise ConfigError(f"{name} [{out}x{n}]: no candidate config fits this shape; add one "
                          "that does (d dividing in_features, K <= sub-vectors) or skip the layer")
    sizes = [candidate_size(out, n, cands[j], bias) for j in opts]
    return LayerTable(name=name, out_features=out, in_features=n, bias_bytes=sizes[0].bias, options=opts,
                      bytes=[s.total - s.bias for s in sizes], sq_error=[], weight_sq_norm=0.0)


@torch.no_grad()
def measure_layer(t: LayerTable, W: torch.Tensor, cands: list[LayerConfig], sample_rows: int | None = 256,
                  proxy_iters: int | None = 4, device=None, importance: torch.Tensor | None = None) -> None:
    """Fill a layer's proxy errors (every fitting candidate) from its weight W [out, in].

    `importance` [in]: the layer's input-channel weights (`Plan.importance`); the sampled rows
    are then quantized with the importance-weighted k-means and scale fit, as the real
    quantization does, and `out_error` weighs each column's squared error by it."""
    W = W.detach().to(device=device or W.device, dtype=torch.float32)
    if importance is not None:
        importance = importance.detach().to(W.device, torch.float32)
    errs = [_proxy_errors(W, cands[j], sample_rows, proxy_iters, t.name, importance) for j in t.options]
    t.sq_error, t.out_error = [e[0] for e in errs], [e[1] for e in errs]
    col = W.double().pow(2).sum(0)
    t.weight_sq_norm = col.sum().item()
    t.weight_out_norm = t.weight_sq_norm if importance is None else (col * importance.double()).sum().item()


# --- 3. the multiple-choice knapsack: knapsack.py ------------------------------------

# --- 4. the API -------------------------------------------------------------------------

@dataclass
class SolveReport:
    target: str  # "bits" or "size"
    target_value: float
    layers: list[dict]
    predicted: dict  # bits_per_weight, size_fraction_of_fp16, total_bytes, fp16_bytes
    proxy_total: float
    proxy_lower_bound: float  # LP (Lagrangian) bound: no choice within the budget does better
    importance: str  # the proxy's weighting (`IMPORTANCE`): "output", "output-sq", "rel", "sq"
    proxy_seconds: float
    solve_seconds: float
    achievable: dict = field(default_factory=dict)
    # the input-channel importance estimate the proxy was measured with ("none": plain weights)
    proxy_importance: str = "none"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def format(self) -> str:
        p = self.predicted
        counts: dict[str, int] = {}
        for r in self.layers:
            counts[r["label"]] = counts.get(r["label"], 0) + 1
        mix = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        return (f"  target            {self.target}={self.target_value}\n"
                f"  predicted         {p['bits_per_weight']:.3f} bits/weight, "
                f"{100 * p['size_fraction_of_fp16']:.2f}% of FP16 ({p['total_bytes'] / 1e6:.2f} MB)\n"
                f"  layer configs     {mix}\n"
                f"  proxy             {self.describe_proxy()}\n"
                f"  proxy total       {self.proxy_total:.6g} (bound {self.proxy_lower_bound:.6g})  "
                f"(proxy {self.proxy_seconds:.1f}s, solve {self.solve_seconds:.2f}s)")

    def describe_proxy(self) -> str:
        what = {"output": "relative output error", "output-sq": "squared output error",
                "rel": "relative weight error", "sq": "squared weight error"}[self.importance]
        if self.importance in OUTPUT_PROXIES:
            imp = ("no input-channel importance (all channels equal)" if self.proxy_importance == "none"
                   else f"input channels weighted by the {self.proxy_importance!r} importance estimate")
            return f"{self.importance}: {what}, {imp}"
        return f"{self.importance}: {what}"


def budget_bounds(table: ProxyTable, target_bits: float | None = None,
                  target_size: float | None = None) -> tuple[int, int, str, float]:
    """(lower, upper) bytes for the quantized layers' codes+codebooks+scales."""
    if (target_bits is None) == (target_size is None):
        raise ValueError("give exactly one of target_bits or target_size")
    if target_bits is not None:
        if not target_bits > 0:
            raise BudgetError(f"target_bits must be positive, got {target_bits}")
        q = table.quantized_weights
        return math.ceil((1 - TOLERANCE) * target_bits * q / 8), math.floor(target_bits * q / 8), "bits", target_bits
    if not 0 < target_size:
        raise BudgetError(f"target_size must be a positive fraction of the FP16 model, got {target_size}")
    F = table.fp16_bytes
    return (math.ceil((1 - TOLERANCE) * target_size * F) - table.fixed_bytes,
            math.floor(target_size * F) - table.fixed_bytes, "size", target_size)


def achievable_range(table: ProxyTable) -> dict:
    lo = sum(min(t.bytes) for t in table.layers)
    hi = sum(max(t.bytes) for t in table.layers)
    q, F, fx = table.quantized_weights, table.fp16_bytes, table.fixed_bytes
    return {"bits_per_weight": (8 * lo / q, 8 * hi / q),
            "size_fraction_of_fp16": ((lo + fx) / F, (hi + fx) / F)}


def check_budget(table: ProxyTable, target_bits: float | None = None,
                 target_size: float | None = None) -> tuple[int, int, str, float]:
    """`budget_bounds`, refusing a budget outside the achievable range (sizes only: no
    measured errors needed) with a message that gives the range."""
    lo, hi, kind, value = budget_bounds(table, target_bits, target_size)
    a, b = achievable_range(table)["bits_per_weight" if kind == "bits" else "size_fraction_of_fp16"]
    unit = "bits per weight" if kind == "bits" else "of FP16"
    fmt = (lambda x: f"{x:.3f}") if kind == "bits" else (lambda x: f"{100 * x:.2f}%")
    if hi < sum(min(t.bytes) for t in table.layers):
        raise BudgetError(f"target {kind}={value} is below the smallest achievable size with these "
                          f"candidates: achievable range {fmt(a)} to {fmt(b)} {unit}")
    if lo > sum(max(t.bytes) for t in table.layers):
        raise BudgetError(f"target {kind}={value} is above the largest achievable size with these "
                          f"candidates: achievable range {fmt(a)} to {fmt(b)} {unit}; use a smaller "
                          "target or add larger candidates")
    return lo, hi, kind, value


# k-means settings of the base config's layer that the solver's per-layer choices take over
# (`fasq quantize --seed S --target-bits B` fits every chosen layer with seed S)
FIT_KNOBS = ("seed", "kmeans_iters", "kmeans_init", "kmeans_sample")


def solve_table(table: ProxyTable, target_bits: float | None = None, target_size: float | None = None,
                importance: str = DEFAULT_PROXY, base: QuantConfig | None = None) -> tuple[QuantConfig, SolveReport]:
    """Per-layer configs that meet the budget, from a measured table (`fasq.stream.solve`
    measures one); returns (QuantConfig, SolveReport).

    Exactly one of `target_bits` (bits per quantized weight, overhead included) or
    `target_size` (whole checkpoint as a fraction of the FP16 model). The result lands
    in [0.99 * target, target]. `importance`: the proxy's weighting (`IMPORTANCE`; "output" and
    "output-sq" need a table measured with the input-channel importance, see
    `fasq.stream.solve.measure`; on a table measured without one they equal "rel" and "sq").
    `base`: the config whose other settings (importance estimate, transform) the result
    keeps; its layer configs are replaced, the chosen candidates taking its k-means
    settings (`FIT_KNOBS`: seed, iterations, init, sample).
    """
    lo, hi, kind, value = check_budget(table, target_bits, target_size)
    rng = achievable_range(table)
    errs = table.errors(importance)
    t0 = time.perf_counter()
    pick = knapsack([t.bytes for t in table.layers], errs, hi, lo)
    solve_s = time.perf_counter() - t0

    cands = table.candidates
    knobs = {}
    if base is not None and base.layer.learns_codebooks:
        knobs = {k: getattr(base.layer, k) for k in FIT_KNOBS if hasattr(base.layer, k)}
    chosen = [dataclasses.replace(cands[t.options[p]], **{k: v for k, v in knobs.items()
                                                          if hasattr(cands[t.options[p]], k)})
              for t, p in zip(table.layers, pick)]
    labels = [c.label() for c in chosen]
    common = chosen[max(range(len(chosen)), key=lambda i: (labels.count(labels[i]), -i))]
    qcfg = dataclasses.replace(base or QuantConfig(), layer=dataclasses.replace(common), skip=table.skip,
                               overrides={t.name: dataclasses.replace(c) for t, c in zip(table.layers, chosen)},
                               modules=())
    qbytes = sum(t.bytes[p] for t, p in zip(table.layers, pick))
    total = qbytes + table.fixed_bytes
    rows = []
    for t, p, c, lab, e in zip(table.layers, pick, chosen, labels, errs):
        rows.append({"name": t.name, "shape": [t.out_features, t.in_features], "label": lab,
                     "config": c.to_dict(), "bytes": t.bytes[p], "bits_per_weight": 8 * t.bytes[p] / t.weights,
                     "proxy": e[p], "est_rel_error": math.sqrt(t.sq_error[p] / max(t.weight_sq_norm, 1e-30)),
                     **({"est_rel_output_error": math.sqrt(t.out_error[p] / max(t.weight_out_norm, 1e-30))}
                        if len(t.out_error) == len(t.options) else {})})
    report = SolveReport(
        target=kind, target_value=value, layers=rows,
        predicted={"bits_per_weight": 8 * qbytes / table.quantized_weights,
                   "size_fraction_of_fp16": total / table.fp16_bytes,
                   "total_bytes": total, "fp16_bytes": table.fp16_bytes},
        proxy_total=sum(e[p] for e, p in zip(errs, pick)),
        proxy_lower_bound=lp_bound([t.bytes for t in table.layers], errs, hi), importance=importance,
        proxy_seconds=table.seconds, solve_seconds=solve_s,
        achievable={k: list(v) for k, v in rng.items()},
        proxy_importance=table.importance if importance in OUTPUT_PROXIES else "none")
    return qcfg, report
