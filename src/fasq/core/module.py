"""`PQLinear`: a linear layer stored in the FASQ format.

Built from sizes and a layer config only (so it can live on the meta device while a
checkpoint loads); `forward` is one call of the `fasq::pq_linear` op.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import ops
from .config import LayerConfig
from .format import layer_size, pack_codes, packed_row_bytes, size_summary, unpack_codes, unquantized_elements
from .transforms import Identity, get_transform


def transformed_pq_linear(x: Tensor, transform, state: dict[str, Tensor], codes: Tensor, codebooks: Tensor,
                          scales: Tensor | None, offsets: Tensor | None, bias: Tensor | None) -> Tensor:
    """One quantized matrix behind its input transform: fasq::pq_linear(T x). The forward of
    `PQLinear` and of each sub-matrix in the vLLM linear method. x: [..., in]; codes
    [out, in / d]; `transform`: the class resolved once at construction (Identity: x as is)."""
    if transform is not Identity:
        x = transform.apply(x, state)
    return torch.ops.fasq.pq_linear(x, codes, codebooks, scales, offsets, bias)


class PQLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, config: LayerConfig, bias: bool = False,
                 device=None, dtype: torch.dtype = torch.float16):
        super().__init__()
        config.check_shape(out_features, in_features)
        self.in_features, self.out_features, self.config = in_features, out_features, config
        M, C = in_features // config.d, config.num_codebooks(in_features)
        S = self.num_scale_groups(config, in_features)
        # codes: [out, M]; codebooks: [C, K, d]; scales, offsets: [out, S]
        self.register_buffer("codes", torch.empty(out_features, M, dtype=ops.code_dtype(config.K), device=device))
        self.register_buffer("codebooks", torch.empty(C, config.K, config.d, dtype=dtype, device=device))
        has_scales, has_offsets = self.scale_kinds(config)
        self.register_buffer("scales", torch.empty(out_features, S, dtype=dtype, device=device) if has_scales else None)
        self.register_buffer("offsets", torch.empty(out_features, S, dtype=dtype, device=device) if has_offsets else None)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        # an input transform's per-layer tensors (none for the identity): transform_<key>
        self.transform = get_transform(config.transform)
        for key, (shape, tdtype) in self.transform.tensor_specs(in_features).items():
            self.register_buffer(f"transform_{key}", torch.empty(shape, dtype=tdtype, device=device))

    @staticmethod
    def scale_kinds(config: LayerConfig) -> tuple[bool, bool]:
        """(has scales, has offsets) for a config."""
        return config.scale_kinds()

    @staticmethod
    def num_scale_groups(config: LayerConfig, in_features: int) -> int:
        return config.num_scale_groups(in_features)

    # --- codes are bit-packed in state dicts (the storage format), unpacked in memory ---

    @property
    def packed_codes_shape(self) -> tuple[int, int]:
        return self.out_features, packed_row_bytes(self.in_features // self.config.d, self.config.code_bits)

    def _unpack_if_packed(self, codes: Tensor) -> Tensor:
        if codes.dtype == torch.uint8 and tuple(codes.shape) == self.packed_codes_shape:
            return unpack_codes(codes, self.config.code_bits, self.in_features // self.config.d,
                                ops.code_dtype(self.config.K))
        return codes

    def expect_packed_codes(self) -> None:
        """Make `codes` an (empty) packed buffer, for loaders that assign tensors directly."""
        self.codes = torch.empty(self.packed_codes_shape, dtype=torch.uint8, device=self.codes.device)

    def unpack_codes_(self) -> None:
        """After a direct load of packed codes, convert them to the in-memory layout."""
        self.codes = self._unpack_if_packed(self.codes)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        codes = self.codes
        if codes.device.type == "meta":
            packed = torch.empty(self.packed_codes_shape, dtype=torch.uint8, device="meta")
        elif codes.dtype == torch.uint8 and tuple(codes.shape) == self.packed_codes_shape:
            packed = codes  # already packed (mid-load), or 8-bit codes whose packing is the identity
        else:
            packed = pack_codes(codes, self.config.code_bits)
        destination[prefix + "codes"] = packed

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "codes"
        if key in state_dict:
            state_dict[key] = self._unpack_if_packed(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def transform_state(self) -> dict[str, Tensor]:
        return {k: getattr(self, f"transform_{k}") for k in self.transform.tensor_specs(self.in_features)}

    def forward(self, x: Tensor) -> Tensor:
        if self.transform is Identity:  # no state to gather: this runs once per layer and token
            return torch.ops.fasq.pq_linear(x, self.codes, self.codebooks, self.scales, self.offsets, self.bias)
        return transformed_pq_linear(x, self.transform, self.transform_state(), self.codes, self.codebooks,
                                     self.scales, self.offsets, self.bias)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The stored W'[out, in] as a dense tensor (the weight the kernels multiply)."""
        return ops.dequantize(self.codes, self.codebooks, self.scales, self.offsets, dtype=dtype)

    def effective_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """W[out, in] with the input transform undone: forward(x) = x @ W.T + bias."""
        return self.transform.unfold(self.dequantize(dtype), self.transform_state())

    def extra_repr(self) -> str:
        c = self.config
        return f"in_features={self.in_features}, out_features={self.out_features}, {c.method}: {c.knobs()}"


class DenseLinear(nn.Linear):
    """An nn.Linear that a fasq model keeps unquantized (its output head, by default), computed
    by the fasq::dense_linear op so that a device's decode kernel can take it (the CPU's bf16
    kernel); the parameters, state dict and result are nn.Linear's (the sums' order aside).
    Loading a checkpoint turns the model's plain nn.Linear modules into this class in place
    (`use_dense_op`), so tied weights and hooks stay as they are."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad):
            return super().forward(x)  # the op has no autograd formula: training keeps F.linear
        return torch.ops.fasq.dense_linear(x, self.weight, self.bias)


def use_dense_op(model: nn.Module) -> int:
    """Make every plain nn.Linear of `model` (not subclasses, which may compute otherwise) a
    DenseLinear, in place; returns how many."""
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = DenseLinear
            n += 1
    return n


def size_table(model: nn.Module) -> dict:
    """Whole-model size accounting against the FP16 model (2 bytes per parameter).

    Tied parameters are counted once. Unquantized parameters and buffers count at 2 bytes
    per element, as they are saved in fp16.
    """
    q = {name: layer_size(m) for name, m in model.named_modules() if isinstance(m, PQLinear)}
    return size_summary(q, unquantized_elements(model, lambda name: name.rsplit(".", 1)[0] in q))
