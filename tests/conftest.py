import importlib
import os

import pytest
import torch

# `make test` sets FASQ_STRICT=1: everything it installs (triton, lm-eval, the default model,
# a C++ compiler for the CPU library) must be there, so a test that would skip fails instead
# of silently vanishing from the run.
STRICT = os.environ.get("FASQ_STRICT") == "1"


def skip_or_fail(msg: str, module_level: bool = False):
    if STRICT:
        pytest.fail(f"{msg} (FASQ_STRICT=1: make test requires it)", pytrace=False)
    pytest.skip(msg, allow_module_level=module_level)


def require(module: str, reason: str | None = None):
    """`pytest.importorskip`, except that under FASQ_STRICT a missing module fails."""
    if STRICT:
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=reason)


@pytest.fixture
def two_threads():
    """Kernels run with 2 threads, as users run them (other test modules set 1 when imported);
    kernel test modules use it for every test (pytestmark)."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def tiny_llama():
    """A tiny random Llama (tied embeddings, like the default model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def save_tiny_llama(d, dtype=torch.float32, max_shard_size=None, **overrides):
    """A tiny random Llama with the default model's tokenizer, saved as a HF folder `d`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fasq.io.sources import default_model_file

    f = default_model_file()
    tok = AutoTokenizer.from_pretrained(f.parent, gguf_file=f.name)
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                max_position_embeddings=256), **overrides})
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(d, **kw)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")
