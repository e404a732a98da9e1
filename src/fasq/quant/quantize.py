"""Quantize one weight matrix: FASQ product quantization and RTN, into the storage format.

Both return a dict of tensors in the layout of `core/ops.py`:
    codes [out, M], codebooks [C, K, d], scales [out, S] | None, offsets [out, S] | None
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core import ops
from ..core.config import LayerConfig, PQConfig, RTNConfig
from ..core.format import STORE_DTYPE
from ..core.transforms import get_transform
from .kmeans import assign, assign_weighted, kmeans, kmeans_weighted


def _store(t: Tensor) -> Tensor:
    """Round to the stored precision (so codes are chosen against what is saved)."""
    return t.to(STORE_DTYPE).float()


def check_finite(W: Tensor, name: str) -> None:
    if not torch.isfinite(W).all():
        bad = (~torch.isfinite(W)).sum().item()
        raise ValueError(f"{name}: weight has {bad} NaN/Inf values; cannot quantize it "
                         "(check the source checkpoint, or leave this module unquantized with --skip)")


def _normalise(W: Tensor, mode: str, G: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Per row-group normalisation (G columns): W [out, in] -> (Wn, scales [out, S], offsets [out, S])."""
    if mode == "none":
        return W, None, None
    out, n = W.shape
    Wg = W.view(out, n // G, G)
    offsets = None
    if mode == "absmax":
        s = Wg.abs().amax(-1)
    elif mode == "rms":
        s = Wg.pow(2).mean(-1).sqrt()
    else:  # minmax: map each group onto [0, 1]
        lo, hi = Wg.amin(-1), Wg.amax(-1)
        offsets, s = _store(lo), hi - lo
    s = _store(torch.where(s > 0, s, torch.ones_like(s)))
    Wn = Wg - offsets[..., None] if offsets is not None else Wg
    return (Wn / s[..., None]).view(out, n), s, offsets


def _refit_scales(W: Tensor, Wc: Tensor, scales: Tensor, offsets: Tensor | None,
                  G: int, col_weights: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Least-squares scale (and offset) per row group, given the chosen centroids.

    The normalising scale (absmax, rms, max - min) is a good starting point for k-means
    but not the best multiplier for the centroids that were picked: minimising
    ||w - s * c - o||^2 over (s, o) per group is closed form and never worse. With
    `col_weights` [in] (input-channel importance) the squares are weighted per column.
    """
    out, n = W.shape
    w, c = W.view(out, n // G, G), Wc.view(out, n // G, G)
    v = torch.ones(1, n // G, G) if col_weights is None else col_weights.float().view(1, n // G, G)
    v = v.to(W.device)
    if offsets is None:
        cc = (v * c * c).sum(-1)
        s = torch.where(cc > 0, (v * w * c).sum(-1) / cc.clamp_min(1e-30), scales)
        return _keep_better(w, c, v, (scales, None), (_store(s), None))
    vs = v.sum(-1, keepdim=True)
    cm, wm = (v * c).sum(-1, keepdim=True) / vs, (v * w).sum(-1, keepdim=True) / vs
    var = (v * (c - cm) ** 2).sum(-1)
    s = torch.where(var > 0, (v * (c - cm) * (w - wm)).sum(-1) / var.clamp_min(1e-30), scales)
    s = _store(s)
    o = _store(wm[..., 0] - s * cm[..., 0])
    return _keep_better(w, c, v, (scales, offsets), (s, o))


def _keep_better(w: Tensor, c: Tensor, v: Tensor, old, new):
    """Per group, the (scale, offset) pair with the smaller (column-weighted) error (fp16
    rounding can undo a fit)."""
    def err(s, o):
        r = c * s[..., None] + (0 if o is None else o[..., None]) - w
        return (v * r * r).sum(-1)

    better = err(*new) <= err(*old)
    s = torch.where(better, new[0], old[0])
    o = None if old[1] is None else torch.where(better, new[1], old[1])
    return s, o


def quantize_pq(W: Tensor, cfg: PQConfig, name: str = "weight", device=None,
                importance: Tensor | None = None) -> dict[str, Tensor | None]:
    """FASQ: k-means codebooks on the (normalised) weights alone; codes = nearest centroid.

    `importance` [in] (optional, > 0): a weight per input column (see `fasq.quant.importance`);
    k-means, the code choice and the scale refit then minimise the column-weighted squared
    error sum_i importance_i * (W[:, i] - W_hat[:, i])^2 instead of the plain one."""
    out, n = W.shape
    cfg.check_shape(out, n, name)
    check_finite(W, name)
    device = device or W.device
    W = W.to(device=device, dtype=torch.float32)
    G = cfg.scale_group_size(n)
    Wn, scales, offsets = _normalise(W, cfg.scale, G)
    M, C = n // cfg.d, cfg.num_codebooks(n)
    Mc = M // C  # subspaces per codebook
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    if importance is not None:
        cents, codes = _pq_weighted(Wn, cfg, importance, gen, name)
    else:
        # Sub-vectors grouped by codebook: [C, out * Mc, d]
        pts = Wn.view(out, C, Mc, cfg.d).transpose(0, 1).reshape(C, out * Mc, cfg.d)
        N = pts.shape[1]
        fit = pts
        if cfg.kmeans_sample and N > cfg.kmeans_sample:  # fit on a sample, assign all
            fit = pts[:, torch.randperm(N, generator=gen)[:cfg.kmeans_sample].to(device)]
        cents = _store(kmeans(fit, cfg.K, cfg.kmeans_iters, cfg.kmeans_init, gen))
        codes = assign(pts, cents)  # [C, out * Mc]
        codes = codes.view(C, out, Mc).transpose(0, 1).reshape(out, M)
    if cfg.refine_scales and scales is not None:
        Wc = ops.dequantize(codes, cents)  # [out, n] normalised reconstruction
        scales, offsets = _refit_scales(W, Wc, scales, offsets, G, importance)
    return {
        "codes": codes.to(ops.code_dtype(cfg.K)),
        "codebooks": cents.to(STORE_DTYPE),
        "scales": None if scales is None else scales.to(STORE_DTYPE),
        "offsets": None if offsets is None else offsets.to(STORE_DTYPE),
    }


def _pq_weighted(Wn: Tensor, cfg: PQConfig, importance: Tensor, gen: torch.Generator,
                 name: str) -> tuple[Tensor, Tensor]:
    """Centroids [C, K, d] and codes [out, M] under column weights (`kmeans_weighted`).

    k-means fits on a random subset of rows (all subspaces of each: about `kmeans_sample`
    sub-vectors per codebook), then every sub-vector gets its nearest centroid under the
    weighted distance."""
    out, n = Wn.shape
    if importance.shape != (n,) or not torch.isfinite(importance).all() or (importance <= 0).any():
        raise ValueError(f"{name}: importance must be {n} positive finite values (one per input column)")
    M, C = n // cfg.d, cfg.num_codebooks(n)
    Mc = M // C
    pts = Wn.view(out, C, Mc, cfg.d).permute(1, 2, 0, 3)  # [C, Mc, out, d]
    wts = importance.to(Wn.device, torch.float32).view(C, Mc, cfg.d)
    wts = wts / wts.mean()
    fit = pts
    rows = -(-cfg.kmeans_sample // Mc) if cfg.kmeans_sample else out
    if rows < out:
        fit = pts[:, :, torch.randperm(out, generator=gen)[:max(rows, -(-cfg.K // Mc))].to(Wn.device)]
    cents = _store(kmeans_weighted(fit.contiguous(), wts, cfg.K, cfg.kmeans_iters, cfg.kmeans_init, gen))
    codes = assign_weighted(pts.contiguous(), wts, cents)  # [C, Mc, out]
    return cents, codes.permute(2, 0, 1).reshape(out, M)


def quantize_rtn(W: Tensor, cfg: RTNConfig, name: str = "weight", device=None) -> dict[str, Tensor | None]:
    """Asymmetric round-to-nearest: q = round((w - min) / scale), scale = (max - min) / (2^b - 1)."""
    out, n = W.shape
    cfg.check_shape(out, n, name)
    check_finite(W, name)
    W = W.to(device=device or W.device, dtype=torch.float32)
    G = cfg.group_size or n
    Wg = W.view(out, n // G, G)
    lo, hi = Wg.amin(-1), Wg.amax(-1)
    qmax = cfg.K - 1
    scale = _store(torch.where(hi > lo, (hi - lo) / qmax, torch.ones_like(hi)))
    lo = _store(lo)
    q = torch.round((Wg - lo[..., None]) / scale[..., None]).clamp_(0, qmax)
    grid = torch.arange(cfg.K, dtype=torch.float32, device=W.device).view(1, cfg.K, 1)
    return {
        "codes": q.view(out, n).to(ops.code_dtype(cfg.K)),
        "codebooks": grid.to(STORE_DTYPE),
        "scales": scale.to(STORE_DTYPE),
        "offsets": lo.to(STORE_DTYPE),
    }


# method name -> quantizer(W, cfg, name, device, importance) -> the layer's tensors
QUANTIZERS = {
    "pq": quantize_pq,
    "rtn": lambda W, cfg, name="weight", device=None, importance=None: quantize_rtn(W, cfg, name, device),
}


def quantize_weight(W: Tensor, cfg: LayerConfig, name: str = "weight", device=None,
                    importance: Tensor | None = None) -> dict[str, Tensor | None]:
    """The layer's tensors from its method's quantizer; `importance` (per input column) is
    used by methods that learn codebooks (PQ), ignored by RTN."""
    return QUANTIZERS[cfg.method](W, cfg, name=name, device=device, importance=importance)


def error_report(W: Tensor, W_hat: Tensor, rows: int = 1024) -> dict[str, float]:
    """Relative Frobenius error and SQNR (dB) of a reconstruction (sums in float64, a block
    of rows at a time: no float64 copy of a whole large matrix)."""
    num = den = 0.0
    for r0 in range(0, W.shape[0], rows):
        w = W[r0:r0 + rows].double()
        num += (w - W_hat[r0:r0 + rows].double()).pow(2).sum().item()
        den += w.pow(2).sum().item()
    num, den = math.sqrt(num), math.sqrt(den)
    rel = num / den if den > 0 else 0.0
    sqnr = math.inf if num == 0 else 20 * math.log10(den / num)
    return {"rel_error": rel, "sqnr_db": sqnr}


def quantize_transformed(W: Tensor, cfg: LayerConfig, name: str = "weight", device=None,
                         importance: Tensor | None = None) -> tuple[dict, Tensor]:
    """`quantize_weight` of W [out, in] behind the config's input transform: the transform's
    state is made, W (and the column importance [in]) folded, quantized; returns (the layer's
    tensors, with the transform's as `transform_<key>`; the effective weight [out, in] in
    float32, to measure the error on)."""
    T = get_transform(cfg.transform)
    state = T.make(W, cfg.seed)
    if importance is not None:
        importance = T.fold_importance(importance, state)
    q = quantize_weight(T.fold(W, state), cfg, name=name, device=device, importance=importance)
    W_hat = T.unfold(ops.dequantize(q["codes"], q["codebooks"], q["scales"], q["offsets"], dtype=torch.float32),
                     state)
    q.update({f"transform_{k}": v for k, v in state.items()})
    return q, W_hat
