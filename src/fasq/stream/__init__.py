"""The quantization pipeline: a model read tensor by tensor (files: `readers.py`; a built
model: `memory.ModuleReader`), its linear layers selected, quantized and reported by one
loop (`pipeline.py`), written shard by shard; the size solver on the same plan (`solve.py`).

    from fasq.stream import quantize_streaming
    quantize_streaming("path/to/hf_folder_or.gguf", "out_dir", QuantConfig())

`fasq quantize` streams; `fasq.quantize_model` (a built model, quantized in place) runs
the same steps over the model's own tensors.
"""

from .memory import ModuleReader, quantize_model
from .pipeline import make_plan, quantize_streaming
from .readers import open_reader

__all__ = ["ModuleReader", "make_plan", "open_reader", "quantize_model", "quantize_streaming"]
