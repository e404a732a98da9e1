"""fasq: calibration-free product quantization of LLMs (FASQ), with GPU kernels.

`import fasq` needs no GPU, Triton or network. It registers the "fasq" quantization
method with transformers (when installed), so that
`AutoModelForCausalLM.from_pretrained(checkpoint_dir)` loads fasq checkpoints.
"""

from .core import ops  # noqa: F401 - registers the fasq::pq_linear custom op
from . import kernels  # noqa: F401 - its CUDA implementation (triton imported only when called)
from .core.config import ConfigError, PQConfig, QuantConfig, RTNConfig
from .core.module import PQLinear
from .io.checkpoint import load_quantized, save_quantized
from .io.manifest import CheckpointError
from .stream.memory import quantize_model
from .version import __version__

try:  # transformers is a dependency, but keep the core usable without it
    from .integrations import hf as _hf  # noqa: F401
except ImportError:  # pragma: no cover
    pass

__all__ = ["PQConfig", "RTNConfig", "QuantConfig", "ConfigError", "CheckpointError", "PQLinear",
           "quantize_model", "save_quantized", "load_quantized"]
