"""transformers integration: `AutoModelForCausalLM.from_pretrained(fasq_dir)` after `import fasq`.

Registers a `QuantizationConfigMixin` and an `HfQuantizer` under the name "fasq". The
quantizer swaps the listed nn.Linear modules for PQLinear (on the meta device, before
weights load), expecting bit-packed codes, and unpacks them after loading; the nn.Linear
modules left dense (the output head, by default) become `DenseLinear`, whose op runs the
CPU's bf16 decode kernel.
"""

from __future__ import annotations

from pathlib import Path

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..core.config import QUANT_METHOD, QuantConfig
from ..core.convert import replace_linears
from ..core.module import PQLinear, use_dense_op
from ..io.manifest import verify_checkpoint
from .attention import use_decode_attention


class FasqHfConfig(QuantizationConfigMixin):
    """Wraps `QuantConfig` for transformers; validated (format version included) on construction."""

    def __init__(self, **kwargs):
        known = {k: kwargs.pop(k) for k in ("format_version", "layer", "skip", "overrides", "modules", "importance")
                 if k in kwargs}
        known["quant_method"] = kwargs.pop("quant_method", QUANT_METHOD)
        self.qcfg = QuantConfig.from_dict(known)
        self.quant_method = QUANT_METHOD
        for k, v in kwargs.items():  # transformers may add bookkeeping keys
            setattr(self, k, v)

    def to_dict(self):
        return self.qcfg.to_dict()

    def to_diff_dict(self):
        return self.to_dict()


class FasqHfQuantizer(HfQuantizer):
    requires_calibration = True  # loads pre-quantized checkpoints; quantize with `fasq quantize`

    def validate_environment(self, *args, **kwargs):
        pass

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if checkpoint_files:
            verify_checkpoint(Path(checkpoint_files[0]).parent)
        qcfg = self.quantization_config.qcfg
        replace_linears(model, qcfg, qcfg.modules, packed_codes=True)

    def _process_model_after_weight_loading(self, model, **kwargs):
        for m in model.modules():
            if isinstance(m, PQLinear):
                m.unpack_codes_()
        use_dense_op(model)  # the layers left dense (the head) through fasq::dense_linear
        if next(model.parameters()).device.type == "cpu":
            use_decode_attention(model)  # single-token steps with packed query heads (attention.py)
        return model

    def is_serializable(self, *args, **kwargs):
        return True  # PQLinear's state dict holds packed codes: save_pretrained round-trips

    @property
    def is_trainable(self):
        return False

    @property
    def is_compileable(self):
        return True


def register() -> None:
    """Idempotent registration with transformers' auto-quantization maps."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(FasqHfConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(FasqHfQuantizer)


register()
