"""Streaming quantization: a model read tensor by tensor, quantized, written shard by shard.

    from fasq.stream import quantize_streaming
    quantize_streaming("path/to/hf_folder_or.gguf", "out_dir", QuantConfig())

`fasq quantize` uses it; `fasq.quantize_model` (a built model in memory) stays for the API.
"""

from .pipeline import make_plan, quantize_streaming
from .readers import open_reader

__all__ = ["make_plan", "open_reader", "quantize_streaming"]
