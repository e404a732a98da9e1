"""Run-time input transforms: an invertible map T of a layer's input features, folded into
the weights when quantizing and applied to the activations before `fasq::pq_linear`:

    y = W x = (W T^-1) (T x):   quantize  W' = fold(W) = W T^-1,   run  pq_linear(apply(x), W')

Rotations and permutations spread outlier channels before k-means sees them (QuIP#,
QuaRot-style). A transform is one class registered here by name, chosen by the layer
config's `transform` field; what it needs per layer (a permutation, random signs) is a
dict of tensors saved beside the layer's codes as `NAME.transform_<key>` (tensors only:
every other fact is the config). `PQLinear.forward` and the vLLM linear method both call
`apply`, so a transform works on every kernel path and in every integration at once.

Only the identity ("none") ships; it stores nothing and costs nothing, so checkpoints
are the same bytes as before the seam existed.
"""

from __future__ import annotations

from torch import Tensor

TRANSFORMS: dict[str, type["InputTransform"]] = {}


def register_transform(name: str):
    """Class decorator: make a transform available as `transform=name` in layer configs."""
    def deco(cls):
        cls.name = name
        TRANSFORMS[name] = cls
        return cls
    return deco


def get_transform(name: str) -> type["InputTransform"]:
    try:
        return TRANSFORMS[name]
    except KeyError:
        raise ValueError(f"unknown input transform {name!r}; known: {sorted(TRANSFORMS)}") from None


class InputTransform:
    """The interface (static methods on per-layer state: a dict of tensors)."""

    name = "base"

    @staticmethod
    def tensor_specs(in_features: int) -> dict[str, tuple[tuple[int, ...], "torch.dtype"]]:  # noqa: F821
        """key -> (shape, dtype) of the per-layer tensors it stores (to build empty layers)."""
        return {}

    @staticmethod
    def make(W: Tensor, seed: int) -> dict[str, Tensor]:
        """The state for weight W [out, in], made when quantizing (deterministic in `seed`)."""
        return {}

    @staticmethod
    def apply(x: Tensor, state: dict[str, Tensor]) -> Tensor:
        """T x for activations x [..., in]."""
        return x

    @staticmethod
    def fold(W: Tensor, state: dict[str, Tensor]) -> Tensor:
        """W T^-1 for weights W [out, in]: what is quantized."""
        return W

    @staticmethod
    def unfold(W: Tensor, state: dict[str, Tensor]) -> Tensor:
        """W' T: the effective weight of a layer whose stored weight is W' [out, in]."""
        return W

    @staticmethod
    def fold_importance(importance: Tensor, state: dict[str, Tensor]) -> Tensor | None:
        """Per-input-column importance [in] in the transformed basis (None when the transform
        mixes columns so that no per-column weight describes it: then unweighted)."""
        return importance


@register_transform("none")
class Identity(InputTransform):
    """No transform (the default)."""
