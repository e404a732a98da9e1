"""Storage format: bit-packed codes, exact size accounting.

On disk each quantized layer `name` is four tensors (no kernel layout):
    name.codes      uint8 [out, ceil(M * b / 8)]  codes packed at b = log2(K) bits,
                    little-endian bit order, each row starting on a byte boundary
    name.codebooks  fp16  [C, K, d]
    name.scales     fp16  [out, S]   (when the config has scales)
    name.offsets    fp16  [out, S]   (when the config has offsets)
Every other fact (d, K, scope, ...) lives in the versioned `quantization_config`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .transforms import get_transform

STORE_DTYPE = torch.float16  # codebooks, scales, offsets and every other float a checkpoint holds


# Pack at most this many rows at once (bounds the [rows, M, b] bit tensor).
_PACK_ROWS = 4096


def packed_row_bytes(M: int, bits: int) -> int:
    return (M * bits + 7) // 8


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """codes [out, M] (values < 2^bits) -> uint8 [out, ceil(M * bits / 8)]."""
    out, M = codes.shape
    if bits == 8:  # one code per byte: packing is the identity
        return codes.cpu().to(torch.uint8).contiguous()
    nbytes = packed_row_bytes(M, bits)
    res = torch.empty(out, nbytes, dtype=torch.uint8)
    shifts = torch.arange(bits)
    weights = (1 << torch.arange(8)).to(torch.int32)
    for r0 in range(0, out, _PACK_ROWS):
        c = codes[r0:r0 + _PACK_ROWS].cpu().to(torch.int32)
        b = ((c[..., None] >> shifts) & 1).reshape(c.shape[0], M * bits)  # [rows, M*bits]
        b = torch.nn.functional.pad(b, (0, nbytes * 8 - M * bits))
        res[r0:r0 + _PACK_ROWS] = (b.view(-1, nbytes, 8) * weights).sum(-1).to(torch.uint8)
    return res


def unpack_codes(packed: Tensor, bits: int, M: int, dtype: torch.dtype) -> Tensor:
    """Inverse of `pack_codes`: uint8 [out, nbytes] -> codes [out, M] of `dtype`."""
    out, nbytes = packed.shape
    if nbytes != packed_row_bytes(M, bits):
        raise ValueError(f"packed codes have {nbytes} bytes per row, expected "
                         f"{packed_row_bytes(M, bits)} for {M} codes of {bits} bits")
    if bits == 8:
        return packed.to(dtype)
    res = torch.empty(out, M, dtype=dtype, device=packed.device)
    shifts8 = torch.arange(8, device=packed.device)
    weights = (1 << torch.arange(bits, device=packed.device)).to(torch.int32)
    for r0 in range(0, out, _PACK_ROWS):
        p = packed[r0:r0 + _PACK_ROWS].to(torch.int32)
        b = ((p[..., None] >> shifts8) & 1).reshape(p.shape[0], nbytes * 8)[:, :M * bits]
        res[r0:r0 + _PACK_ROWS] = (b.view(-1, M, bits) * weights).sum(-1).to(dtype)
    return res


@dataclass
class LayerSize:
    """Bytes of one quantized layer as stored."""

    weights: int  # number of quantized weights (out * in)
    codes: int
    codebooks: int
    scales: int
    bias: int = 0
    transform: int = 0  # an input transform's per-layer tensors (0 for none)

    @property
    def total(self) -> int:
        return self.codes + self.codebooks + self.scales + self.transform + self.bias

    @property
    def bits_per_weight(self) -> float:
        """All overhead (codes, codebooks, scales, offsets, transform) over the quantized weights."""
        return 8 * (self.total - self.bias) / self.weights


def stored_layer_size(out_features: int, in_features: int, cfg, bias: bool = False) -> LayerSize:
    """Exact stored bytes of a [out, in] layer stored with `cfg` (fp16: 2 bytes per element)."""
    has_scales, has_offsets = cfg.scale_kinds()
    scales = out_features * cfg.num_scale_groups(in_features) * 2
    specs = get_transform(cfg.transform).tensor_specs(in_features).values()
    return LayerSize(
        weights=out_features * in_features,
        codes=out_features * packed_row_bytes(in_features // cfg.d, cfg.code_bits),
        codebooks=cfg.num_codebooks(in_features) * cfg.K * cfg.d * 2,
        scales=scales * (has_scales + has_offsets),
        bias=out_features * 2 if bias else 0,
        transform=sum(math.prod(shape) * dtype.itemsize for shape, dtype in specs),
    )


def layer_size(module) -> LayerSize:
    """Exact stored size of a `PQLinear` (the same arithmetic as its buffers' shapes)."""
    return stored_layer_size(module.out_features, module.in_features, module.config, module.bias is not None)


def _persistent_buffers(model):
    for mname, mod in model.named_modules():
        for bname, b in mod.named_buffers(recurse=False):
            if b is not None and bname not in mod._non_persistent_buffers_set:
                yield (f"{mname}.{bname}" if mname else bname), b


def unquantized_elements(model, is_quantized) -> int:
    """Elements of the float parameters and (saved) buffers stored in fp16 beside the
    quantized layers: those whose name `is_quantized` rejects, tied tensors counted once."""
    seen, n = set(), 0
    for name, t in list(model.named_parameters()) + list(_persistent_buffers(model)):
        if is_quantized(name) or t.data_ptr() in seen or not t.is_floating_point():
            continue
        seen.add(t.data_ptr())
        n += t.numel()
    return n


def size_summary(q: dict[str, LayerSize], other: int) -> dict:
    """The size table of quantized layers `q` (name -> LayerSize) beside `other` unquantized
    float elements (2 bytes each on disk)."""
    qweights = sum(s.weights for s in q.values())
    quant_bytes = sum(s.total for s in q.values())
    fp16_model = 2 * (qweights + other)
    total = quant_bytes + 2 * other
    return {
        "quantized_layers": len(q),
        "quantized_weights": qweights,
        "codes_bytes": sum(s.codes for s in q.values()),
        "codebook_bytes": sum(s.codebooks for s in q.values()),
        "scale_bytes": sum(s.scales for s in q.values()),
        "unquantized_params": other,
        "unquantized_bytes": 2 * other + sum(s.bias for s in q.values()),
        "total_bytes": total,
        "fp16_bytes": fp16_model,
        "bits_per_weight": (8 * sum(s.total - s.bias for s in q.values()) / qweights) if qweights else math.nan,
        "size_fraction_of_fp16": total / fp16_model if fp16_model else math.nan,
    }


def format_size_table(t: dict) -> str:
    mb = lambda b: f"{b / 1e6:9.2f} MB"  # noqa: E731
    rows = [
        ("quantized layers", f"{t['quantized_layers']:>12}"),
        ("quantized weights", f"{t['quantized_weights']:>12,}"),
        ("codes", mb(t["codes_bytes"])),
        ("codebooks", mb(t["codebook_bytes"])),
        ("scales/offsets", mb(t["scale_bytes"])),
        ("unquantized (fp16)", mb(t["unquantized_bytes"])),
        ("checkpoint total", mb(t["total_bytes"])),
        ("FP16 model", mb(t["fp16_bytes"])),
        ("bits per weight", f"{t['bits_per_weight']:12.3f}"),
        ("size vs FP16", f"{100 * t['size_fraction_of_fp16']:11.1f}%"),
    ]
    return "\n".join(f"  {k:<20}{v}" for k, v in rows)
