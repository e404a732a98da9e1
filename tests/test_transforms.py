"""The input-transform seam, tested with a transform that exists only here (a random
permutation of the input features): one class and a config field make it work on every
kernel path, through save/load and streaming; the identity adds nothing to checkpoints."""

import json

import pytest
import torch
from safetensors import safe_open

from fasq.core import transforms
from fasq.core.config import ConfigError, PQConfig, QuantConfig, RTNConfig
from fasq.kernels.cpu import library as cpu
from fasq.kernels import pq_linear_triton
from fasq.io.checkpoint import load_quantized, save_quantized
from fasq.stream.memory import quantize_model
from fasq.core.module import PQLinear
from fasq.stream import quantize_streaming

FAST = dict(kmeans_iters=2, kmeans_sample=2048)


class Permutation(transforms.InputTransform):
    """x' = x[perm], W' = W[:, perm]: W' x' = W x. The permutation is stored per layer."""

    @staticmethod
    def tensor_specs(in_features):
        return {"perm": ((in_features,), torch.int64)}

    @staticmethod
    def make(W, seed):
        return {"perm": torch.randperm(W.shape[1], generator=torch.Generator().manual_seed(seed))}

    @staticmethod
    def apply(x, state):
        return x[..., state["perm"]]

    @staticmethod
    def fold(W, state):
        return W[:, state["perm"]]

    @staticmethod
    def unfold(W, state):
        return W[:, torch.argsort(state["perm"])]

    @staticmethod
    def fold_importance(importance, state):
        return importance[state["perm"]]


@pytest.fixture
def perm_transform():
    transforms.register_transform("test-permutation")(Permutation)
    yield "test-permutation"
    transforms.TRANSFORMS.pop("test-permutation")


def _layer(perm_transform, tiny_llama, **kw):
    qcfg = QuantConfig(layer=PQConfig(d=2, K=16, transform=perm_transform, **{**FAST, **kw}))
    quantize_model(tiny_llama, qcfg, progress=False)
    return tiny_llama.model.layers[1].mlp.down_proj  # [64, 96], with a bias-free output


def test_output_is_the_effective_weight_times_x_on_every_path(perm_transform, tiny_llama):
    pq = _layer(perm_transform, tiny_llama)
    assert isinstance(pq, PQLinear) and pq.transform is Permutation
    perm = pq.transform_perm
    assert not torch.equal(perm, torch.arange(perm.numel()))
    W_eff, W_stored = pq.effective_weight(torch.float64), pq.dequantize(torch.float64)
    assert not torch.allclose(W_eff, W_stored)  # the stored layout really is permuted
    torch.set_num_threads(2)
    for T in (1, 3, 17):
        x = torch.randn(T, pq.in_features)
        ref, mag = x.double() @ W_eff.T, (x.double().abs() @ W_eff.abs().T).max()
        for kernel in cpu.CPU_KERNELS:  # what PQLinear.forward runs on the CPU
            with cpu.use_kernel(kernel):
                y = pq(x)
            # the int8 path rounds activations and codebooks to int8 (about 1/254 each)
            tol = 1e-2 if kernel == "cpu_int8" else 1e-5
            assert (y.double() - ref).abs().max() / mag < tol, f"cpu path {kernel}"
        xh = x.half()  # the Triton paths (interpreted on the CPU), behind the same apply
        for kernel in ("gemv", "lut_gemm", "dequant_gemm", "dequant_cublas", "reference"):
            if kernel == "gemv" and T > 16:
                continue
            y = pq_linear_triton(Permutation.apply(xh, {"perm": perm}), pq.codes, pq.codebooks.half(),
                                 pq.scales.half(), None, None, kernel=kernel)
            err = (y.double() - xh.double() @ W_eff.T).abs().max() / (xh.double().abs() @ W_eff.abs().T).max()
            assert err < 2e-3, (kernel, float(err))


def test_transform_tensors_round_trip_in_memory_and_streamed(perm_transform, tiny_llama, tmp_path):
    from conftest import save_tiny_llama

    src = save_tiny_llama(tmp_path / "src")
    qcfg = QuantConfig(layer=PQConfig(d=2, K=16, transform=perm_transform, **FAST))
    from fasq.io.sources import load_model

    model, tok = load_model(str(src))
    rep = quantize_model(model, qcfg, progress=False)
    save_quantized(model, tmp_path / "mem", tokenizer=tok, report=rep)
    quantize_streaming(str(src), tmp_path / "str", qcfg, progress=False)
    with safe_open(str(tmp_path / "mem" / "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "str" / "model.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert "model.layers.0.self_attn.q_proj.transform_perm" in a.keys()
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
    loaded = load_quantized(tmp_path / "str")
    ids = torch.randint(0, 200, (1, 12))
    # fp16 norms and embeddings in the checkpoint: 1e-3, as tests/test_stream.py (no permutation: ~1);
    # the exact kernel, since int8 rounding of slightly different activations differs more
    with cpu.use_kernel("cpu_gemv"):
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-3, atol=1e-3)
    info = json.loads((tmp_path / "str" / "config.json").read_text())
    assert info["quantization_config"]["layer"]["transform"] == perm_transform
    # the permutation is a checked fact: a checkpoint whose config drops it is refused
    from fasq.io.manifest import MANIFEST_NAME, CheckpointError

    info["quantization_config"]["layer"]["transform"] = "none"
    (tmp_path / "str" / "config.json").write_text(json.dumps(info))
    (tmp_path / "str" / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointError, match="has input-transform tensors"):
        load_quantized(tmp_path / "str")


def test_identity_stores_nothing_and_costs_nothing(tiny_llama, tmp_path):
    quantize_model(tiny_llama, QuantConfig(layer=PQConfig(d=2, K=16, **FAST)), progress=False)
    save_quantized(tiny_llama, tmp_path / "ck")
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        kinds = {k.rsplit(".", 1)[1] for k in f.keys() if "layers.0.mlp" in k}
    assert kinds == {"codes", "codebooks", "scales"}
    pq = tiny_llama.model.layers[0].mlp.up_proj
    assert torch.equal(pq.effective_weight(), pq.dequantize())


def test_unknown_transforms_are_refused():
    with pytest.raises(ConfigError, match="transform must be one of"):
        PQConfig(transform="hadamard")
    with pytest.raises(ConfigError, match="transform must be one of"):
        RTNConfig(transform="rotate")
